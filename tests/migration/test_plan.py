"""Takeover plans, checked op by op and by running them on a model target."""

from __future__ import annotations

import pytest

from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.migration.errors import PlanError
from prmigrate.migration.plan import (
    MOVE_CASES,
    MOVE_REFUSALS,
    Holding,
    Move,
    MovePort,
    Observed,
    Phase,
    PrOp,
    SetupPlan,
    Side,
    TakeoverPlan,
    TargetTraits,
    cleanup_plan,
    fence_ops,
    give_back_plan,
    qemu_plan,
    rollback_plan,
    setup_plan,
    takeover_plan,
)
from prmigrate.scsi.constants import PrOutAction, PrType
from prmigrate.scsi.transport_id import TransportId

A = PrOutAction
K1, K2 = 0xAAAA, 0xBBBB
TYPES = [PrType(t) for t in (1, 3, 5, 6, 7, 8)]


class Conflict(Exception):
    pass


# The model target's nexuses as REGISTER AND MOVE names them: a TransportID
# per (side, guest), and the relative target port each side reaches the LUN through.
_NAMES = {Side.SOURCE: "iqn.2026-12.test:hosta", Side.DESTINATION: "iqn.2026-12.test:hostb"}
_PORTS = {Side.SOURCE: 1, Side.DESTINATION: 2}
_NEXUS_OF: dict[tuple[str, int | None], tuple[Side, str]] = {}


def port_of(side: Side, guest: str) -> MovePort:
    tid = TransportId(_NAMES[side], 0x23D000000000 + sum(guest.encode()))
    _NEXUS_OF[tid.key()] = (side, guest)
    return MovePort(tid, _PORTS[side])


def ports(pr: DevicePrState, side: Side = Side.DESTINATION) -> dict[str, MovePort]:
    return {g: port_of(side, g) for g in pr.guests}


OTHER = "iqn.2026-12.test:other,i,0x23d000000099"  # another host's nexus, outside the device


