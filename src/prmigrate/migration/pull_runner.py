"""The watch channel in the shell: ``IncomingLink`` (destination), ``WatchLink`` (source).

Thin, like the migration runners (``runner.py``): each feeds its sans-IO
machine (``pull.py``) the channel's messages, its timer and the outcome of
what it carried out.

``IncomingLink`` (one per incoming device on the destination)
    ``Connect``: TCP + the channel handshake to the source's migration
    listener; ``DescriptionReady`` resolves ``described()``; ``PullResult``
    resolves the futures ``pull()`` handed out. ``Arrived`` is fed by the
    host when a migration of the device resumed here.
``WatchLink`` (one per accepted watch channel on the source)
    ``DescribeDevice``: the migration stream's view of the device (the
    service's ``snapshot``); the device's guest sessions are counted every
    ``POLL`` seconds while it is watched (``SessionsGone``/``SessionsBack``);
    ``StartMigration``: the service's ``migrate`` to the watcher (after the
    same reconciliation a pushed ``migrate`` does), or the migration of the
    device already running, then ``MigrationEnded``.

Events: ``INCOMING`` {device, role: destination|source, peer, status} on
each state change (``finished`` on the last one).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from ..device.errors import DeviceError
from .channel import Authenticated, Message, Role
from .errors import AbortReason
from .machine import Cancel, ChannelLost, ChannelUp, Connect, Finished, Log, Start
from .plan import Strategy
from .pull import (
    Arrived,
    DescribeDevice,
    DescriptionReady,
    DeviceDescribed,
    DeviceMissing,
    Disconnect,
    MigrationEnded,
    PullClient,
    PullClientState,
    PullNow,
    PullResult,
    PullServer,
    PullServerState,
    SessionsBack,
    SessionsGone,
    StartMigration,
)
from .runner import Runner, RunnerOwner, log
from .stream import DeviceSnapshot, encode_snapshot
from .transport import ChannelLink, new_channel, parse_address

POLL = 0.1  # seconds between guest session counts of a watched device


class PullOwner(RunnerOwner, Protocol):
    """What the watch links need of the migration service (``service.py``)."""

    def get(self, device: str) -> Runner | None:
        """The latest migration of ``device``."""
        ...

    def migrate(self, device: str, to: tuple[str, int], strategy: Strategy | str = ...,
                frontend: tuple[str, int] | None = None) -> Any:
        """Start the pushed migration of ``device`` to ``to`` (a ``SourceRunner``)."""
        ...


MAX_ERRORS = 20  # a watch lives as long as its device: keep its last errors only


class _LinkRunner(Runner):
    """A runner whose events are ``INCOMING``, not ``MIGRATION``; a warning
    repeated (a guest retrying a pull that keeps failing) is logged once,
    then at debug level, so the log stays bounded."""

    def _error(self, text: str) -> None:
        self._do_Log(Log(logging.WARNING, text))

    def _do_Log(self, a: Log) -> None:
        level = a.level
        if level >= logging.WARNING:
            if self.errors and self.errors[-1] == a.text:
                level = logging.DEBUG
            else:
                self.errors = [*self.errors[-(MAX_ERRORS - 1):], a.text]
        self.log.log(level, "%s", a.text)

    def _event(self, final: bool = False) -> dict[str, Any]:
        ev: dict[str, Any] = {"event": "INCOMING", "device": self.device_name, "role": self.role,
                              "peer": self.peer, "status": self.machine.state.value}
        if final:
            ev["finished"] = True
        return ev

    def _do_Disconnect(self, a: Disconnect) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            self.loop.call_soon(link.close)  # let a last message leave

    def _do_Finished(self, a: Finished) -> None:
        self.finished = a
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.log.info("%s %s finished %s", self.role, self.device_name, a.state)
        if not self.done.done():
            self.done.set_result(a)
        self.host.emit(self._event(final=True))
        if self.link is not None:
            self.loop.call_soon(self.link.close)


class IncomingLink(_LinkRunner):
    """The destination's end for one incoming device."""

    role = "destination"

    def __init__(self, service: PullOwner, device: str, source: tuple[str, int], to: str) -> None:
        machine = PullClient(device, to)
        super().__init__(service, machine, device)
        self.machine: PullClient = machine
        self.source = source
        self.peer = f"{source[0]}:{source[1]}"
        self._described: asyncio.Future[DeviceSnapshot] = self.loop.create_future()
        self._waiting: list[asyncio.Future[str | None]] = []
        self.log = logging.LoggerAdapter(log, {"incoming": f"{device} from {self.peer}"})

    def start(self) -> None:
        self.feed(Start())

    async def described(self) -> DeviceSnapshot:
        """The source's description of the device; ``ConnectionError`` with
        the reason when it does not come."""
        return await asyncio.shield(self._described)

    def pull(self) -> asyncio.Future[str | None]:
        """Ask for the device; the future resolves to None when it arrived
        here, or to why the pull failed."""
        fut: asyncio.Future[str | None] = self.loop.create_future()
        if self.machine.state is PullClientState.ARRIVED:
            fut.set_result(None)
            return fut
        if self.machine.finished:
            fut.set_result("the incoming device is closed")
            return fut
        self._waiting.append(fut)
        self.feed(PullNow())
        return fut

    def arrived(self) -> None:
        self.feed(Arrived())

    def cancel(self, detail: str = "incoming device deleted") -> bool:
        if self.machine.finished:
            return False
        self.feed(Cancel(AbortReason.CANCELLED, detail))
        return True

    def _do_Connect(self, a: Connect) -> None:
        self._bg.spawn(self._connect())

    async def _connect(self) -> None:
        host, port = self.source
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.machine.connect_timeout)
        except (OSError, TimeoutError) as e:
            self.feed(ChannelLost(f"cannot connect to {host}:{port}: {e or type(e).__name__}"))
            return
        if self.machine.finished or self.machine.state is not PullClientState.CONNECTING:
            writer.close()
            return
        if self.machine.to.startswith(":"):  # our listener is on a wildcard address
            self.machine.to = f"{writer.get_extra_info('sockname')[0]}{self.machine.to}"
        assert self.service.secret is not None
        chan = new_channel(Role.CLIENT, self.service.secret, self.service.client_id())
        chan.start()
        link = ChannelLink(reader, writer, chan, self._on_channel_event, self._on_link_lost)
        self.link = link
        link.start()

    def _on_channel_event(self, ev: Authenticated | Message) -> None:
        self.feed(ChannelUp() if isinstance(ev, Authenticated) else ev)

    def _on_link_lost(self, detail: str, error: Exception | None) -> None:
        self.link = None
        if not self.machine.finished:
            self.feed(ChannelLost(detail))

    def _do_DescriptionReady(self, a: DescriptionReady) -> None:
        if not self._described.done():
            self._described.set_result(a.snapshot)

    def _do_PullResult(self, a: PullResult) -> None:
        waiting, self._waiting = self._waiting, []
        for fut in waiting:
            if not fut.done():
                fut.set_result(None if a.success else a.detail)

    def _do_Finished(self, a: Finished) -> None:
        if not self._described.done():
            why = next((e for e in reversed(self.errors) if e), a.state.lower())
            self._described.set_exception(ConnectionError(why))
            self._described.exception()  # retrieved: an add that gave up does not log it
        self._do_PullResult(PullResult(a.state == PullClientState.ARRIVED.name, "the incoming device is closed"))
        super()._do_Finished(a)


