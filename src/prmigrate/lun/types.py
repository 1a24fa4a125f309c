"""The contract between transports and logical units.

A transport (the iSCSI target, or a test) calls
``unit.execute(nexus, cdb, data_out) -> Result | Future[Result]``. A pure
logical unit answers synchronously with a ``Result``; the passthrough device,
which forwards to a backend, may answer with an ``asyncio.Future`` that
resolves to a ``Result``. The transport handles both without a Task per
command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..scsi.constants import Status

# Nexus is defined in scsi/ (transport IDs name nexuses) and re-exported here.
from ..scsi.nexus import Nexus as Nexus
from ..scsi.sense import unit_attention_of


@dataclass(slots=True)
class Result:
    """Outcome of one command. ``sense`` is set only for CHECK CONDITION."""

    status: Status = Status.GOOD
    data_in: bytes | bytearray | memoryview = b""
    sense: bytes = b""

    @property
    def good(self) -> bool:
        return self.status == Status.GOOD


GOOD = Result()


def unit_attention(result: Result) -> tuple[int, int] | None:
    """(ASC, ASCQ) when ``result`` is a CHECK CONDITION with UNIT ATTENTION
    sense (SAM-5 5.14, SPC-5 4.4), else None: the one test of an answer
    (``scsi.sense.unit_attention_of`` reads the sense bytes)."""
    if result.status != Status.CHECK_CONDITION or not result.sense:
        return None
    return unit_attention_of(result.sense)


class ReservationConflict(Exception):  # noqa: N818 - named after the status it becomes
    """The command ends with RESERVATION CONFLICT status (no sense data)."""


@dataclass(slots=True)
class TaskManagementOutcome:
    """What a task management function did, for the transport to act on."""

    aborted_nexuses: set[Nexus] = field(default_factory=set)


class LogicalUnitLike(Protocol):
    """What the iSCSI target needs from whatever it serves as a LUN.

    Optional: ``target_reset_supported`` (True when absent); an LU whose
    value is False makes the target answer TARGET WARM/COLD RESET with
    "function not supported" (the passthrough device of a backend without
    them)."""

    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview) -> object:
        """Return a ``Result`` or an ``asyncio.Future`` resolving to one."""
        ...

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus ended (session closed, not reinstated)."""
        ...

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        """LOGICAL UNIT RESET / TARGET WARM|COLD RESET received on ``nexus``."""
        ...

    def clear_task_set(self, nexus: Nexus) -> None:
        """CLEAR TASK SET received on ``nexus`` (UA 2F/00 to the others)."""
        ...