class FakeTarget:
    """A small SPC-5 PR model (REFERENCE 2) with LIO's two quirks as options."""

    def __init__(self, *, lio: bool = False, ram: bool | str = True) -> None:
        self.regs: dict[tuple[Side, str], int] = {}
        self.foreign: dict[str, int] = {}  # nexuses outside the device (never hold here)
        self.ram = ram  # REGISTER AND MOVE supported ("tgt": as tgt 1.0.85 does it)
        self.holder: tuple[Side, str] | None = None  # None with an AR type: all registrants
        self.rtype = PrType.NONE
        self.scope = 0
        self.lio = lio
        self.log: list[str] = []

    # -- observation
    def observe(self) -> Observed:
        key = None
        if self.rtype:
            key = 0 if self.rtype.all_registrants else self.regs[self.holder]  # type: ignore[index]
        foreign: dict[int, tuple[str, ...]] = {}
        for name, k in sorted(self.foreign.items()):
            foreign[k] = (*foreign.get(k, ()), name)
        return Observed(frozenset(self.regs.values()) | frozenset(self.foreign.values()), key, self.rtype, None, foreign)

    def holds(self, n: tuple[Side, str]) -> bool:
        if not self.rtype or n not in self.regs:
            return False
        return self.rtype.all_registrants or self.holder == n

    # -- SPC-5 rules
    def _unregister(self, n: tuple[Side, str]) -> None:
        del self.regs[n]
        if self.rtype.all_registrants and not self.regs:
            self.rtype, self.holder = PrType.NONE, None
        elif self.rtype and not self.rtype.all_registrants and self.holder == n:
            self.rtype, self.holder = PrType.NONE, None

    def run(self, op: PrOp) -> None:
        n = (op.side, op.guest)
        self.log.append(str(op))
        registered = n in self.regs
        if op.action is A.REGISTER:
            if not registered:
                if op.rk:
                    raise Conflict("REGISTER rk from unregistered")
                if op.sark:
                    self.regs[n] = op.sark
            elif op.rk != self.regs[n]:
                raise Conflict("REGISTER rk mismatch")
            elif op.sark == 0:
                self._unregister(n)
            else:
                self.regs[n] = op.sark
        elif op.action is A.REGISTER_AND_IGNORE_EXISTING_KEY:
            if op.sark:
                self.regs[n] = op.sark
            elif registered:
                self._unregister(n)
        elif op.action is A.RESERVE:
            if not registered:
                raise Conflict("RESERVE unregistered")
            if not self.rtype:
                self.rtype, self.scope = op.rtype, op.scope
                self.holder = None if op.rtype.all_registrants else n
            elif not self.holds(n) or self.rtype != op.rtype:
                raise Conflict("RESERVE conflicts")
        elif op.action is A.PREEMPT:
            if not registered or self.regs[n] != op.rk:
                raise Conflict("PREEMPT from unregistered / rk mismatch")
            if self.lio and op.rtype is PrType.NONE:
                raise ValueError("LIO: PREEMPT with TYPE=0 -> INVALID FIELD IN CDB")
            if self.rtype and not self.rtype.all_registrants and op.sark == self.regs[self.holder]:  # type: ignore[index]
                if op.rtype is PrType.NONE:
                    raise ValueError("PREEMPT of the holder with TYPE=0 -> INVALID FIELD IN CDB")
                for m in [m for m, k in self.regs.items() if k == op.sark and m != n]:
                    del self.regs[m]
                self._preempt_foreign(op.sark)
                self.holder, self.rtype, self.scope = n, op.rtype, op.scope
            elif self.rtype.all_registrants and op.sark == 0:
                for m in [m for m in self.regs if m != n]:
                    del self.regs[m]
                self.rtype, self.scope = op.rtype, op.scope
            else:
                if op.sark == 0:
                    raise ValueError("INVALID FIELD IN PARAMETER LIST")
                victims = [m for m, k in self.regs.items() if k == op.sark and m != n]
                if self.lio and not self.rtype:
                    victims += [n]
                if not victims and op.sark not in self.foreign.values():
                    raise Conflict("PREEMPT: no registration with that key")
                for m in victims:
                    self._unregister(m)
                self._preempt_foreign(op.sark)
        elif op.action is A.REGISTER_AND_MOVE:
            # SPC-5 5.14.8 / 6.17.4
            if not self.ram:
                raise ValueError("REGISTER AND MOVE not supported -> INVALID FIELD IN CDB")
            if not registered or self.regs[n] != op.rk:
                raise Conflict("REGISTER AND MOVE from unregistered / rk mismatch")
            if self.ram == "tgt" and self.holder != n:
                return  # tgt 1.0.85: GOOD from a registered non-holder, nothing done
            if not self.rtype or self.rtype.all_registrants or self.holder != n:
                raise Conflict("REGISTER AND MOVE from a non-holder, or an AR type")
            if op.sark == 0 or op.move_to is None:
                raise ValueError("REGISTER AND MOVE SARK 0 -> INVALID FIELD IN PARAMETER LIST")
            dest = _NEXUS_OF.get(op.move_to.transport_id.key())
            if dest is None or dest == n or op.move_to.rel_tgt_port != _PORTS[dest[0]]:
                raise ValueError("REGISTER AND MOVE to the caller or to no nexus -> INVALID FIELD IN PARAMETER LIST")
            self.regs[dest] = op.sark
            self.holder = dest
            if op.unreg:
                del self.regs[n]
        else:
            raise AssertionError(op)

    def _preempt_foreign(self, key: int) -> None:
        """A PREEMPT removes every registration with the key: the other host's too."""
        self.log += [f"collateral: {m} preempted" for m, k in self.foreign.items() if k == key]
        self.foreign = {m: k for m, k in self.foreign.items() if k != key}

    def apply(self, ops: tuple[PrOp, ...] | list[PrOp]) -> None:
        for op in ops:
            try:
                self.run(op)
            except Conflict:
                if not (op.conflict_ok or op.probe):
                    raise
            else:
                if op.probe:
                    raise AssertionError(f"probe answered GOOD: {op}")

    # -- set the scene
    @staticmethod
    def with_state(pr: DevicePrState, side: Side = Side.SOURCE, *, lio: bool = False, ram: bool | str = True,
                   foreign: dict[str, int] | None = None) -> FakeTarget:
        t = FakeTarget(lio=lio, ram=ram)
        t.foreign = dict(foreign or {})
        for name, g in pr.guests.items():
            if g.key:
                t.regs[(side, name)] = g.key
            if g.holder:
                t.rtype, t.scope = g.rtype, g.scope
                t.holder = None if g.rtype.all_registrants else (side, name)
        return t

    def matches(self, pr: DevicePrState, side: Side) -> bool:
        """The target shows ``pr`` on ``side``'s nexuses and nothing on the other side."""
        other = Side.DESTINATION if side is Side.SOURCE else Side.SOURCE
        if any(n[0] is other for n in self.regs):
            return False
        for name, g in pr.guests.items():
            if self.regs.get((side, name), 0) != g.key:
                return False
            if g.holder and not (self.holds((side, name)) and self.rtype == g.rtype):
                return False
        return True


