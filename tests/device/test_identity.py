import pytest

from prmigrate.device.identity import (
    SHARED_NEXUS,
    DeviceIdentity,
    IdentityError,
    IdentityMode,
    backend_port,
    derive_isid,
    isid_format,
    nexus_transport_ids,
    no_logical_unit,
    state_key,
)

HOST = "iqn.2026-01.org.example:host1"


def test_isid_is_stable_and_golden():
    a = derive_isid("vm1", "iqn.1993-08.org.debian:01:guest")
    assert a == derive_isid(
        "vm1", "IQN.1993-08.ORG.DEBIAN:01:GUEST"
    )  # names compare case-insensitively
    # Pinned: a change here re-keys every deployed guest's backend nexus.
    assert a == 0x8059D460B883
    assert derive_isid("vm1", None) == 0x80A11CEBA01F


def test_isid_random_format():
    for dev in ("vm1", "vm2", "ü"):
        for guest in ("iqn.a:g1", "iqn.a:g2", None):
            isid = derive_isid(dev, guest)
            assert 0 <= isid <= 0xFFFFFFFFFFFF
            assert isid_format(isid) == 0b10  # RFC 7143 10.12.5 Random
            assert (isid >> 40) & 0x3F == 0  # A field reserved


def test_isid_distinct():
    isids = {
        derive_isid(d, g)
        for d in ("vm1", "vm2", "vm10")
        for g in ("iqn.a:g1", "iqn.a:g2", "iqn.a:g11", None)
    }
    assert len(isids) == 12
    assert derive_isid("vm1", None) != derive_isid("vm1", "")


def test_empty_device_refused():
    with pytest.raises(IdentityError):
        derive_isid("", "iqn.a:g")


def test_modes():
    g1 = backend_port("guest", HOST.upper(), "vm1", "iqn.a:g1")
    g2 = backend_port(IdentityMode.GUEST, HOST, "vm1", "iqn.a:g2")
    assert g1.initiator == HOST and g1.isid != g2.isid
    h1 = backend_port("host", HOST, "vm1", "iqn.a:g1")
    h2 = backend_port("host", HOST, "vm1", "iqn.a:g2")
    assert h1 == h2
    assert str(g1.transport_id) == f"{HOST},i,0x{g1.isid:012x}"
    assert state_key("guest", "IQN.A:G1") == "iqn.a:g1"
    assert state_key("host", "iqn.a:g1") == SHARED_NEXUS
    ids = nexus_transport_ids("guest", HOST, "vm1", {"iqn.a:g1", "iqn.a:g2"})
    assert set(ids) == {"iqn.a:g1", "iqn.a:g2"}
    assert nexus_transport_ids("host", HOST, "vm1", {"iqn.a:g1", "iqn.a:g2"}) == {
        SHARED_NEXUS: h1.transport_id
    }


def _inquiry(vendor=b"LIO-ORG ", product=b"disk0           ", rev=b"4.0 "):
    return bytes([0, 0, 6, 2, 31, 0, 0, 0]) + vendor + product + rev


VPD80 = bytes([0, 0x80, 0, 8]) + b"SER12345"
NAA = bytes.fromhex("6001405abcdef0123456789abcdef012")
VPD83 = (
    bytes([0, 0x83, 0, 4 + len(NAA) + 4 + 8])
    + bytes([0x01, 0x03, 0, len(NAA)])
    + NAA
    + bytes([0x02, 0x01, 0, 8])
    + b"LIO-ORG "
)
RC16 = (2047).to_bytes(8, "big") + (512).to_bytes(4, "big") + bytes(20)


def test_capture_and_fields():
    ident = DeviceIdentity.capture(_inquiry(), {0x80: VPD80, 0x83: VPD83}, RC16)
    assert ident.vendor == "LIO-ORG" and ident.product == "disk0" and ident.revision == "4.0"
    assert ident.serial == "SER12345"
    assert ident.naa_id == NAA.hex()
    assert (
        ident.capacity_blocks == 2048
        and ident.block_size == 512
        and ident.capacity_bytes == 1 << 20
    )
    assert [d[1] for d in ident.designators()] == [3, 1]


def test_capture_read_capacity10_and_missing_pages():
    rc10 = (99).to_bytes(4, "big") + (4096).to_bytes(4, "big")
    ident = DeviceIdentity.capture(_inquiry(), {}, rc10)
    assert ident.capacity_blocks == 100 and ident.block_size == 4096
    assert ident.serial is None and ident.naa_id is None and ident.designators() == []
    with pytest.raises(IdentityError):
        DeviceIdentity.capture(_inquiry(), {}, b"\x00" * 5)
    with pytest.raises(IdentityError):
        DeviceIdentity.capture(b"\x00" * 35)


def test_truncated_vpd83_does_not_raise():
    page = VPD83[:10]
    ident = DeviceIdentity.capture(_inquiry(), {0x83: page, 0x80: b"\x00\x80"})
    assert ident.naa_id is None and ident.serial is None


def test_round_trip_and_same_lun():
    ident = DeviceIdentity.capture(
        _inquiry(), {0x80: VPD80, 0x83: VPD83, 0xB0: b"\x00\xb0\x00\x00"}, RC16
    )
    d = ident.to_dict()
    back = DeviceIdentity.from_dict(d)
    assert back == ident and back.to_dict() == d
    assert back.inquiry_std == ident.inquiry_std and back.vpd[0x80] == VPD80
    other = DeviceIdentity.capture(
        _inquiry(), {0x80: bytes([0, 0x80, 0, 3]) + b"XYZ", 0x83: VPD83}, RC16
    )
    assert not ident.same_lun(other)
    assert any("serial" in x for x in ident.differences(other))
    assert ident.same_lun(back)


@pytest.mark.parametrize(
    "d",
    [
        "x",
        {},
        {"inquiry_std": "zz"},
        {"inquiry_std": "00" * 36, "vpd": []},
        {"inquiry_std": "00" * 36, "vpd": {"g0": "00"}},
        {"inquiry_std": "00" * 36, "capacity_blocks": "many"},
        {"inquiry_std": 5},
    ],
)
def test_from_dict_rejects(d):
    with pytest.raises(IdentityError):
        DeviceIdentity.from_dict(d)  # type: ignore[arg-type]


def test_no_logical_unit_from_the_backend_answers() -> None:
    """SPC-5 6.7.2: peripheral qualifier 000b and a READ CAPACITY answer is
    a LU; qualifier 011b (no LU at this LUN) or no capacity is none."""
    rc = bytes(8) + (512).to_bytes(4, "big")
    assert no_logical_unit(bytes([0x00]) + bytes(35), rc) is None
    assert no_logical_unit(bytes([0x7F]) + bytes(35), None) == \
        "INQUIRY peripheral qualifier 3, READ CAPACITY failed"
    assert no_logical_unit(bytes([0x60]) + bytes(35), rc) == "INQUIRY peripheral qualifier 3"
    assert no_logical_unit(b"", None) == "INQUIRY peripheral qualifier ?, READ CAPACITY failed"
    assert no_logical_unit(bytes(36), None) == "INQUIRY peripheral qualifier 0, READ CAPACITY failed"
