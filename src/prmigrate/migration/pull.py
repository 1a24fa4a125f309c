"""Incoming devices pulled on first use: the two ends of the watch channel (sans-IO).

A device added with ``incoming-from=ADDR:PORT`` (``device/config.py``)
waits on the destination for a device the source serves now. The
destination opens an authenticated channel to the source's migration
listener (the destination is the channel's client) and keeps it open:

    destination (PullClient)                 source (PullServer)
    WATCH {device, to}          ------->     the device exists here?
                                <-------     DESCRIBED (its stream: config, identity)
                                             or ABORT (DEVICE: no such device)
    ... the incoming device answers what any non-registrant may send ...
    PULL  (a command needs the guest's nexus)
                                ------->     StartMigration(to): the pushed
                                             migration to the watcher, as
                                             ``migrate`` runs it (source.py)
                                <-------     PULLED {success, detail}

The source also starts that migration on its own once the device's last
guest session has gone and stayed gone for ``HANDOVER_GRACE`` seconds (the
source QEMU quit after its migration). A pull that fails leaves the device
on the source, which serves it on (the pushed migration's rollback); the
destination answers the command that asked with a status the guest retries
and pulls again on the next one. The destination serves media access only
once the migration's RESUME reached it (``destination.py``), and the
source never after it sent RESUME: never both.

Both machines use ``machine.MachineBase`` (the table is the authority; a
missing pair is an ``EventNotAllowed``). A channel error of either end
becomes ``ChannelLost``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from .channel import Abort, Described, Message, Pull, Pulled, Watch
from .errors import AbortReason, MigrationError
from .machine import (
    Action,
    Cancel,
    ChannelLost,
    ChannelUp,
    Connect,
    Event,
    Log,
    MachineBase,
    SendMessage,
    Start,
    Timeout,
    table,
)
from .stream import DeviceSnapshot, decode_snapshot

HANDOVER_GRACE = 1.0  # seconds with no guest session before the source hands over on its own
CONNECT_TIMEOUT = 5.0  # destination: connect + authenticate + DESCRIBED
PULL_TIMEOUT = 20.0  # destination: PULL sent -> PULLED; then 02/04/0A (a guest's command timeout is ~30 s)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Disconnect(Action):
    """Close the channel (the machine gave up on it)."""


@dataclass(frozen=True, slots=True)
class DescriptionReady(Action):
    """Destination: the source's view of the device (config, identity)."""

    snapshot: DeviceSnapshot


@dataclass(frozen=True, slots=True)
class PullResult(Action):
    """Destination: the outcome of the pull the held commands wait for."""

    success: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DescribeDevice(Action):
    """Source: feed ``DeviceDescribed`` (or ``DeviceMissing``) for ``device``."""

    device: str


@dataclass(frozen=True, slots=True)
class StartMigration(Action):
    """Source: migrate the device to ``to`` as ``migrate`` does, then feed
    ``MigrationEnded``."""

    device: str
    to: str


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class PullNow(Event):
    """Destination: a guest command needs the guest's nexus here."""


@dataclass(frozen=True, slots=True)
class Arrived(Event):
    """Destination: a migration of the device ended here with RESUME (a
    pull's, the source's own handover, or a pushed ``migrate``)."""


@dataclass(frozen=True, slots=True)
class DeviceDescribed(Event):
    stream: bytes


@dataclass(frozen=True, slots=True)
class DeviceMissing(Event):
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SessionsGone(Event):
    """Source: the device has no guest session any more."""


@dataclass(frozen=True, slots=True)
class SessionsBack(Event):
    """Source: a guest session is there again."""


@dataclass(frozen=True, slots=True)
class MigrationEnded(Event):
    success: bool
    detail: str = ""


# ---------------------------------------------------------------- destination


class PullClientState(Enum):
    IDLE = "idle"
    CONNECTING = "connecting"  # connect + handshake
    WATCHING = "watching"  # WATCH sent, DESCRIBED awaited
    WAITING = "waiting"  # described; serving what needs no nexus
    PULLING = "pulling"  # PULL sent, PULLED awaited
    DISCONNECTED = "disconnected"  # the channel is gone; the next pull connects again
    ARRIVED = "arrived"  # the device is served here
    CLOSED = "closed"  # deleted, or the source has no such device