def state(**guests: GuestPrState) -> DevicePrState:
    return DevicePrState({k: v for k, v in guests.items()})


def holder(key: int = K1, rtype: PrType = PrType.WRITE_EXCLUSIVE, aptpl: bool = False) -> GuestPrState:
    return GuestPrState(key, aptpl, True, rtype, 0)


def reg(key: int = K1) -> GuestPrState:
    return GuestPrState(key)


def migrate(pr: DevicePrState, *, lio: bool = False, register_only: str = "release", observe: bool = True) -> tuple[FakeTarget, int]:
    """Run setup, release, takeover and fixups on a model target."""
    t = FakeTarget.with_state(pr, lio=lio)
    sp = setup_plan(pr, t.observe() if observe else None)
    t.apply(sp.ops)
    tp = takeover_plan(pr, sp.registered, t.observe() if observe else None, TargetTraits(), register_only=register_only)
    t.apply(tp.release)
    t.apply(tp.destination_ops)
    return t, tp.round_trips


# ------------------------------------------------------------------ per type


@pytest.mark.parametrize("rtype", [t for t in TYPES if not t.all_registrants])
def test_single_holder_is_one_preempt(rtype: PrType) -> None:
    pr = state(g1=holder(K1, rtype, aptpl=True))
    sp = setup_plan(pr)
    assert sp.ops == (PrOp(Side.DESTINATION, "g1", A.REGISTER_AND_IGNORE_EXISTING_KEY, 0, K1, aptpl=True, phase=Phase.SETUP, why=sp.ops[0].why),)
    assert not sp.ops[0].inside_pause
    tp = takeover_plan(pr, sp.registered)
    assert tp.release == () and tp.fixups == ()
    (op,) = tp.takeover
    assert (op.side, op.action, op.rk, op.sark, op.rtype, op.scope, op.inside_pause) == (Side.DESTINATION, A.PREEMPT, K1, K1, rtype, 0, True)
    assert tp.round_trips == 1
    for lio in (False, True):
        t, rt = migrate(pr, lio=lio)
        assert t.matches(pr, Side.DESTINATION) and rt == 1


@pytest.mark.parametrize("rtype", [t for t in TYPES if t.all_registrants])
def test_all_registrants_source_releases(rtype: PrType) -> None:
    pr = state(g1=holder(K1, rtype), g2=holder(K2, rtype))
    sp = setup_plan(pr)
    tp = takeover_plan(pr, sp.registered)
    assert tp.takeover == () and tp.fixups == ()
    assert [(o.side, o.guest, o.action, o.sark) for o in tp.release] == [
        (Side.SOURCE, "g1", A.REGISTER_AND_IGNORE_EXISTING_KEY, 0),
        (Side.SOURCE, "g2", A.REGISTER_AND_IGNORE_EXISTING_KEY, 0),
    ]
    for lio in (False, True):
        t, _ = migrate(pr, lio=lio)
        assert t.matches(pr, Side.DESTINATION)
        assert t.rtype == rtype  # the AR reservation never went away


@pytest.mark.parametrize("rtype", [t for t in TYPES if t.all_registrants])
def test_all_registrants_key_changed_after_setup_uses_preempt(rtype: PrType) -> None:
    pr = state(g1=holder(K2, rtype))
    tp = takeover_plan(pr, {"g1": K1})  # setup registered the old key
    assert [o.action for o in tp.takeover] == [A.REGISTER_AND_IGNORE_EXISTING_KEY, A.PREEMPT]
    assert tp.takeover[1].rtype == rtype and tp.takeover[1].sark == K2
    assert [o.action for o in tp.fixups] == [A.REGISTER_AND_IGNORE_EXISTING_KEY]
    t = FakeTarget.with_state(pr)
    t.regs[(Side.DESTINATION, "g1")] = K1
    t.apply(tp.release + tp.destination_ops)
    assert t.matches(pr, Side.DESTINATION) and t.rtype == rtype


