"""iSCSI PDU codec, sans-IO (RFC 7143 11).

Layout of every PDU: a 48-byte Basic Header Segment (BHS), optional
Additional Header Segments (AHS, ``TotalAHSLength`` 4-byte words), an optional
header digest, the data segment (``DataSegmentLength`` bytes, padded to a
multiple of 4) and an optional data digest.

Common BHS fields (RFC 7143 11.2.1)::

    byte 0      .I opcode(6)           I = immediate delivery
    byte 1      F + opcode specific
    bytes 2-3   opcode specific
    byte 4      TotalAHSLength (words)
    bytes 5-7   DataSegmentLength
    bytes 8-15  LUN or opcode specific
    bytes 16-19 Initiator Task Tag
    bytes 20-47 opcode specific

Every PDU type is a frozen, slotted dataclass with ``encode(...) -> bytes``
(BHS + AHS + padded data, digests optional) and ``decode(raw)`` from a
:class:`RawPdu`. :func:`decode_pdu` dispatches on the opcode through one
table. :class:`PduReader` frames a byte stream incrementally into
:class:`RawPdu` values and checks digests; every wire error is a
:class:`ProtocolError` carrying the reject reason the target should send.

The hot data path (SCSI Command in, Data-In / SCSI Response out) may use the
precompiled ``struct.Struct`` objects and :func:`pack_data_in` /
:func:`pack_scsi_response` directly to avoid building dataclasses.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, ClassVar

from .digest import DIGEST_LEN, digest_bytes

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF  # RFC 7143 11.2.1.6 / 11.9: "no tag"
MAX_DATA_SEGMENT = (1 << 24) - 1


class Opcode(IntEnum):
    """RFC 7143 11.2.1.2."""

    # initiator -> target
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    # target -> initiator
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(o for o in Opcode if o < 0x20)
TARGET_OPCODES = frozenset(o for o in Opcode if o >= 0x20)


class RejectReason(IntEnum):
    """RFC 7143 11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class TaskAttribute(IntEnum):
    """SCSI Command ATTR field, RFC 7143 11.3.1.2."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class CommandFlags(IntFlag):
    """SCSI Command byte 1, RFC 7143 11.3.1."""

    FINAL = 0x80
    READ = 0x40
    WRITE = 0x20


class ResponseFlags(IntFlag):
    """SCSI Response byte 1 (o u O U) and Data-In byte 1 (F A O U S)."""

    FINAL = 0x80
    ACKNOWLEDGE = 0x40  # Data-In A bit
    BIDI_OVERFLOW = 0x10  # o
    BIDI_UNDERFLOW = 0x08  # u
    OVERFLOW = 0x04  # O
    UNDERFLOW = 0x02  # U
    STATUS = 0x01  # Data-In S bit


class ScsiResponseCode(IntEnum):
    """SCSI Response byte 2, RFC 7143 11.4.3."""

    COMMAND_COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class TmfFunction(IntEnum):
    """RFC 7143 11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """RFC 7143 11.6.1."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(IntEnum):
    """RFC 7143 11.14.1."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(IntEnum):
    """RFC 7143 11.15.1."""

    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class AsyncEvent(IntEnum):
    """RFC 7143 11.9.1."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUEST = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR = 255


class LoginStatus(IntEnum):
    """Status-Class << 8 | Status-Detail, RFC 7143 11.13.5."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self >> 8

    @property
    def detail(self) -> int:
        return self & 0xFF


class SnackType(IntEnum):
    """RFC 7143 11.16.1."""

    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    R_DATA = 3


class AhsType(IntEnum):
    """RFC 7143 11.2.2.1."""

    EXTENDED_CDB = 1
    BIDI_READ_LENGTH = 2


