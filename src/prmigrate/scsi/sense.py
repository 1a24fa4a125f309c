"""Sense data: one vocabulary of conditions, one encoder (SPC-5 4.4).

Code raises ``CheckCondition(Sense.X)`` anywhere below the transport; exactly
one place (the logical unit's ``execute``) turns it into sense bytes, fixed or
descriptor format as the control mode page's D_SENSE bit asks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from .constants import SenseKey


class Sense(Enum):
    """(sense key, ASC, ASCQ) triples the project reports, by name."""

    NO_SENSE = (SenseKey.NO_SENSE, 0x00, 0x00)
    # ILLEGAL REQUEST
    INVALID_OPCODE = (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
    LBA_OUT_OF_RANGE = (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
    INVALID_FIELD_IN_CDB = (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    LU_NOT_SUPPORTED = (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
    INVALID_FIELD_IN_PARAMETER_LIST = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    PARAMETER_NOT_SUPPORTED = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x01)
    PARAMETER_VALUE_INVALID = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x02)
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x04)
    PARAMETER_LIST_LENGTH_ERROR = (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
    INSUFFICIENT_REGISTRATION_RESOURCES = (SenseKey.ILLEGAL_REQUEST, 0x55, 0x04)
    SAVING_PARAMETERS_NOT_SUPPORTED = (SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
    INVALID_COMMAND_SEQUENCE = (SenseKey.ILLEGAL_REQUEST, 0x2C, 0x00)
    # EXTENDED COPY parameter list (SPC-4 6.4.3)
    TOO_MANY_TARGET_DESCRIPTORS = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x06)
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x07)
    TOO_MANY_SEGMENT_DESCRIPTORS = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x08)
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x09)
    # UNIT ATTENTION
    POWER_ON_RESET = (SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    POWER_ON_OCCURRED = (SenseKey.UNIT_ATTENTION, 0x29, 0x01)
    SCSI_BUS_RESET = (SenseKey.UNIT_ATTENTION, 0x29, 0x02)
    BUS_DEVICE_RESET = (SenseKey.UNIT_ATTENTION, 0x29, 0x03)
    DEVICE_INTERNAL_RESET = (SenseKey.UNIT_ATTENTION, 0x29, 0x04)
    I_T_NEXUS_LOSS = (SenseKey.UNIT_ATTENTION, 0x29, 0x07)
    MODE_PARAMETERS_CHANGED = (SenseKey.UNIT_ATTENTION, 0x2A, 0x01)
    RESERVATIONS_PREEMPTED = (SenseKey.UNIT_ATTENTION, 0x2A, 0x03)
    RESERVATIONS_RELEASED = (SenseKey.UNIT_ATTENTION, 0x2A, 0x04)
    REGISTRATIONS_PREEMPTED = (SenseKey.UNIT_ATTENTION, 0x2A, 0x05)
    CAPACITY_DATA_HAS_CHANGED = (SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (SenseKey.UNIT_ATTENTION, 0x2F, 0x00)
    REPORTED_LUNS_DATA_HAS_CHANGED = (SenseKey.UNIT_ATTENTION, 0x3F, 0x0E)
    # NOT READY
    LU_NOT_READY_INIT_REQUIRED = (SenseKey.NOT_READY, 0x04, 0x02)
    # LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (SPC-5
    # 5.16.2.6): retried by initiators; an incoming device whose pull failed
    LU_NOT_ACCESSIBLE_TRANSITION = (SenseKey.NOT_READY, 0x04, 0x0A)
    # A PR OUT whose APTPL state could not be saved (not applied); LIO's answer
    # for the same fault (TCM_LOGICAL_UNIT_COMMUNICATION_FAILURE)
    LOGICAL_UNIT_COMMUNICATION_FAILURE = (SenseKey.NOT_READY, 0x08, 0x00)
    MEDIUM_NOT_PRESENT = (SenseKey.NOT_READY, 0x3A, 0x00)
    # COPY ABORTED: an EXTENDED COPY stopped in its segment processing
    COPY_ABORTED = (SenseKey.COPY_ABORTED, 0x00, 0x00)
    UNREACHABLE_COPY_TARGET = (SenseKey.COPY_ABORTED, 0x08, 0x04)
    COPY_TARGET_DEVICE_NOT_REACHABLE = (SenseKey.COPY_ABORTED, 0x0D, 0x02)
    INCORRECT_COPY_TARGET_DEVICE_TYPE = (SenseKey.COPY_ABORTED, 0x0D, 0x03)
    # others
    MISCOMPARE_DURING_VERIFY = (SenseKey.MISCOMPARE, 0x1D, 0x00)
    WRITE_PROTECTED = (SenseKey.DATA_PROTECT, 0x27, 0x00)
    UNRECOVERED_READ_ERROR = (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
    WRITE_ERROR = (SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
    INTERNAL_TARGET_FAILURE = (SenseKey.HARDWARE_ERROR, 0x44, 0x00)
    COMMAND_ABORTED = (SenseKey.ABORTED_COMMAND, 0x00, 0x00)
    INITIATOR_DETECTED_ERROR = (SenseKey.ABORTED_COMMAND, 0x48, 0x00)
    DATA_PHASE_ERROR = (SenseKey.ABORTED_COMMAND, 0x4B, 0x00)
    INVALID_TARGET_PORT_TRANSFER_TAG = (SenseKey.ABORTED_COMMAND, 0x4B, 0x01)
    TOO_MUCH_WRITE_DATA = (SenseKey.ABORTED_COMMAND, 0x4B, 0x02)
    NOT_ENOUGH_UNSOLICITED_DATA = (SenseKey.ABORTED_COMMAND, 0x4B, 0x06)

    @property
    def key(self) -> SenseKey:
        return SenseKey(self.value[0])

    @property
    def asc(self) -> int:
        return int(self.value[1])

    @property
    def ascq(self) -> int:
        return int(self.value[2])

    @classmethod
    def lookup(cls, key: int, asc: int, ascq: int) -> Sense | None:
        return _BY_TRIPLE.get((key, asc, ascq))

    def describe(self) -> str:
        return self.name.replace("_", " ")


_BY_TRIPLE = {(int(s.value[0]), s.value[1], s.value[2]): s for s in Sense}


@dataclass(frozen=True, slots=True)
class SenseField:
    """Sense-key-specific field pointing at the offending CDB or parameter byte."""

    cdb: bool  # C/D: 1 = error in the CDB, 0 = in the parameter list
    field: int  # byte offset
    bit: int | None = None  # bit pointer, None when not given


class CheckCondition(Exception):  # noqa: N818 - named after the SCSI status it becomes
    """A command ends with CHECK CONDITION and this sense."""

    def __init__(
        self,
        sense: Sense,
        field: SenseField | None = None,
        information: int | None = None,
    ) -> None:
        super().__init__(sense.describe())
        self.sense = sense
        self.field = field
        self.information = information

    def encode(self, descriptor: bool = False) -> bytes:
        return encode_sense(self.sense, descriptor, self.field, self.information)


_FIXED = struct.Struct(">BBBIBIBBBBBH")  # 18 bytes


def _sks(field: SenseField | None) -> bytes | None:
    if field is None:
        return None
    b0 = 0x80 | (0x40 if field.cdb else 0)
    if field.bit is not None:
        b0 |= 0x08 | (field.bit & 0x7)
    return bytes((b0,)) + field.field.to_bytes(2, "big")


def encode_sense(
    sense: Sense,
    descriptor: bool = False,
    field: SenseField | None = None,
    information: int | None = None,
) -> bytes:
    """Encode current sense data, fixed (70h) or descriptor (72h) format."""
    key, asc, ascq = int(sense.value[0]), sense.value[1], sense.value[2]
    sks = _sks(field)
    if descriptor:
        descs = b""
        if information is not None:
            descs += bytes((0x00, 0x0A, 0x80, 0x00)) + information.to_bytes(8, "big")
        if sks is not None:
            descs += bytes((0x02, 0x06, 0x00, 0x00)) + sks + b"\x00"
        return bytes((0x72, key, asc, ascq, 0, 0, 0, len(descs))) + descs
    b0 = 0x70 | (0x80 if information is not None else 0)
    info = (information or 0) & 0xFFFFFFFF
    b = bytearray(18)
    b[0] = b0
    b[2] = key
    b[3:7] = info.to_bytes(4, "big")
    b[7] = 10  # additional sense length
    b[12] = asc
    b[13] = ascq
    if sks is not None:
        b[15:18] = sks
    return bytes(b)


@dataclass(frozen=True, slots=True)
class DecodedSense:
    key: int
    asc: int
    ascq: int
    information: int | None = None

    @property
    def known(self) -> Sense | None:
        return Sense.lookup(self.key, self.asc, self.ascq)

    def describe(self) -> str:
        k = SenseKey(self.key).name.replace("_", " ") if self.key in SenseKey._value2member_map_ else f"0x{self.key:x}"
        s = self.known
        what = s.describe() if s is not None else f"ASC 0x{self.asc:02x} ASCQ 0x{self.ascq:02x}"
        return f"{k}: {what}"


class SenseDecodeError(ValueError):
    pass


def decode_sense(data: bytes | bytearray | memoryview) -> DecodedSense:
    """Decode fixed or descriptor format sense data."""
    b = bytes(data)
    if len(b) < 8:
        raise SenseDecodeError(f"sense data too short ({len(b)} bytes)")
    code = b[0] & 0x7F
    if code in (0x70, 0x71):
        if len(b) < 14:
            raise SenseDecodeError("fixed sense data shorter than 14 bytes")
        info = int.from_bytes(b[3:7], "big") if b[0] & 0x80 else None
        return DecodedSense(b[2] & 0x0F, b[12], b[13], info)
    if code in (0x72, 0x73):
        info = None
        off, end = 8, min(len(b), 8 + b[7])
        while off + 2 <= end:
            dtype, dlen = b[off], b[off + 1]
            if dtype == 0 and dlen >= 10 and off + 12 <= len(b):
                info = int.from_bytes(b[off + 4 : off + 12], "big")
            off += 2 + dlen
        return DecodedSense(b[1] & 0x0F, b[2], b[3], info)
    raise SenseDecodeError(f"unknown sense response code 0x{code:02x}")


def sense_triple(sense: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
    """(sense key, ASC, ASCQ) of fixed or descriptor sense data; None when the
    bytes do not decode (SPC-5 4.4)."""
    try:
        s = decode_sense(sense)
    except SenseDecodeError:
        return None
    return (s.key, s.asc, s.ascq)


def unit_attention_of(sense: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(ASC, ASCQ) when the sense data reports UNIT ATTENTION (SPC-5 5.14 /
    SAM-5 5.14), else None. The one place that asks "is this a unit
    attention?" of sense bytes; callers check the CHECK CONDITION status."""
    t = sense_triple(sense)
    if t is None or t[0] != SenseKey.UNIT_ATTENTION:
        return None
    return (t[1], t[2])