def test_register_only_source_releases() -> None:
    pr = state(g1=reg(K1))
    tp = takeover_plan(pr, setup_plan(pr).registered)
    assert tp.takeover == () and len(tp.release) == 1 and tp.round_trips == 1
    assert tp.release[0].side is Side.SOURCE and tp.release[0].inside_pause
    for lio in (False, True):
        t, _ = migrate(pr, lio=lio)
        assert t.matches(pr, Side.DESTINATION)


def test_register_only_preempt_variant_uses_we_and_reregisters() -> None:
    pr = state(g1=reg(K1))
    tp = takeover_plan(pr, {"g1": K1}, register_only="preempt")
    (p,) = tp.takeover
    assert p.action is A.PREEMPT and p.rtype is PrType.WRITE_EXCLUSIVE  # LIO rejects TYPE=0
    assert [o.action for o in tp.fixups] == [A.REGISTER_AND_IGNORE_EXISTING_KEY]  # LIO drops own
    for lio in (False, True):
        t, rt = migrate(pr, lio=lio, register_only="preempt")
        assert t.matches(pr, Side.DESTINATION) and rt == 2
    lenient = takeover_plan(pr, {"g1": K1}, traits=TargetTraits(True, False, False), register_only="preempt")
    assert lenient.takeover[0].rtype is PrType.NONE and lenient.fixups == ()


def test_no_pr_state_no_ops() -> None:
    pr = DevicePrState()
    assert setup_plan(pr).ops == ()
    tp = takeover_plan(pr, {})
    assert tp.round_trips == 0 and not tp.preempts
    assert rollback_plan(pr, preempted=None) == ()
    assert qemu_plan(pr) == ()


def test_holder_and_register_only_guests() -> None:
    pr = state(g1=holder(K1, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY), g2=reg(K2))
    t, rt = migrate(pr)
    assert t.matches(pr, Side.DESTINATION) and rt == 2


def test_shared_key_fixup_reregisters_other_guest() -> None:
    pr = state(g1=holder(K1), g2=reg(K1))
    tp = takeover_plan(pr, {"g1": K1, "g2": K1})
    assert tp.release == ()  # the PREEMPT removes g2's source registration too
    assert [(o.guest, o.phase) for o in tp.fixups] == [("g2", Phase.FIXUP)]
    t, _ = migrate(pr)
    assert t.matches(pr, Side.DESTINATION)


def test_key_changed_or_dropped_since_setup() -> None:
    pr = state(g1=holder(K2))
    tp = takeover_plan(pr, {"g1": K1, "gone": K1})
    assert [(o.guest, o.action, o.sark) for o in tp.takeover] == [
        ("gone", A.REGISTER_AND_IGNORE_EXISTING_KEY, 0),
        ("g1", A.REGISTER_AND_IGNORE_EXISTING_KEY, K2),
        ("g1", A.PREEMPT, K2),
    ]


def test_fenced_key_is_not_registered_again() -> None:
    pr = state(g1=holder(K1))
    sp = setup_plan(pr, Observed(frozenset({K2}), K2, PrType.WRITE_EXCLUSIVE))
    assert sp.ops == () and sp.skipped == ("g1",)
    tp = takeover_plan(pr, {}, Observed(frozenset({K2}), K2, PrType.WRITE_EXCLUSIVE))
    assert tp.round_trips == 0 and tp.notes
    # Without a fresh observation at the pause, setup's finding still holds...
    assert sp.fenced == {"g1": K1}
    assert takeover_plan(pr, sp.registered, fenced=sp.fenced).destination_ops == ()
    # ...unless the guest has registered a new key since.
    moved = takeover_plan(state(g1=reg(K2)), sp.registered, fenced=sp.fenced)
    assert [(o.action, o.sark) for o in moved.takeover] == [(A.REGISTER_AND_IGNORE_EXISTING_KEY, K2)]


def test_read_full_status_checks_the_source_nexus() -> None:
    pr = state(g1=reg(K1), g2=reg(K1))
    obs = Observed(frozenset({K1}), None, PrType.NONE, source_keys={"g1": K1})
    assert setup_plan(pr, obs).skipped == ("g2",)


def test_unconfirmed_holder_moves_as_registration_via_destination() -> None:
    pr = state(g1=holder(K1))
    obs = Observed(frozenset({K1}), None, PrType.NONE)  # the reservation is gone
    tp = takeover_plan(pr, {"g1": K1}, obs)
    assert tp.release == ()  # the source planned without observing: it did not release
    assert tp.takeover[0].action is A.PREEMPT and tp.takeover[0].rtype is PrType.WRITE_EXCLUSIVE
    t = FakeTarget(lio=True)
    t.regs = {(Side.SOURCE, "g1"): K1, (Side.DESTINATION, "g1"): K1}
    t.apply(tp.destination_ops)
    assert t.regs == {(Side.DESTINATION, "g1"): K1} and not t.rtype


