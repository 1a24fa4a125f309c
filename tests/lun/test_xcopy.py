"""EXTENDED COPY (83h, LID1) and RECEIVE COPY RESULTS (84h) on the logical
unit: parameter list checks and their sense, copies within one LU (overlap
included) and between LUs of a node, COPY STATUS / OPERATING PARAMETERS,
reservations, write protection, RSOC entries, random parameter lists."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prmigrate.lun import xcopy
from prmigrate.lun.conflicts import Access, classify
from prmigrate.lun.pr import ReservationTable
from prmigrate.lun.types import Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrType, SenseKey, Status
from prmigrate.scsi.sense import Sense, decode_sense

from .test_unit import BLOCKS, BS, A, B, StubPR, _set_control, check, good, rw10


# ------------------------------------------------------------- builders
def xcopy_cdb(length: int, sa: int = 0) -> bytes:
    return struct.pack(">BB8xIxB", 0x83, sa, length, 0)


def rcr_cdb(sa: int, list_id: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBB7xIxB", 0x84, sa, list_id, alloc, 0)


def header(tdll: int, sdll: int, list_id: int = 1, usage: int = 0, flags: int = 0, inline: int = 0) -> bytes:
    return struct.pack(">BBH4xII", list_id, flags | (usage << 3), tdll, sdll, inline)


def cscd(naa: bytes, *, dtype: int = 0, block_length: int = BS, code: int = 0xE4, code_set: int = 1,
         assoc_type: int = 0x03, b1: int = 0) -> bytes:
    d = bytearray(32)
    d[0] = code
    d[1] = b1 | dtype
    d[4], d[5], d[7] = code_set, assoc_type, len(naa)
    d[8 : 8 + len(naa)] = naa
    if dtype == 0:
        d[29:32] = block_length.to_bytes(3, "big")
    return bytes(d)


def b2b(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, *, dc: bool = False, dlen: int = 0x18,
        b1: int = 0) -> bytes:
    return struct.pack(">BBHHHxxHQQ", 0x02, b1 | (0x02 if dc else 0), dlen, src, dst, blocks, src_lba, dst_lba)


def plist(cscds: list[bytes], segs: list[bytes], **kw: int) -> bytes:
    t, s = b"".join(cscds), b"".join(segs)
    return header(len(t), len(s), **kw) + t + s


def run(u: LogicalUnit, data: bytes, nexus=A, length: int | None = None) -> Result:
    return u.execute(nexus, xcopy_cdb(len(data) if length is None else length), data)


def fill(u: LogicalUnit, lba: int, n: int, byte: int) -> None:
    good(u.execute(A, rw10(0x2A, lba, n), bytes([byte]) * (n * u.block_size)))


def pattern(u: LogicalUnit, lba: int, n: int) -> bytes:
    """Write a distinct byte per block (block i of the run holds i + 1)."""
    data = b"".join(bytes([(i + 1) & 0xFF]) * u.block_size for i in range(n))
    good(u.execute(A, rw10(0x2A, lba, n), data))
    return data


def read(u: LogicalUnit, lba: int, n: int) -> bytes:
    return good(u.execute(A, rw10(0x28, lba, n), b""))


def sks(r: Result) -> tuple[int, int]:
    """(SKSV/C-D byte, field pointer) of fixed-format sense."""
    return r.sense[15], struct.unpack_from(">H", r.sense, 16)[0]


def copy_status(u: LogicalUnit, list_id: int = 1, nexus=A) -> Result:
    return u.execute(nexus, rcr_cdb(0x00, list_id), b"")


# ------------------------------------------------------------- codec
def test_parameter_list_golden_vector() -> None:
    naa = bytes(range(0x60, 0x70))
    raw = (bytes.fromhex("07 22 0020 00000000 0000001c 00000000")  # list 7, STR, HOLD, PRIORITY 2
           + bytes.fromhex("e4 00 0000 01 03 00 10") + naa + bytes(4) + bytes.fromhex("00 000200")
           + bytes.fromhex("02 02 0018 0000 0000 0000 0010 0000000000000005 0000000000000100"))
    c = xcopy.CopyList.decode(raw, len(raw))
    assert c is not None
    assert (c.list_id, c.usage, c.priority, c.striped) == (7, xcopy.ListIdUsage.HOLD, 2, True)
    assert c.cscds == (xcopy.Cscd(16, 0, 1, 0, 3, naa, 512),)
    assert c.segments == (xcopy.Segment(48, True, 0, 0, 16, 5, 0x100),)
    assert xcopy.CopyList.decode(raw, 0) is None


def test_operating_parameters_golden() -> None:
    d = xcopy.operating_parameters(512)
    assert d == bytes.fromhex(
        "0000002a 01 000000 0008 0010 000002c0 00400000 00000000 00000000 00000000"
        " 0000 0001 01 09 09 09 000000 02 02e4"
    )


def test_copy_status_units() -> None:
    r = xcopy.CopyRecord(xcopy.CopyManagerStatus.COMPLETED, 3, 5 << 32)
    d = xcopy.copy_status(r)
    assert d[:8] == bytes.fromhex("00000008 01 0003 01")  # KiB: bytes do not fit 32 bits
    assert struct.unpack_from(">I", d, 8)[0] == (5 << 32) // 1024


# ------------------------------------------------------------- copies
def test_copy_within_the_lu(lu: LogicalUnit) -> None:
    fill(lu, 0, 16, 0x41)
    fill(lu, 100, 16, 0x00)
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 16, 0, 100)])))
    assert read(lu, 100, 16) == b"A" * 16 * BS
    d = good(copy_status(lu))
    assert d == struct.pack(">IBHBI", 8, 0x01, 1, 0x00, 16 * BS)  # completed, 1 segment, bytes
    check(copy_status(lu), Sense.INVALID_FIELD_IN_CDB)  # returned once, then discarded


def test_several_segments_and_cscds(lu: LogicalUnit) -> None:
    fill(lu, 0, 4, 0x31)
    fill(lu, 10, 4, 0x32)
    segs = [b2b(0, 1, 4, 0, 200), b2b(1, 0, 4, 10, 300, dc=True)]
    good(run(lu, plist([cscd(lu.naa), cscd(lu.naa)], segs, list_id=9)))
    assert read(lu, 200, 4) == b"1" * 4 * BS and read(lu, 300, 4) == b"2" * 4 * BS
    assert good(copy_status(lu, 9)) == struct.pack(">IBHBI", 8, 0x01, 2, 0x00, 8 * BS)


@pytest.mark.parametrize(("src", "dst"), [(10, 15), (15, 10), (10, 10), (10, 29)])
def test_overlapping_ranges_copy_as_memmove(lu: LogicalUnit, src: int, dst: int) -> None:
    """Source and destination overlapping on one LU: the destination ends up
    holding what the source held before the command (memmove)."""
    before = pattern(lu, src, 20)
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 20, src, dst)])))
    assert read(lu, dst, 20) == before


def test_overlap_larger_than_a_chunk(tmp_path: Path) -> None:
    u = LogicalUnit(tmp_path / "big", 8 << 20, name="big", pr_factory=StubPR, block_size=4096)
    try:
        n = (xcopy.COPY_CHUNK // 4096) * 3 // 2  # 1.5 chunks
        data = pattern(u, 0, n)
        good(run(u, plist([cscd(u.naa, block_length=4096)], [b2b(0, 0, n, 0, 7)])))
        assert read(u, 7, n) == data
        data = read(u, 7, n)
        good(run(u, plist([cscd(u.naa, block_length=4096)], [b2b(0, 0, n, 7, 2)])))
        assert read(u, 2, n) == data
    finally:
        u.close()


def test_zero_blocks_and_empty_lists(lu: LogicalUnit) -> None:
    good(run(lu, b"", length=0))  # PARAMETER LIST LENGTH 0: nothing to do
    good(run(lu, header(0, 0)))  # no descriptors at all
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 0, 0, 1)])))
    assert good(copy_status(lu)) == struct.pack(">IBHBI", 8, 0x01, 1, 0x00, 0)


def test_list_id_usage_none_keeps_no_status(lu: LogicalUnit) -> None:
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)], list_id=0, usage=3)))
    check(copy_status(lu, 0), Sense.INVALID_FIELD_IN_CDB)
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)], list_id=4, usage=2)))  # 10b: status kept
    good(copy_status(lu, 4))


def test_copy_status_per_nexus_and_dropped_on_loss_and_reset(lu: LogicalUnit) -> None:
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)])))
    check(copy_status(lu, nexus=B), Sense.INVALID_FIELD_IN_CDB)  # B never sent list 1
    short = lu.execute(A, rcr_cdb(0x00, 1, alloc=4), b"")
    assert good(short) == bytes.fromhex("00000008")  # truncated: the status stays
    lu.nexus_lost(B)
    good(copy_status(lu))
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)])))
    lu.nexus_lost(A)
    lu.attach(A)
    check(copy_status(lu), Sense.INVALID_FIELD_IN_CDB)
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)])))
    lu.reset(B)
    lu.ua.clear(A)
    check(copy_status(lu), Sense.INVALID_FIELD_IN_CDB)


# ------------------------------------------------------------- header / lengths
def test_parameter_list_length_errors(lu: LogicalUnit) -> None:
    full = plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)])
    for n in (1, 15, 16 + 31, len(full) - 1):  # short header, CSCD or segment cut off
        check(run(lu, full[:n]), Sense.PARAMETER_LIST_LENGTH_ERROR)
    check(run(lu, full[:20], length=len(full)), Sense.PARAMETER_LIST_LENGTH_ERROR)  # Data-Out short of the CDB
    over = xcopy.MAX_DESCRIPTOR_LIST_LENGTH + 4
    check(run(lu, header(0, over) + bytes(over)), Sense.PARAMETER_LIST_LENGTH_ERROR)


def test_parameter_list_longer_than_the_lists_is_accepted(lu: LogicalUnit) -> None:
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)]) + bytes(8)))


@pytest.mark.parametrize(
    ("data_fn", "field"),
    [
        (lambda n: plist([cscd(n)], [], flags=0x40), 1),  # reserved bit 6
        (lambda n: plist([cscd(n)], [], usage=1), 1),  # LIST ID USAGE 01b
        (lambda n: plist([cscd(n)], [], usage=3, list_id=5), 0),  # no list id, but one given
        (lambda n: header(0, 0)[:4] + b"\x00\x01\x00\x00" + header(0, 0)[8:], 4),  # reserved bytes 4-7
        (lambda n: header(0, 0, inline=4) + bytes(4), 12),  # inline data: none supported
        (lambda n: header(40, 0) + cscd(n) + bytes(8), 2),  # CSCD list ends inside a descriptor
        (lambda n: plist([cscd(n + bytes(5))], []), 16 + 7),  # designator longer than 20 bytes
        (lambda n: plist([cscd(n)], [b2b(0, 0, 1, 0, 1, dlen=0x14)]), 48 + 2),  # DESCRIPTOR LENGTH
        (lambda n: plist([cscd(n)], [b2b(0, 0, 1, 0, 1, b1=0x04)]), 48 + 1),  # reserved segment bits
        (lambda n: plist([cscd(n)], [b2b(0, 0, 1, 0, 1)[:8] + b"\x01" + b2b(0, 0, 1, 0, 1)[9:]]), 48 + 8),
        (lambda n: header(32, 2) + cscd(n) + b"\x02\x00", 8),  # segment list ends inside a header
        (lambda n: header(32, 20) + cscd(n) + b2b(0, 0, 1, 0, 1)[:20], 8),  # ... inside a descriptor
    ],
)
def test_invalid_fields_in_parameter_list(lu: LogicalUnit, data_fn, field: int) -> None:
    r = run(lu, data_fn(lu.naa))
    check(r, Sense.INVALID_FIELD_IN_PARAMETER_LIST)
    flags, pointer = sks(r)
    assert flags & 0xC0 == 0x80 and pointer == field  # SKSV, C/D = 0: a parameter list byte


def test_too_many_descriptors(lu: LogicalUnit) -> None:
    n = xcopy.MAX_CSCD_DESCRIPTORS
    good(run(lu, plist([cscd(lu.naa)] * n, [b2b(0, n - 1, 1, 0, 1)])))
    check(run(lu, plist([cscd(lu.naa)] * (n + 1), [b2b(0, 0, 1, 0, 1)])), Sense.TOO_MANY_TARGET_DESCRIPTORS)
    s = xcopy.MAX_SEGMENT_DESCRIPTORS
    good(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)] * s)))
    check(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1)] * (s + 1))), Sense.TOO_MANY_SEGMENT_DESCRIPTORS)


def test_unsupported_descriptor_types(lu: LogicalUnit) -> None:
    r = run(lu, plist([cscd(lu.naa), cscd(lu.naa, code=0xE0)], [b2b(0, 0, 1, 0, 1)]))
    check(r, Sense.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
    assert sks(r) == (0x80, 48)
    stream = struct.pack(">BBHHH12x", 0x03, 0, 0x10, 0, 0)
    r = run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 1), stream]))
    check(r, Sense.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)
    assert sks(r) == (0x80, 48 + 28)


def test_service_action_lid4_is_invalid(lu: LogicalUnit) -> None:
    r = lu.execute(A, xcopy_cdb(0, sa=0x01), b"")
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert r.sense[15:18] == bytes((0xCC, 0, 1))  # byte 1, bit 4


# ------------------------------------------------------------- copy targets
def test_lu_id_type_and_nul_are_ignored(lu: LogicalUnit) -> None:
    fill(lu, 0, 1, 0x5A)
    for b1 in (0x80, 0xC0, 0x20):  # LU ID TYPE 10b, 11b; NUL
        good(run(lu, plist([cscd(lu.naa, b1=b1)], [b2b(0, 0, 1, 0, 9)])))
    assert read(lu, 9, 1) == b"Z" * BS


def test_unknown_designator_is_not_reachable(lu: LogicalUnit) -> None:
    fill(lu, 9, 1, 0x11)
    for d in (cscd(bytes(16)), cscd(lu.naa, assoc_type=0x13), cscd(lu.naa, code_set=2), cscd(lu.naa[:8])):
        r = run(lu, plist([d], [b2b(0, 0, 1, 0, 9)]))
        check(r, Sense.COPY_TARGET_DEVICE_NOT_REACHABLE)
        assert decode_sense(r.sense).key == SenseKey.COPY_ABORTED
        assert sks(r) == (0x80, 16 + 4)
    assert read(lu, 9, 1) == b"\x11" * BS


def test_cscd_index_beyond_the_list(lu: LogicalUnit) -> None:
    r = run(lu, plist([cscd(lu.naa)], [b2b(0, 1, 1, 0, 1)]))
    check(r, Sense.UNREACHABLE_COPY_TARGET)
    assert sks(r) == (0x80, 48 + 6)


def test_wrong_device_type_or_block_length(lu: LogicalUnit) -> None:
    r = run(lu, plist([cscd(lu.naa, dtype=1)], [b2b(0, 0, 1, 0, 1)]))
    check(r, Sense.INCORRECT_COPY_TARGET_DEVICE_TYPE)
    assert sks(r) == (0x80, 17)
    r = run(lu, plist([cscd(lu.naa, block_length=4096)], [b2b(0, 0, 1, 0, 1)]))
    check(r, Sense.INCORRECT_COPY_TARGET_DEVICE_TYPE)
    assert sks(r) == (0x80, 16 + 29)


@pytest.mark.parametrize(("src_lba", "dst_lba", "field"), [
    (BLOCKS - 1, 0, 48 + 12), (0, BLOCKS - 1, 48 + 20), (1 << 63, 0, 48 + 12),
])
def test_range_beyond_the_lu_aborts_the_copy(lu: LogicalUnit, src_lba: int, dst_lba: int, field: int) -> None:
    """COPY ABORTED, no additional sense, segment pointer at the LBA field;
    checked for every segment before the first is copied."""
    fill(lu, 50, 2, 0x77)
    fill(lu, 0, 2, 0x00)
    r = run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 2, 50, 0), b2b(0, 0, 2, src_lba, dst_lba)]))
    check(r, Sense.COPY_ABORTED)
    assert sks(r) == (0x80, field + 28)
    assert read(lu, 0, 2) == bytes(2 * BS)  # the first segment was not copied either
    assert good(copy_status(lu)) == struct.pack(">IBHBI", 8, 0x02, 0, 0x00, 0)  # completed with errors


def test_segment_longer_than_the_maximum(tmp_path: Path) -> None:
    u = LogicalUnit(tmp_path / "4k", 300 << 20, name="4k", pr_factory=StubPR, block_size=4096)
    try:
        limit = xcopy.MAX_SEGMENT_BYTES // 4096
        good(run(u, plist([cscd(u.naa, block_length=4096)], [b2b(0, 0, 1, 0, limit)])))
        r = run(u, plist([cscd(u.naa, block_length=4096)], [b2b(0, 0, limit + 1, 0, limit + 1)]))
        check(r, Sense.INVALID_FIELD_IN_PARAMETER_LIST)
        assert sks(r) == (0x80, 48 + 10)
    finally:
        u.close()


def test_write_protected_destination(lu: LogicalUnit) -> None:
    fill(lu, 0, 1, 0x61)
    fill(lu, 5, 1, 0x62)
    good(_set_control(lu, B, swp=True))
    lu.ua.pop(A)
    check(run(lu, plist([cscd(lu.naa)], [b2b(0, 0, 1, 0, 5)])), Sense.WRITE_PROTECTED)
    good(_set_control(lu, B, swp=False))
    lu.ua.pop(A)
    assert read(lu, 5, 1) == b"b" * BS


# ------------------------------------------------------------- between LUs
@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[LogicalUnit, LogicalUnit]]:
    one = LogicalUnit(tmp_path / "one", BLOCKS * BS, lun=0, name="node/0", pr_factory=StubPR)
    two = LogicalUnit(tmp_path / "two", BLOCKS * BS, lun=1, name="node/1", pr_factory=StubPR)
    for u in (one, two):
        u.attach(A)
        u.attach(B)
    yield one, two
    one.close()
    two.close()


def test_copy_between_lus_needs_peers(pair: tuple[LogicalUnit, LogicalUnit]) -> None:
    one, two = pair
    fill(one, 0, 8, 0x4F)
    data = plist([cscd(one.naa), cscd(two.naa)], [b2b(0, 1, 8, 0, 16)])
    check(run(one, data), Sense.COPY_TARGET_DEVICE_NOT_REACHABLE)  # by default only itself
    one.copy_peers = two.copy_peers = lambda: (one, two)
    good(run(one, data))
    assert read(two, 16, 8) == b"O" * 8 * BS
    fill(two, 100, 1, 0x54)
    good(run(one, plist([cscd(two.naa), cscd(one.naa)], [b2b(0, 1, 1, 100, 100)])))  # two -> one, sent to one
    assert read(one, 100, 1) == b"T" * BS


def test_peer_reservation_and_write_protection(pair: tuple[LogicalUnit, LogicalUnit]) -> None:
    one, two = pair
    one.copy_peers = two.copy_peers = lambda: (one, two)
    fill(two, 16, 1, 0x00)
    data = plist([cscd(one.naa), cscd(two.naa)], [b2b(0, 1, 1, 0, 16)])
    two.pr.conflict = True
    assert run(one, data).status == Status.RESERVATION_CONFLICT
    back = plist([cscd(two.naa), cscd(one.naa)], [b2b(0, 1, 1, 16, 0)])
    assert run(one, back).status == Status.RESERVATION_CONFLICT  # reading the peer conflicts too
    two.pr.conflict = False
    good(_set_control(two, B, swp=True))
    two.ua.pop(A)
    check(run(one, data), Sense.WRITE_PROTECTED)
    good(run(one, back))  # a write-protected source may be read


# ------------------------------------------------------------- RECEIVE COPY RESULTS
def test_operating_parameters_command(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, rcr_cdb(0x03), b""))
    assert d == xcopy.operating_parameters(BS)
    assert good(lu.execute(A, rcr_cdb(0x03, alloc=10), b"")) == d[:10]


@pytest.mark.parametrize("sa", [0x01, 0x02, 0x04, 0x05, 0x1F])
def test_unsupported_receive_copy_results_actions(lu: LogicalUnit, sa: int) -> None:
    r = lu.execute(A, rcr_cdb(sa), b"")
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert r.sense[15:18] == bytes((0xCC, 0, 1))


def test_copy_status_unknown_list(lu: LogicalUnit) -> None:
    r = copy_status(lu, 3)
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert r.sense[15:18] == bytes((0xC0, 0, 2))


# ------------------------------------------------------------- reservations, RSOC
def test_conflict_classes() -> None:
    assert classify(xcopy_cdb(0)) is Access.WRITE
    assert classify(rcr_cdb(0x03)) is Access.READ


def test_reservations(tmp_path: Path) -> None:
    """Under WE a non-holder's EXTENDED COPY conflicts, its RECEIVE COPY
    RESULTS does not; under EA both conflict; the holder copies."""
    u = LogicalUnit(tmp_path / "img2", BLOCKS * BS, name="lu2", state_dir=tmp_path, pr_factory=ReservationTable)
    try:
        u.attach(A)
        u.attach(B)
        data = plist([cscd(u.naa)], [b2b(0, 0, 1, 0, 1)])
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x00, 0, 24, 0), struct.pack(">QQ8x", 0, 0xAB)))
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x01, PrType.WRITE_EXCLUSIVE, 24, 0),
                       struct.pack(">QQ8x", 0xAB, 0)))
        assert run(u, data, nexus=B).status == Status.RESERVATION_CONFLICT
        good(u.execute(B, rcr_cdb(0x03), b""))
        good(run(u, data))
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x02, PrType.WRITE_EXCLUSIVE, 24, 0),
                       struct.pack(">QQ8x", 0xAB, 0)))  # RELEASE
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x01, PrType.EXCLUSIVE_ACCESS, 24, 0),
                       struct.pack(">QQ8x", 0xAB, 0)))
        assert u.execute(B, rcr_cdb(0x03), b"").status == Status.RESERVATION_CONFLICT
        assert run(u, data, nexus=B).status == Status.RESERVATION_CONFLICT
    finally:
        u.close()


def rsoc_one(u: LogicalUnit, op: int, sa: int) -> bytes:
    return good(u.execute(A, struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, op, sa, 512, 0, 0), b""))


def test_report_supported_opcodes(lu: LogicalUnit) -> None:
    expect = {
        (0x83, 0x00): bytes((0x83, 0x00, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
        (0x84, 0x00): bytes((0x84, 0x00, 0xFF, *(0,) * 7, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
        (0x84, 0x03): bytes((0x84, 0x03, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    }
    for (op, sa), usage in expect.items():
        d = rsoc_one(lu, op, sa)
        assert d[1] & 0x07 == 0x03
        assert d[4 : 4 + struct.unpack_from(">H", d, 2)[0]] == usage
    for op, sa in ((0x83, 0x01), (0x84, 0x01), (0x84, 0x04)):
        assert rsoc_one(lu, op, sa)[1] & 0x07 == 0x01  # not supported
    all_ = good(lu.execute(A, struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0, 0, 0, 8192, 0, 0), b""))
    listed = {(all_[off], struct.unpack_from(">H", all_, off + 2)[0]) for off in range(4, len(all_), 8)}
    assert {(0x83, 0), (0x84, 0), (0x84, 3)} <= listed


# ------------------------------------------------------------- fuzzing
_u16 = st.integers(0, 0xFFFF)


@st.composite
def parameter_lists(draw: st.DrawFn) -> bytes:
    """Mostly well-formed lists with random damage: real and bogus
    descriptors, random counts, lengths and LBAs, then random byte flips.
    A designator of 16 zero bytes becomes the LU's own in the test."""
    cscds = [
        cscd(draw(st.sampled_from([bytes(16), bytes(range(16)), b"short", bytes(24)])),
             dtype=draw(st.sampled_from([0, 0, 1])), code=draw(st.sampled_from([0xE4, 0xE4, 0xE0, 0xEA])),
             b1=draw(st.integers(0, 0xE0)) & 0xE0)
        for _ in range(draw(st.integers(0, 3)))
    ]
    segs = [
        b2b(draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 64)),
            draw(st.sampled_from([0, 1, BLOCKS - 1, 2**64 - 1])), draw(st.sampled_from([0, 9, BLOCKS - 2])),
            dc=draw(st.booleans()))
        for _ in range(draw(st.integers(0, 3)))
    ]
    data = bytearray(plist(cscds, segs, list_id=draw(st.integers(0, 255)), usage=draw(st.integers(0, 3))))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=parameter_lists(), naa_real=st.booleans(), cut=st.integers(0, 40), sa=st.sampled_from([0, 0, 1]))
