"""SANITIZE (48h) on the logical unit: actions, parameter checks, write
protection, the reservation table, REPORT SUPPORTED OPERATION CODES and the
Block Device Characteristics VPD page."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from prmigrate.lun.conflicts import Access, classify
from prmigrate.lun.pr import ReservationTable
from prmigrate.lun.sanitize import OverwriteParams, SanitizeAction, pattern_block
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrType, Status
from prmigrate.scsi.sense import Sense, decode_sense

from .test_unit import BLOCKS, BS, A, B, _set_control, check, good, rw10


def san(action: int, length: int = 0, b1: int = 0, reserved: tuple[int, int] | None = None) -> bytes:
    c = bytearray(struct.pack(">BB5xHB", 0x48, b1 | action, length, 0))
    if reserved is not None:
        c[reserved[0]] = reserved[1]
    return bytes(c)


def overwrite_list(pattern: bytes, count: int = 1, invert: bool = False, plen: int | None = None) -> bytes:
    return struct.pack(">BxH", (0x80 if invert else 0) | count, len(pattern) if plen is None else plen) + pattern


def fill(lu: LogicalUnit, lba: int, n: int, byte: int) -> None:
    good(lu.execute(A, rw10(0x2A, lba, n), bytes([byte]) * (n * BS)))


def read(lu: LogicalUnit, lba: int, n: int) -> bytes:
    return good(lu.execute(A, rw10(0x28, lba, n), b""))


def mapped_runs(lu: LogicalUnit) -> list[tuple[int, int, int]]:
    c = struct.pack(">BBQIBB", 0x9E, 0x12, 0, 4096, 0, 0)
    data = good(lu.execute(A, c, b""))
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(n)]


@pytest.mark.parametrize("action", [SanitizeAction.BLOCK_ERASE, SanitizeAction.CRYPTOGRAPHIC_ERASE])
def test_erase_deallocates_everything(lu: LogicalUnit, action: SanitizeAction) -> None:
    fill(lu, 0, 256, 0x61)
    fill(lu, BLOCKS - 256, 256, 0x61)
    good(lu.execute(A, san(action), b""))
    assert read(lu, 0, 256) == bytes(256 * BS)
    assert read(lu, BLOCKS - 256, 256) == bytes(256 * BS)
    runs = mapped_runs(lu)
    assert runs == [(0, BLOCKS, 1)]  # one deallocated run over the whole LU


def test_erase_with_immed_and_ause(lu: LogicalUnit) -> None:
    fill(lu, 5, 1, 0x61)
    good(lu.execute(A, san(SanitizeAction.BLOCK_ERASE, b1=0x80 | 0x20), b""))
    assert read(lu, 5, 1) == bytes(BS)


def test_overwrite_writes_the_pattern(lu: LogicalUnit) -> None:
    fill(lu, 0, 4, 0x61)
    good(lu.execute(A, san(SanitizeAction.OVERWRITE, BS + 4), overwrite_list(b"\xaa" * BS)))
    assert read(lu, 0, 4) == b"\xaa" * (4 * BS)
    assert read(lu, BLOCKS - 1, 1) == b"\xaa" * BS
    # a short pattern repeats through each block
    good(lu.execute(A, san(SanitizeAction.OVERWRITE, 7), overwrite_list(b"abc")))
    assert read(lu, 3, 1) == (b"abc" * 171)[:BS]


def test_overwrite_invert_ends_with_the_pattern(lu: LogicalUnit) -> None:
    good(lu.execute(A, san(SanitizeAction.OVERWRITE, 5), overwrite_list(b"\x0f", count=2, invert=True)))
    assert read(lu, 0, 1) == b"\x0f" * BS
    p = OverwriteParams(True, 3, b"\x0f")
    assert p.count == 3 and pattern_block(p.pattern, 4, True) == b"\xf0" * 4


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, BS + 5])
def test_overwrite_bad_list_length(lu: LogicalUnit, length: int) -> None:
    fill(lu, 0, 1, 0x61)
    data = overwrite_list(b"\xaa" * BS) + bytes(8)
    check(lu.execute(A, san(SanitizeAction.OVERWRITE, length), data), Sense.INVALID_FIELD_IN_CDB)
    assert read(lu, 0, 1) == b"a" * BS


@pytest.mark.parametrize("header", [
    struct.pack(">BxH", 0, BS),  # OVERWRITE COUNT 0
    struct.pack(">BxH", 1, 0),  # INITIALIZATION PATTERN LENGTH 0
    struct.pack(">BxH", 1, BS + 4),  # pattern longer than a block
    struct.pack(">BxH", 0x21, BS),  # TEST != 0
])
def test_overwrite_bad_header(lu: LogicalUnit, header: bytes) -> None:
    check(lu.execute(A, san(SanitizeAction.OVERWRITE, BS + 4), header + bytes(BS)), Sense.INVALID_FIELD_IN_CDB)


def test_overwrite_pattern_longer_than_the_list(lu: LogicalUnit) -> None:
    data = overwrite_list(b"\xaa" * 8, plen=16)
    check(lu.execute(A, san(SanitizeAction.OVERWRITE, 12), data), Sense.INVALID_FIELD_IN_CDB)


def test_overwrite_list_shorter_than_announced(lu: LogicalUnit) -> None:
    check(lu.execute(A, san(SanitizeAction.OVERWRITE, BS + 4), overwrite_list(b"\xaa" * 8)),
          Sense.INVALID_FIELD_IN_CDB)


@pytest.mark.parametrize("action", [SanitizeAction.BLOCK_ERASE, SanitizeAction.CRYPTOGRAPHIC_ERASE,
                                    SanitizeAction.EXIT_FAILURE_MODE])
def test_other_actions_take_no_parameter_list(lu: LogicalUnit, action: SanitizeAction) -> None:
    fill(lu, 0, 1, 0x61)
    r = lu.execute(A, san(action, 8), bytes(8))
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert decode_sense(r.sense).describe()  # pointer to the length field, no crash
    assert read(lu, 0, 1) == b"a" * BS


def test_exit_failure_mode_outside_failure_mode_is_good(lu: LogicalUnit) -> None:
    fill(lu, 0, 1, 0x61)
    good(lu.execute(A, san(SanitizeAction.EXIT_FAILURE_MODE), b""))
    assert read(lu, 0, 1) == b"a" * BS


@pytest.mark.parametrize("sa", [0, 4, 5, 0x10, 0x1E])
def test_invalid_service_action(lu: LogicalUnit, sa: int) -> None:
    check(lu.execute(A, san(sa), b""), Sense.INVALID_FIELD_IN_CDB)


@pytest.mark.parametrize("reserved", [(1, 0x40 | SanitizeAction.BLOCK_ERASE), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)])
def test_reserved_cdb_fields(lu: LogicalUnit, reserved: tuple[int, int]) -> None:
    fill(lu, 0, 1, 0x61)
    check(lu.execute(A, san(SanitizeAction.BLOCK_ERASE, reserved=reserved), b""), Sense.INVALID_FIELD_IN_CDB)
    assert read(lu, 0, 1) == b"a" * BS


def test_write_protected(lu: LogicalUnit) -> None:
    fill(lu, 0, 1, 0x61)
    good(_set_control(lu, B, swp=True))
    lu.ua.pop(A)  # 2A/01 MODE PARAMETERS CHANGED
    for action, length, data in ((SanitizeAction.OVERWRITE, 5, overwrite_list(b"\xaa")),
                                 (SanitizeAction.BLOCK_ERASE, 0, b""),
                                 (SanitizeAction.CRYPTOGRAPHIC_ERASE, 0, b"")):
        check(lu.execute(A, san(action, length), data), Sense.WRITE_PROTECTED)
    good(_set_control(lu, B, swp=False))
    lu.ua.pop(A)
    assert read(lu, 0, 1) == b"a" * BS


def test_conflict_class_is_write() -> None:
    assert classify(san(SanitizeAction.BLOCK_ERASE)) is Access.WRITE


def test_reservations(tmp_path: Path) -> None:
    """A holder of WE sanitizes; a non-holder conflicts; SCSI-2 RESERVE too."""
    u = LogicalUnit(tmp_path / "img2", BLOCKS * BS, name="lu2", state_dir=tmp_path, pr_factory=ReservationTable)
    try:
        u.attach(A)
        u.attach(B)
        key = struct.pack(">QQ8x", 0, 0xAB)
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x00, 0, 24, 0), key))
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x01, PrType.WRITE_EXCLUSIVE, 24, 0),
                       struct.pack(">QQ8x", 0xAB, 0)))
        assert u.execute(B, san(SanitizeAction.BLOCK_ERASE), b"").status == Status.RESERVATION_CONFLICT
        good(u.execute(A, san(SanitizeAction.BLOCK_ERASE), b""))
        good(u.execute(A, struct.pack(">BBBxxIB", 0x5F, 0x03, 0, 24, 0), struct.pack(">QQ8x", 0xAB, 0)))  # CLEAR
        good(u.execute(B, bytes((0x16, 0, 0, 0, 0, 0)), b""))  # RESERVE(6)
        assert u.execute(A, san(SanitizeAction.OVERWRITE, 5), overwrite_list(b"\x01")).status == \
            Status.RESERVATION_CONFLICT
    finally:
        u.close()


def test_report_supported_opcodes_lists_every_action(lu: LogicalUnit) -> None:
    for sa in SanitizeAction:
        c = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0x48, sa, 512, 0, 0)
        data = good(lu.execute(A, c, b""))
        assert data[1] & 0x07 == 0x03  # supported as described
        usage = data[4 : 4 + struct.unpack_from(">H", data, 2)[0]]
        assert usage == bytes((0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
    c = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0x48, 0x04, 512, 0, 0)
    assert good(lu.execute(A, c, b""))[1] & 0x07 == 0x01  # not supported


def test_block_characteristics_wabereq_wacereq(lu: LogicalUnit) -> None:
    data = good(lu.execute(A, bytes((0x12, 0x01, 0xB1, 0, 0xFF, 0)), b""))
    assert data[7] & 0xC0 == 0x40 and data[7] & 0x30 == 0x10
