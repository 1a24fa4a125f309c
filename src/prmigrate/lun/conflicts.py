"""Which commands a reservation lets through, as data (SPC-5 5.14.2, SBC-4 4.17).

Every command falls into one access class (``classify``). A persistent
reservation decides per (class, reservation type, relation of the nexus) whether
the command conflicts (``PR_TABLE``). A SCSI-2 reservation (RESERVE(6)/(10))
lets only ``SCSI2_ALLOWED`` through from other nexuses (SPC-2 5.5.1, 7.21).

Relations: HOLDER holds the persistent reservation (with an all-registrants
type every registrant is a holder); REGISTERED is registered but not a holder;
UNREGISTERED has no registration.
"""

from __future__ import annotations

from enum import Enum

from ..scsi.constants import (
    MaintenanceIn,
    Opcode,
    PrOutAction,
    PrType,
    ServiceActionIn16,
)


class Access(Enum):
    """Access classes of SPC-5 table 60 / SBC-4 table 13 ("commands allowed ...")."""

    ALWAYS = "always"  # allowed under every reservation (INQUIRY, PR IN, ...)
    READ = "read"  # reads the medium or LU state: allowed through WE types, not EA
    WRITE = "write"  # changes the medium or LU state: holder (or registrants for RO/AR)
    PR_OUT_ANY = "pr_out_any"  # PR OUT REGISTER / REGISTER AND IGNORE: always allowed
    PR_OUT_REGISTERED = "pr_out_registered"  # PR OUT that needs a registration
    PR_OUT_HOLDER = "pr_out_holder"  # PR OUT RESERVE / REGISTER AND MOVE (engine decides)
    SCSI2 = "scsi2"  # RESERVE / RELEASE (6/10): compatible reservation handling (CRH=1)


class Relation(Enum):
    HOLDER = "holder"
    REGISTERED = "registered"
    UNREGISTERED = "unregistered"


_H, _R, _U = Relation.HOLDER, Relation.REGISTERED, Relation.UNREGISTERED

# Opcode -> access class. SPC-5 table 60 and SBC-4 table 13; one line per opcode.
OPCODE_ACCESS: dict[int, Access] = {
    Opcode.TEST_UNIT_READY: Access.ALWAYS,  # SPC-5: allowed
    Opcode.REQUEST_SENSE: Access.ALWAYS,
    Opcode.INQUIRY: Access.ALWAYS,
    Opcode.REPORT_LUNS: Access.ALWAYS,
    Opcode.LOG_SENSE: Access.ALWAYS,
    Opcode.PERSISTENT_RESERVE_IN: Access.ALWAYS,
    Opcode.READ_CAPACITY_10: Access.ALWAYS,  # SBC-4: allowed
    Opcode.FORMAT_UNIT: Access.WRITE,
    Opcode.READ_6: Access.READ,
    Opcode.READ_10: Access.READ,
    Opcode.READ_12: Access.READ,
    Opcode.READ_16: Access.READ,
    Opcode.WRITE_6: Access.WRITE,
    Opcode.WRITE_10: Access.WRITE,
    Opcode.WRITE_12: Access.WRITE,
    Opcode.WRITE_16: Access.WRITE,
    Opcode.WRITE_AND_VERIFY_10: Access.WRITE,
    Opcode.WRITE_AND_VERIFY_12: Access.WRITE,
    Opcode.WRITE_AND_VERIFY_16: Access.WRITE,
    Opcode.ORWRITE_16: Access.WRITE,
    Opcode.WRITE_ATOMIC_16: Access.WRITE,  # SBC-4 table 13: conflicts like WRITE(16)
    Opcode.COMPARE_AND_WRITE: Access.WRITE,
    Opcode.WRITE_SAME_10: Access.WRITE,
    Opcode.WRITE_SAME_16: Access.WRITE,
    Opcode.UNMAP: Access.WRITE,
    Opcode.SANITIZE: Access.WRITE,  # SBC-4 table 13: conflicts under WE and EA
    Opcode.VERIFY_6: Access.READ,
    Opcode.VERIFY_10: Access.READ,
    Opcode.VERIFY_12: Access.READ,
    Opcode.VERIFY_16: Access.READ,
    Opcode.PRE_FETCH_10: Access.READ,  # SBC-4: allowed through WE, conflicts under EA
    Opcode.PRE_FETCH_16: Access.READ,
    Opcode.SYNCHRONIZE_CACHE_10: Access.WRITE,  # SBC-4: conflicts under WE and EA
    Opcode.SYNCHRONIZE_CACHE_16: Access.WRITE,
    Opcode.MODE_SENSE_6: Access.READ,  # SPC-5: WE allowed, EA conflict
    Opcode.MODE_SENSE_10: Access.READ,
    Opcode.MODE_SELECT_6: Access.WRITE,
    Opcode.MODE_SELECT_10: Access.WRITE,
    Opcode.LOG_SELECT: Access.WRITE,
    Opcode.START_STOP_UNIT: Access.WRITE,  # refined by _start_stop below
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: Access.WRITE,  # refined by _prevent_allow below
    Opcode.RECEIVE_DIAGNOSTIC_RESULTS: Access.READ,
    Opcode.SEND_DIAGNOSTIC: Access.WRITE,
    Opcode.READ_DEFECT_DATA_10: Access.READ,
    Opcode.READ_DEFECT_DATA_12: Access.READ,
    Opcode.READ_BUFFER: Access.READ,
    Opcode.WRITE_BUFFER: Access.WRITE,
    Opcode.READ_TOC: Access.READ,
    Opcode.EXTENDED_COPY: Access.WRITE,
    Opcode.RECEIVE_COPY_RESULTS: Access.READ,
    Opcode.ATA_PASS_THROUGH_12: Access.WRITE,
    Opcode.ATA_PASS_THROUGH_16: Access.WRITE,
    Opcode.SECURITY_PROTOCOL_IN: Access.READ,
    Opcode.SECURITY_PROTOCOL_OUT: Access.WRITE,
    Opcode.MAINTENANCE_OUT: Access.WRITE,
    Opcode.RESERVE_6: Access.SCSI2,
    Opcode.RESERVE_10: Access.SCSI2,
    Opcode.RELEASE_6: Access.SCSI2,
    Opcode.RELEASE_10: Access.SCSI2,
    # SERVICE ACTION IN(16), MAINTENANCE IN and PR OUT depend on the service action.
}

