"""Typed CDB decoding (SPC-5, SBC-4).

Each command family is a frozen, slotted dataclass with ``decode(cdb)``. A CDB
shorter than its opcode requires raises ``CdbTooShort``, a ``CheckCondition``
(INVALID FIELD IN CDB pointing at byte 0), never an ``IndexError``. The READ /
WRITE hot path uses the precompiled structs of ``RW_LAYOUT`` directly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .constants import Opcode
from .sense import CheckCondition, Sense, SenseField


class CdbTooShort(CheckCondition):
    """The CDB is shorter than its operation code requires."""

    def __init__(self, opcode: int, need: int, got: int) -> None:
        super().__init__(Sense.INVALID_FIELD_IN_CDB, SenseField(cdb=True, field=0))
        self.opcode, self.need, self.got = opcode, need, got


def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    """INVALID FIELD IN CDB with a sense-key-specific pointer (SPC-5 4.4.2.4.2)."""
    return CheckCondition(Sense.INVALID_FIELD_IN_CDB, SenseField(cdb=True, field=byte, bit=bit))


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        Sense.INVALID_FIELD_IN_PARAMETER_LIST, SenseField(cdb=False, field=byte, bit=bit)
    )


def need(cdb: bytes | memoryview, n: int) -> None:
    if len(cdb) < n:
        raise CdbTooShort(cdb[0] if cdb else -1, n, len(cdb))


# Structs for the LBA / transfer length families (SBC-4 5.x).
# 10-byte: op, flags, LBA(4), group, length(2), control
RW10 = struct.Struct(">BBIBHB")
# 12-byte: op, flags, LBA(4), length(4), group, control
RW12 = struct.Struct(">BBIIBB")
# 16-byte: op, flags, LBA(8), length(4), group, control
RW16 = struct.Struct(">BBQIBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# opcode -> (struct, cdb length) for the commands whose CDB is the plain
# LBA + length layout: READ/WRITE/VERIFY/WRITE AND VERIFY/PRE-FETCH/SYNC CACHE/
# WRITE SAME/ORWRITE. The length field means blocks in every one of them.
RW_LAYOUT: dict[int, tuple[struct.Struct, int]] = {
    Opcode.READ_10: (RW10, 10),
    Opcode.WRITE_10: (RW10, 10),
    Opcode.VERIFY_10: (RW10, 10),
    Opcode.WRITE_AND_VERIFY_10: (RW10, 10),
    Opcode.PRE_FETCH_10: (RW10, 10),
    Opcode.SYNCHRONIZE_CACHE_10: (RW10, 10),
    Opcode.WRITE_SAME_10: (RW10, 10),
    Opcode.READ_12: (RW12, 12),
    Opcode.WRITE_12: (RW12, 12),
    Opcode.VERIFY_12: (RW12, 12),
    Opcode.WRITE_AND_VERIFY_12: (RW12, 12),
    Opcode.READ_16: (RW16, 16),
    Opcode.WRITE_16: (RW16, 16),
    Opcode.VERIFY_16: (RW16, 16),
    Opcode.WRITE_AND_VERIFY_16: (RW16, 16),
    Opcode.PRE_FETCH_16: (RW16, 16),
    Opcode.SYNCHRONIZE_CACHE_16: (RW16, 16),
    Opcode.WRITE_SAME_16: (RW16, 16),
    Opcode.ORWRITE_16: (RW16, 16),
}

# Byte 1 flag bits shared by the block commands (SBC-4 5.x).
FUA = 0x08
DPO = 0x10
IMMED = 0x02  # PRE-FETCH, SYNCHRONIZE CACHE
BYTCHK_MASK = 0x06  # VERIFY / WRITE AND VERIFY (2 bits at 2:1)
WS_UNMAP = 0x08
WS_ANCHOR = 0x10
WS_NDOB = 0x01  # WRITE SAME(16) only
PROTECT_MASK = 0xE0  # RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT


@dataclass(frozen=True, slots=True)
class BlockCdb:
    """Any LBA + block count CDB: READ/WRITE(6/10/12/16), VERIFY, ..."""

    opcode: int
    flags: int  # byte 1
    lba: int
    blocks: int
    group: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> BlockCdb:
        if not cdb:
            raise CdbTooShort(-1, 1, 0)
        op = cdb[0]
        if op in (Opcode.READ_6, Opcode.WRITE_6):
            need(cdb, 6)
            lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
            # SBC-4 5.14/5.37: a TRANSFER LENGTH of 0 means 256 blocks.
            return BlockCdb(op, 0, lba, cdb[4] or 256, 0)
        layout = RW_LAYOUT.get(op)
        if layout is None:
            raise invalid_cdb(0)
        st, n = layout
        need(cdb, n)
        _, flags, lba, a, b, _c = st.unpack_from(cdb)
        if st is RW10:
            return BlockCdb(op, flags, lba, b, a & 0x3F)
        return BlockCdb(op, flags, lba, a, b & 0x3F)


@dataclass(frozen=True, slots=True)
class CompareAndWriteCdb:
    """COMPARE AND WRITE (89h), SBC-4 5.3."""

    flags: int
    lba: int
    blocks: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> CompareAndWriteCdb:
        need(cdb, 16)
        return CompareAndWriteCdb(cdb[1], _U64.unpack_from(cdb, 2)[0], cdb[13])


@dataclass(frozen=True, slots=True)
class WriteAtomic16Cdb:
    """WRITE ATOMIC(16) (9Ch), SBC-4 5.48.

    Byte 1: WRPROTECT (7:5), DPO, FUA; bytes 2-9 LBA; bytes 10-11 ATOMIC
    BOUNDARY; bytes 12-13 TRANSFER LENGTH (blocks); byte 14 GROUP NUMBER (5:0).
    Not an ``RW_LAYOUT`` command: its length field is two bytes at offset 12.
    """

    flags: int  # byte 1
    lba: int
    boundary: int
    blocks: int
    group: int

    # Byte offsets of the fields, for sense-key-specific pointers.
    LBA_FIELD = 2
    BOUNDARY_FIELD = 10
    LENGTH_FIELD = 12

    @staticmethod
    def decode(cdb: bytes | memoryview) -> WriteAtomic16Cdb:
        need(cdb, 16)
        _, flags, lba, boundary, blocks, group, _c = _WA16.unpack_from(cdb)
        return WriteAtomic16Cdb(flags, lba, boundary, blocks, group & 0x3F)

    def encode(self, control: int = 0) -> bytes:
        return _WA16.pack(Opcode.WRITE_ATOMIC_16, self.flags, self.lba, self.boundary, self.blocks, self.group,
                          control)


_WA16 = struct.Struct(">BBQHHBB")


@dataclass(frozen=True, slots=True)
class InquiryCdb:
    """INQUIRY (12h), SPC-5 6.6.1."""

    evpd: bool
    page: int
    alloc: int
    cmddt: bool

    @staticmethod
    def decode(cdb: bytes | memoryview) -> InquiryCdb:
        need(cdb, 6)
        return InquiryCdb(bool(cdb[1] & 1), cdb[2], _U16.unpack_from(cdb, 3)[0], bool(cdb[1] & 2))


@dataclass(frozen=True, slots=True)
class ModeSenseCdb:
    """MODE SENSE(6) 1Ah / (10) 5Ah, SPC-5 6.14/6.15."""

    ten: bool
    dbd: bool
    llbaa: bool
    pc: int  # page control: 0 current, 1 changeable, 2 default, 3 saved
    page: int
    subpage: int
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ModeSenseCdb:
        if cdb and cdb[0] == Opcode.MODE_SENSE_10:
            need(cdb, 10)
            alloc, ten = _U16.unpack_from(cdb, 7)[0], True
        else:
            need(cdb, 6)
            alloc, ten = cdb[4], False
        return ModeSenseCdb(
            ten, bool(cdb[1] & 0x08), ten and bool(cdb[1] & 0x10), cdb[2] >> 6, cdb[2] & 0x3F, cdb[3], alloc
        )


@dataclass(frozen=True, slots=True)
class ModeSelectCdb:
    """MODE SELECT(6) 15h / (10) 55h, SPC-5 6.12/6.13."""

    ten: bool
    pf: bool
    sp: bool
    length: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ModeSelectCdb:
        if cdb and cdb[0] == Opcode.MODE_SELECT_10:
            need(cdb, 10)
            return ModeSelectCdb(True, bool(cdb[1] & 0x10), bool(cdb[1] & 1), _U16.unpack_from(cdb, 7)[0])
        need(cdb, 6)
        return ModeSelectCdb(False, bool(cdb[1] & 0x10), bool(cdb[1] & 1), cdb[4])


@dataclass(frozen=True, slots=True)
class ServiceAction16Cdb:
    """SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS (SBC-4 5.20/5.8)."""

    action: int
    lba: int
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ServiceAction16Cdb:
        need(cdb, 16)
        return ServiceAction16Cdb(cdb[1] & 0x1F, _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0])


@dataclass(frozen=True, slots=True)
class ReadCapacity10Cdb:
    """READ CAPACITY(10) 25h, SBC-4 5.19."""

    lba: int
    pmi: bool

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReadCapacity10Cdb:
        need(cdb, 10)
        return ReadCapacity10Cdb(_U32.unpack_from(cdb, 2)[0], bool(cdb[8] & 1))


@dataclass(frozen=True, slots=True)
class UnmapCdb:
    """UNMAP 42h, SBC-4 5.32."""

    anchor: bool
    group: int
    length: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> UnmapCdb:
        need(cdb, 10)
        return UnmapCdb(bool(cdb[1] & 1), cdb[6] & 0x3F, _U16.unpack_from(cdb, 7)[0])


@dataclass(frozen=True, slots=True)
class UnmapDescriptor:
    lba: int
    blocks: int


_UNMAP_DESC = struct.Struct(">QI4x")


def decode_unmap_list(data: bytes | memoryview) -> list[UnmapDescriptor]:
    """UNMAP parameter list (SBC-4 5.32.2): 8-byte header then 16-byte descriptors."""
    if len(data) < 8:
        return []
    data_len = _U16.unpack_from(data, 0)[0]
    bd_len = _U16.unpack_from(data, 2)[0]
    if data_len and data_len + 2 > len(data) or bd_len + 8 > len(data):
        raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
    if bd_len % 16:
        raise invalid_param(2)
    return [UnmapDescriptor(*_UNMAP_DESC.unpack_from(data, off)) for off in range(8, 8 + bd_len, 16)]


@dataclass(frozen=True, slots=True)
class ReportLunsCdb:
    """REPORT LUNS A0h, SPC-5 6.33."""

    select: int
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReportLunsCdb:
        need(cdb, 12)
        return ReportLunsCdb(cdb[2], _U32.unpack_from(cdb, 6)[0])


@dataclass(frozen=True, slots=True)
class RequestSenseCdb:
    """REQUEST SENSE 03h, SPC-5 6.39."""

    desc: bool
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> RequestSenseCdb:
        need(cdb, 6)
        return RequestSenseCdb(bool(cdb[1] & 1), cdb[4])


@dataclass(frozen=True, slots=True)
class ReportOpcodesCdb:
    """REPORT SUPPORTED OPERATION CODES (A3h/0Ch), SPC-5 6.35."""

    rctd: bool
    options: int
    opcode: int
    action: int
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReportOpcodesCdb:
        need(cdb, 12)
        return ReportOpcodesCdb(
            bool(cdb[2] & 0x80), cdb[2] & 0x07, cdb[3], _U16.unpack_from(cdb, 4)[0], _U32.unpack_from(cdb, 6)[0]
        )

    def encode(self) -> bytes:
        return (
            bytes((Opcode.MAINTENANCE_IN, 0x0C, (0x80 if self.rctd else 0) | (self.options & 0x07), self.opcode))
            + _U16.pack(self.action)
            + _U32.pack(self.alloc)
            + bytes(2)
        )


class CommandSupport(IntEnum):
    """The SUPPORT field of one-command REPORT SUPPORTED OPERATION CODES
    parameter data (SPC-5 6.35.3, byte 1 bits 2:0)."""

    NOT_AVAILABLE = 0b000  # the device server cannot tell
    NOT_SUPPORTED = 0b001
    SUPPORTED = 0b011  # as the standard defines it
    SUPPORTED_VENDOR = 0b101  # in a vendor-specific manner


def one_command_support(data: bytes | memoryview) -> CommandSupport | int:
    """SUPPORT of a one-command RSOC answer (reporting option 1, 2 or 3);
    an answer too short to hold it tells nothing (NOT_AVAILABLE)."""
    if len(data) < 2:
        return CommandSupport.NOT_AVAILABLE
    v = data[1] & 0x07
    return CommandSupport(v) if v in CommandSupport._value2member_map_ else v


def supports_service_action(opcode: int, action: int, alloc: int = 64) -> bytes:
    """The RSOC CDB asking about one command with a service action (reporting option 010b)."""
    return ReportOpcodesCdb(False, 2, opcode, action, alloc).encode()


@dataclass(frozen=True, slots=True)
class ReportTmfsCdb:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (A3h/0Dh), SPC-5: REPD
    asks for the extended parameter data; the allocation length must be
    at least 4."""

    repd: bool
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReportTmfsCdb:
        need(cdb, 12)
        return ReportTmfsCdb(bool(cdb[2] & 0x80), _U32.unpack_from(cdb, 6)[0])

    @staticmethod
    def encode(alloc: int = 4, repd: bool = False) -> bytes:
        return bytes((Opcode.MAINTENANCE_IN, 0x0D, 0x80 if repd else 0, 0, 0, 0)) + _U32.pack(alloc) + bytes(2)


