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

``--metrics ADDR:PORT`` (or ``metrics =`` in host.toml) serves Prometheus
metrics (``prmigrate.metrics``); ``--migrate-tls-dir DIR`` puts the
migration channel under mutual TLS (``host/migration_control.py``).

``--status`` asks a running daemon (``query-devices``) and prints, per
device, the URLs its guests log in to and, per guest: key, reservation,
backend nexus, how and when the state was last verified against the LUN.

SIGINT/SIGTERM stop the daemon cleanly (backend sessions logged out, the
control socket removed). SIGHUP reopens the log files and applies
``--config`` again (``HostDaemon.reload``: devices added or removed, a
changed device refused; running guests untouched). The state directory and
control socket are locked (``prmigrate.lock``): a second daemon on either is
refused, naming the running one's pid. Under systemd (``Type=notify``) the
daemon sends READY=1 once every device is served, STOPPING=1, RELOADING=1
around a reload and WATCHDOG=1 when ``WatchdogSec=`` is set (``sdnotify.py``).

Exit status: 0 stopped by SIGINT/SIGTERM; 1 cannot start (configuration
refused, backend unreachable) or ``--status`` cannot reach the daemon; 2
usage error.

Extensions: migration (``host/migration_control.py``): its ``add_arguments(parser)``
adds the migration options here and its ``install(daemon, args)`` runs once
the daemon is built, before it starts serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..host import migration_control
from . import _args

log = logging.getLogger("prmigrate.host")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n\n", 1)[1].split("\n\nExtensions:")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", default=None, metavar="HOST.TOML", help="TOML configuration")
    parser.add_argument("--name", default=None, help="host name (logs, events)")
    parser.add_argument("--initiator", default=None, type=_args.iscsi_name, metavar="NAME",
                        help="the host's iSCSI initiator name (iqn., eui. or naa. form)")
    parser.add_argument("--listen", action="append", default=None, metavar="HOST:PORT",
                        help="guest frontend portal (repeatable; default 127.0.0.1:3260)")
    parser.add_argument("--control", default=None, metavar="PATH", help="control Unix socket")
    parser.add_argument("--state-dir", default=None, metavar="DIR", help="PR state journals")
    parser.add_argument("--device", action="append", default=None, metavar="SPEC",
                        help="a device, in QEMU's -device form: name=NAME,backend=iscsi://HOST[:PORT]/"
                             "IQN/LUN[,backend=URL of another path...][,frontend=IQN][,machine=][,migrate-pr=on|off]"
                             "[,guests=IQN+IQN][,identity=guest|host] (repeatable; every key: docs/cli.md)")
    parser.add_argument("--list-machines", action="store_true",
                        help="list machine types and their migrate-pr default, then exit")
    parser.add_argument("--log-format", choices=("text", "json"), default=None)
    parser.add_argument("--log-file", default=None, metavar="PATH",
                        help="append the log there instead of stderr (reopened on SIGHUP)")
    parser.add_argument("--keepalive", type=float, default=None,
                        help="NOP-In interval on guest connections (s)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--poll-us", type=int, default=None, metavar="US",
                        help="busy-poll up to US microseconds for the next PDU before sleeping "
                             "(lower latency at low queue depth for CPU; asyncio loop only; default 0: off)")
    parser.add_argument("--event-log", default=None, metavar="PATH",
                        help="JSON lines event log (default: <state-dir>/events.jsonl)")
    parser.add_argument("--metrics", default=None, metavar="ADDR:PORT",
                        help="serve Prometheus metrics over HTTP here (default: off)")
    parser.add_argument("--status", action="store_true",
                        help="show a running daemon's devices (needs --control), then exit")
    parser.add_argument("--json", action="store_true", help="with --status: print JSON")
    migration_control.add_arguments(parser)


