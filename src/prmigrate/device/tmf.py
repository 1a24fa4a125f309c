"""Task management of the passthrough device: what a guest's function
becomes on the backend, and the queue that makes guest commands wait for
it. Pure: the shell sends the functions and reports them answered.

The guest's LOGICAL UNIT RESET, TARGET WARM RESET and TARGET COLD RESET
become a LOGICAL UNIT RESET of the backend LUN on the guest's backend
nexus (a guest must not reset the shared target); CLEAR TASK SET is
forwarded as is (``GUEST_TMFS``). A RELEASE for a SCSI-2 holder whose
frontend nexus ended while others keep the backend nexus is sent the same
way (``release``; SPC-2 5.5.1: the LU drops the reservation on that nexus
loss, and here the backend nexus lives on).

The guest has the function's response at once, so until the backend
answered it every guest command waits, on every backend nexus: a command
sent after the response reaches the LU after the function, as on a LU
(MultipathIO.Reset resets through one path and expects the unit attention
on the next command of each). Functions go one at a time, in the order
asked (``TmfQueue``); the commands go when the last one is answered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..iscsi.pdu import TmfFunction
from ..scsi.constants import Opcode


@dataclass(frozen=True, slots=True)
class GuestTmf:
    """What a guest's function becomes: the backend's function (``call``:
    the initiator ``Session`` method that sends it) and whether it ends a
    SCSI-2 reservation (SAM-5 6.3.3: a logical unit reset releases it)."""

    backend: TmfFunction
    call: str
    resets: bool


_LU_RESET = GuestTmf(TmfFunction.LOGICAL_UNIT_RESET, "lun_reset", resets=True)

# RFC 7143 11.5.1 function codes. The frontend takes a target reset only
# when the backend reports target resets (``target_reset_supported``), so
# a guest sees the backend's task management support through the device.
GUEST_TMFS: dict[TmfFunction, GuestTmf] = {
    TmfFunction.LOGICAL_UNIT_RESET: _LU_RESET,
    # the shared target is other hosts' too: only the guest's LUN is reset
    TmfFunction.TARGET_WARM_RESET: _LU_RESET,
    TmfFunction.TARGET_COLD_RESET: _LU_RESET,
    # SAM-5: the task set of the LUN, forwarded as is
    TmfFunction.CLEAR_TASK_SET: GuestTmf(TmfFunction.CLEAR_TASK_SET, "clear_task_set", resets=False),
}


def guest_function(target_reset: bool, cold: bool) -> TmfFunction:
    """The function a frontend ``reset(nexus, cold, target_reset)`` stands for."""
    if not target_reset:
        return TmfFunction.LOGICAL_UNIT_RESET
    return TmfFunction.TARGET_COLD_RESET if cold else TmfFunction.TARGET_WARM_RESET


@dataclass(frozen=True, slots=True, eq=False)
class Tmf:
    """One function to send on the backend nexus ``key``: a task management
    function (``call``) or, with ``release`` set, that RELEASE CDB."""

    key: str
    what: str
    call: str = ""
    release: bytes = b""


def backend_tmf(key: str, function: TmfFunction) -> Tmf:
    """The backend function for a guest's ``function`` on ``key``'s nexus."""
    rule = GUEST_TMFS[function]
    return Tmf(key, rule.backend.name.replace("_", " "), call=rule.call)


def release(key: str, cdb: bytes) -> Tmf:
    """RELEASE(6/10), as the departed holder reserved, on ``key``'s nexus."""
    return Tmf(key, Opcode(cdb[0]).name, release=bytes(cdb))


class TmfQueue:
    """The functions forwarded and not answered yet, in order: ``running``
    is on the backend, the others wait their turn. While any is here the
    device's backend nexuses are paused."""

    __slots__ = ("running", "waiting")

    def __init__(self) -> None:
        self.running: Tmf | None = None
        self.waiting: deque[Tmf] = deque()

    @property
    def busy(self) -> bool:
        return self.running is not None

    def add(self, tmf: Tmf) -> Tmf | None:
        """``tmf`` is asked for: the function to send now (None: it waits)."""
        if self.running is None:
            self.running = tmf
            return tmf
        self.waiting.append(tmf)
        return None

    def done(self) -> Tmf | None:
        """The running function was answered (or failed): the next to send;
        None when none is left (the guest commands go)."""
        self.running = self.waiting.popleft() if self.waiting else None
        return self.running


__all__ = ["GUEST_TMFS", "GuestTmf", "Tmf", "TmfQueue", "backend_tmf", "guest_function", "release"]
