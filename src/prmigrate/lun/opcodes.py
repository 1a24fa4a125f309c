"""REPORT SUPPORTED OPERATION CODES data (SPC-5 6.35).

One table: every command the logical unit executes, with its CDB usage data
(bit set = the device server looks at that bit; for service-action commands
the SERVICE ACTION field holds the action code, SPC-5 6.35.3) and its
nominal / recommended timeouts in seconds for RCTD.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..scsi.cdb import ReportOpcodesCdb, invalid_cdb
from ..scsi.constants import (
    ExtendedCopyAction,
    MaintenanceIn,
    Opcode,
    PrInAction,
    PrOutAction,
    ReceiveCopyResultsAction,
    ServiceActionIn16,
)
from .sanitize import SanitizeAction


@dataclass(frozen=True, slots=True)
class OpInfo:
    opcode: int
    action: int | None  # None: the command has no service actions
    usage: bytes
    nominal: int = 1
    recommended: int = 30


def _u(*b: int) -> bytes:
    return bytes(b)


_LBA4 = (0xFF, 0xFF, 0xFF, 0xFF)
_LBA8 = _LBA4 * 2


def _rw10(op: int, b1: int) -> OpInfo:
    return OpInfo(op, None, _u(op, b1, *_LBA4, 0x3F, 0xFF, 0xFF, 0x00))


def _rw12(op: int, b1: int) -> OpInfo:
    return OpInfo(op, None, _u(op, b1, *_LBA4, *_LBA4, 0x3F, 0x00))


def _rw16(op: int, b1: int, slow: bool = False) -> OpInfo:
    return OpInfo(op, None, _u(op, b1, *_LBA8, *_LBA4, 0x3F, 0x00), recommended=60 if slow else 30)


# byte 1 masks: DPO|FUA = 18h; BYTCHK (2 bits) + DPO = 16h; WRITE AND VERIFY
# BYTCHK bit 1 + DPO = 12h; IMMED = 02h; WRITE SAME UNMAP = 08h (+ NDOB 01h).
TABLE: tuple[OpInfo, ...] = (
    OpInfo(Opcode.TEST_UNIT_READY, None, _u(0x00, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.REQUEST_SENSE, None, _u(0x03, 0x01, 0, 0, 0xFF, 0)),
    OpInfo(Opcode.READ_6, None, _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.WRITE_6, None, _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.INQUIRY, None, _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.MODE_SELECT_6, None, _u(0x15, 0x10, 0, 0, 0xFF, 0)),
    OpInfo(Opcode.RESERVE_6, None, _u(0x16, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.RELEASE_6, None, _u(0x17, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.MODE_SENSE_6, None, _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.START_STOP_UNIT, None, _u(0x1B, 0x01, 0, 0x0F, 0xF5, 0)),
    OpInfo(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None, _u(0x1E, 0, 0, 0, 0x03, 0)),
    OpInfo(Opcode.READ_CAPACITY_10, None, _u(0x25, 0, *_LBA4, 0, 0, 0x01, 0)),
    _rw10(Opcode.READ_10, 0x18),
    _rw10(Opcode.WRITE_10, 0x18),
    _rw10(Opcode.WRITE_AND_VERIFY_10, 0x12),
    _rw10(Opcode.VERIFY_10, 0x16),
    _rw10(Opcode.PRE_FETCH_10, 0x02),
    _rw10(Opcode.SYNCHRONIZE_CACHE_10, 0x02),
    OpInfo(Opcode.READ_DEFECT_DATA_10, None, _u(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    _rw10(Opcode.WRITE_SAME_10, 0x08),
    OpInfo(Opcode.UNMAP, None, _u(0x42, 0, 0, 0, 0, 0, 0x3F, 0xFF, 0xFF, 0), recommended=60),
    # SANITIZE: IMMED, AUSE and the service action in byte 1 (SBC-4 5.30)
    *(
        OpInfo(Opcode.SANITIZE, sa, _u(0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), recommended=600)
        for sa in SanitizeAction
    ),
    OpInfo(Opcode.MODE_SELECT_10, None, _u(0x55, 0x10, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.RESERVE_10, None, _u(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.RELEASE_10, None, _u(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.MODE_SENSE_10, None, _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0)),
    *(
        OpInfo(Opcode.PERSISTENT_RESERVE_IN, sa, _u(0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
        for sa in PrInAction
    ),
    *(
        OpInfo(Opcode.PERSISTENT_RESERVE_OUT, sa, _u(0x5F, sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0))
        for sa in PrOutAction
        if sa != PrOutAction.REPLACE_LOST_RESERVATION
    ),
    # EXTENDED COPY (LID1): PARAMETER LIST LENGTH (bytes 10-13); a copy of up
    # to MAX_SEGMENT_DESCRIPTORS x MAX_SEGMENT_BYTES runs inside the command.
    OpInfo(Opcode.EXTENDED_COPY, ExtendedCopyAction.LID1,
           _u(0x83, ExtendedCopyAction.LID1, *(0,) * 8, *_LBA4, 0, 0), recommended=60),
    # RECEIVE COPY RESULTS: LIST IDENTIFIER (byte 2, COPY STATUS only), ALLOCATION LENGTH (10-13)
    OpInfo(Opcode.RECEIVE_COPY_RESULTS, ReceiveCopyResultsAction.COPY_STATUS,
           _u(0x84, ReceiveCopyResultsAction.COPY_STATUS, 0xFF, *(0,) * 7, *_LBA4, 0, 0)),
    OpInfo(Opcode.RECEIVE_COPY_RESULTS, ReceiveCopyResultsAction.OPERATING_PARAMETERS,
           _u(0x84, ReceiveCopyResultsAction.OPERATING_PARAMETERS, *(0,) * 8, *_LBA4, 0, 0)),
    _rw16(Opcode.READ_16, 0x18),
    OpInfo(Opcode.COMPARE_AND_WRITE, None, _u(0x89, 0x18, *_LBA8, 0, 0, 0, 0xFF, 0x3F, 0)),
    _rw16(Opcode.WRITE_16, 0x18),
    _rw16(Opcode.ORWRITE_16, 0x18),
    _rw16(Opcode.WRITE_AND_VERIFY_16, 0x12),
    _rw16(Opcode.VERIFY_16, 0x16),
    _rw16(Opcode.PRE_FETCH_16, 0x02),
    _rw16(Opcode.SYNCHRONIZE_CACHE_16, 0x02, slow=True),
    _rw16(Opcode.WRITE_SAME_16, 0x09, slow=True),
    # WRITE ATOMIC(16): DPO|FUA, LBA, ATOMIC BOUNDARY, TRANSFER LENGTH (2 bytes), group
    OpInfo(Opcode.WRITE_ATOMIC_16, None, _u(0x9C, 0x18, *_LBA8, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x00)),
    OpInfo(
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.READ_CAPACITY_16,
        _u(0x9E, 0x10, *(0,) * 8, *_LBA4, 0, 0),
    ),
    OpInfo(
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.GET_LBA_STATUS,
        _u(0x9E, 0x12, *_LBA8, *_LBA4, 0, 0),
    ),
    OpInfo(Opcode.REPORT_LUNS, None, _u(0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    OpInfo(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
        _u(0xA3, 0x2A, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),  # PARAMETER DATA FORMAT 000b/001b
    ),
    OpInfo(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
        _u(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
    ),
    OpInfo(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
        _u(0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
    ),
    _rw12(Opcode.READ_12, 0x18),
    _rw12(Opcode.WRITE_12, 0x18),
    _rw12(Opcode.WRITE_AND_VERIFY_12, 0x12),
    _rw12(Opcode.VERIFY_12, 0x16),
    OpInfo(Opcode.READ_DEFECT_DATA_12, None, _u(0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
)

_BY_KEY = {(i.opcode, i.action): i for i in TABLE}
_HAS_SA = frozenset(i.opcode for i in TABLE if i.action is not None)

_TIMEOUTS = struct.Struct(">HxBII")  # SPC-5 6.35.4: length 0Ah, cmd specific, nominal, recommended


def _timeouts(i: OpInfo) -> bytes:
    return _TIMEOUTS.pack(0x0A, 0, i.nominal, i.recommended)


def has_service_actions(opcode: int) -> bool:
    return opcode in _HAS_SA


def report_supported_opcodes(c: ReportOpcodesCdb) -> bytes:
    """Full (untruncated) parameter data for the reporting option in ``c``."""
    if c.options == 0:
        out = bytearray()
        for i in TABLE:
            flags = (0x02 if c.rctd else 0) | (0x01 if i.action is not None else 0)
            out += struct.pack(">BxHxBH", i.opcode, i.action or 0, flags, len(i.usage))
            if c.rctd:
                out += _timeouts(i)
        return struct.pack(">I", len(out)) + bytes(out)
    if c.options == 1:  # opcode only; an opcode with service actions is invalid
        if c.opcode in _HAS_SA:
            raise invalid_cdb(3)
        info = _BY_KEY.get((c.opcode, None))
    elif c.options == 2:  # opcode + service action
        if c.opcode not in _HAS_SA and (c.opcode, None) in _BY_KEY:
            raise invalid_cdb(4)
        info = _BY_KEY.get((c.opcode, c.action))
    elif c.options == 3:  # SPC-5: service action used only if the opcode has them
        info = _BY_KEY.get((c.opcode, c.action if c.opcode in _HAS_SA else None))
    else:
        raise invalid_cdb(2, 0)
    if info is None:
        return bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    head = bytes((0, (0x80 if c.rctd else 0) | 0x03)) + struct.pack(">H", len(info.usage))
    return head + info.usage + (_timeouts(info) if c.rctd else b"")
