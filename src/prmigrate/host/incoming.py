"""Incoming devices on the host daemon (``incoming-from=``; ``migration/pull.py``).

``add_incoming(daemon, config)``: the migration service watches the device
on its source (``MigrationService.watch``), which describes it (its config
and identity as the guest sees them there); the device is created from
that description (this host's backend URL, the same backend target and
LUN, refused otherwise), its node published at once with an
``IncomingGate`` (``device/incoming.py``) as LUN 0, and every command that
needs the guest's nexus pulls it. A migration of the device that reaches
this host (a pull's, the source's own handover, a pushed ``migrate``)
adopts it (``adopt``); its RESUME makes it a device like any other
(``arrive``: the device itself becomes the node's LUN, the run-time record
loses its ``incoming-from``); an aborted one leaves it incoming
(``release``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from ..device.config import DeviceConfig, split_spec
from ..device.incoming import IncomingGate
from ..device.state import DevicePrState
from .control import CommandError

if TYPE_CHECKING:
    from ..device.identity import DeviceIdentity
    from ..device.passthrough import PassthroughDevice
    from ..iscsi.target import IscsiTarget
    from ..migration.pull_runner import IncomingLink

log = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = 10.0  # seconds device-add waits for the source's description


@dataclass(slots=True)
class Incoming:
    """One incoming device: its gate and its watch link."""

    gate: IncomingGate
    link: IncomingLink
    adopted: bool = False  # a migration of it is running here


class IncomingHost(Protocol):
    """What this module needs of the host daemon (``daemon.py``)."""

    devices: dict[str, PassthroughDevice]
    incoming_devices: dict[str, Incoming]
    runtime: dict[str, dict[str, Any]]
    target: IscsiTarget

    def get_device(self, name: str) -> PassthroughDevice: ...

    def frontend_node(self, config: DeviceConfig) -> str: ...

    async def add_incoming_device(self, config: DeviceConfig, identity: DeviceIdentity) -> PassthroughDevice: ...

    def serve_incoming(self, name: str) -> None: ...

    def configured_devices(self) -> set[str]: ...

    def _save_runtime(self, records: dict[str, dict[str, Any]]) -> None: ...


async def add_incoming(daemon: IncomingHost, wanted: DeviceConfig) -> PassthroughDevice:
    """Create and publish the incoming device ``wanted`` (CommandError when
    the source cannot describe it or it is not the same LUN)."""
    from ..migration.service import ServiceError, parse_address

    service = getattr(daemon, "migration", None)
    if service is None:
        raise CommandError("GenericError", "incoming-from needs the migration service (--migrate-listen, --secret-file)")
    assert wanted.incoming_from is not None
    try:
        link = service.watch(wanted.name, parse_address(wanted.incoming_from))
    except (ServiceError, ValueError) as e:
        raise CommandError("GenericError", f"device {wanted.name}: {e}") from e
    try:
        try:
            snap = await asyncio.wait_for(link.described(), DESCRIBE_TIMEOUT)
        except (ConnectionError, TimeoutError) as e:
            raise CommandError("GenericError", f"device {wanted.name}: the source {wanted.incoming_from} "
                                               f"did not describe it: {e or 'timeout'}") from None
        try:
            source = snap.device_config()
            identity = snap.device_identity()
        except ValueError as e:
            raise CommandError("GenericError", f"device {wanted.name}: bad description: {e}") from e
        if (source.target_iqn.lower(), source.lun) != (wanted.target_iqn.lower(), wanted.lun):
            raise CommandError("GenericError", f"device {wanted.name}: the source fronts {source.target_iqn} "
                                               f"lun {source.lun}, not {wanted.target_iqn} lun {wanted.lun}")
        given = {"frontend": (wanted.frontend_iqn, source.frontend_iqn), "migrate-pr": (wanted.migrate_pr, source.migrate_pr),
                 "guests": (wanted.guests, source.guests)}
        for key, (mine, theirs) in given.items():
            if mine is not None and mine != theirs:
                log.warning("device %s: %s=%s ignored: an incoming device is the source's (%s)", wanted.name, key,
                            mine, theirs)
        config = replace(source, backend_url=wanted.backend_url, more_backends=wanted.more_backends,
                         incoming_from=wanted.incoming_from)
        dev = await daemon.add_incoming_device(config, identity)
    except BaseException:
        link.cancel("device not added")
        raise
    gate = IncomingGate(dev, link.pull)
    daemon.incoming_devices[dev.name] = Incoming(gate, link)
    daemon.serve_incoming(dev.name)
    dev.log.info("incoming from %s: node %s answers logins; the first command that needs the guest's nexus "
                 "pulls the device", wanted.incoming_from, daemon.frontend_node(config))
    return dev


def adopt(daemon: IncomingHost, config: DeviceConfig) -> PassthroughDevice | None:
    """The incoming device a migration of ``config`` arrives into, or None."""
    inc = daemon.incoming_devices.get(config.name)
    dev = daemon.devices.get(config.name)
    if inc is None or dev is None or inc.adopted:
        return None
    if (dev.config.target_iqn.lower(), dev.config.lun) != (config.target_iqn.lower(), config.lun):
        return None
    inc.adopted = True
    return dev


def release(daemon: IncomingHost, dev: PassthroughDevice) -> None:
    """The migration into the incoming device was aborted: it stays incoming,
    with nothing of the guest's PR state (the source keeps it)."""
    inc = daemon.incoming_devices.get(dev.name)
    if inc is None:
        return
    inc.adopted = False
    dev.restore(DevicePrState())


def arrive(daemon: IncomingHost, name: str) -> bool:
    """The migration into the incoming device resumed: serve it as any
    device. False when ``name`` is not incoming."""
    inc = daemon.incoming_devices.pop(name, None)
    if inc is None:
        return False
    dev = daemon.get_device(name)
    node = daemon.target.node(daemon.frontend_node(dev.config))
    if node is not None:
        node.luns[0] = dev  # the gate is asked for nothing more
    inc.gate.arrive()
    inc.link.arrived()
    record: dict[str, Any] | None = daemon.runtime.get(name)
    if record is not None and "incoming-from" in record:
        # from now on the device as it runs (the source's machine type,
        # frontend node, guests...), no longer incoming, after a restart
        # too; a configured device (it came back) is the configuration's
        rest: dict[str, Any] = dict(split_spec(replace(dev.config, incoming_from=None).to_spec()))
        records = {k: v for k, v in daemon.runtime.items() if k != name}
        if name not in daemon.configured_devices():
            records[name] = rest
        try:
            daemon._save_runtime(records)
            daemon.runtime = records
        except CommandError as e:
            dev.log.error("device %s arrived, but its record keeps incoming-from: %s", name, e.desc)
    dev.log.info("arrived: served here (it was incoming from %s)", dev.config.incoming_from)
    return True


def close(daemon: IncomingHost, name: str) -> None:
    """The incoming device is deleted: the watch ends, waiting commands get NOT READY."""
    inc = daemon.incoming_devices.pop(name, None)
    if inc is not None:
        inc.gate.close()
        inc.link.cancel()
