"""The migration shell: carries out the sans-IO machines' actions on a host daemon.

``MigrationService(daemon, secret)`` owns a listening socket for incoming
migrations (one ``DestinationMigration`` per authenticated connection) and
starts outgoing ones (``migrate()``: one ``SourceMigration``). It is thin: it
moves channel bytes (``transport.py``), arms the machine's timer on the loop
clock, runs PR OUT commands, and feeds the outcome of each action back as an
event. Every rule (when to hold, preempt, roll back) lives in the machines.

How actions are carried out
---------------------------
Source
    ``HoldGuest``: ``device.hold()`` then ``await device.drain()`` (every
    forwarded command and its snooping done), then ``GuestHeld`` with the
    final snapshot. ``ResumeGuest`` (rollback): ``device.release_held()``
    forwards the held commands. ``HandOverGuest`` (after the destination's
    ACK of RESUME): the held commands are discarded unanswered, the device's
    frontend node answers every login from now on with a redirect (0x0101,
    TargetAddress = the destination's portal, same TPGT) for as long as this
    daemon runs, the guest's sessions get an Async Message (event 1, logout
    requested; libiscsi and our initiator log in again to the portal they
    first used, are redirected and re-issue what got no status), sessions
    still there after ``LOGOUT_GRACE`` are dropped, and the device's backend
    sessions are closed and its journal removed. "Completed" is reported
    once that is done. After a rollback on which the channel was lost once
    SETUP had gone out, the destination may be dead with the guests' keys
    still registered on its nexus (with an all-registrants type it would even
    hold the reservation): before the guest runs again the source removes
    them from its own nexus (``_fence_ops``: PREEMPT RK = SARK = key, register
    again, RESERVE for a holder; all idempotent, harmless when a live
    destination already unregistered).
    A source daemon killed in the middle of a migration settles it when
    started again: a record of the migration's progress
    (``<state-dir>/<device>.migration.json``, ``MigrationMarker``) tells
    ``recover_interrupted`` that the destination may have registered or
    preempted; before RESUME was sent the destination never serves the
    guest, so the device is held as it is added, the reservation taken back
    from its own nexus and the guest served again.
Destination
    ``CreateDevice``: the daemon's ``add_device`` with the migrated config and
    identity (not exposed yet; the identical node name, LUN, INQUIRY data and
    capacity), the guests' backend sessions opened, then PR IN (READ FULL
    STATUS, or READ KEYS + READ RESERVATION) -> ``DeviceReady``.
    ``LoadState``: ``device.restore`` (PR state, pending unit attentions).
    ``ResumeGuest``: the node is published (replacing a redirect left by an
    earlier move away), then the tracked state is verified in the background.
    ``DropDevice``: creation cancelled, device closed, journal removed; a
    redirect node that was there before is left in place.
Both
    ``IssuePrOps``: each op on the named guest's backend nexus, in order,
    stopping at the first failure; RESERVATION CONFLICT on a ``conflict_ok``
    op is success; a transport error or timeout is ``definite=False``. The
    ops are not snooped: they move the state the device already tracks (the
    snapshot), and a snooped PREEMPT would cost a verification round trip
    inside the pause. Unit attentions they meet are retried; the ones the
    migration itself causes (2A/xx on the nexuses it touches) are not owed to
    the guest, any other is (``device.restore(..., pending_uas=)``).

With migrate-pr off the source sends no PR state: the destination neither
registers nor preempts, and the reservation stays with the source's nexus.

Control (``install`` in ``host/migration_service.py``): ``migrate``,
``query-migrate``, ``migrate-cancel``; events ``MIGRATION`` (one per state
change, with ``status`` = the machine state) through ``daemon.emit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..aio import BackgroundTasks
from ..device.identity import backend_port
from ..device.state import DevicePrState
from ..iscsi.initiator import IscsiError, describe_result
from ..iscsi.target import TargetNode
from ..lun.types import Result
from ..scsi.constants import PrOutAction, PrType, SenseKey, Status
from ..scsi.pr import PrDecodeError
from ..scsi.sense import SenseDecodeError, decode_sense
from .channel import Authenticated, Message, Resume, Role
from .destination import DestinationMigration, DestinationState
from .errors import AbortReason, AuthenticationFailed, MigrationError, ProtocolError
from .machine import (
    Action,
    Cancel,
    ChannelLost,
    ChannelUp,
    Connect,
    CreateDevice,
    DeviceFailed,
    DeviceReady,
    DropDevice,
    Event,
    Finished,
    GuestHeld,
    HandOverGuest,
    HoldGuest,
    IssuePrOps,
    LoadState,
    Log,
    MachineBase,
    PrOpsDone,
    ResumeGuest,
    SendMessage,
    Start,
    StateLoaded,
    Timeouts,
)
from .plan import Observed, Phase, PrOp, Side, Strategy, TargetTraits, rollback_plan
from .source import SourceMigration, SourceState
from .stream import DeviceSnapshot
from .transport import ChannelLink, decode_peer_id, encode_peer_id, new_channel

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice
    from ..host.daemon import HostDaemon

log = logging.getLogger(__name__)

OP_TIMEOUT = 10.0  # one PR OUT on the backend; beyond it the outcome is unknown
UA_RETRIES = 8
LOGOUT_GRACE = 3.0  # seconds the guest gets to log out before its sessions are dropped
LOGOUT_WAIT = 0  # Async Message Parameter3: log out at once
# Unit attentions the migration's own PR OUTs cause on the nexuses it uses.
_OWN_UA_ASC = 0x2A


class ServiceError(Exception):
    """A request the service refuses (unknown device, already migrating...)."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# ----------------------------------------------------------------- runner


