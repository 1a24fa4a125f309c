"""PERSISTENT RESERVE IN/OUT codecs (SPC-5 6.16, 6.17; TransportIDs 7.6.4).

Pure byte layouts: CDBs, PR OUT parameter lists and PR IN parameter data, each a
frozen dataclass with ``decode()`` / ``encode()``. Malformed input raises
``PrDecodeError`` (``PrLengthError`` when a length is wrong); the engine maps
those onto sense data. The rules live in ``prmigrate.lun.pr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .constants import Opcode, PrInAction, PrOutAction, PrType
from .transport_id import PrDecodeError, PrLengthError, TransportId

__all__ = [
    "PrDecodeError",
    "PrLengthError",
    "PrOutCdb",
    "PrInCdb",
    "PrOutParams",
    "RegisterAndMoveParams",
    "ReadKeys",
    "ReadReservation",
    "ReportCapabilities",
    "FullStatusEntry",
    "ReadFullStatus",
    "TYPE_MASK_BITS",
    "pr_out_cdb",
    "pr_in_cdb",
    "pr_out_params",
    "register_and_move_params",
    "BASIC_PARAMS_LEN",
]

BASIC_PARAMS_LEN = 24

# PR OUT CDB (SPC-5 6.17.1): opcode, SA (4:0), scope (7:4) | type (3:0),
# 2 reserved, PARAMETER LIST LENGTH (4), CONTROL.
_OUT_CDB = struct.Struct(">BBBxxIB")
# PR IN CDB (SPC-5 6.16.1): opcode, SA (4:0), 5 reserved, ALLOCATION LENGTH (2), CONTROL.
_IN_CDB = struct.Struct(">BB5xHB")
# Basic PR OUT parameter list (SPC-5 6.17.3): RK, SARK, obsolete (4),
# byte 20 SPEC_I_PT 0x08 | ALL_TG_PT 0x04 | APTPL 0x01, reserved, obsolete (2).
_BASIC = struct.Struct(">QQ4xBx2x")
_U32 = struct.Struct(">I")
# REGISTER AND MOVE parameter list (SPC-5 6.17.4): RK, SARK, reserved,
# byte 17 UNREG 0x02 | APTPL 0x01, RELATIVE TARGET PORT IDENTIFIER, TRANSPORTID LENGTH.
_MOVE = struct.Struct(">QQxBHI")
# PR IN header: PRGENERATION, ADDITIONAL LENGTH.
_IN_HDR = struct.Struct(">II")
# READ RESERVATION descriptor: key, obsolete (4), reserved, scope|type, obsolete (2).
_RESV = struct.Struct(">Q4xxBxx")
# REPORT CAPABILITIES (SPC-5 6.16.4): LENGTH (2) = 8, flags, flags, type mask (2), reserved (2).
_CAPS = struct.Struct(">HBBHxx")
# READ FULL STATUS descriptor head (SPC-5 6.16.5): key, reserved (4),
# byte 12 ALL_TG_PT 0x02 | R_HOLDER 0x01, scope|type, reserved (4),
# RELATIVE TARGET PORT IDENTIFIER, ADDITIONAL DESCRIPTOR LENGTH.
_FULL = struct.Struct(">Q4xBB4xHI")

SPEC_I_PT = 0x08
ALL_TG_PT = 0x04
APTPL = 0x01
UNREG = 0x02

# REPORT CAPABILITIES PERSISTENT RESERVATION TYPE MASK, as one big-endian u16
# (SPC-5 table 190): byte 4 = high byte, byte 5 = low byte.
TYPE_MASK_BITS: dict[PrType, int] = {
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: 0x8000,
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 0x4000,
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 0x2000,
    PrType.EXCLUSIVE_ACCESS: 0x0800,
    PrType.WRITE_EXCLUSIVE: 0x0200,
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 0x0001,
}


def _need(mv: memoryview, n: int, what: str) -> None:
    if len(mv) < n:
        raise PrLengthError(f"{what} needs {n} bytes, got {len(mv)}")


def _u8(value: int, what: str, bits: int = 8) -> int:
    if not 0 <= value < (1 << bits):
        raise PrDecodeError(f"{what} out of range: {value}")
    return value


# --------------------------------------------------------------------------- CDBs


@dataclass(frozen=True, slots=True)
class PrOutCdb:
    """PERSISTENT RESERVE OUT CDB. ``action``/``rtype`` stay ints when not known codes."""

    action: PrOutAction | int
    scope: int = 0
    rtype: PrType | int = PrType.NONE
    param_len: int = BASIC_PARAMS_LEN
    control: int = 0

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> PrOutCdb:
        mv = memoryview(buf)
        _need(mv, _OUT_CDB.size, "PERSISTENT RESERVE OUT CDB")
        op, sa, st, plen, control = _OUT_CDB.unpack_from(mv)
        if op != Opcode.PERSISTENT_RESERVE_OUT:
            raise PrDecodeError(f"opcode {op:#04x} is not PERSISTENT RESERVE OUT")
        sa &= 0x1F
        action: PrOutAction | int = PrOutAction(sa) if sa in PrOutAction._value2member_map_ else sa
        t = st & 0x0F
        rtype: PrType | int = PrType(t) if t in PrType._value2member_map_ else t
        return PrOutCdb(action, st >> 4, rtype, plen, control)

    def encode(self) -> bytes:
        return _OUT_CDB.pack(
            Opcode.PERSISTENT_RESERVE_OUT,
            _u8(int(self.action), "service action", 5),
            (_u8(self.scope, "scope", 4) << 4) | _u8(int(self.rtype), "type", 4),
            _u8(self.param_len, "parameter list length", 32),
            _u8(self.control, "control"),
        )


@dataclass(frozen=True, slots=True)
class PrInCdb:
    """PERSISTENT RESERVE IN CDB."""

    action: PrInAction | int
    alloc_len: int
    control: int = 0

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> PrInCdb:
        mv = memoryview(buf)
        _need(mv, _IN_CDB.size, "PERSISTENT RESERVE IN CDB")
        op, sa, alloc, control = _IN_CDB.unpack_from(mv)
        if op != Opcode.PERSISTENT_RESERVE_IN:
            raise PrDecodeError(f"opcode {op:#04x} is not PERSISTENT RESERVE IN")
        sa &= 0x1F
        action: PrInAction | int = PrInAction(sa) if sa in PrInAction._value2member_map_ else sa
        return PrInCdb(action, alloc, control)

    def encode(self) -> bytes:
        return _IN_CDB.pack(
            Opcode.PERSISTENT_RESERVE_IN,
            _u8(int(self.action), "service action", 5),
            _u8(self.alloc_len, "allocation length", 16),
            _u8(self.control, "control"),
        )


# ------------------------------------------------------------- PR OUT parameters


def _decode_tid_list(mv: memoryview) -> tuple[TransportId, ...]:
    tids: list[TransportId] = []
    off = 0
    while off < len(mv):
        tid, used = TransportId.decode(mv[off:])
        tids.append(tid)
        off += used
    return tuple(tids)


@dataclass(frozen=True, slots=True)
class PrOutParams:
    """Basic PR OUT parameter list (24 bytes) plus the SPEC_I_PT TransportID list."""

    rk: int = 0
    sark: int = 0
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    aptpl: bool = False
    transport_ids: tuple[TransportId, ...] = ()

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> PrOutParams:
        """Decode a whole parameter list. ``PrLengthError`` when the length does not fit."""
        mv = memoryview(buf)
        _need(mv, BASIC_PARAMS_LEN, "PR OUT parameter list")
        rk, sark, flags = _BASIC.unpack_from(mv)
        spec = bool(flags & SPEC_I_PT)
        tids: tuple[TransportId, ...] = ()
        if spec:
            _need(mv, BASIC_PARAMS_LEN + 4, "PR OUT parameter list with SPEC_I_PT")
            (tlen,) = _U32.unpack_from(mv, BASIC_PARAMS_LEN)
            start = BASIC_PARAMS_LEN + 4
            if len(mv) != start + tlen:
                raise PrLengthError(
                    f"TransportID list length {tlen} does not match parameter list ({len(mv)} bytes)"
                )
            tids = _decode_tid_list(mv[start:])
        elif len(mv) != BASIC_PARAMS_LEN:
            raise PrLengthError(f"PR OUT parameter list is {len(mv)} bytes, not 24")
        return PrOutParams(rk, sark, spec, bool(flags & ALL_TG_PT), bool(flags & APTPL), tids)

    def encode(self) -> bytes:
        flags = (
            (SPEC_I_PT if self.spec_i_pt else 0)
            | (ALL_TG_PT if self.all_tg_pt else 0)
            | (APTPL if self.aptpl else 0)
        )
        out = _BASIC.pack(_u8(self.rk, "RK", 64), _u8(self.sark, "SARK", 64), flags)
        if self.spec_i_pt:
            tids = b"".join(t.encode() for t in self.transport_ids)
            out += _U32.pack(len(tids)) + tids
        return out


@dataclass(frozen=True, slots=True)
class RegisterAndMoveParams:
    """REGISTER AND MOVE parameter list (SPC-5 6.17.4)."""

    rk: int
    sark: int
    unreg: bool
    aptpl: bool
    rel_tgt_port: int
    transport_id: TransportId

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> RegisterAndMoveParams:
        mv = memoryview(buf)
        _need(mv, _MOVE.size, "REGISTER AND MOVE parameter list")
        rk, sark, flags, port, tlen = _MOVE.unpack_from(mv)
        if len(mv) < _MOVE.size + tlen:
            raise PrLengthError(
                f"TransportID length {tlen} exceeds the parameter list ({len(mv)} bytes)"
            )
        tid, used = TransportId.decode(mv[_MOVE.size : _MOVE.size + tlen])
        if used != tlen:
            raise PrLengthError(f"TransportID length {tlen} but TransportID is {used} bytes")
        return RegisterAndMoveParams(rk, sark, bool(flags & UNREG), bool(flags & APTPL), port, tid)

    def encode(self) -> bytes:
        tid = self.transport_id.encode()
        flags = (UNREG if self.unreg else 0) | (APTPL if self.aptpl else 0)
        return (
            _MOVE.pack(
                _u8(self.rk, "RK", 64),
                _u8(self.sark, "SARK", 64),
                flags,
                _u8(self.rel_tgt_port, "relative target port", 16),
                len(tid),
            )
            + tid
        )


# -------------------------------------------------------------- PR IN data
# Each decoder accepts a reply truncated by the allocation length: it returns
# what is complete and keeps ADDITIONAL LENGTH (the untruncated size) in
# ``additional_length``; ``truncated`` tells whether something was cut off.


def _header(mv: memoryview, what: str) -> tuple[int, int]:
    _need(mv, _IN_HDR.size, what)
    gen, addl = _IN_HDR.unpack_from(mv)
    return gen, addl


@dataclass(frozen=True, slots=True)
class ReadKeys:
    generation: int
    keys: tuple[int, ...] = ()
    additional_length: int | None = field(default=None, compare=False)

    @property
    def truncated(self) -> bool:
        return self.additional_length is not None and self.additional_length > 8 * len(self.keys)

    def encode(self) -> bytes:
        return _IN_HDR.pack(self.generation, 8 * len(self.keys)) + b"".join(
            k.to_bytes(8, "big") for k in self.keys
        )

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> ReadKeys:
        mv = memoryview(buf)
        gen, addl = _header(mv, "READ KEYS data")
        if addl % 8:
            raise PrDecodeError(f"READ KEYS additional length {addl} is not a multiple of 8")
        avail = min(addl, len(mv) - _IN_HDR.size) // 8
        keys = tuple(int.from_bytes(mv[8 + 8 * i : 16 + 8 * i], "big") for i in range(avail))
        return ReadKeys(gen, keys, addl)


@dataclass(frozen=True, slots=True)
class ReadReservation:
    generation: int
    key: int | None = None  # None: no reservation (additional length 0)
    scope: int = 0
    rtype: PrType | int = PrType.NONE
    additional_length: int | None = field(default=None, compare=False)

    @property
    def truncated(self) -> bool:
        return (
            self.additional_length is not None and self.additional_length > 0 and self.key is None
        )

    def encode(self) -> bytes:
        if self.key is None:
            return _IN_HDR.pack(self.generation, 0)
        st = (_u8(self.scope, "scope", 4) << 4) | _u8(int(self.rtype), "type", 4)
        return _IN_HDR.pack(self.generation, _RESV.size) + _RESV.pack(self.key, st)

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> ReadReservation:
        mv = memoryview(buf)
        gen, addl = _header(mv, "READ RESERVATION data")
        if addl not in (0, _RESV.size):
            raise PrDecodeError(f"READ RESERVATION additional length {addl} is not 0 or 16")
        if addl == 0 or len(mv) < _IN_HDR.size + _RESV.size:
            return ReadReservation(gen, None, 0, PrType.NONE, addl)
        key, st = _RESV.unpack_from(mv, _IN_HDR.size)
        t = st & 0x0F
        rtype: PrType | int = PrType(t) if t in PrType._value2member_map_ else t
        return ReadReservation(gen, key, st >> 4, rtype, addl)


@dataclass(frozen=True, slots=True)
class ReportCapabilities:
    """REPORT CAPABILITIES parameter data (8 bytes, SPC-5 6.16.4)."""

    rlr_c: bool = False
    crh: bool = False
    sip_c: bool = False
    atp_c: bool = False
    ptpl_c: bool = False
    tmv: bool = False
    allow_commands: int = 0
    ptpl_a: bool = False
    type_mask: int = 0  # TYPE_MASK_BITS; bytes 4-5 as a big-endian u16

    LENGTH = 8

    @property
    def types(self) -> frozenset[PrType]:
        return frozenset(t for t, bit in TYPE_MASK_BITS.items() if self.type_mask & bit)

    @staticmethod
    def mask_of(types: object) -> int:
        mask = 0
        for t in types:  # type: ignore[attr-defined]
            mask |= TYPE_MASK_BITS[PrType(t)]
        return mask

    def encode(self) -> bytes:
        b2 = (
            (0x80 if self.rlr_c else 0)
            | (0x10 if self.crh else 0)
            | (0x08 if self.sip_c else 0)
            | (0x04 if self.atp_c else 0)
            | (0x01 if self.ptpl_c else 0)
        )
        b3 = (0x80 if self.tmv else 0) | (_u8(self.allow_commands, "allow commands", 3) << 4)
        b3 |= 0x01 if self.ptpl_a else 0
        return _CAPS.pack(self.LENGTH, b2, b3, _u8(self.type_mask, "type mask", 16))

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> ReportCapabilities:
        mv = memoryview(buf)
        # A truncated reply keeps what is there; missing bytes read as zero.
        _need(mv, 2, "REPORT CAPABILITIES data")
        raw = bytes(mv[: _CAPS.size]).ljust(_CAPS.size, b"\x00")
        _length, b2, b3, mask = _CAPS.unpack(raw)
        return ReportCapabilities(
            rlr_c=bool(b2 & 0x80),
            crh=bool(b2 & 0x10),
            sip_c=bool(b2 & 0x08),
            atp_c=bool(b2 & 0x04),
            ptpl_c=bool(b2 & 0x01),
            tmv=bool(b3 & 0x80),
            allow_commands=(b3 >> 4) & 0x7,
            ptpl_a=bool(b3 & 0x01),
            type_mask=mask,
        )


@dataclass(frozen=True, slots=True)
class FullStatusEntry:
    key: int
    all_tg_pt: bool
    holder: bool
    scope: int
    rtype: PrType | int
    rel_tgt_port: int
    transport_id: TransportId

    def encode(self) -> bytes:
        tid = self.transport_id.encode()
        flags = (0x02 if self.all_tg_pt else 0) | (0x01 if self.holder else 0)
        st = (_u8(self.scope, "scope", 4) << 4) | _u8(int(self.rtype), "type", 4)
        return (
            _FULL.pack(self.key, flags, st, _u8(self.rel_tgt_port, "relative port", 16), len(tid))
            + tid
        )


@dataclass(frozen=True, slots=True)
class ReadFullStatus:
    generation: int
    entries: tuple[FullStatusEntry, ...] = ()
    additional_length: int | None = field(default=None, compare=False)

    @property
    def truncated(self) -> bool:
        if self.additional_length is None:
            return False
        return self.additional_length > len(b"".join(e.encode() for e in self.entries))

    def encode(self) -> bytes:
        body = b"".join(e.encode() for e in self.entries)
        return _IN_HDR.pack(self.generation, len(body)) + body

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> ReadFullStatus:
        mv = memoryview(buf)
        gen, addl = _header(mv, "READ FULL STATUS data")
        end = min(len(mv), _IN_HDR.size + addl)
        off = _IN_HDR.size
        entries: list[FullStatusEntry] = []
        while off + _FULL.size <= end:
            key, flags, st, port, tlen = _FULL.unpack_from(mv, off)
            if off + _FULL.size + tlen > end:
                break  # truncated by the allocation length
            tid, used = TransportId.decode(mv[off + _FULL.size : off + _FULL.size + tlen])
            if used != tlen:
                raise PrDecodeError(f"descriptor length {tlen} but TransportID is {used} bytes")
            t = st & 0x0F
            rtype: PrType | int = PrType(t) if t in PrType._value2member_map_ else t
            entries.append(
                FullStatusEntry(
                    key, bool(flags & 0x02), bool(flags & 0x01), st >> 4, rtype, port, tid
                )
            )
            off += _FULL.size + tlen
        return ReadFullStatus(gen, tuple(entries), addl)


# ------------------------------------------------------------- builders


def pr_out_cdb(
    action: PrOutAction | int,
    rtype: PrType | int = PrType.NONE,
    scope: int = 0,
    param_len: int = BASIC_PARAMS_LEN,
) -> bytes:
    return PrOutCdb(action, scope, rtype, param_len).encode()


def pr_in_cdb(action: PrInAction | int, alloc_len: int = 0xFFFF) -> bytes:
    return PrInCdb(action, alloc_len).encode()


def pr_out_params(
    rk: int = 0,
    sark: int = 0,
    *,
    spec_i_pt: bool = False,
    all_tg_pt: bool = False,
    aptpl: bool = False,
    transport_ids: tuple[TransportId, ...] | list[TransportId] = (),
) -> bytes:
    return PrOutParams(rk, sark, spec_i_pt, all_tg_pt, aptpl, tuple(transport_ids)).encode()


def register_and_move_params(
    rk: int,
    sark: int,
    transport_id: TransportId,
    rel_tgt_port: int = 1,
    *,
    unreg: bool = False,
    aptpl: bool = False,
) -> bytes:
    return RegisterAndMoveParams(rk, sark, unreg, aptpl, rel_tgt_port, transport_id).encode()
