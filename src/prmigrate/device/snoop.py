"""Snooping: track each guest's PR state from the commands it sends.

The device forwards a guest's command to the backend over that guest's
backend nexus (``identity.py``), and once the backend answered, the shell
feeds ``(guest, cdb, data_out, result)`` to ``PrSnooper.observe``. Nothing
here raises on malformed input or performs I/O.

Rules (SPC-5 5.14.11, 6.17), and where they differ from QEMU's snooping
(docs/design.md, "QEMU's `migrate-pr`"):

* Only a PERSISTENT RESERVE OUT that completed with GOOD changes state. QEMU
  changes state whatever the status: a PR OUT refused with RESERVATION
  CONFLICT still rewrote its key. Here CONFLICT, CHECK CONDITION, BUSY, TASK
  SET FULL, ... change nothing.
* A CDB shorter than 10 bytes, an unknown service action, a parameter list
  that does not decode (shorter than 24 bytes, bad TransportID...) change
  nothing either (QEMU asserts >= 16 bytes). If the backend nevertheless
  said GOOD, the guest is marked for verification.
* Per service action, what GOOD proves, in ``_RULES`` below with the SPC-5
  clause of each. State the rule can derive from the device's other guests
  (CLEAR empties every guest; PREEMPT removes the other guests registered
  with SARK; an all-registrants RESERVE makes every registered guest a
  holder) is applied to them too.
* Where the outcome depends on registrations the device cannot see (PREEMPT:
  did we take the reservation? a new registration: does an all-registrants
  reservation now include us?), or when the GOOD contradicts the tracked state
  (its key differed from RK: someone changed it behind our back), the guest
  is marked unverified and the outcome says ``verify``: the shell issues READ
  FULL STATUS (or READ RESERVATION + READ KEYS on targets without it) and
  feeds the answer to ``apply_full_status`` / ``apply_read_reservation`` /
  ``apply_keys``.
* Unit attentions 2A/03 (reservations preempted), 2A/04 (reservations
  released), 2A/05 (registrations preempted) and 29/xx (power on, reset,
  I_T nexus loss: registrations without APTPL may be gone) in any answer for
  a guest mark that guest's state for verification.
* A RESERVATION CONFLICT to REGISTER, RELEASE or CLEAR whose RK equals the
  tracked key means the tracked key is wrong: verification again (unless a
  SCSI-2 reservation the device knows of explains it: SPC-5 5.14.3).
* A guest's own READ KEYS / READ RESERVATION / READ FULL STATUS answer whose
  PRgeneration differs from the last verified one: verification (this
  catches what sends no unit attention: another initiator's REGISTER AND
  MOVE onto our nexus, or an all-registrants RESERVE that makes our
  registered nexus a holder).

With ``identity=host`` every guest shares one backend nexus, so every guest
maps to the single state key ``SHARED_NEXUS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import cast

from ..lun.types import Result, unit_attention
from ..scsi.constants import Opcode, PrInAction, PrOutAction, PrType, Status
from ..scsi.pr import (
    FullStatusEntry,
    PrDecodeError,
    PrInCdb,
    PrOutCdb,
    PrOutParams,
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    RegisterAndMoveParams,
)
from ..scsi.transport_id import TransportId
from ..scsi.vocabulary import words
from .identity import SHARED_NEXUS, IdentityMode
from .reconcile import KeysReconcile, UnknownKind, reconcile_full_status, reconcile_keys
from .state import DevicePrState, GuestPrState, StateChange

PR_OUT_CDB_LEN = 10

# (ASC, ASCQ) of unit attentions that put the tracked state in doubt;
# ASCQ None = any ASCQ of that ASC.
VERIFY_UNIT_ATTENTIONS: frozenset[tuple[int, int | None]] = frozenset(
    {
        (0x2A, 0x03),  # RESERVATIONS PREEMPTED
        (0x2A, 0x04),  # RESERVATIONS RELEASED
        (0x2A, 0x05),  # REGISTRATIONS PREEMPTED
        (0x29, None),  # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED / I_T NEXUS LOSS
    }
)

# PR IN answers that start with PRGENERATION (SPC-5 6.16.2, 6.16.3, 6.16.5).
_GENERATION_CARRIERS = frozenset(
    {PrInAction.READ_KEYS, PrInAction.READ_RESERVATION, PrInAction.READ_FULL_STATUS}
)

# Successful PR OUTs that increment PRgeneration (SPC-5 6.16.2, 5.14.11).
_BUMPS_GENERATION = frozenset(
    {
        PrOutAction.REGISTER,
        PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
        PrOutAction.CLEAR,
        PrOutAction.PREEMPT,
        PrOutAction.PREEMPT_AND_ABORT,
        PrOutAction.REGISTER_AND_MOVE,
    }
)

# PR OUTs whose RESERVATION CONFLICT can only mean "RK is not this nexus's
# key" (SPC-5 5.14.11.2-3, 5.14.11.5): if RK equals the tracked key, the
# tracked key is stale.
_CONFLICT_MEANS_KEY_MISMATCH = frozenset(
    {PrOutAction.REGISTER, PrOutAction.RELEASE, PrOutAction.CLEAR}
)


@dataclass(frozen=True, slots=True)
class SnoopOutcome:
    """What observing one answer did. ``changed``: journal the state;
    ``verify``: issue READ FULL STATUS (or READ RESERVATION) and feed it back."""

    guest: str  # state key
    action: PrOutAction | None = None
    changes: tuple[StateChange, ...] = ()
    verify: bool = False
    note: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.changes)


NOTHING = SnoopOutcome("")


@dataclass(frozen=True, slots=True)
class _Ctx:
    me: str
    cur: GuestPrState
    cdb: PrOutCdb
    params: PrOutParams | RegisterAndMoveParams
    guests: Mapping[str, GuestPrState]  # every tracked guest, including me
    transport_ids: Mapping[str, TransportId]

    @property
    def basic(self) -> PrOutParams:
        # _RULES pairs each rule with its layout, so the type always fits.
        return cast(PrOutParams, self.params)

    @property
    def move(self) -> RegisterAndMoveParams:
        return cast(RegisterAndMoveParams, self.params)

    @property
    def others(self) -> dict[str, GuestPrState]:
        return {g: s for g, s in self.guests.items() if g != self.me}

    @property
    def rtype(self) -> PrType | None:
        t = self.cdb.rtype
        return PrType(t) if isinstance(t, PrType) and t is not PrType.NONE else None


@dataclass(frozen=True, slots=True)
class _Effect:
    updates: dict[str, GuestPrState]
    verify: bool = False
    note: str = ""


_Rule = Callable[[_Ctx], _Effect]


def _stale(ctx: _Ctx) -> bool:
    """The backend accepted RK, so the nexus's key was RK: does our view differ?"""
    return ctx.cur.key != ctx.params.rk


