"""A ``prmigrate target`` whose LUN refuses PERSISTENT RESERVE OUT PREEMPT
from one initiator name (RESERVATION CONFLICT): the backend of the
"backend refuses PREEMPT" fault, run as its own process. With
``--without-register-and-move`` it is a backend that lacks PR OUT REGISTER
AND MOVE: REPORT SUPPORTED OPERATION CODES says 5Fh/07h is not supported
(SUPPORT 001b) and the service action is ILLEGAL REQUEST, INVALID FIELD IN
CDB.

    python -m tests.interop.refusing_target --listen H:P --iqn IQN --lun PATH --size 64M \\
        [--refuse-preempt-from INITIATOR] [--without-register-and-move]
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
from prmigrate.scsi.sense import CheckCondition, Sense


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=parse_listen, required=True)
    ap.add_argument("--iqn", required=True)
    ap.add_argument("--lun", type=Path, required=True)
    ap.add_argument("--size", type=parse_size, default=64 << 20)
    ap.add_argument("--refuse-preempt-from", default="")
    ap.add_argument("--without-register-and-move", action="store_true")
    args = ap.parse_args()
    refused = args.refuse_preempt_from.lower()
    no_move = args.without_register_and_move
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class Refusing(LogicalUnit):
        def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
            if (cdb[:1] == b"\x5f" and len(cdb) > 1 and cdb[1] & 0x1F == PrOutAction.PREEMPT
                    and nexus.initiator == refused):
                self.log.info("refusing PREEMPT from %s (fault injection)", nexus)
                return Result(Status.RESERVATION_CONFLICT)
            if no_move and cdb[:1] == b"\x5f" and len(cdb) > 1 and cdb[1] & 0x1F == PrOutAction.REGISTER_AND_MOVE:
                self.log.info("REGISTER AND MOVE from %s: not supported here", nexus)
                return Result(Status.CHECK_CONDITION, b"", CheckCondition(Sense.INVALID_FIELD_IN_CDB).encode(False))
            if no_move and cdb[:2] == b"\xa3\x0c" and len(cdb) >= 12 and cdb[2] & 0x07 in (2, 3) \
                    and cdb[3] == 0x5F and int.from_bytes(cdb[4:6], "big") == PrOutAction.REGISTER_AND_MOVE:
                return Result(Status.GOOD, bytes((0, 0x01, 0, 0))[: int.from_bytes(cdb[6:10], "big")])
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