class _Runner:
    """One migration: the machine, its channel link, its timer and tasks."""

    role = ""

    def __init__(self, service: MigrationService, machine: MachineBase, device: str) -> None:
        self.service = service
        self.daemon = service.daemon
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
                except ProtocolError as e:
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

    def _on_protocol_error(self, ev: object, e: ProtocolError) -> list[Action]:
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
        self.daemon.emit(self._event(final=True))
        # Let the last message leave, then end the link.
        if self.link is not None:
            link = self.link
            self.loop.call_soon(link.close)

    @property
    def succeeded(self) -> bool:
        return False

    def device(self) -> PassthroughDevice | None:
        return self.daemon.devices.get(self.device_name)

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
            self.daemon.emit(self._event())

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
        self._error(f"channel: {detail}")
        self.feed(ChannelLost(detail))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _unit_attention(r: Result) -> tuple[int, int, int] | None:
    if r.status != Status.CHECK_CONDITION:
        return None
    try:
        s = decode_sense(bytes(r.sense))
    except SenseDecodeError:
        return None
    if s.key != SenseKey.UNIT_ATTENTION:
        return None
    return (int(s.key), s.asc, s.ascq)


# ----------------------------------------------------------------- PR ops


async def pr_out(dev: PassthroughDevice, op: PrOp) -> Result:
    """One op on its guest's backend nexus. Unit attentions are retried; the
    ones the migration's own PR OUTs cause (2A/xx) are not owed to the
    guest, any other is."""
    session = await dev.backend_session(op.guest)
    cdb, params = op.cdb(), op.params()
    r = Result()
    owed: list[bytes] = []
    for _ in range(UA_RETRIES):
        r = await session.submit(dev.lun, cdb, params)
        sense = _unit_attention(r)
        if sense is None:
            break
        if sense[1] != _OWN_UA_ASC:
            owed.append(bytes(r.sense))
    if owed:
        dev.restore(dev.snooper.state, None, {op.guest: owed})
    return r


async def issue_ops(dev: PassthroughDevice, ops: tuple[PrOp, ...], logger: Any) -> PrOpsDone:
    """Run ``ops`` in order, stopping at the first failure (the machines'
    ``IssuePrOps`` contract): RESERVATION CONFLICT on a ``conflict_ok`` op
    counts as success; a transport error or timeout is ``definite=False``."""
    for i, op in enumerate(ops):
        try:
            r = await asyncio.wait_for(pr_out(dev, op), OP_TIMEOUT)
        except Exception as e:  # transport error, timeout, closed device
            return PrOpsDone(i, f"{op}: {type(e).__name__}: {e}", definite=False)
        ok = r.status == Status.GOOD or (op.conflict_ok and r.status == Status.RESERVATION_CONFLICT)
        logger.info("%s -> %s", op, describe_result(r))
        if not ok:
            return PrOpsDone(i, f"{op}: {describe_result(r)}", definite=True)
    return PrOpsDone(len(ops))