class WatchLink(_LinkRunner):
    """The source's end of one watch channel (accepted by the service)."""

    role = "source"

    def __init__(self, service: PullOwner, link: ChannelLink, peer: str) -> None:
        machine = PullServer(f"watch from {peer}")
        super().__init__(service, machine, "")
        self.machine: PullServer = machine
        self.owner = service
        self.link = link
        self.peer = peer
        self._poller: asyncio.Task[None] | None = None
        self.log = logging.LoggerAdapter(log, {"watch": peer})

    def on_message(self, ev: Message) -> None:
        self.feed(ev)

    def on_lost(self, detail: str, error: Exception | None) -> None:
        self.link = None
        if not self.machine.finished:
            self.feed(ChannelLost(detail))

    def _do_DescribeDevice(self, a: DescribeDevice) -> None:
        self.device_name = a.device
        self.log = logging.LoggerAdapter(log, {"watch": f"{a.device} from {self.peer}"})
        dev = self.host.devices.get(a.device)
        if dev is None:
            self.feed(DeviceMissing(f"device {a.device!r} is not served here"))
            return
        try:
            parse_address(self.machine.to)
            snap = self.owner.snapshot(dev)
        except Exception as e:  # a ServiceError (identity not captured), a bad address
            self.feed(DeviceMissing(f"device {a.device!r}: {e}"))
            return
        self.feed(DeviceDescribed(encode_snapshot(snap)))
        self.log.info("destination %s waits for device %s", self.machine.to, a.device)
        self._poller = self._bg.spawn(self._poll_sessions())

    async def _poll_sessions(self) -> None:
        last: bool | None = None
        while not self.machine.finished:
            dev = self.host.devices.get(self.device_name)
            if dev is None:
                if self.machine.state is not PullServerState.MIGRATING:  # moved by an operator's migrate
                    self.feed(Cancel(AbortReason.DEVICE, "the device is gone from this host"))
                    return
                await asyncio.sleep(POLL)  # handed over by our migration: its end reports it
                continue
            any_session = self.host.guest_sessions(self.host.frontend_node(dev.config)) > 0
            if any_session is not last:
                last = any_session
                self.feed(SessionsBack() if any_session else SessionsGone())
            await asyncio.sleep(POLL)

    def _do_StartMigration(self, a: StartMigration) -> None:
        self._bg.spawn(self._migrate(a.device, a.to))

    async def _migrate(self, device: str, to: str) -> None:
        service = self.owner
        try:
            runner = service.get(device)
            if runner is None or runner.finished is not None:
                dev = self.host.devices.get(device)
                if dev is not None and dev.migrate_pr and not dev.held:
                    try:
                        await dev.verify("before migration")
                    except DeviceError as e:
                        self.log.warning("reconciliation before the migration failed: %s", e)
                runner = service.migrate(device, parse_address(to))
            await runner.done
        except Exception as e:  # ServiceError, a bad address
            self.feed(MigrationEnded(False, str(e)))
            return
        self.feed(MigrationEnded(bool(runner.succeeded), runner.reason or ""))
