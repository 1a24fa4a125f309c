"""Golden byte vectors for the CDB decoders (SBC-4 5.x, SPC-5 6.x)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.scsi.cdb import (
    BlockCdb,
    CdbTooShort,
    CompareAndWriteCdb,
    InquiryCdb,
    ModeSelectCdb,
    ModeSenseCdb,
    ReadCapacity10Cdb,
    ReadDefectCdb,
    ReportLunsCdb,
    ReportOpcodesCdb,
    RequestSenseCdb,
    ServiceAction16Cdb,
    StartStopCdb,
    UnmapCdb,
    UnmapDescriptor,
    WriteAtomic16Cdb,
    decode_unmap_list,
)
from prmigrate.scsi.sense import CheckCondition, Sense

BLOCK_VECTORS = [
    # READ(6): 21-bit LBA, length 0 means 256 blocks
    ("08 1f ff ff 00 00", BlockCdb(0x08, 0, 0x1FFFFF, 256, 0)),
    ("0a 00 00 10 08 00", BlockCdb(0x0A, 0, 0x10, 8, 0)),
    # READ(10) with DPO|FUA, group 5, 2 blocks at 0x01020304
    ("28 18 01 02 03 04 05 00 02 00", BlockCdb(0x28, 0x18, 0x01020304, 2, 5)),
    ("2a 08 00 00 00 00 00 ff ff 00", BlockCdb(0x2A, 0x08, 0, 0xFFFF, 0)),
    # READ(12)
    ("a8 00 00 00 00 09 00 01 00 00 03 00", BlockCdb(0xA8, 0, 9, 0x10000, 3)),
    # READ(16): 64-bit LBA
    (
        "88 10 80 00 00 00 00 00 00 01 00 00 00 10 3f 00",
        BlockCdb(0x88, 0x10, 0x8000000000000001, 16, 0x3F),
    ),
    # WRITE SAME(16) UNMAP|NDOB
    ("93 09 00 00 00 00 00 00 00 20 00 00 00 08 00 00", BlockCdb(0x93, 0x09, 32, 8, 0)),
    # VERIFY(10) BYTCHK=01b
    ("2f 02 00 00 00 01 00 00 04 00", BlockCdb(0x2F, 0x02, 1, 4, 0)),
]


@pytest.mark.parametrize("hexcdb,expect", BLOCK_VECTORS)
def test_block_cdb_golden(hexcdb: str, expect: BlockCdb) -> None:
    assert BlockCdb.decode(bytes.fromhex(hexcdb)) == expect


@pytest.mark.parametrize("hexcdb,_", BLOCK_VECTORS)
def test_block_cdb_short_is_typed_error(hexcdb: str, _: BlockCdb) -> None:
    cdb = bytes.fromhex(hexcdb)
    for n in range(1, len(cdb)):
        with pytest.raises(CdbTooShort) as ei:
            BlockCdb.decode(cdb[:n])
        assert isinstance(ei.value, CheckCondition)
        assert ei.value.sense is Sense.INVALID_FIELD_IN_CDB


def test_block_cdb_empty_and_memoryview() -> None:
    with pytest.raises(CdbTooShort):
        BlockCdb.decode(b"")
    mv = memoryview(bytes.fromhex("28 00 00 00 00 07 00 00 01 00"))
    assert BlockCdb.decode(mv).lba == 7


def test_block_cdb_unknown_opcode() -> None:
    with pytest.raises(CheckCondition):
        BlockCdb.decode(bytes(10))  # TEST UNIT READY is no block command


def test_compare_and_write() -> None:
    c = CompareAndWriteCdb.decode(bytes.fromhex("89 08 00 00 00 00 00 00 01 00 00 00 00 02 00 00"))
    assert c == CompareAndWriteCdb(0x08, 256, 2)


def test_write_atomic16_golden() -> None:
    """SBC-4 5.48: WRPROTECT|DPO|FUA, LBA(8), ATOMIC BOUNDARY(2), TRANSFER LENGTH(2), GROUP, CONTROL."""
    raw = bytes.fromhex("9c 38 80 00 00 00 00 00 01 02 00 04 01 00 25 00")
    c = WriteAtomic16Cdb.decode(raw)
    assert c == WriteAtomic16Cdb(0x38, 0x8000000000000102, 4, 256, 0x25)
    assert c.encode() == raw
    assert WriteAtomic16Cdb.decode(memoryview(raw)) == c
    assert WriteAtomic16Cdb.decode(bytes.fromhex("9c 00 00000000 00000007 0000 0001 ff 00")).group == 0x3F
    for n in range(0, 16):
        with pytest.raises(CdbTooShort):
            WriteAtomic16Cdb.decode(raw[:n])


def test_inquiry() -> None:
    assert InquiryCdb.decode(bytes.fromhex("12 01 83 01 00 00")) == InquiryCdb(True, 0x83, 256, False)
    assert InquiryCdb.decode(bytes.fromhex("12 02 00 00 24 00")).cmddt


def test_mode_sense_6_and_10() -> None:
    assert ModeSenseCdb.decode(bytes.fromhex("1a 08 4a 00 ff 00")) == ModeSenseCdb(
        False, True, False, 1, 0x0A, 0, 255
    )
    assert ModeSenseCdb.decode(bytes.fromhex("5a 10 3f ff 00 00 00 10 00 00")) == ModeSenseCdb(
        True, False, True, 0, 0x3F, 0xFF, 0x1000
    )


def test_mode_select() -> None:
    assert ModeSelectCdb.decode(bytes.fromhex("15 10 00 00 18 00")) == ModeSelectCdb(False, True, False, 24)
    assert ModeSelectCdb.decode(bytes.fromhex("55 11 00 00 00 00 00 01 00 00")) == ModeSelectCdb(
        True, True, True, 256
    )


def test_service_action_in16() -> None:
    c = ServiceAction16Cdb.decode(bytes.fromhex("9e 12 00 00 00 00 00 00 00 05 00 00 00 18 00 00"))
    assert c == ServiceAction16Cdb(0x12, 5, 24)


def test_read_capacity10() -> None:
    assert ReadCapacity10Cdb.decode(bytes.fromhex("25 00 00 00 00 01 00 00 01 00")) == ReadCapacity10Cdb(1, True)


def test_unmap_cdb_and_list() -> None:
    assert UnmapCdb.decode(bytes.fromhex("42 01 00 00 00 00 02 00 18 00")) == UnmapCdb(True, 2, 24)
    data = bytes.fromhex("0016 0010 00000000" "0000000000000100 00000008 00000000")
    assert decode_unmap_list(data) == [UnmapDescriptor(256, 8)]
    assert decode_unmap_list(b"") == []
    with pytest.raises(CheckCondition) as ei:  # descriptor length beyond the list
        decode_unmap_list(bytes.fromhex("0016 0020 00000000") + bytes(16))
    assert ei.value.sense is Sense.PARAMETER_LIST_LENGTH_ERROR
    with pytest.raises(CheckCondition) as ei:  # not a multiple of 16
        decode_unmap_list(bytes.fromhex("000e 0008 00000000") + bytes(8))
    assert ei.value.sense is Sense.INVALID_FIELD_IN_PARAMETER_LIST


def test_report_luns_request_sense_rsoc_ssu_defect() -> None:
    assert ReportLunsCdb.decode(bytes.fromhex("a0 00 02 00 00 00 00 00 10 00 00 00")) == ReportLunsCdb(2, 4096)
    assert RequestSenseCdb.decode(bytes.fromhex("03 01 00 00 fc 00")) == RequestSenseCdb(True, 252)
    assert ReportOpcodesCdb.decode(bytes.fromhex("a3 0c 82 9e 00 10 00 00 02 00 00 00")) == ReportOpcodesCdb(
        True, 2, 0x9E, 0x10, 512
    )
    assert StartStopCdb.decode(bytes.fromhex("1b 01 00 00 32 00")) == StartStopCdb(True, 3, True, False)
    assert ReadDefectCdb.decode(bytes.fromhex("37 00 1d 00 00 00 00 00 04 00")) == ReadDefectCdb(
        False, True, True, 5, 4
    )
    assert ReadDefectCdb.decode(bytes.fromhex("b7 0d 00 00 00 00 00 00 00 08 00 00")).alloc == 8


@pytest.mark.parametrize(
    "decoder,full",
    [
        (CompareAndWriteCdb.decode, 16),
        (InquiryCdb.decode, 6),
        (ServiceAction16Cdb.decode, 16),
        (ReportLunsCdb.decode, 12),
        (ReportOpcodesCdb.decode, 12),
        (UnmapCdb.decode, 10),
    ],
)
def test_short_cdbs(decoder, full: int) -> None:
    with pytest.raises(CdbTooShort):
        decoder(bytes([0x89]) + bytes(full - 2))


@given(st.integers(0, 0xFF), st.integers(0, 0x07), st.booleans())
def test_supported_tmfs_round_trip(b0: int, b1: int, repd: bool) -> None:
    from prmigrate.scsi.cdb import SupportedTmfs

    t = SupportedTmfs.decode(bytes((b0, b1)))
    data = t.encode(repd)
    assert data[:2] == bytes((b0, b1)) and data[3] == (0x0C if repd else 0)
    assert len(data) == (16 if repd else 4)
    assert SupportedTmfs.decode(data) == t
    assert t.target_reset == bool(b0 & 0x02) and t.lu_reset == bool(b0 & 0x08)


def test_report_tmfs_cdb() -> None:
    from prmigrate.scsi.cdb import CdbTooShort, ReportTmfsCdb

    c = ReportTmfsCdb.encode(16, repd=True)
    assert c == bytes.fromhex("a30d80000000000000100000")
    assert ReportTmfsCdb.decode(c) == ReportTmfsCdb(True, 16)
    with pytest.raises(CdbTooShort):
        ReportTmfsCdb.decode(c[:11])


def test_report_supported_opcodes_one_command_round_trip() -> None:
    """SPC-5 6.35: reporting option 010b asks about one opcode + service action."""
    from prmigrate.scsi.cdb import (
        CommandSupport,
        ReportOpcodesCdb,
        one_command_support,
        supports_service_action,
    )

    cdb = supports_service_action(0x5F, 0x07, 64)
    assert cdb == bytes.fromhex("a30c025f0007000000400000")
    assert ReportOpcodesCdb.decode(cdb) == ReportOpcodesCdb(False, 2, 0x5F, 7, 64)
    assert one_command_support(b"\x00\x03\x00\x0a") is CommandSupport.SUPPORTED
    assert one_command_support(b"\x00\x83") is CommandSupport.SUPPORTED  # CTDP set
    assert one_command_support(b"\x00\x01\x00\x00") is CommandSupport.NOT_SUPPORTED
    assert one_command_support(b"\x00\x05") is CommandSupport.SUPPORTED_VENDOR
    assert one_command_support(b"\x00\x02") == 2  # reserved code: passed through as a number
    assert one_command_support(b"\x00") is CommandSupport.NOT_AVAILABLE  # too short to tell
