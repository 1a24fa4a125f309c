"""A ``prmigrate target`` whose LUN refuses PERSISTENT RESERVE OUT PREEMPT
from one initiator name (RESERVATION CONFLICT): the backend of the
"backend refuses PREEMPT" fault, run as its own process.

    python -m tests.interop.refusing_target --listen H:P --iqn IQN --lun PATH --size 64M \\
        --refuse-preempt-from INITIATOR
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from prmigrate.commands.target import parse_listen, parse_size
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.types import Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrOutAction, Status


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=parse_listen, required=True)
    ap.add_argument("--iqn", required=True)
    ap.add_argument("--lun", type=Path, required=True)
    ap.add_argument("--size", type=parse_size, default=64 << 20)
    ap.add_argument("--refuse-preempt-from", required=True)
    args = ap.parse_args()
    refused = args.refuse_preempt_from.lower()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class Refusing(LogicalUnit):
        def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
            if (cdb[:1] == b"\x5f" and len(cdb) > 1 and cdb[1] & 0x1F == PrOutAction.PREEMPT
                    and nexus.initiator == refused):
                self.log.info("refusing PREEMPT from %s (fault injection)", nexus)
                return Result(Status.RESERVATION_CONFLICT)
            return super().execute(nexus, cdb, data_out)

    async def serve() -> None:
        lu = Refusing(args.lun, args.size, name=f"{args.iqn}/0")
        target = IscsiTarget([TargetNode(args.iqn, {0: lu})])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await target.start(*args.listen)
        await stop.wait()
        await target.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
