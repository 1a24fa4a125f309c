"""One guest's backend nexus over several paths to its LUN: the decisions (sans-IO).

A multipath device (``backend=`` given more than once, ``config.py``) gives
each guest one backend I_T nexus per path: the host's initiator name and
the ISID ``derive_isid(device, guest, path)`` (path 0's is the single-path
ISID). The guest sees one nexus; the target sees one per path, and SPC-5
keeps a registration and a reservation per I_T nexus (SPC-5 5.14.1). The
rules that make the paths one nexus to the guest:

Where a PERSISTENT RESERVE OUT goes (``PR_OUT_ROUTES``):

=============================== ============= ================================================
service action                  paths         why
=============================== ============= ================================================
REGISTER                        every path    SPC-5 5.14.7: a registration belongs to one I_T
REGISTER AND IGNORE EXISTING KEY every path   nexus; each path registers, as libmpathpersist
                                              does for a host (the command on the primary,
                                              then REGISTER AND IGNORE EXISTING KEY on the
                                              others with the same SARK)
RESERVE                         primary       SPC-5 5.14.9: the caller's nexus becomes the
                                              holder: one path holds (all-registrants types:
                                              every registered path is a holder, 5.14.10)
RELEASE                         primary       SPC-5 5.14.11.2: only the holder releases
CLEAR                           primary       SPC-5 5.14.11.6: any registrant; removes every
                                              registration, every path's too
PREEMPT, PREEMPT AND ABORT      primary       SPC-5 5.14.11.4 / .5: with SARK the guest's own
                                              key it removes every registration with that key
                                              except the caller's (5.14.11.4.3), so the other
                                              paths register again afterwards
                                              (``Path.registered`` False, state REGISTERING)
                                              before they carry I/O
REGISTER AND MOVE               primary       SPC-5 5.14.8: only the holder moves; with
                                              UNREG the other paths then unregister too
REPLACE LOST RESERVATION        primary       SPC-5 5.14.12: the caller becomes the holder
=============================== ============= ================================================

The primary path is the holder's path while the guest holds a reservation
that is not all-registrants (``holder``), else the first path that is up
and registered, else the first that is up.

Which path carries media access (``media_path``): with no reservation, or
one of types 5 to 8 (registrants only, all registrants: SPC-5 5.14.2,
Table 47, every registered nexus has access), round robin over the paths
up and registered (up, when the guest has no key); with a write exclusive
or exclusive access reservation the guest holds (types 1, 3: only the
holder's nexus has access), the holder's path only.

A path that fails is taken out (DOWN): its commands are re-issued on
another path. Under a reservation held on it (not all-registrants) the
reservation moves to a surviving registered path: PREEMPT with RK = SARK =
the guest's key, same type and scope (SPC-5 5.14.11.4.3: a registrant may
preempt its own key; the reservation goes to the caller), which removes
the key's other registrations, so the other surviving paths then register
again (``holder_lost``). A path that comes back registers again (REGISTER
AND IGNORE EXISTING KEY with the guest's key) before it carries I/O,
when the key is still registered on another of the guest's paths (it is
not when another initiator preempted the guest meanwhile: then nothing is
registered again, the fencing stands).

Unit attentions: the primary path's are the guest's (its answers go back
as they are); one met on another path is retried there and not reported
(the target queues the same unit attention on every nexus for an event of
the LU or another initiator's PR OUT, so the guest meets it once, on the
primary; those our own path management causes stay on the paths).

A guest's PR IN answers are rewritten so that every guest of the device
looks like one nexus (``rewrite_pr_in``, given every guest's path set):
READ KEYS lists each guest's key once for its paths, READ FULL STATUS one
entry for them (the holder's, else the primary's); READ RESERVATION and
REPORT CAPABILITIES are unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from ..scsi.constants import PrInAction, PrOutAction, PrType
from ..scsi.pr import PrDecodeError, ReadFullStatus, ReadKeys
from ..scsi.transport_id import TransportId


class PathState(StrEnum):
    UP = "up"  # logged in and registered as the guest is: carries I/O
    DOWN = "down"  # session lost or not open: carries nothing
    REGISTERING = "registering"  # logged in, its registration being restored: carries nothing yet


class Route(Enum):
    EVERY_PATH = "every path"
    PRIMARY = "primary path"


# Where each PR OUT service action goes (see the module docstring's table).
PR_OUT_ROUTES: dict[PrOutAction, tuple[Route, str]] = {
    PrOutAction.REGISTER: (Route.EVERY_PATH, "SPC-5 5.14.7: a registration is one I_T nexus's"),
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: (Route.EVERY_PATH, "SPC-5 5.14.7"),
    PrOutAction.RESERVE: (Route.PRIMARY, "SPC-5 5.14.9: the caller's nexus holds"),
    PrOutAction.RELEASE: (Route.PRIMARY, "SPC-5 5.14.11.2: only the holder releases"),
    PrOutAction.CLEAR: (Route.PRIMARY, "SPC-5 5.14.11.6: removes every registration"),
    PrOutAction.PREEMPT: (Route.PRIMARY, "SPC-5 5.14.11.4: own key: the other paths register again"),
    PrOutAction.PREEMPT_AND_ABORT: (Route.PRIMARY, "SPC-5 5.14.11.5: as PREEMPT, and aborts"),
    PrOutAction.REGISTER_AND_MOVE: (Route.PRIMARY, "SPC-5 5.14.8: only the holder moves"),
    PrOutAction.REPLACE_LOST_RESERVATION: (Route.PRIMARY, "SPC-5 5.14.12: the caller holds"),
}

# SPC-5 5.14.2 (Table 47): the types under which only the holder's nexus
# has media access (writes; EA: reads too); every other type lets each
# registered nexus through
HOLDER_ONLY_TYPES = frozenset({PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS})


@dataclass(slots=True)
class Path:
    url: str
    transport_id: TransportId
    state: PathState = PathState.DOWN
    # whether the target has the guest's key on this path's nexus (as far as
    # the guest's PR OUTs and ours tell; None: never registered)
    registered: bool = False


@dataclass(frozen=True, slots=True)
class Op:
    """A PR OUT the path set wants sent: ``action`` on ``path`` with RK/SARK."""

    path: int
    action: PrOutAction
    rtype: PrType = PrType.NONE
    rk: int = 0
    sark: int = 0
    scope: int = 0
    aptpl: bool = False
    all_tg_pt: bool = False


@dataclass(slots=True, eq=False)
class PathSet:
    """One guest's paths and what is registered / reserved on them."""

    paths: list[Path]
    key: int = 0  # the guest's registered key (0: none)
    aptpl: bool = False
    holder: int | None = None  # the path whose nexus holds a non-all-registrants reservation
    rtype: PrType = PrType.NONE  # the guest's reservation type (NONE: holds none)
    scope: int = 0
    scsi2: int | None = None  # the path whose nexus holds the guest's SCSI-2 RESERVE(6/10)
    _next: int = field(default=0)

    # ------------------------------------------------------------ paths
    def usable(self) -> list[int]:
        """Paths that may carry the guest's commands: up (and, when the
        guest has a key, registered)."""
        return [i for i, p in enumerate(self.paths) if p.state is PathState.UP and (p.registered or not self.key)]

    def primary(self) -> int | None:
        """The path holding the guest's SCSI-2 reservation, else the holder's
        (not all-registrants), else the first usable, else the first up;
        None: every path is down."""
        if self.scsi2 is not None and self.paths[self.scsi2].state is PathState.UP:
            return self.scsi2  # SPC-5 5.14.3: a SCSI-2 reservation refuses PR commands from other nexuses
        if self.holder is not None and self.paths[self.holder].state is PathState.UP:
            return self.holder
        usable = self.usable()
        if usable:
            return usable[0]
        up = [i for i, p in enumerate(self.paths) if p.state is not PathState.DOWN]
        return up[0] if up else None

    def media_path(self) -> int | None:
        """Where the next media access command goes (module docstring):
        the holder's path under WE/EA held by the guest, else round robin."""
        if self.scsi2 is not None:  # SPC-2 5.5.1: only the reserving nexus has access
            return self.scsi2 if self.paths[self.scsi2].state is PathState.UP else None
        if self.holder is not None and self.rtype in HOLDER_ONLY_TYPES:
            return self.holder if self.paths[self.holder].state is PathState.UP else None
        usable = self.usable()
        if not usable:
            return self.primary()
        self._next = (self._next + 1) % len(usable)
        return usable[self._next]

    def mark(self, path: int, state: PathState) -> None:
        self.paths[path].state = state

    # ------------------------------------------------------------ PR OUT
    def route(self, action: int) -> Route:
        try:
            return PR_OUT_ROUTES[PrOutAction(action)][0]
        except ValueError:
            return Route.PRIMARY  # not a service action: the target refuses it on one path

    def fan_out(self, primary: int, sark: int, aptpl: bool, all_tg_pt: bool) -> list[Op]:
        """After a REGISTER / RAIEK answered GOOD on ``primary``: the same
        registration on every other path that is not down (RAIEK with SARK)."""
        return [Op(i, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, PrType.NONE, 0, sark, 0, aptpl, all_tg_pt)
                for i, p in enumerate(self.paths) if i != primary and p.state is not PathState.DOWN]

    def answered(self, path: int, action: int, rtype: int, scope: int, rk: int, sark: int, aptpl: bool) -> list[int]:
        """A PR OUT answered GOOD on ``path``: update what is registered and
        reserved. Returns the paths that must register again (after a
        PREEMPT of the guest's own key: SPC-5 5.14.11.4.3)."""
        try:
            act = PrOutAction(action)
        except ValueError:
            return []
        t = PrType(rtype) if rtype in PrType._value2member_map_ else PrType.NONE
        p = self.paths[path]
        if act in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            # the guest's command (on the primary): its key; the fan-out
            # makes the other paths follow (``registered_on``)
            p.registered = bool(sark)
            self.key, self.aptpl = sark, aptpl
            if not sark:  # SPC-5 5.14.11.2.2: the holder's unregistration releases
                self.holder, self.rtype = None, PrType.NONE
            return []
        if act is PrOutAction.RESERVE:
            self.rtype, self.scope = t, scope
            self.holder = None if t.all_registrants else path
        elif act is PrOutAction.RELEASE:
            self.rtype, self.holder = PrType.NONE, None
        elif act is PrOutAction.CLEAR:  # SPC-5 5.14.11.6: every registration, ours too
            self.key, self.rtype, self.holder = 0, PrType.NONE, None
            for q in self.paths:
                q.registered = False
        elif act in (PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT) and sark and sark == self.key:
            # own key: the reservation (if any had it) is the caller's now, the
            # key's other registrations are gone (SPC-5 5.14.11.4.3)
            self.rtype, self.scope = t, scope
            self.holder = None if t.all_registrants or t is PrType.NONE else path
            again = []
            for i, q in enumerate(self.paths):
                if i != path and q.registered:
                    q.registered = False
                    again.append(i)
            return [i for i in again if self.paths[i].state is not PathState.DOWN]
        elif act is PrOutAction.REGISTER_AND_MOVE:
            # SPC-5 5.14.8: the reservation is the TransportID's nexus's now;
            # with UNREG the caller's registration is gone (``unregister_others``
            # makes the guest's other paths follow)
            self.rtype, self.holder = PrType.NONE, None
        elif act in (PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT) and t is not PrType.NONE and rk == self.key:
            # SPC-5 5.14.11.4.3: preempting the holder's key makes us the holder
            self.rtype, self.scope = t, scope
            self.holder = None if t.all_registrants else path
        return []

    def unregister_others(self, path: int) -> list[Op]:
        """After a REGISTER AND MOVE with UNREG answered GOOD on ``path``
        (SPC-5 5.14.8: the caller's nexus is unregistered): the guest is one
        nexus, so its other paths unregister too (REGISTER, RK = the key,
        SARK 0: SPC-5 5.14.11.2.2)."""
        ops = [Op(i, PrOutAction.REGISTER, PrType.NONE, self.key, 0)
               for i, p in enumerate(self.paths) if i != path and p.registered and p.state is not PathState.DOWN]
        self.unregistered_on(path)
        return ops

    def unregistered_on(self, path: int) -> None:
        """``path``'s nexus is unregistered; the guest has no key once none is."""
        self.paths[path].registered = False
        if not any(p.registered for p in self.paths):
            self.key = 0

    def registered_on(self, path: int, sark: int) -> None:
        """A follow-up REGISTER AND IGNORE EXISTING KEY answered GOOD on ``path``."""
        self.paths[path].registered = bool(sark)

    def seen(self, rfs: ReadFullStatus) -> None:
        """READ FULL STATUS (SPC-5 6.16.5) read on one of the paths: what is
        registered and reserved on each path's nexus, as the target says."""
        mine = [(self._ours(e.transport_id), e) for e in rfs.entries]
        ours = [(i, e) for i, e in mine if i is not None]
        for p in self.paths:
            p.registered = False
        self.key, self.holder, self.rtype, self.scope = 0, None, PrType.NONE, 0
        for i, e in ours:
            assert i is not None
            self.paths[i].registered = True
            self.key = e.key
            if e.holder:
                t = int(e.rtype)
                self.rtype = PrType(t) if t in PrType._value2member_map_ else PrType.NONE
                self.scope = e.scope
                self.holder = None if self.rtype.all_registrants else i

    def lost(self) -> None:
        """Every registration of the guest is gone (another initiator's
        PREEMPT or CLEAR, seen by a verification): nothing to restore."""
        self.key, self.rtype, self.holder = 0, PrType.NONE, None
        for p in self.paths:
            p.registered = False

    def holder_lost(self) -> list[Op]:
        """The holder's path went down under a non-all-registrants
        reservation: PREEMPT the guest's own key, same type and scope, from
        a surviving registered path (the reservation moves to its nexus),
        then RAIEK on the other surviving paths. [] when nothing moves."""
        if self.holder is None or self.paths[self.holder].state is not PathState.DOWN or not self.key:
            return []
        survivors = [i for i, p in enumerate(self.paths) if p.state is PathState.UP and p.registered]
        if not survivors:
            return []
        return [Op(survivors[0], PrOutAction.PREEMPT, self.rtype, self.key, self.key, self.scope)]

    def back_op(self, path: int) -> Op | None:
        """A path logged in again: the RAIEK that restores its registration
        (None: the guest has no key, nothing to restore)."""
        if not self.key:
            return None
        return Op(path, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, PrType.NONE, 0, self.key, 0, self.aptpl)

    # ------------------------------------------------------------ PR IN
    def _ours(self, tid: TransportId) -> int | None:
        for i, p in enumerate(self.paths):
            if tid.same_port(p.transport_id):
                return i
        return None

    # ------------------------------------------------------------ describe
    def describe(self) -> list[dict[str, object]]:
        return [{"path": i, "url": p.url, "nexus": str(p.transport_id), "state": str(p.state),
                 "registered": p.registered, "holder": self.holder == i or (p.registered and self.rtype.all_registrants)}
                for i, p in enumerate(self.paths)]