# ----------------------------------------------------------------- the rules


def _register(ctx: _Ctx, *, check_rk: bool = True) -> _Effect:
    """SPC-5 5.14.7 (REGISTER) / REGISTER AND IGNORE EXISTING KEY (no RK check).

    SARK = 0 unregisters; the holder of a non-all-registrants reservation
    loses it with its registration (5.14.11.2.2); an all-registrants
    reservation stays with the remaining registrants. SARK != 0 registers or
    changes the key; a reservation held stays held. A fresh registration may
    join an all-registrants reservation held by someone we cannot see:
    verify.
    """
    p = ctx.basic
    stale = check_rk and _stale(ctx)
    verify = stale or p.spec_i_pt  # SPEC_I_PT also registered other ports
    if p.sark == 0:
        if ctx.cur.empty:
            return _Effect({}, verify, "unregistered nexus unregistering: no-op")
        note = "unregistered"
        if ctx.cur.holder and not ctx.cur.rtype.all_registrants:
            note += f", releasing its {words(ctx.cur.rtype)} reservation"
        return _Effect({ctx.me: GuestPrState()}, verify, note)
    if not ctx.cur.registered:
        joined = _ar_reservation(ctx.others)
        new = GuestPrState(p.sark, p.aptpl)
        if joined is not None:  # SPC-5 5.14.10: every registrant holds an AR reservation
            new = replace(new, holder=True, rtype=joined.rtype, scope=joined.scope)
        return _Effect({ctx.me: new}, True, "registered")
    return _Effect({ctx.me: replace(ctx.cur, key=p.sark, aptpl=p.aptpl)}, verify, "key changed")


