"""The migration service of a host: incoming and outgoing migrations.

``MigrationService(host, secret)`` owns a listening socket for incoming
migrations (one ``DestinationRunner`` per authenticated connection,
``destination_runner.py``) and starts outgoing ones (``migrate()``: one
``SourceRunner``, ``source_runner.py``). Each runner (``runner.py``) is thin:
it moves channel bytes (``transport.py``), arms the machine's timer on the
loop clock, runs PR OUT commands (``pr_ops.py``), and feeds the outcome of
each action back as an event. Every rule (when to hold, preempt, roll back)
lives in the machines (``source.py``, ``destination.py``) and the plans
(``plan.py``). The host is reached only through the ``Handover`` contract
(``handover.py``), which ``host/daemon.py`` implements.

With ``tls`` (``transport.load_tls_dir``) the channel runs under mutual
x509 TLS: the listener starts TLS on each accepted connection
(``transport.accept_tls``; a refused handshake is a ``MIGRATION_REFUSED``
event), the source connects with it (``transport.open_connection``; a
refused handshake cancels the migration with the reason).

A source daemon killed in the middle of a migration settles it when started
again: a record of the migration's progress
(``<state-dir>/<device>.migration.json``, ``marker.py``) tells
``recover_interrupted`` that the destination may have registered or
preempted; before RESUME was sent the destination never serves the guest,
so the device is held as it is added, the reservation taken back from its
own nexus (``plan.rollback_plan`` and ``plan.fence_ops``) and the guest
served again. After RESUME (marker phase ``resume-sent``) the device is
never served again: the host daemon redirects its logins to the
destination's frontend portal the marker names.

With migrate-pr off the source sends no PR state: the destination neither
registers nor preempts, and the reservation stays with the source's nexus.

An incoming device (``incoming-from=``, ``pull.py``): ``watch(device,
source)`` opens the destination's watch channel (``IncomingLink``); a
channel accepted here whose first message is WATCH is a destination
waiting for a device of ours (``WatchLink``), which a PULL (or the device's
last guest session gone) migrates to it with ``migrate``.

Control (``install`` in ``host/migration_control.py``): ``migrate``,
``query-migrate``, ``migrate-cancel``; events ``MIGRATION`` (one per state
change, with ``status`` = the machine state) through ``host.emit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..device.errors import DeviceError
from ..device.state import DevicePrState
from .batch import PAUSE_PARALLEL, SETUP_PARALLEL, BatchGate
from .channel import Authenticated, Message, Role, Watch
from .destination_runner import DestinationRunner
from .handover import Handover
from .machine import Go, Timeouts
from .marker import MigrationMarker
from .plan import Strategy, fence_ops, rollback_plan
from .pr_ops import issue_ops
from .pull_runner import IncomingLink, WatchLink
from .runner import Runner, log
from .source_runner import SourceRunner
from .stream import DeviceSnapshot
from .transport import (
    ChannelLink,
    ChannelTls,
    accept_tls,
    encode_peer_id,
    new_channel,
    parse_address,
)

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice

__all__ = ["MigrationService", "ServiceError", "parse_address"]


class ServiceError(Exception):
    """A request the service refuses (unknown device, already migrating...)."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _snapshot(dev: PassthroughDevice) -> DeviceSnapshot:
    """The migration stream's view of a device; no PR state with migrate-pr off
    (QEMU sends its ``scsi-disk/pr`` subsection only with migrate-pr on)."""
    try:
        snap = dev.snapshot()
    except DeviceError as e:  # identity not captured yet
        raise ServiceError("GenericError", str(e)) from e
    return snap if dev.migrate_pr else replace(snap, pr=DevicePrState())


class Batch:
    """Several devices moved to one destination in one order (``batch.py``):
    the setups first, then the pauses one after another. Each move is its
    own ``SourceRunner`` over its own channel."""

    def __init__(self, service: MigrationService, runners: list[SourceRunner], gate: BatchGate) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.service = service
        self.runners = {r.device_name: r for r in runners}
        self.gate = gate

    def pump(self) -> None:
        for name in self.gate.to_start():
            runner = self.runners[name]
            dev = self.service.host.devices.get(name)
            if dev is not None:
                try:  # the state as it is now, not when the batch was asked for
                    runner.machine.snapshot = self.service.snapshot(dev)
                except ServiceError as e:
                    runner._error(str(e))
            runner.start()
        for name in self.gate.to_go():
            runner = self.runners[name]
            if runner.machine.allowed(Go()):
                runner.feed(Go())
            else:
                self.gate.done(name)

    def on_ready(self, runner: SourceRunner) -> None:
        self.gate.ready(runner.device_name)
        self.pump()

    def follow(self, runner: SourceRunner) -> None:
        """A move's pause is over for the batch when the runner reports its
        end: after a success that is once the guest's sessions left for the
        destination (the hand-over), so the next guest's pause does not
        share the loops with this guest's logins."""
        def over(_: object) -> None:
            self.gate.done(runner.device_name)
            self.pump()

        runner.done.add_done_callback(over)

    def query(self) -> dict[str, Any]:
        return {"batch": self.id, "migrations": [
            {"id": r.migration_id, "device": r.device_name, "status": r.machine.state.value}
            for r in self.runners.values()]}


