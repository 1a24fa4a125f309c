"""``prmigrate migrate``: live-migrate a device between host daemons.

    prmigrate migrate --control /tmp/hosta.sock --name vm1 --to 127.0.0.3:4444
    prmigrate migrate --control /tmp/hosta.sock --name vm1 --cancel
    prmigrate migrate --control /tmp/hosta.sock --name vm1 --query
    prmigrate migrate --control /tmp/hosta.sock --all --to 127.0.0.3:4444
    prmigrate migrate --control /tmp/hosta.sock --name vm1 --name vm2 --to 127.0.0.3:4444

Starts the migration on the source daemon's control socket, prints each
state change with the time since the start, blocks until the end and
prints the timings (total, guest pause, PR takeover, backend PR round trips
inside the pause). ``--timeout`` bounds the whole wait: while the
destination cannot be reached (nothing has moved yet) the migration is
started again until then (not when the destination refused this host: the
cluster secret or its TLS certificate, which trying again does not change);
at the deadline a migration still connecting or setting up is cancelled (the
device stays on the source).

``--all`` or ``--name`` given more than once moves the devices as one
batch (one migration per device, each over its own channel, all from the
one daemon): every move sets up first (devices created on the destination,
logins, registrations), then the guests pause one after another
(``--pause-parallel``), so that no guest's pause carries another move's
setup. One line per device at the end; the exit status is the worst of
the moves'.

``--host`` is the old spelling of ``--control`` and still accepted.

Exit status: 0 the device runs on the destination; 1 it failed and stayed on
the source (the reason is printed); 3 the outcome is in doubt or the guest
is held (see the daemon's log), or the device runs on the destination but
the source could not record the move in its state directory; 2 usage or
control errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from . import _args

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DOUBT = 0, 1, 2, 3
# States in which nothing has moved: a failure there may simply be retried.
NOTHING_MOVED = ("idle", "connecting")
# The reason of a migration the destination refused (AbortReason.AUTHENTICATION:
# the cluster secret or the TLS certificate): trying again changes nothing.
REFUSED = "authentication"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--control", "--host", dest="control", required=True, metavar="SOCKET",
                        help="the source daemon's control socket (its --control PATH; "
                             "--host is the old spelling)")
    parser.add_argument("--name", "--device", dest="device", action="append", metavar="NAME",
                        help="the device's name (name= of the daemon's --device spec); "
                             "more than once: move them as one batch (--device: the old "
                             "spelling, still accepted)")
    parser.add_argument("--all", action="store_true",
                        help="move every device of the source daemon as one batch")
    parser.add_argument("--setup-parallel", type=int, default=None, metavar="N",
                        help="batch: moves setting up at once (default 16)")
    parser.add_argument("--pause-parallel", type=int, default=None, metavar="N",
                        help="batch: guests paused at once (default 1)")
    parser.add_argument("--to", metavar="HOST:PORT", type=_args.port_address,
                        help="destination daemon's --migrate-listen address")
    parser.add_argument("--strategy", default="prmigrate", choices=("prmigrate", "dest-preempt", "qemu"),
                        help="how the reservation moves (qemu: QEMU 11's REGISTER+PREEMPT in the pause)")
    parser.add_argument("--frontend", metavar="HOST:PORT", default=None, type=_args.port_address,
                        help="portal the guest is redirected to (default: the destination's own)")
    parser.add_argument("--timeout", type=_args.seconds, default=120.0, metavar="SECONDS",
                        help="give up waiting after this many seconds (default 120)")
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


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _query(args: argparse.Namespace) -> int:
    from ._control_client import ControlError, control_call

    try:
        if args.cancel:
            ans = control_call(args.control, "migrate-cancel", {"device": args.device})
            print("cancelled" if ans.get("cancelled")
                  else "nothing to cancel (finished or past the point of no return)")
            return EXIT_OK
        (rec,) = control_call(args.control, "query-migrate", {"device": args.device})
    except ControlError as e:
        print(f"prmigrate migrate: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(rec, indent=2))
    return EXIT_OK


def _main(args: argparse.Namespace) -> int:
    devices = args.device or []
    if args.all and devices:
        print("prmigrate migrate: --all and --name exclude each other", file=sys.stderr)
        return EXIT_USAGE
    if not args.all and not devices:
        print("prmigrate migrate: --name NAME or --all is required", file=sys.stderr)
        return EXIT_USAGE
    if (args.query or args.cancel) and (args.all or len(devices) > 1):
        print("prmigrate migrate: --query and --cancel take one --name", file=sys.stderr)
        return EXIT_USAGE
    if args.query or args.cancel:
        args.device = devices[0]
        return _query(args)
    if not args.to:
        print("prmigrate migrate: --to HOST:PORT is required", file=sys.stderr)
        return EXIT_USAGE
    if args.all or len(devices) > 1:
        return _main_batch(args, devices)
    args.device = devices[0]
    start = time.monotonic()
    deadline = start + args.timeout

    def stamp() -> str:
        return f"{(time.monotonic() - start) * 1000:9.1f} ms"

    arguments = {"device": args.device, "to": args.to, "strategy": args.strategy}
    if args.frontend:
        arguments["frontend"] = args.frontend

    def follow(events: Any) -> int:
        attempt = 0
        while True:
            attempt += 1
            started = _start(events, arguments)
            if isinstance(started, int):
                return started
            mid = started["id"]
            again = f", attempt {attempt}" if attempt > 1 else ""
            _say(args, f"migrating {args.device} to {args.to} (migration {mid}, "
                       f"strategy {args.strategy}{again})")
            rec = _follow(args, events, mid, deadline, stamp)
            if rec is None:
                return _give_up(args, events, mid)
            left_from = {str(h.get("from")).lower() for h in rec.get("history", []) if isinstance(h, dict)}
            nothing_moved = (not rec.get("success") and rec.get("status") == "rolled_back"
                             and left_from <= set(NOTHING_MOVED))
            refused = str(rec.get("reason") or "").startswith(REFUSED)
            if nothing_moved and not refused and deadline - time.monotonic() > 1.0:
                _say(args, f"{stamp()}  {args.to} not reachable ({_reason(rec)}); trying again")
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic() - 1.0)))
                continue
            return _report(args, rec)

    return _with_control(args, follow)


def _with_control(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """``body(connection)`` on an event connection to the source daemon's
    control socket: one that cannot be opened is a usage error (exit 2),
    one lost midway leaves the outcome in doubt (exit 3)."""
    from ._control_client import ControlConnection, ControlError

    try:
        events = ControlConnection(args.control)
    except ControlError as e:
        print(f"prmigrate migrate: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return body(events)
    except ControlError as e:
        print(f"prmigrate migrate: lost the source daemon's control socket: {e}", file=sys.stderr)
        return EXIT_DOUBT
    finally:
        events.close()


def _start(events: Any, arguments: dict[str, Any]) -> dict[str, Any] | int:
    """The ``migrate`` call: its answer, or the exit code of its refusal
    (a refused move exits 1, a malformed request 2)."""
    from ._control_client import ControlError

    try:
        return events.call("migrate", arguments)  # type: ignore[no-any-return]
    except ControlError as e:
        print(f"prmigrate migrate: {e}", file=sys.stderr)
        return EXIT_FAILED if e.cls == "GenericError" else EXIT_USAGE


def _main_batch(args: argparse.Namespace, devices: list[str]) -> int:
    """A batch: start it, follow every move, one line per device at the end."""
    start = time.monotonic()
    deadline = start + args.timeout
    arguments: dict[str, Any] = {"to": args.to, "strategy": args.strategy}
    arguments |= {"all": True} if args.all else {"devices": devices}
    if args.frontend:
        arguments["frontend"] = args.frontend
    for key in ("setup_parallel", "pause_parallel"):
        if getattr(args, key) is not None:
            arguments[key.replace("_", "-")] = getattr(args, key)

    def follow(events: Any) -> int:
        started = _start(events, arguments)
        if isinstance(started, int):
            return started
        ids = {m["id"]: m["device"] for m in started["migrations"]}
        _say(args, f"migrating {len(ids)} device(s) to {args.to} (batch {started['batch']}, "
                   f"strategy {args.strategy})")
        left = set(ids)
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            ev = events.next_event(min(wait, 1.0))
            if ev is None:
                continue
            data = ev.get("data", {})
            if ev.get("event") != "MIGRATION" or data.get("id") not in left or data.get("role") != "source":
                continue
            if data.get("finished"):
                left.discard(data["id"])
                _say(args, f"{(time.monotonic() - start) * 1000:9.1f} ms  {data.get('device')} "
                           f"{data.get('status')}")
        records = {r["id"]: r for r in events.call("query-migrate", {}) if r.get("id") in ids}
        code = EXIT_OK
        for mid in left:  # no outcome by the deadline: cancel what can still be
            ans = events.call("migrate-cancel", {"device": ids[mid]})
            print(f"prmigrate migrate: {ids[mid]}: no outcome after {args.timeout:g} s"
                  + (": cancelled, stays on the source" if ans.get("cancelled") else
                     ": past the point of no return, see the daemon's log"), file=sys.stderr)
            code = max(code, EXIT_FAILED if ans.get("cancelled") else EXIT_DOUBT)
        if args.json:
            print(json.dumps([records[m] for m in ids if m in records], indent=2))
        pauses = []
        for mid, name in ids.items():
            rec = records.get(mid)
            if rec is None or mid in left:
                continue
            rc = exit_code(rec)
            code = max(code, rc)
            pause = rec.get("timings", {}).get("pause_s")
            if pause is not None:
                pauses.append(pause)
            if not args.json:
                what = (f"now runs on {rec.get('peer')}" if rc == EXIT_OK else
                        f"failed, stays on the source: {_reason(rec)}" if rc == EXIT_FAILED else
                        f"ended {rec.get('status')}: {rec.get('reason')}")
                print(f"{name}: {what} (pause {_ms(pause)})")
        if not args.json:
            ok = sum(1 for m in ids if m in records and records[m].get("success"))
            worst = f", longest pause {_ms(max(pauses))}" if pauses else ""
            print(f"{ok} of {len(ids)} moved in {(time.monotonic() - start):.2f} s{worst}")
        return code

    return _with_control(args, follow)


def _follow(args: argparse.Namespace, events: Any, mid: str, deadline: float,
            stamp: Any) -> dict[str, Any] | None:
    """Progress lines until migration ``mid`` ends on the source: its
    query-migrate record, or None at the deadline."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ev = events.next_event(min(left, 1.0))
        if ev is not None:
            data = ev.get("data", {})
            if ev.get("event") != "MIGRATION" or data.get("id") != mid or data.get("role") != "source":
                continue
            _say(args, f"{stamp()}  {data.get('status')}")
            if not data.get("finished"):
                continue
        (rec,) = events.call("query-migrate", {"device": args.device})
        if rec.get("id") == mid and rec.get("finished"):
            return rec  # type: ignore[no-any-return]


