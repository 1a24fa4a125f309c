"""``prmigrate target``: serve file-backed logical units over iSCSI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from ..aio import loop_options_error, run_loop

log = logging.getLogger("prmigrate.target")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    return int(t[: len(t) - len(unit)]) * _UNITS[unit]


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_lun(text: str) -> tuple[int, Path]:
    num, eq, path = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"--lun wants N=PATH, got {text!r}")
    return int(num), Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=parse_listen, action="append", default=None,
                        help="HOST:PORT to listen on (repeatable; default 127.0.0.1:3260)")
    parser.add_argument("--iqn", required=True, help="target node name")
    parser.add_argument("--lun", type=parse_lun, action="append", required=True, metavar="N=PATH",
                        help="logical unit N backed by the file PATH (created when missing)")
    parser.add_argument("--size", type=parse_size, default=None, help="size of images created (e.g. 256M)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where PR state is persisted (APTPL)")
    parser.add_argument("--alias", default=None, help="TargetAlias")
    parser.add_argument("--tpgt", type=int, default=1, help="target portal group tag")
    parser.add_argument("--acl", action="append", default=None, metavar="INITIATOR_IQN",
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


def _build(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..iscsi.target import ChapConfig, IscsiTarget, TargetNode, TargetSettings
    from ..lun.types import LogicalUnitLike
    from ..lun.unit import LogicalUnit

    if (args.chap_user is None) != (args.chap_secret is None):
        raise SystemExit("--chap-user and --chap-secret go together")
    if (args.mutual_user is None) != (args.mutual_secret is None):
        raise SystemExit("--mutual-user and --mutual-secret go together")
    if args.mutual_user and not args.chap_user:
        raise SystemExit("mutual CHAP needs --chap-user/--chap-secret")
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    luns: dict[int, LogicalUnitLike] = {}
    for num, path in args.lun:
        if num in luns:
            raise SystemExit(f"LUN {num} given twice")
        size = args.size
        if not path.exists() and size is None:
            raise SystemExit(f"{path} does not exist: give --size to create it")
        try:
            luns[num] = LogicalUnit(path, size, lun=num, name=f"{args.iqn}/{num}", state_dir=args.state_dir,
                                    atomic_unit=args.atomic_unit)
        except ValueError as e:
            raise SystemExit(f"LUN {num}: {e}") from None
    # EXTENDED COPY between the LUs of the node: each LU's copy manager finds
    # the others by their NAA designators (lun/unit.py copy_peers).
    def peers() -> list[LogicalUnit]:
        return [lu for lu in luns.values() if isinstance(lu, LogicalUnit)]

    for lu in peers():
        lu.copy_peers = peers
    chap = None
    if args.chap_user:
        chap = ChapConfig(args.chap_user, args.chap_secret, args.mutual_user, args.mutual_secret)
    node = TargetNode(args.iqn, luns, set(args.acl) if args.acl else None, chap, args.tpgt, args.alias)
    digests = {"allow": ("None", "CRC32C"), "require": ("CRC32C",), "off": ("None",)}[args.digests]
    settings = TargetSettings(max_recv_data_segment_length=args.max_recv, header_digest=digests, data_digest=digests)
    return IscsiTarget([node], settings, keepalive=args.keepalive), luns


async def _serve(args: argparse.Namespace) -> int:
    metrics = metrics_at = None
    if args.metrics:
        from ..metrics import MetricsError, parse_metrics_address, serve_target

        try:
            metrics_at = parse_metrics_address(args.metrics)
        except MetricsError as e:
            log.error("--metrics: %s", e)
            return 2
    target, luns = _build(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for host, port in args.listen or [("127.0.0.1", 3260)]:
            for h, p in await target.start(host, port):
                log.info("serving %s on %s:%d (%d LUN%s)", args.iqn, h, p, len(luns), "" if len(luns) == 1 else "s")
        if metrics_at is not None:
            try:
                metrics = serve_target(target, *metrics_at)
            except MetricsError as e:
                log.error("--metrics: %s", e)
                return 1
        await stop.wait()
        log.info("stopping")
    finally:
        if metrics is not None:
            metrics.close()
        await target.close()
        for lu in luns.values():
            close = getattr(lu, "close", None)
            if close is not None:
                close()
    return 0


def run(args: argparse.Namespace) -> int:
    error = loop_options_error(args.uvloop, args.poll_us)
    if error is not None:
        raise SystemExit(f"--poll-us: {error}")
    return run_loop(_serve(args), use_uvloop=args.uvloop, poll_us=args.poll_us)