def fence_ops(pr: DevicePrState, registered: dict[str, int] | None, preempted: bool | None) -> tuple[PrOp, ...]:
    """Source ops removing the keys a silent destination may have registered
    during setup (a dead process cannot unregister; a live one unregisters
    them itself on a lost channel, and then these ops find nothing to
    remove). ``registered``: what SETUP_OK reported, None/empty: unknown, so
    every key. For each: PREEMPT RK = SARK = key from the source nexus (the
    holder of a single-holder reservation with its own type and scope, so
    the reservation stays where it is), register again (a target may drop
    the caller's own registration when no reservation is held with that
    key), RESERVE again for a holder (GOOD when it still holds). A holder
    whose key a reclaim PREEMPT already covered (``preempted`` not False) is
    skipped. Every op is idempotent; the guest must be held meanwhile."""
    keys = dict(registered or {}) or {n: g.key for n, g in pr.guests.items() if g.registered}
    ops: list[PrOp] = []
    for guest, key in sorted(keys.items()):
        g = pr.get(guest)
        if not g.registered or g.key != key:
            continue
        if preempted is not False and g.holder and not g.rtype.all_registrants:
            continue  # the reclaim's PREEMPT of this key already removed them
        rtype = g.rtype if g.holder else PrType.WRITE_EXCLUSIVE
        scope = g.scope if g.holder else 0
        ops.append(PrOp(Side.SOURCE, guest, PrOutAction.PREEMPT, key, key, rtype, scope, True,
                        g.aptpl, Phase.ROLLBACK, "remove the silent destination's registration",
                        conflict_ok=True))
        ops.append(PrOp(Side.SOURCE, guest, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, key,
                        inside_pause=True, aptpl=g.aptpl, phase=Phase.ROLLBACK,
                        why="keep the source's own registration"))
        if g.holder:
            ops.append(PrOp(Side.SOURCE, guest, PrOutAction.RESERVE, key, 0, g.rtype, g.scope, True,
                            False, Phase.ROLLBACK, "the reservation stays with the source"))
    return tuple(ops)


