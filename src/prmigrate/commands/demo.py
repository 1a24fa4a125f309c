"""``prmigrate demo``: live-migrate a device and its guest's reservation, end to end.

    prmigrate demo [--quick] [--json] [--workdir DIR] [--keep] [--type TYPE]
    prmigrate demo --vm [--json] [--workdir DIR] [--keep]

Starts a shared target (127.0.0.1), host daemons A (127.0.0.2) and B
(127.0.0.3) and a guest that registers a key, reserves the LUN and writes
verifiable blocks without pause; moves the device A -> B -> A with
migrate-pr on (machine pc-q35-11.0), then again with migrate-pr off
(pc-q35-10.2) for contrast; prints what the shared target shows after each
move. Every process it starts is stopped before it exits (also on Ctrl-C).

``--vm`` runs the VM scenario instead (prmigrate/demo/vm_scenario.py): a
QEMU VM under TCG (the guest of scripts/build-guest.sh, which installs
QEMU and builds the guest when missing) whose disk is A's frontend LUN
through scsi-block, live-migrated by QEMU itself (QMP migrate) A -> B ->
A, a migration cancelled before its switchover, A -> B again, then fenced
by another node; the destination's incoming device pulls the device and
its reservation on the VM's first command there.

Exit status: 0 when every check passed, 1 when one failed (a lost write
included), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from ..scsi.constants import PrType
from ..scsi.vocabulary import TYPE_CHOICES, PrTypeError, parse_pr_type

# The older spellings of --type (still accepted: the vocabulary takes them).
TYPES = {
    "we": PrType.WRITE_EXCLUSIVE,
    "ea": PrType.EXCLUSIVE_ACCESS,
    "we-ro": PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    "ea-ro": PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
    "we-ar": PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    "ea-ar": PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
}


def parse_type(text: str) -> PrType:
    """A reservation type in any of sg_persist's spellings (scsi/vocabulary.py)."""
    try:
        t = parse_pr_type(text)
    except PrTypeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    assert isinstance(t, PrType)
    return t


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help="put images, sockets, state and logs here (default: a temporary "
                             "directory, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--quick", action="store_true", help="shorter write phases")
    parser.add_argument("--vm", action="store_true",
                        help="the VM scenario: a QEMU VM live-migrated by QEMU, its reservation pulled along "
                             "(installs QEMU and builds the test guest when missing)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--type", type=parse_type, default=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                        metavar="TYPE",
                        help=f"the guest's reservation type: {TYPE_CHOICES} (also we-ro etc.; "
                             "default 5, WE_RO: Write Exclusive, registrants only, as fence_scsi uses)")


async def _main(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    from ..demo.scenario import run_demo

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # clean up as on Ctrl-C
    if args.vm:
        from ..demo.vm_scenario import run_vm_demo

        return await run_vm_demo(workdir=args.workdir, keep=args.keep)
    return await run_demo(workdir=args.workdir, keep=args.keep, quick=args.quick,
                          rtype=args.type)


def run(args: argparse.Namespace) -> int:
    from ..demo.report import render

    if not args.verbose:
        # The report is the output. The guest's initiator warns when the source
        # asks it to log out: that is the move working, and the report says so.
        # (Handler level, not logger level: the guest still hears its
        # initiator's INFO lines to build its timeline.)
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.ERROR)
    try:
        report = asyncio.run(_main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("prmigrate demo: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        if args.vm:
            from ..demo.vm_scenario import render as render_vm

            print(render_vm(report))
        else:
            print(render(report))
    return 0 if report.get("ok") else 1