class ProtocolError(Exception):
    """A PDU violates RFC 7143; ``reason`` is what a Reject PDU would carry.

    ``header`` is the offending BHS when known (a Reject echoes it).
    ``fatal`` means the byte stream cannot be framed any more (the
    connection must be dropped); otherwise the PDU was consumed whole and the
    stream continues after it.
    """

    def __init__(
        self,
        reason: RejectReason,
        message: str,
        header: bytes | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header
        self.fatal = fatal


# --------------------------------------------------------------------------
# Common header

# b0, b1, bytes 2-3, TotalAHSLength<<24 | DataSegmentLength, bytes 8-15, ITT
COMMON = struct.Struct(">BBHI8sI")
# bytes 20-47 per PDU type
SCSI_COMMAND_TAIL = struct.Struct(">III16s")  # EDTL, CmdSN, ExpStatSN, CDB
SCSI_COMMAND = struct.Struct(">BBHIQIIII16s")  # whole BHS, LUN as u64
_SEQ = struct.Struct(">IIIIIII")  # 7 u32 after ITT
_HDR_U32 = struct.Struct(">BBHIQI7I")  # whole BHS with LUN + 7 u32 tail
_U32 = struct.Struct(">I")
_AHS_HDR = struct.Struct(">HB")


def pad_len(n: int) -> int:
    """Bytes of padding after a data segment of ``n`` bytes."""
    return -n & 3


def padded(n: int) -> int:
    return n + (-n & 3)


_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def place_segment(buf: bytearray, offset: int, data: bytes | memoryview) -> None:
    """A data segment (Data-In at the initiator, Data-Out at the target) into
    its command's reassembly buffer at ``offset``. The buffer holds what has
    come, zeros in any gap a later segment fills, never the whole Expected
    Data Transfer Length up front: a command announcing gigabytes allocates
    only the data actually sent for it. The caller checks ``offset`` and the
    length against the EDTL."""
    have = len(buf)
    if offset == have:
        buf += data
        return
    end = offset + len(data)
    if end > have:
        buf.extend(bytes(end - have))
    buf[offset:end] = data


def _pad(n: int) -> bytes:
    return _PADS[n & 3]


@dataclass(frozen=True, slots=True)
class Ahs:
    """One Additional Header Segment (RFC 7143 11.2.2)."""

    type: int
    data: bytes

    def encode(self) -> bytes:
        # AHSLength counts the bytes after the 3-byte header, without padding.
        length = len(self.data) + 1  # the reserved / type-specific byte
        return _AHS_HDR.pack(length, self.type) + b"\0" + self.data + _pad(length + 3)

    @staticmethod
    def decode_all(buf: bytes | memoryview) -> tuple[Ahs, ...]:
        out: list[Ahs] = []
        off = 0
        buf = memoryview(buf)
        while off < len(buf):
            if off + 4 > len(buf):
                raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "truncated AHS")
            length, typ = _AHS_HDR.unpack_from(buf, off)
            if length < 1 or off + 3 + length > len(buf):
                raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "AHS length out of bounds")
            out.append(Ahs(typ, bytes(buf[off + 4 : off + 3 + length])))
            off += padded(3 + length)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class RawPdu:
    """One framed PDU: BHS (48 bytes), AHS bytes and data segment (no padding)."""

    bhs: bytes
    ahs: bytes = b""
    data: bytes = b""

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def itt(self) -> int:
        return int.from_bytes(self.bhs[16:20], "big")


def frame_into(
    out: list[Any],
    bhs: bytes | bytearray,
    data: bytes | bytearray | memoryview = b"",
    header_digest: bool = False,
    data_digest: bool = False,
    ahs: bytes = b"",
) -> None:
    """Append one PDU's wire parts to ``out`` (RFC 7143 10.2.1 PDU layout,
    13.1 digests): BHS (DataSegmentLength / TotalAHSLength already set),
    AHS, header digest (over BHS + AHS), the data segment, its pad to a
    multiple of 4 bytes, the data digest (over data + pad). The one place
    PDU framing is written: ``assemble``, the target connection's answers
    and its read fast path all frame through here."""
    out.append(bhs)
    if ahs:
        out.append(ahs)
    if header_digest:
        out.append(digest_bytes(bhs, ahs))
    n = len(data)
    if n:
        out.append(data)
        pad = _PADS[n & 3]
        if pad:
            out.append(pad)
        if data_digest:
            out.append(digest_bytes(data, pad))


def assemble(
    bhs: bytes | bytearray,
    data: bytes | bytearray | memoryview = b"",
    ahs: bytes = b"",
    header_digest: bool = False,
    data_digest: bool = False,
) -> bytes:
    """One PDU's bytes (``frame_into`` joined)."""
    parts: list[bytes | bytearray | memoryview] = []
    frame_into(parts, bhs, data, header_digest, data_digest, ahs)
    return b"".join(parts)


