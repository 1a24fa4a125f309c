"""iSCSI TransportIDs (SPC-5 7.6.4.6): golden vectors, matching, malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.lun.types import Nexus
from prmigrate.scsi.transport_id import (
    PrDecodeError,
    PrLengthError,
    TransportId,
    TransportIdFormat,
)

# Format 00b, "iqn.a": 6 bytes with NUL, padded to the 20-byte minimum.
GOLDEN_00 = bytes.fromhex("05000014") + b"iqn.a" + bytes(15)
# Format 01b: "iqn.a,i,0x23d000000001" + NUL = 23 bytes, padded to 24.
GOLDEN_01 = bytes.fromhex("45000018") + b"iqn.a,i,0x23d000000001" + bytes(2)


def test_golden_format_00():
    tid = TransportId("iqn.a")
    assert tid.format is TransportIdFormat.NAME
    assert tid.encode() == GOLDEN_00
    assert TransportId.decode(GOLDEN_00) == (tid, 24)


def test_golden_format_01():
    tid = TransportId("iqn.a", 0x23D000000001)
    assert tid.format is TransportIdFormat.NAME_AND_ISID
    assert tid.encode() == GOLDEN_01
    assert TransportId.decode(GOLDEN_01) == (tid, 28)


def test_decode_consumes_only_its_bytes_and_accepts_memoryview():
    tid, used = TransportId.decode(memoryview(GOLDEN_01 + b"trailing"))
    assert used == 28 and tid.isid == 0x23D000000001


def test_decode_isid_case_insensitive_hex_and_separator():
    raw = bytes.fromhex("45000018") + b"IQN.A,I,0X23D00000000F" + bytes(2)
    tid, _ = TransportId.decode(raw)
    assert tid == TransportId("IQN.A", 0x23D00000000F)
    assert tid.matches(Nexus.make("iqn.a", 0x23D00000000F, "t"))


def test_encode_length_is_multiple_of_4_and_at_least_24():
    for n in range(1, 60):
        enc = TransportId("i" * n, 1).encode()
        assert len(enc) % 4 == 0 and len(enc) >= 24
        assert int.from_bytes(enc[2:4], "big") == len(enc) - 4
        enc0 = TransportId("i" * n).encode()
        assert len(enc0) % 4 == 0 and len(enc0) >= 24


def test_matches_and_of():
    n = Nexus.make("IQN.Host", 0x1234, "iqn.target", rel_port=2)
    assert TransportId.of(n) == TransportId("iqn.host", 0x1234)
    assert TransportId("iqn.HOST", 0x1234).matches(n)
    assert not TransportId("iqn.host", 0x1235).matches(n)
    assert TransportId("iqn.host").matches(n)  # format 00b: any ISID
    assert not TransportId("iqn.other").matches(n)
    assert str(TransportId.of(n)) == n.initiator_port


@pytest.mark.parametrize(
    "raw, err",
    [
        (b"", PrLengthError),
        (b"\x05\x00\x00", PrLengthError),
        (bytes.fromhex("05000014") + b"iqn.a", PrLengthError),  # shorter than its length
        (bytes.fromhex("06000014") + b"iqn.a" + bytes(15), PrDecodeError),  # SAS protocol id
        (bytes.fromhex("85000014") + b"iqn.a" + bytes(15), PrDecodeError),  # format 10b
        (bytes.fromhex("c5000014") + b"iqn.a" + bytes(15), PrDecodeError),  # format 11b
        (bytes.fromhex("05000013") + b"iqn.a" + bytes(14), PrDecodeError),  # not multiple of 4
        (bytes.fromhex("05000010") + b"iqn.a" + bytes(11), PrDecodeError),  # below 20
        (bytes.fromhex("05000014") + b"i" * 20, PrDecodeError),  # no NUL
        (bytes.fromhex("05000014") + bytes(20), PrDecodeError),  # empty name
        (bytes.fromhex("45000014") + b"iqn.a" + bytes(15), PrDecodeError),  # 01b without ISID
        (bytes.fromhex("45000018") + b"iqn.a,i,0x23d00000000g" + bytes(2), PrDecodeError),
        (bytes.fromhex("45000018") + b"iqn.a,i,0x23d0000000" + bytes(4), PrDecodeError),
        (bytes.fromhex("45000018") + b",i,0x23d000000001" + bytes(7), PrDecodeError),
        (bytes.fromhex("05000014") + b"\xff\xfe" + bytes(18), PrDecodeError),  # not UTF-8
    ],
)
def test_malformed(raw, err):
    with pytest.raises(err):
        TransportId.decode(raw)


def test_invalid_construction():
    with pytest.raises(PrDecodeError):
        TransportId("")
    with pytest.raises(PrDecodeError):
        TransportId("a,b")
    with pytest.raises(PrDecodeError):
        TransportId("a", 1 << 48)


names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=","),
    min_size=1,
    max_size=223,
)


@given(names, st.one_of(st.none(), st.integers(0, (1 << 48) - 1)))
def test_round_trip(name, isid):
    tid = TransportId(name, isid)
    enc = tid.encode()
    assert TransportId.decode(enc) == (tid, len(enc))


@given(st.binary(max_size=64))
def test_decode_never_raises_untyped(raw):
    try:
        TransportId.decode(raw)
    except PrDecodeError:
        pass