def test_unverified_holder_without_observation_gets_lio_fixup() -> None:
    pr = state(g1=holder(K1))
    pr.unverified = {"g1"}
    tp = takeover_plan(pr, {"g1": K1})
    assert [o.action for o in tp.fixups] == [A.REGISTER_AND_IGNORE_EXISTING_KEY]


def test_inconsistent_state_refused() -> None:
    with pytest.raises(PlanError):
        takeover_plan(state(g1=holder(K1), g2=holder(K2)), {})
    with pytest.raises(PlanError):
        setup_plan(state(g1=GuestPrState(0, False, True, PrType.WRITE_EXCLUSIVE)))


# ------------------------------------------------------------------ rollback


@pytest.mark.parametrize("rtype", TYPES)
@pytest.mark.parametrize("lio", [False, True])
def test_rollback_after_takeover_restores_source(rtype: PrType, lio: bool) -> None:
    pr = state(g1=holder(K1, rtype), g2=reg(K2))
    t = FakeTarget.with_state(pr, lio=lio)
    sp = setup_plan(pr, t.observe())
    t.apply(sp.ops)
    tp = takeover_plan(pr, sp.registered, t.observe())
    t.apply(tp.release + tp.destination_ops)
    assert t.matches(pr, Side.DESTINATION)
    t.apply(rollback_plan(pr, preempted=True, released=[o.guest for o in tp.release], registered_on_dest=sp.registered))
    t.apply(cleanup_plan(sp.registered))
    assert t.matches(pr, Side.SOURCE)


@pytest.mark.parametrize("rtype", TYPES)
def test_rollback_when_destination_dropped_first(rtype: PrType) -> None:
    """The destination unregistered before the source reclaimed (its hold timer
    fired): the reservation vanished; RESERVE re-creates it."""
    pr = state(g1=holder(K1, rtype))
    t, _ = migrate(pr)
    t.apply(cleanup_plan({"g1": K1}))
    t.apply(rollback_plan(pr, preempted=None, released=["g1"] if rtype.all_registrants else []))
    assert t.matches(pr, Side.SOURCE)


def test_rollback_before_preempt_only_reregisters_released() -> None:
    pr = state(g1=holder(K1), g2=reg(K2))
    ops = rollback_plan(pr, preempted=False, released=["g2"])
    assert [(o.guest, o.action, o.sark) for o in ops] == [("g2", A.REGISTER_AND_IGNORE_EXISTING_KEY, K2)]
    assert all(o.side is Side.SOURCE and o.phase is Phase.ROLLBACK for o in ops)


def test_qemu_plan_two_round_trips_inside_pause() -> None:
    pr = state(g1=holder(K1, PrType.EXCLUSIVE_ACCESS))
    ops = qemu_plan(pr)
    assert [(o.action, o.rk, o.sark, o.rtype) for o in ops] == [
        (A.REGISTER, 0, K1, PrType.NONE),
        (A.PREEMPT, K1, K1, PrType.EXCLUSIVE_ACCESS),
    ]
    assert all(o.inside_pause for o in ops)
    t = FakeTarget.with_state(pr)
    t.apply(ops)
    assert t.holds((Side.DESTINATION, "g1"))
    # QEMU passes type 0 for a register-only guest, which LIO refuses.
    with pytest.raises(ValueError):
        FakeTarget.with_state(state(g1=reg(K1)), lio=True).apply(qemu_plan(state(g1=reg(K1))))


def test_prop_builds_cdb_and_params() -> None:
    op = takeover_plan(state(g1=holder(K1, PrType.EXCLUSIVE_ACCESS, aptpl=True)), {"g1": K1}).takeover[0]
    cdb, params = op.cdb(), op.params()
    assert cdb[0] == 0x5F and cdb[1] & 0x1F == A.PREEMPT and cdb[2] == 0x03
    assert params[:8] == K1.to_bytes(8, "big") and params[8:16] == K1.to_bytes(8, "big")
    assert params[20] & 0x01  # APTPL carried


