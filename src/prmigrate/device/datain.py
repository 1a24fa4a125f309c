"""The data-in length a command asks for, from its CDB alone.

The LU contract (``lun/types.py``) carries no Expected Data Transfer
Length, so the device asks the backend for what the CDB allows: the SPC-5
allocation length fields and the SBC-4 transfer lengths. The frontend
target then truncates to the guest's EDTL and reports the residual against
it, as the backend would have. Pure: tables and arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

from ..scsi.constants import Opcode


def _be(cdb: bytes, start: int, n: int) -> int:
    return int.from_bytes(cdb[start : start + n], "big") if len(cdb) >= start + n else 0


def expected_in_len(cdb: bytes, block_size: int = 512) -> int:
    """The data-in length a command asks for, from its CDB alone (SPC-5
    allocation length fields, SBC-4 transfer lengths). Only used when the
    transport did not pass the guest's Expected Data Transfer Length.
    At most 2^32 - 1, the most an EDTL field carries (a guest's transport
    could not have asked for more: the backend answers the CDB itself)."""
    if not cdb:
        return 0
    op = cdb[0]
    rule = _IN_LEN.get(op)
    if rule is not None:
        return min(rule(cdb, block_size), _MAX_EDTL)
    group = op >> 5
    if group == 0:
        return cdb[4] if len(cdb) > 4 else 0
    if group in (1, 2):
        return _be(cdb, 7, 2)
    if group == 5:
        return _be(cdb, 6, 4)
    if group == 4:
        return _be(cdb, 10, 4)
    return 0


_MAX_EDTL = 0xFFFFFFFF
_ZERO: Callable[[bytes, int], int] = lambda c, b: 0  # noqa: E731
_IN_LEN: dict[int, Callable[[bytes, int], int]] = {
    Opcode.READ_6: lambda c, b: ((c[4] if len(c) > 4 else 0) or 256) * b,
    # the data path's reads: _be inlined
    Opcode.READ_10: lambda c, b: int.from_bytes(c[7:9], "big") * b if len(c) >= 9 else 0,
    Opcode.READ_12: lambda c, b: _be(c, 6, 4) * b,
    Opcode.READ_16: lambda c, b: int.from_bytes(c[10:14], "big") * b if len(c) >= 14 else 0,
    Opcode.INQUIRY: lambda c, b: _be(c, 3, 2),
    Opcode.READ_CAPACITY_10: lambda c, b: 8,
    Opcode.REPORT_LUNS: lambda c, b: _be(c, 6, 4),
    Opcode.MAINTENANCE_IN: lambda c, b: _be(c, 6, 4),
    Opcode.PERSISTENT_RESERVE_IN: lambda c, b: _be(c, 7, 2),
    Opcode.READ_DEFECT_DATA_12: lambda c, b: _be(c, 6, 4),
    Opcode.RECEIVE_DIAGNOSTIC_RESULTS: lambda c, b: _be(c, 3, 2),
    Opcode.READ_BUFFER: lambda c, b: _be(c, 6, 3),
    # data-out or no-data commands of groups that would otherwise guess
    Opcode.TEST_UNIT_READY: _ZERO,
    Opcode.START_STOP_UNIT: _ZERO,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: _ZERO,
    Opcode.RESERVE_6: _ZERO,
    Opcode.RELEASE_6: _ZERO,
    Opcode.VERIFY_10: _ZERO,
    Opcode.VERIFY_12: _ZERO,
    Opcode.VERIFY_16: _ZERO,
    Opcode.SYNCHRONIZE_CACHE_10: _ZERO,
    Opcode.SYNCHRONIZE_CACHE_16: _ZERO,
    Opcode.PRE_FETCH_10: _ZERO,
    Opcode.PRE_FETCH_16: _ZERO,
    Opcode.WRITE_6: _ZERO,
    Opcode.WRITE_10: _ZERO,
    Opcode.WRITE_12: _ZERO,
    Opcode.WRITE_16: _ZERO,
    Opcode.WRITE_SAME_10: _ZERO,
    Opcode.WRITE_SAME_16: _ZERO,
    Opcode.WRITE_ATOMIC_16: _ZERO,
    Opcode.EXTENDED_COPY: _ZERO,  # bytes 10-13: the parameter list (Data-Out) length
    Opcode.RECEIVE_COPY_RESULTS: lambda c, b: _be(c, 10, 4),
    Opcode.UNMAP: _ZERO,
    Opcode.SANITIZE: _ZERO,  # bytes 7-8 are the parameter list (Data-Out) length
    Opcode.MODE_SELECT_6: _ZERO,
    Opcode.MODE_SELECT_10: _ZERO,
    Opcode.PERSISTENT_RESERVE_OUT: _ZERO,
    Opcode.RESERVE_10: _ZERO,
    Opcode.RELEASE_10: _ZERO,
}
# Commands that only move data in: a guest flagging one as a write (the
# iSCSI W bit with data) has its data ignored, as a LUN would; forwarding the
# data would make the backend answer Data-In to a write.
DATA_IN_ONLY = frozenset(op for op, rule in _IN_LEN.items() if rule is not _ZERO)

__all__ = ["DATA_IN_ONLY", "expected_in_len"]
