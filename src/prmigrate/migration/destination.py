"""The destination side of a device migration, as a sans-IO state machine.

Rules (the table below is the authority; a missing pair is a EventNotAllowed):

- LISTENING -Setup-> SETUP (CreateDevice) -DeviceReady-> SETUP (register the
  guests' keys, plan.SETUP) -PrOpsDone-> READY (sends SETUP_OK) -State->
  LOADING (LoadState: inside the pause) -StateLoaded-> TAKEOVER (the PREEMPT
  and fixups in flight) -PrOpsDone-> TAKEN_OVER (sends TAKEOVER_DONE)
  -Resume-> RESUMED (ResumeGuest, ACK). With nothing to register or to take
  over, the intermediate states are skipped.
- A plan the target's PR state forbids (a PREEMPT would remove the
  registration of a nexus outside the device that shares the guest's key:
  ``plan.PlanError``) fails the migration where it is found: on DeviceReady
  (nothing registered yet) or on StateLoaded (nothing preempted yet).
- The destination resumes the guest ONLY on RESUME in TAKEN_OVER. Once it
  has sent ABORT or ACKed a ROLLBACK it never resumes (a late RESUME is
  ignored): that is what lets the source take the guest back safely.
- A failure while PR ops are in flight waits for them (the outcome decides
  whether we preempted), then is handled as below.
- Not preempted: ABORT (or the ACK of a ROLLBACK) to the source, then
  ABORTING: unregister what we registered (plan.cleanup_plan; idempotent,
  retried CLEANUP_ATTEMPTS times) and drop the device -> ABORTED.
- REGISTER AND MOVE plan (``SetupPlan.move``: the holder's key is shared
  with a nexus outside the device; the source moves the reservation to us
  inside the pause): a failure once SETUP_OK is out first moves the
  reservation back to the source's nexus (GIVING_BACK, plan.give_back_plan;
  RESERVATION CONFLICT there means we never held it), and only then tells
  the source, with preempted=False, or preempted=True when the move back
  failed (we may still hold it: the source then keeps the guest held).
- Preempted (we hold the reservation): tell the source (ABORT / ACK with
  preempted=True) and wait in ROLLBACK_HOLD for its ABORT (sent once it took
  the reservation back with its own PREEMPT) or for the hold timer; only then
  unregister. Unregistering first would release the reservation for a moment.
"""

from __future__ import annotations

import logging
from enum import Enum

from ..scsi.constants import PrOutAction
from .channel import (
    Abort,
    Ack,
    Message,
    MsgType,
    Resume,
    Rollback,
    Setup,
    SetupOk,
    State,
    TakeoverDone,
)
from .errors import AbortReason, MigrationError, PlanError
from .machine import (
    Cancel,
    ChannelLost,
    CreateDevice,
    DeviceFailed,
    DeviceReady,
    DropDevice,
    IssuePrOps,
    LoadState,
    Log,
    MachineBase,
    PrOpsDone,
    ResumeGuest,
    SendMessage,
    StateLoaded,
    Timeout,
    Timeouts,
    table,
)
from .plan import (
    MovePort,
    Observed,
    Phase,
    PrOp,
    SetupPlan,
    Strategy,
    TargetTraits,
    cleanup_plan,
    give_back_plan,
    qemu_plan,
    setup_plan,
    takeover_plan,
)
from .stream import DeviceSnapshot, decode_snapshot


class DestinationState(Enum):
    LISTENING = "listening"
    SETUP = "setup"
    READY = "ready"
    LOADING = "loading"
    TAKEOVER = "takeover"
    TAKEN_OVER = "taken_over"
    RESUMED = "resumed"
    ROLLBACK_HOLD = "rollback_hold"
    GIVING_BACK = "giving_back"
    ABORTING = "aborting"
    ABORTED = "aborted"


