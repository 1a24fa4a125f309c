"""One migration in the shell: the machine, its channel link, its timer, its tasks.

``Runner`` feeds a sans-IO machine (``source.py``, ``destination.py``) the
events of its channel, its timer and the actions it carried out, and carries
out the actions the machine returns (``_do_<Action>``); the source and
destination runners (``source_runner.py``, ``destination_runner.py``) add
their side's actions. The host is reached through ``service.host`` (the
``Handover`` contract, ``handover.py``); the PR OUT ops through
``pr_ops.issue_ops``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..aio import BackgroundTasks
from .channel import Authenticated, Message
from .errors import AbortReason, EventNotAllowed, MigrationError
from .machine import (
    Action,
    Cancel,
    ChannelLost,
    Event,
    Finished,
    IssuePrOps,
    Log,
    MachineBase,
    PrOpsDone,
    SendMessage,
)
from .plan import PrOp, Strategy
from .pr_ops import issue_ops
from .transport import ChannelLink

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice
    from .handover import Handover
    from .stream import DeviceSnapshot
    from .transport import ChannelTls

# One logger for the service and its runners: their lines read as the
# migration service's, whichever module writes them.
log = logging.getLogger("prmigrate.migration.service")


class RunnerOwner(Protocol):
    """What a runner needs of the service that started it (``service.py``'s
    ``MigrationService`` implements it)."""

    host: Handover
    secret: bytes | None
    tls: ChannelTls | None  # mutual TLS under the channel (transport.load_tls_dir)
    fence_after_loss: bool  # see SourceRunner._fence_ops

    def client_id(self) -> str:
        """The identity this host sends in the channel handshake."""
        ...

    def snapshot(self, dev: PassthroughDevice) -> DeviceSnapshot:
        """The migration stream's view of ``dev``."""
        ...

    def register(self, runner: Runner) -> None:
        """An incoming migration now names its device."""
        ...

    def incoming_done(self, runner: Runner) -> None:
        """An incoming migration finished."""
        ...