def _register_ignore(ctx: _Ctx) -> _Effect:
    return _register(ctx, check_rk=False)


def _ar_reservation(guests: Mapping[str, GuestPrState]) -> GuestPrState | None:
    for s in guests.values():
        if s.holder and s.rtype.all_registrants:
            return s
    return None


def _reserve(ctx: _Ctx) -> _Effect:
    """SPC-5 5.14.9: RESERVE makes the caller the holder with the CDB's type
    and scope (GOOD also when it already held it with the same type). For
    all-registrants types every registered nexus is a holder."""
    t = ctx.rtype
    if t is None:
        return _Effect({}, True, f"GOOD to RESERVE with invalid type {int(ctx.cdb.rtype)}")
    updates = {ctx.me: replace(ctx.cur, holder=True, rtype=t, scope=ctx.cdb.scope)}
    if t.all_registrants:
        for g, s in ctx.others.items():
            if s.registered:
                updates[g] = replace(s, holder=True, rtype=t, scope=ctx.cdb.scope)
    return _Effect(updates, _stale(ctx) or not ctx.cur.registered, f"reserved {words(t)}")


def _release(ctx: _Ctx) -> _Effect:
    """SPC-5 5.14.11.2: RELEASE by the holder with the matching type and scope
    releases the reservation (for all-registrants types, for every holder);
    by a non-holder it is a GOOD no-op. A GOOD to a type mismatch, which the
    backend answers with 26/04, contradicts our view: verify."""
    cur = ctx.cur
    if not cur.holder:
        return _Effect({}, _stale(ctx), "release by a non-holder: no-op")
    if ctx.cdb.rtype != cur.rtype or ctx.cdb.scope != cur.scope:
        return _Effect({}, True, "GOOD to RELEASE with a type other than the one tracked")
    released = GuestPrState(cur.key, cur.aptpl)
    updates = {ctx.me: released}
    if cur.rtype.all_registrants:
        for g, s in ctx.others.items():
            if s.holder:
                updates[g] = GuestPrState(s.key, s.aptpl)
    return _Effect(updates, _stale(ctx), f"released {words(cur.rtype)}")


def _clear(ctx: _Ctx) -> _Effect:
    """SPC-5 5.14.11.5: CLEAR removes the reservation and every registration
    of every nexus: every guest of the device is left with nothing."""
    return _Effect(
        {g: GuestPrState() for g in ctx.guests} | {ctx.me: GuestPrState()}, False, "cleared"
    )


