"""`prmigrate` command line: one subcommand per module in ``prmigrate.commands``.

Each command module offers ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "target": "shared storage: serve logical units over iSCSI",
    "host": "host daemon: passthrough devices for guests",
    "migrate": "live-migrate a device between host daemons",
    "device": "add, delete or list a running host daemon's devices",
    "pr": "persistent reservation tool for any iscsi:// URL",
    "demo": "end-to-end demonstration on the embedded target",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prmigrate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        try:
            mod = importlib.import_module(f"prmigrate.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"prmigrate.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
