"""The migration's PR OUT commands on a device's backend nexuses.

``issue_ops`` carries out the machines' ``IssuePrOps`` action: each
``PrOp`` (``plan.py``) on the named guest's backend nexus, in order, stopping
at the first failure. RESERVATION CONFLICT on a ``conflict_ok`` op is
success; a ``probe`` op succeeds only with RESERVATION CONFLICT; a
transport error or a timeout is ``definite=False`` (the outcome on the
target is unknown).

The ops go through the device's one backend PR OUT port
(``PassthroughDevice.pr_out``) with ``Purpose.MIGRATION``: not journaled,
snooped or verified (the ops move the state the device already tracks, the
snapshot the stream carries; a snooped op would change that tracked state
under the migration, and the verification a snooped PREEMPT or RAIEK asks
for would cost a round trip inside the pause). Unit attentions they meet are
retried; the ones the migration itself causes (ASC 2Ah, RESERVATIONS /
REGISTRATIONS PREEMPTED or RELEASED, SPC-5 5.14.11, on the nexuses it
touches) are not owed to the guest, any other is (the device's
``OWN_COMMANDS`` table).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..device.core import Purpose
from ..iscsi.initiator import describe_result
from ..lun.types import Result
from ..scsi.constants import Status
from .machine import PrOpsDone
from .plan import PrOp

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice

OP_TIMEOUT = 10.0  # one PR OUT on the backend; beyond it the outcome is unknown


async def pr_out(dev: PassthroughDevice, op: PrOp) -> Result:
    """One op on its guest's backend nexus, through the device's port."""
    return await dev.pr_out(op.guest, op.action, op.rtype, op.rk, op.sark, op.scope, op.aptpl,
                            purpose=Purpose.MIGRATION,
                            params=op.params() if op.move_to is not None else None)


async def issue_ops(dev: PassthroughDevice, ops: tuple[PrOp, ...], logger: Any) -> PrOpsDone:
    """Run ``ops`` in order, stopping at the first failure (the machines'
    ``IssuePrOps`` contract): RESERVATION CONFLICT on a ``conflict_ok`` op
    counts as success; a transport error or timeout is ``definite=False``."""
    for i, op in enumerate(ops):
        try:
            r = await asyncio.wait_for(pr_out(dev, op), OP_TIMEOUT)
        except Exception as e:  # transport error, timeout, closed device
            return PrOpsDone(i, f"{op}: {type(e).__name__}: {e}", definite=False)
        if op.probe:  # SPC-5 requires RESERVATION CONFLICT here; GOOD is a target that does not conform
            ok = r.status == Status.RESERVATION_CONFLICT
        else:
            ok = r.status == Status.GOOD or (op.conflict_ok and r.status == Status.RESERVATION_CONFLICT)
        logger.info("%s -> %s", op, describe_result(r))
        if not ok:
            return PrOpsDone(i, f"{op}: {describe_result(r)}", definite=True)
    return PrOpsDone(len(ops))
