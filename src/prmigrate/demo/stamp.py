"""Verifiable guest writes: stamped blocks and the ledger of what was acknowledged.

Pure: no asyncio, no clock. The guest workload (``guest.py``) asks the ledger
for the next write, tells it what the device answered, and hands it what it
read back; the ledger decides whether an acknowledged write is there.

Block layout (all integers big-endian), one logical block::

    bytes 0-7    magic "PRMDEMO1"
    bytes 8-15   run id (random per guest: old data never verifies)
    bytes 16-23  sequence number (1, 2, ... in issue order)
    bytes 24-31  LBA the block was written to
    bytes 32..   filler derived from (seq, LBA)
    last 4       CRC-32 (zlib) of everything before it

Rules the ledger keeps (an acknowledged write is a promise: SBC-4 4.15, a
GOOD WRITE is durable on the medium seen by every initiator):

* at most one write per LBA is outstanding: ``issue`` never picks an LBA that
  has a write in flight or an acknowledged write still waiting to be read
  back, so every acknowledged write can be verified before it is overwritten;
* a read-back block proves the write with sequence ``s`` when its stamp is
  intact, names the same LBA and carries ``s``; a newer sequence that was
  issued for that LBA but never acknowledged also passes (a command without
  status may or may not have reached the medium);
* anything else (older sequence, another run, bad CRC, wrong LBA) means the
  acknowledged write is LOST.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import Enum

MAGIC = b"PRMDEMO1"
_HEAD = struct.Struct(">8sQQQ")
_CRC = struct.Struct(">I")


class Check(Enum):
    VERIFIED = "verified"  # the acknowledged write is there
    NEWER = "newer"  # a later, unacknowledged write to the same LBA is there
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Stamp:
    run_id: int
    seq: int
    lba: int


def stamp_block(run_id: int, seq: int, lba: int, size: int = 512) -> bytes:
    """One block of ``size`` bytes carrying (run id, seq, LBA) and a CRC."""
    if size < _HEAD.size + _CRC.size:
        raise ValueError(f"block size {size} too small for a stamp")
    head = _HEAD.pack(MAGIC, run_id, seq, lba)
    body_len = size - _HEAD.size - _CRC.size
    unit = struct.pack(">QQ", seq * 0x9E3779B97F4A7C15 & (2**64 - 1), lba ^ 0xA5A5A5A5A5A5A5A5)
    filler = (unit * (body_len // len(unit) + 1))[:body_len]
    data = head + filler
    return data + _CRC.pack(zlib.crc32(data))


def read_stamp(block: bytes | memoryview) -> Stamp | None:
    """The stamp of a block, or None when it carries none (or a damaged one)."""
    b = bytes(block)
    if len(b) < _HEAD.size + _CRC.size or not b.startswith(MAGIC):
        return None
    (crc,) = _CRC.unpack_from(b, len(b) - _CRC.size)
    if zlib.crc32(b[: -_CRC.size]) != crc:
        return None
    _, run_id, seq, lba = _HEAD.unpack_from(b)
    return Stamp(run_id, seq, lba)


@dataclass(slots=True)
class Counters:
    issued: int = 0  # write commands sent (a re-issue after a reconnect is not counted again)
    acknowledged: int = 0  # GOOD
    verified: int = 0  # acknowledged and read back intact
    lost: int = 0  # acknowledged but not on the medium
    conflicts: int = 0  # RESERVATION CONFLICT answers
    errors: int = 0  # other failures (CHECK CONDITION, connection given up)
    read_conflicts: int = 0  # read-backs answered RESERVATION CONFLICT (verified later)

    def to_dict(self) -> dict[str, int]:
        return {
            "issued": self.issued,
            "acknowledged": self.acknowledged,
            "verified": self.verified,
            "lost": self.lost,
            "conflicts": self.conflicts,
            "errors": self.errors,
            "read_conflicts": self.read_conflicts,
        }

    def minus(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(self.to_dict().values(),
                                               other.to_dict().values(), strict=True)))

    def copy(self) -> Counters:
        return Counters(**self.to_dict())


@dataclass(slots=True)
class _Lba:
    acked: int = 0  # seq of the last acknowledged write (0: none)
    unverified: int = 0  # seq acknowledged and not yet read back (0: none)
    inflight: int = 0  # seq of the write in flight (0: none)
    unacked: set[int] = field(default_factory=set)  # issued, never acknowledged
    lost: int = 0  # seq of the acknowledged write already reported lost (0: none)


class Ledger:
    """Which write goes where, and which acknowledged writes are proven."""

    def __init__(self, run_id: int, first_lba: int, blocks: int) -> None:
        if blocks < 1:
            raise ValueError("the write region needs at least one block")
        self.run_id = run_id
        self.first_lba = first_lba
        self.blocks = blocks
        self.counters = Counters()
        self.lost_writes: list[tuple[int, int, str]] = []  # (seq, lba, why)
        self._seq = 0
        self._cursor = 0
        self._lbas: dict[int, _Lba] = {}

    # ------------------------------------------------------------ writes
    def issue(self) -> tuple[int, int] | None:
        """(seq, lba) of the next write, or None when every LBA is busy."""
        for _ in range(self.blocks):
            lba = self.first_lba + self._cursor
            self._cursor = (self._cursor + 1) % self.blocks
            st = self._lbas.setdefault(lba, _Lba())
            if st.inflight or st.unverified:
                continue
            self._seq += 1
            st.inflight = self._seq
            self.counters.issued += 1
            return self._seq, lba
        return None

    def acknowledged(self, seq: int, lba: int) -> None:
        st = self._lbas[lba]
        assert st.inflight == seq, "ledger misuse: ack of a write not in flight"
        st.inflight = 0
        st.acked = seq
        st.unverified = seq
        self.counters.acknowledged += 1

    def not_written(self, seq: int, lba: int, *, conflict: bool) -> None:
        """The write ended without GOOD (it may still have reached the medium
        if the connection was lost: it stays acceptable as NEWER)."""
        st = self._lbas[lba]
        st.inflight = 0
        st.unacked.add(seq)
        if conflict:
            self.counters.conflicts += 1
        else:
            self.counters.errors += 1

    # ----------------------------------------------------------- read-back
    def pending_verification(self) -> list[int]:
        """LBAs with an acknowledged write not yet read back, in LBA order."""
        return sorted(lba for lba, st in self._lbas.items() if st.unverified)

    def acknowledged_lbas(self) -> list[int]:
        return sorted(lba for lba, st in self._lbas.items() if st.acked)

    def check(self, lba: int, block: bytes | memoryview) -> Check:
        """Judge what was read at ``lba`` against the last acknowledged write;
        counts the pending write (if any) as verified or lost."""
        st = self._lbas.get(lba)
        if st is None or not st.acked:
            return Check.VERIFIED  # nothing promised here
        stamp = read_stamp(block)
        outcome, why = Check.LOST, ""
        if stamp is None:
            why = "no intact stamp"
        elif stamp.run_id != self.run_id:
            why = f"data of another run (seq {stamp.seq})"
        elif stamp.lba != lba:
            why = f"block stamped for LBA {stamp.lba}"
        elif stamp.seq == st.acked:
            outcome = Check.VERIFIED
        elif stamp.seq > st.acked and stamp.seq in st.unacked:
            outcome = Check.NEWER
        else:
            why = f"found seq {stamp.seq}, acknowledged seq {st.acked}"
        pending = st.unverified
        st.unverified = 0
        if outcome is Check.LOST:
            if st.lost != st.acked:  # each acknowledged write is lost at most once
                st.lost = st.acked
                self.lost_writes.append((st.acked, lba, why))
                self.counters.lost += 1
                if not pending:  # it had been read back intact before: it vanished since
                    self.counters.verified -= 1
        elif pending:
            self.counters.verified += 1
        return outcome

    def defer(self, lba: int) -> None:
        """The read-back could not run now (RESERVATION CONFLICT on a read):
        the write stays pending; the LBA is not reused until it is checked."""
        self.counters.read_conflicts += 1
