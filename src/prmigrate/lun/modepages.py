"""Mode pages of the logical unit (SPC-5 7.5, SBC-4 6.5) and MODE SELECT.

Each page is stored as its full current bytes (header included) with a mask
of the bits MODE SELECT may change; "default" is the page as built, "saved"
is not supported. Table of pages:

| page | name | changeable |
|---|---|---|
| 08h | Caching (SBC-4 6.5.5) | WCE (byte 2 bit 2) |
| 0Ah | Control (SPC-5 7.5.10) | D_SENSE (byte 2 bit 2), SWP (byte 4 bit 3) |
| 1Ch | Informational Exceptions Control (SPC-5 7.5.14) | none |
"""

from __future__ import annotations

from enum import IntEnum

from ..scsi.cdb import invalid_param
from ..scsi.sense import CheckCondition, Sense


class ModePage(IntEnum):
    CACHING = 0x08
    CONTROL = 0x0A
    INFORMATIONAL_EXCEPTIONS = 0x1C
    ALL = 0x3F


class PageControl(IntEnum):
    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


def _caching() -> bytes:
    b = bytearray(20)
    b[0], b[1] = ModePage.CACHING, 18
    b[2] = 0x04  # WCE: the image file is behind the page cache
    return bytes(b)


def _control() -> bytes:
    b = bytearray(12)
    b[0], b[1] = ModePage.CONTROL, 10
    b[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    # TAS = 0: tasks of other nexuses aborted by a task management function
    # leave UA 2F/00 COMMANDS CLEARED BY ANOTHER INITIATOR (SAM-5 5.6).
    b[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
    return bytes(b)


def _iec() -> bytes:
    b = bytearray(12)
    b[0], b[1] = ModePage.INFORMATIONAL_EXCEPTIONS, 10
    b[2] = 0x08  # DEXCPT: informational exceptions disabled
    return bytes(b)


_DEFAULTS: dict[int, bytes] = {
    ModePage.CACHING: _caching(),
    ModePage.CONTROL: _control(),
    ModePage.INFORMATIONAL_EXCEPTIONS: _iec(),
}


def _mask(page: int, **bits: int) -> bytes:
    b = bytearray(len(_DEFAULTS[page]))
    for k, v in bits.items():
        b[int(k[1:])] = v
    return bytes(b)


_CHANGEABLE: dict[int, bytes] = {
    ModePage.CACHING: _mask(ModePage.CACHING, b2=0x04),
    ModePage.CONTROL: _mask(ModePage.CONTROL, b2=0x04, b4=0x08),
    ModePage.INFORMATIONAL_EXCEPTIONS: _mask(ModePage.INFORMATIONAL_EXCEPTIONS),
}

# Ascending page order for "all pages" (SPC-5 6.14: pages in ascending order).
PAGE_ORDER = (ModePage.CACHING, ModePage.CONTROL, ModePage.INFORMATIONAL_EXCEPTIONS)


class ModePages:
    def __init__(self) -> None:
        self.current: dict[int, bytearray] = {p: bytearray(v) for p, v in _DEFAULTS.items()}

    # Named accessors the LU consults on every command that needs them.
    @property
    def wce(self) -> bool:
        return bool(self.current[ModePage.CACHING][2] & 0x04)

    @property
    def d_sense(self) -> bool:
        return bool(self.current[ModePage.CONTROL][2] & 0x04)

    @property
    def swp(self) -> bool:
        return bool(self.current[ModePage.CONTROL][4] & 0x08)

    def page(self, code: int, pc: int) -> bytes:
        if pc == PageControl.CURRENT:
            return bytes(self.current[code])
        if pc == PageControl.CHANGEABLE:
            m = bytearray(_CHANGEABLE[code])
            m[0], m[1] = code, len(m) - 2
            return bytes(m)
        return _DEFAULTS[code]

    def pages(self, code: int, pc: int) -> bytes | None:
        """Pages for MODE SENSE, or None when the page code is unknown."""
        if code == ModePage.ALL:
            return b"".join(self.page(p, pc) for p in PAGE_ORDER)
        if code in self.current:
            return self.page(code, pc)
        return None

    def select(self, data: bytes | memoryview, offset: int) -> bool:
        """Apply MODE SELECT pages starting at ``offset`` of the parameter list.

        Validates everything before changing anything (SPC-5 6.12: a failing
        MODE SELECT changes no parameter). Returns whether something changed.
        Errors point at the parameter list byte.
        """
        staged: dict[int, bytearray] = {}
        off = offset
        n = len(data)
        while off < n:
            if off + 2 > n:
                raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
            code = data[off] & 0x3F
            if data[off] & 0x40:  # SPF: no subpages here
                raise invalid_param(off, 6)
            cur = self.current.get(code)
            if cur is None:
                raise invalid_param(off)
            plen = data[off + 1]
            if plen != len(cur) - 2:
                raise invalid_param(off + 1)
            if off + 2 + plen > n:
                raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
            new = bytearray(data[off : off + 2 + plen])
            new[0] = code  # PS is reserved in MODE SELECT; ignore it
            mask = _CHANGEABLE[code]
            for i in range(2, len(new)):
                if (new[i] ^ cur[i]) & ~mask[i] & 0xFF:
                    raise invalid_param(off + i)
            staged[code] = new
            off += 2 + plen
        changed = False
        for code, new in staged.items():
            if new != self.current[code]:
                self.current[code] = new
                changed = True
        return changed