def _preempt(ctx: _Ctx) -> _Effect:
    """SPC-5 5.14.11.4 (PREEMPT; PREEMPT AND ABORT has the same effect on
    registrations and reservations).

    The caller stays registered with RK. SARK = 0 is legal only against an
    all-registrants reservation: every other registration goes and the
    caller holds a new reservation of the CDB's type. SARK != 0 removes every
    other registration with that key; if the reservation is a non-AR one held
    with key SARK the caller becomes its holder, with the CDB's type. Whether
    that was so depends on registrations outside the device: always verify.
    """
    p = ctx.basic
    me = replace(ctx.cur, key=p.rk)
    t, scope = ctx.rtype, ctx.cdb.scope
    updates: dict[str, GuestPrState] = {}
    if p.sark == 0:
        for g in ctx.others:
            updates[g] = GuestPrState()
        if t is not None:
            me = replace(me, holder=True, rtype=t, scope=scope)
        updates[ctx.me] = me
        return _Effect(
            updates, True, "preempted all other registrants (all-registrants reservation)"
        )
    for g, s in ctx.others.items():
        if s.key == p.sark:
            updates[g] = GuestPrState()
    holder = next((s for s in ctx.guests.values() if s.holder), None)
    note = f"preempted key 0x{p.sark:x}"
    if (
        holder is not None
        and not holder.rtype.all_registrants
        and holder.key == p.sark
        and t is not None
    ):
        me = replace(me, holder=True, rtype=t, scope=scope)
        note += f", took the reservation as {words(t)}"
    # Otherwise the reservation is not touched (SARK is not its holder's
    # key, or it is all-registrants and we hold it already) or is held
    # outside the device: the verification tells.
    updates[ctx.me] = me
    return _Effect(updates, True, note)


def _register_and_move(ctx: _Ctx) -> _Effect:
    """SPC-5 5.14.8: the holder (non-AR) moves its reservation, type and
    scope kept, to the nexus named by the TransportID, which gets registered
    with SARK; UNREG also drops the caller's registration. If that nexus is
    one of the device's own, the receiving guest's state follows."""
    p = ctx.move
    cur = ctx.cur
    me = GuestPrState() if p.unreg else GuestPrState(cur.key, cur.aptpl)
    updates = {ctx.me: me}
    verify = _stale(ctx) or not cur.holder
    dest = [
        g
        for g, tid in ctx.transport_ids.items()
        if g != ctx.me and _names_port(p.transport_id, tid)
    ]
    if p.transport_id.isid is None and dest:
        verify = True  # a name-only TransportID: which of our ports got it is the target's call
    elif len(dest) == 1 and cur.holder:
        old = ctx.guests.get(dest[0], GuestPrState())
        updates[dest[0]] = GuestPrState(p.sark, p.aptpl or old.aptpl, True, cur.rtype, cur.scope)
    return _Effect(updates, verify, f"moved the reservation to {p.transport_id}")


def _names_port(tid: TransportId, ours: TransportId) -> bool:
    if tid.name.lower() != ours.name.lower():
        return False
    return tid.isid is None or tid.isid == ours.isid


def _replace_lost(ctx: _Ctx) -> _Effect:
    """SPC-5 5.14.12 (REPLACE LOST RESERVATION): the caller becomes the holder
    of a new reservation with the CDB's type and scope. Targets differ in how
    they treat the keys, so the rest is verified."""
    t = ctx.rtype
    if t is None:
        return _Effect({}, True, "GOOD to REPLACE LOST RESERVATION with invalid type")
    key = ctx.cur.key or ctx.params.rk or ctx.params.sark
    return _Effect(
        {ctx.me: replace(ctx.cur, key=key, holder=True, rtype=t, scope=ctx.cdb.scope)},
        True,
        "replaced lost reservation",
    )


def _one_reservation(ctx: _Ctx, effect: _Effect) -> _Effect:
    """SPC-5 5.14.10: a logical unit has at most one persistent reservation:
    one holder, or every registrant for an all-registrants type. If the rule
    made the caller a holder, any other guest still tracked as holding a
    different reservation was stale: it no longer holds one (verify)."""
    mine = effect.updates.get(ctx.me, ctx.cur)
    if not mine.holder:
        return effect
    updates = dict(effect.updates)
    fixed = False
    for g, s in ctx.others.items():
        s = updates.get(g, s)
        if s.holder and not (
            mine.rtype.all_registrants and s.rtype == mine.rtype and s.scope == mine.scope
        ):
            updates[g] = GuestPrState(s.key, s.aptpl)
            fixed = True
    if not fixed:
        return effect
    return _Effect(updates, True, effect.note + "; another guest's tracked reservation was stale")


