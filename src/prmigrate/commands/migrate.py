"""``prmigrate migrate``: live-migrate a device between host daemons.

    prmigrate migrate --host /tmp/hosta.sock --device vm1 --to 127.0.0.3:4444
    prmigrate migrate --host /tmp/hosta.sock --device vm1 --cancel
    prmigrate migrate --host /tmp/hosta.sock --device vm1 --query

Starts the migration on the source daemon's control socket, prints each
state change as it happens, blocks until the end and prints the timings
(total, guest pause, PR takeover, backend PR round trips inside the pause).

Exit status: 0 the device runs on the destination; 1 it failed and stayed on
the source (the reason is printed); 3 the outcome is in doubt or the guest
is held (see the daemon's log), or the device runs on the destination but
the source could not record the move in its state directory; 2 usage or
control errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DOUBT = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, metavar="SOCKET", help="source daemon's control socket")
    parser.add_argument("--device", required=True, help="device name")
    parser.add_argument("--to", metavar="HOST:PORT", help="destination daemon's --migrate-listen address")
    parser.add_argument("--strategy", default="prmigrate", choices=("prmigrate", "dest-preempt", "qemu"),
                        help="how the reservation moves (qemu: QEMU 11's REGISTER+PREEMPT in the pause)")
    parser.add_argument("--frontend", metavar="HOST:PORT", default=None,
                        help="portal the guest is redirected to (default: the destination's own)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up waiting after this many seconds")
    parser.add_argument("--cancel", action="store_true", help="cancel the device's running migration")
    parser.add_argument("--query", action="store_true", help="print the device's last migration and exit")
    parser.add_argument("--json", action="store_true", help="print the final query-migrate record as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f} ms"


def format_timings(t: dict[str, Any]) -> str:
    lines = [
        f"  total:            {_ms(t.get('total_s'))}",
        f"  guest pause:      {_ms(t.get('pause_s'))}",
        f"  PR takeover:      {_ms(t.get('takeover_s'))}",
        f"  PR round trips in the pause: {t.get('round_trips_in_pause', 0)}",
    ]
    if t.get("peer_takeover_us") is not None:
        lines.append(f"  destination's PREEMPT phase: {t['peer_takeover_us'] / 1000:.2f} ms")
    return "\n".join(lines)


def exit_code(record: dict[str, Any]) -> int:
    if record.get("success") and record.get("unrecorded"):
        return EXIT_DOUBT  # runs on the destination; the source would not redirect after a restart
    if record.get("success"):
        return EXIT_OK
    if record.get("status") == "rolled_back":
        return EXIT_FAILED
    return EXIT_DOUBT


async def _main(args: argparse.Namespace) -> int:
    from ..host.control import CommandError, control_call

    if args.query or args.cancel:
        try:
            if args.cancel:
                ans = await control_call(args.host, "migrate-cancel", {"device": args.device})
                print("cancelled" if ans.get("cancelled") else "nothing to cancel (finished or past the point of no return)")
                return EXIT_OK
            (rec,) = await control_call(args.host, "query-migrate", {"device": args.device})
        except (CommandError, OSError) as e:
            print(f"prmigrate migrate: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps(rec, indent=2))
        return EXIT_OK
    if not args.to:
        print("prmigrate migrate: --to HOST:PORT is required", file=sys.stderr)
        return EXIT_USAGE

    # Subscribe first so that no state change is missed.
    try:
        reader, writer = await asyncio.open_unix_connection(args.host, limit=1 << 20)
        await reader.readline()  # greeting
        writer.write(b'{"execute": "subscribe"}\n')
        await writer.drain()
        await reader.readline()  # {"return": {}}: subscribed from here on
    except OSError as e:
        print(f"prmigrate migrate: cannot reach {args.host}: {e}", file=sys.stderr)
        return EXIT_USAGE
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "event" in msg:
                    await queue.put(msg)
        except (OSError, ValueError):
            pass
        await queue.put(None)

    pumping = asyncio.ensure_future(pump())
    try:
        arguments = {"device": args.device, "to": args.to, "strategy": args.strategy}
        if args.frontend:
            arguments["frontend"] = args.frontend
        try:
            started = await control_call(args.host, "migrate", arguments)
        except (CommandError, OSError) as e:
            print(f"prmigrate migrate: {e}", file=sys.stderr)
            return EXIT_FAILED if isinstance(e, CommandError) and e.cls == "GenericError" else EXIT_USAGE
        mid = started["id"]
        if not args.quiet:
            print(f"migrating {args.device} to {args.to} (migration {mid}, strategy {args.strategy})", flush=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                print(f"prmigrate migrate: no outcome after {args.timeout:g} s", file=sys.stderr)
                return EXIT_DOUBT
            try:
                ev = await asyncio.wait_for(queue.get(), min(left, 1.0))
            except TimeoutError:
                ev = {}
            if ev is None:  # event stream ended: the daemon went away
                print("prmigrate migrate: lost the source daemon's control socket", file=sys.stderr)
                return EXIT_DOUBT
            data = ev.get("data", {}) if ev else {}
            if ev and ev.get("event") == "MIGRATION" and data.get("id") == mid:
                if not args.quiet and data.get("role") == "source":
                    print(f"  {data.get('status')}", flush=True)
                if not data.get("finished") or data.get("role") != "source":
                    continue
            elif ev:
                continue
            try:
                (rec,) = await control_call(args.host, "query-migrate", {"device": args.device})
            except (CommandError, OSError) as e:
                print(f"prmigrate migrate: {e}", file=sys.stderr)
                return EXIT_DOUBT
            if rec.get("id") != mid or not rec.get("finished"):
                continue
            return _report(args, rec)
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        writer.close()


def _report(args: argparse.Namespace, rec: dict[str, Any]) -> int:
    code = exit_code(rec)
    if args.json:
        print(json.dumps(rec, indent=2))
    elif code == EXIT_OK:
        print(f"{args.device} now runs on {rec.get('peer')}")
    elif rec.get("success") and rec.get("unrecorded"):
        print(f"{args.device} now runs on {rec.get('peer')}, but the source could not record the move "
              f"({rec['unrecorded']}): restarted before the record is written, it would serve "
              f"{args.device} again (see `prmigrate host --status`)")
    elif code == EXIT_FAILED:
        print(f"migration failed, {args.device} stays on the source: {rec.get('reason')}")
    else:
        print(f"migration ended {rec.get('status')}: {rec.get('reason')}; "
              f"the guest is held on the source until the outcome is known")
    if not args.json:
        print("timings:")
        print(format_timings(rec.get("timings", {})))
    return code


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
