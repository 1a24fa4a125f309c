"""SANITIZE (48h), SBC-4 5.30, over the file-backed block store.

CDB: byte 1 IMMED 80h, reserved 40h, AUSE 20h, SERVICE ACTION bits 4:0;
bytes 2-6 reserved; bytes 7-8 PARAMETER LIST LENGTH; byte 9 CONTROL.

| action | parameter list | what the store does |
|---|---|---|
| 01h OVERWRITE | 4-byte header + pattern (1..block size bytes) | every block written with the pattern (inverted between passes with INVERT), OVERWRITE COUNT passes |
| 02h BLOCK ERASE | none (length 0) | the whole LU deallocated: reads return zeros (LBPRZ), GET LBA STATUS says deallocated |
| 03h CRYPTOGRAPHIC ERASE | none | same as BLOCK ERASE: the image is not encrypted, so there is no key to change; what the command promises (the old data can no longer be read) is what a deallocation gives |
| 1Fh EXIT FAILURE MODE | none | nothing (see below) |

Checks, all before anything is written (libiscsi test_sanitize_*.c pins the
sense codes: every one is INVALID FIELD IN CDB, including the OVERWRITE
header fields, which the suite sends as parameter data):

- a reserved CDB bit or byte set, or an unknown service action;
- OVERWRITE: parameter list length <= 4 or > block size + 4, OVERWRITE
  COUNT 0, INITIALIZATION PATTERN LENGTH 0, larger than the block size or
  than the list holds; TEST != 0 (vendor test modes are not supported);
- the other actions: a parameter list length other than 0.

There is no sanitize failure mode: a store error during the operation ends
the command with HARDWARE ERROR (the LU's catch-all) and the medium stays
accessible, so EXIT FAILURE MODE has nothing to leave and completes GOOD.
AUSE is accepted for that reason.

The operation runs to completion inside the command: IMMED=1 is accepted
and changes nothing observable, since the status then reports a finished
sanitize (a device server may complete an immediate operation before it
returns status). There is therefore never a "sanitize in progress" state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ..scsi.cdb import invalid_cdb
from .store import BlockStore

IMMED = 0x80
AUSE = 0x20
_RESERVED_B1 = 0x40


class SanitizeAction(IntEnum):
    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTOGRAPHIC_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


@dataclass(frozen=True, slots=True)
class SanitizeCdb:
    action: SanitizeAction
    immed: bool
    ause: bool
    length: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> SanitizeCdb:
        if cdb[1] & _RESERVED_B1:
            raise invalid_cdb(1, 6)
        for i in range(2, 7):
            if cdb[i]:
                raise invalid_cdb(i)
        try:
            action = SanitizeAction(cdb[1] & 0x1F)
        except ValueError:
            raise invalid_cdb(1, 4) from None
        (length,) = struct.unpack_from(">H", cdb, 7)
        return SanitizeCdb(action, bool(cdb[1] & IMMED), bool(cdb[1] & AUSE), length)


@dataclass(frozen=True, slots=True)
class OverwriteParams:
    invert: bool
    count: int
    pattern: bytes

    @staticmethod
    def decode(data: bytes | memoryview, length: int, block_size: int) -> OverwriteParams:
        """The OVERWRITE parameter list (SBC-4 5.30.3.2); ``length`` is the
        CDB's PARAMETER LIST LENGTH, ``data`` what the initiator sent."""
        if length <= 4 or length > block_size + 4:
            raise invalid_cdb(7)
        if len(data) < length:
            raise invalid_cdb(7)
        b0 = data[0]
        count = b0 & 0x1F
        if b0 & 0x60:  # TEST
            raise invalid_cdb(7)
        if count == 0:
            raise invalid_cdb(7)
        (plen,) = struct.unpack_from(">H", data, 2)
        if plen == 0 or plen > block_size or plen > length - 4:
            raise invalid_cdb(7)
        return OverwriteParams(bool(b0 & 0x80), count, bytes(data[4 : 4 + plen]))


def pattern_block(pattern: bytes, block_size: int, invert: bool = False) -> bytes:
    """One logical block filled with ``pattern`` repeated (SBC-4 5.30.3.2:
    the pattern is repeated to fill the block), bitwise inverted if asked."""
    reps = -(-block_size // len(pattern))
    block = (pattern * reps)[:block_size]
    if invert:
        block = bytes(b ^ 0xFF for b in block)
    return block


def overwrite(store: BlockStore, blocks: int, block_size: int, p: OverwriteParams) -> None:
    """OVERWRITE COUNT passes over every block. With INVERT the pattern is
    inverted between passes, the last pass writing the pattern as given."""
    for n in range(p.count):
        flip = p.invert and (p.count - 1 - n) % 2 == 1
        store.write_same(0, pattern_block(p.pattern, block_size, flip), blocks)
    store.flush()


def erase(store: BlockStore, blocks: int, block_size: int) -> None:
    """BLOCK ERASE / CRYPTOGRAPHIC ERASE: deallocate every block."""
    store.unmap(0, blocks * block_size)
    store.flush()
