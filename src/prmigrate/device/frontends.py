"""What a LU keeps per I_T nexus, kept per frontend nexus of a shared backend nexus.

Several frontend nexuses (guest sessions) can share one backend I_T nexus:
``identity=guest`` keys it by the guest's initiator *name* (a multipath
guest's paths, a guest reconnecting with a new ISID), ``identity=host``
shares one for every guest. A logical unit keeps two things per I_T nexus
that the backend then keeps once for all of them. ``SharedNexus`` keeps
them per frontend nexus, so each guest session sees what it would see on a
nexus of its own (our LU, ``lun/unit.py``, is the reference).

Unit attentions (SAM-5 5.14, SPC-5 5.15; queue rules of ``lun/ua.py``)
    The backend reports a UA once, to whichever frontend's command meets it
    first; a LU would have reported it on every I_T nexus. The device returns
    it to that frontend and ``establish`` queues a copy for every *other*
    frontend sharing the nexus at that moment. A UA no frontend received (an
    asynchronous event, a command of the device's own) is queued for all.
    A frontend that attaches later gets none of the older ones: a new nexus
    on our LU starts with an empty queue (``UnitAttentions.attach``).
    A queued UA is reported and cleared by the frontend's next command other
    than INQUIRY, REPORT LUNS and REQUEST SENSE; REQUEST SENSE returns it as
    its data; REPORT LUNS clears 3F/0E (SPC-5 6.33). No duplicates; a 29h
    condition supersedes what was queued before it; at most ``MAX_QUEUED``.

SCSI-2 reservations (SPC-2 5.5.1, 7.19, 7.21; ``lun/conflicts.py``)
    RESERVE(6/10) from the shared nexus reserves the LU for all its frontends,
    and the LU lets them all through. The device remembers which frontend's
    RESERVE completed GOOD (``holder``). While one holds it, a command from
    another frontend of the same nexus is answered by the device without
    being forwarded (``check``): RESERVATION CONFLICT unless our LU lets a
    non-holder send it (``scsi2_allowed``); RELEASE completes GOOD without
    releasing; RESERVE conflicts. The holder's RELEASE completing GOOD ends
    it, and so do a unit attention saying the LU dropped it (29h power on,
    reset, I_T nexus loss; 2A/03, 2A/04) and a reset the device forwarded.
    When the holder's session ends while others keep the backend nexus open,
    the LU would see that nexus loss and drop the reservation: ``detach``
    returns the RELEASE for the device to send on the backend nexus. When
    it was the last frontend, the backend nexus closes and the LU sees the
    loss itself. A RESERVE completing GOOD for a guest with a PR registration
    is not tracked: with CRH=1 it takes no reservation (SPC-5 5.14.3).

Pure: no I/O, no clock; the device (``passthrough.py``) feeds it.
"""

from __future__ import annotations

from enum import Enum

from ..lun.conflicts import scsi2_allowed
from ..lun.types import Nexus, Result
from ..lun.ua import MAX_QUEUED, UA_EXEMPT  # per frontend nexus, as per I_T nexus on a LU
from ..scsi.constants import Opcode, Status
from ..scsi.sense import sense_triple

# RESERVE opcode -> the RELEASE a nexus loss stands for (SPC-2 7.19 / 7.21).
RELEASE_FOR: dict[int, int] = {
    Opcode.RESERVE_6: Opcode.RELEASE_6,
    Opcode.RESERVE_10: Opcode.RELEASE_10,
}
_RELEASE = frozenset(RELEASE_FOR.values())
# Unit attentions after which the LU holds no SCSI-2 reservation any more:
# power on / resets / I_T nexus loss (SAM-5 6.3), reservations preempted or
# released (SPC-5 5.14.11).
_DROPS_SCSI2_ASC = 0x29
_DROPS_SCSI2 = frozenset({(0x2A, 0x03), (0x2A, 0x04)})


class Verdict(Enum):
    """What the device does with a frontend's command (``SharedNexus.check``)."""

    FORWARD = "forward"
    CONFLICT = "conflict"  # RESERVATION CONFLICT, not forwarded
    GOOD = "good"  # RELEASE by a non-holder: GOOD, nothing released (SPC-2 7.19)


def drops_scsi2(asc: int, ascq: int) -> bool:
    """Does this unit attention mean the LU released a SCSI-2 reservation?"""
    return asc == _DROPS_SCSI2_ASC or (asc, ascq) in _DROPS_SCSI2


def request_sense_data(sense: bytes, cdb: bytes) -> bytes:
    """REQUEST SENSE parameter data for a pending UA (SPC-5 6.39): the sense
    in the format the CDB's DESC bit asks for, cut to the allocation length."""
    desc = len(cdb) > 1 and bool(cdb[1] & 1)
    alloc = cdb[4] if len(cdb) > 4 else 0
    t = sense_triple(sense)
    if t is not None and desc != ((sense[0] & 0x7F) in (0x72, 0x73)):
        key, asc, ascq = t
        if desc:
            sense = bytes((0x72, key, asc, ascq, 0, 0, 0, 0))
        else:
            sense = bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))
    return bytes(sense[:alloc])


def release_cdb(reserve_op: int) -> bytes:
    """RELEASE(6) or RELEASE(10) matching a RESERVE opcode."""
    op = RELEASE_FOR.get(reserve_op, Opcode.RELEASE_6)
    return bytes((op,)) + bytes(5 if op == Opcode.RELEASE_6 else 9)


