"""The destination side of a migration in the shell: ``DestinationRunner``.

Carries out the ``DestinationMigration`` machine's actions
(``destination.py``) on the host (``handover.py``) and the new device:

``CreateDevice``
    The host's ``add_incoming_device`` with the migrated config and identity
    (not exposed yet; the identical node name, LUN, INQUIRY data and
    capacity), the guests' backend sessions opened, then PR IN (READ FULL
    STATUS, or READ KEYS + READ RESERVATION; SPC-5 6.16) -> ``DeviceReady``.
    When a key of the device is also registered outside it, what REGISTER
    AND MOVE needs, all before the pause: whether the backend says it
    supports it (REPORT SUPPORTED OPERATION CODES, 5Fh/07h, on the monitor
    nexus; the setup plan then tries it, ``plan.setup_plan``), each
    guest's destination nexus (TransportID) and the relative target port it
    reaches the LUN through (VPD 83h on that nexus), and the source's nexus
    and port (READ FULL STATUS), where a rollback moves it back.
``LoadState``
    ``device.restore`` (PR state, pending unit attentions).
``ResumeGuest``
    The node is published (replacing a redirect left by an earlier move
    away), then the tracked state is verified in the background.
``DropDevice``
    Creation cancelled, device closed, journal removed; a redirect node
    that was there before is left in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..device.identity import backend_port
from ..device.passthrough import DeviceError
from ..device.plans import command_plan, full_status_plan, keys_plan
from ..iscsi.initiator import IscsiError, ScsiError, describe_result
from ..scsi.cdb import CommandSupport, one_command_support, supports_service_action
from ..scsi.constants import Opcode, PrOutAction, PrType, Status
from ..scsi.inquiry import VpdPage, relative_target_port
from ..scsi.pr import FullStatusEntry, PrDecodeError
from ..scsi.tpg import ReportTpgCdb, decode_report
from .channel import Message, Setup
from .destination import DestinationMigration, DestinationState
from .errors import MigrationError
from .machine import (
    CreateDevice,
    DeviceFailed,
    DeviceReady,
    DropDevice,
    Event,
    Finished,
    HandOverGuest,
    LoadState,
    ResumeGuest,
    StateLoaded,
    Timeouts,
)
from .plan import MovePort, Observed, TargetTraits
from .runner import Runner, RunnerOwner, log
from .stream import DeviceSnapshot
from .transport import decode_peer_id

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice


class DestinationRunner(Runner):
    role = "destination"

    def __init__(self, service: RunnerOwner, link_peer: str, timeouts: Timeouts | None) -> None:
        machine = DestinationMigration(f"incoming from {link_peer}", timeouts)
        super().__init__(service, machine, "")
        self.machine: DestinationMigration = machine
        self.peer = link_peer
        self.source_initiator: str | None = None
        self._creating: asyncio.Task[Any] | None = None
        self._created = False
        self._adopted: PassthroughDevice | None = None  # an incoming device it arrives into
        self._rfs_entries: tuple[FullStatusEntry, ...] = ()  # the last READ FULL STATUS in setup
        self.log = logging.LoggerAdapter(log, {"migration": f"incoming from {link_peer}"})

    @property
    def succeeded(self) -> bool:
        return self.machine.state is DestinationState.RESUMED

    def on_authenticated(self, peer_id: str) -> None:
        name, initiator = decode_peer_id(peer_id)
        self.peer = f"{name}@{self.peer}" if name else self.peer
        self.source_initiator = initiator or None

    def feed(self, event: Event | Message) -> None:
        if isinstance(event, Setup) and not self.migration_id:
            self.migration_id = event.migration_id
            self.log = logging.LoggerAdapter(log, {"migration": f"{event.migration_id} destination"})
        super().feed(event)
        snap = self.machine.snapshot
        if snap is not None and not self.device_name:
            self.device_name = snap.name
            self.service.register(self)
            self.host.emit(self._event())

    def _do_CreateDevice(self, a: CreateDevice) -> None:
        self._creating = self._bg.spawn(self._create(a.snapshot))

    async def _create(self, snap: DeviceSnapshot) -> None:
        try:
            cfg = snap.device_config()
            ident = snap.device_identity()
        except MigrationError as e:
            self.feed(DeviceFailed(str(e)))
            return
        host = self.host
        adopted = host.adopt_incoming(cfg) if cfg.name in host.devices else None
        if adopted is not None:
            # an incoming device waits for it here (incoming-from=, pull.py):
            # the migration arrives into it; an abort leaves it incoming
            dev = self._adopted = adopted
        elif cfg.name in host.devices:
            self.feed(DeviceFailed(f"device {cfg.name!r} already exists on this host"))
            return
        elif host.node_redirects(host.frontend_node(cfg)) is False:
            self.feed(DeviceFailed(f"target node {host.frontend_node(cfg)} is in use on this host"))
            return
        else:
            # A node that redirects (the device moved away from here earlier)
            # stays in place until this host serves the guest again.
            try:
                dev = await host.add_incoming_device(cfg, ident)
            except Exception as e:
                self.feed(DeviceFailed(f"cannot create device: {e}"))
                return
            self._created = True
        try:
            guests = sorted(snap.pr.guests)
            for g in guests:
                await dev.backend_session(g)
            observed, traits = await self._observe(dev, snap) if guests else (None, TargetTraits())
            ports: dict[str, MovePort] = {}
            source_ports: dict[str, MovePort] = {}
            if observed is not None and observed.foreign:
                traits, ports, source_ports = await self._move_info(dev, snap, traits)
        except Exception as e:
            self.feed(DeviceFailed(f"backend: {type(e).__name__}: {e}"))
            return
        self.feed(DeviceReady(observed, traits, ports, source_ports))

    async def _move_info(self, dev: PassthroughDevice, snap: DeviceSnapshot,
                         traits: TargetTraits) -> tuple[TargetTraits, dict[str, MovePort], dict[str, MovePort]]:
        """What REGISTER AND MOVE needs (outside the pause): the backend's
        support for it, and per guest the destination's nexus and the
        source's, each with its relative target port."""
        ports: dict[str, MovePort] = {}
        source_ports: dict[str, MovePort] = {}
        r = await dev.run(command_plan(supports_service_action(Opcode.PERSISTENT_RESERVE_OUT, PrOutAction.REGISTER_AND_MOVE), 64))
        support = one_command_support(bytes(r.data_in)) if r.status == Status.GOOD else None
        if support not in (CommandSupport.SUPPORTED, CommandSupport.SUPPORTED_VENDOR):
            self.log.info("backend REGISTER AND MOVE: not supported (REPORT SUPPORTED OPERATION CODES: %s)",
                          support.name if isinstance(support, CommandSupport) else describe_result(r))
            return replace(traits, register_and_move=False), ports, source_ports
        traits = replace(traits, register_and_move=True)
        for guest in sorted(snap.pr.guests):
            s = await dev.backend_session(guest)
            try:
                rel = relative_target_port(await s.inquiry(VpdPage.DEVICE_ID, 255, lun=dev.lun))
            except ScsiError as e:
                rel = None
                self.log.warning("%s: INQUIRY VPD 83h on its backend nexus: %s", guest, e)
            if rel is None:
                rel = await self._only_target_port(dev)
            if rel is None:
                self.log.warning("%s: no relative target port known for its backend nexus", guest)
                continue
            ports[guest] = MovePort(backend_port(dev.mode, dev.host_initiator, dev.name, guest).transport_id, rel)
        rfs_ports = {e.transport_id.key(): e.rel_tgt_port for e in self._rfs_entries if not e.all_tg_pt}
        for guest, port in ports.items():
            if self.source_initiator:
                tid = backend_port(dev.mode, self.source_initiator, dev.name, guest).transport_id
                # the port the source's registration is on; one made on
                # every target port (ALL_TG_PT), or unknown without READ
                # FULL STATUS, is taken to be the one we reach
                source_ports[guest] = MovePort(tid, rfs_ports.get(tid.key()) or port.rel_tgt_port)
        return traits, ports, source_ports

    async def _only_target_port(self, dev: PassthroughDevice) -> int | None:
        """The relative target port identifier when REPORT TARGET PORT
        GROUPS (SPC-5 6.36) names exactly one target port in all its groups
        (then every nexus reaches the LUN through it); None otherwise."""
        r = await dev.run(command_plan(ReportTpgCdb.encode(1024), 1024))
        if r.status != Status.GOOD:
            return None
        try:
            ports = {p for g in decode_report(bytes(r.data_in)) for p in g.ports}
        except ValueError:
            return None
        return ports.pop() if len(ports) == 1 else None

    async def _observe(self, dev: PassthroughDevice, snap: DeviceSnapshot) -> tuple[Observed, TargetTraits]:
        """The target's PR state as seen from here (outside the pause)."""
        rfs = await dev.run(full_status_plan(dev.verification, dev.log))
        self._rfs_entries = rfs.entries if rfs is not None else ()
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
                # a multipath device has one nexus per path on each host (device/paths.py)
                src_paths = range(len(snap.device_config().backend_urls))
                for guest in snap.pr.guests:
                    ports = [backend_port(dev.mode, self.source_initiator, dev.name, guest, p).transport_id
                             for p in src_paths]
                    own += ports + [backend_port(dev.mode, dev.host_initiator, dev.name, guest, p).transport_id
                                    for p in range(len(dev.config.backend_urls))]
                    for e in rfs.entries:
                        if any(e.transport_id.same_port(port) for port in ports):
                            source_keys[guest] = e.key
                for e in rfs.entries:
                    if not any(e.transport_id.same_port(p) for p in own):
                        foreign[e.key] = (*foreign.get(e.key, ()), str(e.transport_id))
            observed = Observed(frozenset(e.key for e in rfs.entries), res_key, rtype, source_keys, foreign)
            return observed, TargetTraits(read_full_status=True)
        # On the monitor nexus, like READ FULL STATUS: a new nexus's unit
        # attention (tgt reports POWER ON RESET on each) is retried there and
        # none meant for a guest is consumed.
        try:
            keys, rr = await dev.run(keys_plan(dev.verification))
        except PrDecodeError as e:
            raise IscsiError(f"PR IN: {e}") from e
        except DeviceError as e:
            raise IscsiError(str(e)) from e
        observed = Observed.from_pr_in(keys, rr)
        # READ KEYS lists one key per registered nexus: a key listed more
        # often than the device's own registrations of it (the guests'
        # source nexuses, and the destination's from setup) is shared with
        # nexuses outside the device, unnamed here
        mine = Counter({k: n * len(snap.device_config().backend_urls) for k, n in
                        Counter(g.key for g in snap.pr.guests.values() if g.registered).items()})
        mine.update({k: n * len(dev.config.backend_urls) for k, n in
                     Counter(getattr(self.machine, "registered", {}).values()).items()})
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
        dev = self.device()
        if dev is None:
            return
        self.host.serve(dev.name)
        self.log.info("guest served on this host (node %s)", self.host.frontend_node(dev.config))
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
        if dev is not None and self._adopted is dev:
            self.host.release_incoming(dev)
        elif dev is not None and self._created:
            await self.host.drop_device(dev)

    def _do_HandOverGuest(self, a: HandOverGuest) -> None:  # pragma: no cover - source only
        raise AssertionError("HandOverGuest on a destination")

    def _do_Finished(self, a: Finished) -> None:
        super()._do_Finished(a)
        self.service.incoming_done(self)
