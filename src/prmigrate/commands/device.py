"""``prmigrate device``: add, delete and list a running host daemon's devices.

    prmigrate device add --host /tmp/hosta.sock name=vm2,backend=iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/1
    prmigrate device del --host /tmp/hosta.sock vm2 [--force]
    prmigrate device list --host /tmp/hosta.sock [--json]

``add`` takes the ``--device`` spec of ``prmigrate host`` and sends its keys
as the arguments of the control command ``device-add`` (``lun`` as an
integer, ``migrate-pr`` as a boolean, ``guests`` as a list, the other keys
as strings, so a key added to the spec later needs nothing here). The
daemon records the device under its state directory: it is served again
after a restart until ``del`` removes it. ``del`` is refused while guests
are logged in or the device is migrating, unless ``--force``.

Exit status: 0 done, 1 refused by the daemon, 2 usage or daemon unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("add", "add a device (the --device spec)"),
                            ("del", "delete a device"),
                            ("list", "list the devices")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        # --control as for migrate and host --status; --host is the spelling
        # orchestrators were first given, kept as an alias
        p.add_argument("--control", "--host", dest="host", required=True, metavar="SOCKET",
                       help="the host daemon's control socket (--host: the same)")
        if name == "add":
            p.add_argument("spec", metavar="SPEC", help="name=...,backend=iscsi://...[,key=value...]")
        elif name == "del":
            p.add_argument("device", metavar="NAME", help="the device's name (name= of its spec)")
            p.add_argument("--force", action="store_true",
                           help="delete even while guests are logged in or it migrates")
        else:
            p.add_argument("--json", action="store_true", help="print query-devices as JSON")


def spec_arguments(spec: str) -> dict[str, Any]:
    """A ``--device`` spec as ``device-add`` arguments; ``ConfigError`` when
    the spec is not valid (checked here first, for a message at once)."""
    from ..device.config import ConfigError, parse_device_spec, split_spec
    from ..device.machine import MachineError, parse_bool

    parse_device_spec(spec)
    out: dict[str, Any] = {}
    for key, value in split_spec(spec):
        if key == "lun":
            out[key] = int(value)
        elif key == "migrate-pr":
            try:
                out[key] = parse_bool(value, key)
            except MachineError as e:
                raise ConfigError(str(e)) from e
        elif key == "guests":
            out[key] = [g.strip() for g in value.split("+")]
        elif key == "backend" and key in out:  # one URL per path
            prev = out[key]
            out[key] = [*(prev if isinstance(prev, list) else [prev]), value]
        else:
            out[key] = value
    return out


def format_devices(devices: list[dict[str, Any]], moved: dict[str, str]) -> str:
    lines = []
    for d in devices:
        sessions = d.get("frontend", {}).get("sessions", [])
        lines.append(
            f"{d['name']}: backend {d['properties']['backend']}, node {d['frontend']['node']}, "
            f"{len(sessions)} guest session(s)"
            f"{', added at run time' if d.get('added-at-run-time') else ''}"
            f"{', HELD (migrating)' if d.get('held') else ''}"
            f"{', incoming from ' + str(d['incoming-from']) if d.get('incoming-from') else ''}"
        )
    lines += [f"{name}: moved to {where}" for name, where in sorted(moved.items())]
    return "\n".join(lines) or "no devices"


async def _main(args: argparse.Namespace) -> int:
    from ..device.config import ConfigError
    from ..host.control import CommandError, control_call

    try:
        if args.action == "add":
            try:
                arguments = spec_arguments(args.spec)
            except ConfigError as e:
                print(f"prmigrate device add: {e}", file=sys.stderr)
                return EXIT_USAGE
            ans = await control_call(args.host, "device-add", arguments, timeout=60)
            print(f"added {ans['device']}: " + ", ".join(ans.get("urls", [])) +
                  ("" if ans.get("persistent") else " (not recorded: the daemon has no state directory)"))
        elif args.action == "del":
            arguments = {"device": args.device}
            if args.force:
                arguments["force"] = True
            ans = await control_call(args.host, "device-del", arguments, timeout=60)
            print(f"deleted {args.device}" + (" (it is in the daemon's configuration file: it comes back "
                                              "at the next start unless removed there)"
                                              if ans.get("configured") else ""))
        else:
            devices = await control_call(args.host, "query-devices", timeout=10)
            host = await control_call(args.host, "query-host", timeout=10)
            if args.json:
                print(json.dumps(devices, indent=2, sort_keys=True))
            else:
                print(format_devices(devices, host.get("moved", {})))
    except CommandError as e:
        print(f"prmigrate device {args.action}: {e.desc}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, TimeoutError) as e:
        print(f"prmigrate device {args.action}: {args.host}: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
