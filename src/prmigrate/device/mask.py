"""What the device hides from and refuses to the guest when migrate-pr is on.

QEMU (docs/design.md, "QEMU's `migrate-pr`"): with migration enabled the
device masks two capabilities reported by PERSISTENT RESERVE IN / REPORT
CAPABILITIES:

* SIP_C (byte 2 bit 3, Specify Initiator Ports Capable),
* ATP_C (byte 2 bit 2, All Target Ports Capable; QEMU calls it ATC_C),

because a registration made for other initiator ports, or for every target
port, is not one the device can move with the guest. QEMU only masks;
a guest that ignores the capability bits and sets SPEC_I_PT or ALL_TG_PT
anyway would still create such registrations. So the device also refuses
those PR OUTs itself, before they reach the backend, with ILLEGAL REQUEST /
INVALID FIELD IN PARAMETER LIST pointing at byte 20 (SPC-5 6.17.3: what a
device server that does not support the bit answers).

Differences from QEMU, on purpose:

* QEMU asserts the REPORT CAPABILITIES reply is >= 3 bytes; here a reply
  of 0-2 bytes (allocation length < 3) is returned unchanged;
* REGISTER AND MOVE has its own parameter list where byte 20 is part of the
  TransportID length, not flags: it is never refused here.

With migrate-pr off (``enabled=False``) nothing is masked or refused.
"""

from __future__ import annotations

from ..scsi.constants import Opcode, PrInAction, PrOutAction
from ..scsi.sense import CheckCondition, Sense, SenseField

CAPS_FLAGS_BYTE = 2
SIP_C = 0x08
ATP_C = 0x04
MASKED_CAPS = SIP_C | ATP_C

FLAGS_BYTE = 20  # basic PR OUT parameter list (SPC-5 6.17.3)
BASIC_LIST_LENGTH = 24
SPEC_I_PT_BIT = 3
ALL_TG_PT_BIT = 2

# Service actions whose parameter list is the basic one (byte 20 = flags).
_BASIC_LAYOUT = frozenset(a for a in PrOutAction if a is not PrOutAction.REGISTER_AND_MOVE)


def _service_action(cdb: bytes | bytearray | memoryview, opcode: Opcode) -> int | None:
    if len(cdb) < 2 or cdb[0] != opcode:
        return None
    return cdb[1] & 0x1F


def mask_pr_in(
    cdb: bytes | bytearray | memoryview,
    data_in: bytes | bytearray | memoryview,
    *,
    enabled: bool = True,
) -> bytes | bytearray | memoryview:
    """Clear SIP_C and ATP_C in a REPORT CAPABILITIES reply; anything else
    (other commands, other service actions, replies shorter than 3 bytes) is
    returned as given (the same object)."""
    if (
        not enabled
        or _service_action(cdb, Opcode.PERSISTENT_RESERVE_IN) != PrInAction.REPORT_CAPABILITIES
    ):
        return data_in
    if len(data_in) <= CAPS_FLAGS_BYTE or not data_in[CAPS_FLAGS_BYTE] & MASKED_CAPS:
        return data_in
    out = bytearray(data_in)
    out[CAPS_FLAGS_BYTE] &= ~MASKED_CAPS & 0xFF
    return bytes(out)


def refuse_pr_out(
    cdb: bytes | bytearray | memoryview,
    data_out: bytes | bytearray | memoryview,
    *,
    enabled: bool = True,
) -> CheckCondition | None:
    """The CHECK CONDITION to answer instead of forwarding a PR OUT that asks
    for SPEC_I_PT or ALL_TG_PT, else None (forward it). Only the parameter
    list the CDB names counts (PARAMETER LIST LENGTH, bytes 5-8, of the
    data sent): a CDB too short to name it, or a list shorter than the
    basic 24 bytes, is forwarded, and the backend answers it as it answers
    any such PR OUT (PARAMETER LIST LENGTH ERROR, INVALID FIELD IN CDB)."""
    if not enabled:
        return None
    sa = _service_action(cdb, Opcode.PERSISTENT_RESERVE_OUT)
    if sa is None or sa not in _BASIC_LAYOUT or len(cdb) < 9:
        return None
    if min(len(data_out), int.from_bytes(cdb[5:9], "big")) < BASIC_LIST_LENGTH:
        return None
    flags = data_out[FLAGS_BYTE]
    for bit in (SPEC_I_PT_BIT, ALL_TG_PT_BIT):
        if flags & (1 << bit):
            return CheckCondition(
                Sense.INVALID_FIELD_IN_PARAMETER_LIST,
                SenseField(cdb=False, field=FLAGS_BYTE, bit=bit),
            )
    return None


class PrFilter:
    """``mask_pr_in``/``refuse_pr_out`` bound to a device's migrate-pr setting."""

    __slots__ = ("enabled",)

    def __init__(self, migrate_pr: bool) -> None:
        self.enabled = migrate_pr

    def mask_pr_in(
        self, cdb: bytes | bytearray | memoryview, data_in: bytes | bytearray | memoryview
    ) -> bytes | bytearray | memoryview:
        return mask_pr_in(cdb, data_in, enabled=self.enabled)

    def refuse_pr_out(
        self, cdb: bytes | bytearray | memoryview, data_out: bytes | bytearray | memoryview
    ) -> CheckCondition | None:
        return refuse_pr_out(cdb, data_out, enabled=self.enabled)
