"""Source and destination machines: tables, timings, failures at every phase,
and Hypothesis-driven runs of both machines against a model PR target."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.migration.channel import (
    Abort,
    Ack,
    Channel,
    Message,
    MsgType,
    Resume,
    Role,
    Rollback,
    Setup,
    SetupOk,
    State,
    TakeoverDone,
)
from prmigrate.migration.destination import (
    DESTINATION_TABLE,
    DestinationMigration,
    DestinationState,
)
from prmigrate.migration.errors import AbortReason, EventNotAllowed
from prmigrate.migration.machine import (
    Cancel,
    ChannelLost,
    ChannelUp,
    Connect,
    CreateDevice,
    DeviceFailed,
    DeviceReady,
    DropDevice,
    Finished,
    GuestHeld,
    HandOverGuest,
    HoldGuest,
    IssuePrOps,
    LoadState,
    PrOpsDone,
    ResumeGuest,
    SendMessage,
    Start,
    StateLoaded,
    Timeouts,
)
from prmigrate.migration.plan import Observed, Side, Strategy, TargetTraits
from prmigrate.migration.source import SOURCE_TABLE, SourceMigration, SourceState
from prmigrate.migration.stream import DeviceSnapshot, encode_snapshot
from prmigrate.scsi.constants import PrType

from .test_plan import OTHER, Conflict, FakeTarget, port_of, ports

IDENTITY = {"inquiry_std": "00" * 36, "capacity_blocks": 8, "block_size": 512}
K1, K2 = 0x1111, 0x2222
SS, DS = SourceState, DestinationState


def snap(pr: DevicePrState) -> DeviceSnapshot:
    return DeviceSnapshot("d0", {"name": "d0"}, IDENTITY, pr)


def holder_state(rtype: PrType = PrType.WRITE_EXCLUSIVE) -> DevicePrState:
    return DevicePrState({"g1": GuestPrState(K1, False, True, rtype)})


SCENARIOS = {
    "none": DevicePrState(),
    "WE": holder_state(PrType.WRITE_EXCLUSIVE),
    "EA": holder_state(PrType.EXCLUSIVE_ACCESS),
    "WE_RO+reg": DevicePrState({"g1": GuestPrState(K1, False, True, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY), "g2": GuestPrState(K2)}),
    "EA_RO": holder_state(PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY),
    "WE_AR": DevicePrState({"g1": GuestPrState(K1, False, True, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS), "g2": GuestPrState(K2, False, True, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)}),
    "EA_AR": holder_state(PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS),
    "reg-only": DevicePrState({"g1": GuestPrState(K1, True)}),
    "shared-key": DevicePrState({"g1": GuestPrState(K1, False, True, PrType.EXCLUSIVE_ACCESS), "g2": GuestPrState(K1)}),
}


# ---------------------------------------------------------------- simulator


@dataclass
class Fault:
    kind: str  # link | drop | cancel | dst_cancel | pr_fail | pr_unknown | device_fail
    at: int  # step index (link, drop: message index; pr_*: PR op index)


@dataclass
class Sim:
    pr: DevicePrState
    faults: list[Fault] = field(default_factory=list)
    lio: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    truth: DevicePrState | None = None  # what the target really holds for the guests (default: pr)
    strategy: Strategy = Strategy.PRMIGRATE
    foreign: dict[str, int] = field(default_factory=dict)  # nexuses outside the device sharing keys
    ram: bool | str = True  # the target supports REGISTER AND MOVE ("tgt": as tgt 1.0.85)

    def __post_init__(self) -> None:
        self.target = FakeTarget.with_state(self.pr, lio=self.lio, ram=self.ram, foreign=self.foreign)
        self.src = SourceMigration("m1", snap(self.pr), self.timeouts, self.strategy)
        self.dst = DestinationMigration(timeouts=self.timeouts)
        self.now = 100.0
        self.q: deque[tuple[object, object]] = deque()
        self.link = True
        self.steps = self.msgs = self.props = 0
        self.log: list[str] = []
        self.both_served = False
        self.actions: list[object] = []

    def fault(self, kind: str, at: int) -> bool:
        return any(f.kind == kind and f.at == at for f in self.faults)

    def other(self, m: object) -> object:
        return self.dst if m is self.src else self.src

    def process(self, m: object, actions: list[object]) -> None:
        self.actions += actions
        for a in actions:
            if isinstance(a, SendMessage):
                self.msgs += 1
                if self.link and not self.fault("drop", self.msgs):
                    self.q.append((self.other(m), a.message))
            elif isinstance(a, Connect):
                self.q.append((m, ChannelUp() if self.link else ChannelLost()))
            elif isinstance(a, HoldGuest):
                self.q.append((m, GuestHeld(snap(self.pr))))
            elif isinstance(a, CreateDevice):
                ready = DeviceReady(self.target.observe(), TargetTraits(register_and_move=bool(self.ram)),
                                    ports(self.pr), ports(self.pr, Side.SOURCE))
                self.q.append((m, DeviceFailed("boom") if self.fault("device_fail", 0) else ready))
            elif isinstance(a, LoadState):
                self.q.append((m, StateLoaded()))
            elif isinstance(a, IssuePrOps):
                self.q.append((m, self.run_ops(a)))

    def run_ops(self, a: IssuePrOps) -> PrOpsDone:
        for i, op in enumerate(a.ops):
            self.props += 1
            if self.fault("pr_fail", self.props):
                return PrOpsDone(i, "injected CHECK CONDITION")
            try:
                self.target.run(op)
            except Conflict as e:
                if not (op.conflict_ok or op.probe):
                    return PrOpsDone(i, f"RESERVATION CONFLICT: {e}")
            except ValueError as e:
                return PrOpsDone(i, f"CHECK CONDITION: {e}")
            else:
                if op.probe:
                    return PrOpsDone(i, "GOOD where SPC-5 requires RESERVATION CONFLICT")
            if self.fault("pr_unknown", self.props):
                return PrOpsDone(i, "session lost", definite=False)
        return PrOpsDone(len(a.ops))

    def feed(self, m: object, ev: object) -> None:
        machine = m  # type: SourceMigration | DestinationMigration
        if machine.finished:  # type: ignore[union-attr]
            self.log.append(f"late {type(ev).__name__} to finished {machine.role}")  # type: ignore[union-attr]
            return
        self.process(m, machine.handle(ev, self.now))  # type: ignore[union-attr, arg-type]
        self.check()

    def inject(self) -> None:
        self.steps += 1
        if self.fault("link", self.steps) and self.link:
            self.link = False
            self.q = deque((m, e) for m, e in self.q if not isinstance(e, Message))
            self.q.append((self.src, ChannelLost("injected")))
            self.q.append((self.dst, ChannelLost("injected")))
        if self.fault("cancel", self.steps) and self.src.allowed(Cancel()):
            self.feed(self.src, Cancel())
        if self.fault("dst_cancel", self.steps) and self.dst.allowed(Cancel()):
            self.feed(self.dst, Cancel())

    def run(self) -> Sim:
        self.q.append((self.src, Start()))
        for _ in range(10_000):
            if self.q:
                self.inject()
                m, ev = self.q.popleft()
                self.feed(m, ev)
                continue
            timers = [(t, m) for m in (self.src, self.dst) if (t := m.get_timer()) is not None]
            if not timers:
                return self
            t, m = min(timers, key=lambda x: x[0])
            self.now = max(self.now, t)
            self.process(m, m.handle_timer(self.now))
            self.check()
        raise AssertionError("simulation did not settle")

    def check(self) -> None:
        assert not (self.src.serving and self.dst.serving), "guest served by both hosts"
        if self.src.serving and self.src.state is SS.ROLLED_BACK:
            assert self._holds(Side.SOURCE), f"source serves without its PR state: {self.target.regs} {self.target.rtype}"
        if self.dst.serving:
            assert self._holds(Side.DESTINATION), f"destination serves without the PR state: {self.target.regs}"

    def _holds(self, side: Side) -> bool:
        for name, g in (self.truth or self.pr).guests.items():
            if self.target.regs.get((side, name)) != g.key:
                return False
            if g.holder and not (self.target.holds((side, name)) and self.target.rtype == g.rtype):
                return False
        return True


def happy(pr: DevicePrState, **kw: object) -> Sim:
    return Sim(pr, **kw).run()  # type: ignore[arg-type]


# ---------------------------------------------------------------- tables


def test_tables_only_name_known_states() -> None:
    for (st_, _ev), targets in SOURCE_TABLE.items():
        assert isinstance(st_, SourceState) and all(isinstance(t, SourceState) for t in targets)
    for (st_, _ev), targets in DESTINATION_TABLE.items():
        assert isinstance(st_, DestinationState) and all(isinstance(t, DestinationState) for t in targets)
    for m in (SourceMigration, DestinationMigration):
        assert not any(s in m.TERMINAL for s, _ in m.TABLE), "terminal states accept nothing"


def test_missing_pair_is_protocol_error_and_changes_nothing() -> None:
    src = SourceMigration("m", snap(DevicePrState()))
    with pytest.raises(EventNotAllowed):
        src.handle(Resume(), 0.0)
    assert src.state is SS.IDLE and src.history == []
    dst = DestinationMigration()
    with pytest.raises(EventNotAllowed):
        dst.handle(State(b"x"), 0.0)
    assert dst.state is DS.LISTENING


# ---------------------------------------------------------------- happy paths


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("lio", [False, True])
def test_happy_path_moves_everything(name: str, lio: bool) -> None:
    pr = SCENARIOS[name]
    sim = happy(pr, lio=lio)
    assert sim.src.state is SS.COMPLETED and sim.dst.state is DS.RESUMED
    assert sim.target.matches(pr, Side.DESTINATION)
    assert any(isinstance(a, HandOverGuest) for a in sim.actions)
    assert sum(isinstance(a, ResumeGuest) for a in sim.actions) == 1  # only the destination resumes


@pytest.mark.parametrize(
    "name,rt", [("none", 0), ("WE", 1), ("EA", 1), ("EA_RO", 1), ("EA_AR", 1), ("reg-only", 1), ("WE_AR", 2), ("WE_RO+reg", 2), ("shared-key", 2)]
)
def test_round_trips_inside_pause(name: str, rt: int) -> None:
    sim = happy(SCENARIOS[name])
    assert sim.src.timings.round_trips_in_pause == rt


@pytest.mark.parametrize(
    "name,ours,qemu",
    [("none", 0, 0), ("WE", 1, 2), ("EA_RO", 1, 2), ("reg-only", 1, 2), ("WE_RO+reg", 2, 4), ("EA_AR", 1, 2)],
)
def test_strategies_compared(name: str, ours: int, qemu: int) -> None:
    pr = SCENARIOS[name]
    a = happy(pr)
    b = Sim(pr, strategy=Strategy.QEMU).run()
    c = Sim(pr, strategy=Strategy.DEST_PREEMPT).run()
    for sim in (a, b, c):
        assert sim.src.state is SS.COMPLETED and sim.target.matches(pr, Side.DESTINATION)
    assert a.src.timings.round_trips_in_pause == ours
    assert b.src.timings.round_trips_in_pause == qemu


def test_qemu_sequence_with_a_shared_key_rolls_back() -> None:
    """QEMU tracks one key per device; applied per guest, the register-only
    guest's PREEMPT (TYPE=0) names the holder's key and is refused."""
    sim = Sim(SCENARIOS["shared-key"], strategy=Strategy.QEMU).run()
    _ends_on_source(sim)
    assert happy(SCENARIOS["shared-key"]).src.state is SS.COMPLETED


def test_qemu_sequence_fails_on_lio_for_register_only_and_rolls_back() -> None:
    """QEMU sends PREEMPT with TYPE=0 when the guest holds no reservation; LIO
    refuses it. The migration must then end with the source serving."""
    sim = Sim(SCENARIOS["reg-only"], lio=True, strategy=Strategy.QEMU).run()
    _ends_on_source(sim)
    assert happy(SCENARIOS["reg-only"], lio=True).src.state is SS.COMPLETED


def test_timings_from_now_values() -> None:
    src = SourceMigration("m", snap(holder_state()))
    dst = DestinationMigration()
    out = src.handle(Start(), 0.0)
    assert out[0] == Connect()
    (setup,) = [a.message for a in src.handle(ChannelUp(), 0.5) if isinstance(a, SendMessage)]
    assert isinstance(setup, Setup) and setup.migration_id == "m"
    acts = dst.handle(setup, 0.6)
    assert any(isinstance(a, CreateDevice) for a in acts)
    (ops,) = [a for a in dst.handle(DeviceReady(), 1.0) if isinstance(a, IssuePrOps)]
    (ok,) = [a.message for a in dst.handle(PrOpsDone(len(ops.ops)), 1.2) if isinstance(a, SendMessage)]
    assert ok == SetupOk({"g1": K1}, False)
    assert any(isinstance(a, HoldGuest) for a in src.handle(ok, 2.0))
    (state,) = [a.message for a in src.handle(GuestHeld(snap(holder_state())), 2.1) if isinstance(a, SendMessage)]
    dst.handle(state, 2.2)
    (tk,) = [a for a in dst.handle(StateLoaded(), 2.25) if isinstance(a, IssuePrOps)]
    assert len(tk.ops) == 1
    (done,) = [a.message for a in dst.handle(PrOpsDone(1), 2.30) if isinstance(a, SendMessage)]
    assert done == TakeoverDone(1, 50000)
    (resume,) = [a.message for a in src.handle(done, 2.35) if isinstance(a, SendMessage)]
    acts = dst.handle(resume, 2.4)
    assert ResumeGuest() in acts and SendMessage(Ack(MsgType.RESUME)) in acts
    acts = src.handle(Ack(MsgType.RESUME), 2.45)
    (fin,) = [a for a in acts if isinstance(a, Finished)]
    t = fin.timings
    assert fin.state == "COMPLETED" and t.total == pytest.approx(2.45)
    assert t.pause == pytest.approx(0.45) and t.takeover == pytest.approx(0.25)
    assert t.round_trips_in_pause == 1 and t.peer_takeover_us == 50000
    assert dst.timings.pause == pytest.approx(0.2) and dst.timings.takeover == pytest.approx(0.05)
    assert t.to_dict()["round_trips_in_pause"] == 1


def test_through_real_channels() -> None:
    """Both machines talking through two authenticated Channel ends."""
    pr = SCENARIOS["WE_RO+reg"]
    target = FakeTarget.with_state(pr)
    src, dst = SourceMigration("m", snap(pr)), DestinationMigration()
    c = Channel(Role.CLIENT, b"s" * 32, b"\x01" * 32, "src")
    s = Channel(Role.SERVER, b"s" * 32, b"\x02" * 32, "dst")
    work: deque[tuple[object, object]] = deque([(src, Start())])
    while work:
        m, ev = work.popleft()
        for a in m.handle(ev, 1.0):  # type: ignore[attr-defined]
            if isinstance(a, Connect):
                c.start()
                s.receive_data(c.data_to_send())
                c.receive_data(s.data_to_send())
                s.receive_data(c.data_to_send())
                c.receive_data(s.data_to_send())
                work.append((src, ChannelUp()))
            elif isinstance(a, SendMessage):
                tx, rx, peer = (c, s, dst) if m is src else (s, c, src)
                tx.send(a.message)
                for msg in rx.receive_data(tx.data_to_send()):
                    work.append((peer, msg))
            elif isinstance(a, HoldGuest):
                work.append((m, GuestHeld(snap(pr))))
            elif isinstance(a, CreateDevice):
                work.append((m, DeviceReady(target.observe())))
            elif isinstance(a, LoadState):
                work.append((m, StateLoaded()))
            elif isinstance(a, IssuePrOps):
                target.apply(a.ops)
                work.append((m, PrOpsDone(len(a.ops))))
    assert src.state is SS.COMPLETED and dst.state is DS.RESUMED
    assert target.matches(pr, Side.DESTINATION)


# ---------------------------------------------------------------- failures


def _ends_on_source(sim: Sim) -> None:
    assert sim.src.state is SS.ROLLED_BACK, sim.src.history
    assert sim.dst.state is DS.ABORTED or (sim.dst.state is DS.LISTENING and not sim.dst.history), sim.dst.history
    assert sim.src.serving and not sim.dst.serving
    assert sim.target.matches(sim.pr, Side.SOURCE), (sim.target.regs, sim.target.rtype)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("step", range(1, 16))
def test_link_loss_at_every_step(name: str, step: int) -> None:
    sim = Sim(SCENARIOS[name], [Fault("link", step)]).run()
    if sim.src.state is SS.COMPLETED:
        assert sim.dst.state is DS.RESUMED
    elif sim.src.state is SS.IN_DOUBT:
        assert not sim.src.serving  # RESUME was sent: never served by the source again
    else:
        _ends_on_source(sim)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("kind", ["cancel", "dst_cancel"])
@pytest.mark.parametrize("step", range(1, 16))
def test_cancel_at_every_step(name: str, kind: str, step: int) -> None:
    sim = Sim(SCENARIOS[name], [Fault(kind, step)]).run()
    if sim.src.state is SS.COMPLETED:
        assert sim.dst.state is DS.RESUMED
    else:
        _ends_on_source(sim)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("kind", ["pr_fail", "pr_unknown"])
@pytest.mark.parametrize("op", range(1, 7))
def test_pr_failure_at_every_op(name: str, kind: str, op: int) -> None:
    sim = Sim(SCENARIOS[name], [Fault(kind, op)]).run()
    if sim.src.state is SS.COMPLETED:
        assert sim.dst.state is DS.RESUMED
        assert kind == "pr_unknown" or sim.props < op  # a failure never completes silently
    elif sim.src.state is SS.FAILED:
        assert not sim.src.serving and not sim.dst.serving  # reclaim itself failed
    else:
        _ends_on_source(sim)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("msg", range(1, 9))
def test_lost_message_resolved_by_timers(name: str, msg: int) -> None:
    sim = Sim(SCENARIOS[name], [Fault("drop", msg)]).run()
    assert sim.src.finished and (sim.dst.finished or not sim.dst.history)
    if sim.src.state is SS.COMPLETED:
        assert sim.dst.state is DS.RESUMED
    elif sim.src.state is SS.IN_DOUBT:
        assert not sim.src.serving
    else:
        _ends_on_source(sim)


def test_fenced_guest_is_not_unfenced() -> None:
    """Another node preempted the guest's key before setup: the destination must
    neither register it in setup nor inside the pause."""
    pr = holder_state(PrType.EXCLUSIVE_ACCESS)
    sim = Sim(pr, truth=DevicePrState())  # the guest really holds nothing any more
    other = (Side.SOURCE, "other-node")
    sim.target.regs = {other: 0x9999}
    sim.target.holder, sim.target.rtype = other, PrType.EXCLUSIVE_ACCESS
    sim.run()
    assert sim.src.state is SS.COMPLETED
    assert sim.target.regs == {other: 0x9999} and sim.target.holder == other


def test_device_creation_failure() -> None:
    sim = Sim(holder_state(), [Fault("device_fail", 0)]).run()
    _ends_on_source(sim)
    assert sim.src.reason is AbortReason.DEVICE


def test_destination_never_resumes_after_abort() -> None:
    dst = DestinationMigration()
    dst.handle(Setup("m", encode_snapshot(snap(holder_state()))), 0)
    dst.handle(DeviceReady(), 0)
    dst.handle(PrOpsDone(1), 0)
    dst.handle(State(encode_snapshot(snap(holder_state()))), 1)
    dst.handle(StateLoaded(), 1)
    dst.handle(PrOpsDone(1), 1)
    acts = dst.handle(Rollback(AbortReason.TIMEOUT), 2)
    assert SendMessage(Ack(MsgType.ROLLBACK, preempted=True)) in acts
    assert dst.state is DS.ROLLBACK_HOLD
    assert ResumeGuest() not in dst.handle(Resume(), 2.1)
    acts = dst.handle(Abort(AbortReason.TIMEOUT, "reclaimed"), 3)
    assert dst.state is DS.ABORTING and any(isinstance(a, IssuePrOps) for a in acts)
    assert DropDevice() in dst.handle(PrOpsDone(1), 3.1)
    assert dst.state is DS.ABORTED


def test_cancel_after_commit_is_refused() -> None:
    sim = Sim(holder_state())
    src = sim.src
    src.handle(Start(), 0)
    src.handle(ChannelUp(), 0)
    src.handle(SetupOk({"g1": K1}), 0)
    src.handle(GuestHeld(snap(holder_state())), 0)
    src.handle(TakeoverDone(1), 0)
    assert src.state is SS.HANDOVER
    with pytest.raises(EventNotAllowed):
        src.handle(Cancel(), 0)
    assert src.handle_timer(1000.0) and src.state is SS.IN_DOUBT and not src.serving


def test_bad_stream_refused_before_device_creation() -> None:
    dst = DestinationMigration()
    acts = dst.handle(Setup("m", b"PRMS\x00\x09"), 0)
    assert dst.state is DS.ABORTED and not any(isinstance(a, CreateDevice) for a in acts)
    (abort,) = [a.message for a in acts if isinstance(a, SendMessage)]
    assert isinstance(abort, Abort) and abort.reason is AbortReason.BAD_STREAM


def test_source_timers() -> None:
    src = SourceMigration("m", snap(holder_state()), Timeouts(connect=3))
    src.handle(Start(), 10.0)
    assert src.get_timer() == 13.0
    assert src.handle_timer(12.9) == []
    acts = src.handle_timer(13.0)
    assert src.state is SS.ROLLED_BACK and src.get_timer() is None
    assert any(isinstance(a, Finished) and a.reason is AbortReason.TIMEOUT for a in acts)


# ---------------------------------------------------------------- Hypothesis


fault_kinds = st.sampled_from(["link", "drop", "cancel", "dst_cancel", "pr_fail", "pr_unknown", "device_fail"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SCENARIOS)), st.lists(st.builds(Fault, fault_kinds, st.integers(0, 20)), max_size=3), st.booleans(), st.sampled_from(list(Strategy)))
def test_random_faults_keep_the_invariant(name: str, faults: list[Fault], lio: bool, strategy: Strategy) -> None:
    sim = Sim(SCENARIOS[name], faults, lio=lio, strategy=strategy).run()  # check() runs after every step
    assert sim.src.finished and (sim.dst.finished or not sim.dst.history)
    if sim.src.state is SS.COMPLETED:
        assert sim.dst.state is DS.RESUMED and sim.target.matches(sim.pr, Side.DESTINATION)
    if sim.dst.state is DS.RESUMED:
        assert sim.src.state in (SS.COMPLETED, SS.IN_DOUBT)
    if sim.src.state is SS.ROLLED_BACK:
        _ends_on_source(sim)


def _events(pr: DevicePrState) -> list[object]:
    s = encode_snapshot(snap(pr))
    return [
        Start(), ChannelUp(), ChannelLost(), Cancel(), SetupOk({"g1": K1}), GuestHeld(snap(pr)),
        PrOpsDone(0), PrOpsDone(1), PrOpsDone(0, "err"), PrOpsDone(0, "lost", definite=False),
        TakeoverDone(1), Ack(MsgType.RESUME), Ack(MsgType.ROLLBACK, True), Ack(MsgType.ROLLBACK, False),
        Abort(AbortReason.TIMEOUT, "", True), Abort(AbortReason.TIMEOUT, "", False), Resume(),
        Rollback(AbortReason.TIMEOUT), Setup("m", s), State(s), DeviceReady(), DeviceFailed(), StateLoaded(),
        "timer",
        # a REGISTER AND MOVE plan
        SetupOk({"g1": K1}, False, {"g1": port_of(Side.DESTINATION, "g1")}),
        DeviceReady(Observed(frozenset({K1}), K1, PrType.WRITE_EXCLUSIVE, None, {K1: (OTHER,)}),
                    TargetTraits(register_and_move=True), {"g1": port_of(Side.DESTINATION, "g1")},
                    {"g1": port_of(Side.SOURCE, "g1")}),
    ]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(SCENARIOS)), st.lists(st.integers(0, 25), max_size=40), st.booleans())
def test_random_event_sequences_never_reach_an_illegal_state(name: str, picks: list[int], source: bool) -> None:
    pr = SCENARIOS[name]
    m = SourceMigration("m", snap(pr)) if source else DestinationMigration()
    events = _events(pr)
    now = 0.0
    resumed_after_commit = False
    for i in picks:
        now += 1.0
        ev = events[i]
        old = m.state
        try:
            acts = m.handle_timer(now + 1e6) if ev == "timer" else m.handle(ev, now)  # type: ignore[arg-type]
        except EventNotAllowed:
            assert m.state is old  # refused events change nothing
            continue
        assert (old, type(ev)) in m.TABLE or ev == "timer"
        if isinstance(m, SourceMigration):
            assert not (m.serving and m.guest_held)
            if old in (SS.HANDOVER, SS.IN_DOUBT, SS.COMPLETED) and ResumeGuest() in acts:
                resumed_after_commit = True
        else:
            assert (ResumeGuest() in acts) == (m.state is DS.RESUMED and old is DS.TAKEN_OVER)
        if m.finished:
            assert m.get_timer() is None
    assert not resumed_after_commit


# ------------------------------------------------- REGISTER AND MOVE plans

SHARED = {
    name: DevicePrState({"g1": GuestPrState(K1, False, True, PrType(t))})
    for name, t in (("WE", 1), ("EA", 3), ("WE_RO", 5), ("EA_RO", 6))
}
SHARED["EA+same-key"] = DevicePrState({"g1": GuestPrState(K1, False, True, PrType.EXCLUSIVE_ACCESS), "g2": GuestPrState(K1)})


def shared(name: str, faults: list[Fault] | None = None, **kw: object) -> Sim:
    return Sim(SHARED[name], faults or [], foreign={OTHER: K1}, **kw).run()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_key_moves_by_register_and_move(name: str) -> None:
    sim = shared(name)
    assert sim.src.state is SS.COMPLETED and sim.dst.state is DS.RESUMED, sim.src.history
    assert sim.target.matches(sim.pr, Side.DESTINATION) and sim.target.foreign == {OTHER: K1}
    (ok,) = [a.message for a in sim.actions if isinstance(a, SendMessage) and isinstance(a.message, SetupOk)]
    assert ok.move == {"g1": port_of(Side.DESTINATION, "g1")}
    (release,) = [a for a in sim.actions if isinstance(a, IssuePrOps) and a.phase.value == "release"]
    assert release.ops[0].action.name == "REGISTER_AND_MOVE"
    assert sim.src.timings.round_trips_in_pause == len(sim.pr.guests)  # one per guest: the move, a release
    assert not any(isinstance(a, IssuePrOps) and a.phase.value == "takeover" for a in sim.actions)


def test_a_backend_without_register_and_move_refuses_the_move_in_setup() -> None:
    sim = shared("WE", ram=False)
    _ends_on_source(sim)
    assert sim.src.timings.paused is None  # refused before the pause
    assert sim.target.foreign == {OTHER: K1}
    assert any("does not support REGISTER AND MOVE" in str(getattr(a, "text", "")) for a in sim.actions)


def test_a_backend_whose_register_and_move_does_not_conform_fails_the_probe_in_setup() -> None:
    """tgt 1.0.85 answers REGISTER AND MOVE from a registered non-holder
    with GOOD (SPC-5 5.14.8 requires RESERVATION CONFLICT): the setup probe
    fails, the destination unregisters, nothing is paused or moved."""
    sim = shared("WE", ram="tgt")
    _ends_on_source(sim)
    assert sim.src.timings.paused is None and sim.target.foreign == {OTHER: K1}
    assert any("GOOD where SPC-5 requires RESERVATION CONFLICT" in str(getattr(a, "text", "")) for a in sim.actions)


def _shared_ends(sim: Sim, strict: bool = True) -> None:
    """Whatever happened: the other host's registration is there, the guest
    is served by at most one host, with its state (Sim.check), and a source
    that gave up holds the guest (FAILED) rather than PREEMPT; with one
    fault (``strict``) the source never gives up."""
    assert sim.target.foreign == {OTHER: K1}, sim.target.log
    assert not any("collateral" in line for line in sim.target.log)
    if sim.src.state is SS.COMPLETED:
        assert sim.dst.state is DS.RESUMED and sim.target.matches(sim.pr, Side.DESTINATION)
    elif sim.src.state is SS.IN_DOUBT:
        assert not sim.src.serving
    elif sim.src.state is SS.FAILED:  # only when the move back itself failed for good
        assert not sim.src.serving and strict is False
    else:
        _ends_on_source(sim)


@pytest.mark.parametrize("name", ["WE", "EA+same-key"])
@pytest.mark.parametrize("step", range(1, 16))
def test_register_and_move_link_loss_at_every_step(name: str, step: int) -> None:
    _shared_ends(shared(name, [Fault("link", step)]))


@pytest.mark.parametrize("name", ["WE", "EA+same-key"])
@pytest.mark.parametrize("kind", ["cancel", "dst_cancel"])
@pytest.mark.parametrize("step", range(1, 16))
def test_register_and_move_cancel_at_every_step(name: str, kind: str, step: int) -> None:
    _shared_ends(shared(name, [Fault(kind, step)]))


@pytest.mark.parametrize("name", ["WE", "EA+same-key"])
@pytest.mark.parametrize("kind", ["pr_fail", "pr_unknown"])
@pytest.mark.parametrize("op", range(1, 7))
def test_register_and_move_pr_failure_at_every_op(name: str, kind: str, op: int) -> None:
    _shared_ends(shared(name, [Fault(kind, op)]))


@pytest.mark.parametrize("name", ["WE", "EA+same-key"])
@pytest.mark.parametrize("msg", range(1, 9))
def test_register_and_move_lost_message_resolved_by_timers(name: str, msg: int) -> None:
    _shared_ends(shared(name, [Fault("drop", msg)]))


def test_cancel_after_the_move_gives_the_reservation_back_before_the_ack() -> None:
    """Cancelled with STATE out (the reservation on the destination's
    nexus): ROLLBACK; the destination moves it back, then ACKs; the source
    registers again and RESERVEs: the guest runs on the source, the other
    host's registration is still there, no PREEMPT was sent."""
    pr = SHARED["WE"]
    sim = Sim(pr, foreign={OTHER: K1})
    sim.q.append((sim.src, Start()))
    while not (sim.src.state is SS.TRANSFERRED and sim.dst.state is DS.TAKEN_OVER):
        m, ev = sim.q.popleft()
        sim.feed(m, ev)
    sim.q.clear()  # TAKEOVER_DONE not delivered yet
    sim.feed(sim.src, Cancel())
    sim.run_queue = None
    while sim.q:
        m, ev = sim.q.popleft()
        sim.feed(m, ev)
    assert sim.src.state is SS.ROLLED_BACK and sim.dst.state is DS.ABORTED, (sim.src.history, sim.dst.history)
    assert sim.target.matches(pr, Side.SOURCE) and sim.target.foreign == {OTHER: K1}
    issued = [op for a in sim.actions if isinstance(a, IssuePrOps) for op in a.ops]
    assert "PREEMPT" not in [op.action.name for op in issued]
    order = [(op.side, op.action.name) for op in issued]
    assert order.index((Side.DESTINATION, "REGISTER_AND_MOVE")) < order.index((Side.SOURCE, "RESERVE"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SHARED)), st.lists(st.builds(Fault, fault_kinds, st.integers(0, 20)), max_size=3), st.booleans())
