"""The source side of a device migration, as a sans-IO state machine.

Rules (the table below is the authority; a missing pair is a EventNotAllowed):

- IDLE -Start-> CONNECTING -ChannelUp-> SETUP (sends SETUP with the device
  config, identity and current PR state) -SetupOk-> STOPPING (HoldGuest: the
  pause starts) -GuestHeld-> RELEASING (source drops the registrations of
  register-only / AR guests, plan.RELEASE) -PrOpsDone-> TRANSFERRED (sends
  STATE) -TakeoverDone-> HANDOVER (sends RESUME: the commit point)
  -Ack-> COMPLETED (HandOverGuest). With nothing to release, GuestHeld goes
  straight to TRANSFERRED.
- A move in a batch (``gated``) waits after SETUP_OK in READY, the guest
  still running, until the batch feeds ``Go`` (AwaitGo): then it holds the
  guest as above. READY fails like SETUP (nothing preempted yet).
- Before STATE is sent the destination cannot have preempted: any failure
  (ChannelLost, Cancel, Timeout, Abort) resumes the guest -> ROLLED_BACK.
- After STATE is sent: Cancel / Timeout -> ROLLING_BACK (sends ROLLBACK; the
  destination freezes and ACKs whether it preempted) -> RECLAIMING; an ABORT
  from the destination, or a lost channel, -> RECLAIMING directly (a lost
  peer is assumed to have preempted). RECLAIMING runs plan.rollback_plan from
  the source nexus, then resumes the guest -> ROLLED_BACK and sends ABORT so
  the destination unregisters. A failure while RELEASING waits for the
  release ops to finish, then reclaims what was released.
- REGISTER AND MOVE plan (SETUP_OK's ``move``: the holder's key is shared
  with a nexus outside the device): RELEASING issues the REGISTER AND MOVE
  to the destination's nexus. Once it may have taken effect, the source
  never reclaims on its own first: a failure sends ROLLBACK (or, with the
  channel lost, just waits for the rollback timer) so that the destination
  moves the reservation back; RECLAIMING then registers again and RESERVEs
  (plan.rollback_plan ``moved``), never PREEMPTs: CONFLICT while the
  destination still holds it -> FAILED, guest held.
- After RESUME is sent the source never serves the guest again: no Ack
  before the timer or a lost channel -> IN_DOUBT (guest stays held; the
  destination may be serving it). An ABORT crossing our RESUME means the
  destination did not resume and never will -> RECLAIMING.
- Reclaim ops are idempotent and retried (RECLAIM_ATTEMPTS); if they still
  fail -> FAILED: the guest stays held, because serving it without its
  reservation is worse than not serving it.

Invariant: the source serves the guest only in IDLE..SETUP and ROLLED_BACK,
and in ROLLED_BACK the reclaim ops have succeeded.
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
from .errors import AbortReason, EventNotAllowed
from .machine import (
    AwaitGo,
    Cancel,
    ChannelLost,
    ChannelUp,
    Connect,
    Go,
    GuestHeld,
    HandOverGuest,
    HoldGuest,
    IssuePrOps,
    Log,
    MachineBase,
    PrOpsDone,
    ResumeGuest,
    SendMessage,
    Start,
    Timeout,
    Timeouts,
    table,
)
from .plan import MovePort, Phase, PrOp, Strategy, rollback_plan, takeover_plan
from .stream import DeviceSnapshot, encode_snapshot


class SourceState(Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    SETUP = "setup"
    READY = "ready"
    STOPPING = "stopping"
    RELEASING = "releasing"
    TRANSFERRED = "transferred"
    HANDOVER = "handover"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    RECLAIMING = "reclaiming"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


S = SourceState
RECLAIM_ATTEMPTS = 3  # extra tries of the (idempotent) rollback ops
_FAILURES = (ChannelLost, Cancel, Timeout, Abort)

SOURCE_TABLE = table(
    {
        (S.IDLE, Start): S.CONNECTING,
        (S.IDLE, Cancel): S.ROLLED_BACK,
        (S.CONNECTING, ChannelUp): S.SETUP,
        **{(S.CONNECTING, e): S.ROLLED_BACK for e in (ChannelLost, Cancel, Timeout)},
        (S.SETUP, SetupOk): (S.STOPPING, S.READY),
        **{(S.SETUP, e): S.ROLLED_BACK for e in _FAILURES},
        (S.READY, Go): S.STOPPING,
        **{(S.READY, e): S.ROLLED_BACK for e in _FAILURES},
        (S.STOPPING, GuestHeld): (S.RELEASING, S.TRANSFERRED),
        **{(S.STOPPING, e): S.ROLLED_BACK for e in _FAILURES},
        (S.RELEASING, PrOpsDone): (S.TRANSFERRED, S.ROLLING_BACK, S.RECLAIMING, S.ROLLED_BACK),
        **{(S.RELEASING, e): S.RELEASING for e in _FAILURES},  # finish the ops first
        (S.TRANSFERRED, TakeoverDone): S.HANDOVER,
        (S.TRANSFERRED, Abort): (S.ROLLING_BACK, S.RECLAIMING, S.ROLLED_BACK),
        (S.TRANSFERRED, ChannelLost): (S.ROLLING_BACK, S.RECLAIMING, S.ROLLED_BACK),
        (S.TRANSFERRED, Cancel): S.ROLLING_BACK,
        (S.TRANSFERRED, Timeout): S.ROLLING_BACK,
        (S.HANDOVER, Ack): S.COMPLETED,
        (S.HANDOVER, Abort): (S.ROLLING_BACK, S.RECLAIMING, S.ROLLED_BACK),
        (S.HANDOVER, ChannelLost): S.IN_DOUBT,
        (S.HANDOVER, Timeout): S.IN_DOUBT,
        (S.ROLLING_BACK, Ack): (S.RECLAIMING, S.ROLLED_BACK),
        (S.ROLLING_BACK, Abort): (S.ROLLING_BACK, S.RECLAIMING, S.ROLLED_BACK),
        (S.ROLLING_BACK, TakeoverDone): S.ROLLING_BACK,  # crossed our ROLLBACK
        (S.ROLLING_BACK, ChannelLost): (S.ROLLING_BACK, S.RECLAIMING, S.ROLLED_BACK),
        (S.ROLLING_BACK, Timeout): (S.RECLAIMING, S.ROLLED_BACK),
        (S.ROLLING_BACK, Cancel): S.ROLLING_BACK,
        (S.RECLAIMING, PrOpsDone): (S.ROLLED_BACK, S.RECLAIMING, S.FAILED),  # retried, then FAILED
        **{(S.RECLAIMING, e): S.RECLAIMING for e in (ChannelLost, Cancel, Abort, Ack, TakeoverDone)},
    }
)

SOURCE_TERMINAL = frozenset({S.COMPLETED, S.ROLLED_BACK, S.FAILED, S.IN_DOUBT})
# States in which the source serves the guest (the invariant's left half).
SOURCE_SERVING = frozenset({S.IDLE, S.CONNECTING, S.SETUP, S.READY, S.ROLLED_BACK})


class SourceMigration(MachineBase):
    """Drive with ``handle(event, now)``; received messages are events."""

    TABLE = SOURCE_TABLE
    TERMINAL = SOURCE_TERMINAL
    role = "source"

    def __init__(
        self,
        migration_id: str,
        snapshot: DeviceSnapshot,
        timeouts: Timeouts | None = None,
        strategy: Strategy = Strategy.PRMIGRATE,
        gated: bool = False,
    ) -> None:
        super().__init__(S.IDLE, f"{migration_id}/{snapshot.name}")
        self.migration_id = migration_id
        self.snapshot = snapshot  # as of setup; replaced by GuestHeld's
        self.timeouts = timeouts or Timeouts()
        self.strategy = Strategy(strategy)
        self.gated = gated  # in a batch: wait in READY for Go before the pause
        self.registered: dict[str, int] = {}  # on the destination, from SETUP_OK
        self.move: dict[str, MovePort] = {}  # holders moved by REGISTER AND MOVE, from SETUP_OK
        self.read_full_status = False
        self.released: tuple[PrOp, ...] = ()  # release ops issued
        self.channel_open = False
        self.guest_held = False
        self.preempted: bool | None = False  # what we know of the destination's PREEMPT
        self._pending: AbortReason | None = None  # failure seen while ops were in flight
        self._reclaim_ops: tuple[PrOp, ...] = ()
        self._reclaim_attempts = 0

    @property
    def serving(self) -> bool:
        return self.state in SOURCE_SERVING and not self.guest_held

    # -- happy path
    def _on_Start(self, ev: Start, now: float) -> S:
        self.timings.started = now
        self._emit(Connect())
        self._arm(now, self.timeouts.connect)
        return S.CONNECTING

    def _on_ChannelUp(self, ev: ChannelUp, now: float) -> S:
        self.channel_open = True
        self._send(Setup(self.migration_id, encode_snapshot(self.snapshot), self.strategy.value))
        self._arm(now, self.timeouts.setup)
        return S.SETUP

    def _on_SetupOk(self, ev: SetupOk, now: float) -> S:
        self.registered = {k.lower(): v for k, v in ev.registered.items()}
        self.read_full_status = ev.read_full_status
        self.move = {k.lower(): v for k, v in ev.move.items()}
        if self.gated:
            self._emit(AwaitGo())
            self._arm(now, self.timeouts.ready)
            return S.READY
        return self._hold(now)

    def _on_Go(self, ev: Go, now: float) -> S:
        return self._hold(now)

    def _hold(self, now: float) -> S:
        self.timings.paused = now
        self.guest_held = True
        self._emit(HoldGuest())
        self._arm(now, self.timeouts.quiesce)
        return S.STOPPING

    def _on_GuestHeld(self, ev: GuestHeld, now: float) -> S:
        if ev.snapshot.name != self.snapshot.name:
            raise ValueError(f"GuestHeld for device {ev.snapshot.name!r}, migrating {self.snapshot.name!r}")
        self.snapshot = ev.snapshot
        release: tuple[PrOp, ...] = ()
        if self.strategy is not Strategy.QEMU:  # QEMU: everything happens on the destination
            release = takeover_plan(ev.snapshot.pr, self.registered, register_only=self.strategy.register_only,
                                    move=self.move).release
        self._arm(now, None)
        self.timings.takeover_started = now  # source view: release + STATE + destination ops
        if release:
            self.released = release
            self._emit(IssuePrOps(release, Phase.RELEASE))
            return S.RELEASING
        return self._transfer(now)

    def _transfer(self, now: float) -> S:
        self._send(State(encode_snapshot(self.snapshot)))
        self._arm(now, self.timeouts.transfer)
        return S.TRANSFERRED

    def _on_TakeoverDone(self, ev: TakeoverDone, now: float) -> S:
        if self.state is S.RECLAIMING or self.state is S.ROLLING_BACK:
            self.preempted = True
            return self.state  # type: ignore[return-value]
        self.preempted = True
        self.timings.takeover_ended = now
        self.timings.round_trips_in_pause += ev.round_trips
        self.timings.peer_takeover_us = ev.takeover_us
        self._send(Resume())
        self._arm(now, self.timeouts.handover)
        return S.HANDOVER

    def _on_Ack(self, ev: Ack, now: float) -> S:
        if self.state is S.HANDOVER:
            if ev.of is not MsgType.RESUME:
                raise EventNotAllowed(f"source {self.name}: ACK of {ev.of.name} in HANDOVER")
            self.timings.resumed = now
            self.guest_held = False
            self._emit(HandOverGuest())
            return S.COMPLETED
        if self.state is S.RECLAIMING:
            return S.RECLAIMING
        # ROLLING_BACK: the destination froze and told us whether it preempted.
        self.preempted = ev.preempted
        return self._reclaim(now)

    @property
    def moved(self) -> tuple[str, ...]:
        """Guests whose REGISTER AND MOVE was issued (whatever its outcome)."""
        return tuple(op.guest for op in self.released if op.action is PrOutAction.REGISTER_AND_MOVE)

    def _await_give_back(self, now: float, reason: AbortReason, detail: str) -> S:
        """The reservation may be on the destination's nexus: ask for it
        back (ROLLBACK; with the channel lost the destination moves it back
        on its own) and reclaim on the ACK, an ABORT or the rollback timer."""
        self._send(Rollback(reason, detail))
        self._arm(now, self.timeouts.rollback)
        return S.ROLLING_BACK

    # -- failures
    def _on_Cancel(self, ev: Cancel, now: float) -> S:
        return self._failure(ev.reason, now, ev.detail)

    def _on_Timeout(self, ev: Timeout, now: float) -> S:
        return self._failure(AbortReason.TIMEOUT, now, f"{ev.state.lower()} took longer than allowed")

    def _on_ChannelLost(self, ev: ChannelLost, now: float) -> S:
        self.channel_open = False
        return self._failure(AbortReason.CONNECTION_LOST, now, ev.detail)

    def _on_Abort(self, ev: Abort, now: float) -> S:
        if self.state in (S.TRANSFERRED, S.HANDOVER, S.ROLLING_BACK):
            self.preempted = ev.preempted
        return self._failure(ev.reason, now, f"destination aborted: {ev.detail}", from_peer=True)

    def _failure(self, reason: AbortReason, now: float, detail: str, from_peer: bool = False) -> S:
        st = self.state
        self._emit(Log(logging.WARNING, f"source {self.name}: {reason.name} in {st.name}: {detail}"))
        if st is S.RECLAIMING or (st is S.ROLLING_BACK and reason is AbortReason.CANCELLED and not from_peer):
            return st  # already on the way back
        self._fail(reason)
        if st in (S.IDLE, S.CONNECTING, S.SETUP, S.READY, S.STOPPING):
            # The destination has no state: it cannot have preempted.
            if not from_peer:
                self._send(Abort(reason, detail))
            return self._resume_local(now)
        if st is S.RELEASING:
            self._pending = reason
            return st
        lost = reason is AbortReason.CONNECTION_LOST and not from_peer
        if self.moved and (from_peer and st in (S.TRANSFERRED, S.HANDOVER, S.ROLLING_BACK)
                           or lost and st in (S.TRANSFERRED, S.ROLLING_BACK)):
            # The reservation is on the destination's nexus (the REGISTER AND
            # MOVE succeeded, or its outcome is unknown): only the destination
            # can move it back. An ABORT it sent may have crossed our move:
            # ask again (ROLLBACK) and reclaim on its ACK or the rollback
            # timer; with the channel lost it moves it back on its own.
            self.preempted = None
            if st is S.ROLLING_BACK:
                return st
            return self._await_give_back(now, reason, detail)
        if st is S.HANDOVER:
            if from_peer:  # it aborted instead of resuming, and never will resume
                return self._reclaim(now)
            self._emit(Log(logging.ERROR, f"source {self.name}: RESUME sent, no ACK: outcome in doubt; guest stays held"))
            return S.IN_DOUBT
        if st is S.TRANSFERRED and reason in (AbortReason.CANCELLED, AbortReason.TIMEOUT) and not from_peer:
            self._send(Rollback(reason, detail))
            self._arm(now, self.timeouts.rollback)
            return S.ROLLING_BACK
        if st is S.TRANSFERRED and not from_peer:  # channel lost: assume it preempted
            self.preempted = None
        if st is S.ROLLING_BACK and not from_peer:  # lost or silent while rolling back
            self.preempted = None
        return self._reclaim(now)

    def _reclaim(self, now: float) -> S:
        ops = rollback_plan(
            self.snapshot.pr,
            preempted=self.preempted,
            released=[op.guest for op in self.released],
            registered_on_dest=self.registered,
            moved=self.moved,
        )
        self._arm(now, None)
        if not ops:
            return self._resume_local(now)
        self._reclaim_ops = ops
        self._emit(IssuePrOps(ops, Phase.ROLLBACK))
        return S.RECLAIMING

    def _resume_local(self, now: float) -> S:
        if self.guest_held:
            self.guest_held = False
            self.timings.resumed = now
            self._emit(ResumeGuest())
        if self.channel_open and self.state in (S.RECLAIMING, S.TRANSFERRED, S.ROLLING_BACK):
            self._send(Abort(self.reason or AbortReason.UNSPECIFIED, "source resumed the guest"))
        self._arm(now, None)
        return S.ROLLED_BACK

    def _on_PrOpsDone(self, ev: PrOpsDone, now: float) -> S:
        if self.state is S.RELEASING:
            self.timings.count_ops(ev)
            # a REGISTER AND MOVE that completed, or whose outcome is unknown
            took = any(op.action is PrOutAction.REGISTER_AND_MOVE and (i < ev.completed or (i == ev.completed and not ev.definite))
                       for i, op in enumerate(self.released))
            if not ev.ok:
                self._fail(AbortReason.PR_RELEASE)
                self._emit(Log(logging.ERROR, f"source {self.name}: release failed: {ev.error}"))
                if took:
                    return self._await_give_back(now, AbortReason.PR_RELEASE, ev.error or "")
                if self.channel_open:
                    self._send(Abort(AbortReason.PR_RELEASE, ev.error or ""))
            if self._pending is not None and took:
                return self._await_give_back(now, self._pending, "failed while the reservation moved")
            if self._pending is not None or not ev.ok:
                return self._reclaim(now)
            return self._transfer(now)
        # RECLAIMING: the guest is still held, so these count as pause round trips
        self.timings.count_ops(ev)
        if ev.ok:
            return self._resume_local(now)
        ops = self._reclaim_ops
        if self._reclaim_attempts < RECLAIM_ATTEMPTS and ev.completed < len(ops):
            # Every rollback op is idempotent: retry from the one that failed.
            self._reclaim_attempts += 1
            self._reclaim_ops = ops[ev.completed :]
            self._emit(Log(logging.WARNING, f"source {self.name}: reclaim failed ({ev.error}), retrying"))
            self._emit(IssuePrOps(self._reclaim_ops, Phase.ROLLBACK))
            return S.RECLAIMING
        self._emit(Log(logging.ERROR, f"source {self.name}: reclaim failed ({ev.error}); guest stays held"))
        return S.FAILED

    def _send(self, msg: Message) -> None:
        if self.channel_open:
            self._emit(SendMessage(msg))

