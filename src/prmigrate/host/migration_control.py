"""Migration for the host daemon: options, control commands and events.

The wiring between the host daemon and the migration service
(``migration/service.py``; the daemon is its ``Handover``). ``prmigrate
host`` (commands/host.py) calls ``add_arguments(parser)``, which adds
``--migrate-listen ADDR:PORT``, ``--secret-file FILE`` and
``--migrate-tls-dir DIR`` (mutual TLS under the channel, PEM files named as
QEMU's ``tls-creds-x509``: see ``migration/transport.py``; also
``migrate-tls-dir`` in host.toml), and ``install(daemon, args)``, which
attaches the service before the daemon starts serving. Programs embedding a
daemon call
``await attach_migration(daemon, listen, secret)`` themselves.

Control commands (JSON control socket)::

    {"execute": "migrate", "arguments": {"device": "vm1", "to": "127.0.0.3:4444",
                                         "strategy": "prmigrate"}}
      (the device is reconciled with the LUN first, see _reconcile_before)
      strategy: prmigrate (default) | dest-preempt | qemu (QEMU 11's sequence)
      frontend: "HOST:PORT" optional, the portal the guest is redirected to
                (default: the one the destination announces)
      -> {"id": ..., "device": "vm1", "status": "connecting"}
    {"execute": "migrate", "arguments": {"devices": ["vm1", "vm2"], "to": ...}}   # or "all": true
      (a batch, migration/batch.py: every device set up first, then the
      guests paused one after another; optional "setup-parallel" (default
      16) moves setting up at once, "pause-parallel" (default 1) guests
      paused at once)
      -> {"batch": ..., "migrations": [{"id", "device", "status"}, ...]}
    {"execute": "query-migrate", "arguments": {"device": "vm1"}}   # device optional
      -> [{"id", "device", "role", "peer", "status", "finished", "success",
           "strategy", "timings": {"total_s", "pause_s", "takeover_s",
           "round_trips_in_pause", "peer_takeover_us"}, "reason", "errors", "history"}]
    {"execute": "migrate-cancel", "arguments": {"device": "vm1"}}
      -> {"cancelled": true|false}

Events: ``MIGRATION`` {id, device, role, peer, status} on every state change,
with ``finished``/``success``/``reason``/``timings`` on the last one;
``MIGRATION_REFUSED`` {peer, reason} when a peer fails authentication;
``MIGRATION_RECOVERED`` {device, id, success[, reason]} when a daemon started
again settles an outgoing migration it was killed in the middle of.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from ..device.passthrough import DeviceError
from ..migration.channel import MIN_SECRET_LEN
from ..migration.service import MigrationService, ServiceError, parse_address
from ..migration.transport import TlsError, load_tls_dir
from .control import CommandError
from .daemon import HostDaemon

log = logging.getLogger(__name__)


class SecretError(ValueError):
    pass


def read_secret(path: str | Path) -> bytes:
    """The cluster secret: the file's bytes, surrounding whitespace removed."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read the secret file: {e}") from e
    if len(secret) < MIN_SECRET_LEN:
        raise SecretError(f"{path}: the cluster secret must be at least {MIN_SECRET_LEN} bytes")
    return secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI-args helper: options of ``prmigrate host``."""
    parser.add_argument("--migrate-listen", default=None, metavar="ADDR:PORT",
                        help="accept incoming device migrations here")
    parser.add_argument("--secret-file", default=None, metavar="FILE",
                        help="the cluster's shared migration secret (>= 16 bytes)")
    parser.add_argument("--migrate-tls-dir", default=None, metavar="DIR",
                        help="mutual x509 TLS on the migration channel: ca-cert.pem, server-cert.pem, "
                             "server-key.pem, client-cert.pem, client-key.pem, optionally ca-crl.pem (QEMU's names); "
                             "the secret is still required")


async def install(daemon: HostDaemon, args: argparse.Namespace) -> MigrationService | None:
    listen = getattr(args, "migrate_listen", None)
    secret_file = getattr(args, "secret_file", None)
    if listen and not secret_file:
        raise SystemExit("prmigrate host: --migrate-listen needs --secret-file")
    secret = None
    if secret_file:
        try:
            secret = read_secret(secret_file)
        except SecretError as e:
            raise SystemExit(f"prmigrate host: {e}") from None
    try:
        addr = parse_address(listen) if listen else None
    except ValueError as e:
        raise SystemExit(f"prmigrate host: --migrate-listen: {e}") from None
    tls_dir = getattr(args, "migrate_tls_dir", None) or daemon.config.migrate_tls_dir
    tls = None
    if tls_dir:
        if secret is None:
            raise SystemExit("prmigrate host: --migrate-tls-dir needs --secret-file (TLS does not replace it)")
        try:
            tls = load_tls_dir(tls_dir)
        except TlsError as e:
            raise SystemExit(f"prmigrate host: --migrate-tls-dir: {e}") from None
        log.info("migration channel: mutual TLS with the certificates in %s", tls.directory)
    return await attach_migration(daemon, addr, secret, tls=tls)


async def attach_migration(
    daemon: HostDaemon,
    listen: tuple[str, int] | str | None,
    secret: bytes | None,
    **service_options: Any,
) -> MigrationService:
    """Give ``daemon`` the migration service: control commands, events and,
    with ``listen``, the incoming-migration listener."""
    service = MigrationService(daemon, secret, **service_options)
    service.recover_interrupted()
    if listen is not None:
        host, port = parse_address(listen) if isinstance(listen, str) else listen
        await service.listen(host, port)
    control = daemon.control
    if control is not None:
        control.register_command("migrate", lambda a: _migrate(service, a))
        control.register_command("query-migrate", lambda a: _query(service, a))
        control.register_command("migrate-cancel", lambda a: _cancel(service, a))
    daemon.migration = service  # type: ignore[attr-defined]

    def on_event(msg: dict[str, Any]) -> None:
        if msg.get("event") == "SHUTDOWN":
            asyncio.ensure_future(service.close())

    daemon.add_listener(on_event)
    return service


def _device_arg(args: dict[str, Any], required: bool = True) -> str | None:
    dev = args.get("device")
    if dev is None and not required:
        return None
    if not isinstance(dev, str) or not dev:
        raise CommandError("InvalidParameter", "device: expected a device name")
    return dev


def _wrap(fn: Any) -> Any:
    try:
        return fn()
    except ServiceError as e:
        raise CommandError(e.cls, e.desc) from e
    except ValueError as e:
        raise CommandError("InvalidParameter", str(e)) from e


async def _migrate(service: MigrationService, args: dict[str, Any]) -> dict[str, Any]:
    to = args.get("to") or args.get("destination")
    if not isinstance(to, str):
        raise CommandError("InvalidParameter", "to: expected HOST:PORT of the destination daemon")
    if args.get("devices") is not None or args.get("all"):
        return await _migrate_batch(service, args, to)
    device = _device_arg(args)
    await _reconcile_before(service, device)  # type: ignore[arg-type]

    def start() -> dict[str, Any]:
        frontend = args.get("frontend")
        runner = service.migrate(
            device,  # type: ignore[arg-type]
            parse_address(to),
            args.get("strategy") or "prmigrate",
            parse_address(frontend) if frontend else None,
        )
        return {"id": runner.migration_id, "device": device, "status": runner.machine.state.value}

    return _wrap(start)  # type: ignore[no-any-return]


async def _migrate_batch(service: MigrationService, args: dict[str, Any], to: str) -> dict[str, Any]:
    devices = args.get("devices")
    if args.get("all"):
        if devices is not None or args.get("device") is not None:
            raise CommandError("InvalidParameter", "all: not with device or devices")
        names = None
    else:
        if args.get("device") is not None:
            raise CommandError("InvalidParameter", "device: not with devices")
        if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
            raise CommandError("InvalidParameter", "devices: expected a non-empty list of device names")
        names = list(devices)
    parallel = {}
    for key in ("setup-parallel", "pause-parallel"):
        value = args.get(key)
        if value is not None:
            if not 1 <= value <= 1024:
                raise CommandError("InvalidParameter", f"{key}: expected 1 to 1024")
            parallel[key.replace("-", "_")] = value
    frontend = args.get("frontend")

    def check() -> None:  # refuse a bad batch before reconciling anything
        for name in names or ():
            if name not in service.host.devices:
                raise ServiceError("DeviceNotFound", f"device {name!r} not found")
        parse_address(to)
        if frontend:
            parse_address(frontend)

    _wrap(check)
    busy = {n for n, r in service.runners.items() if r.finished is None}
    targets = [n for n in (names if names is not None else sorted(service.host.devices)) if n not in busy]
    await asyncio.gather(*(_reconcile_before(service, n) for n in targets))

    def start() -> dict[str, Any]:
        batch = service.migrate_batch(
            names, parse_address(to), args.get("strategy") or "prmigrate",
            parse_address(frontend) if frontend else None, **parallel,
        )
        return batch.query()

    return _wrap(start)  # type: ignore[no-any-return]


async def _reconcile_before(service: MigrationService, device: str) -> None:
    """The source reconciles with the LUN before the migration snapshots
    the device: a reservation taken on the device's nexus outside the guest
    is adopted, a registration another initiator preempted is dropped, so
    the destination takes over exactly what the guest holds. Changes that
    reach the device later as a unit attention or PRgeneration change are
    reconciled by the device itself, and ``drain()`` waits for that before
    the final snapshot. A failed reconciliation leaves the tracked state as
    it is (the migration goes on; the destination verifies after its
    takeover)."""
    dev = service.host.devices.get(device)
    if dev is None or not dev.migrate_pr or dev.held:
        return
    try:
        await dev.verify("before migration")
    except DeviceError as e:
        log.warning("device %s: reconciliation before the migration failed: %s", device, e)


def _query(service: MigrationService, args: dict[str, Any]) -> list[dict[str, Any]]:
    device = _device_arg(args, required=False)
    return _wrap(lambda: service.query(device))  # type: ignore[no-any-return]


def _cancel(service: MigrationService, args: dict[str, Any]) -> dict[str, Any]:
    device = _device_arg(args)
    return _wrap(lambda: {"cancelled": service.cancel(device)})  # type: ignore[arg-type, no-any-return]