def test_random_faults_never_preempt_a_shared_key(name: str, faults: list[Fault], lio: bool) -> None:
    sim = Sim(SHARED[name], faults, lio=lio, foreign={OTHER: K1}).run()  # check() runs after every step
    assert sim.src.finished and (sim.dst.finished or not sim.dst.history)
    if sim.dst.state is DS.RESUMED:
        assert sim.src.state in (SS.COMPLETED, SS.IN_DOUBT)
    _shared_ends(sim, strict=False)


@pytest.mark.parametrize("strategy", [Strategy.PRMIGRATE, Strategy.DEST_PREEMPT])
@pytest.mark.parametrize("kind", ["link", "cancel", "dst_cancel", "pr_fail", "pr_unknown", "drop"])
@pytest.mark.parametrize("at", range(0, 12))
def test_register_and_move_beside_another_guest(strategy: Strategy, kind: str, at: int) -> None:
    """A moved holder beside a register-only guest of another key (which
    DEST_PREEMPT moves by a destination PREEMPT): every single fault ends
    with the state on one side and the other host's registration kept."""
    pr = DevicePrState({"g1": GuestPrState(K1, False, True, PrType.WRITE_EXCLUSIVE), "g2": GuestPrState(K2)})
    sim = Sim(pr, [Fault(kind, at)], foreign={OTHER: K1}, strategy=strategy).run()
    _shared_ends(sim)
