"""The source side of a migration in the shell: ``SourceRunner``.

Carries out the ``SourceMigration`` machine's actions (``source.py``) on the
device being moved and on the host (``handover.py``):

``HoldGuest``
    ``device.hold()`` then ``await device.drain()`` (every forwarded command
    and its snooping done), then ``GuestHeld`` with the final snapshot.
``ResumeGuest`` (rollback)
    ``device.release_held()`` forwards the held commands. After a rollback
    on which the channel was lost once SETUP had gone out, the destination
    may be dead with the guests' keys still registered on its nexus (with
    an all-registrants type it would even hold the reservation): before
    the guest runs again the source removes them from its own nexus
    (``plan.fence_ops``; all idempotent, harmless when a live destination
    already unregistered).
``HandOverGuest`` (after the destination's ACK of RESUME)
    The held commands are discarded unanswered, the device's frontend node
    answers every login from now on with a redirect (login status 0101h,
    TargetAddress = the destination's portal, same TPGT; RFC 7143 11.13.5)
    for as long as this daemon runs, the guest's sessions get an Async
    Message (event 1, logout requested; RFC 7143 11.9.1; libiscsi and our
    initiator log in again to the portal they first used, are redirected
    and re-issue what got no status), sessions still there after
    ``LOGOUT_GRACE`` are dropped, and the device's backend sessions are
    closed and its journal removed. "Completed" is reported once that is
    done.

The progress of the migration is recorded (``marker.py``) so that a source
daemon killed in the middle settles it when started again. The commit
point's record (``resume-sent``, with the destination's frontend portal) is
written before RESUME goes out; when it cannot be, RESUME is not sent and
the migration rolls back (Cancel: ROLLBACK to the destination, reclaim).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from ..device.state import DevicePrState
from .channel import Authenticated, Message, Role, TakeoverDone
from .errors import AbortReason, AuthenticationFailed
from .machine import (
    AwaitGo,
    Cancel,
    ChannelLost,
    ChannelUp,
    Connect,
    Finished,
    GuestHeld,
    HandOverGuest,
    HoldGuest,
    ResumeGuest,
    Start,
    Timeouts,
)
from .marker import MigrationMarker
from .plan import PrOp, Strategy, fence_ops
from .pr_ops import issue_ops
from .runner import Runner, RunnerOwner, log
from .source import SourceMigration, SourceState
from .transport import (
    ChannelLink,
    TlsRefused,
    decode_peer_id,
    new_channel,
    open_connection,
    parse_address,
)

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice

class BatchMember(Protocol):
    """The batch a move belongs to (``service.py``'s ``Batch``): told when
    the move is set up (READY); it follows the move's end on ``done``."""

    def on_ready(self, runner: SourceRunner) -> None: ...


LOGOUT_GRACE = 3.0  # seconds the guest gets to log out before its sessions are dropped
LOGOUT_WAIT = 0  # Async Message Parameter3: log out at once
# Async event 3 Parameter2: log in again at once, not after DefaultTime2Wait
# (open-iscsi waits the negotiated 2 s after event 1 alone)
RECONNECT_WAIT = 0


class SourceRunner(Runner):
    role = "source"

    def __init__(
        self,
        service: RunnerOwner,
        dev: PassthroughDevice,
        to: tuple[str, int],
        strategy: Strategy,
        frontend: tuple[str, int] | None,
        timeouts: Timeouts | None,
        batch: BatchMember | None = None,
    ) -> None:
        migration_id = uuid.uuid4().hex[:12]
        machine = SourceMigration(migration_id, service.snapshot(dev), timeouts, strategy,
                                  gated=batch is not None)
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
        self.marker = MigrationMarker(service.host.state_dir, dev.name)
        self.log = logging.LoggerAdapter(log, {"migration": f"{migration_id}/{dev.name} source"})
        self.batch = batch

    @property
    def succeeded(self) -> bool:
        return self.machine.state is SourceState.COMPLETED

    def start(self) -> None:
        self.host.emit(self._event())
        self.feed(Start())

    def _do_AwaitGo(self, a: AwaitGo) -> None:
        if self.batch is not None:
            self.batch.on_ready(self)

    def _do_Connect(self, a: Connect) -> None:
        self._bg.spawn(self._connect())

    async def _connect(self) -> None:
        host, port = self.to
        try:
            reader, writer = await asyncio.wait_for(
                open_connection(host, port, self.service.tls), self.machine.timeouts.connect
            )
        except TlsRefused as e:  # the destination's certificate, or ours, refused
            self._error(f"destination {host}:{port} refused: {e}")
            self.feed(Cancel(AbortReason.AUTHENTICATION, str(e)))
            return
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
        if isinstance(ev, TakeoverDone) and self.machine.state is SourceState.TRANSFERRED:
            # RESUME, the commit point, goes out on this event. Recorded
            # first, with where the guest goes, so that a restart never
            # serves the device again; what cannot be recorded is not done:
            # the migration rolls back and the guest stays here.
            why = self._mark("resume-sent", self.machine.snapshot.pr)
            if why is not None:
                self.feed(Cancel(AbortReason.CANCELLED, f"the commit point cannot be recorded ({why})"))
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
        snap = self.service.snapshot(dev)
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
        return fence_ops(m.snapshot.pr, m.registered, m.preempted, moved=m.move)

    async def _fence_then_resume(self, dev: PassthroughDevice, ops: tuple[PrOp, ...]) -> None:
        try:
            if not dev.held:  # failed before the pause: hold the guest for the fence
                dev.hold()
                self.machine.timings.paused = self.loop.time()
                await dev.drain()
            done = await issue_ops(dev, ops, self.log)
            self.machine.timings.count_ops(done)
            if not done.ok:
                self._error(f"fencing the destination's registrations: {done.error}")
        finally:
            dev.release_held()
            self.machine.timings.resumed = self.loop.time()
            self.log.info("guest resumed on this host")

    def _do_HandOverGuest(self, a: HandOverGuest) -> None:
        self._handover = self._bg.spawn(self._hand_over())

    def _mark(self, phase: str, pr: DevicePrState, fsync: bool = False) -> str | None:
        """Record the migration's progress; None, or why it failed."""
        record: dict[str, Any] = {"version": 1, "id": self.migration_id, "device": self.device_name,
                                  "to": self.peer, "phase": phase, "pr": pr.to_dict()}
        if phase == "resume-sent":  # where a restarted source redirects the guest
            record["frontend"] = list(self.frontend) if self.frontend else None
        if self.machine.move:  # REGISTER AND MOVE plan: a restart never PREEMPTs these keys
            record["move"] = sorted(self.machine.move)
        try:
            self.marker.write(record, fsync)
        except OSError as e:
            self._error(f"cannot record the migration's progress: {e}")
            return str(e)
        return None

    def _settled(self) -> None:
        # A move whose record is not written keeps its resume-sent marker:
        # it stands for the record until the host writes it (which then
        # removes the marker, ``record_moved``).
        # Without a destination portal there is no record to write: the
        # marker stays, and a restart does not serve the device (logged).
        if self.machine.state is SourceState.ROLLED_BACK or (
            self.machine.state is SourceState.COMPLETED and self.unrecorded is None and self.frontend
        ):
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
            task.add_done_callback(lambda _: Runner._do_Finished(self, a))
            return
        super()._do_Finished(a)

    async def _hand_over(self, forget: bool = True) -> None:
        """Move the guest's sessions to the destination. ``forget=False``
        (outcome in doubt): the device stays here, held, for the operator."""
        dev = self.device()
        if dev is None:
            return
        host = self.host
        node_name = host.frontend_node(dev.config)
        dropped = dev.discard_held()
        to_host, to_port = self.frontend or ("", 0)
        asked = host.redirect_logins(node_name, to_host, to_port, LOGOUT_WAIT, RECONNECT_WAIT) if self.frontend else None
        if asked is not None:
            self.log.info(
                "guest handed over: %d held command(s) dropped unanswered, %d session(s) asked to log out, logins redirected to %s:%d",
                dropped, asked, to_host, to_port,
            )
            deadline = self.loop.time() + LOGOUT_GRACE
            while host.guest_sessions(node_name) and self.loop.time() < deadline:
                await asyncio.sleep(0.02)
            left = host.drop_guest_sessions(node_name)
            if left:
                self.log.info("%d guest session(s) did not log out in time: dropped", left)
            if forget:
                unrecorded = host.record_moved_away(dev.name, node_name, to_host, to_port)
                if unrecorded is not None:
                    self.unrecorded = unrecorded
                    self._error(f"the move is not recorded on this host ({unrecorded}): "
                                f"until it is, {self.marker.path} stands for it")
        elif self.frontend is None and host.node_redirects(node_name) is not None:
            self._error("no destination portal known: guest sessions dropped without redirect")
            host.remove_node(node_name)
        if forget:
            await host.drop_device(dev)