# Parameter list layout and rule per service action.
_RULES: dict[PrOutAction, tuple[type[PrOutParams] | type[RegisterAndMoveParams], _Rule]] = {
    PrOutAction.REGISTER: (PrOutParams, _register),
    PrOutAction.RESERVE: (PrOutParams, _reserve),
    PrOutAction.RELEASE: (PrOutParams, _release),
    PrOutAction.CLEAR: (PrOutParams, _clear),
    PrOutAction.PREEMPT: (PrOutParams, _preempt),
    PrOutAction.PREEMPT_AND_ABORT: (PrOutParams, _preempt),
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: (PrOutParams, _register_ignore),
    PrOutAction.REGISTER_AND_MOVE: (RegisterAndMoveParams, _register_and_move),
    PrOutAction.REPLACE_LOST_RESERVATION: (PrOutParams, _replace_lost),
}


def puts_state_in_doubt(asc_ascq: tuple[int, int]) -> bool:
    asc, ascq = asc_ascq
    return (asc, ascq) in VERIFY_UNIT_ATTENTIONS or (asc, None) in VERIFY_UNIT_ATTENTIONS


def _status_name(status: int) -> str:
    return Status(status).name if status in Status._value2member_map_ else f"{status:#04x}"


def _decode_cdb(cdb: bytes | bytearray | memoryview) -> PrOutCdb | None:
    if len(cdb) < PR_OUT_CDB_LEN:
        return None
    try:
        return PrOutCdb.decode(bytes(cdb[:PR_OUT_CDB_LEN]))
    except PrDecodeError:
        return None