def _lengths(ahs: bytes, data_len: int) -> int:
    if len(ahs) & 3:
        raise ValueError("AHS must be a multiple of 4 bytes")
    if data_len > MAX_DATA_SEGMENT:
        raise ValueError("data segment too long")
    return (len(ahs) // 4) << 24 | data_len


def _lun8(lun: int) -> bytes:
    return lun.to_bytes(8, "big")


def encode_lun(lun: int) -> int:
    """SAM LUN number -> 64-bit LUN field (peripheral or flat addressing)."""
    if lun < 256:
        return lun << 48
    if lun < 0x4000:
        return (0x4000 | lun) << 48
    raise ValueError(f"LUN {lun} needs extended addressing")


def decode_lun(field_: int) -> int:
    """64-bit LUN field -> LUN number (peripheral and flat addressing)."""
    top = field_ >> 48
    method = top >> 14
    if method == 0:
        return top & 0xFF if not (top >> 8) & 0x3F else -1  # bus != 0: not a LUN we serve
    if method == 1:
        return top & 0x3FFF
    return -1


# --------------------------------------------------------------------------
# Typed PDUs


class Pdu:
    """Base of the typed PDU views: ``OPCODE``, ``encode``, ``decode``."""

    __slots__ = ()
    OPCODE: ClassVar[Opcode]

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, raw: RawPdu) -> Pdu:
        raise NotImplementedError


def _b0(opcode: int, immediate: bool) -> int:
    return opcode | (0x40 if immediate else 0)


@dataclass(frozen=True, slots=True)
class ScsiCommand(Pdu):
    """RFC 7143 11.3."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    itt: int
    lun: int  # LUN number (encoded with encode_lun)
    cdb: bytes
    cmdsn: int
    exp_statsn: int = 0
    expected_length: int = 0
    read: bool = False
    write: bool = False
    final: bool = True
    attr: TaskAttribute = TaskAttribute.SIMPLE
    immediate: bool = False
    data: bytes = b""
    ahs: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        cdb = self.cdb
        ahs = self.ahs
        if len(cdb) > 16 and not ahs:
            ahs = Ahs(AhsType.EXTENDED_CDB, cdb[16:]).encode()
        b1 = (0x80 if self.final else 0) | (0x40 if self.read else 0) | (0x20 if self.write else 0)
        b1 |= self.attr & 7
        bhs = SCSI_COMMAND.pack(
            _b0(Opcode.SCSI_COMMAND, self.immediate),
            b1,
            0,
            _lengths(ahs, len(self.data)),
            encode_lun(self.lun),
            self.itt,
            self.expected_length,
            self.cmdsn,
            self.exp_statsn,
            cdb[:16].ljust(16, b"\0"),
        )
        return assemble(bhs, self.data, ahs, header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> ScsiCommand:
        b0, b1, _, _, lun, itt, edtl, cmdsn, expstat, cdb = SCSI_COMMAND.unpack_from(raw.bhs)
        for a in Ahs.decode_all(raw.ahs):
            if a.type == AhsType.EXTENDED_CDB:
                cdb = cdb + a.data
        return cls(
            itt, decode_lun(lun), cdb, cmdsn, expstat, edtl, bool(b1 & 0x40), bool(b1 & 0x20),
            bool(b1 & 0x80), TaskAttribute(b1 & 7) if b1 & 7 <= 4 else TaskAttribute.SIMPLE,
            bool(b0 & 0x40), raw.data, raw.ahs,
        )


def pack_scsi_response(
    itt: int,
    status: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    flags: int = 0,
    residual: int = 0,
    data: bytes | bytearray | memoryview = b"",
    response: int = 0,
    exp_datasn: int = 0,
) -> bytes:
    """SCSI Response BHS (RFC 7143 11.4); ``data`` is the data segment (sense)."""
    return _HDR_U32.pack(
        Opcode.SCSI_RESPONSE, 0x80 | flags, response << 8 | status, len(data), 0, itt,
        0, statsn, expcmdsn, maxcmdsn, exp_datasn, 0, residual,
    )


def sense_segment(sense: bytes) -> bytes:
    """SCSI Response data segment: 2-byte SenseLength + sense data (11.4.7)."""
    return len(sense).to_bytes(2, "big") + sense if sense else b""


@dataclass(frozen=True, slots=True)
class ScsiResponse(Pdu):
    """RFC 7143 11.4."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    itt: int
    status: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    flags: int = 0  # ResponseFlags o u O U
    residual: int = 0
    bidi_residual: int = 0
    response: int = ScsiResponseCode.COMMAND_COMPLETED
    exp_datasn: int = 0
    snack_tag: int = 0
    data: bytes = b""  # SenseLength + sense (+ response data)

    @property
    def sense(self) -> bytes:
        if len(self.data) < 2:
            return b""
        n = int.from_bytes(self.data[:2], "big")
        return self.data[2 : 2 + n]

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.SCSI_RESPONSE, 0x80 | (self.flags & 0x1E), self.response << 8 | self.status,
            len(self.data), 0, self.itt, self.snack_tag, self.statsn, self.expcmdsn,
            self.maxcmdsn, self.exp_datasn, self.bidi_residual, self.residual,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> ScsiResponse:
        _, b1, b23, _, _, itt, snack, statsn, exp, mx, expd, bidi, res = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, b23 & 0xFF, statsn, exp, mx, b1 & 0x1E, res, bidi, b23 >> 8, expd, snack, raw.data)


