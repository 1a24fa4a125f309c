"""How the device watches the backend's PR state (asyncio): the monitor
nexus, and the verifications and command plans run on it.

Host initiator name, ISID ``derive_isid(device, MONITOR)``, never
registered: a PR IN issued on a guest's own nexus could consume a unit
attention meant for the guest. Unit attentions met here are the monitor's
own: retried (``UaRetry``) and dropped. What to read and what the answers
mean is decided by the plans (``plans.py``) and ``verify.Verification``,
when to verify by ``verify.VerifySchedule``, what is learnt by the core
(``verified``, ``verify_failed``); this module sends, and waits out the
retry's delay.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..aio import run_plan
from ..iscsi.initiator import IscsiError, Session, link_state_of
from . import plans
from .core import DeviceError
from .sessions import BackendSessions
from .state import StateChange


class BackendMonitor(BackendSessions):
    """The device's verifications: one at a time, coalesced, on the monitor
    nexus; after a failure, again on a backing-off timer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._monitor: Session | None = None
        self._monitor_lock = asyncio.Lock()
        self._verifying: asyncio.Task[Any] | None = None

    async def close(self) -> None:
        """Log out of every backend session and the monitor's."""
        monitor, self._monitor = self._monitor, None
        await asyncio.gather(super().close(), *(() if monitor is None else (monitor.close(),)),
                             return_exceptions=True)

    async def run(self, plan: plans.Plan) -> Any:
        """Run ``plan`` (``plans.py``: ``full_status_plan``, ``keys_plan``,
        ``command_plan``, ...), its commands on the monitor nexus (opened on
        first use): what it returns, or its ``IscsiError`` / ``DeviceError``."""
        return await run_plan(plan, self._step, (IscsiError, DeviceError))

    async def _step(self, step: plans.Step, session: Session | None = None) -> Any:
        """One step of a plan: a verification, or a command on ``session``
        (None: the monitor's, opened on first use)."""
        if isinstance(step, plans.Verify):
            if step.after:  # a PR OUT's: the answer goes once it is done
                return await self._bg.spawn(self._verify_after(step.reason))
            return await self.verify(step.reason)
        if session is None:
            async with self._monitor_lock:
                if self._monitor is None:
                    self._monitor = await self._open_session(self.monitor_login())
            session = self._monitor
        return await self._step_on(session, step)

    def want_verify(self, reason: str = "state in doubt") -> None:
        """One coalesced verification in the background."""
        if not self._closed and self.schedule.want(reason):
            self._verifying = self._bg.spawn(self._verify_loop())

    async def _verify_loop(self) -> None:
        try:
            while (reason := self.schedule.next()) is not None:
                try:
                    await self.verify(reason)
                except Exception as exc:
                    self.log.warning("verification failed: %s", exc)
                    self._retry_verify_later(coalescing=True)
        finally:
            self._verifying = None

    async def _verify_after(self, reason: str) -> None:
        try:
            await self.verify(reason)
        except Exception as exc:  # the PR OUT's answer still goes
            self.log.warning("verification %s failed: %s", reason, exc)
            self._retry_verify_later()

    async def _verify_after_login(self, key: str) -> None:
        """The backend nexus of ``key`` logged in again after a lost
        connection (the session holds the guest's commands meanwhile): the
        LUN may have changed while it was away (a target restarted without
        APTPL, another host's PREEMPT), so the tracked PR state is checked
        before the first command goes. A failed check is retried later."""
        if self._monitor is not None and hasattr(self._monitor, "retry_now"):
            self._monitor.retry_now()  # the check reads through it: no waiting out its backoff
        try:
            changes = await self.verify(f"backend nexus of {key} logged in again")
        except DeviceError:
            self._retry_verify_later()
            raise
        self.log.info("backend nexus of %s logged in again: PR state verified before resuming, "
                      "%d change(s)", key, len(changes))

    def monitor_link_state(self) -> dict[str, Any] | None:
        """``Session.link_state()`` of the monitor's session (None: none)."""
        return link_state_of(self._monitor)

    def _retry_verify_later(self, coalescing: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if (delay := None if self._closed else self.schedule.failed(coalescing, now)) is not None:
            self.log.info("verifying again in %.1f s", delay)
            self._bg.spawn(self._retry_after(delay, self.schedule.retry_at))

    async def _retry_after(self, delay: float, at: float | None) -> None:
        """The retry's wait: a background task (closing the device cancels
        it; a migration's ``drain`` does not wait for it)."""
        await asyncio.sleep(delay)
        if self.schedule.due(at):
            self.want_verify("retry after a failed verification")

    async def verify(self, reason: str = "on demand") -> tuple[StateChange, ...]:
        """Reconcile every tracked guest with the backend now (journaled)."""
        return await self.run(plans.verify_plan(self, reason, time.time))  # type: ignore[no-any-return]


__all__ = ["BackendMonitor"]
