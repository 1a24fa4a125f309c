"""iscsi:// URL parsing (libiscsi's form)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.iscsi.url import IscsiUrl, UrlError, parse_portal, parse_url

GOOD = [
    ("iscsi://127.0.0.1/iqn.2024-01.org.example:t1/1", IscsiUrl("127.0.0.1", 3260, "iqn.2024-01.org.example:t1", 1)),
    ("iscsi://127.0.0.1:3261/iqn.x:y/0", IscsiUrl("127.0.0.1", 3261, "iqn.x:y", 0)),
    ("iscsi://bob@host/iqn.x/2", IscsiUrl("host", 3260, "iqn.x", 2, "bob", None)),
    ("iscsi://bob%s3cr:et@host:99/iqn.x/3", IscsiUrl("host", 99, "iqn.x", 3, "bob", "s3cr:et")),
    ("iscsi://bob%@host/iqn.x/3", IscsiUrl("host", 3260, "iqn.x", 3, "bob", "")),
    ("iscsi://[::1]:3262/iqn.x/4", IscsiUrl("::1", 3262, "iqn.x", 4)),
    ("iscsi://[::1]/iqn.x/4", IscsiUrl("::1", 3260, "iqn.x", 4)),
    ("ISCSI://h/iqn.x/16383", IscsiUrl("h", 3260, "iqn.x", 16383)),
]


@pytest.mark.parametrize("text,want", GOOD)
def test_parse_good(text: str, want: IscsiUrl) -> None:
    assert parse_url(text) == want


@pytest.mark.parametrize("text,want", GOOD)
def test_str_round_trips(text: str, want: IscsiUrl) -> None:
    assert parse_url(str(want)) == want


@pytest.mark.parametrize(
    "text",
    [
        "http://h/iqn.x/1",
        "iscsi://h",
        "iscsi://h/",
        "iscsi://h/iqn.x",
        "iscsi://h/iqn.x/",
        "iscsi://h/iqn.x/one",
        "iscsi://h/iqn.x/-1",
        "iscsi://h/iqn.x/16384",
        "iscsi://h/a/b/1",
        "iscsi://h:0/iqn.x/1",
        "iscsi://h:65536/iqn.x/1",
        "iscsi://h:port/iqn.x/1",
        "iscsi://:3260/iqn.x/1",
        "iscsi://@h/iqn.x/1",
        "iscsi://[::1/iqn.x/1",
        "iscsi://[::1]x/iqn.x/1",
        "iscsi://h/iqn.x/1?header_digest=crc32c",
        "iscsi:///iqn.x/1",
    ],
)
def test_parse_bad(text: str) -> None:
    with pytest.raises(UrlError):
        parse_url(text)


def test_portal_only_url() -> None:
    u = parse_url("iscsi://127.0.0.1:3300", require_lun=False)
    assert (u.host, u.port, u.target) == ("127.0.0.1", 3300, "")
    assert u.portal == "127.0.0.1:3300"
    assert str(u) == "iscsi://127.0.0.1:3300"


@pytest.mark.parametrize(
    "text,want",
    [
        ("10.0.0.1", ("10.0.0.1", 3260)),
        ("10.0.0.1:3261", ("10.0.0.1", 3261)),
        ("10.0.0.1:3261,1", ("10.0.0.1", 3261)),  # SendTargets TargetAddress with TPGT
        ("[fe80::1]:3261,2", ("fe80::1", 3261)),
        ("fe80::1", ("fe80::1", 3260)),
    ],
)
def test_parse_portal(text: str, want: tuple[str, int]) -> None:
    assert parse_portal(text) == want


def test_ipv6_portal_is_bracketed() -> None:
    assert parse_url("iscsi://[::1]:3262/iqn.x/4").portal == "[::1]:3262"


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-:", min_size=1, max_size=40)


@given(
    host=st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), _name.filter(lambda s: ":" not in s)),
    port=st.integers(1, 65535),
    target=_name,
    lun=st.integers(0, 0x3FFF),
    user=st.one_of(st.none(), st.text(alphabet="abcdefghij0123456789_", min_size=1, max_size=10)),
    password=st.one_of(st.none(), st.text(alphabet="abcdef%:!0123456789", max_size=12)),
)
def test_round_trip_property(host: str, port: int, target: str, lun: int, user: str | None,
                             password: str | None) -> None:
    if user is None:
        password = None
    u = IscsiUrl(host, port, target, lun, user, password)
    assert parse_url(str(u)) == u


@given(st.text(max_size=80))
def test_parser_raises_only_url_error(text: str) -> None:
    try:
        parse_url("iscsi://" + text)
    except UrlError:
        pass