def pack_data_in(
    itt: int,
    lun_field: int,
    datasn: int,
    offset: int,
    length: int,
    final: bool,
    status: int | None = None,
    statsn: int = 0,
    expcmdsn: int = 0,
    maxcmdsn: int = 0,
    flags: int = 0,
    residual: int = 0,
    ttt: int = RESERVED_TAG,
) -> bytes:
    """Data-In BHS (RFC 7143 11.7). ``status`` not None sets the S bit
    (phase collapse: requires ``final``); then StatSN is meaningful."""
    b1 = 0x80 if final else 0
    if status is not None:
        b1 |= 0x01 | (flags & 0x06)
        st = status
    else:
        st = 0
        statsn = 0
        residual = 0
    return _HDR_U32.pack(
        Opcode.DATA_IN, b1 | (flags & 0x40), st, length, lun_field, itt,
        ttt, statsn, expcmdsn, maxcmdsn, datasn, offset, residual,
    )


@dataclass(frozen=True, slots=True)
class DataIn(Pdu):
    """RFC 7143 11.7."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    itt: int
    datasn: int
    offset: int
    data: bytes
    final: bool = True
    status: int | None = None  # not None: S bit
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    flags: int = 0  # O U A
    residual: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = pack_data_in(
            self.itt, encode_lun(self.lun) if self.flags & ResponseFlags.ACKNOWLEDGE else 0,
            self.datasn, self.offset, len(self.data), self.final, self.status, self.statsn,
            self.expcmdsn, self.maxcmdsn, self.flags, self.residual, self.ttt,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> DataIn:
        _, b1, b23, _, lun, itt, ttt, statsn, exp, mx, dsn, off, res = _HDR_U32.unpack_from(raw.bhs)
        s = bool(b1 & 1)
        return cls(
            itt, dsn, off, raw.data, bool(b1 & 0x80), (b23 & 0xFF) if s else None, statsn,
            exp, mx, b1 & 0x46, res, decode_lun(lun), ttt,
        )


@dataclass(frozen=True, slots=True)
class DataOut(Pdu):
    """RFC 7143 11.8."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    itt: int
    ttt: int
    datasn: int
    offset: int
    data: bytes
    final: bool = True
    exp_statsn: int = 0
    lun: int = 0

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.DATA_OUT, 0x80 if self.final else 0, 0, len(self.data), encode_lun(self.lun),
            self.itt, self.ttt, 0, self.exp_statsn, 0, self.datasn, self.offset, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> DataOut:
        _, b1, _, _, lun, itt, ttt, _, exps, _, dsn, off, _ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, ttt, dsn, off, raw.data, bool(b1 & 0x80), exps, decode_lun(lun))


@dataclass(frozen=True, slots=True)
class R2T(Pdu):
    """RFC 7143 11.8."""

    OPCODE: ClassVar[Opcode] = Opcode.R2T
    itt: int
    ttt: int
    r2tsn: int
    offset: int
    length: int
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    lun: int = 0

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.R2T, 0x80, 0, 0, encode_lun(self.lun), self.itt, self.ttt, self.statsn,
            self.expcmdsn, self.maxcmdsn, self.r2tsn, self.offset, self.length,
        )
        return assemble(bhs, b"", b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> R2T:
        _, _, _, _, lun, itt, ttt, statsn, exp, mx, sn, off, ln = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, ttt, sn, off, ln, statsn, exp, mx, decode_lun(lun))


