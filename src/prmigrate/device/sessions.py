"""The passthrough device's backend sessions (asyncio): the shell of the
link table (``links.py``) and the task management queue (``tmf.py``).

Which backend nexus opens or closes, which commands wait for it and what a
task management function holds back is decided there; this module logs in
and out, sends what waited and the functions, and answers.

A backend outage of any length: every session logs in again for as long as
the device lives (``iscsi.initiator_core.PERSISTENT``), a command waits at
most ``HOLD_TIMEOUT`` and is then answered BUSY; a guest's first login to a
backend that is down is tried the same way (``login_within``). After a
re-login the PR state is checked before the held commands go
(``_verify_after_login``, done by ``BackendMonitor``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..aio import BackgroundTasks, chain, run_plan, settle
from ..iscsi import initiator as _initiator
from ..iscsi.initiator import IscsiError, Session
from ..lun.types import Result
from .core import UA_RETRIES, DeviceError, UaRetry
from .links import ABORTED, Action, Do, Link, LinkTable, Login, Waiting
from .plans import Call, Own
from .tmf import Tmf

Answer = Result | asyncio.Future[Result]


async def submit_retrying(session: Session, lun: int, cdb: bytes, data: Any, retry: UaRetry,
                          n: int = 0) -> Result:
    """One of the device's own commands under the one unit attention rule:
    the initiator's retry (``Session.submit_retrying``, ``UA_RETRIES``
    sends) with ``retry`` keeping the unit attentions met, also when the
    transport fails midway. The last answer."""
    return await session.submit_retrying(lun, cdb, data, n, tries=UA_RETRIES, on_retry=retry.note)


class BackendSessions(LinkTable):
    """The link table with its backend sessions: logging in and out, the
    commands that waited, task management functions and nexus events."""

    def __init__(self, *args: Any, connect: Callable[..., Any] | None = None, **kwargs: Any) -> None:
        """``LinkTable``'s arguments; ``connect``: how to log in
        (``iscsi.initiator.connect``'s signature; a test's fake backend)."""
        super().__init__(*args, **kwargs)
        self._connect = connect or _initiator.connect
        self._inflight: set[asyncio.Future[Any]] = set()
        self._bg = BackgroundTasks(self, "background task")
        self._tmf_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Log out of every backend session; pending guest commands fail."""
        if self._closed:
            return
        self._do(self.shut())
        self._bg.cancel_all()
        sessions = [b.session for b in self._backends.values() if b.session is not None]
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        for b in self._backends.values():
            b.session = None

    def _do(self, actions: list[Action]) -> None:
        """Execute what the link table asks for (its events' answers)."""
        for a in actions:
            b: Any = a.link
            if a.do is Do.SEND:
                for cdb, data_out, n, fut in a.commands:
                    chain(self._submit_now(b.session, cdb, data_out, n), fut)
            elif a.do is Do.ANSWER:
                for w in a.commands:
                    settle(w.token, a.result)
            elif a.do is Do.OPEN:
                b.opening = self._bg.spawn(self._open(b))
            elif a.do is Do.CLOSE:
                b.closing = self._bg.spawn(self._close_backend(b))
            else:
                self._tmf_task = self._bg.spawn(self._run_tmf(a.tmf))  # type: ignore[arg-type]

    # --------------------------------------------------------- sessions
    async def _open_session(self, login: Login) -> Session:
        """Log in as the link table's ``login`` says."""
        if len(login.isids) > 1:  # several backend= : one nexus per path (device/multipath.py)
            from .multipath import open_paths_of
            return await open_paths_of(self, login)
        session: Session = await self._connect(self.url, self.target_iqn, self.host_initiator, login.isids[0],
                                               on_unit_attention=login.on_ua, **login.options)
        self.log.info("backend nexus %s,i,0x%012x -> %s (%s) open", self.host_initiator, login.isids[0],
                      self.target_iqn, login.what)
        return session

    async def _open(self, b: Link) -> None:
        try:
            if b.closing is not None:
                await asyncio.shield(b.closing)
            b.session = await _initiator.login_within(lambda: self._open_session(self.guest_login(b)),
                                                      *self.first_login(b))
        except (IscsiError, OSError, TimeoutError) as exc:
            self._do(self.open_failed(b, exc))
            return
        finally:
            b.opening = None
        self._do(self.opened(b))

    async def _close_backend(self, b: Link) -> None:
        session = self.closing_started(b)
        if session is not None:
            await session.close()
        b.closing = None

    async def backend_session(self, guest: str) -> Session:
        """The backend session of ``guest`` (opened if needed)."""
        b = self.link(guest)
        while b.session is None:
            self._do(self.want_session(b))
            await asyncio.shield(b.opening)
            if b.session is None:
                raise DeviceError(f"cannot reach the backend for {guest}")
        return b.session  # type: ignore[no-any-return]

    # ------------------------------------------------------ forwarding
    def _submit_now(self, session: Session, cdb: bytes, data_out: Any, n: int) -> Answer:
        try:  # no per-command bookkeeping: drain() asks the sessions
            return session.submit(self.lun, cdb, data_out, 0 if len(data_out) else n)
        except (IscsiError, ValueError) as exc:
            return self.not_forwarded(cdb, exc)

    def _submit(self, b: Link, cdb: bytes, data_out: Any, n: int) -> Answer:
        s = b.session
        if s is not None and b.closing is None and not self.tmfs.busy:
            return self._submit_now(s, cdb, data_out, n)
        if self._closed:
            return ABORTED
        fut = self._pending()
        self._do(self.queue(b, Waiting(cdb, data_out, n, fut)))
        return fut

    @staticmethod
    def _future() -> asyncio.Future[Result]:
        return asyncio.get_running_loop().create_future()

    def _pending(self) -> asyncio.Future[Result]:
        """A future for an answer ``drain`` waits for."""
        fut = self._future()
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return fut

    # ------------------------------------------------------------- TMFs
    async def _run_tmf(self, tmf: Tmf) -> None:
        b = self._backends[tmf.key]
        try:
            await run_plan(self.tmf_plan(tmf), lambda step: self._step_on(b.session, step), IscsiError)
        finally:
            self._tmf_task = None
            self._do(self.tmf_done())

    def _step_on(self, s: Session, step: Own | Call) -> Awaitable[Any]:
        """One step of a plan (``plans.py``) on the session ``s``."""
        if isinstance(step, Own):
            return submit_retrying(s, self.lun, step.cdb, step.data, step.retry, step.alloc)
        return getattr(s, step.method)(*step.args, lun=self.lun)  # type: ignore[no-any-return]


__all__ = ["Answer", "BackendSessions", "Link", "submit_retrying"]