class SharedNexus:
    """The frontend nexuses sharing one backend I_T nexus, with their unit
    attention queues and the SCSI-2 reservation holder among them.

    ``sole`` is the device's fast-path test: the one frontend nexus when
    there is exactly one, nothing is queued for it and the device has not
    ``paused`` the nexus (a task management function it forwarded is not
    done), else None: then each command goes through the checks.
    """

    def __init__(self) -> None:
        self.frontends: set[Nexus] = set()
        # only non-empty queues are kept: ``bool(self.uas)`` is the cheap test
        self.uas: dict[Nexus, list[bytes]] = {}
        self.holder: Nexus | None = None
        self.reserved_with: int = Opcode.RESERVE_6
        self.paused = False
        self.sole: Nexus | None = None

    def _update(self) -> None:
        fe = self.frontends
        self.sole = next(iter(fe)) if len(fe) == 1 and not self.uas and not self.paused else None

    def pause(self, paused: bool) -> None:
        self.paused = paused
        self._update()

    # ------------------------------------------------------------ nexuses
    def attach(self, nexus: Nexus) -> None:
        if nexus not in self.frontends:
            self.frontends.add(nexus)
            self._update()

    def detach(self, nexus: Nexus) -> bytes | None:
        """``nexus`` ended (I_T nexus loss). Its queue goes; when it held the
        SCSI-2 reservation that goes too, and the RELEASE CDB to send on the
        backend nexus is returned if other frontends keep that nexus open."""
        self.frontends.discard(nexus)
        self.uas.pop(nexus, None)
        self._update()
        if self.holder is None or self.holder != nexus:
            return None
        self.holder = None
        return release_cdb(self.reserved_with) if self.frontends else None

    # ---------------------------------------------------- unit attentions
    def establish(self, sense: bytes, receiver: Nexus | None = None) -> int:
        """The backend reported ``sense`` (a UA) to ``receiver`` (None: to
        no frontend): queue it for every other frontend. Returns how many."""
        t = sense_triple(sense)
        n = 0
        for nexus in self.frontends:
            if nexus == receiver:
                continue
            q = self.uas.get(nexus)
            if q is None:
                self.uas[nexus] = [sense]
            else:
                if t is not None and t[1] == 0x29:
                    q.clear()
                elif any(sense_triple(s) == t for s in q):
                    continue
                q.append(sense)
                if len(q) > MAX_QUEUED:
                    del q[0]
            n += 1
        if n:
            self._update()
        return n

    def take_ua(self, nexus: Nexus, op: int) -> bytes | None:
        """The UA ``nexus``'s command ``op`` reports (and clears), if any:
        none for INQUIRY and REPORT LUNS; REQUEST SENSE takes it as data."""
        q = self.uas.get(nexus)
        if not q or op in (Opcode.INQUIRY, Opcode.REPORT_LUNS):
            return None
        sense = q.pop(0)
        if not q:
            del self.uas[nexus]
            self._update()
        return sense

    def discard_ua(self, nexus: Nexus, asc: int, ascq: int) -> None:
        """Clear one condition of ``nexus`` (3F/0E by REPORT LUNS)."""
        q = self.uas.get(nexus)
        if not q:
            return
        q[:] = [s for s in q if (sense_triple(s) or (0, -1, -1))[1:] != (asc, ascq)]
        if not q:
            del self.uas[nexus]
            self._update()

    def pending_uas(self) -> list[bytes]:
        """Every queued condition once, oldest first (for a snapshot)."""
        out: list[bytes] = []
        seen: set[tuple[int, int, int] | None] = set()
        for q in self.uas.values():
            for s in q:
                t = sense_triple(s)
                if t not in seen:
                    seen.add(t)
                    out.append(s)
        return out

    # --------------------------------------------------- SCSI-2 reservation
    def check(self, nexus: Nexus, cdb: bytes) -> Verdict:
        """SPC-2 5.5.1 for a frontend that does not hold the reservation
        another frontend of this nexus holds (call only when ``holder`` is
        set and is not ``nexus``)."""
        if not scsi2_allowed(cdb):
            return Verdict.CONFLICT  # RESERVE among them (SPC-2 7.21)
        if cdb[0] in _RELEASE:
            return Verdict.GOOD
        return Verdict.FORWARD

    def observe(self, nexus: Nexus, cdb: bytes, result: Result, registered: bool) -> str | None:
        """Learn from the backend's answer to ``nexus``'s RESERVE / RELEASE;
        returns what changed, for the log."""
        if result.status != Status.GOOD or not cdb:
            return None
        op = cdb[0]
        if op in RELEASE_FOR:
            if registered:
                return f"{Opcode(op).name} GOOD for a PR-registered guest: not tracked (CRH)"
            before, self.holder, self.reserved_with = self.holder, nexus, op
            if before == nexus:
                return None
            return f"{Opcode(op).name} now held by {nexus.initiator_port}"
        if op in _RELEASE and self.holder == nexus:
            self.holder = None
            return f"released by its holder {nexus.initiator_port}"
        return None

    def drop_reservation(self) -> Nexus | None:
        """The LU released it (reset, UA): forget the holder; return it."""
        holder, self.holder = self.holder, None
        return holder


__all__ = [
    "MAX_QUEUED",
    "RELEASE_FOR",
    "SharedNexus",
    "UA_EXEMPT",
    "Verdict",
    "drops_scsi2",
    "release_cdb",
    "request_sense_data",
]