C = PullClientState
_C_LIVE = (C.CONNECTING, C.WATCHING, C.WAITING, C.PULLING, C.DISCONNECTED)

PULL_CLIENT_TABLE = table(
    {
        (C.IDLE, Start): C.CONNECTING,
        (C.CONNECTING, ChannelUp): C.WATCHING,
        (C.WATCHING, Described): (C.WAITING, C.PULLING, C.DISCONNECTED, C.CLOSED),  # refused: bad or another device
        (C.WAITING, PullNow): C.PULLING,
        (C.PULLING, PullNow): C.PULLING,  # one pull answers every held command
        (C.CONNECTING, PullNow): C.CONNECTING,  # pulled once described
        (C.WATCHING, PullNow): C.WATCHING,
        (C.DISCONNECTED, PullNow): C.CONNECTING,
        (C.PULLING, Pulled): (C.ARRIVED, C.WAITING),
        (C.WAITING, Pulled): (C.ARRIVED, C.WAITING),  # the source's own handover ended
        # the source refuses (no such device here): before DESCRIBED the add
        # fails; later the held commands fail and the next one asks again
        (C.WATCHING, Abort): (C.CLOSED, C.DISCONNECTED),
        (C.WAITING, Abort): C.DISCONNECTED,
        (C.PULLING, Abort): C.DISCONNECTED,
        **{(s, ChannelLost): (C.DISCONNECTED, C.CLOSED) for s in (C.CONNECTING, C.WATCHING, C.WAITING, C.PULLING)},
        (C.DISCONNECTED, ChannelLost): C.DISCONNECTED,
        **{(s, Timeout): (C.DISCONNECTED, C.CLOSED) for s in (C.CONNECTING, C.WATCHING, C.PULLING)},
        **{(s, Arrived): C.ARRIVED for s in (C.IDLE, *_C_LIVE)},
        **{(s, Cancel): C.CLOSED for s in (C.IDLE, *_C_LIVE)},
    }
)