class MigrationService:
    """Incoming and outgoing migrations of one host daemon."""

    def __init__(self, host: Handover, secret: bytes | None, *, timeouts: Timeouts | None = None,
                 tls: ChannelTls | None = None) -> None:
        self.host = host
        self.secret = secret
        self.tls = tls  # mutual TLS under the channel (transport.load_tls_dir)
        self.timeouts = timeouts
        self.listening: list[tuple[str, int]] = []
        self.runners: dict[str, Runner] = {}  # device -> latest migration
        # A source whose destination went silent removes the keys that the
        # destination registered during setup (see SourceRunner._fence_ops, plan.fence_ops).
        self.fence_after_loss = True
        self.incoming: set[DestinationRunner] = set()
        self._server: asyncio.base_events.Server | None = None
        self._links: set[ChannelLink] = set()
        self._interrupted: dict[str, dict[str, Any]] = {}
        # incoming devices (pull.py): ours waiting here, and destinations watching ours
        self.incoming_links: dict[str, IncomingLink] = {}
        self.watches: set[WatchLink] = set()
        self._recovering: set[asyncio.Task[Any]] = set()

    # -- identities carried by the handshake
    def client_id(self) -> str:
        return encode_peer_id(self.host.name, self.host.initiator)

    def server_id(self) -> str:
        portal = ""
        if self.host.listening:
            h, p = self.host.listening[0][:2]
            portal = f"{h}:{p}"
        return encode_peer_id(self.host.name, portal)

    # -- listening
    async def listen(self, host: str, port: int) -> list[tuple[str, int]]:
        if not self.secret:
            raise ServiceError("GenericError", "incoming migrations need a cluster secret")
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        bound = [s.getsockname()[:2] for s in self._server.sockets]
        self.listening += bound
        log.info("accepting migrations on %s", ", ".join(f"{h}:{p}" for h, p in bound))
        return bound

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.secret is not None
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        refused = await accept_tls(writer, self.tls)
        if refused is not None:
            log.warning("migration peer %s refused: %s", peer_s, refused)
            self.host.emit({"event": "MIGRATION_REFUSED", "peer": peer_s, "reason": refused})
            return
        runner = DestinationRunner(self, peer_s, self.timeouts)
        chan = new_channel(Role.SERVER, self.secret, self.server_id())
        authenticated = False
        watch: WatchLink | None = None
        first = True

        def on_event(ev: Authenticated | Message) -> None:
            nonlocal authenticated, watch, first
            if isinstance(ev, Authenticated):
                authenticated = True
                runner.on_authenticated(ev.peer_id)
                self.incoming.add(runner)
                log.info("migration channel from %s (%s) authenticated", peer_s, ev.peer_id)
                return
            if first and isinstance(ev, Watch):  # a destination waiting for a device of ours
                self.incoming.discard(runner)
                watch = WatchLink(self, link, runner.peer)
                self.watches.add(watch)
                watch.done.add_done_callback(lambda _: self.watches.discard(watch))  # type: ignore[arg-type]
            first = False
            if watch is not None:
                watch.on_message(ev)
                return
            runner.feed(ev)

        def on_lost(detail: str, error: Exception | None) -> None:
            self._links.discard(link)
            if not authenticated:
                log.warning("migration peer %s refused: %s", peer_s, detail)
                self.host.emit({"event": "MIGRATION_REFUSED", "peer": peer_s, "reason": detail})
                return
            if watch is not None:
                watch.on_lost(detail, error)
                return
            runner._on_lost(detail, error)

        link = ChannelLink(reader, writer, chan, on_event, on_lost)
        runner.link = link
        self._links.add(link)
        link.start()

    # -- incoming devices (pull.py)
    def watch(self, device: str, source: tuple[str, int]) -> IncomingLink:
        """Start waiting for ``device`` served by the host whose migration
        listener is ``source``: the link asks for its description at once
        (``await link.described()``) and pulls it on ``link.pull()``."""
        if not self.secret:
            raise ServiceError("GenericError", "incoming devices need a cluster secret (--secret-file)")
        if not self.listening:
            raise ServiceError("GenericError", "incoming devices need a migration listener (--migrate-listen)")
        current = self.incoming_links.get(device)
        if current is not None and current.finished is None:
            raise ServiceError("GenericError", f"device {device!r} is already incoming")
        host, port = self.listening[0][:2]
        # a wildcard listener: the address of the connection to the source
        to = f":{port}" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"
        link = IncomingLink(self, device, source, to)
        self.incoming_links[device] = link
        link.done.add_done_callback(lambda _: self._incoming_link_done(device, link))
        link.start()
        return link

    def _incoming_link_done(self, device: str, link: IncomingLink) -> None:
        if self.incoming_links.get(device) is link:
            del self.incoming_links[device]

    # -- a source killed in the middle of a migration, started again
    def recover_interrupted(self) -> list[str]:
        """Read the markers of outgoing migrations this daemon did not finish
        (it was killed). Each device among the configured ones is settled when
        it is added (``daemon.start``): held at once, before a guest command
        reaches it, its registrations and reservation taken back from its own
        nexus (the destination may have registered or preempted: rollback
        and fence ops, all idempotent), its tracked state restored, then the
        guest runs on. A migration past its commit point (RESUME sent) is not
        undone: the destination may serve the guest, so its marker is kept
        and the host daemon redirects the device's logins there
        (``HostDaemon._publish_committed``) instead of serving it."""
        state_dir = self.host.state_dir
        if state_dir is None or not Path(state_dir).is_dir():
            return []
        configured = self.host.configured_devices()
        pending = []
        for path in sorted(Path(state_dir).glob("*.migration.json")):
            record = MigrationMarker.load(path)
            device = record.get("device") if record else None
            phase = record.get("phase") if record else None
            if record is not None and phase == "resume-sent":
                # Past the commit point: the host daemon redirects the guest
                # to the destination and never serves the device here; it
                # removes the marker once the move record is written.
                log.warning("interrupted migration %s past its commit point: %s is not served here",
                            path.name, device)
                continue
            if record is None or device not in configured or phase not in ("setup", "held"):
                log.warning("interrupted migration %s (phase %s): not settled here", path.name, phase)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            self._interrupted[str(device)] = record
            pending.append(str(device))
        if pending:
            self.host.add_listener(self._on_device_added)
        return pending

    def _on_device_added(self, msg: dict[str, Any]) -> None:
        if msg.get("event") != "DEVICE_ADDED":
            return
        name = msg.get("data", {}).get("device")
        record = self._interrupted.pop(name, None)
        dev = self.host.devices.get(name) if record is not None else None
        if dev is None or record is None:
            return
        dev.hold()  # synchronously, in the call that exposed it: no guest command got through
        task = asyncio.ensure_future(self._settle_interrupted(dev, record))
        self._recovering.add(task)
        task.add_done_callback(self._recovering.discard)

    async def _settle_interrupted(self, dev: PassthroughDevice, record: dict[str, Any]) -> None:
        mid = record.get("id", "?")
        try:
            pr = DevicePrState.from_dict(record["pr"])
        except (KeyError, ValueError, TypeError) as e:
            log.error("interrupted migration %s of %s: unreadable record (%s); guest held", mid, dev.name, e)
            return
        # A REGISTER AND MOVE plan's holder (its key shared with another
        # host): registered again and RESERVEd, never PREEMPTed; the
        # destination, which lost the channel, moved the reservation back.
        moved = [str(g) for g in record.get("move", ()) if isinstance(g, str)]
        ops = rollback_plan(pr, preempted=None, released=list(pr.guests), moved=moved)
        ops += fence_ops(pr, None, None, moved=moved)
        log.warning("interrupted migration %s of %s (phase %s): taking the reservation back (%d PR ops)",
                    mid, dev.name, record.get("phase"), len(ops))
        await dev.drain()
        done = await issue_ops(dev, ops, log)
        if not done.ok:
            # As the source machine's FAILED: serving the guest without its
            # reservation is worse than not serving it.
            log.error("interrupted migration %s of %s: %s; guest stays held", mid, dev.name, done.error)
            self.host.emit({"event": "MIGRATION_RECOVERED", "device": dev.name, "id": mid,
                              "success": False, "reason": done.error})
            return
        dev.restore(pr)
        dev.release_held()
        MigrationMarker(self.host.state_dir, dev.name).remove()
        log.info("interrupted migration %s of %s settled: the guest runs here with its reservation", mid, dev.name)
        self.host.emit({"event": "MIGRATION_RECOVERED", "device": dev.name, "id": mid, "success": True})

    def snapshot(self, dev: PassthroughDevice) -> DeviceSnapshot:
        """The migration stream's view of ``dev`` (``_snapshot``)."""
        return _snapshot(dev)

    def incoming_done(self, runner: Runner) -> None:
        if isinstance(runner, DestinationRunner):
            self.incoming.discard(runner)

    def register(self, runner: Runner) -> None:
        current = self.runners.get(runner.device_name)
        if current is None or current.finished is not None:
            self.runners[runner.device_name] = runner

    # -- outgoing
    def migrate(
        self,
        device: str,
        to: tuple[str, int],
        strategy: Strategy | str = Strategy.PRMIGRATE,
        frontend: tuple[str, int] | None = None,
    ) -> SourceRunner:
        if not self.secret:
            raise ServiceError("GenericError", "no cluster secret: start the daemon with --secret-file")
        dev = self.host.devices.get(device)
        if dev is None:
            raise ServiceError("DeviceNotFound", self.host.not_here(device))
        current = self.runners.get(device)
        if current is not None and current.finished is None:
            raise ServiceError("GenericError", f"device {device!r} is already migrating ({current.migration_id})")
        try:
            strat = Strategy(strategy)
        except ValueError:
            raise ServiceError("InvalidParameter", f"unknown strategy {strategy!r} (one of {', '.join(s.value for s in Strategy)})") from None
        runner = SourceRunner(self, dev, to, strat, frontend, self.timeouts)
        self.runners[device] = runner
        runner.start()
        return runner

    def migrate_batch(
        self,
        devices: list[str] | None,
        to: tuple[str, int],
        strategy: Strategy | str = Strategy.PRMIGRATE,
        frontend: tuple[str, int] | None = None,
        setup_parallel: int = SETUP_PARALLEL,
        pause_parallel: int = PAUSE_PARALLEL,
    ) -> Batch:
        """Move ``devices`` (None: every device of the host not migrating now)
        to ``to`` as one batch (``batch.py``). Refused as a whole, nothing
        started, when a named device is unknown or already migrating."""
        if not self.secret:
            raise ServiceError("GenericError", "no cluster secret: start the daemon with --secret-file")
        try:
            strat = Strategy(strategy)
        except ValueError:
            raise ServiceError("InvalidParameter", f"unknown strategy {strategy!r} (one of {', '.join(s.value for s in Strategy)})") from None
        busy = {n for n, r in self.runners.items() if r.finished is None}
        if devices is None:
            names = sorted(n for n in self.host.devices if n not in busy)
        else:
            names = list(dict.fromkeys(devices))
            for name in names:
                if name not in self.host.devices:
                    raise ServiceError("DeviceNotFound", f"device {name!r} not found")
                if name in busy:
                    raise ServiceError("GenericError", f"device {name!r} is already migrating ({self.runners[name].migration_id})")
        if not names:
            raise ServiceError("GenericError", "no device to migrate")
        try:
            gate = BatchGate(names, setup_parallel, pause_parallel)
        except ValueError as e:
            raise ServiceError("InvalidParameter", str(e)) from None
        runners: list[SourceRunner] = []
        batch = Batch(self, runners, gate)
        for name in names:
            runners.append(SourceRunner(self, self.host.devices[name], to, strat, frontend, self.timeouts, batch))
        batch.runners = {r.device_name: r for r in runners}
        for r in runners:
            batch.follow(r)
        for r in runners:
            self.runners[r.device_name] = r
        log.info("batch %s: %d device(s) to %s:%d (%d setting up at once, %d paused at once)",
                 batch.id, len(names), to[0], to[1], gate.setup_parallel, gate.pause_parallel)
        batch.pump()
        return batch

    def get(self, device: str) -> Runner | None:
        return self.runners.get(device)

    def cancel(self, device: str) -> bool:
        runner = self.runners.get(device)
        if runner is None:
            raise ServiceError("DeviceNotFound", f"no migration of {device!r}")
        return runner.cancel()

    def query(self, device: str | None = None) -> list[dict[str, Any]]:
        if device is not None:
            runner = self.runners.get(device)
            if runner is None:
                raise ServiceError("DeviceNotFound", f"no migration of {device!r}")
            return [runner.query()]
        return [r.query() for _, r in sorted(self.runners.items())]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for runner in list(self.runners.values()) + list(self.incoming):
            await runner.close()
        for lr in list(self.incoming_links.values()) + list(self.watches):
            await lr.close()
        for link in list(self._links):
            link.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