D = DestinationState
CLEANUP_ATTEMPTS = 3  # extra tries of the (idempotent) cleanup ops
_FAILURES = (Rollback, Abort, ChannelLost, Timeout, Cancel)

DESTINATION_TABLE = table(
    {
        (D.LISTENING, Setup): (D.SETUP, D.ABORTED),
        **{(D.LISTENING, e): D.ABORTED for e in (Abort, ChannelLost, Cancel)},
        (D.SETUP, DeviceReady): (D.SETUP, D.READY, D.ABORTING, D.ABORTED),  # refused: PlanError
        (D.SETUP, PrOpsDone): (D.READY, D.ABORTING, D.ABORTED),
        (D.SETUP, DeviceFailed): (D.ABORTING, D.ABORTED),
        **{(D.SETUP, e): (D.SETUP, D.ABORTING, D.ABORTED) for e in _FAILURES},
        (D.READY, State): (D.LOADING, D.GIVING_BACK, D.ABORTING, D.ABORTED),
        **{(D.READY, e): (D.GIVING_BACK, D.ABORTING, D.ABORTED) for e in _FAILURES},
        (D.LOADING, StateLoaded): (D.TAKEOVER, D.TAKEN_OVER, D.GIVING_BACK, D.ABORTING, D.ABORTED),  # refused: PlanError
        (D.LOADING, DeviceFailed): (D.GIVING_BACK, D.ABORTING, D.ABORTED),
        **{(D.LOADING, e): (D.GIVING_BACK, D.ABORTING, D.ABORTED) for e in _FAILURES},
        (D.TAKEOVER, PrOpsDone): (D.TAKEN_OVER, D.GIVING_BACK, D.ROLLBACK_HOLD, D.ABORTING, D.ABORTED),
        **{(D.TAKEOVER, e): D.TAKEOVER for e in _FAILURES},  # ops first
        (D.TAKEN_OVER, Resume): D.RESUMED,
        **{(D.TAKEN_OVER, e): (D.GIVING_BACK, D.ROLLBACK_HOLD, D.ABORTING, D.ABORTED) for e in _FAILURES},
        (D.ROLLBACK_HOLD, Resume): D.ROLLBACK_HOLD,  # too late: we aborted
        **{(D.ROLLBACK_HOLD, e): (D.ROLLBACK_HOLD, D.GIVING_BACK, D.ABORTING, D.ABORTED) for e in _FAILURES},
        # moving the reservation back (REGISTER AND MOVE plan), then as below
        (D.GIVING_BACK, PrOpsDone): (D.GIVING_BACK, D.ROLLBACK_HOLD, D.ABORTING, D.ABORTED),
        **{(D.GIVING_BACK, e): D.GIVING_BACK
           for e in (*_FAILURES, Resume, State, DeviceFailed, StateLoaded)},
        **{(D.ROLLBACK_HOLD, e): D.ROLLBACK_HOLD for e in (DeviceFailed, StateLoaded)},
        (D.ABORTING, PrOpsDone): (D.ABORTING, D.ABORTED),  # retried, then given up
        (D.ABORTING, Resume): D.ABORTING,
        # late completions of work the abort overtook: nothing to do
        **{(D.ABORTING, e): D.ABORTING for e in (DeviceReady, DeviceFailed, StateLoaded)},
        # a STATE that crossed our ABORT: ignored
        (D.ABORTING, State): D.ABORTING,
        (D.ROLLBACK_HOLD, State): D.ROLLBACK_HOLD,
        **{(D.ABORTING, e): D.ABORTING for e in _FAILURES},
    }
)

DESTINATION_TERMINAL = frozenset({D.RESUMED, D.ABORTED})