class PullClient(MachineBase):
    """The destination end: one per incoming device."""

    TABLE = PULL_CLIENT_TABLE
    TERMINAL = frozenset({C.ARRIVED, C.CLOSED})
    role = "incoming"

    def __init__(self, device: str, to: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 pull_timeout: float = PULL_TIMEOUT) -> None:
        super().__init__(C.IDLE, device)
        self.device = device
        self.to = to  # our migration listener, where the source migrates to
        self.connect_timeout = connect_timeout
        self.pull_timeout = pull_timeout
        self.snapshot: DeviceSnapshot | None = None
        self.pending = False  # a pull is wanted (commands wait for its outcome)
        self.channel_open = False
        self.pulls = 0  # PULL messages sent

    @property
    def described(self) -> bool:
        return self.snapshot is not None

    def _on_Start(self, ev: Start, now: float) -> C:
        self.timings.started = now
        return self._connect(now)

    def _connect(self, now: float) -> C:
        self._emit(Connect())
        self._arm(now, self.connect_timeout)
        return C.CONNECTING

    def _on_ChannelUp(self, ev: ChannelUp, now: float) -> C:
        self.channel_open = True
        self._emit(SendMessage(Watch(self.device, self.to)))
        return C.WATCHING

    def _on_Described(self, ev: Described, now: float) -> C:
        try:
            snap = decode_snapshot(ev.stream)
        except MigrationError as e:
            return self._lost(now, f"bad description: {e}")
        if snap.name != self.device:
            return self._lost(now, f"described {snap.name!r}, watching {self.device!r}")
        first = self.snapshot is None
        self.snapshot = snap
        if first:
            self._emit(DescriptionReady(snap))
        self._arm(now, None)
        if self.pending:
            return self._pull(now)
        return C.WAITING

    def _pull(self, now: float) -> C:
        self.pulls += 1
        self._emit(SendMessage(Pull()))
        self._arm(now, self.pull_timeout)
        return C.PULLING

    def _on_PullNow(self, ev: PullNow, now: float) -> C:
        self.pending = True
        if self.state is C.WAITING:
            return self._pull(now)
        if self.state is C.DISCONNECTED:
            return self._connect(now)
        return self.state  # type: ignore[return-value]

    def _on_Pulled(self, ev: Pulled, now: float) -> C:
        self._arm(now, None)
        if ev.success:
            self.timings.resumed = now
            self._result(True, ev.detail)
            return C.ARRIVED
        self._emit(Log(logging.WARNING, f"incoming {self.device}: pull failed: {ev.detail}"))
        self._result(False, ev.detail or "the source kept the device")
        return C.WAITING

    def _on_Abort(self, ev: Abort, now: float) -> C:
        if self.snapshot is None:
            self._fail(ev.reason)
            self._emit(Log(logging.WARNING, f"incoming {self.device}: the source refused: {ev.detail}"))
            if self.pending:
                self._result(False, f"the source refused: {ev.detail}")
            self._emit(Disconnect())
            return C.CLOSED
        return self._lost(now, f"the source refused: {ev.detail}")

    def _on_ChannelLost(self, ev: ChannelLost, now: float) -> C:
        return self._lost(now, ev.detail or "channel lost")

    def _on_Timeout(self, ev: Timeout, now: float) -> C:
        return self._lost(now, f"{ev.state.lower()} took longer than allowed")

    def _lost(self, now: float, detail: str) -> C:
        self.channel_open = False
        self._arm(now, None)
        self._emit(Disconnect())
        if self.snapshot is None and not self.pending and self.state in (C.CONNECTING, C.WATCHING):
            # the first description never came: the device is not added
            self._fail(AbortReason.CONNECTION_LOST)
            self._emit(Log(logging.WARNING, f"incoming {self.device}: no description from the source: {detail}"))
            return C.CLOSED
        if self.pending:
            self._emit(Log(logging.WARNING, f"incoming {self.device}: pull failed: {detail}"))
            self._result(False, detail)
        return C.DISCONNECTED

    def _on_Arrived(self, ev: Arrived, now: float) -> C:
        self.timings.resumed = now
        if self.pending:
            self._result(True, "arrived")
        self._emit(Disconnect())
        return C.ARRIVED

    def _on_Cancel(self, ev: Cancel, now: float) -> C:
        self._fail(ev.reason)
        if self.pending:
            self._result(False, ev.detail or "cancelled")
        self._emit(Disconnect())
        return C.CLOSED

    def _result(self, success: bool, detail: str) -> None:
        self.pending = False
        self._emit(PullResult(success, detail))


# ---------------------------------------------------------------- source


class PullServerState(Enum):
    LISTENING = "listening"  # authenticated, nothing asked yet
    DESCRIBING = "describing"
    WATCHED = "watched"  # a destination waits; guest sessions here
    IDLE_WAIT = "idle_wait"  # no guest session: hand over after the grace
    MIGRATING = "migrating"
    HANDED_OVER = "handed_over"
    CLOSED = "closed"


P = PullServerState
_P_LIVE = (P.LISTENING, P.DESCRIBING, P.WATCHED, P.IDLE_WAIT, P.MIGRATING)

PULL_SERVER_TABLE = table(
    {
        (P.LISTENING, Watch): P.DESCRIBING,
        (P.DESCRIBING, DeviceDescribed): P.WATCHED,
        (P.DESCRIBING, DeviceMissing): P.CLOSED,
        (P.WATCHED, Pull): P.MIGRATING,
        (P.IDLE_WAIT, Pull): P.MIGRATING,
        (P.MIGRATING, Pull): P.MIGRATING,  # answered when the running one ends
        (P.WATCHED, SessionsGone): P.IDLE_WAIT,
        (P.IDLE_WAIT, SessionsBack): P.WATCHED,
        (P.IDLE_WAIT, Timeout): P.MIGRATING,
        # session changes while migrating or handed over do not matter
        **{(s, e): s for s in (P.MIGRATING, P.DESCRIBING) for e in (SessionsGone, SessionsBack)},
        (P.WATCHED, SessionsBack): P.WATCHED,
        (P.IDLE_WAIT, SessionsGone): P.IDLE_WAIT,
        (P.MIGRATING, MigrationEnded): (P.HANDED_OVER, P.WATCHED),
        **{(s, ChannelLost): P.CLOSED for s in _P_LIVE},
        **{(s, Cancel): P.CLOSED for s in _P_LIVE},
    }
)