@dataclass(frozen=True, slots=True)
class SupportedTmfs:
    """The parameter data of REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
    (SPC-5): byte 0 ATS ATSS CACAS CTSS LURS QTS TRS WAKES (bit 7 to 0),
    byte 1 QUAS QTSS ITNRS (bits 2 to 0), byte 3 the additional data
    length (0Ch with REPD, whose 12 bytes carry the timeouts; none are
    reported here: TMFTMOV 0)."""

    abort_task: bool = False
    abort_task_set: bool = False
    clear_aca: bool = False
    clear_task_set: bool = False
    lu_reset: bool = False
    query_task: bool = False
    target_reset: bool = False
    wakeup: bool = False
    query_unit_attention: bool = False
    query_task_set: bool = False
    it_nexus_reset: bool = False

    _BYTE0 = ("abort_task", "abort_task_set", "clear_aca", "clear_task_set", "lu_reset", "query_task",
              "target_reset", "wakeup")
    _BYTE1 = ("query_unit_attention", "query_task_set", "it_nexus_reset")

    def names(self) -> tuple[str, ...]:
        """The supported functions, by field name, in the data's bit order."""
        return tuple(n for n in self._BYTE0 + self._BYTE1 if getattr(self, n))

    def encode(self, repd: bool = False) -> bytes:
        b0 = sum(0x80 >> i for i, name in enumerate(self._BYTE0) if getattr(self, name))
        b1 = sum(0x04 >> i for i, name in enumerate(self._BYTE1) if getattr(self, name))
        if repd:
            return bytes((b0, b1, 0, 0x0C)) + bytes(12)
        return bytes((b0, b1, 0, 0))

    @staticmethod
    def decode(data: bytes | memoryview) -> SupportedTmfs:
        """From the first 2 bytes (at least 1; a missing byte 1 reads as 0)."""
        if not len(data):
            raise ValueError("empty REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS data")
        b0, b1 = data[0], data[1] if len(data) > 1 else 0
        flags = {name: bool(b0 & (0x80 >> i)) for i, name in enumerate(SupportedTmfs._BYTE0)}
        flags.update({name: bool(b1 & (0x04 >> i)) for i, name in enumerate(SupportedTmfs._BYTE1)})
        return SupportedTmfs(**flags)


@dataclass(frozen=True, slots=True)
class StartStopCdb:
    """START STOP UNIT 1Bh, SBC-4 5.25."""

    immed: bool
    power_condition: int
    loej: bool
    start: bool

    @staticmethod
    def decode(cdb: bytes | memoryview) -> StartStopCdb:
        need(cdb, 6)
        return StartStopCdb(bool(cdb[1] & 1), cdb[4] >> 4, bool(cdb[4] & 2), bool(cdb[4] & 1))


@dataclass(frozen=True, slots=True)
class ReadDefectCdb:
    """READ DEFECT DATA(10) 37h / (12) B7h, SBC-4 5.17/5.18."""

    twelve: bool
    plist: bool
    glist: bool
    fmt: int
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReadDefectCdb:
        if cdb and cdb[0] == 0xB7:
            need(cdb, 12)
            return ReadDefectCdb(True, bool(cdb[1] & 0x10), bool(cdb[1] & 0x08), cdb[1] & 7, _U32.unpack_from(cdb, 6)[0])
        need(cdb, 10)
        return ReadDefectCdb(False, bool(cdb[2] & 0x10), bool(cdb[2] & 0x08), cdb[2] & 7, _U16.unpack_from(cdb, 7)[0])