class DestinationMigration(MachineBase):
    """Created for an authenticated incoming connection; drive with
    ``handle(event, now)``, received messages being events."""

    TABLE = DESTINATION_TABLE
    TERMINAL = DESTINATION_TERMINAL
    role = "destination"

    def __init__(self, name: str = "incoming", timeouts: Timeouts | None = None) -> None:
        super().__init__(D.LISTENING, name)
        self.timeouts = timeouts or Timeouts()
        self.strategy = Strategy.PRMIGRATE  # the source's choice, from SETUP
        self.migration_id = ""
        self.snapshot: DeviceSnapshot | None = None
        self.observed: Observed | None = None
        self.traits = TargetTraits()
        self.registered: dict[str, int] = {}  # guest -> key possibly registered on our nexus
        self.fenced: dict[str, int] = {}  # guest -> key setup found gone from the target
        self.ports: dict[str, MovePort] = {}  # our nexus per guest, as REGISTER AND MOVE names it
        self.source_ports: dict[str, MovePort] = {}  # the source's
        self.moving: dict[str, MovePort] = {}  # holders the source moves to us by REGISTER AND MOVE
        self._failed_in: D | None = None  # the state a failure met, while GIVING_BACK
        self._give_back_ops: tuple[PrOp, ...] = ()
        self._give_back_attempts = 0
        self.preempted = False
        self.channel_open = True
        self.device_created = False
        self._device_ready = False
        self._inflight: tuple[PrOp, ...] | None = None
        self._cleanup_ops: tuple[PrOp, ...] = ()
        self._cleanup_attempts = 0
        self._pending: Message | ChannelLost | Timeout | Cancel | None = None

    @property
    def serving(self) -> bool:
        return self.state is D.RESUMED

    # -- setup
    def _on_Setup(self, ev: Setup, now: float) -> D:
        self.timings.started = now
        self.migration_id = ev.migration_id
        try:
            snap = decode_snapshot(ev.stream)
        except MigrationError as e:
            self._fail(e.reason)
            self._send(Abort(e.reason, str(e)))
            return D.ABORTED
        self.snapshot = snap
        self.strategy = Strategy(ev.strategy)
        self.name = f"{ev.migration_id}/{snap.name}"
        self.device_created = True  # from now on DropDevice must undo it
        self._emit(CreateDevice(snap))
        self._arm(now, self.timeouts.setup)
        return D.SETUP

    def _on_DeviceReady(self, ev: DeviceReady, now: float) -> D:
        if self.state is D.ABORTING:
            return D.ABORTING
        if self._device_ready:
            raise _protocol(self, ev)
        self._device_ready = True
        self.observed, self.traits = ev.observed, ev.traits
        self.ports, self.source_ports = dict(ev.ports), dict(ev.source_ports)
        assert self.snapshot is not None
        try:
            # REGISTER AND MOVE only where the source issues it (not QEMU's sequence)
            move_traits = None if self.strategy is Strategy.QEMU else ev.traits
            plan = setup_plan(self.snapshot.pr, ev.observed, move_traits, self.ports, self.source_ports)
        except PlanError as e:  # nothing registered yet: the move is refused, the guest stays
            self._emit(Log(logging.WARNING, f"destination {self.name}: {e}"))
            return self._failure(Cancel(AbortReason.PR_SETUP, str(e)), now)
        if self.strategy is Strategy.QEMU:  # QEMU registers inside the pause
            plan = SetupPlan((), plan.skipped, plan.notes, plan.fenced)
        self.fenced = dict(plan.fenced)
        self.moving = dict(plan.move)
        for guest, port in sorted(self.moving.items()):
            self._emit(Log(logging.INFO, f"destination {self.name}: {guest}: its key is shared outside the device:"
                                         f" the source moves the reservation to {port} by REGISTER AND MOVE"))
        for note in plan.notes:
            self._emit(Log(logging.WARNING, f"destination {self.name}: {note}"))
        if plan.ops:
            return self._issue(plan.ops, Phase.SETUP, now, D.SETUP)
        return self._ready(now)

    def _ready(self, now: float) -> D:
        self._send(SetupOk(dict(self.registered), self.traits.read_full_status, dict(self.moving)))
        self._arm(now, self.timeouts.await_state)
        return D.READY

    def _on_DeviceFailed(self, ev: DeviceFailed, now: float) -> D:
        if self.state in (D.ABORTING, D.ROLLBACK_HOLD):
            return self.state  # type: ignore[return-value]
        if self.state is D.SETUP and self._device_ready:
            raise _protocol(self, ev)  # the device was reported ready already
        return self._failure(Cancel(AbortReason.DEVICE, ev.detail), now)

    # -- the pause
    def _on_State(self, ev: State, now: float) -> D:
        if self.state is not D.READY:
            return self.state  # type: ignore[return-value]
        self.timings.paused = now
        try:
            snap = decode_snapshot(ev.stream)
        except MigrationError as e:
            return self._failure(Cancel(e.reason, str(e)), now)
        assert self.snapshot is not None
        if snap.name != self.snapshot.name:
            return self._failure(Cancel(AbortReason.BAD_STREAM, f"STATE for {snap.name!r}"), now)
        self.snapshot = snap
        self._emit(LoadState(snap))
        self._arm(now, self.timeouts.load)
        return D.LOADING

    def _on_StateLoaded(self, ev: StateLoaded, now: float) -> D:
        if self.state in (D.ABORTING, D.GIVING_BACK, D.ROLLBACK_HOLD):
            return self.state  # type: ignore[return-value]
        assert self.snapshot is not None
        if self.strategy is Strategy.QEMU:
            ops = qemu_plan(self.snapshot.pr)
        else:
            try:
                plan = takeover_plan(
                    self.snapshot.pr, self.registered, ev.observed, self.traits,
                    register_only=self.strategy.register_only, fenced=self.fenced, move=self.moving,
                )
            except PlanError as e:  # nothing preempted: the source takes the guest back
                self._emit(Log(logging.WARNING, f"destination {self.name}: {e}"))
                return self._failure(Cancel(AbortReason.PR_TAKEOVER, str(e)), now)
            for note in plan.notes:
                self._emit(Log(logging.WARNING, f"destination {self.name}: {note}"))
            ops = plan.destination_ops
        self.timings.takeover_started = now
        if ops:
            return self._issue(ops, Phase.TAKEOVER, now, D.TAKEOVER)
        return self._taken_over(now)

    def _taken_over(self, now: float) -> D:
        self.timings.takeover_ended = now
        us = int(round((now - (self.timings.takeover_started or now)) * 1e6))
        self._send(TakeoverDone(self.timings.round_trips_in_pause, us))
        self._arm(now, self.timeouts.commit)
        return D.TAKEN_OVER

    def _on_Resume(self, ev: Resume, now: float) -> D:
        if self.state is not D.TAKEN_OVER:
            self._emit(Log(logging.WARNING, f"destination {self.name}: RESUME after abort ignored"))
            return self.state  # type: ignore[return-value]
        self.timings.resumed = now
        self._emit(ResumeGuest())
        self._send(Ack(MsgType.RESUME))
        return D.RESUMED

    # -- PR ops
    def _issue(self, ops: tuple[PrOp, ...], phase: Phase, now: float, then: D) -> D:
        self._inflight = ops
        self._arm(now, None)  # the shell's command timeouts bound the ops
        self._emit(IssuePrOps(ops, phase))
        return then

    def _on_PrOpsDone(self, ev: PrOpsDone, now: float) -> D:
        if self.state is D.GIVING_BACK:
            return self._given_back_done(ev, now)
        if self.state is D.ABORTING:
            ops = self._cleanup_ops
            if not ev.ok and self._cleanup_attempts < CLEANUP_ATTEMPTS and ev.completed < len(ops):
                # Cleanup ops are idempotent (RAIEK SARK=0): retry from the failed one.
                self._cleanup_attempts += 1
                self._cleanup_ops = ops[ev.completed :]
                self._emit(Log(logging.WARNING, f"destination {self.name}: cleanup failed ({ev.error}), retrying"))
                self._emit(IssuePrOps(self._cleanup_ops, Phase.CLEANUP))
                return D.ABORTING
            if not ev.ok:
                self._emit(Log(logging.ERROR, f"destination {self.name}: cleanup failed for good: {ev.error}; registrations may remain"))
            self._emit(DropDevice())
            return D.ABORTED
        ops, self._inflight = self._inflight or (), None
        if ev.completed > len(ops):
            raise _protocol(self, ev)
        done = list(ops[: ev.completed])
        maybe = [] if ev.ok or ev.definite or ev.completed >= len(ops) else [ops[ev.completed]]
        for op in done + maybe:
            if op.action in (PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, PrOutAction.REGISTER):
                if op.sark:
                    self.registered[op.guest] = op.sark
                elif op in done:
                    self.registered.pop(op.guest, None)
            elif op.action is PrOutAction.PREEMPT:
                self.preempted = True
                self.registered.setdefault(op.guest, op.sark)
        if self.state is D.TAKEOVER:
            self.timings.count_ops(ev)
        pending, self._pending = self._pending, None
        if not ev.ok:
            reason = AbortReason.PR_SETUP if self.state is D.SETUP else AbortReason.PR_TAKEOVER
            self._emit(Log(logging.ERROR, f"destination {self.name}: {reason.name}: {ev.error}"))
            return self._failure(pending or Cancel(reason, ev.error or ""), now)
        if pending is not None:
            return self._failure(pending, now)
        return self._ready(now) if self.state is D.SETUP else self._taken_over(now)

    # -- failures
    def _on_Rollback(self, ev: Rollback, now: float) -> D:
        return self._failure(ev, now)

    def _on_Abort(self, ev: Abort, now: float) -> D:
        return self._failure(ev, now)

    def _on_ChannelLost(self, ev: ChannelLost, now: float) -> D:
        self.channel_open = False
        return self._failure(ev, now)

    def _on_Timeout(self, ev: Timeout, now: float) -> D:
        return self._failure(ev, now)

    def _on_Cancel(self, ev: Cancel, now: float) -> D:
        return self._failure(ev, now)

    def _failure(self, ev: Message | ChannelLost | Timeout | Cancel, now: float) -> D:
        st: D = self.state  # type: ignore[assignment]
        if self._inflight is not None or st is D.GIVING_BACK:  # the ops' outcome decides
            if self._pending is None or isinstance(ev, Abort | Rollback):
                self._pending = ev
            return st
        if self.moving and (st in _MAY_HOLD_MOVED or st is D.ROLLBACK_HOLD and isinstance(ev, Rollback | Timeout | Cancel)):
            # The source may have moved the reservation to us (also after an
            # ABORT of ours it had not seen yet): move it back before the
            # source hears from us, and before we unregister.
            assert self.snapshot is not None
            self._give_back_ops = give_back_plan(self.snapshot.pr, self.moving, self.source_ports)
            self._give_back_attempts = 0
            self._pending, self._failed_in = ev, st
            self._arm(now, None)
            self._emit(Log(logging.WARNING, f"destination {self.name}: {_reason_of(ev).name} in {st.name}:"
                                            " moving the reservation back to the source's nexus"))
            self._emit(IssuePrOps(self._give_back_ops, Phase.ROLLBACK))
            return D.GIVING_BACK
        reason = _reason_of(ev)
        if st is D.LISTENING:
            self._fail(reason)
            return D.ABORTED
        if st is D.ABORTING:
            return st
        if st is D.ROLLBACK_HOLD:
            if isinstance(ev, Abort | Timeout | Cancel):
                return self._cleanup(now)
            return st  # a ROLLBACK or a lost channel: keep holding until the timer
        self._fail(reason)
        self._emit(Log(logging.WARNING, f"destination {self.name}: {reason.name} in {st.name}"))
        if self.preempted:
            if isinstance(ev, Abort):  # the source has taken the reservation back
                return self._cleanup(now)
            if isinstance(ev, Rollback):
                self._send(Ack(MsgType.ROLLBACK, preempted=True))
            else:
                self._send(Abort(reason, _detail(ev), preempted=True))
            self._arm(now, self.timeouts.rollback_hold)
            return D.ROLLBACK_HOLD
        if isinstance(ev, Rollback):
            self._send(Ack(MsgType.ROLLBACK, preempted=False))
        elif not isinstance(ev, Abort):
            self._send(Abort(reason, _detail(ev), preempted=False))
        return self._cleanup(now)

    def _given_back_done(self, ev: PrOpsDone, now: float) -> D:
        ops = self._give_back_ops
        if not ev.ok and self._give_back_attempts < CLEANUP_ATTEMPTS and ev.completed < len(ops):
            # REGISTER AND MOVE back is safe to repeat: CONFLICT once it is done
            self._give_back_attempts += 1
            self._give_back_ops = ops[ev.completed :]
            self._emit(Log(logging.WARNING, f"destination {self.name}: moving the reservation back failed ({ev.error}), retrying"))
            self._emit(IssuePrOps(self._give_back_ops, Phase.ROLLBACK))
            return D.GIVING_BACK
        if not ev.ok:
            # We may still hold it: the source must not take it by PREEMPT
            # (the other host's registration would go) and keeps the guest held.
            self._emit(Log(logging.ERROR, f"destination {self.name}: cannot move the reservation back: {ev.error}"))
            self.preempted = True
        pending, self._pending = self._pending, None
        st, self._failed_in = self._failed_in, None
        assert pending is not None and st is not None
        if st is D.ROLLBACK_HOLD and not isinstance(pending, Rollback):
            return self._cleanup(now)  # the hold timer (or a cancel): we are done
        if st is not D.ROLLBACK_HOLD:
            reason = _reason_of(pending)
            self._fail(reason)
            if isinstance(pending, Abort):  # the source's last word: it moves nothing any more
                return self._cleanup(now)
            if not isinstance(pending, Rollback):
                self._send(Abort(reason, _detail(pending), preempted=self.preempted))
        if isinstance(pending, Rollback):
            self._send(Ack(MsgType.ROLLBACK, preempted=self.preempted))
        # A REGISTER AND MOVE of the source's may still cross what we sent:
        # wait for its last word (ABORT, or ROLLBACK: move back again) or the timer.
        self._arm(now, self.timeouts.rollback_hold)
        return D.ROLLBACK_HOLD

    def _cleanup(self, now: float) -> D:
        self._arm(now, None)
        ops = cleanup_plan(self.registered)
        if ops and self._device_ready:
            self._emit(IssuePrOps(ops, Phase.CLEANUP))
            self._cleanup_ops = ops
            return D.ABORTING
        if self.device_created:
            self._emit(DropDevice())
        return D.ABORTED

    def _send(self, msg: Message) -> None:
        if self.channel_open:
            self._emit(SendMessage(msg))


# States in which the source may have moved the reservation to us (SETUP_OK is out).
_MAY_HOLD_MOVED = frozenset({D.READY, D.LOADING, D.TAKEOVER, D.TAKEN_OVER})


def _reason_of(ev: object) -> AbortReason:
    if isinstance(ev, Timeout):
        return AbortReason.TIMEOUT
    if isinstance(ev, ChannelLost):
        return AbortReason.CONNECTION_LOST
    return getattr(ev, "reason", AbortReason.UNSPECIFIED)


def _detail(ev: object) -> str:
    return str(getattr(ev, "detail", "") or type(ev).__name__)


def _protocol(m: MachineBase, ev: object) -> Exception:
    from .errors import EventNotAllowed

    return EventNotAllowed(f"{m.role} {m.name}: {type(ev).__name__} not allowed in {m.state.name}")