class PrSnooper:
    """Tracks one device's guests' PR state (``DevicePrState``)."""

    def __init__(
        self,
        state: DevicePrState | None = None,
        *,
        mode: IdentityMode | str = IdentityMode.GUEST,
        transport_ids: Mapping[str, TransportId] | None = None,
    ) -> None:
        self.state = state if state is not None else DevicePrState()
        self.mode = IdentityMode(mode)
        self._shared = self.mode is IdentityMode.HOST
        # state key -> the guest's backend initiator port: used by REGISTER
        # AND MOVE and by apply_full_status. The shell fills it as sessions open.
        self.transport_ids: dict[str, TransportId] = {
            k.lower(): v for k, v in (transport_ids or {}).items()
        }
        # state key -> the guest's other paths' ports (multipath, paths.py):
        # a registration on any of them is the guest's too
        self.path_ids: dict[str, tuple[TransportId, ...]] = {}

    def key_of(self, guest: str) -> str:
        return SHARED_NEXUS if self._shared else guest.lower()

    def set_transport_id(self, guest: str, tid: TransportId) -> None:
        self.transport_ids[self.key_of(guest)] = tid

    @property
    def pending_verification(self) -> frozenset[str]:
        return frozenset(self.state.unverified)

    # ---------------------------------------------------------- observing
    def observe(
        self,
        guest: str,
        cdb: bytes | bytearray | memoryview,
        data_out: bytes | bytearray | memoryview,
        result: Result,
        *,
        scsi2_held: bool = False,
    ) -> SnoopOutcome:
        """Feed any command's answer from the backend. Never raises. Cheap
        for the data path: a non-PR-OUT answer without CHECK CONDITION
        returns at once. ``scsi2_held``: a SCSI-2 reservation is known to
        be held on the LU (see ``snoop_pr_out``)."""
        key = self.key_of(guest)
        is_pr_out = len(cdb) >= 1 and cdb[0] == Opcode.PERSISTENT_RESERVE_OUT
        if not is_pr_out and result.status != Status.CHECK_CONDITION:
            if (
                result.status == Status.GOOD
                and len(cdb) >= 1
                and cdb[0] == Opcode.PERSISTENT_RESERVE_IN
            ):
                return self._observe_pr_in(key, cdb, result)
            return SnoopOutcome(key)
        ua = unit_attention(result)
        doubt = ""
        if ua is not None and puts_state_in_doubt(ua):
            doubt = f"unit attention {ua[0]:02X}/{ua[1]:02X}"
            self.state.mark_unverified(key)
        if is_pr_out:
            out = self.snoop_pr_out(guest, cdb, data_out, result, scsi2_held=scsi2_held)
            if doubt and not out.verify:
                out = replace(out, verify=True, note=f"{out.note}; {doubt}")
            return out
        return SnoopOutcome(key, None, (), bool(doubt), doubt)

    def _observe_pr_in(
        self, key: str, cdb: bytes | bytearray | memoryview, result: Result
    ) -> SnoopOutcome:
        """A guest's own READ KEYS / READ RESERVATION / READ FULL STATUS
        carries the backend's PRgeneration. It moves on every REGISTER,
        CLEAR, PREEMPT and REGISTER AND MOVE by anyone (SPC-5 6.16.2), so a
        value other than the one of the last verification means something
        changed that snooping may not have seen (e.g. another initiator's
        REGISTER AND MOVE onto our nexus, which sends no unit attention):
        verify. The answer itself is not applied: it may have been executed
        before a PR OUT whose answer was already snooped."""
        if self.state.generation is None or len(result.data_in) < 4:
            return SnoopOutcome(key)
        try:
            action = PrInCdb.decode(bytes(cdb[:10])).action
        except PrDecodeError:
            return SnoopOutcome(key)
        if action not in _GENERATION_CARRIERS:
            return SnoopOutcome(key)
        generation = int.from_bytes(bytes(result.data_in[:4]), "big")
        if generation == self.state.generation:
            return SnoopOutcome(key)
        self.state.mark_unverified(key)
        note = f"PRgeneration {generation} != {self.state.generation} at the last verification"
        return SnoopOutcome(key, None, (), True, note)

    def snoop_pr_out(
        self,
        guest: str,
        cdb: bytes | bytearray | memoryview,
        data_out: bytes | bytearray | memoryview,
        result: Result,
        *,
        scsi2_held: bool = False,
    ) -> SnoopOutcome:
        """Apply one PR OUT answered by the backend. Never raises. While a
        SCSI-2 reservation is held (``scsi2_held``) every PR OUT conflicts
        (SPC-5 5.14.3), so a RESERVATION CONFLICT then says nothing about
        the tracked key."""
        key = self.key_of(guest)
        cur = self.state.get(key)
        c = _decode_cdb(cdb)
        if c is None:
            return SnoopOutcome(key, None, (), False, "not a decodable PR OUT CDB: ignored")
        if not isinstance(c.action, PrOutAction):
            return SnoopOutcome(
                key, None, (), False, f"unknown service action {int(c.action):#04x}: ignored"
            )
        action = c.action
        layout, rule = _RULES[action]
        data = bytes(data_out[: c.param_len])
        try:
            params = layout.decode(data)
        except (PrDecodeError, ValueError):
            params = None
        if result.status != Status.GOOD:
            verify = (
                result.status == Status.RESERVATION_CONFLICT
                and not scsi2_held
                and action in _CONFLICT_MEANS_KEY_MISMATCH
                and isinstance(params, PrOutParams)
                and params.rk == cur.key
                and (cur.registered or action is PrOutAction.REGISTER)
            )
            if verify:
                self.state.mark_unverified(key)
            return SnoopOutcome(
                key, action, (), verify, f"status {_status_name(result.status)}: no change"
            )
        if params is None:
            self.state.mark_unverified(key)
            return SnoopOutcome(
                key, action, (), True, "GOOD to a parameter list that does not decode: no change"
            )
        if action in _BUMPS_GENERATION and self.state.generation is not None:
            # Keep the expected PRgeneration in step with our own successful
            # commands, so the guest's next PR IN only triggers verification
            # when someone else changed something. A target counting
            # differently costs one extra verification, never a wrong state.
            self.state.generation = (self.state.generation + 1) & 0xFFFFFFFF
        ctx = _Ctx(key, cur, c, params, dict(self.state.guests) | {key: cur}, self.transport_ids)
        effect = _one_reservation(ctx, rule(ctx))
        changes = self._apply(effect.updates, f"{action.name}: {effect.note}")
        if effect.verify:
            self.state.mark_unverified(key)
        return SnoopOutcome(key, action, changes, effect.verify, effect.note)

    def _apply(self, updates: Mapping[str, GuestPrState], reason: str) -> tuple[StateChange, ...]:
        changes = []
        for g, after in updates.items():
            before = self.state.get(g)
            if after != before:
                self.state.set(g, after)
                changes.append(StateChange(g, before, after, reason))
        return tuple(changes)

    # -------------------------------------------------------- verification
    def apply_read_reservation(self, guest: str, rr: ReadReservation) -> SnoopOutcome:
        """READ RESERVATION as QEMU uses it after a PREEMPT. It tells who
        holds the reservation only by key, so a guest is taken as the holder
        when the key is its own and no other guest of the device has that key
        (then ``verify`` stays False); the registration itself is not checked.
        Otherwise the guest stays unverified: ask READ FULL STATUS."""
        key = self.key_of(guest)
        rtype = PrType(int(rr.rtype)) if int(rr.rtype) in PrType._value2member_map_ else PrType.NONE
        updates: dict[str, GuestPrState] = {}
        ambiguous = False
        for g, s in self.state.guests.items():
            if rr.key is None:
                updates[g] = GuestPrState(s.key, s.aptpl)
            elif rtype.all_registrants:
                updates[g] = GuestPrState(
                    s.key,
                    s.aptpl,
                    s.registered,
                    rtype if s.registered else PrType.NONE,
                    rr.scope if s.registered else 0,
                )
            elif s.key != rr.key:
                updates[g] = GuestPrState(s.key, s.aptpl)
        if rr.key is not None and not rtype.all_registrants:
            same = [g for g, s in self.state.guests.items() if s.key == rr.key]
            if len(same) == 1:
                s = self.state.guests[same[0]]
                updates[same[0]] = GuestPrState(s.key, s.aptpl, True, rtype, rr.scope)
            elif same:
                ambiguous = True
        changes = self._apply(updates, "READ RESERVATION")
        if ambiguous or rr.truncated:
            self.state.mark_unverified(key)
            return SnoopOutcome(
                key, None, changes, True, "several guests registered with the reservation key"
            )
        self.state.mark_verified(key)
        self.state.generation = rr.generation
        return SnoopOutcome(key, None, changes, False, "verified by READ RESERVATION")

    def apply_full_status(
        self,
        entries: ReadFullStatus | Iterable[FullStatusEntry],
        our_transport_ids: Mapping[str, TransportId] | None = None,
    ) -> tuple[StateChange, ...]:
        """Rewrite the state of the device's guests from READ FULL STATUS
        (``reconcile_full_status``). ``our_transport_ids``: state key ->
        backend port; default the ports set with ``set_transport_id``.
        Raises ``ReconcileError`` only for a truncated answer."""
        ids = {k.lower(): v for k, v in (our_transport_ids or self.transport_ids).items()}
        new, changes = reconcile_full_status(self.state, entries, ids, self.path_ids)
        self.state.guests, self.state.generation, self.state.unverified = (
            new.guests,
            new.generation,
            new.unverified,
        )
        return tuple(changes)

    def apply_keys(self, read_keys: ReadKeys, read_reservation: ReadReservation) -> KeysReconcile:
        """Best-effort verification on targets without READ FULL STATUS."""
        r = reconcile_keys(self.state, read_keys, read_reservation)
        self.state.guests, self.state.generation, self.state.unverified = (
            r.state.guests,
            r.state.generation,
            r.state.unverified,
        )
        return r


__all__ = [
    "NOTHING",
    "PrSnooper",
    "SnoopOutcome",
    "UnknownKind",
    "VERIFY_UNIT_ATTENTIONS",
    "puts_state_in_doubt",
]
