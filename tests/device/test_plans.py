"""The monitor's command plans (``device/plans.py``), driven by hand: each
step answered, or failed with the transport's error, no backend."""

from __future__ import annotations

import logging
import struct
from collections.abc import Generator
from typing import Any

import pytest

from prmigrate.device.errors import DeviceError
from prmigrate.device.plans import Call, Own, full_status_plan, identity_plan, keys_plan, tmfs_plan
from prmigrate.device.verify import PR_IN_ALLOC, Verification
from prmigrate.iscsi.initiator_core import IscsiError
from prmigrate.lun.types import Result
from prmigrate.scsi.cdb import SupportedTmfs
from prmigrate.scsi.constants import PrInAction, Status
from prmigrate.scsi.sense import Sense, encode_sense

LOG = logging.getLogger("test.plans")
INVALID_OPCODE = Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_OPCODE))


def run(plan: Generator[Any, Any, Any], answers: list[Any]) -> tuple[list[Any], Any]:
    """(the steps asked, the plan's result); an exception answer is thrown in."""
    steps = [next(plan)]
    try:
        for a in answers:
            steps.append(plan.throw(a) if isinstance(a, BaseException) else plan.send(a))
    except StopIteration as done:
        return steps, done.value
    raise AssertionError(f"plan not done after {steps}")


def rfs(generation: int, additional: int, body: bytes = b"") -> Result:
    return Result(Status.GOOD, struct.pack(">II", generation, additional) + body)


def test_read_full_status_grows_until_complete() -> None:
    v = Verification()
    steps, got = run(full_status_plan(v, LOG), [rfs(7, 9000), rfs(7, 0)])
    assert [s.alloc for s in steps] == [PR_IN_ALLOC, 9008]
    assert all(isinstance(s, Own) and s.cdb[1] & 0x1F == PrInAction.READ_FULL_STATUS for s in steps)
    assert got is not None and got.generation == 7 and v.full_status is True


def test_read_full_status_not_implemented_falls_back_once_known() -> None:
    v = Verification()
    _, got = run(full_status_plan(v, LOG), [INVALID_OPCODE])
    assert got is None and v.full_status is False
    with pytest.raises(StopIteration):  # known now: not asked again
        next(full_status_plan(v, LOG))
    steps, (keys, rr) = run(keys_plan(v), [Result(Status.GOOD, bytes(8)), Result(Status.GOOD, bytes(8))])
    assert [s.cdb[1] & 0x1F for s in steps] == [PrInAction.READ_KEYS, PrInAction.READ_RESERVATION]
    assert tuple(keys.keys) == () and rr.key is None


def test_a_refused_read_is_a_device_error() -> None:
    plan = full_status_plan(Verification(), LOG)
    next(plan)
    with pytest.raises(DeviceError, match="READ FULL STATUS"):
        plan.send(Result(Status.RESERVATION_CONFLICT))


def test_identity_with_optional_pages_failing() -> None:
    std = bytes(36)  # peripheral qualifier 000b
    steps, ident = run(identity_plan(0, "iscsi://backend", LOG),
                       [std, IscsiError("no page 80h"), IscsiError("no page 83h"), (16, 512)])
    assert steps == [Call("inquiry", (None, 255)), Call("inquiry", (0x80, 255)), Call("inquiry", (0x83, 255)),
                     Call("read_capacity16")]
    assert ident.capacity_blocks == 16 and ident.block_size == 512


def test_no_logical_unit_stops_the_capture() -> None:
    plan = identity_plan(3, "iscsi://backend", LOG)
    next(plan)
    plan.send(bytes((0x7F,)) + bytes(35))  # qualifier 011b: no LU here
    plan.send(b"")
    plan.send(b"")
    with pytest.raises(DeviceError, match="no logical unit 3"):
        plan.throw(IscsiError("READ CAPACITY(16) failed"))


def test_task_management_functions_unknown_when_the_report_fails() -> None:
    steps, got = run(tmfs_plan(LOG), [IscsiError("INVALID COMMAND OPERATION CODE")])
    assert steps == [Call("report_supported_tmfs")] and got is None
    tmfs = SupportedTmfs.decode(bytes((0x80, 0, 0, 0)))
    assert run(tmfs_plan(LOG), [tmfs])[1] is tmfs
