"""``prmigrate host``: the host daemon (passthrough devices for guests).

    prmigrate host --name hosta --initiator iqn.2026-11.org.prmigrate:hosta \\
      --listen 127.0.0.2:3260 --control /tmp/hosta.sock --state-dir /tmp/hosta \\
      --device name=vm1,backend=iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0,target=iqn.2026-11.org.prmigrate:vm1,machine=pc-q35-11.0
    prmigrate host --config host.toml
    prmigrate host --list-machines

SIGINT/SIGTERM stop the daemon cleanly (backend sessions logged out, the
control socket removed).

Extensions: if ``prmigrate.host.migration_service`` exists, its
``add_arguments(parser)`` (optional) adds options here and its
``install(daemon, args)`` (may be async) runs once the daemon is built,
before it starts serving.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import signal
import sys
from types import ModuleType

log = logging.getLogger("prmigrate.host")


def _extension() -> ModuleType | None:
    try:
        return importlib.import_module("prmigrate.host.migration_service")
    except ModuleNotFoundError as exc:
        if exc.name != "prmigrate.host.migration_service":
            raise
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="HOST.TOML", help="TOML configuration")
    parser.add_argument("--name", default=None, help="host name (logs, events)")
    parser.add_argument("--initiator", default=None, help="the host's iSCSI initiator name")
    parser.add_argument("--listen", action="append", default=None, metavar="HOST:PORT",
                        help="guest frontend portal (repeatable; default 127.0.0.1:3260)")
    parser.add_argument("--control", default=None, metavar="PATH", help="control Unix socket")
    parser.add_argument("--state-dir", default=None, metavar="DIR", help="PR state journals")
    parser.add_argument("--device", action="append", default=None, metavar="SPEC",
                        help="name=,backend=iscsi://...,target=,machine=,migrate-pr=on|off,"
                             "guests=IQN+IQN,identity=guest|host (repeatable)")
    parser.add_argument("--list-machines", action="store_true",
                        help="list machine types and their migrate-pr default, then exit")
    parser.add_argument("--log-format", choices=("text", "json"), default=None)
    parser.add_argument("--keepalive", type=float, default=None,
                        help="NOP-In interval on guest connections (s)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    ext = _extension()
    if ext is not None and hasattr(ext, "add_arguments"):
        ext.add_arguments(parser)


async def _serve(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from ..device.passthrough import DeviceError
    from ..host.control import CommandError
    from ..host.daemon import HostDaemon
    from ..iscsi.initiator import IscsiError, LoginError

    daemon = HostDaemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        ext = _extension()
        if ext is not None and hasattr(ext, "install"):
            r = ext.install(daemon, args)
            if inspect.isawaitable(r):
                await r
        try:
            await daemon.start()
        except (DeviceError, IscsiError, LoginError, CommandError, OSError) as exc:
            log.error("cannot start host %s: %s", cfg.name, exc)
            return 1
        await daemon.serve_forever()
        log.info("stopping")
    finally:
        await daemon.close()
    return 0


def run(args: argparse.Namespace) -> int:
    from ..device.machine import format_machine_list
    from ..host.config import HostConfig, HostConfigError, load_toml, merge_cli
    from ..host.daemon import setup_logging

    if args.list_machines:
        print(format_machine_list())
        return 0
    try:
        base = load_toml(args.config) if args.config else HostConfig()
        cfg = merge_cli(base, args)
    except HostConfigError as e:
        print(f"prmigrate host: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg.log_format, logging.DEBUG if args.verbose > 1 else logging.INFO)
    if cfg.uvloop:
        import uvloop

        return uvloop.run(_serve(cfg, args))
    return asyncio.run(_serve(cfg, args))