def _give_up(args: argparse.Namespace, events: Any, mid: str) -> int:
    ans = events.call("migrate-cancel", {"device": args.device})
    if ans.get("cancelled"):
        print(f"prmigrate migrate: no outcome after {args.timeout:g} s: migration cancelled, "
              f"{args.device} stays on the source", file=sys.stderr)
        return EXIT_FAILED
    print(f"prmigrate migrate: no outcome after {args.timeout:g} s and past the point of no "
          f"return: see 'prmigrate migrate --query' and the daemon's log", file=sys.stderr)
    return EXIT_DOUBT


def _reason(rec: dict[str, Any]) -> str:
    """The record's reason as a sentence."""
    reason = str(rec.get("reason") or "unknown")
    if "TIMEOUT in CONNECTING" in reason:
        return "the destination did not answer within the daemon's connect timeout"
    return reason


def _report(args: argparse.Namespace, rec: dict[str, Any]) -> int:
    code = exit_code(rec)
    if args.json:
        print(json.dumps(rec, indent=2))
    elif code == EXIT_OK:
        print(f"{args.device} now runs on {rec.get('peer')}")
    elif rec.get("success") and rec.get("unrecorded"):
        print(f"{args.device} now runs on {rec.get('peer')}, but the source could not record the move "
              f"({rec['unrecorded']}): it writes it again until it works; until then its "
              f"migration marker stands for it (see `prmigrate host --status`)")
    elif code == EXIT_FAILED:
        print(f"migration failed, {args.device} stays on the source: {_reason(rec)}")
    else:
        print(f"migration ended {rec.get('status')}: {rec.get('reason')}; "
              f"the guest is held on the source until the outcome is known")
    if not args.json:
        print("timings:")
        print(format_timings(rec.get("timings", {})))
    return code


def run(args: argparse.Namespace) -> int:
    return _main(args)
