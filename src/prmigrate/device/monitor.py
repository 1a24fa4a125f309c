"""How the device watches the backend's PR state (asyncio): the monitor
nexus and the verifications run on it.

Host initiator name, ISID ``derive_isid(device, MONITOR)``, never
registered: a PR IN issued on a guest's own nexus could consume a unit
attention meant for the guest. Unit attentions met here are the monitor's
own: retried (``UaRetry``) and dropped. What the answers mean is decided
by ``verify.Verification``, what is learnt by the core (``verified``,
``verify_failed``); this module sends, and arms the retry timer (a timer,
not a task: a migration's ``drain`` does not wait for it).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..iscsi.initiator import IscsiError, Session, link_state_of
from ..lun.types import Result
from ..scsi.cdb import SupportedTmfs
from ..scsi.constants import PrInAction
from ..scsi.pr import PrDecodeError, ReadFullStatus, ReadKeys, ReadReservation, pr_in_cdb
from .core import MONITOR, DeviceError, Purpose, UaRetry
from .identity import DeviceIdentity, derive_isid, no_logical_unit
from .reconcile import ReconcileError
from .sessions import BackendSessions, submit_retrying
from .state import StateChange
from .verify import PR_IN_ALLOC, Verification


class Monitor:
    def __init__(
        self, open_session: Callable[[], Awaitable[Session]], lun: int, verification: Verification, log: Any,
        backend: str = "",
    ) -> None:
        self._open = open_session
        self.lun = lun
        self.backend = backend  # the backend's URL, for messages
        self.verification = verification
        self.log = log
        self.session: Session | None = None
        self._lock = asyncio.Lock()

    async def _session(self) -> Session:
        async with self._lock:
            if self.session is None:
                self.session = await self._open()
            return self.session

    async def run(self, cdb: bytes, alloc: int) -> Result:
        return await submit_retrying(await self._session(), self.lun, cdb, b"", UaRetry(Purpose.MONITOR), alloc)

    async def read_full_status(self) -> ReadFullStatus | None:
        """READ FULL STATUS (grown until complete); None when the backend
        does not implement it."""
        v = self.verification
        if v.full_status is False:
            return None
        alloc: int | None = PR_IN_ALLOC
        while alloc is not None:
            known = v.full_status
            r = await self.run(pr_in_cdb(PrInAction.READ_FULL_STATUS, alloc), alloc)
            rfs, alloc = v.full_status_answer(r, alloc)
            if rfs is not None:
                return rfs
            if v.full_status is False and known is None:
                self.log.info("backend has no READ FULL STATUS: using READ KEYS + READ RESERVATION")
        return None

    async def read_keys_and_reservation(self) -> tuple[ReadKeys, ReadReservation]:
        keys = self.verification.keys_answer(
            await self.run(pr_in_cdb(PrInAction.READ_KEYS, PR_IN_ALLOC), PR_IN_ALLOC)
        )
        rr = self.verification.reservation_answer(
            await self.run(pr_in_cdb(PrInAction.READ_RESERVATION, PR_IN_ALLOC), PR_IN_ALLOC)
        )
        return keys, rr

    async def capture_identity(self) -> DeviceIdentity:
        """Standard INQUIRY, VPD 80h/83h and READ CAPACITY(16) from the backend."""
        s = await self._session()
        std = await s.inquiry(alloc=255, lun=self.lun)
        vpd: dict[int, bytes] = {}
        for page in (0x80, 0x83):
            try:
                vpd[page] = await s.inquiry(page, alloc=255, lun=self.lun)
            except IscsiError:
                pass
        try:
            blocks, size = await s.read_capacity16(lun=self.lun)
            rc = struct.pack(">QI", blocks - 1, size)
        except IscsiError:
            rc = None
        missing = no_logical_unit(std, rc)
        if missing is not None:
            raise DeviceError(f"backend {self.backend} has no logical unit {self.lun} ({missing})")
        ident = DeviceIdentity.capture(std, vpd, rc)
        self.log.info(
            "backend LUN: %s %s serial %s, %d x %d bytes",
            ident.vendor, ident.product, ident.serial, ident.capacity_blocks, ident.block_size,
        )
        return ident

    async def capture_tmfs(self) -> SupportedTmfs | None:
        """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS from the backend LUN;
        None when the backend does not implement it (tgt) or fails it."""
        s = await self._session()
        try:
            tmfs = await s.report_supported_tmfs(lun=self.lun)
        except IscsiError as exc:
            self.log.info("backend task management functions unknown (target resets refused): %s", exc)
            return None
        self.log.info("backend task management functions: %s", ", ".join(tmfs.names()) or "none")
        return tmfs


class BackendMonitor(BackendSessions):
    """The device's verifications: one at a time, coalesced, on the monitor
    nexus; after a failure, again on a backing-off timer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._monitor = Monitor(
            lambda: self._open_session(derive_isid(self.name, MONITOR), "monitor", isids=tuple(
                derive_isid(self.name, MONITOR, p) for p in range(len(self.config.backend_urls)))),
            self.lun, self.verification, self.log, self.config.backend_url,
        )
        self._verifying: asyncio.Task[Any] | None = None
        self._verify_again = False
        self._verify_reason = "unit attention"
        self._verify_retry: asyncio.TimerHandle | None = None

    async def close(self) -> None:
        """Log out of every backend session and the monitor's."""
        if self._verify_retry is not None:
            self._verify_retry.cancel()
            self._verify_retry = None
        monitor, self._monitor.session = self._monitor.session, None
        await asyncio.gather(super().close(), *(() if monitor is None else (monitor.close(),)),
                             return_exceptions=True)

    def want_verify(self, reason: str = "state in doubt") -> None:
        """One coalesced verification in the background."""
        if self._closed:
            return
        self._verify_reason = reason
        if self._verifying is not None:
            self._verify_again = True
        else:
            self._verifying = self._bg.spawn(self._verify_loop())

    schedule_verify = want_verify

    async def _verify_loop(self) -> None:
        try:
            self._verify_again = True
            while self._verify_again:
                self._verify_again = False
                try:
                    await self.verify(self._verify_reason)
                except Exception as exc:
                    self.log.warning("verification failed: %s", exc)
                    if not self._verify_again:
                        self._retry_verify_later()
        finally:
            self._verifying = None

    async def _verify_after(self, what: str) -> None:
        try:
            await self.verify(f"after {what}")
        except Exception as exc:  # the PR OUT's answer still goes
            self.log.warning("verification after %s failed: %s", what, exc)
            self._retry_verify_later()

    async def _verify_after_login(self, key: str) -> None:
        """The backend nexus of ``key`` logged in again after a lost
        connection (the session holds the guest's commands meanwhile): the
        LUN may have changed while it was away (a target restarted without
        APTPL, another host's PREEMPT), so the tracked PR state is checked
        before the first command goes. A failed check is retried later."""
        monitor = self._monitor.session
        if monitor is not None and hasattr(monitor, "retry_now"):
            monitor.retry_now()  # the check reads through it: no waiting out its backoff
        try:
            changes = await self.verify(f"backend nexus of {key} logged in again")
        except DeviceError:
            self._retry_verify_later()
            raise
        self.log.info("backend nexus of %s logged in again: PR state verified before resuming, "
                      "%d change(s)", key, len(changes))

    def monitor_link_state(self) -> dict[str, Any] | None:
        """``Session.link_state()`` of the monitor's session (None: none)."""
        return link_state_of(self._monitor.session)

    def _retry_verify_later(self) -> None:
        """A timer, not a task: ``drain`` (a migration's hold) does not wait for it."""
        if self._closed or self._verify_retry is not None:
            return
        delay = self.verification.next_retry()
        self.log.info("verifying again in %.1f s", delay)
        self._verify_retry = asyncio.get_running_loop().call_later(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._verify_retry = None
        self.want_verify("retry after a failed verification")

    @property
    def verify_retry_at(self) -> float | None:
        """Loop time of the pending retry after a failed verification."""
        return None if self._verify_retry is None else self._verify_retry.when()

    async def read_full_status(self) -> ReadFullStatus | None:
        """READ FULL STATUS on the monitor nexus; None when not implemented."""
        return await self._monitor.read_full_status()

    async def read_keys_and_reservation(self) -> tuple[ReadKeys, ReadReservation]:
        """READ KEYS and READ RESERVATION on the monitor nexus."""
        return await self._monitor.read_keys_and_reservation()

    async def capture_identity(self) -> DeviceIdentity:
        return await self._monitor.capture_identity()

    async def capture_tmfs(self) -> SupportedTmfs | None:
        return await self._monitor.capture_tmfs()

    async def monitor_command(self, cdb: bytes, alloc: int) -> Result:
        """A command of the device's own on the monitor nexus (a probe, e.g.
        REPORT SUPPORTED OPERATION CODES); unit attentions met are retried."""
        return await self._monitor.run(cdb, alloc)

    async def verify(self, reason: str = "on demand") -> tuple[StateChange, ...]:
        """Reconcile every tracked guest with the backend now (journaled)."""
        self.note_ports()
        before = self.snooper.state.to_dict()
        try:
            read: Any = await self.read_full_status()
            if read is None:
                read = await self.read_keys_and_reservation()
            changes, how = self.verification.apply(self.snooper, read, time.time())
        except (PrDecodeError, ReconcileError, IscsiError, DeviceError) as exc:
            raise self.verify_failed(reason, exc, isinstance(exc, IscsiError)) from exc
        if self._verify_retry is not None:  # this one did it
            self._verify_retry.cancel()
            self._verify_retry = None
        self.verified(reason, how, changes, before)
        return changes



__all__ = ["BackendMonitor", "Monitor", "submit_retrying"]