def test_observed_from_pr_in_replies() -> None:
    from prmigrate.scsi.pr import ReadKeys, ReadReservation

    keys = ReadKeys.decode(ReadKeys(3, (K1, K2)).encode())
    resv = ReadReservation.decode(ReadReservation(3, K1, 0, PrType.EXCLUSIVE_ACCESS).encode())
    obs = Observed.from_pr_in(keys, resv)
    assert obs == Observed(frozenset({K1, K2}), K1, PrType.EXCLUSIVE_ACCESS)
    assert obs.holds(holder(K1, PrType.EXCLUSIVE_ACCESS)) and not obs.holds(holder(K2, PrType.EXCLUSIVE_ACCESS))
    none = Observed.from_pr_in(keys, ReadReservation.decode(ReadReservation(3).encode()))
    assert none.reservation_key is None and not none.holds(holder(K1))


def test_a_key_shared_outside_the_device_is_never_preempted() -> None:
    """SPC-5 5.14.11.4.3: a PREEMPT with SARK = key removes every
    registration with that key. When a nexus outside the device (another
    host) shares the holder's key, the move is refused: in setup, and
    inside the pause when the observation there shows it."""
    other = "iqn.2026-11.org.prmigrate:other,i,0x1"
    obs = Observed(frozenset({K1}), K1, PrType.WRITE_EXCLUSIVE, {"g1": K1}, {K1: (other,)})
    pr = state(g1=holder(K1, PrType.WRITE_EXCLUSIVE))
    with pytest.raises(PlanError, match="also registered by .*other.* outside the device"):
        setup_plan(pr, obs)
    with pytest.raises(PlanError):
        takeover_plan(pr, {"g1": K1}, obs)
    # another key, a register-only guest (the source releases: no PREEMPT),
    # an all-registrants holder registered in setup: moved as before
    assert setup_plan(pr, Observed(frozenset({K1, K2}), K1, PrType.WRITE_EXCLUSIVE, {"g1": K1}, {K2: (other,)})).ops
    reg_only = state(g1=reg(K1))
    obs_reg = Observed(frozenset({K1}), None, PrType.NONE, {"g1": K1}, {K1: (other,)})
    tp = takeover_plan(reg_only, setup_plan(reg_only, obs_reg).registered, obs_reg)
    assert not tp.preempts and tp.release
    ar = state(g1=holder(K1, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS))
    obs_ar = Observed(frozenset({K1}), 0, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, {"g1": K1}, {K1: (other,)})
    assert not takeover_plan(ar, setup_plan(ar, obs_ar).registered, obs_ar).preempts
    # a guest fenced meanwhile (its key gone from its source nexus): nothing
    # is preempted for it, so nothing to refuse
    fenced = Observed(frozenset({K1}), K1, PrType.WRITE_EXCLUSIVE, {}, {K1: (other,)})
    assert setup_plan(pr, fenced).skipped == ("g1",)


# ------------------------------------------------------- REGISTER AND MOVE

RAM_TRAITS = TargetTraits(register_and_move=True)


def test_move_cases_table_covers_every_case_and_names_its_clause() -> None:
    assert set(MOVE_CASES) == {(h, shared) for h in Holding for shared in (False, True)}
    assert all("SPC-5" in clause for _how, clause in MOVE_CASES.values())
    assert all(answer and avoided for answer, avoided in MOVE_REFUSALS.values())
    # only a single holder whose key is shared needs REGISTER AND MOVE
    assert [k for k, (how, _) in MOVE_CASES.items() if how is Move.REGISTER_AND_MOVE] == [(Holding.SINGLE, True)]


def migrate_shared(pr: DevicePrState, *, ram: bool = True, lio: bool = False) -> tuple[FakeTarget, SetupPlan, TakeoverPlan]:
    """Setup, release and takeover on a model target where another host's
    nexus shares the key K1."""
    t = FakeTarget.with_state(pr, lio=lio, ram=ram, foreign={OTHER: K1})
    obs = t.observe()
    sp = setup_plan(pr, obs, TargetTraits(register_and_move=ram), ports(pr), ports(pr, Side.SOURCE))
    t.apply(sp.ops)
    tp = takeover_plan(pr, sp.registered, None, TargetTraits(), move=sp.move)
    t.apply(tp.release)
    t.apply(tp.destination_ops)
    return t, sp, tp


