"""``prmigrate host``: the host daemon (passthrough devices for guests).

    prmigrate host --name hosta --initiator iqn.2026-11.org.prmigrate:hosta \\
      --listen 127.0.0.2:3260 --control /tmp/hosta.sock --state-dir /tmp/hosta \\
      --device name=vm1,backend=iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0,target=iqn.2026-11.org.prmigrate:vm1,machine=pc-q35-11.0
    prmigrate host --config host.toml
    prmigrate host --list-machines
    prmigrate host --status --control /tmp/hosta.sock [--json]

Events (PR state changes, reconciliations, migrations with their phase
timings) are appended as JSON lines to ``--event-log PATH``, default
``<state-dir>/events.jsonl`` when there is a state directory.

``--status`` asks a running daemon (``query-devices``) and prints, per
device and guest: key, reservation, backend nexus, how and when the state
was last verified against the LUN.

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

from ..aio import run_loop

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
    parser.add_argument("--poll-us", type=int, default=None, metavar="US",
                        help="busy-poll up to US microseconds for the next PDU before sleeping "
                             "(lower latency at low queue depth for CPU; asyncio loop only; default 0: off)")
    parser.add_argument("--event-log", default=None, metavar="PATH",
                        help="JSON lines event log (default: <state-dir>/events.jsonl)")
    parser.add_argument("--status", action="store_true",
                        help="show a running daemon's devices (needs --control), then exit")
    parser.add_argument("--json", action="store_true", help="with --status: print JSON")
    ext = _extension()
    if ext is not None and hasattr(ext, "add_arguments"):
        ext.add_arguments(parser)


async def _serve(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from ..device.passthrough import DeviceError
    from ..host.control import CommandError
    from ..host.daemon import HostDaemon
    from ..iscsi.initiator import IscsiError, LoginError

    event_log = args.event_log
    if event_log is None and cfg.state_dir is not None:
        from ..host.eventlog import DEFAULT_NAME

        event_log = cfg.state_dir / DEFAULT_NAME
    daemon = HostDaemon(cfg, event_log=event_log)
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
    if args.status:
        return _status(args)
    try:
        base = load_toml(args.config) if args.config else HostConfig()
        cfg = merge_cli(base, args)
    except HostConfigError as e:
        print(f"prmigrate host: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg.log_format, logging.DEBUG if args.verbose > 1 else logging.INFO)
    return run_loop(_serve(cfg, args), use_uvloop=cfg.uvloop, poll_us=cfg.poll_us)


# ------------------------------------------------------------------ status


def _status(args: argparse.Namespace) -> int:
    import json

    from ..host.control import CommandError, control_call

    if not args.control:
        print("prmigrate host --status: needs --control PATH of the daemon", file=sys.stderr)
        return 2
    async def ask() -> tuple[list[dict], dict]:  # type: ignore[type-arg]
        devices = await control_call(args.control, "query-devices", timeout=10)
        host = await control_call(args.control, "query-host", timeout=10)
        return devices, host

    try:
        devices, host = asyncio.run(ask())
    except (OSError, TimeoutError, CommandError) as exc:
        print(f"prmigrate host --status: {args.control}: {exc}", file=sys.stderr)
        return 1
    moved = host.get("moved", {})
    if args.json:
        print(json.dumps(devices, indent=2, sort_keys=True))
        return 0
    print(format_status(devices, moved, host.get("moved-unrecorded")))
    return 0


def format_status(devices: list[dict], moved: dict[str, str] | None = None,  # type: ignore[type-arg]
                  unrecorded: dict[str, str] | None = None) -> str:
    """``query-devices`` as the operator reads it: one block per device, one
    line per guest and per backend session; then the devices that moved
    away (``query-host``), with the moves not recorded on disk."""
    unrecorded = unrecorded or {}
    away = [f"device {name}: moved to {where} (guest logins redirected there)"
            + (f"; MOVE NOT RECORDED ({unrecorded[name]}): a restart now would serve it here"
               if name in unrecorded else "")
            for name, where in sorted((moved or {}).items())]
    if not devices:
        return "\n".join(away) or "no devices"
    lines = []
    for d in devices:
        pr = d.get("pr-state", {})
        method = pr.get("method") or "not verified yet"
        verified = pr.get("last-verified") or "never"
        age = pr.get("last-verified-age-s")
        lines.append(
            f"device {d['name']}: backend {d['properties']['backend']}, "
            f"migrate-pr {'on' if d.get('migrate-pr') else 'off'}"
            f"{', HELD (migrating)' if d.get('held') else ''}"
        )
        lines.append(
            f"  verified: {verified}" + (f" ({age:.1f} s ago)" if age is not None else "")
            + f" by {method}"
        )
        if pr.get("last-verify-error"):
            lines.append(f"  last verification failed: {pr['last-verify-error']}")
        for what in pr.get("method-cannot-tell", []):
            lines.append(f"  cannot tell: {what}")
        for q in pr.get("open-questions", []):
            lines.append(f"  open: {q}")
        guests = pr.get("guests", {})
        if not guests:
            lines.append("  no guest PR state")
        for g, st in sorted(guests.items()):
            res = f"holds {st['type']} scope {st['scope']}" if st.get("holder") else "no reservation"
            flag = "" if st.get("verified") else ", NOT verified"
            lines.append(
                f"  guest {g}: key {st['key']}, {res}{', APTPL' if st.get('aptpl') else ''}"
                f"{flag}; backend nexus {st.get('backend-nexus', '?')}"
            )
        for key, nx in sorted(d.get("backend-nexus", {}).items()):
            if key not in guests:
                lines.append(
                    f"  guest {key}: no PR state; backend nexus {nx['transport_id']}"
                    f"{'' if nx.get('connected') else ' (closed)'}"
                )
        sessions = [(f"guest {k}", nx.get("session")) for k, nx in sorted(d.get("backend-nexus", {}).items())]
        sessions.append(("monitor", d.get("monitor-session")))
        for who, link in sessions:
            if link:
                lines.append(f"  backend session ({who}): {_link_text(link)}")
    return "\n".join(lines + away)


def _link_text(link: dict) -> str:  # type: ignore[type-arg]
    """One backend session's ``link_state()`` in words."""
    text = f"{str(link.get('state', '?')).upper()} since {link.get('since', '?')} ({link.get('for-s', 0):.0f} s)"
    if link.get("state") != "up":
        text += (f", {link.get('failed-attempts', 0)} failed login(s), next in {link.get('next-delay-s', 0):.1f} s, "
                 f"{link.get('held-commands', 0)} command(s) held; last error: {link.get('error') or '-'}")
    return text