@dataclass(frozen=True, slots=True)
class NopOut(Pdu):
    """RFC 7143 11.18. ``itt`` RESERVED_TAG = answer to a NOP-In (no reply)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    itt: int
    cmdsn: int
    exp_statsn: int = 0
    ttt: int = RESERVED_TAG
    lun: int = 0
    immediate: bool = True
    data: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            _b0(Opcode.NOP_OUT, self.immediate), 0x80, 0, len(self.data), encode_lun(self.lun),
            self.itt, self.ttt, self.cmdsn, self.exp_statsn, 0, 0, 0, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> NopOut:
        b0, _, _, _, lun, itt, ttt, cmdsn, exps, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, cmdsn, exps, ttt, decode_lun(lun), bool(b0 & 0x40), raw.data)


@dataclass(frozen=True, slots=True)
class NopIn(Pdu):
    """RFC 7143 11.19. ``ttt`` != RESERVED_TAG asks the initiator for a NOP-Out."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    lun: int = 0
    data: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.NOP_IN, 0x80, 0, len(self.data), encode_lun(self.lun), self.itt, self.ttt,
            self.statsn, self.expcmdsn, self.maxcmdsn, 0, 0, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> NopIn:
        _, _, _, _, lun, itt, ttt, statsn, exp, mx, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, ttt, statsn, exp, mx, decode_lun(lun), raw.data)


@dataclass(frozen=True, slots=True)
class TaskMgmtRequest(Pdu):
    """RFC 7143 11.5."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    itt: int
    function: int
    cmdsn: int
    exp_statsn: int = 0
    lun: int = 0
    referenced_itt: int = RESERVED_TAG
    ref_cmdsn: int = 0
    exp_datasn: int = 0
    immediate: bool = True

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            _b0(Opcode.TASK_MGMT_REQUEST, self.immediate), 0x80 | (self.function & 0x7F), 0, 0,
            encode_lun(self.lun), self.itt, self.referenced_itt, self.cmdsn, self.exp_statsn,
            self.ref_cmdsn, self.exp_datasn, 0, 0,
        )
        return assemble(bhs, b"", b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> TaskMgmtRequest:
        b0, b1, _, _, lun, itt, rtt, cmdsn, exps, refsn, expd, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, b1 & 0x7F, cmdsn, exps, decode_lun(lun), rtt, refsn, expd, bool(b0 & 0x40))


@dataclass(frozen=True, slots=True)
class TaskMgmtResponse(Pdu):
    """RFC 7143 11.6."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    itt: int
    response: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.TASK_MGMT_RESPONSE, 0x80, self.response << 8, 0, 0, self.itt, 0, self.statsn,
            self.expcmdsn, self.maxcmdsn, 0, 0, 0,
        )
        return assemble(bhs, b"", b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> TaskMgmtResponse:
        _, _, b23, _, _, itt, _, statsn, exp, mx, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, b23 >> 8, statsn, exp, mx)


_LOGIN = struct.Struct(">BBBBI6sHIHHII16s")