class MigrationMarker:
    """``<state-dir>/<device>.migration.json``: an outgoing migration in
    progress, so that a source daemon killed in the middle can settle it
    when it starts again. Phases: ``setup`` (SETUP sent: the destination
    may register), ``held`` (the guest is held: the destination may
    preempt), ``resume-sent`` (the commit point is passed: the destination
    may serve the guest). Written atomically (temp file, rename); fsync
    only for the first write, outside the pause."""

    def __init__(self, state_dir: Path | None, device: str) -> None:
        self.path = None if state_dir is None else Path(state_dir) / f"{device}.migration.json"

    def write(self, record: dict[str, Any], fsync: bool = False) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # a read-only or failing state directory: one line, no crash
                log.warning("cannot remove %s: %s", self.path, e)

    @staticmethod
    def load(path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None


# ----------------------------------------------------------------- source


class SourceRunner(_Runner):
    role = "source"

    def __init__(
        self,
        service: MigrationService,
        dev: PassthroughDevice,
        to: tuple[str, int],
        strategy: Strategy,
        frontend: tuple[str, int] | None,
        timeouts: Timeouts | None,
    ) -> None:
        migration_id = uuid.uuid4().hex[:12]
        machine = SourceMigration(migration_id, _snapshot(dev), timeouts, strategy)
        super().__init__(service, machine, dev.name)
        self.machine: SourceMigration = machine
        self.migration_id = migration_id
        self.to = to
        self.peer = f"{to[0]}:{to[1]}"
        self.frontend = frontend  # where the guest is redirected; default: from the peer
        self._handover: asyncio.Task[Any] | None = None
        self._finishing: asyncio.Task[Any] | None = None
        self._channel_lost = False
        self._setup_sent = False
        self.marker = MigrationMarker(service.daemon.config.state_dir, dev.name)
        self.log = logging.LoggerAdapter(log, {"migration": f"{migration_id}/{dev.name} source"})

    @property
    def succeeded(self) -> bool:
        return self.machine.state is SourceState.COMPLETED

    def start(self) -> None:
        self.daemon.emit(self._event())
        self.feed(Start())

    def _do_Connect(self, a: Connect) -> None:
        self._bg.spawn(self._connect())

    async def _connect(self) -> None:
        host, port = self.to
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.machine.timeouts.connect
            )
        except (OSError, TimeoutError) as e:
            self._error(f"cannot connect to {host}:{port}: {e or type(e).__name__}")
            self.feed(ChannelLost(f"cannot connect to {host}:{port}"))
            return
        if self.machine.finished:  # cancelled while connecting
            writer.close()
            return
        assert self.service.secret is not None  # migrate() refuses to start without one
        chan = new_channel(Role.CLIENT, self.service.secret, self.service.client_id())
        chan.start()
        self.link = ChannelLink(reader, writer, chan, self._on_channel_event, self._on_lost_source)
        self.link.start()

    def _on_channel_event(self, ev: Authenticated | Message) -> None:
        if isinstance(ev, Authenticated):
            name, portal = decode_peer_id(ev.peer_id)
            self.peer = f"{name}@{self.to[0]}:{self.to[1]}" if name else self.peer
            if self.frontend is None and portal:
                try:
                    self.frontend = parse_address(portal)
                except ValueError:
                    self._error(f"destination announced a bad portal {portal!r}")
            self._setup_sent = True  # SETUP goes out now: the destination may register
            self._mark("setup", self.machine.snapshot.pr, fsync=True)
            self.feed(ChannelUp())
            return
        self.feed(ev)

    def _on_lost_source(self, detail: str, error: Exception | None) -> None:
        self._channel_lost = True
        if isinstance(error, AuthenticationFailed) and self.machine.state is SourceState.CONNECTING:
            self._error(f"destination refused: {detail}")
            self.feed(Cancel(AbortReason.AUTHENTICATION, detail))
            return
        self._on_lost(detail, error)

    def _do_HoldGuest(self, a: HoldGuest) -> None:
        self._bg.spawn(self._hold())

    async def _hold(self) -> None:
        dev = self.device()
        if dev is None:
            self.feed(Cancel(AbortReason.GUEST, "device is gone"))
            return
        if self.machine.state is not SourceState.STOPPING:
            return  # failed or cancelled before the hold began: the guest runs on
        dev.hold()
        try:
            await dev.drain()
        except Exception as e:
            self.feed(Cancel(AbortReason.GUEST, f"drain failed: {e}"))
            return
        snap = _snapshot(dev)
        self._mark("held", snap.pr)
        self.feed(GuestHeld(snap))

    def _do_ResumeGuest(self, a: ResumeGuest) -> None:
        dev = self.device()
        if dev is None:
            return
        if self._fence_ops():
            return  # released once the fence is done (_do_Finished)
        dev.release_held()
        self.log.info("guest resumed on this host")

    def _fence_ops(self) -> tuple[PrOp, ...]:
        """After a rollback on which the destination went silent once SETUP
        had gone out (see ``fence_ops``)."""
        m = self.machine
        if not (self._channel_lost and self._setup_sent and self.service.fence_after_loss):
            return ()
        return fence_ops(m.snapshot.pr, m.registered, m.preempted)

    async def _fence_then_resume(self, dev: PassthroughDevice, ops: tuple[PrOp, ...]) -> None:
        try:
            if not dev.held:  # failed before the pause: hold the guest for the fence
                dev.hold()
                self.machine.timings.paused = self.loop.time()
                await dev.drain()
            done = await issue_ops(dev, ops, self.log)
            self.machine.timings.round_trips_in_pause += done.completed + (0 if done.ok else 1)
            if not done.ok:
                self._error(f"fencing the destination's registrations: {done.error}")
        finally:
            dev.release_held()
            self.machine.timings.resumed = self.loop.time()
            self.log.info("guest resumed on this host")

    def _do_HandOverGuest(self, a: HandOverGuest) -> None:
        self._handover = self._bg.spawn(self._hand_over())

    def _do_SendMessage(self, a: SendMessage) -> None:
        if isinstance(a.message, Resume):
            self._mark("resume-sent", self.machine.snapshot.pr)
        super()._do_SendMessage(a)

    def _mark(self, phase: str, pr: DevicePrState, fsync: bool = False) -> None:
        try:
            self.marker.write({"version": 1, "id": self.migration_id, "device": self.device_name,
                               "to": self.peer, "phase": phase, "pr": pr.to_dict()}, fsync)
        except OSError as e:
            self._error(f"cannot record the migration's progress: {e}")

    def _settled(self) -> None:
        if self.machine.state in (SourceState.COMPLETED, SourceState.ROLLED_BACK):
            self.marker.remove()

    def _do_Finished(self, a: Finished) -> None:
        # Report the end once the guest is handed over and the device gone
        # here (or, after a rollback, once the guest runs here again), so
        # that the outcome describes a settled state.
        ops = self._fence_ops() if a.state == SourceState.ROLLED_BACK.name else ()
        dev = self.device()
        if ops and dev is not None and self._finishing is None:
            self._finishing = self._bg.spawn(self._fence_then_resume(dev, ops))
        if a.state == SourceState.IN_DOUBT.name and self._handover is None:
            # RESUME went out and no ACK came back: the destination serves the
            # guest, or it never will (it resumes only on RESUME, and then
            # holds the reservation). This host serves it in neither case, so
            # sending the guest there is never worse than holding it here:
            # it either lands where it is served, or finds no node and keeps
            # trying. The device stays here, held, for the operator.
            self._handover = self._bg.spawn(self._hand_over(forget=False))
        task = self._handover or self._finishing
        if task is not None and not task.done():
            task.add_done_callback(lambda _: _Runner._do_Finished(self, a))
            return
        super()._do_Finished(a)

    async def _hand_over(self, forget: bool = True) -> None:
        """Move the guest's sessions to the destination. ``forget=False``
        (outcome in doubt): the device stays here, held, for the operator."""
        from ..host.daemon import frontend_iqn

        dev = self.device()
        if dev is None:
            return
        node_name = frontend_iqn(dev.config)
        target = self.daemon.target
        dropped = dev.discard_held()
        node = target.node(node_name)
        if node is not None and self.frontend is not None:
            host, port = self.frontend
            node.redirect = (host, port, node.tpgt)
            asked = target.request_logout(node_name, wait=LOGOUT_WAIT)
            self.log.info(
                "guest handed over: %d held command(s) dropped unanswered, %d session(s) asked to log out, logins redirected to %s:%d",
                dropped, asked, host, port,
            )
            deadline = self.loop.time() + LOGOUT_GRACE
            while target.sessions(node_name) and self.loop.time() < deadline:
                await asyncio.sleep(0.02)
            left = target.drop_sessions(node_name)
            if left:
                self.log.info("%d guest session(s) did not log out in time: dropped", left)
            if forget:
                node.luns = {}
                unrecorded = self.daemon.record_moved(dev.name, node_name, host, port, node.tpgt)
                if unrecorded is not None:
                    self.unrecorded = unrecorded
                    self._error(f"the move is not recorded on this host ({unrecorded}): "
                                "restarted now, it would serve the device again")
        elif node is not None:
            self._error("no destination portal known: guest sessions dropped without redirect")
            target.remove_node(node_name)
        if forget:
            await self.service.forget_device(dev)