def rewrite_pr_in(cdb: bytes, data: bytes, alloc: int, sets: Sequence[PathSet]) -> bytes:
    """A guest's PR IN answer (read with a large allocation) as if each of
    the device's path sets ``sets`` (every guest's) were one nexus, cut to
    the guest's ``alloc``: READ KEYS (SPC-5 6.16.2) lists each guest's key
    once for its paths, READ FULL STATUS (6.16.5) has one entry for them
    (the holder's, else the primary path's). Other PR IN answers, and
    answers that do not decode, are left as they came."""
    action = cdb[1] & 0x1F if len(cdb) > 1 else -1
    try:
        if action == PrInAction.READ_KEYS:
            data = _one_key_each(data, sets)
        elif action == PrInAction.READ_FULL_STATUS:
            data = _one_entry_each(data, sets)
    except PrDecodeError:
        pass
    return data[:alloc]


def _one_key_each(data: bytes, sets: Sequence[PathSet]) -> bytes:
    rk = ReadKeys.decode(data)
    if rk.truncated:
        return data
    keys = list(rk.keys)
    for ps in sets:
        if not ps.key:
            continue
        for _ in range(sum(1 for p in ps.paths if p.registered) - 1):
            if keys.count(ps.key) <= 1:
                break
            del keys[len(keys) - 1 - keys[::-1].index(ps.key)]
    return ReadKeys(rk.generation, tuple(keys)).encode()


