"""REPORT TARGET PORT GROUPS (MAINTENANCE IN A3h/0Ah, SPC-5 6.36) and the
asymmetric logical unit access vocabulary it speaks (SPC-5 5.16).

The target reports every target port group it has; this device server
supports only the active/optimized state, so every group is in it, with no
preferred group and no status to report (implicit ALUA, TPGS = 01b in
standard INQUIRY: the state is never changed by SET TARGET PORT GROUPS).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from .cdb import invalid_cdb, need
from .constants import MaintenanceIn, Opcode


class AccessState(IntEnum):
    """ASYMMETRIC ACCESS STATE (SPC-5 6.36, table of asymmetric access states)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    LOGICAL_BLOCK_DEPENDENT = 0x4
    OFFLINE = 0xE
    TRANSITIONING = 0xF


class TpgStatus(IntEnum):
    """STATUS CODE of a target port group descriptor."""

    NONE = 0x00
    ALTERED_BY_SET_TPG = 0x01
    ALTERED_BY_IMPLICIT = 0x02


class RtpgFormat(IntEnum):
    """PARAMETER DATA FORMAT of the CDB (byte 1 bits 7:5)."""

    LENGTH_ONLY = 0b000  # 4-byte header: RETURN DATA LENGTH
    EXTENDED = 0b001  # 8-byte header: + FORMAT TYPE, IMPLICIT TRANSITION TIME


class Tpgs(IntEnum):
    """TPGS field of standard INQUIRY data (byte 5 bits 5:4, SPC-5 6.6.2)."""

    NONE = 0b00
    IMPLICIT = 0b01
    EXPLICIT = 0b10
    BOTH = 0b11


# Which states a descriptor says the group supports (byte 1): T_SUP 7, O_SUP 6,
# LBD_SUP 4, U_SUP 3, S_SUP 2, AN_SUP 1, AO_SUP 0.
_SUPPORT_BIT = {
    AccessState.TRANSITIONING: 7,
    AccessState.OFFLINE: 6,
    AccessState.LOGICAL_BLOCK_DEPENDENT: 4,
    AccessState.UNAVAILABLE: 3,
    AccessState.STANDBY: 2,
    AccessState.ACTIVE_NON_OPTIMIZED: 1,
    AccessState.ACTIVE_OPTIMIZED: 0,
}

_U32 = struct.Struct(">I")
_DESCRIPTOR = struct.Struct(">BBHxBBB")  # PREF|state, support, group, -, status, vendor, port count
_PORT = struct.Struct(">2xH")  # obsolete, RELATIVE TARGET PORT IDENTIFIER


@dataclass(frozen=True, slots=True)
class ReportTpgCdb:
    """The CDB: PARAMETER DATA FORMAT and ALLOCATION LENGTH (bytes 6-9)."""

    fmt: RtpgFormat
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReportTpgCdb:
        need(cdb, 12)
        try:
            fmt = RtpgFormat(cdb[1] >> 5)
        except ValueError:
            raise invalid_cdb(1, 7) from None
        return ReportTpgCdb(fmt, _U32.unpack_from(cdb, 6)[0])

    @staticmethod
    def encode(alloc: int = 1024, fmt: RtpgFormat = RtpgFormat.LENGTH_ONLY) -> bytes:
        return (bytes((Opcode.MAINTENANCE_IN, (fmt << 5) | MaintenanceIn.REPORT_TARGET_PORT_GROUPS, 0, 0, 0, 0))
                + _U32.pack(alloc) + bytes(2))


@dataclass(frozen=True, slots=True)
class TargetPortGroup:
    """One target port group descriptor."""

    group: int  # TARGET PORT GROUP, 1..65535
    ports: tuple[int, ...]  # relative target port identifiers of its ports
    state: AccessState = AccessState.ACTIVE_OPTIMIZED
    supported: frozenset[AccessState] = frozenset({AccessState.ACTIVE_OPTIMIZED})
    pref: bool = False
    status: TpgStatus = TpgStatus.NONE

    def __post_init__(self) -> None:
        if not 0 < self.group <= 0xFFFF:
            raise ValueError(f"target port group {self.group} is not 1..65535")
        if not 0 < len(self.ports) <= 0xFF or not all(0 < p <= 0xFFFF for p in self.ports):
            raise ValueError(f"target ports {self.ports} of group {self.group}")

    def encode(self) -> bytes:
        support = 0
        for s in self.supported:
            support |= 1 << _SUPPORT_BIT[s]
        head = _DESCRIPTOR.pack((0x80 if self.pref else 0) | self.state, support, self.group, self.status, 0,
                                len(self.ports))
        return head + b"".join(_PORT.pack(p) for p in self.ports)

    @staticmethod
    def decode(buf: bytes | memoryview, offset: int = 0) -> tuple[TargetPortGroup, int]:
        """A descriptor at ``offset``; returns it and the offset after it."""
        if len(buf) < offset + _DESCRIPTOR.size:
            raise ValueError("short target port group descriptor")
        b0, support, group, status, _, count = _DESCRIPTOR.unpack_from(buf, offset)
        offset += _DESCRIPTOR.size
        if len(buf) < offset + count * _PORT.size:
            raise ValueError("short target port descriptor list")
        ports = tuple(_PORT.unpack_from(buf, offset + i * _PORT.size)[0] for i in range(count))
        supported = frozenset(s for s, bit in _SUPPORT_BIT.items() if support >> bit & 1)
        tpg = TargetPortGroup(group, ports, AccessState(b0 & 0x0F), supported, bool(b0 & 0x80), TpgStatus(status))
        return tpg, offset + count * _PORT.size


def encode_report(groups: Iterable[TargetPortGroup], fmt: RtpgFormat = RtpgFormat.LENGTH_ONLY,
                  transition_time: int = 0) -> bytes:
    """The full (untruncated) parameter data; RETURN DATA LENGTH counts the
    bytes after its own field (SPC-5 6.36.2)."""
    body = b"".join(g.encode() for g in groups)
    if fmt is RtpgFormat.EXTENDED:
        body = bytes((RtpgFormat.EXTENDED << 4, transition_time & 0xFF, 0, 0)) + body
    return _U32.pack(len(body)) + body


def decode_report(buf: bytes | memoryview) -> list[TargetPortGroup]:
    """Parse length-only or extended parameter data (the header tells which)."""
    if len(buf) < 4:
        raise ValueError("short REPORT TARGET PORT GROUPS data")
    end = min(len(buf), 4 + _U32.unpack_from(buf, 0)[0])
    offset = 4
    if end >= 8 and (buf[4] >> 4) & 0x7 == RtpgFormat.EXTENDED:
        offset = 8
    groups = []
    while offset < end:
        g, offset = TargetPortGroup.decode(buf[:end], offset)
        groups.append(g)
    return groups
