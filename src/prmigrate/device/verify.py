"""Verification decisions: how the device reads the backend's PR state back.

The device verifies the state it tracks (``snoop.py``) after a PR OUT whose
outcome depends on other initiators, after a unit attention that puts it in
doubt, on a PRgeneration it did not expect, and on demand. It reads the
backend on its *monitor* nexus (one that never registers, so no unit
attention meant for a guest is consumed there):

* READ FULL STATUS (SPC-5 6.16.5), grown until the answer is complete;
* READ KEYS + READ RESERVATION (SPC-5 6.16.2 / 6.16.3) when the backend
  answers INVALID OPCODE or INVALID FIELD IN CDB to it (tgt), with what
  that fallback cannot tell (``KEYS_METHOD_LIMITS``, ``reconcile.py``).

A failed verification (backend unreachable, a SCSI-2 reservation of
another initiator refusing PERSISTENT RESERVE IN, SPC-5 5.14.3) is tried
again after ``VERIFY_RETRY_FIRST`` seconds, doubling up to
``VERIFY_RETRY_MAX``, until one succeeds.

``Verification`` keeps the method found, the last outcome and the back-off;
the shell does the reads and arms the timer. Pure: the clock is ``now``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..lun.types import Result
from ..scsi.constants import SenseKey, Status
from ..scsi.pr import PrDecodeError, ReadFullStatus, ReadKeys, ReadReservation
from ..scsi.sense import sense_triple
from .errors import DeviceError
from .reconcile import ReconcileError
from .snoop import PrSnooper
from .state import StateChange

PR_IN_ALLOC = 8192
VERIFY_RETRY_FIRST = 0.5
VERIFY_RETRY_MAX = 30.0
FULL_STATUS_METHOD = "READ FULL STATUS"
KEYS_METHOD = "READ KEYS + READ RESERVATION"
# What the READ KEYS + READ RESERVATION fallback cannot tell (reconcile.py).
KEYS_METHOD_LIMITS = (
    "which nexus a listed key is registered on (another initiator may use the same key)",
    "which nexus holds a non-all-registrants reservation carrying a guest's key",
    "registrations or reservations made on the device's nexus outside the guest with a key "
    "the device does not track (they are not adopted)",
)
# Backend answers meaning "READ FULL STATUS is not implemented here".
_NOT_IMPLEMENTED = frozenset(
    {(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00), (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)}
)


def status_text(result: Result) -> str:
    """A status in words (the shell gives the device one that adds the sense)."""
    try:
        return Status(result.status).name.replace("_", " ")
    except ValueError:
        return f"status 0x{int(result.status):02x}"


def failure_text(exc: BaseException, unreachable: bool) -> str:
    """What ``last_verify_error`` says about a failed verification."""
    what = (
        "backend unreachable" if unreachable
        else "backend PR data unusable" if isinstance(exc, PrDecodeError | ReconcileError)
        else "backend refused"
    )
    return f"{what}: {exc}"


class Verification:
    """The monitor's view of the backend: method, last outcome, back-off."""

    def __init__(self, describe: Callable[[Result], str] = status_text) -> None:
        self.describe = describe  # a backend answer in words, for error texts
        self.full_status: bool | None = None  # None: not known yet
        self.last_verified: float | None = None  # wall clock of the last good one
        self.last_error: str | None = None
        self.unknown: tuple[str, ...] = ()
        self.retry_delay = VERIFY_RETRY_FIRST

    @property
    def method(self) -> str | None:
        """READ FULL STATUS, or the READ KEYS + READ RESERVATION fallback;
        None until the first reconciliation."""
        if self.full_status is None:
            return None
        return FULL_STATUS_METHOD if self.full_status else KEYS_METHOD

    def full_status_answer(self, r: Result, alloc: int) -> tuple[ReadFullStatus | None, int | None]:
        """The backend answered READ FULL STATUS with allocation ``alloc``:
        (status, None) when complete; (None, larger alloc) to read again;
        (None, None) when the backend does not implement it. A refusal
        raises ``DeviceError``."""
        if r.status == Status.CHECK_CONDITION and sense_triple(r.sense) in _NOT_IMPLEMENTED:
            self.full_status = False
            return None, None
        if r.status != Status.GOOD:
            raise DeviceError(f"READ FULL STATUS: {self.describe(r)}")
        self.full_status = True
        rfs = ReadFullStatus.decode(bytes(r.data_in))
        if not rfs.truncated or alloc >= 0xFFFF:
            return rfs, None
        return None, min(0xFFFF, (rfs.additional_length or 0) + 8)

    def keys_answer(self, r: Result) -> ReadKeys:
        if r.status != Status.GOOD:
            raise DeviceError(f"READ KEYS: {self.describe(r)}")
        return ReadKeys.decode(bytes(r.data_in))

    def reservation_answer(self, r: Result) -> ReadReservation:
        if r.status != Status.GOOD:
            raise DeviceError(f"READ RESERVATION: {self.describe(r)}")
        return ReadReservation.decode(bytes(r.data_in))

    def apply(
        self, snooper: PrSnooper, read: ReadFullStatus | tuple[ReadKeys, ReadReservation], now: float
    ) -> tuple[tuple[StateChange, ...], str]:
        """Reconcile the tracked state with what was read; (changes, method).
        Raises ``ReconcileError`` when the data cannot be reconciled."""
        unknown: tuple[str, ...] = ()
        if isinstance(read, ReadFullStatus):
            changes, how = snooper.apply_full_status(read), FULL_STATUS_METHOD
        else:
            rec = snooper.apply_keys(*read)
            changes, how = rec.changes, KEYS_METHOD
            unknown = tuple(u.describe() for u in rec.unknown)
        self.last_verified = now
        self.last_error = None
        self.retry_delay = VERIFY_RETRY_FIRST
        self.unknown = unknown
        return changes, how

    def failed(self, text: str) -> None:
        self.last_error = text

    def next_retry(self) -> float:
        """The delay before the next try after a failure (backing off)."""
        delay = self.retry_delay
        self.retry_delay = min(delay * 2, VERIFY_RETRY_MAX)
        return delay


