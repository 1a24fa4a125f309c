"""What the two migration state machines share: actions, events, timings,
timeouts and the table-driven transition core (h11's ``_state.py`` idea).

A machine is driven by ``handle(event, now) -> list[Action]`` and by
``get_timer()`` / ``handle_timer(now)`` (aioquic style: the clock is a
parameter). The transition table maps ``(state, event type)`` to the set of
states the handler may move to; a pair missing from the table is a
``EventNotAllowed`` and leaves the machine unchanged. Received protocol
messages (``channel.Setup``...) are events themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .channel import Message
from .errors import AbortReason, EventNotAllowed
from .plan import MovePort, Observed, Phase, PrOp, TargetTraits
from .stream import DeviceSnapshot

# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Action:
    pass


@dataclass(frozen=True, slots=True)
class Connect(Action):
    """Source: open the channel to the destination (then feed ChannelUp)."""


@dataclass(frozen=True, slots=True)
class SendMessage(Action):
    message: Message


@dataclass(frozen=True, slots=True)
class HoldGuest(Action):
    """Source: hold new guest commands, drain in-flight ones, then feed
    ``GuestHeld`` with the final snapshot."""


@dataclass(frozen=True, slots=True)
class AwaitGo(Action):
    """Source in a batch: set up, the guest still runs; feed ``Go`` when the
    batch lets this move's pause begin."""


@dataclass(frozen=True, slots=True)
class ResumeGuest(Action):
    """Serve the guest again (source after a rollback; destination on RESUME)."""


@dataclass(frozen=True, slots=True)
class HandOverGuest(Action):
    """Source, after the destination resumed: redirect the guest's sessions to
    the destination, log them out asynchronously, close the backend sessions."""


@dataclass(frozen=True, slots=True)
class IssuePrOps(Action):
    """Send these PR OUT commands in order, stop at the first failure, then
    feed ``PrOpsDone``."""

    ops: tuple[PrOp, ...]
    phase: Phase


@dataclass(frozen=True, slots=True)
class CreateDevice(Action):
    """Destination: create the device from the snapshot, open its backend
    sessions, read PR IN, then feed ``DeviceReady``."""

    snapshot: DeviceSnapshot


@dataclass(frozen=True, slots=True)
class LoadState(Action):
    """Destination: load the PR state and unit attentions, then ``StateLoaded``."""

    snapshot: DeviceSnapshot


@dataclass(frozen=True, slots=True)
class DropDevice(Action):
    """Destination: destroy the device and close its backend sessions."""


@dataclass(frozen=True, slots=True)
class Log(Action):
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Finished(Action):
    """The machine reached a terminal state."""

    state: str
    reason: AbortReason | None
    timings: Timings


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, slots=True)
class Start(Event):
    pass


@dataclass(frozen=True, slots=True)
class ChannelUp(Event):
    """The channel authenticated the peer."""


@dataclass(frozen=True, slots=True)
class ChannelLost(Event):
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Cancel(Event):
    reason: AbortReason = AbortReason.CANCELLED
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Timeout(Event):
    """Fed by ``handle_timer``; not meant to be fed directly."""

    state: str = ""


@dataclass(frozen=True, slots=True)
class Go(Event):
    """Source in a batch, READY: the pause may begin now."""


@dataclass(frozen=True, slots=True)
class GuestHeld(Event):
    """Source: guest commands held and in-flight ones drained; ``snapshot`` is
    the final state (PR state and unit attentions no longer change)."""

    snapshot: DeviceSnapshot


@dataclass(frozen=True, slots=True)
class PrOpsDone(Event):
    """Outcome of an ``IssuePrOps``: ``completed`` ops succeeded in order; on
    failure ``error`` says why and ``definite`` whether the failed op surely
    did not take effect (a SCSI status) or might have (timeout, lost session)."""

    completed: int
    error: str | None = None
    definite: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None

    def __post_init__(self) -> None:
        if self.completed < 0:
            raise ValueError("completed must be >= 0")


@dataclass(frozen=True, slots=True)
class DeviceReady(Event):
    """Destination: device created, backend sessions open; what PR IN showed."""

    observed: Observed | None = None
    traits: TargetTraits = TargetTraits()
    # per guest, for REGISTER AND MOVE: the destination's nexus (TransportID
    # and the relative target port it reaches the LUN through) and the
    # source's (where a rollback moves the reservation back)
    ports: Mapping[str, MovePort] = field(default_factory=dict)
    source_ports: Mapping[str, MovePort] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceFailed(Event):
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StateLoaded(Event):
    """Destination: the snapshot is loaded into the device. ``observed``: a
    PR IN taken inside the pause, if the shell chose to (worth it only when
    the tracked state is unverified; it costs a round trip)."""

    observed: Observed | None = None


# ---------------------------------------------------------------- timings