def _snapshot(dev: PassthroughDevice) -> DeviceSnapshot:
    """The migration stream's view of a device; no PR state with migrate-pr off
    (QEMU sends its ``scsi-disk/pr`` subsection only with migrate-pr on)."""
    snap = dev.snapshot()
    pr = snap.state if dev.migrate_pr else DevicePrState()
    if snap.identity is None:
        raise ServiceError("GenericError", f"device {dev.name}: identity not captured yet")
    return DeviceSnapshot.build(snap.config, snap.identity, pr, snap.pending_uas)


# ----------------------------------------------------------------- destination


class DestinationRunner(_Runner):
    role = "destination"

    def __init__(self, service: MigrationService, link_peer: str, timeouts: Timeouts | None) -> None:
        machine = DestinationMigration(f"incoming from {link_peer}", timeouts)
        super().__init__(service, machine, "")
        self.machine: DestinationMigration = machine
        self.peer = link_peer
        self.source_initiator: str | None = None
        self._creating: asyncio.Task[Any] | None = None
        self._created = False
        self._redirect_node: TargetNode | None = None
        self.log = logging.LoggerAdapter(log, {"migration": f"incoming from {link_peer}"})

    @property
    def succeeded(self) -> bool:
        return self.machine.state is DestinationState.RESUMED

    def on_authenticated(self, peer_id: str) -> None:
        name, initiator = decode_peer_id(peer_id)
        self.peer = f"{name}@{self.peer}" if name else self.peer
        self.source_initiator = initiator or None

    def feed(self, event: Event | Message) -> None:
        from .channel import Setup

        if isinstance(event, Setup) and not self.migration_id:
            self.migration_id = event.migration_id
            self.log = logging.LoggerAdapter(log, {"migration": f"{event.migration_id} destination"})
        super().feed(event)
        snap = self.machine.snapshot
        if snap is not None and not self.device_name:
            self.device_name = snap.name
            self.service.register(self)
            self.daemon.emit(self._event())

    def _do_CreateDevice(self, a: CreateDevice) -> None:
        self._creating = self._bg.spawn(self._create(a.snapshot))

    async def _create(self, snap: DeviceSnapshot) -> None:
        from ..host.daemon import frontend_iqn

        try:
            cfg = snap.device_config()
            ident = snap.device_identity()
        except MigrationError as e:
            self.feed(DeviceFailed(str(e)))
            return
        daemon = self.daemon
        if cfg.name in daemon.devices:
            self.feed(DeviceFailed(f"device {cfg.name!r} already exists on this host"))
            return
        node_name = frontend_iqn(cfg)
        old = daemon.target.node(node_name)
        if old is not None:
            if old.redirect is None:
                self.feed(DeviceFailed(f"target node {node_name} is in use on this host"))
                return
            # The device moved away from here earlier; its redirect stays
            # in place until this host serves the guest again.
            self._redirect_node = daemon.target.nodes.pop(node_name.lower())
        try:
            dev = await daemon.add_device(cfg, identity=ident, expose=False)
        except Exception as e:
            self.feed(DeviceFailed(f"cannot create device: {e}"))
            return
        finally:
            if self._redirect_node is not None:
                daemon.target.add_node(self._redirect_node)
        self._created = True
        try:
            guests = sorted(snap.pr.guests)
            for g in guests:
                await dev.backend_session(g)
            observed, traits = await self._observe(dev, snap) if guests else (None, TargetTraits())
        except Exception as e:
            self.feed(DeviceFailed(f"backend: {type(e).__name__}: {e}"))
            return
        self.feed(DeviceReady(observed, traits))

    async def _observe(self, dev: PassthroughDevice, snap: DeviceSnapshot) -> tuple[Observed, TargetTraits]:
        """The target's PR state as seen from here (outside the pause)."""
        rfs = await dev.read_full_status()
        if rfs is not None:
            holders = [e for e in rfs.entries if e.holder]
            rtype = PrType.NONE
            res_key: int | None = None
            if holders:
                raw = int(holders[0].rtype)
                rtype = PrType(raw) if raw in PrType._value2member_map_ else PrType.NONE
                res_key = 0 if rtype.all_registrants else holders[0].key
            source_keys: dict[str, int] | None = None
            foreign: dict[int, tuple[str, ...]] = {}
            if self.source_initiator:
                source_keys = {}
                own = []
                for guest in snap.pr.guests:
                    port = backend_port(dev.mode, self.source_initiator, dev.name, guest).transport_id
                    own += [port, backend_port(dev.mode, dev.host_initiator, dev.name, guest).transport_id]
                    for e in rfs.entries:
                        if e.transport_id.same_port(port):
                            source_keys[guest] = e.key
                for e in rfs.entries:
                    if not any(e.transport_id.same_port(p) for p in own):
                        foreign[e.key] = (*foreign.get(e.key, ()), str(e.transport_id))
            observed = Observed(frozenset(e.key for e in rfs.entries), res_key, rtype, source_keys, foreign)
            return observed, TargetTraits(read_full_status=True)
        # On the monitor nexus, like READ FULL STATUS: a new nexus's unit
        # attention (tgt reports POWER ON RESET on each) is retried there and
        # none meant for a guest is consumed.
        from ..device.passthrough import DeviceError

        try:
            keys, rr = await dev.read_keys_and_reservation()
        except PrDecodeError as e:
            raise IscsiError(f"PR IN: {e}") from e
        except DeviceError as e:
            raise IscsiError(str(e)) from e
        observed = Observed.from_pr_in(keys, rr)
        # READ KEYS lists one key per registered nexus: a key listed more
        # often than the device's own registrations of it (the guests'
        # source nexuses, and the destination's from setup) is shared with
        # nexuses outside the device, unnamed here
        mine = Counter(g.key for g in snap.pr.guests.values() if g.registered)
        mine.update(getattr(self.machine, "registered", {}).values())
        extra = Counter(getattr(keys, "keys", ()))
        extra.subtract(mine)
        foreign = {k: (f"{n} nexus(es) not the device's",) for k, n in extra.items() if n > 0 and k}
        return replace(observed, foreign=foreign), TargetTraits(read_full_status=False)

    def _do_LoadState(self, a: LoadState) -> None:
        self._bg.spawn(self._load(a.snapshot))

    async def _load(self, snap: DeviceSnapshot) -> None:
        dev = self.device()
        if dev is None:
            self.feed(DeviceFailed("device is gone"))
            return
        try:
            ident = snap.device_identity()
            ua = {g: list(pairs) for g, pairs in snap.ua.items()}
            dev.restore(snap.pr, ident, ua)
            observed = None
            if snap.pr.unverified and snap.pr.guests:
                # The tracked state is in doubt: look before preempting (one
                # more round trip inside the pause, only in this case).
                observed, _ = await self._observe(dev, snap)
        except Exception as e:
            self.feed(DeviceFailed(f"cannot load state: {e}"))
            return
        self.feed(StateLoaded(observed))

    def _do_ResumeGuest(self, a: ResumeGuest) -> None:
        from ..host.daemon import frontend_iqn

        dev = self.device()
        if dev is None:
            return
        if self._redirect_node is not None:
            self.daemon.target.remove_node(frontend_iqn(dev.config))
            self._redirect_node = None
        self.daemon.expose(dev.name)
        self.log.info("guest served on this host (node %s)", frontend_iqn(dev.config))
        if dev.migrate_pr and dev.snooper.state.guests:
            self._bg.spawn(self._verify_later(dev))

    async def _verify_later(self, dev: PassthroughDevice) -> None:
        try:
            await dev.verify()
        except Exception as e:
            self.log.warning("verification after the move failed: %s", e)

    def _do_DropDevice(self, a: DropDevice) -> None:
        if self._creating is not None and not self._creating.done():
            self._creating.cancel()
        self._bg.spawn(self._drop())

    async def _drop(self) -> None:
        if self._creating is not None:
            with contextlib.suppress(BaseException):
                await self._creating
        dev = self.device()
        if dev is not None and self._created:
            await self.service.forget_device(dev)

    def _do_HandOverGuest(self, a: HandOverGuest) -> None:  # pragma: no cover - source only
        raise AssertionError("HandOverGuest on a destination")

    def _do_Finished(self, a: Finished) -> None:
        super()._do_Finished(a)
        self.service.incoming.discard(self)