def _one_entry_each(data: bytes, sets: Sequence[PathSet]) -> bytes:
    rfs = ReadFullStatus.decode(data)
    if rfs.truncated:
        return data
    drop: set[int] = set()
    for ps in sets:
        ours = [(n, i, e) for n, e in enumerate(rfs.entries) if (i := ps._ours(e.transport_id)) is not None]
        if len(ours) <= 1:
            continue
        prim = ps.primary()
        keep = next((n for n, _, e in ours if e.holder), None)
        if keep is None:
            keep = next((n for n, i, _ in ours if i == prim), ours[0][0])
        drop |= {n for n, _, _ in ours if n != keep}
    if not drop:
        return data
    return ReadFullStatus(rfs.generation, tuple(e for n, e in enumerate(rfs.entries) if n not in drop)).encode()


def lu_designators(vpd83: bytes) -> frozenset[tuple[int, int, bytes]]:
    """The logical unit designators (association 00b) of a VPD 83h page:
    (code set, designator type, designator). SPC-5 7.7.6.1: the target port
    and target port group designators (associations 01b) differ per path;
    the LU's must not."""
    if len(vpd83) < 4:
        raise PrDecodeError("VPD 83h page shorter than its header")
    (length,) = struct.unpack_from(">H", vpd83, 2)
    end = min(len(vpd83), 4 + length)
    off, out = 4, set()
    while off + 4 <= end:
        codeset, b1, _, dlen = vpd83[off], vpd83[off + 1], vpd83[off + 2], vpd83[off + 3]
        body = bytes(vpd83[off + 4: off + 4 + dlen])
        if (b1 >> 4) & 0x3 == 0:
            out.add((codeset & 0x0F, b1 & 0x0F, body))
        off += 4 + dlen
    return frozenset(out)


def same_lu(pages: Sequence[bytes]) -> bool:
    """Do the VPD 83h pages read on each path name one logical unit?"""
    sets = [lu_designators(p) for p in pages]
    return bool(sets) and bool(sets[0]) and all(s == sets[0] for s in sets)


__all__ = ["HOLDER_ONLY_TYPES", "Op", "PR_OUT_ROUTES", "Path", "PathSet", "PathState", "Route",
           "lu_designators", "rewrite_pr_in", "same_lu"]