@dataclass(slots=True)
class Timings:
    """Phase timestamps from the ``now`` values fed in (seconds, one clock)."""

    started: float | None = None
    paused: float | None = None  # guest hold requested (source) / STATE received (dest)
    takeover_started: float | None = None
    takeover_ended: float | None = None
    resumed: float | None = None  # guest served again (by whichever host)
    ended: float | None = None
    round_trips_in_pause: int = 0  # backend PR commands inside the pause
    peer_takeover_us: int | None = None  # as reported by the destination

    @staticmethod
    def _span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    @property
    def total(self) -> float | None:
        return self._span(self.started, self.ended)

    @property
    def pause(self) -> float | None:
        return self._span(self.paused, self.resumed)

    @property
    def takeover(self) -> float | None:
        return self._span(self.takeover_started, self.takeover_ended)

    def count_ops(self, done: PrOpsDone) -> None:
        """One ``IssuePrOps`` carried out inside the pause: each op that
        completed and the one that failed cost a round trip."""
        self.round_trips_in_pause += done.completed + (0 if done.ok else 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total,
            "pause_s": self.pause,
            "takeover_s": self.takeover,
            "round_trips_in_pause": self.round_trips_in_pause,
            "peer_takeover_us": self.peer_takeover_us,
        }


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed per phase."""

    connect: float = 10.0
    setup: float = 30.0  # source: SETUP -> SETUP_OK; destination: create + register
    quiesce: float = 10.0  # source: hold + drain the guest
    # source in a batch: set up, waiting for its turn to pause. Shorter than
    # the destination's ``await_state``, so the source gives up first.
    ready: float = 300.0
    await_state: float = 600.0  # destination: READY -> STATE
    load: float = 5.0
    transfer: float = 5.0  # source: STATE sent -> TAKEOVER_DONE
    commit: float = 5.0  # destination: TAKEOVER_DONE sent -> RESUME
    # source: RESUME sent -> ACK. Longer than ``commit`` on purpose: if RESUME
    # is lost, the destination's commit timer fires first and its ABORT
    # (preempted=True) lets the source take the guest back instead of ending
    # IN_DOUBT.
    handover: float = 10.0
    rollback: float = 5.0  # source: ROLLBACK sent -> ACK
    rollback_hold: float = 30.0  # destination: preempted, waiting for the source to reclaim


# ---------------------------------------------------------------- the core

Table = Mapping[tuple[Enum, type[Event] | type[Message]], frozenset[Enum]]


class MachineBase:
    """Table-checked dispatch, timers and one log line per state change."""

    TABLE: Table
    TERMINAL: frozenset[Enum]
    role: str

    def __init__(self, state: Enum, name: str) -> None:
        self.state = state
        self.name = name
        self.timings = Timings()
        self.reason: AbortReason | None = None
        self.history: list[tuple[float, str, str, str]] = []  # (now, from, event, to)
        self._deadline: float | None = None
        self._out: list[Action] = []

    # -- aioquic-style timer
    def get_timer(self) -> float | None:
        return None if self.state in self.TERMINAL else self._deadline

    def handle_timer(self, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline or self.state in self.TERMINAL:
            return []
        self._deadline = None
        return self.handle(Timeout(self.state.name), now)

    def _arm(self, now: float, seconds: float | None) -> None:
        self._deadline = None if seconds is None else now + seconds

    @property
    def finished(self) -> bool:
        return self.state in self.TERMINAL

    def allowed(self, event: object) -> bool:
        return (self.state, type(event)) in self.TABLE

    def handle(self, event: Event | Message, now: float) -> list[Action]:
        key = (self.state, type(event))
        allowed = self.TABLE.get(key)
        if allowed is None:
            raise EventNotAllowed(f"{self.role} {self.name}: {type(event).__name__} not allowed in {self.state.name}")
        handler: Callable[[Any, float], Enum] = getattr(self, "_on_" + type(event).__name__)
        old = self.state
        new = handler(event, now)
        if new not in allowed:  # a bug in the handler, not in the peer
            raise AssertionError(f"{old.name} --{type(event).__name__}--> {new.name} is not in the table")
        self.state = new
        self.history.append((now, old.name, type(event).__name__, new.name))
        if new is not old:
            self._emit(Log(logging.INFO, f"{self.role} {self.name}: {old.name} -> {new.name} on {type(event).__name__}"))
        if new in self.TERMINAL and new is not old:
            self._deadline = None
            self.timings.ended = now
            self._emit(Finished(new.name, self.reason, self.timings))
        out, self._out = self._out, []
        return out

    def _emit(self, *actions: Action) -> None:
        self._out.extend(actions)

    def _fail(self, reason: AbortReason) -> None:
        if self.reason is None:
            self.reason = reason


def table(rows: Mapping[tuple[Enum, type], Enum | tuple[Enum, ...]]) -> dict[tuple[Enum, type], frozenset[Enum]]:
    return {k: frozenset(v if isinstance(v, tuple) else (v,)) for k, v in rows.items()}