SA_IN16_ACCESS: dict[int, Access] = {
    ServiceActionIn16.READ_CAPACITY_16: Access.ALWAYS,  # SBC-4: allowed
    ServiceActionIn16.GET_LBA_STATUS: Access.READ,  # SBC-4: WE allowed, EA conflict
}

MAINTENANCE_IN_ACCESS: dict[int, Access] = {
    MaintenanceIn.REPORT_TARGET_PORT_GROUPS: Access.ALWAYS,
    MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES: Access.ALWAYS,
    MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS: Access.ALWAYS,
    MaintenanceIn.REPORT_TIMESTAMP: Access.ALWAYS,
}

# SPC-5 table 60, PERSISTENT RESERVE OUT rows.
PR_OUT_ACCESS: dict[int, Access] = {
    PrOutAction.REGISTER: Access.PR_OUT_ANY,
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: Access.PR_OUT_ANY,
    PrOutAction.RESERVE: Access.PR_OUT_HOLDER,
    PrOutAction.RELEASE: Access.PR_OUT_REGISTERED,
    PrOutAction.CLEAR: Access.PR_OUT_REGISTERED,
    PrOutAction.PREEMPT: Access.PR_OUT_REGISTERED,
    PrOutAction.PREEMPT_AND_ABORT: Access.PR_OUT_REGISTERED,
    PrOutAction.REGISTER_AND_MOVE: Access.PR_OUT_HOLDER,
    PrOutAction.REPLACE_LOST_RESERVATION: Access.PR_OUT_REGISTERED,
}

# (holder, registered, unregistered) -> conflicts?  One row per type and class.
# SPC-5 5.14.2 table 60 / SBC-4 table 13:
#   WE: others may read; EA: others may do neither.
#   RO / AR: every registrant may read and write; unregistered nexuses see WE / EA.
_ALLOW = (False, False, False)
_HOLDER_ONLY = (False, True, True)
_REGISTRANTS = (False, False, True)