class Runner:
    """One migration: the machine, its channel link, its timer and tasks."""

    role = ""

    def __init__(self, service: RunnerOwner, machine: MachineBase, device: str) -> None:
        self.service = service
        self.host = service.host
        self.machine = machine
        self.device_name = device
        self.migration_id = ""
        self.peer = ""
        self.link: ChannelLink | None = None
        self.errors: list[str] = []
        self.unrecorded: str | None = None  # why the source could not record the move
        self.started_wall = time.time()
        self.finished: Finished | None = None
        self.done: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._bg = BackgroundTasks(self, "migration task")
        self._feeding = False
        self._queue: list[Event | Message] = []
        self.log = logging.LoggerAdapter(log, {"migration": self.role})

    # -- feeding the machine
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def feed(self, event: Event | Message) -> None:
        """Hand ``event`` to the machine and carry out what it asks. Events
        produced while actions run are queued, so the machine sees them in
        order; events after Finished are ignored."""
        self._queue.append(event)
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._queue:
                ev = self._queue.pop(0)
                if self.machine.finished:
                    continue
                before = self.machine.state
                try:
                    actions = self.machine.handle(ev, self.loop.time())
                except EventNotAllowed as e:
                    self._error(str(e))
                    actions = self._on_protocol_error(ev, e)
                except MigrationError as e:
                    self._error(f"{type(e).__name__}: {e}")
                    actions = []
                self._run(actions)
                if self.machine.state is not before:
                    self._emit_state()
                self._rearm()
        finally:
            self._feeding = False

    def _on_protocol_error(self, ev: object, e: EventNotAllowed) -> list[Action]:
        """A peer message that is not legal now: the peer is broken; treat it
        as a lost channel (the machine's safest failure path)."""
        if isinstance(ev, Message) and self.link is not None:
            self.link.close()
            if self.machine.allowed(ChannelLost()):
                return self.machine.handle(ChannelLost(f"protocol error: {e}"), self.loop.time())
        return []

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.machine.get_timer()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.machine.finished:
            return
        before = self.machine.state
        self._run(self.machine.handle_timer(self.loop.time()))
        if self.machine.state is not before:
            self._emit_state()
        self._rearm()

    def _error(self, text: str) -> None:
        self.errors.append(text)
        self.log.warning("%s", text)

    # -- actions
    def _run(self, actions: list[Action]) -> None:
        for a in actions:
            handler: Callable[[Any], Any] | None = getattr(self, "_do_" + type(a).__name__, None)
            if handler is None:
                raise AssertionError(f"{self.role}: no handler for {type(a).__name__}")
            handler(a)

    def _do_Log(self, a: Log) -> None:
        self.log.log(a.level, "%s", a.text)
        if a.level >= logging.WARNING:
            self.errors.append(a.text)

    def _do_SendMessage(self, a: SendMessage) -> None:
        if self.link is None or not self.link.send(a.message):
            self.log.info("%s not sent: channel closed", a.message.TYPE.name)

    def _do_IssuePrOps(self, a: IssuePrOps) -> None:
        self._bg.spawn(self._issue(a.ops))

    def _settled(self) -> None:
        """The outcome is final here (subclasses clean up their records)."""

    def _do_Finished(self, a: Finished) -> None:
        self.finished = a
        self._settled()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        level = logging.INFO if self.succeeded else logging.WARNING
        reason = a.reason.name if a.reason is not None else "-"
        t = a.timings
        self.log.log(
            level,
            "%s %s of %s finished %s (reason %s): total %s, pause %s, takeover %s, %d PR round trip(s) in the pause",
            self.role, self.migration_id, self.device_name, a.state, reason,
            _ms(t.total), _ms(t.pause), _ms(t.takeover), t.round_trips_in_pause,
        )
        if not self.done.done():
            self.done.set_result(a)
        self.host.emit(self._event(final=True))
        # Let the last message leave, then end the link.
        if self.link is not None:
            link = self.link
            self.loop.call_soon(link.close)

    @property
    def succeeded(self) -> bool:
        return False

    def device(self) -> PassthroughDevice | None:
        return self.host.devices.get(self.device_name)

    async def _issue(self, ops: tuple[PrOp, ...]) -> None:
        dev = self.device()
        if dev is None:
            self.feed(PrOpsDone(0, "device is gone", definite=False))
            return
        self.feed(await issue_ops(dev, ops, self.log))

    # -- reporting
    def _event(self, final: bool = False) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "event": "MIGRATION",
            "id": self.migration_id,
            "device": self.device_name,
            "role": self.role,
            "peer": self.peer,
            "status": self.machine.state.value,
        }
        if final:
            ev["finished"] = True
            ev["success"] = self.succeeded
            ev["reason"] = self.reason
            ev["timings"] = self.timings()
        return ev

    def _emit_state(self) -> None:
        if not self.machine.finished:
            self.host.emit(self._event())

    @property
    def reason(self) -> str | None:
        r = self.machine.reason
        if r is None:
            return None
        detail = next((e for e in reversed(self.errors) if e), "")
        return f"{r.name.lower().replace('_', '-')}: {detail}" if detail else r.name.lower()

    def timings(self) -> dict[str, Any]:
        t = self.machine.timings.to_dict()
        if self.machine.finished:
            return t
        # still running: the total so far
        started = self.machine.timings.started
        if started is not None:
            t["total_s"] = self.loop.time() - started
        return t

    def query(self) -> dict[str, Any]:
        return {
            "id": self.migration_id,
            "device": self.device_name,
            "role": self.role,
            "peer": self.peer,
            "status": self.machine.state.value,
            "finished": self.finished is not None,
            "success": self.succeeded if self.finished is not None else None,
            "strategy": getattr(self.machine, "strategy", Strategy.PRMIGRATE).value,
            "timings": self.timings(),
            "reason": self.reason,
            "errors": list(self.errors),
            "unrecorded": self.unrecorded,
            "started": self.started_wall,
            "history": [
                {"t": round(now - (self.machine.timings.started or now), 6), "from": a, "event": e, "to": b}
                for now, a, e, b in self.machine.history
            ],
        }

    def cancel(self, detail: str = "cancelled by the operator") -> bool:
        if self.machine.finished or not self.machine.allowed(Cancel()):
            return False
        self.feed(Cancel(AbortReason.CANCELLED, detail))
        return True

    async def close(self) -> None:
        self._bg.cancel_all()
        if self.link is not None:
            self.link.close()
        if self._timer is not None:
            self._timer.cancel()

    # -- channel callbacks
    def _on_message(self, ev: Authenticated | Message) -> None:
        if isinstance(ev, Message):
            self.feed(ev)

    def _on_lost(self, detail: str, error: Exception | None) -> None:
        if self.machine.finished:  # the peer hanging up after the end is no error
            self.log.info("channel: %s", detail)
        else:
            self._error(f"channel: {detail}")
        self.feed(ChannelLost(detail))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"
