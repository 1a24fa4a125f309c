"""An incoming device's logical unit: what it answers before the device moves here.

A device added with ``incoming-from=`` (``config.py``) is published at once
with the identity the guest sees on the source, but the guest's
registrations and reservation are still on the source's nexus. Until the
device arrives (``arrive()``) the node's LUN is an ``IncomingGate``:

- a command that any nexus may send under every reservation type, and that
  reads nothing of the guest's PR state, goes to the device as usual (on
  this host's own, unregistered backend nexus: the target answers it as it
  would on the source), and MODE SENSE (``OWN_NEXUS_BEFORE_MOVE``); a QEMU
  started with ``-incoming`` opens its drive with those;
- any other command (media access, PR IN / OUT, RESERVE / RELEASE, anything
  the conflict table could refuse, anything unknown) is held and ``pull()``
  asks for the device; it runs once the device arrived, or, when the pull
  fails, gets CHECK CONDITION NOT READY, LOGICAL UNIT NOT ACCESSIBLE,
  ASYMMETRIC ACCESS STATE TRANSITION (04h/0Ah, SPC-5 5.16.2.6), which an
  initiator retries; the next such command pulls again.

After ``arrive()`` the host puts the device itself in the node (the gate is
asked for nothing more).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..aio import chain, deliver, on_outcome, settle
from ..lun.conflicts import Access, classify
from ..lun.types import Nexus, Result
from ..scsi.constants import Opcode, Status
from ..scsi.sense import Sense, encode_sense
from .sessions import Answer

if TYPE_CHECKING:
    from .passthrough import PassthroughDevice

_CHECK = Status.CHECK_CONDITION

# The commands an incoming device answers before it moves: the ALWAYS class
# of the conflict table (SPC-5 5.14.2 table 60, SBC-4 table 13: allowed to
# every nexus under every reservation type) less PERSISTENT RESERVE IN,
# whose answer (keys, reservation, capabilities) is the guest's PR state on
# the source's nexus (SPC-5 6.16).
NEEDS_NEXUS_ANYWAY = frozenset({Opcode.PERSISTENT_RESERVE_IN})

# Also answered before the move, on this host's own nexus, though the table
# lets them conflict under the exclusive-access types (READ class): QEMU's
# iSCSI driver sends MODE SENSE(6) when it opens the drive (the WP and
# DPOFU bits), so a QEMU started with -incoming would pull the device long
# before its switchover. Under WE types and no reservation the answer is the
# source's; under EA types it is RESERVATION CONFLICT, which QEMU takes as
# "LUN assumed writable". A guest's media access still pulls.
OWN_NEXUS_BEFORE_MOVE = frozenset({Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10})


# The rest of the READ class of the conflict table (READ(6/10/12/16),
# ...: SPC-5 table 60, SBC-4 table 13 allow them to a non-registrant under
# the Write Exclusive types and answer RESERVATION CONFLICT under the
# Exclusive Access types): before the move they are tried on this host's
# own nexus; a RESERVATION CONFLICT from the target means they need the
# guest's nexus after all, and they are held and pull like the rest. A
# QEMU started with -incoming and a scsi-block device on the drive also
# READs LBA 0 when it starts: under the WE types that must not pull the
# device before the VM's switchover (a cancelled migration would leave it
# on the destination).


def tried_before_move(cdb: bytes | bytearray | memoryview) -> bool:
    return bool(cdb) and classify(cdb) is Access.READ


def answered_before_move(cdb: bytes | bytearray | memoryview) -> bool:
    """True when ``cdb`` is answered without the guest's nexus."""
    if not cdb or cdb[0] in NEEDS_NEXUS_ANYWAY:
        return False
    return cdb[0] in OWN_NEXUS_BEFORE_MOVE or classify(cdb) is Access.ALWAYS


NOT_ACCESSIBLE = Result(_CHECK, b"", encode_sense(Sense.LU_NOT_ACCESSIBLE_TRANSITION))


@dataclass(slots=True)
class _Waiting:
    nexus: Nexus
    cdb: bytes
    data_out: bytes | memoryview
    data_in_len: int | None
    token: asyncio.Future[Result]


