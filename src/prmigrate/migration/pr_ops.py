"""The migration's PR OUT commands on a device's backend nexuses.

``issue_ops`` carries out the machines' ``IssuePrOps`` action: each
``PrOp`` (``plan.py``) on the named guest's backend nexus, in order, stopping
at the first failure. RESERVATION CONFLICT on a ``conflict_ok`` op is
success; a transport error or a timeout is ``definite=False`` (the outcome on
the target is unknown).

The ops go to the backend session directly, not through the device's guest
PR OUT path (``PassthroughDevice.pr_out``), which journals and snoops: the
ops move the state the device already tracks (the snapshot the stream
carries), a snooped op would change that tracked state under the migration,
and the verification a snooped PREEMPT or RAIEK asks for would cost a round
trip inside the pause. Unit attentions they meet are retried (the
initiator's ``Session.submit_retrying``); the ones the migration itself
causes (ASC 2Ah, RESERVATIONS / REGISTRATIONS PREEMPTED or RELEASED, SPC-5
5.14.11 and 5.14.12, on the nexuses it touches) are not owed to the guest,
any other is (kept with the device's owed unit attentions).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..iscsi.initiator import describe_result
from ..lun.types import Result
from ..scsi.constants import Status
from ..scsi.sense import unit_attention_of
from .machine import PrOpsDone
from .plan import PrOp

if TYPE_CHECKING:
    from ..device.passthrough import PassthroughDevice

OP_TIMEOUT = 10.0  # one PR OUT on the backend; beyond it the outcome is unknown
UA_RETRIES = 8
# Unit attentions the migration's own PR OUTs cause on the nexuses it uses.
_OWN_UA_ASC = 0x2A


async def pr_out(dev: PassthroughDevice, op: PrOp) -> Result:
    """One op on its guest's backend nexus. Unit attentions are retried; the
    ones the migration's own PR OUTs cause (2A/xx) are not owed to the
    guest, any other is."""
    session = await dev.backend_session(op.guest)
    owed: list[bytes] = []

    def met(r: Result) -> None:
        ua = unit_attention_of(r.sense)
        if ua is not None and ua[0] != _OWN_UA_ASC:
            owed.append(bytes(r.sense))

    r = await session.submit_retrying(dev.lun, op.cdb(), op.params(), tries=UA_RETRIES, on_retry=met)
    if owed:
        dev.restore(dev.snooper.state, None, {op.guest: owed})
    return r


async def issue_ops(dev: PassthroughDevice, ops: tuple[PrOp, ...], logger: Any) -> PrOpsDone:
    """Run ``ops`` in order, stopping at the first failure (the machines'
    ``IssuePrOps`` contract): RESERVATION CONFLICT on a ``conflict_ok`` op
    counts as success; a transport error or timeout is ``definite=False``."""
    for i, op in enumerate(ops):
        try:
            r = await asyncio.wait_for(pr_out(dev, op), OP_TIMEOUT)
        except Exception as e:  # transport error, timeout, closed device
            return PrOpsDone(i, f"{op}: {type(e).__name__}: {e}", definite=False)
        ok = r.status == Status.GOOD or (op.conflict_ok and r.status == Status.RESERVATION_CONFLICT)
        logger.info("%s -> %s", op, describe_result(r))
        if not ok:
            return PrOpsDone(i, f"{op}: {describe_result(r)}", definite=True)
    return PrOpsDone(len(ops))
