"""The ``prmigrate`` command line.

Each subcommand lives in ``prmigrate.commands.<name>`` and offers
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen
subcommand's module is imported: ``prmigrate migrate`` runs inside a VM
migration's switchover pause when an orchestrator calls it, so start-up
time is guest downtime (benchmarks/bench_startup.py measures it).

Errors reach the user as one line and an exit status, never a traceback:
a closed stdout (``prmigrate ... | head``) ends the process quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__

PROG = "prmigrate"
DESCRIPTION = ("Live migration of SCSI-3 persistent reservations with the virtual "
               "devices that hold them.")

# name -> one-line summary. The order is the order of the help.
COMMANDS: dict[str, str] = {
    "target": "shared storage: serve file-backed logical units over iSCSI",
    "host": "host daemon: passthrough devices for guests",
    "migrate": "live-migrate a device between host daemons",
    "device": "add, delete or list a running host daemon's devices",
    "pr": "persistent reservations on any iscsi:// URL, sg_persist style",
    "demo": "end-to-end demonstration on the embedded target",
}

EPILOG = """\
Run 'prmigrate COMMAND --help' for a command's options (or 'man prmigrate-COMMAND').

Exit status: 0 success; 2 usage error (prmigrate pr follows sg3_utils
instead: 1); otherwise as each command's help states; 130 interrupted.
"""

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with ``usage_status``
    (sg3_utils' tools exit 1 on a syntax error, argparse 2)."""

    usage_status = EXIT_USAGE

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")


def _verbose_argument(p: argparse.ArgumentParser, default: Any) -> None:
    # -v is accepted before and after the subcommand.
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more log output (repeat for debug)")


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: the first word that is not an option
    (the top-level parser has no options that take a value)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The argument parser. With ``full`` every subcommand's options are
    added (for man pages and shell completion); otherwise only ``only``'s,
    so that nothing else is imported."""
    import importlib

    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _verbose_argument(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser, title="commands")
    for name, summary in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if not (full or name == only):
            continue
        mod = importlib.import_module(f"prmigrate.commands.{name}")
        mod.add_arguments(p)
        _verbose_argument(p, argparse.SUPPRESS)
        p.set_defaults(_module=mod, _parser=p)
    return parser


def _quiet_broken_pipe() -> None:
    """stdout's reader went away (``| head``): exit without a traceback, and
    without Python's second complaint when it flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen(words))
    args, extra = parser.parse_known_args(words)
    if extra:  # reported by the subcommand's parser, with its usage and exit status
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    import logging

    level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 0


def entry() -> None:
    """The console script: ``main`` with a clean exit on a closed pipe."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    entry()