def test_fuzz_parameter_lists(lu: LogicalUnit, data: bytes, naa_real: bool, cut: int, sa: int) -> None:
    if naa_real:
        data = data.replace(b"\x00" * 16, lu.naa, 1)
    length = max(0, len(data) - cut) if cut < 20 else len(data) + cut
    r = lu.execute(A, xcopy_cdb(length, sa), data)
    assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
    if r.status == Status.CHECK_CONDITION:
        d = decode_sense(r.sense)
        assert d.key in (SenseKey.ILLEGAL_REQUEST, SenseKey.COPY_ABORTED), d.describe()
    for action in (0x00, 0x03, 0x04):
        assert lu.execute(A, rcr_cdb(action, data[0] if data else 0), b"").status in (
            Status.GOOD, Status.CHECK_CONDITION)


# ------------------------------------------------------------- Third-party Copy VPD page
def test_third_party_copy_vpd_golden(lu: LogicalUnit) -> None:
    """SPC-4 7.8.17, required with 3PC = 1: Supported Commands, Parameter
    Data, Supported Descriptors, Supported CSCD Descriptor IDs (none beyond
    list indexes), General Copy Operations; each padded to 4 bytes."""
    d = good(lu.execute(A, bytes((0x12, 0x01, 0x8F, 0x04, 0x00, 0)), b""))
    assert d == bytes.fromhex(
        "008f 0060"
        "0001 0008 07 83 01 00 84 02 00 03"
        "0004 001c 00000000 0008 0010 000002c0 00000000" + "00" * 12 +
        "0008 0004 02 02e4 00"
        "000c 0004 0000 0000"
        "8001 0020 00000001 00000001 00400000 09 09" + "00" * 18
    )
    assert good(lu.execute(A, bytes((0x12, 0x01, 0x8F, 0x00, 0x08, 0)), b"")) == d[:8]
