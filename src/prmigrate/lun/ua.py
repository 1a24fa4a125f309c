"""Unit attention conditions, one queue per I_T nexus (SAM-5 5.14, SPC-5 5.15).

A UA is established for specific nexuses; it is reported (and cleared) by the
next command on that nexus other than INQUIRY, REPORT LUNS and REQUEST SENSE
(REQUEST SENSE returns it as its data). ``establish_all`` reaches every nexus
that has been seen (``attach``), except the one whose command caused it.

Queue rules:
- duplicates are not queued twice;
- a 29h (power on / reset) condition supersedes everything queued before it,
  since the reset made those conditions moot (SAM-5 5.14: "the highest
  precedence" UA; lower ones may be cleared);
- at most ``MAX_QUEUED`` per nexus; when full, the oldest is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..scsi.constants import Opcode
from ..scsi.sense import Sense
from .types import Nexus

MAX_QUEUED = 16
# SPC-5 5.15: a pending unit attention does not interrupt these.
UA_EXEMPT = frozenset((Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE))


class UnitAttentions:
    __slots__ = ("_q", "_known")

    def __init__(self) -> None:
        # Only non-empty queues are kept, so ``bool(self._q)`` is the cheap
        # "anything pending anywhere" test on the hot path.
        self._q: dict[Nexus, list[Sense]] = {}
        self._known: set[Nexus] = set()

    # -- nexus registry -----------------------------------------------------
    def attach(self, nexus: Nexus) -> None:
        self._known.add(nexus)

    def detach(self, nexus: Nexus) -> None:
        self._known.discard(nexus)
        self._q.pop(nexus, None)

    def known(self, nexus: Nexus) -> bool:
        return nexus in self._known

    @property
    def nexuses(self) -> frozenset[Nexus]:
        return frozenset(self._known)

    # -- conditions ----------------------------------------------------------
    def establish(self, nexus: Nexus, sense: Sense) -> None:
        self._known.add(nexus)
        q = self._q.get(nexus)
        if q is None:
            self._q[nexus] = [sense]
            return
        if sense.asc == 0x29:
            q.clear()
        elif sense in q:
            return
        q.append(sense)
        if len(q) > MAX_QUEUED:
            del q[0]

    def establish_all(self, sense: Sense, except_nexus: Nexus | None = None) -> None:
        self.establish_many(sense, (n for n in self._known if n != except_nexus))

    def establish_many(self, sense: Sense, nexuses: Iterable[Nexus]) -> None:
        for n in list(nexuses):
            self.establish(n, sense)

    def pending(self, nexus: Nexus) -> bool:
        return nexus in self._q

    def peek(self, nexus: Nexus) -> Sense | None:
        q = self._q.get(nexus)
        return q[0] if q else None

    def pop(self, nexus: Nexus) -> Sense | None:
        q = self._q.get(nexus)
        if not q:
            return None
        s = q.pop(0)
        if not q:
            del self._q[nexus]
        return s

    def discard(self, nexus: Nexus, sense: Sense) -> None:
        """Clear one specific condition (e.g. 3F/0E by REPORT LUNS, SPC-5 6.33)."""
        q = self._q.get(nexus)
        if q and sense in q:
            q.remove(sense)
            if not q:
                del self._q[nexus]

    def clear(self, nexus: Nexus) -> None:
        self._q.pop(nexus, None)

    def __bool__(self) -> bool:
        return bool(self._q)