class IncomingGate:
    """The LU of an incoming device's node until the device arrives.

    ``pull()`` returns an awaitable of None (the device arrived) or the
    reason the pull failed."""

    def __init__(self, dev: PassthroughDevice, pull: Callable[[], Awaitable[str | None]]) -> None:
        self.dev = dev
        self._pull = pull
        self.arrived = False
        self.closed = False
        self.pulls = 0
        self.failures = 0
        self._waiting: list[_Waiting] = []
        self._pulling: asyncio.Task[None] | None = None

    @property
    def target_reset_supported(self) -> bool:
        return bool(getattr(self.dev, "target_reset_supported", True))

    # -- the LU contract (lun/types.py)
    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview = b"",
                data_in_len: int | None = None) -> Answer:
        if self.arrived or answered_before_move(cdb):
            return self.dev.execute(nexus, cdb, data_out, data_in_len)
        if self.closed:
            return NOT_ACCESSIBLE
        token: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if tried_before_move(cdb):
            def tried(r: Result | BaseException | None) -> None:
                if isinstance(r, Result) and r.status == Status.RESERVATION_CONFLICT and not token.done():
                    if self.arrived:  # it moved meanwhile: the guest's nexus answers
                        chain(self.dev.execute(nexus, cdb, data_out, data_in_len), token)
                    elif self.closed:
                        token.set_result(NOT_ACCESSIBLE)
                    else:
                        self._hold(_Waiting(nexus, bytes(cdb), data_out, data_in_len, token))
                else:
                    settle(token, r)

            on_outcome(self.dev.execute(nexus, cdb, data_out, data_in_len), tried)
            return token
        self._hold(_Waiting(nexus, bytes(cdb), data_out, data_in_len, token))
        return token

    def _hold(self, w: _Waiting) -> None:
        """Keep ``w`` until the device arrived; the first one held pulls it."""
        self._waiting.append(w)
        if self._pulling is None:
            self._pulling = asyncio.ensure_future(self._pull_once())

    def execute_then(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview,
                     done: Callable[[Result | BaseException], Any]) -> Result | None:
        if self.arrived:
            return self.dev.execute_then(nexus, cdb, data_out, done)
        return deliver(self.execute(nexus, cdb, data_out), done)  # type: ignore[no-any-return]

    def nexus_lost(self, nexus: Nexus) -> None:
        for w in [w for w in self._waiting if w.nexus == nexus]:
            self._waiting.remove(w)
            w.token.cancel()
        self.dev.nexus_lost(nexus)

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        self._cancel_waiting(None)
        self.dev.reset(nexus, cold, target_reset)

    def clear_task_set(self, nexus: Nexus) -> None:
        self._cancel_waiting(None)
        self.dev.clear_task_set(nexus)

    # -- the host's side
    def arrive(self) -> None:
        """The device is served here now: what waited runs, in order."""
        self.arrived = True
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            if not w.token.done():
                chain(self.dev.execute(w.nexus, w.cdb, w.data_out, w.data_in_len), w.token)

    def close(self) -> None:
        """The incoming device is deleted: what waited gets NOT READY."""
        self.closed = True
        self._answer_waiting(NOT_ACCESSIBLE)

    def _cancel_waiting(self, nexus: Nexus | None) -> None:
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.token.cancel()

    def _answer_waiting(self, r: Result) -> None:
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            if not w.token.done():
                w.token.set_result(r)

    async def _pull_once(self) -> None:
        try:
            self.pulls += 1
            why = await self._pull()
        except Exception as e:  # the pull's own bug: the guest still gets a status
            why = f"{type(e).__name__}: {e}"
        finally:
            self._pulling = None
        if self.arrived:
            return
        if why is None:  # arrived according to the source, not yet here: a moment later
            why = "the device has not arrived yet"
        self.failures += 1
        # one line per failure would let a retrying guest flood the log
        level = logging.WARNING if self.failures == 1 or self.failures % 100 == 0 else logging.DEBUG
        self.dev.log.log(level, "pull failed (%s, %d so far): %d command(s) answered NOT READY (04h/0Ah)",
                         why, self.failures, len(self._waiting))
        self._answer_waiting(NOT_ACCESSIBLE)