@dataclass(frozen=True, slots=True)
class LoginRequest(Pdu):
    """RFC 7143 11.12. Byte 1: T C . . CSG(2) NSG(2)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    isid: int
    tsih: int
    itt: int
    cid: int
    cmdsn: int
    exp_statsn: int
    csg: int
    nsg: int
    transit: bool
    cont: bool = False
    version_max: int = 0
    version_min: int = 0
    data: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        b1 = (0x80 if self.transit else 0) | (0x40 if self.cont else 0)
        b1 |= (self.csg & 3) << 2 | (self.nsg & 3 if self.transit else 0)
        bhs = _LOGIN.pack(
            0x40 | Opcode.LOGIN_REQUEST, b1, self.version_max, self.version_min,
            _lengths(b"", len(self.data)), self.isid.to_bytes(6, "big"), self.tsih, self.itt,
            self.cid, 0, self.cmdsn, self.exp_statsn, b"",
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> LoginRequest:
        _, b1, vmax, vmin, _, isid, tsih, itt, cid, _, cmdsn, exps, _ = _LOGIN.unpack_from(raw.bhs)
        return cls(
            int.from_bytes(isid, "big"), tsih, itt, cid, cmdsn, exps, (b1 >> 2) & 3, b1 & 3,
            bool(b1 & 0x80), bool(b1 & 0x40), vmax, vmin, raw.data,
        )


_LOGIN_RSP = struct.Struct(">BBBBI6sHIIIIIBB10s")


@dataclass(frozen=True, slots=True)
class LoginResponse(Pdu):
    """RFC 7143 11.13."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    isid: int
    tsih: int
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    csg: int
    nsg: int
    transit: bool
    status: int = LoginStatus.SUCCESS
    cont: bool = False
    version_max: int = 0
    version_active: int = 0
    data: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        b1 = (0x80 if self.transit else 0) | (0x40 if self.cont else 0)
        b1 |= (self.csg & 3) << 2 | (self.nsg & 3 if self.transit else 0)
        bhs = _LOGIN_RSP.pack(
            Opcode.LOGIN_RESPONSE, b1, self.version_max, self.version_active,
            _lengths(b"", len(self.data)), self.isid.to_bytes(6, "big"), self.tsih, self.itt, 0,
            self.statsn, self.expcmdsn, self.maxcmdsn, self.status >> 8, self.status & 0xFF, b"",
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> LoginResponse:
        (_, b1, vmax, vact, _, isid, tsih, itt, _, statsn, exp, mx, sc, sd, _) = _LOGIN_RSP.unpack_from(raw.bhs)
        return cls(
            int.from_bytes(isid, "big"), tsih, itt, statsn, exp, mx, (b1 >> 2) & 3, b1 & 3,
            bool(b1 & 0x80), sc << 8 | sd, bool(b1 & 0x40), vmax, vact, raw.data,
        )


@dataclass(frozen=True, slots=True)
class TextRequest(Pdu):
    """RFC 7143 11.10."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    itt: int
    cmdsn: int
    exp_statsn: int = 0
    ttt: int = RESERVED_TAG
    final: bool = True
    cont: bool = False
    lun: int = 0
    immediate: bool = False
    data: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        b1 = (0x80 if self.final else 0) | (0x40 if self.cont else 0)
        bhs = _HDR_U32.pack(
            _b0(Opcode.TEXT_REQUEST, self.immediate), b1, 0, len(self.data), encode_lun(self.lun),
            self.itt, self.ttt, self.cmdsn, self.exp_statsn, 0, 0, 0, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> TextRequest:
        b0, b1, _, _, lun, itt, ttt, cmdsn, exps, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, cmdsn, exps, ttt, bool(b1 & 0x80), bool(b1 & 0x40), decode_lun(lun), bool(b0 & 0x40), raw.data)


@dataclass(frozen=True, slots=True)
class TextResponse(Pdu):
    """RFC 7143 11.11."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    ttt: int = RESERVED_TAG
    final: bool = True
    cont: bool = False
    lun: int = 0
    data: bytes = b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        b1 = (0x80 if self.final else 0) | (0x40 if self.cont else 0)
        bhs = _HDR_U32.pack(
            Opcode.TEXT_RESPONSE, b1, 0, len(self.data), encode_lun(self.lun), self.itt, self.ttt,
            self.statsn, self.expcmdsn, self.maxcmdsn, 0, 0, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> TextResponse:
        _, b1, _, _, lun, itt, ttt, statsn, exp, mx, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, statsn, exp, mx, ttt, bool(b1 & 0x80), bool(b1 & 0x40), decode_lun(lun), raw.data)


_LOGOUT_REQ = struct.Struct(">BBHI8sIHHII16s")


@dataclass(frozen=True, slots=True)
class LogoutRequest(Pdu):
    """RFC 7143 11.14."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    itt: int
    reason: int
    cmdsn: int
    exp_statsn: int = 0
    cid: int = 0
    immediate: bool = True

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _LOGOUT_REQ.pack(
            _b0(Opcode.LOGOUT_REQUEST, self.immediate), 0x80 | (self.reason & 0x7F), 0, 0, b"",
            self.itt, self.cid, 0, self.cmdsn, self.exp_statsn, b"",
        )
        return assemble(bhs, b"", b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> LogoutRequest:
        b0, b1, _, _, _, itt, cid, _, cmdsn, exps, _ = _LOGOUT_REQ.unpack_from(raw.bhs)
        return cls(itt, b1 & 0x7F, cmdsn, exps, cid, bool(b0 & 0x40))


_LOGOUT_RSP = struct.Struct(">BBHI8sIIIIIIHHI")


@dataclass(frozen=True, slots=True)
class LogoutResponse(Pdu):
    """RFC 7143 11.15."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    itt: int
    response: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    time2wait: int = 0
    time2retain: int = 0

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _LOGOUT_RSP.pack(
            Opcode.LOGOUT_RESPONSE, 0x80, self.response << 8, 0, b"", self.itt, 0, self.statsn,
            self.expcmdsn, self.maxcmdsn, 0, self.time2wait, self.time2retain, 0,
        )
        return assemble(bhs, b"", b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> LogoutResponse:
        _, _, b23, _, _, itt, _, statsn, exp, mx, _, t2w, t2r, _ = _LOGOUT_RSP.unpack_from(raw.bhs)
        return cls(itt, b23 >> 8, statsn, exp, mx, t2w, t2r)



_ASYNC = struct.Struct(">BBHIQIIIIIBBHHHI")


@dataclass(frozen=True, slots=True)
class AsyncMessage(Pdu):
    """RFC 7143 11.9. For LOGOUT_REQUEST, parameter3 is Time2Wait seconds."""

    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    event: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    lun: int = 0
    data: bytes = b""  # sense data + iSCSI event data for SCSI_ASYNC_EVENT

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _ASYNC.pack(
            Opcode.ASYNC_MESSAGE, 0x80, 0, len(self.data), encode_lun(self.lun), RESERVED_TAG,
            RESERVED_TAG, self.statsn, self.expcmdsn, self.maxcmdsn, self.event, self.vcode,
            self.parameter1, self.parameter2, self.parameter3, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> AsyncMessage:
        (_, _, _, _, lun, _, _, statsn, exp, mx, ev, vc, p1, p2, p3, _) = _ASYNC.unpack_from(raw.bhs)
        return cls(ev, statsn, exp, mx, vc, p1, p2, p3, decode_lun(lun), raw.data)


@dataclass(frozen=True, slots=True)
class Reject(Pdu):
    """RFC 7143 11.17. ``data`` is the complete header of the rejected PDU."""

    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    reason: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    data: bytes = b""
    datasn: int = 0

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.REJECT, 0x80, self.reason << 8, len(self.data), 0, RESERVED_TAG, 0,
            self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn, 0, 0,
        )
        return assemble(bhs, self.data, b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> Reject:
        _, _, b23, _, _, _, _, statsn, exp, mx, dsn, *_ = _HDR_U32.unpack_from(raw.bhs)
        return cls(b23 >> 8, statsn, exp, mx, raw.data, dsn)


@dataclass(frozen=True, slots=True)
class SnackRequest(Pdu):
    """RFC 7143 11.16 (only decoded: ErrorRecoveryLevel 0 rejects SNACKs)."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    itt: int
    type: int
    ttt: int = RESERVED_TAG
    exp_statsn: int = 0
    begrun: int = 0
    runlength: int = 0
    lun: int = 0

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        bhs = _HDR_U32.pack(
            Opcode.SNACK_REQUEST, 0x80 | (self.type & 0xF), 0, 0, encode_lun(self.lun), self.itt,
            self.ttt, 0, self.exp_statsn, 0, 0, self.begrun, self.runlength,
        )
        return assemble(bhs, b"", b"", header_digest, data_digest)

    @classmethod
    def decode(cls, raw: RawPdu) -> SnackRequest:
        _, b1, _, _, lun, itt, ttt, _, exps, _, _, beg, run = _HDR_U32.unpack_from(raw.bhs)
        return cls(itt, b1 & 0xF, ttt, exps, beg, run, decode_lun(lun))


PDU_TYPES: dict[int, type[Pdu]] = {
    cls.OPCODE: cls
    for cls in (
        ScsiCommand, ScsiResponse, DataIn, DataOut, R2T, NopOut, NopIn, TaskMgmtRequest,
        TaskMgmtResponse, LoginRequest, LoginResponse, TextRequest, TextResponse,
        LogoutRequest, LogoutResponse, AsyncMessage, Reject, SnackRequest,
    )
}


def decode_pdu(raw: RawPdu) -> Pdu:
    """Typed view of a framed PDU; unknown opcodes raise ProtocolError."""
    cls = PDU_TYPES.get(raw.opcode)
    if cls is None:
        raise ProtocolError(
            RejectReason.COMMAND_NOT_SUPPORTED, f"unknown opcode 0x{raw.opcode:02x}", raw.bhs
        )
    try:
        return cls.decode(raw)
    except (struct.error, ValueError) as exc:
        raise ProtocolError(RejectReason.INVALID_PDU_FIELD, str(exc), raw.bhs) from exc


# --------------------------------------------------------------------------
# Framing


@dataclass(slots=True)
class PduReader:
    """Incremental framer: ``feed(bytes)`` -> complete :class:`RawPdu` values.

    ``header_digest`` / ``data_digest`` switch on after login; when on, the
    digest after the header / data is checked and stripped. A data segment
    longer than ``max_data_length`` (our MaxRecvDataSegmentLength) is a
    fatal ProtocolError: the stream cannot be trusted. A data digest error is
    not fatal: the PDU is skipped and the error raised; call
    :meth:`next_pdu` again to continue with the bytes that followed.
    """

    header_digest: bool = False
    data_digest: bool = False
    max_data_length: int = 8192
    max_ahs_length: int = 1020
    _buf: bytearray = field(default_factory=bytearray)
    _pos: int = 0
    _failed: bool = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; take PDUs out with :meth:`next_pdu` or iteration."""
        if self._failed:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def window(self) -> tuple[bytearray, int]:
        """(buffer, position of the next unread byte), for a caller that parses
        a run of PDUs in place (the target's read fast path) and then calls
        :meth:`consumed`. An empty window after a fatal error."""
        if self._failed:
            return bytearray(), 0
        return self._buf, self._pos

    def consumed(self, pos: int) -> None:
        """Everything before ``pos`` of :meth:`window`'s buffer was taken."""
        self._pos = pos

    def missing(self) -> int:
        """How many more bytes the PDU at the head needs before
        :meth:`next_pdu` can return it: 0 when it is whole, and also when
        its header is one that :meth:`next_pdu` refuses (so that it raises)
        or the stream has failed. A caller with nothing to do until a whole
        PDU is in (a write's BHS read before its data) checks this first."""
        if self._failed:
            return 0
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return BHS_LEN - avail
        word = _U32.unpack_from(buf, pos + 4)[0]
        ahs_len = (word >> 24) * 4
        dlen = word & 0xFFFFFF
        if ahs_len > self.max_ahs_length or dlen > self.max_data_length:
            return 0
        total = BHS_LEN + ahs_len + dlen + (-dlen & 3)
        if self.header_digest:
            total += DIGEST_LEN
        if self.data_digest and dlen:
            total += DIGEST_LEN
        return total - avail if avail < total else 0

    def __iter__(self) -> Iterator[RawPdu]:
        """Every complete PDU buffered; a ProtocolError ends the iteration."""
        while (raw := self.next_pdu()) is not None:
            yield raw

    def next_pdu(self) -> RawPdu | None:
        """The next complete PDU, None when more bytes are needed.

        Raises ProtocolError: non-fatal ones (data digest error) consumed the
        bad PDU and the next call continues after it; after a fatal one the
        reader refuses further input.
        """
        if self._failed:
            raise ProtocolError(RejectReason.PROTOCOL_ERROR, "stream already failed", fatal=True)
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        word = int.from_bytes(buf[pos + 4 : pos + 8], "big")
        ahs_len = (word >> 24) * 4
        dlen = word & 0xFFFFFF
        if ahs_len > self.max_ahs_length:
            self._failed = True
            raise ProtocolError(
                RejectReason.PROTOCOL_ERROR, f"AHS of {ahs_len} bytes", bytes(buf[pos : pos + BHS_LEN]), fatal=True
            )
        if dlen > self.max_data_length:
            self._failed = True
            raise ProtocolError(
                RejectReason.PROTOCOL_ERROR,
                f"data segment of {dlen} bytes exceeds {self.max_data_length}",
                bytes(buf[pos : pos + BHS_LEN]), fatal=True,
            )
        hd = DIGEST_LEN if self.header_digest else 0
        dd = DIGEST_LEN if self.data_digest and dlen else 0
        hlen = BHS_LEN + ahs_len
        plen = dlen + (-dlen & 3)
        total = hlen + hd + plen + dd
        if avail < total:
            return None
        bhs = bytes(buf[pos : pos + BHS_LEN])
        ahs = bytes(buf[pos + BHS_LEN : pos + hlen]) if ahs_len else b""
        if hd:
            got = bytes(buf[pos + hlen : pos + hlen + hd])
            if digest_bytes(bytes(buf[pos : pos + hlen])) != got:
                self._failed = True
                raise ProtocolError(RejectReason.PROTOCOL_ERROR, "header digest error", bhs, fatal=True)
        dstart = pos + hlen + hd
        self._pos = pos + total
        if not dlen:
            return RawPdu(bhs, ahs, b"")
        if dd:
            seg = bytes(buf[dstart : dstart + plen])
            if digest_bytes(seg) != bytes(buf[dstart + plen : dstart + plen + dd]):
                raise ProtocolError(RejectReason.DATA_DIGEST_ERROR, "data digest error", bhs)
            data = seg[:dlen] if plen != dlen else seg
        else:
            data = bytes(buf[dstart : dstart + dlen])
        return RawPdu(bhs, ahs, data)


def frame_all(data: bytes, **kw: object) -> list[RawPdu]:
    """Convenience: frame a complete byte string (tests, tools)."""
    reader = PduReader(**kw)  # type: ignore[arg-type]
    reader.feed(data)
    return list(reader)


def encode_reject(
    reason: RejectReason, header: bytes, statsn: int, expcmdsn: int, maxcmdsn: int,
    header_digest: bool = False, data_digest: bool = False,
) -> bytes:
    return Reject(reason, statsn, expcmdsn, maxcmdsn, bytes(header[:BHS_LEN])).encode(header_digest, data_digest)