@pytest.mark.parametrize("rtype", [t for t in TYPES if not t.all_registrants])
def test_a_shared_key_holder_moves_by_register_and_move(rtype: PrType) -> None:
    """SPC-5 5.14.8: one REGISTER AND MOVE from the source nexus, inside the
    pause; the other host's registration survives; nothing of the source is left."""
    pr = state(g1=holder(K1, rtype, aptpl=True))
    t, sp, tp = migrate_shared(pr)
    assert sp.move == {"g1": port_of(Side.DESTINATION, "g1")}
    # setup: register, then the probe from that non-holder nexus (must conflict)
    reg_op, probe = sp.ops
    assert (reg_op.action, probe.action, probe.probe, probe.side) == (A.REGISTER_AND_IGNORE_EXISTING_KEY, A.REGISTER_AND_MOVE, True, Side.DESTINATION)
    assert probe.move_to == port_of(Side.SOURCE, "g1") and not probe.inside_pause and sp.registered == {"g1": K1}
    (op,) = tp.release
    assert (op.side, op.action, op.rk, op.sark, op.rtype, op.unreg, op.aptpl, op.inside_pause) == (
        Side.SOURCE, A.REGISTER_AND_MOVE, K1, K1, rtype, True, True, True)
    assert op.move_to == port_of(Side.DESTINATION, "g1")
    assert tp.takeover == () and tp.fixups == () and not tp.preempts and tp.round_trips == 1
    assert t.matches(pr, Side.DESTINATION) and t.foreign == {OTHER: K1}
    # the CDB and the parameter list are REGISTER AND MOVE's (SPC-5 6.17.4)
    from prmigrate.scsi.pr import PrOutCdb, RegisterAndMoveParams

    cdb = PrOutCdb.decode(op.cdb())
    params = RegisterAndMoveParams.decode(op.params())
    assert (cdb.action, cdb.rtype, cdb.param_len) == (A.REGISTER_AND_MOVE, rtype, len(op.params()))
    assert (params.rk, params.sark, params.unreg, params.aptpl, params.rel_tgt_port) == (K1, K1, True, True, 2)
    assert params.transport_id == port_of(Side.DESTINATION, "g1").transport_id


@pytest.mark.parametrize("rtype", [None, *(t for t in TYPES if t.all_registrants)])
def test_a_shared_key_without_a_single_holder_needs_no_register_and_move(rtype: PrType | None) -> None:
    """MOVE_CASES: register-only and all-registrants guests move by RELEASE
    (the destination registers in setup, the source unregisters), with or
    without REGISTER AND MOVE in the backend."""
    pr = state(g1=reg(K1) if rtype is None else holder(K1, rtype))
    for ram in (True, False):
        t, sp, tp = migrate_shared(pr, ram=ram)
        assert sp.move == {} and not tp.preempts
        assert [op.action for op in tp.release] == [A.REGISTER_AND_IGNORE_EXISTING_KEY]
        assert t.matches(pr, Side.DESTINATION) and t.foreign == {OTHER: K1}


def test_two_guests_one_key_shared_outside_the_holder_moves_the_other_releases() -> None:
    pr = state(g1=holder(K1, PrType.EXCLUSIVE_ACCESS), g2=reg(K1))
    t, sp, tp = migrate_shared(pr)
    assert [op.action for op in tp.release] == [A.REGISTER_AND_MOVE, A.REGISTER_AND_IGNORE_EXISTING_KEY]
    assert tp.destination_ops == () and tp.round_trips == 2
    assert t.matches(pr, Side.DESTINATION) and t.foreign == {OTHER: K1}


@pytest.mark.parametrize(
    "traits,dest,source,why",
    [
        (TargetTraits(), True, True, "does not support REGISTER AND MOVE"),
        (RAM_TRAITS, False, True, "destination's nexus and target port are not known"),
        (RAM_TRAITS, True, False, "source's nexus is not known"),
        (RAM_TRAITS, "same", True, "destination's nexus is the source's"),
    ],
)
def test_register_and_move_refused_in_setup(traits: TargetTraits, dest: object, source: bool, why: str) -> None:
    """MOVE_REFUSALS: what the target would refuse, the plan refuses before
    the pause (nothing registered), with the reason."""
    pr = state(g1=holder(K1, PrType.WRITE_EXCLUSIVE))
    t = FakeTarget.with_state(pr, foreign={OTHER: K1})
    src = ports(pr, Side.SOURCE)
    dst = src if dest == "same" else ports(pr) if dest else {}
    with pytest.raises(PlanError, match=f"also registered by .*other.*{why}"):
        setup_plan(pr, t.observe(), traits, dst, src if source else {})