class PullServer(MachineBase):
    """The source end: one per watch channel accepted."""

    TABLE = PULL_SERVER_TABLE
    TERMINAL = frozenset({P.HANDED_OVER, P.CLOSED})
    role = "watched"

    def __init__(self, name: str = "watch", *, grace: float = HANDOVER_GRACE) -> None:
        super().__init__(P.LISTENING, name)
        self.grace = grace
        self.device = ""
        self.to = ""
        self.channel_open = True
        self.migrations = 0  # started by this watch
        self.pulled = False  # the running migration answers a PULL

    def _on_Watch(self, ev: Watch, now: float) -> P:
        self.timings.started = now
        self.device, self.to = ev.device, ev.to
        self.name = f"{ev.device} -> {ev.to}"
        self._emit(DescribeDevice(ev.device))
        return P.DESCRIBING

    def _on_DeviceDescribed(self, ev: DeviceDescribed, now: float) -> P:
        self._send(Described(ev.stream))
        return P.WATCHED

    def _on_DeviceMissing(self, ev: DeviceMissing, now: float) -> P:
        self._fail(AbortReason.DEVICE)
        self._send(Abort(AbortReason.DEVICE, ev.detail))
        self._emit(Disconnect())
        return P.CLOSED

    def _on_Pull(self, ev: Pull, now: float) -> P:
        self.pulled = True
        if self.state is P.MIGRATING:
            return P.MIGRATING
        return self._migrate(now)

    def _migrate(self, now: float) -> P:
        self.migrations += 1
        self._arm(now, None)
        self._emit(StartMigration(self.device, self.to))
        return P.MIGRATING

    def _on_SessionsGone(self, ev: SessionsGone, now: float) -> P:
        if self.state is P.WATCHED:
            self._arm(now, self.grace)
            return P.IDLE_WAIT
        return self.state  # type: ignore[return-value]

    def _on_SessionsBack(self, ev: SessionsBack, now: float) -> P:
        if self.state is P.IDLE_WAIT:
            self._arm(now, None)
            return P.WATCHED
        return self.state  # type: ignore[return-value]

    def _on_Timeout(self, ev: Timeout, now: float) -> P:
        self._emit(Log(logging.INFO, f"watched {self.name}: no guest session for {self.grace:g} s: handing over"))
        return self._migrate(now)

    def _on_MigrationEnded(self, ev: MigrationEnded, now: float) -> P:
        self.pulled = False
        self._send(Pulled(ev.success, ev.detail))
        if ev.success:
            self.timings.resumed = now
            return P.HANDED_OVER
        # the guest runs on here; a later PULL (or the last session going
        # again, after one came back) tries once more
        return P.WATCHED

    def _on_ChannelLost(self, ev: ChannelLost, now: float) -> P:
        self.channel_open = False
        self._arm(now, None)
        return P.CLOSED

    def _on_Cancel(self, ev: Cancel, now: float) -> P:
        self._fail(ev.reason)
        self._arm(now, None)
        self._emit(Disconnect())
        return P.CLOSED

    def _send(self, msg: Message) -> None:
        if self.channel_open:
            self._emit(SendMessage(msg))


__all__ = [
    "PULL_CLIENT_TABLE", "PULL_SERVER_TABLE", "PullClient", "PullClientState", "PullServer", "PullServerState",
    "Arrived", "DescribeDevice", "DescriptionReady", "DeviceDescribed", "DeviceMissing", "Disconnect",
    "MigrationEnded", "PullNow", "PullResult", "SessionsBack", "SessionsGone", "StartMigration",
]
