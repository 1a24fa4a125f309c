"""iSCSI TransportIDs (SPC-5 7.6.4.6; RFC 7143 4.2.7 for the port names).

Layout::

    byte 0     FORMAT CODE (7:6) | PROTOCOL IDENTIFIER (3:0) = 5 (iSCSI)
    byte 1     reserved
    bytes 2-3  ADDITIONAL LENGTH (n - 3): >= 20, a multiple of 4
    bytes 4-n  format 00b: iSCSI name, NUL terminated, padded with NULs
               format 01b: "<name>,i,0x<12 hex digits ISID>", NUL terminated

Names compare case-insensitively; ISIDs numerically. A format 00b TransportID
names every initiator port of that initiator (any ISID).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .constants import ProtocolId
from .nexus import Nexus


class PrDecodeError(ValueError):
    """A PR CDB, parameter list, TransportID or PR IN reply is malformed."""


class PrLengthError(PrDecodeError):
    """The buffer is shorter (or longer) than its layout or length fields say."""


class TransportIdFormat(IntEnum):
    """iSCSI TransportID format codes (SPC-5 table 508)."""

    NAME = 0b00
    NAME_AND_ISID = 0b01


_HEADER = struct.Struct(">BxH")
_SEPARATOR = ",i,0x"
MIN_ADDITIONAL_LENGTH = 20
ISID_MASK = 0xFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class TransportId:
    """An iSCSI initiator port (isid set, format 01b) or initiator (format 00b)."""

    name: str
    isid: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "\x00" in self.name or "," in self.name:
            raise PrDecodeError(f"invalid iSCSI name {self.name!r}")
        if self.isid is not None and not 0 <= self.isid <= ISID_MASK:
            raise PrDecodeError(f"ISID out of range: {self.isid!r}")

    @property
    def format(self) -> TransportIdFormat:
        return TransportIdFormat.NAME if self.isid is None else TransportIdFormat.NAME_AND_ISID

    @staticmethod
    def of(nexus: Nexus) -> TransportId:
        """The initiator port of ``nexus`` (format 01b)."""
        return TransportId(nexus.initiator.lower(), nexus.isid)

    def matches(self, nexus: Nexus) -> bool:
        if self.name.lower() != nexus.initiator.lower():
            return False
        return self.isid is None or self.isid == nexus.isid

    def same_port(self, other: TransportId) -> bool:
        """Both name the same initiator port (case-insensitive name, numeric ISID)."""
        return self.name.lower() == other.name.lower() and self.isid == other.isid

    def key(self) -> tuple[str, int | None]:
        """A hashable identity: (lower-case name, ISID)."""
        return (self.name.lower(), self.isid)

    def __str__(self) -> str:
        if self.isid is None:
            return self.name
        return f"{self.name}{_SEPARATOR}{self.isid:012x}"

    def encode(self) -> bytes:
        text = str(self).encode("utf-8") + b"\x00"
        length = max(MIN_ADDITIONAL_LENGTH, (len(text) + 3) & ~3)
        if length > 0xFFFF:
            raise PrDecodeError("iSCSI name too long for a TransportID")
        b0 = (self.format << 6) | ProtocolId.ISCSI
        return _HEADER.pack(b0, length) + text.ljust(length, b"\x00")

    @staticmethod
    def decode(buf: bytes | bytearray | memoryview) -> tuple[TransportId, int]:
        """Decode one TransportID at the start of ``buf``; return it and the bytes consumed."""
        mv = memoryview(buf)
        if len(mv) < _HEADER.size:
            raise PrLengthError(f"TransportID header needs 4 bytes, got {len(mv)}")
        b0, length = _HEADER.unpack_from(mv)
        if b0 & 0x0F != ProtocolId.ISCSI:
            raise PrDecodeError(f"TransportID protocol identifier {b0 & 0x0F} is not iSCSI")
        fmt = b0 >> 6
        if fmt not in (TransportIdFormat.NAME, TransportIdFormat.NAME_AND_ISID):
            raise PrDecodeError(f"unknown iSCSI TransportID format {fmt:#04b}")
        if length < MIN_ADDITIONAL_LENGTH or length % 4:
            raise PrDecodeError(f"iSCSI TransportID additional length {length} invalid")
        end = _HEADER.size + length
        if len(mv) < end:
            raise PrLengthError(f"TransportID needs {end} bytes, got {len(mv)}")
        body = bytes(mv[_HEADER.size : end])
        nul = body.find(b"\x00")
        if nul < 0:
            raise PrDecodeError("iSCSI TransportID name is not NUL terminated")
        try:
            text = body[:nul].decode("utf-8")
        except UnicodeDecodeError as e:
            raise PrDecodeError("iSCSI TransportID name is not UTF-8") from e
        if fmt == TransportIdFormat.NAME:
            if not text or "," in text:
                raise PrDecodeError(f"invalid iSCSI name {text!r}")
            return TransportId(text), end
        idx = text.lower().rfind(_SEPARATOR)
        hexpart = text[idx + len(_SEPARATOR) :] if idx >= 0 else ""
        if idx <= 0 or len(hexpart) != 12:
            raise PrDecodeError(f"format 01b TransportID without a valid ISID: {text!r}")
        try:
            isid = int(hexpart, 16)
        except ValueError as e:
            raise PrDecodeError(f"ISID is not hexadecimal: {hexpart!r}") from e
        name = text[:idx]
        if "," in name:
            raise PrDecodeError(f"invalid iSCSI name {name!r}")
        return TransportId(name, isid), end
