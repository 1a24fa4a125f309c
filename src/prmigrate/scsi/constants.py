"""SCSI code points (SPC-5, SBC-4) as IntEnums.

Every number the project puts on the wire or compares against lives here, so
that a grep for a name finds every use.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class Opcode(IntEnum):
    """Operation codes of the commands the logical unit knows."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    VERIFY_6 = 0x13
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    RECEIVE_DIAGNOSTIC_RESULTS = 0x1C
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_BUFFER = 0x3B
    READ_BUFFER = 0x3C
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    READ_TOC = 0x43
    SANITIZE = 0x48
    LOG_SELECT = 0x4C
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    ATA_PASS_THROUGH_16 = 0x85
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    SERVICE_ACTION_OUT_16 = 0x9F
    REPORT_LUNS = 0xA0
    ATA_PASS_THROUGH_12 = 0xA1
    SECURITY_PROTOCOL_IN = 0xA2
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    SECURITY_PROTOCOL_OUT = 0xB5
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(IntEnum):
    """Service actions of SERVICE ACTION IN(16) (9Eh)."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class ExtendedCopyAction(IntEnum):
    """Service actions of EXTENDED COPY (83h), SPC-4 6.4."""

    LID1 = 0x00
    LID4 = 0x01


class ReceiveCopyResultsAction(IntEnum):
    """Service actions of RECEIVE COPY RESULTS (84h), SPC-4 6.18 (LID1 forms)."""

    COPY_STATUS = 0x00
    RECEIVE_DATA = 0x01
    OPERATING_PARAMETERS = 0x03
    FAILED_SEGMENT_DETAILS = 0x04


class MaintenanceIn(IntEnum):
    """Service actions of MAINTENANCE IN (A3h)."""

    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = 0x0D
    REPORT_TIMESTAMP = 0x0F


class PrOutAction(IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-5 6.17.2)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07
    REPLACE_LOST_RESERVATION = 0x08


class PrInAction(IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-5 6.16.1)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrType(IntEnum):
    """Persistent reservation types (SPC-5 6.16.3.4, table 175)."""

    NONE = 0x0  # not a wire value of a reservation: "no reservation"
    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def all_registrants(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)

    @property
    def registrants_only(self) -> bool:
        return self in (
            PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        )

    @property
    def short(self) -> str:
        return _PR_TYPE_SHORT[self]


_PR_TYPE_SHORT = {
    PrType.NONE: "none",
    PrType.WRITE_EXCLUSIVE: "WE",
    PrType.EXCLUSIVE_ACCESS: "EA",
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: "WE_RO",
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "EA_RO",
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "WE_AR",
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "EA_AR",
}

VALID_PR_TYPES = frozenset(t for t in PrType if t is not PrType.NONE)


class PrScope(IntEnum):
    LU_SCOPE = 0x0


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class ProtocolId(IntEnum):
    """SCSI transport protocol identifiers (SPC-5 7.6.1)."""

    FCP = 0x0
    SAS = 0x6
    ISCSI = 0x5


class DeviceType(IntEnum):
    DIRECT_ACCESS = 0x00