PR_TABLE: dict[Access, dict[PrType, tuple[bool, bool, bool]]] = {
    Access.ALWAYS: {t: _ALLOW for t in PrType if t is not PrType.NONE},
    Access.PR_OUT_ANY: {t: _ALLOW for t in PrType if t is not PrType.NONE},
    Access.READ: {
        PrType.WRITE_EXCLUSIVE: _ALLOW,
        PrType.EXCLUSIVE_ACCESS: _HOLDER_ONLY,
        PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: _ALLOW,
        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: _REGISTRANTS,
        PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: _ALLOW,
        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: _REGISTRANTS,
    },
    Access.WRITE: {
        PrType.WRITE_EXCLUSIVE: _HOLDER_ONLY,
        PrType.EXCLUSIVE_ACCESS: _HOLDER_ONLY,
        PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: _REGISTRANTS,
        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: _REGISTRANTS,
        PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: _REGISTRANTS,
        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: _REGISTRANTS,
    },
    # PR OUT needing a registration: unregistered nexuses conflict (the engine
    # then checks the reservation key itself).
    Access.PR_OUT_REGISTERED: {t: _REGISTRANTS for t in PrType if t is not PrType.NONE},
    Access.PR_OUT_HOLDER: {t: _REGISTRANTS for t in PrType if t is not PrType.NONE},
}

# Without a persistent reservation, only registration matters for PR OUT.
NO_RESERVATION: dict[Access, tuple[bool, bool, bool]] = {
    Access.ALWAYS: _ALLOW,
    Access.READ: _ALLOW,
    Access.WRITE: _ALLOW,
    Access.PR_OUT_ANY: _ALLOW,
    Access.PR_OUT_REGISTERED: _REGISTRANTS,
    Access.PR_OUT_HOLDER: _REGISTRANTS,
}

# SPC-2 5.5.1 / 7.21: commands another nexus may still send while a SCSI-2
# reservation is held. RELEASE from a non-holder completes GOOD without effect.
SCSI2_ALLOWED: frozenset[int] = frozenset(
    {
        Opcode.INQUIRY,
        Opcode.REPORT_LUNS,
        Opcode.REQUEST_SENSE,
        Opcode.LOG_SENSE,
        Opcode.RELEASE_6,
        Opcode.RELEASE_10,
    }
)
SCSI2_ALLOWED_MAINTENANCE_IN: frozenset[int] = frozenset(MAINTENANCE_IN_ACCESS)

# SPC-5 5.14.3: while a SCSI-2 reservation exists, every PERSISTENT RESERVE IN
# and OUT conflicts, whichever nexus sends it.
PR_OPCODES: frozenset[int] = frozenset(
    {Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT}
)


def _start_stop(cdb: bytes) -> Access:
    # SBC-4 table 13: START STOP UNIT with START=1 and POWER CONDITION=0 is allowed.
    if len(cdb) > 4 and cdb[4] & 0x01 and not cdb[4] & 0xF0:
        return Access.ALWAYS
    return Access.WRITE


def _prevent_allow(cdb: bytes) -> Access:
    # SPC-5 table 60: PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0 is allowed.
    if len(cdb) > 4 and not cdb[4] & 0x03:
        return Access.ALWAYS
    return Access.WRITE


def classify(cdb: bytes | bytearray | memoryview) -> Access:
    """Access class of a command. Unknown commands count as writes (the safe side)."""
    if len(cdb) == 0:
        return Access.WRITE
    op = cdb[0]
    sa = cdb[1] & 0x1F if len(cdb) > 1 else 0
    if op == Opcode.PERSISTENT_RESERVE_OUT:
        return PR_OUT_ACCESS.get(sa, Access.PR_OUT_REGISTERED)
    if op == Opcode.SERVICE_ACTION_IN_16:
        return SA_IN16_ACCESS.get(sa, Access.READ)
    if op == Opcode.MAINTENANCE_IN:
        return MAINTENANCE_IN_ACCESS.get(sa, Access.READ)
    if op == Opcode.START_STOP_UNIT:
        return _start_stop(bytes(cdb))
    if op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL:
        return _prevent_allow(bytes(cdb))
    return OPCODE_ACCESS.get(op, Access.WRITE)


def pr_conflicts(access: Access, rtype: PrType | None, relation: Relation) -> bool:
    """Does a command of ``access`` from a nexus in ``relation`` conflict?"""
    if access is Access.SCSI2:
        return False  # decided by the CRH rules in the engine
    row = NO_RESERVATION[access] if rtype is None else PR_TABLE[access][rtype]
    return row[(_H, _R, _U).index(relation)]


def scsi2_allowed(cdb: bytes | bytearray | memoryview) -> bool:
    """May a nexus that does not hold the SCSI-2 reservation send this command?"""
    if len(cdb) == 0:
        return False
    if cdb[0] == Opcode.MAINTENANCE_IN:
        return len(cdb) > 1 and (cdb[1] & 0x1F) in SCSI2_ALLOWED_MAINTENANCE_IN
    return cdb[0] in SCSI2_ALLOWED