async def _serve(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from ..device.passthrough import DeviceError
    from ..host.control import CommandError
    from ..host.daemon import HostDaemon
    from ..iscsi.initiator import IscsiError, LoginError
    from ..lock import LockError
    from ..sdnotify import Notifier

    event_log = args.event_log
    if event_log is None and cfg.state_dir is not None:
        from ..host.eventlog import DEFAULT_NAME

        event_log = cfg.state_dir / DEFAULT_NAME
    daemon = HostDaemon(cfg, event_log=event_log)
    notifier = Notifier()
    # The locks come first: the migration service reads the state
    # directory and binds its port when it is installed.
    try:
        daemon.locks.acquire()
    except (LockError, OSError) as exc:
        log.error("cannot start host %s: %s", cfg.name, exc)
        return 1
    metrics = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop)
    reloads: set[asyncio.Task[None]] = set()
    started = asyncio.Event()  # a SIGHUP during start-up is applied after it

    def on_hup() -> None:
        task = asyncio.ensure_future(_reload(daemon, args, notifier, started))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await migration_control.install(daemon, args)
        try:
            await daemon.start()
        except (DeviceError, IscsiError, LoginError, CommandError, LockError, OSError) as exc:
            log.error("cannot start host %s: %s", cfg.name, exc)
            return 1
        if cfg.metrics:
            from ..metrics import MetricsError, parse_metrics_address, serve_host

            try:
                metrics = serve_host(daemon, *parse_metrics_address(cfg.metrics))
            except MetricsError as e:
                log.error("cannot start host %s: metrics: %s", cfg.name, e)
                return 1
        notifier.ready(f"serving {len(daemon.devices)} device(s)")
        started.set()
        await daemon.serve_forever()
        log.info("stopping")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await notifier.stopping()
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        if metrics is not None:
            metrics.close()
        await daemon.close()
    return 0


async def _reload(daemon, args: argparse.Namespace, notifier, started: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP: reopen the log files, apply the configuration file again."""
    from ..host.config import HostConfigError, load_toml, merge_cli

    await started.wait()
    notifier.reloading()
    try:
        daemon.reopen_logs()
        if not args.config:
            log.info("SIGHUP: log files reopened (no --config to reload)")
            return
        try:
            new = merge_cli(load_toml(args.config), args)
        except HostConfigError as exc:
            log.error("SIGHUP: %s not applied: %s", args.config, exc)
            return
        await daemon.reload(new)
    finally:
        notifier.send(ready=1)


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
    from ..aio import run_loop

    try:
        setup_logging(cfg.log_format, logging.DEBUG if args.verbose > 1 else logging.INFO,
                      getattr(args, "log_file", None))
    except OSError as e:
        print(f"prmigrate host: --log-file: {e}", file=sys.stderr)
        return 1
    return run_loop(_serve(cfg, args), use_uvloop=cfg.uvloop, poll_us=cfg.poll_us)


# ------------------------------------------------------------------ status


def _status(args: argparse.Namespace) -> int:
    import json

    from ._control_client import ControlConnection, ControlError

    if not args.control:
        print("prmigrate host --status: needs --control PATH of the daemon", file=sys.stderr)
        return 2
    try:
        with ControlConnection(args.control) as c:
            devices = c.call("query-devices", timeout=10)
            host = c.call("query-host", timeout=10)
    except ControlError as exc:
        print(f"prmigrate host --status: {exc}", file=sys.stderr)
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
            + (f"; MOVE NOT RECORDED ({unrecorded[name]}): written again until it works, "
               "the migration's marker stands for it until then"
               if name in unrecorded else "")
            for name, where in sorted((moved or {}).items())]
    if not devices:
        return "\n".join(away) or "no devices"
    from ..scsi.vocabulary import format_key, words

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
        for url in d.get("frontend", {}).get("urls", []):
            lines.append(f"  guest URL: {url}")
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
            scope = "" if not st.get("scope") else f", scope {st['scope']}"
            res = (f"holds {words(st['type'])}{scope}" if st.get("holder")
                   else "no reservation")
            flag = "" if st.get("verified") else ", NOT verified"
            lines.append(
                f"  guest {g}: key {format_key(st['key'])}, {res}{', APTPL' if st.get('aptpl') else ''}"
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
            if link and link.get("paths"):  # a multipath nexus: every path
                for p in link["paths"]:
                    lines.append(f"  backend path {p['path']} ({who}): {p['url']} nexus {p['nexus']}, {p['state']}"
                                 f"{', registered' if p.get('registered') else ', not registered'}"
                                 f"{', holder' if p.get('holder') else ''}"
                                 + (f"; {_link_text(p['session'])}" if p.get("session") else ""))
            elif link:
                lines.append(f"  backend session ({who}): {_link_text(link)}")
    return "\n".join(lines + away)


def _link_text(link: dict) -> str:  # type: ignore[type-arg]
    """One backend session's ``link_state()`` in words."""
    text = f"{str(link.get('state', '?')).upper()} since {link.get('since', '?')} ({link.get('for-s', 0):.0f} s)"
    if link.get("state") != "up":
        text += (f", {link.get('failed-attempts', 0)} failed login(s), next in {link.get('next-delay-s', 0):.1f} s, "
                 f"{link.get('held-commands', 0)} command(s) held; last error: {link.get('error') or '-'}")
    return text