def test_a_move_plan_survives_a_key_change_before_the_pause() -> None:
    """The guest registered a new key between setup and the pause:
    REGISTER AND MOVE sets the destination nexus's key to SARK, so no
    re-registration is needed on the destination."""
    before = state(g1=holder(K1, PrType.WRITE_EXCLUSIVE))
    t = FakeTarget.with_state(before, foreign={OTHER: K1})
    sp = setup_plan(before, t.observe(), RAM_TRAITS, ports(before), ports(before, Side.SOURCE))
    t.apply(sp.ops)
    t.regs[(Side.SOURCE, "g1")] = K2  # the guest's REGISTER RK=K1 SARK=K2 on the source
    after = state(g1=holder(K2, PrType.WRITE_EXCLUSIVE))
    tp = takeover_plan(after, sp.registered, None, TargetTraits(), move=sp.move)
    assert tp.destination_ops == () and [op.sark for op in tp.release] == [K2]
    t.apply(tp.release)
    assert t.matches(after, Side.DESTINATION) and t.foreign == {OTHER: K1}


@pytest.mark.parametrize("rtype", [t for t in TYPES if not t.all_registrants])
def test_rollback_after_register_and_move_gives_back_and_never_preempts(rtype: PrType) -> None:
    """The move failed after the REGISTER AND MOVE: the destination moves the
    reservation back to the source's nexus (UNREG: its own registration
    goes), the source registers again and RESERVEs; no PREEMPT anywhere."""
    pr = state(g1=holder(K1, rtype))
    t, sp, tp = migrate_shared(pr)
    back = give_back_plan(pr, sp.move, ports(pr, Side.SOURCE))
    (gb,) = back
    assert (gb.side, gb.action, gb.rk, gb.sark, gb.rtype, gb.unreg, gb.conflict_ok) == (
        Side.DESTINATION, A.REGISTER_AND_MOVE, K1, K1, rtype, True, True)
    assert gb.move_to == port_of(Side.SOURCE, "g1")
    t.apply(back)
    for preempted in (False, True, None):
        ops = rollback_plan(pr, preempted=preempted, released=[op.guest for op in tp.release], moved=["g1"])
        assert A.PREEMPT not in [op.action for op in ops]
        assert [op.action for op in ops] == [A.REGISTER_AND_IGNORE_EXISTING_KEY, A.RESERVE]
    # with another guest of another key, which a destination PREEMPT
    # (DEST_PREEMPT strategy) may have removed: registered again, no PREEMPT
    two = state(g1=holder(K1, rtype), g2=reg(K2))
    ops = rollback_plan(two, preempted=None, released=["g1"], moved=["g1"])
    assert [(op.guest, op.action) for op in ops] == [
        ("g1", A.REGISTER_AND_IGNORE_EXISTING_KEY), ("g1", A.RESERVE), ("g2", A.REGISTER_AND_IGNORE_EXISTING_KEY)]
    t.apply(ops)
    assert t.matches(pr, Side.SOURCE) and t.foreign == {OTHER: K1}
    # the give-back again finds nothing to give (CONFLICT, counted as done)
    t.apply(back)
    assert t.matches(pr, Side.SOURCE)


def test_rollback_while_the_destination_still_holds_fails_instead_of_preempting() -> None:
    pr = state(g1=holder(K1, PrType.WRITE_EXCLUSIVE))
    t, sp, tp = migrate_shared(pr)
    ops = rollback_plan(pr, preempted=None, released=["g1"], moved=["g1"])
    with pytest.raises(Conflict):
        t.apply(ops)  # the RESERVE: the destination holds; the guest stays held
    assert t.foreign == {OTHER: K1}


def test_fence_ops_never_preempt_a_moved_key() -> None:
    pr = state(g1=holder(K1, PrType.WRITE_EXCLUSIVE), g2=reg(K2))
    assert [op.guest for op in fence_ops(pr, {"g1": K1, "g2": K2}, False, moved=["g1"])
            if op.action is A.PREEMPT] == ["g2"]


def test_move_port_on_the_wire() -> None:
    p = port_of(Side.DESTINATION, "g1")
    assert MovePort.from_wire(p.to_wire()) == p
    for bad in (None, [], ["x", 1], [str(p.transport_id), 0], [str(p.transport_id), True],
                [str(p.transport_id), 1 << 16], ["iqn.x,i,0x12", 1], [1, 1]):
        with pytest.raises(ValueError):
            MovePort.from_wire(bad)