# ----------------------------------------------------------------- service


class MigrationService:
    """Incoming and outgoing migrations of one host daemon."""

    def __init__(self, daemon: HostDaemon, secret: bytes | None, *, timeouts: Timeouts | None = None) -> None:
        self.daemon = daemon
        self.secret = secret
        self.timeouts = timeouts
        self.listening: list[tuple[str, int]] = []
        self.runners: dict[str, _Runner] = {}  # device -> latest migration
        # A source whose destination went silent removes the keys that the
        # destination registered during setup (see SourceRunner._fence_ops).
        self.fence_after_loss = True
        self.incoming: set[DestinationRunner] = set()
        self._server: asyncio.base_events.Server | None = None
        self._links: set[ChannelLink] = set()
        self._interrupted: dict[str, dict[str, Any]] = {}
        self._recovering: set[asyncio.Task[Any]] = set()

    # -- identities carried by the handshake
    def client_id(self) -> str:
        return encode_peer_id(self.daemon.name, self.daemon.initiator)

    def server_id(self) -> str:
        portal = ""
        if self.daemon.listening:
            h, p = self.daemon.listening[0][:2]
            portal = f"{h}:{p}"
        return encode_peer_id(self.daemon.name, portal)

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
        runner = DestinationRunner(self, peer_s, self.timeouts)
        chan = new_channel(Role.SERVER, self.secret, self.server_id())
        authenticated = False

        def on_event(ev: Authenticated | Message) -> None:
            nonlocal authenticated
            if isinstance(ev, Authenticated):
                authenticated = True
                runner.on_authenticated(ev.peer_id)
                self.incoming.add(runner)
                log.info("migration channel from %s (%s) authenticated", peer_s, ev.peer_id)
                return
            runner.feed(ev)

        def on_lost(detail: str, error: Exception | None) -> None:
            self._links.discard(link)
            if not authenticated:
                log.warning("migration peer %s refused: %s", peer_s, detail)
                self.daemon.emit({"event": "MIGRATION_REFUSED", "peer": peer_s, "reason": detail})
                return
            runner._on_lost(detail, error)

        link = ChannelLink(reader, writer, chan, on_event, on_lost)
        runner.link = link
        self._links.add(link)
        link.start()

    # -- a source killed in the middle of a migration, started again
    def recover_interrupted(self) -> list[str]:
        """Read the markers of outgoing migrations this daemon did not finish
        (it was killed). Each device among the configured ones is settled when
        it is added (``daemon.start``): held at once, before a guest command
        reaches it, its registrations and reservation taken back from its own
        nexus (the destination may have registered or preempted: rollback
        and fence ops, all idempotent), its tracked state restored, then the
        guest runs on. A migration past its commit point (RESUME sent) is not
        undone: the destination may serve the guest; that is only logged."""
        state_dir = self.daemon.config.state_dir
        if state_dir is None or not Path(state_dir).is_dir():
            return []
        configured = {d.name for d in self.daemon.config.devices}
        pending = []
        for path in sorted(Path(state_dir).glob("*.migration.json")):
            record = MigrationMarker.load(path)
            device = record.get("device") if record else None
            phase = record.get("phase") if record else None
            if record is None or device not in configured or phase not in ("setup", "held"):
                log.warning("interrupted migration %s (phase %s): not settled here%s", path.name, phase,
                            "; the destination may serve the guest" if phase == "resume-sent" else "")
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            self._interrupted[str(device)] = record
            pending.append(str(device))
        if pending:
            self.daemon.add_listener(self._on_device_added)
        return pending

    def _on_device_added(self, msg: dict[str, Any]) -> None:
        if msg.get("event") != "DEVICE_ADDED":
            return
        name = msg.get("data", {}).get("device")
        record = self._interrupted.pop(name, None)
        dev = self.daemon.devices.get(name) if record is not None else None
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
        ops = rollback_plan(pr, preempted=None, released=list(pr.guests))
        ops += fence_ops(pr, None, None)
        log.warning("interrupted migration %s of %s (phase %s): taking the reservation back (%d PR ops)",
                    mid, dev.name, record.get("phase"), len(ops))
        await dev.drain()
        done = await issue_ops(dev, ops, log)
        if not done.ok:
            # As the source machine's FAILED: serving the guest without its
            # reservation is worse than not serving it.
            log.error("interrupted migration %s of %s: %s; guest stays held", mid, dev.name, done.error)
            self.daemon.emit({"event": "MIGRATION_RECOVERED", "device": dev.name, "id": mid,
                              "success": False, "reason": done.error})
            return
        dev.restore(pr)
        dev.release_held()
        MigrationMarker(self.daemon.config.state_dir, dev.name).remove()
        log.info("interrupted migration %s of %s settled: the guest runs here with its reservation", mid, dev.name)
        self.daemon.emit({"event": "MIGRATION_RECOVERED", "device": dev.name, "id": mid, "success": True})

    def register(self, runner: _Runner) -> None:
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
        dev = self.daemon.devices.get(device)
        if dev is None:
            raise ServiceError("DeviceNotFound", self.daemon.not_here(device))
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

    def get(self, device: str) -> _Runner | None:
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

    async def forget_device(self, dev: PassthroughDevice) -> None:
        """Remove a device that moved away (or a destination's aborted copy)
        without touching its frontend node: a redirect stays in place."""
        if self.daemon.devices.get(dev.name) is dev:
            del self.daemon.devices[dev.name]
        await dev.close()
        if dev.journal is not None:
            with contextlib.suppress(OSError):
                dev.journal.remove()
        self.daemon.emit({"event": "DEVICE_REMOVED", "device": dev.name})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for runner in list(self.runners.values()) + list(self.incoming):
            await runner.close()
        for link in list(self._links):
            link.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
