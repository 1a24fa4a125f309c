"""``prmigrate target``: serve file-backed logical units over iSCSI.

Each ``--listen HOST:PORT[,TPGT]`` is a portal of its own target portal
group (tags 1, 2, ... unless given), i.e. its own target port of every LU
(``iscsi/target.py``).

    prmigrate target --listen 127.0.0.1:3260 --iqn iqn.2026-11.org.prmigrate:shared \\
      --lun 0=/tmp/shared.img --size 256M --state-dir /tmp/prstate

The listening sockets are bound before any image file is created, so an
address already in use leaves nothing behind.

Exit status: 0 stopped by SIGINT/SIGTERM; 1 cannot start (address in use,
image missing or unusable, option combination refused); 2 usage error.

With ``--control PATH`` the running target takes LUN and ACL changes over
QMP (``prmigrate.target_control``), kept in ``--config target.toml``;
``prmigrate target lun add|del|list ... --control PATH`` is its client.

With ``--metrics ADDR:PORT`` the target serves Prometheus metrics there
(``prmigrate.metrics``: per-LUN commands, bytes, latency, statuses,
reservation conflicts, PR OUT; bound before anything is created too).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from . import _args

log = logging.getLogger("prmigrate.target")

EXIT_OK, EXIT_START, EXIT_USAGE = 0, 1, 2

parse_size = _args.size
parse_listen = _args.listen_address


class StartError(Exception):
    """The target cannot start; the message says why."""


def parse_portal(text: str) -> tuple[str, int, int | None]:
    """``HOST:PORT`` or ``HOST:PORT,TPGT`` (the SendTargets form, RFC 7143 13.8)."""
    addr, comma, tag = text.rpartition(",")
    if not comma:
        addr = text
    try:
        host, port = parse_listen(addr)
        tpgt = int(tag) if comma else None
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"not an address: {text!r} (HOST:PORT[,TPGT] with PORT and TPGT 0-65535, e.g. 127.0.0.1:3260,1)") from None
    if not 0 <= port <= 0xFFFF or (tpgt is not None and not 0 <= tpgt <= 0xFFFF):
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (PORT and TPGT are 0-65535)")
    return host, port, tpgt


def portal_groups(listen: list[tuple[str, int, int | None]] | None, tpgt: int | None) -> list[tuple[str, int, int]]:
    """Each ``--listen`` with its portal group tag: the one it names, else its
    position (1, 2, ...); a single ``--listen`` takes ``--tpgt`` (default 1).
    Listen addresses with the same tag are portals of one group (one target port)."""
    portals = listen or [("127.0.0.1", 3260, None)]
    if tpgt is not None and len(portals) > 1:
        raise StartError("--tpgt goes with a single --listen: give each its tag as --listen HOST:PORT,TPGT")
    if len(portals) == 1:
        host, port, tag = portals[0]
        return [(host, port, tag if tag is not None else (tpgt if tpgt is not None else 1))]
    return [(host, port, tag if tag is not None else i) for i, (host, port, tag) in enumerate(portals, 1)]


def parse_lun(text: str) -> tuple[int, Path]:
    """``N=PATH``: logical unit number N (0-16383) backed by the file PATH."""
    num, eq, path = text.partition("=")
    if not eq or not num.strip().isdigit() or not path or int(num) > 0x3FFF:
        raise argparse.ArgumentTypeError(
            f"not a LUN: {text!r} (N=PATH with N 0-16383, e.g. 0=/tmp/shared.img)")
    return int(num), Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--listen", type=parse_portal, action="append", default=None, metavar="HOST:PORT[,TPGT]",
                        help="portal to listen on (repeatable; default 127.0.0.1:3260); each is its own "
                             "target portal group and target port (tags 1, 2, ... unless given)")
    parser.add_argument("words", nargs="*", metavar="lun add N PATH | lun del N | lun list | acl add|del IQN | "
                        "acl list | sessions",
                        help="with --control: change or ask a running target instead of starting one")
    parser.add_argument("--iqn", default=None, type=_args.iscsi_name, metavar="NAME",
                        help="target node name (iqn., eui. or naa. form, RFC 7143 4.2.7.2; "
                             "required unless --config names it)")
    parser.add_argument("--lun", type=parse_lun, action="append", default=None, metavar="N=PATH",
                        help="logical unit N backed by the file PATH (created when missing; "
                             "required unless --config names one)")
    parser.add_argument("--control", type=Path, default=None, metavar="PATH",
                        help="QMP socket for lun-add/lun-del/acl-add/acl-del/query-luns/query-sessions")
    parser.add_argument("--config", type=Path, default=None, metavar="TOML",
                        help="LUNs and ACL read at start and rewritten by every change made over --control")
    parser.add_argument("--json", action="store_true", help="client: print the QMP answer as JSON")
    parser.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                        help="size of images created (bytes, or with K, M, G, T: e.g. 256M)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where PR state is persisted (APTPL)")
    parser.add_argument("--alias", default=None, help="TargetAlias")
    parser.add_argument("--tpgt", type=int, default=None, help="target portal group tag of a single --listen (default 1)")
    parser.add_argument("--acl", action="append", default=None, metavar="INITIATOR_IQN",
                        type=_args.iscsi_name,
                        help="allow only these initiators (repeatable)")
    parser.add_argument("--chap-user", default=None)
    parser.add_argument("--chap-secret", default=None)
    parser.add_argument("--mutual-user", default=None)
    parser.add_argument("--mutual-secret", default=None)
    parser.add_argument("--keepalive", type=float, default=None, help="NOP-In interval in seconds")
    parser.add_argument("--max-recv", type=int, default=262144, help="our MaxRecvDataSegmentLength")
    parser.add_argument("--digests", choices=("allow", "require", "off"), default="allow",
                        help="CRC32C header/data digests: accept when offered, insist, or refuse")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--poll-us", type=int, default=0, metavar="US",
                        help="busy-poll up to US microseconds for the next PDU before sleeping "
                             "(lower latency at low queue depth for CPU; asyncio loop only; default 0: off)")
    parser.add_argument("--metrics", default=None, metavar="ADDR:PORT",
                        help="serve Prometheus metrics over HTTP here (default: off)")
    parser.add_argument("--atomic-unit", type=int, default=1, metavar="BLOCKS",
                        help="WRITE ATOMIC alignment and length granularity in blocks (default 1: none)")


def _build(args: argparse.Namespace, created: list[Path]) -> tuple[Any, dict[int, Any]]:
    """The target and its logical units; image files this creates are
    appended to ``created`` (removed again when the target cannot start)."""
    from ..iscsi.target import ChapConfig, IscsiTarget, TargetNode, TargetSettings
    from ..lun.types import LogicalUnitLike
    from ..lun.unit import LogicalUnit

    luns: dict[int, LogicalUnitLike] = {}
    for num, path in args.lun:
        if num in luns:
            raise StartError(f"LUN {num} given twice")
        new = not path.exists()
        try:
            luns[num] = _make_lu(args, num, path, args.size)
        except (ValueError, OSError) as e:
            raise StartError(f"LUN {num} ({path}): {e}") from None
        finally:
            if new and path.exists():
                created.append(path)
    # EXTENDED COPY between the LUs of the node: each LU's copy manager finds
    # the others by their NAA designators (lun/unit.py copy_peers).
    def peers() -> list[LogicalUnit]:
        return [lu for lu in luns.values() if isinstance(lu, LogicalUnit)]

    for lu in peers():
        lu.copy_peers = peers
    chap = None
    if args.chap_user:
        chap = ChapConfig(args.chap_user, args.chap_secret, args.mutual_user, args.mutual_secret)
    node = TargetNode(args.iqn, luns, set(args.acl) if args.acl is not None else None, chap, args.portals[0][2],
                      args.alias)
    digests = {"allow": ("None", "CRC32C"), "require": ("CRC32C",), "off": ("None",)}[args.digests]
    settings = TargetSettings(max_recv_data_segment_length=args.max_recv, header_digest=digests, data_digest=digests)
    return IscsiTarget([node], settings, keepalive=args.keepalive), luns


def _reload(args: argparse.Namespace, control: Any) -> None:
    """SIGHUP: reopen the log files and, with ``--config``, apply the file
    again (``TargetControl.reload``: LUNs and ACL changed as the QMP commands
    change them; the other LUNs' sessions and reservations untouched)."""
    from ..logfiles import reopen_log_files

    reopen_log_files()
    log.info("SIGHUP: log files reopened")
    if control is not None and args.config is not None:
        for line in control.reload(args.config) or ["nothing changed"]:
            log.info("SIGHUP: %s: %s", args.config, line)


def _make_lu(args: argparse.Namespace, num: int, path: Path, size: int | None):  # type: ignore[no-untyped-def]
    from ..lun.unit import LogicalUnit

    return LogicalUnit(path, size, lun=num, name=f"{args.iqn}/{num}", state_dir=args.state_dir,
                       atomic_unit=args.atomic_unit)


def _configure(args: argparse.Namespace) -> None:
    """--config: the file's LUNs and ACL merged with the flags' (and saved back)."""
    from ..target_control import ConfigError, TargetConfig, merge

    if args.config is None:
        if args.iqn is None or not args.lun:
            raise StartError("--iqn and --lun are required (or --config with them)")
        return
    try:
        cfg = merge(TargetConfig.load(args.config), args.iqn, args.lun or [], args.acl)
    except ConfigError as e:
        raise StartError(f"--config: {e}") from None
    if cfg.iqn is None or not cfg.luns:
        raise StartError("--config: no iqn, or no LUN (give --iqn / --lun)")
    try:
        cfg.save(args.config)
    except OSError as e:
        raise StartError(f"--config: cannot write {args.config}: {e}") from None
    args.iqn, args.lun = cfg.iqn, sorted(cfg.luns.items())
    args.acl = None if cfg.acl is None else sorted(cfg.acl)


async def _start_control(args: argparse.Namespace, target, luns):  # type: ignore[no-untyped-def]
    """(the QMP socket of --control or None, the LUN and ACL control or None):
    the control exists with --control or --config (SIGHUP applies the file
    through it)."""
    if args.control is None and args.config is None:
        return None, None
    from .. import __version__
    from ..qmp import QmpServer
    from ..target_control import TargetControl

    server = QmpServer(args.control, __version__) if args.control is not None else None
    peers = next((lu.copy_peers for lu in luns.values() if hasattr(lu, "copy_peers")), None)

    def make_lu(num: int, path: Path, size: int | None):  # type: ignore[no-untyped-def]
        lu = _make_lu(args, num, path, size)
        if peers is not None:
            lu.copy_peers = peers  # EXTENDED COPY sees the LUs added at run time too
        return lu

    control = TargetControl(target, args.iqn, luns, dict(args.lun), make_lu, args.config,
                            emit=(lambda name, data: server.event(name, data)) if server is not None else None)
    if server is not None:
        control.register(server)
        await server.start()
    return server, control


def _check_options(args: argparse.Namespace) -> None:
    """Refusals that need no file or socket."""
    from ..aio import loop_options_error

    if (args.chap_user is None) != (args.chap_secret is None):
        raise StartError("--chap-user and --chap-secret go together")
    if (args.mutual_user is None) != (args.mutual_secret is None):
        raise StartError("--mutual-user and --mutual-secret go together")
    if args.mutual_user and not args.chap_user:
        raise StartError("mutual CHAP needs --chap-user/--chap-secret")
    error = loop_options_error(args.uvloop, args.poll_us)
    if error is not None:
        raise StartError(f"--poll-us: {error}")
    for _, path in args.lun:
        if not path.exists() and args.size is None:
            raise StartError(f"{path} does not exist: give --size to create it")


def _claim(addresses: list[tuple[str, int]]) -> list[socket.socket]:
    """Bind each listening address once before anything is created, so that
    an address in use is refused while nothing exists yet (the sockets are
    closed again right before the target listens there for real)."""
    held: list[socket.socket] = []
    try:
        for host, port in addresses:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except socket.gaierror as e:
                raise StartError(f"cannot listen on {host}:{port}: {e.strerror}") from None
            for family, kind, proto, _, addr in infos:
                s = socket.socket(family, kind, proto)
                held.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    # bind alone fails while another socket listens there; not
                    # listening, it accepts nobody in the meantime
                    s.bind(addr)
                except OSError as e:
                    raise StartError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


async def _serve(args: argparse.Namespace) -> int:
    from ..lock import DaemonLocks, LockError

    # One daemon per state directory (and control socket): the lock comes
    # before any LUN opens its APTPL state.
    locks = DaemonLocks(args.state_dir, args.control)
    try:
        locks.acquire()
    except (LockError, OSError) as e:
        raise StartError(str(e)) from None
    try:
        return await _serve_locked(args)
    finally:
        locks.release()


async def _serve_locked(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from ..sdnotify import Notifier

    addresses = [(host, port) for host, port, _ in args.portals]
    # an ephemeral port is never in use; the metrics port is never ephemeral
    claimed = [] if any(port == 0 for _, port in addresses) else list(addresses)
    if args.metrics_at:
        claimed.append(args.metrics_at)
    probes = _claim(claimed)
    created: list[Path] = []
    target = None
    control = None
    lun_control = None
    metrics = None
    luns: dict[int, Any] = {}
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    try:
        try:
            target, luns = _build(args, created)
        except OSError as e:
            raise StartError(str(e)) from None
        finally:
            for s in probes:
                s.close()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def on_hup() -> None:
            notifier.reloading()
            try:
                _reload(args, lun_control)
            finally:
                notifier.send(ready=1)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for host, port, tpgt in args.portals:
            try:
                bound = await target.start(host, port, tpgt=tpgt)
            except OSError as e:
                raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
            for h, p in bound:
                log.info("serving %s on %s:%d,%d (%d LUN%s)", args.iqn, h, p, tpgt, len(luns),
                         "" if len(luns) == 1 else "s")
        if args.metrics_at:
            from ..metrics import MetricsError, serve_target

            try:
                metrics = serve_target(target, *args.metrics_at)
            except MetricsError as e:
                raise StartError(str(e)) from None
        control, lun_control = await _start_control(args, target, luns)
        created.clear()  # serving: the images are the user's now
        notifier.ready(f"serving {args.iqn} ({len(luns)} LUN(s))")
        await stop.wait()
        log.info("stopping")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await notifier.stopping()
        if control is not None:
            await control.close()
        if metrics is not None:
            metrics.close()
        if target is not None:
            await target.close()
        for lu in luns.values():
            close = getattr(lu, "close", None)
            if close is not None:
                close()
        for path in created:
            path.unlink(missing_ok=True)
    return EXIT_OK


def _client(args: argparse.Namespace) -> int:
    """``prmigrate target lun add|del|list ... --control PATH``."""
    import asyncio
    import json

    from ..qmp import QmpError, qmp_call
    from ..target_control import cli_request, format_answer

    if args.control is None:
        raise SystemExit(f"prmigrate target {' '.join(args.words)}: --control PATH is required")
    try:
        command, arguments = cli_request(args.words, args.size)
    except ValueError as e:
        raise SystemExit(f"usage: {e}") from None
    try:
        result = asyncio.run(qmp_call(args.control, command, arguments))
    except QmpError as e:
        print(f"{command}: {e.cls}: {e.desc}", file=sys.stderr)
        return 1
    except (TimeoutError, OSError) as e:
        print(f"cannot reach the target at {args.control}: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1) if args.json else format_answer(command, result)
    if text:
        print(text)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.words:
        return _client(args)
    from ..aio import run_loop

    args.metrics_at = None  # (host, port) of --metrics
    if args.metrics:
        from ..metrics import MetricsError, parse_metrics_address

        try:
            args.metrics_at = parse_metrics_address(args.metrics)
        except MetricsError as e:
            print(f"prmigrate target: --metrics: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        _configure(args)
        args.portals = portal_groups(args.listen, args.tpgt)
        _check_options(args)
        if args.state_dir is not None:
            args.state_dir.mkdir(parents=True, exist_ok=True)
        return run_loop(_serve(args), use_uvloop=args.uvloop, poll_us=args.poll_us)
    except StartError as e:
        print(f"prmigrate target: {e}", file=sys.stderr)
        return EXIT_START
