"""The device state stream: golden bytes, round trips and every refusal."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.migration.errors import (
    BadMagic,
    SectionError,
    StreamError,
    StreamTrailingData,
    StreamTruncated,
    UnknownSection,
    UnsupportedVersion,
)
from prmigrate.migration.stream import (
    DeviceSnapshot,
    Section,
    decode_sections,
    decode_snapshot,
    decode_stream,
    encode_sections,
    encode_snapshot,
    encode_stream,
)
from prmigrate.scsi.constants import PrType

IDENTITY = {"inquiry_std": "00" * 36, "capacity_blocks": 8, "block_size": 512}
SNAP = DeviceSnapshot(
    "d0",
    {"name": "d0"},
    IDENTITY,
    DevicePrState({"iqn.g1": GuestPrState(0xABC, False, True, PrType.WRITE_EXCLUSIVE)}),
    {"iqn.g1": ((0x2A, 0x03),)},
)

# Golden: header, device, device/identity, device/pr, device/ua, end (count 4, CRC).
GOLDEN = bytes.fromhex(
    "50524d530001"  # "PRMS", format 1
    "01" "06" + b"device".hex() + "02" + b"d0".hex() + "0001" "00000018"
    + b'{"config":{"name":"d0"}}'.hex()
    + "01" "0f" + b"device/identity".hex() + "02" + b"d0".hex() + "0001" "0000007f"
    + b'{"block_size":512,"capacity_blocks":8,"inquiry_std":"'.hex() + b"0" .hex() * 72 + b'"}'.hex()
    + "01" "09" + b"device/pr".hex() + "02" + b"d0".hex() + "0001" "00000064"
    + b'{"generation":null,"guests":{"iqn.g1":{"aptpl":false,"holder":true,"key":2748,"rtype":1,"scope":0}}}'.hex()
    + "01" "09" + b"device/ua".hex() + "02" + b"d0".hex() + "0001" "0000001e"
    + b'{"guests":{"iqn.g1":[[42,3]]}}'.hex()
    + "ff" "00000004" "85138037"
)


def test_golden_bytes() -> None:
    assert encode_snapshot(SNAP) == GOLDEN
    assert decode_snapshot(GOLDEN) == SNAP


def test_no_pr_no_ua_sections() -> None:
    snap = DeviceSnapshot("d0", {"name": "d0"}, IDENTITY)
    raw = encode_snapshot(snap)
    assert [s.name for s in decode_sections(raw)] == ["device", "device/identity"]
    assert b"device/pr" not in raw and b"device/ua" not in raw
    golden = bytes.fromhex(
        "50524d530001"
        "0106" + b"device".hex() + "02" + b"d0".hex() + "000100000018" + b'{"config":{"name":"d0"}}'.hex()
        + "010f" + b"device/identity".hex() + "02" + b"d0".hex() + "00010000007f"
        + b'{"block_size":512,"capacity_blocks":8,"inquiry_std":"'.hex() + b"0".hex() * 72 + b'"}'.hex()
        + "ff00000002"
    )
    assert raw[:-4] == golden and raw[-4:] == struct.pack(">I", zlib.crc32(golden))
    assert decode_snapshot(raw) == snap


def test_empty_guests_are_not_sent() -> None:
    snap = DeviceSnapshot("d0", {}, IDENTITY, DevicePrState({"g": GuestPrState()}), {"g": ()})
    assert len(decode_sections(encode_snapshot(snap))) == 2


def test_two_devices() -> None:
    other = DeviceSnapshot("d1", {"name": "d1"}, IDENTITY)
    assert decode_stream(encode_stream([SNAP, other])) == (SNAP, other)
    with pytest.raises(SectionError):
        encode_stream([SNAP, SNAP])


@pytest.mark.parametrize("cut", range(len(GOLDEN)))
def test_every_truncation_is_typed(cut: int) -> None:
    with pytest.raises(StreamError):
        decode_stream(GOLDEN[:cut])


def test_truncation_error_kind() -> None:
    with pytest.raises(StreamTruncated):
        decode_stream(GOLDEN[:-1])
    with pytest.raises(StreamTruncated):
        decode_stream(GOLDEN[:3])


def test_trailing_garbage() -> None:
    with pytest.raises(StreamTrailingData):
        decode_stream(GOLDEN + b"\x00")


def test_bad_magic_and_versions() -> None:
    with pytest.raises(BadMagic):
        decode_stream(b"QEVM" + GOLDEN[4:])
    with pytest.raises(UnsupportedVersion):
        decode_stream(GOLDEN[:4] + b"\x00\x02" + GOLDEN[6:])
    newer = encode_sections([Section("device", "d0", 2, {"config": {}})])
    with pytest.raises(UnsupportedVersion):
        decode_stream(newer)


def test_unknown_section_refused() -> None:
    raw = encode_sections([Section("device", "d0", 1, {"config": {}})])
    hacked = raw.replace(b"\x06device", b"\x06devicx")
    with pytest.raises(UnknownSection):
        decode_sections(hacked)


def test_crc_and_count() -> None:
    flipped = bytearray(GOLDEN)
    flipped[40] ^= 0x01  # inside the device section's JSON
    with pytest.raises(StreamError):
        decode_stream(bytes(flipped))
    wrong_count = GOLDEN[:-8] + b"\x00\x00\x00\x03" + GOLDEN[-4:]
    with pytest.raises(SectionError):
        decode_stream(wrong_count)


def _framed(*sections: Section) -> bytes:
    return encode_sections(list(sections))


DEV = Section("device", "d0", 1, {"config": {"name": "d0"}})
IDS = Section("device/identity", "d0", 1, IDENTITY)


@pytest.mark.parametrize(
    "sections",
    [
        [IDS],  # no device section first
        [DEV],  # identity missing
        [DEV, Section("device/pr", "d0", 1, {"guests": {}, "generation": None}), IDS],  # out of order
        [DEV, IDS, IDS],  # repeated
        [DEV, Section("device/identity", "d1", 1, IDENTITY)],  # another instance
        [Section("device", "d0", 1, {"config": {"name": "dX"}}), IDS],  # config names another device
        [DEV, Section("device/identity", "d0", 1, {**IDENTITY, "extra": 1})],  # unknown field
        [DEV, Section("device/identity", "d0", 1, {**IDENTITY, "block_size": "512"})],  # wrong type
        [DEV, IDS, Section("device/pr", "d0", 1, {"guests": {"g": {"key": 1, "aptpl": False, "holder": True, "rtype": 0, "scope": 0}}, "generation": None})],
        [DEV, IDS, Section("device/pr", "d0", 1, {"guests": {"g": {"key": 1 << 64, "aptpl": False, "holder": False, "rtype": 0, "scope": 0}}, "generation": None})],
        [DEV, IDS, Section("device/pr", "d0", 1, {"guests": {"g": {"key": 1, "aptpl": 0, "holder": False, "rtype": 0, "scope": 0}}, "generation": None})],
        [DEV, IDS, Section("device/pr", "d0", 1, {"guests": {"g": {"key": 1, "aptpl": False, "holder": False, "rtype": 2, "scope": 0}}, "generation": None})],
        [DEV, IDS, Section("device/pr", "d0", 1, {"guests": {
            "a": {"key": 1, "aptpl": False, "holder": True, "rtype": 1, "scope": 0},
            "b": {"key": 2, "aptpl": False, "holder": True, "rtype": 1, "scope": 0}}, "generation": None})],  # two WE holders
        [DEV, IDS, Section("device/ua", "d0", 1, {"guests": {"g": [[42, 256]]}})],
        [DEV, IDS, Section("device/ua", "d0", 1, {"guests": {"g": []}})],
    ],
)
def test_section_errors(sections: list[Section]) -> None:
    with pytest.raises(SectionError):
        decode_stream(_framed(*sections))


def test_json_strictness() -> None:
    for body in (b"[]", b'{"a":1,"a":2}', b'{"x":NaN}', b"\xff", b"{" * 5000):
        raw = bytearray(encode_sections([Section("device", "d0", 1, {"config": {}})]))
        # splice a hand-made body into a well-formed frame
        head = bytes(raw[:6]) + b"\x01\x06device\x02d0" + struct.pack(">HI", 1, len(body)) + body
        tail = b"\xff" + struct.pack(">I", 1)
        frame = head + tail + struct.pack(">I", zlib.crc32(head + tail))
        with pytest.raises(SectionError):
            decode_sections(frame)


def test_all_registrants_holders_roundtrip() -> None:
    pr = DevicePrState({
        "a": GuestPrState(1, False, True, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS),
        "b": GuestPrState(2, True, True, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS),
    }, generation=7)
    pr.unverified = {"b"}
    snap = DeviceSnapshot("d0", {}, IDENTITY, pr)
    back = decode_snapshot(encode_snapshot(snap))
    assert back.pr.guests == pr.guests and back.pr.generation == 7 and back.pr.unverified == {"b"}


def test_snapshot_helpers_use_device_contracts() -> None:
    from prmigrate.device.identity import DeviceIdentity

    ident = DeviceIdentity(b"\x00" * 36, {0x80: b"\x00\x80\x00\x02ab"}, 100, 4096)
    snap = DeviceSnapshot("d0", {}, ident.to_dict())
    back = decode_snapshot(encode_snapshot(snap))
    assert back.device_identity() == ident
    with pytest.raises(SectionError):
        back.device_config()  # an empty config dict is not a valid DeviceConfig


guests = st.dictionaries(
    st.text("abcdefghijklmnopqrstuvwxyz.:-0123456789", min_size=1, max_size=20),
    st.builds(GuestPrState, key=st.integers(1, (1 << 64) - 1), aptpl=st.booleans(), scope=st.just(0)),
    max_size=5,
)


@given(guests, st.sampled_from([None, *[PrType(t) for t in (1, 3, 5, 6, 7, 8)]]), st.integers(0, 0xFFFFFFFF) | st.none(),
       st.dictionaries(st.sampled_from(["g1", "g2"]), st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=4).map(tuple)))
def test_roundtrip_property(gs: dict[str, GuestPrState], rtype: PrType | None, gen: int | None, ua: dict) -> None:
    gs = {k.lower(): v for k, v in gs.items()}
    if rtype is not None and gs:
        names = sorted(gs) if rtype.all_registrants else sorted(gs)[:1]
        for n in names:
            g = gs[n]
            gs[n] = GuestPrState(g.key, g.aptpl, True, rtype, 0)
    snap = DeviceSnapshot("dev", {"name": "dev"}, IDENTITY, DevicePrState(gs, gen if gs else None), ua)
    raw = encode_snapshot(snap)
    back = decode_snapshot(raw)
    assert back.pr.guests == snap.pr.guests and dict(back.ua) == ua
    assert encode_snapshot(back) == raw  # canonical


@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    for blob in (data, GOLDEN[:6] + data, GOLDEN[: len(GOLDEN) // 2] + data):
        try:
            decode_stream(blob)
        except StreamError:
            pass


def test_build_from_device_objects() -> None:
    from prmigrate.device.config import DeviceConfig
    from prmigrate.device.identity import DeviceIdentity
    from prmigrate.scsi.sense import Sense

    cfg = DeviceConfig("vm1", "iscsi://127.0.0.1:3260/iqn.2026-11.test:t/0", "iqn.2026-11.test:t")
    ident = DeviceIdentity(b"\x00" * 36, {}, 16, 512)
    pr = DevicePrState({"iqn.g": GuestPrState(5, False, True, PrType.EXCLUSIVE_ACCESS)})
    snap = DeviceSnapshot.build(cfg, ident, pr, {"IQN.G": [Sense.POWER_ON_RESET, (0x2A, 0x05)]})
    back = decode_snapshot(encode_snapshot(snap))
    assert back.device_config() == cfg and back.device_identity() == ident
    assert back.pr.guests == pr.guests and back.ua == {"iqn.g": ((0x29, 0x00), (0x2A, 0x05))}