class VerifySchedule:
    """When the device verifies: one verification at a time, the wishes
    that come meanwhile coalesced into one more; after a failure, again on
    a backing-off timer (``Verification.next_retry``) unless another one is
    wanted already. The shell runs the verifications and waits until
    ``retry_at`` (in a background task that closing the device cancels and
    a migration's ``drain`` does not wait for); the clock is the shell's,
    given to ``failed``. A wait that ends for a retry no longer armed (a
    verification succeeded meanwhile) does nothing (``due``)."""

    __slots__ = ("verification", "running", "again", "reason", "retry_at")

    def __init__(self, verification: Verification) -> None:
        self.verification = verification
        self.running = False
        self.again = False
        self.reason = "unit attention"
        self.retry_at: float | None = None  # when the armed retry is due (None: none armed)

    def want(self, reason: str) -> bool:
        """A verification is wanted: True when the shell starts running them."""
        self.reason = reason
        self.again = True
        if self.running:
            return False
        self.running = True
        return True

    def next(self) -> str | None:
        """The reason of the next verification to run; None: none wanted, stop."""
        if self.again:
            self.again = False
            return self.reason
        self.running = False
        return None

    def failed(self, coalescing: bool = False, now: float = 0.0) -> float | None:
        """A verification failed at ``now``: the delay of the retry timer to
        arm, for ``retry_at`` (None: armed already, or, ``coalescing``,
        another verification is wanted)."""
        if (coalescing and self.again) or self.retry_at is not None:
            return None
        delay = self.verification.next_retry()
        self.retry_at = now + delay
        return delay

    def due(self, at: float | None = None) -> bool:
        """The retry timer armed for ``at`` (None: the armed one) fired:
        True when that retry is still armed (then ``want`` the retry)."""
        if self.retry_at is None or (at is not None and at != self.retry_at):
            return False
        self.retry_at = None
        return True

    def succeeded(self) -> bool:
        """A verification succeeded: True when a retry was armed (it is not
        any more: its timer does nothing when it fires)."""
        armed, self.retry_at = self.retry_at is not None, None
        return armed

    def stop(self) -> None:
        """The device closes: no retry is armed any more."""
        self.retry_at = None


__all__ = [
    "VerifySchedule",
    "FULL_STATUS_METHOD",
    "KEYS_METHOD",
    "KEYS_METHOD_LIMITS",
    "PR_IN_ALLOC",
    "VERIFY_RETRY_FIRST",
    "VERIFY_RETRY_MAX",
    "Verification",
    "status_text",
    "failure_text",
]
