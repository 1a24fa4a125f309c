"""The passthrough device's backend sessions (asyncio).

One initiator session per backend I_T nexus (``core.Backend``), opened on
the guest's first command and logged out when its last frontend nexus ends
(the LUN then sees the I_T nexus loss itself). Commands for a nexus not open
yet, or sent while a task management function is not answered, wait in
order (``waiting``). Task management: the guest's LOGICAL UNIT RESET,
TARGET WARM/COLD RESET become a LOGICAL UNIT RESET of the backend LUN on
the guest's nexus (a guest must not reset the shared target); CLEAR TASK
SET is forwarded as is. The guest has the function's response at once, so
until the backend answered it every guest command waits (all backend
nexuses): a command sent after the response reaches the LU after the
function, as on a LU (MultipathIO.Reset resets through one path and
expects the UA on the next command of each). A RELEASE for a departed
SCSI-2 holder is sent the same way.

A backend outage of any length: every session logs in again for as long as
the device lives (``iscsi.initiator_core.PERSISTENT``), a command waits at
most ``HOLD_TIMEOUT`` and is then answered BUSY; a guest's first login to a
backend that is down is tried the same way (``login_within``). After a
re-login the PR state is checked before the held commands go
(``_verify_after_login``, done by ``BackendMonitor``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..aio import BackgroundTasks
from ..iscsi import initiator as _initiator
from ..iscsi.initiator import IscsiError, Session
from ..iscsi.initiator_core import HOLD_TIMEOUT, PERSISTENT
from ..iscsi.url import parse_url
from ..lun.types import Nexus, Result
from ..scsi.constants import Opcode, Status
from ..scsi.sense import Sense, encode_sense
from .config import DeviceConfig
from .core import UA_RETRIES, Backend, DeviceCore, DeviceError, Purpose, UaRetry
from .identity import DeviceIdentity, IdentityMode
from .state import DevicePrState

_CHECK = Status.CHECK_CONDITION


def _aborted() -> Result:
    """COMMAND ABORTED: the backend could not be reached for this command."""
    return Result(_CHECK, b"", encode_sense(Sense.COMMAND_ABORTED))


def _busy() -> Result:
    """BUSY (SAM-5 5.3.1: the LU cannot take the command now; the guest
    retries): the backend was not reachable within ``HOLD_TIMEOUT``."""
    return Result(Status.BUSY, b"", b"")


Connector = Callable[..., Any]  # iscsi.initiator.connect's signature
Answer = Result | asyncio.Future[Result]
_GUEST = IdentityMode.GUEST


async def submit_retrying(session: Session, lun: int, cdb: bytes, data: Any, retry: UaRetry,
                          n: int = 0) -> Result:
    """One of the device's own commands under the one unit attention rule:
    the initiator's retry (``Session.submit_retrying``, ``UA_RETRIES``
    sends) with ``retry`` keeping the unit attentions met, also when the
    transport fails midway. The last answer."""
    return await session.submit_retrying(lun, cdb, data, n, tries=UA_RETRIES, on_retry=retry.note)


class Link(Backend):
    """A backend nexus with its session and the commands waiting for it."""

    def __init__(self, key: str, port: Any) -> None:
        super().__init__(key, port)
        self.session: Session | None = None
        self.opening: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None
        self.waiting: list[tuple[bytes, Any, int, asyncio.Future[Result]]] = []


class BackendSessions(DeviceCore):
    """The core with its backend sessions: opening, closing, the commands
    waiting for them, task management functions and nexus events."""

    _backends: dict[str, Link]  # type: ignore[assignment]
    describe_result = staticmethod(_initiator.describe_result)

    def __init__(self, config: DeviceConfig, host_initiator: str, *, state_dir: str | Path | None = None,
                 identity: DeviceIdentity | None = None, state: DevicePrState | None = None,
                 frontend_lun: int = 0, connect: Connector | None = None,
                 session_options: dict[str, Any] | None = None, fsync: bool = True) -> None:
        super().__init__(config, host_initiator, state_dir=state_dir, identity=identity, state=state,
                         frontend_lun=frontend_lun, fsync=fsync)
        self.url = parse_url(config.backend_url, require_lun=False)
        self.portal, self.target_iqn = self.url.portal, config.target_iqn
        self._connect = connect or _initiator.connect
        self._session_options = dict(session_options or {})
        self._inflight: set[asyncio.Future[Any]] = set()
        self._bg = BackgroundTasks(self, "background task")
        self.path_sets: list[Any] = []  # with several backends: every guest's (device/multipath.py)

    def _new_backend(self, key: str, port: Any) -> Link:
        return Link(key, port)

    def connected(self, b: Backend) -> bool:
        s = getattr(b, "session", None)
        return s is not None and s.logged_in

    async def close(self) -> None:
        """Log out of every backend session; pending guest commands fail."""
        if self._closed:
            return
        self._closed = True
        self._bg.cancel_all()
        for b in self._backends.values():
            for *_, fut in b.waiting:
                if not fut.done():
                    fut.set_exception(DeviceError("device closed"))
            b.waiting.clear()
        sessions = [b.session for b in self._backends.values() if b.session is not None]
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        for b in self._backends.values():
            b.session = None

    def link_state(self, b: Backend) -> dict[str, Any] | None:
        """``Session.link_state()`` of ``b``'s backend session (None: none)."""
        return _initiator.link_state_of(getattr(b, "session", None))

    # --------------------------------------------------------- sessions
    async def _open_session(self, isid: int, what: str, on_ua: Any = None, on_event: Any = None,
                            on_reconnect: Any = None, isids: tuple[int, ...] = ()) -> Session:
        opts = dict(self._session_options)
        opts.setdefault("queue_depth", 128)
        # an outage of any length: log in again for as long as the device
        # lives; a guest command waits at most HOLD_TIMEOUT, then gets BUSY
        opts.setdefault("reconnect_policy", PERSISTENT)
        opts.setdefault("hold_timeout", HOLD_TIMEOUT)
        if on_reconnect is not None:
            opts["on_reconnect"] = on_reconnect
        if on_event is not None:
            opts["on_async_event"] = on_event
        if len(isids) > 1:  # several backend= : one nexus per path (device/multipath.py)
            from .multipath import open_multipath
            mp: Any = await open_multipath(self._connect, self.config.backend_urls, self.target_iqn,
                                           self.host_initiator, isids, opts, rewrite_pr_in=what != "monitor",
                                           lun=self.lun, logger=self.log, peers=self.path_sets,
                                           on_unit_attention=on_ua,
                                           on_reconnect=on_reconnect)
            self.log.info("backend nexus %s (%s) open on %d paths", ", ".join(
                f"{self.host_initiator},i,0x{i:012x}" for i in isids), what, len(isids))
            return mp  # type: ignore[no-any-return]
        session: Session = await self._connect(self.url, self.target_iqn, self.host_initiator, isid,
                                               on_unit_attention=on_ua, **opts)
        self.log.info("backend nexus %s,i,0x%012x -> %s (%s) open", self.host_initiator, isid,
                      self.target_iqn, what)
        return session

    async def _open(self, b: Link) -> None:
        try:
            if b.closing is not None:
                await asyncio.shield(b.closing)
            # the backend down: its commands wait (HOLD_TIMEOUT) as a
            # reconnecting session's do, then get BUSY, which guests retry
            b.session = await _initiator.login_within(
                lambda: self._open_session(
                    b.port.isid, f"guest {b.key}",
                    lambda lun, sense: self.unit_attention_met(b, sense.asc, sense.ascq),
                    lambda message, sense: self.async_unit_attention(b, sense),
                    lambda: self._verify_after_login(b.key), self.path_isids(b.key)),
                HOLD_TIMEOUT, PERSISTENT,
                lambda exc: self.log.warning("backend nexus for %s: %s; trying again", b.key, exc),
            )
        except (IscsiError, OSError, TimeoutError) as exc:
            self.log.error("cannot open backend nexus for %s: %s", b.key, exc)
            waiting, b.waiting = b.waiting, []
            for *_, fut in waiting:
                if not fut.done():
                    fut.set_result(_busy())
            return
        finally:
            b.opening = None
        if self._tmf is None:  # else the waiting commands go when the function is done
            self._send_waiting(b, b.session)

    async def _verify_after_login(self, key: str) -> None:
        """Awaited by ``key``'s backend session after it logged in again,
        before its held commands go (``BackendMonitor`` checks the PR state)."""

    def _send_waiting(self, b: Link, s: Session) -> None:
        """Forward, in order, the commands that waited on ``b``."""
        waiting, b.waiting = b.waiting, []
        for cdb, data_out, n, fut in waiting:
            chain(self._submit_now(s, cdb, data_out, n), fut)

    async def _close_backend(self, b: Link) -> None:
        session, b.session = b.session, None
        if session is not None:
            self.log.info("guest %s left: closing its backend nexus (I_T nexus loss)", b.key)
            b.drop_reservation()  # the LU sees the nexus loss and releases it
            await session.close()
        b.closing = None

    def _close_if_unused(self, b: Link) -> None:
        if not (b.frontends or b.session is None or b.closing is not None or self._closed):
            b.closing = self._bg.spawn(self._close_backend(b))

    async def backend_session(self, guest: str) -> Session:
        """The backend session of ``guest`` (opened if needed)."""
        b: Link = self._backend(guest)  # type: ignore[assignment]
        while b.session is None:
            if self._closed:
                raise DeviceError("device closed")
            if b.opening is None:
                b.opening = self._bg.spawn(self._open(b))
            await asyncio.shield(b.opening)
            if b.session is None:
                raise DeviceError(f"cannot reach the backend for {guest}")
        return b.session

    # ------------------------------------------------------ forwarding
    def _submit_now(self, session: Session, cdb: bytes, data_out: Any, n: int) -> Answer:
        try:  # no per-command bookkeeping: drain() asks the sessions
            return session.submit(self.lun, cdb, data_out, 0 if len(data_out) else n)
        except (IscsiError, ValueError) as exc:
            return self._not_forwarded(cdb, exc)

    def _not_forwarded(self, cdb: bytes, exc: Exception) -> Result:
        self.log.warning("cannot forward CDB %s: %s", bytes(cdb[:16]).hex(), exc)
        if isinstance(exc, ValueError):
            return Result(_CHECK, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB))
        return _aborted()

    def _submit(self, b: Link, cdb: bytes, data_out: Any, n: int) -> Answer:
        s = b.session
        if s is not None and b.closing is None and self._tmf is None:
            return self._submit_now(s, cdb, data_out, n)
        if self._closed:
            return _aborted()
        fut = self._future()
        b.waiting.append((cdb, data_out, n, fut))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        if b.opening is None and (s is None or self._tmf is None):
            b.opening = self._bg.spawn(self._open(b))
        return fut

    @staticmethod
    def _future() -> asyncio.Future[Result]:
        return asyncio.get_running_loop().create_future()

    # --------------------------------------------------- nexus events, TMFs
    def nexus_lost(self, nexus: Nexus) -> None:
        b, release = self.frontend_left(nexus)
        if b is None:
            return
        link: Link = b  # type: ignore[assignment]
        if release is not None:  # like a TMF: what any guest sends next reaches the LU after it
            self._forward_tmf(link, Opcode(release[0]).name, lambda s: self._release_for_lost(link, s, release))
        if not b.frontends and self._held is None:
            self._close_if_unused(link)

    async def _release_for_lost(self, b: Link, s: Session, cdb: bytes) -> None:
        """RELEASE for a holder that left; its UAs reached no frontend: all get them."""
        if b.closing is not None:
            return  # the backend nexus ends: its loss releases the reservation
        what = Opcode(cdb[0]).name
        retry = UaRetry(Purpose.RELEASE)
        try:
            r = await submit_retrying(s, self.lun, cdb, b"", retry)
        except IscsiError as exc:
            self.log.warning("%s on the backend nexus of %s failed: %s", what, b.key, exc)
            return
        finally:
            for sense in retry.owed:
                self.fan_out(b, None, sense)
        self.log.info("%s on the backend nexus of %s -> %s", what, b.key, _initiator.describe_result(r))

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        """A guest's LOGICAL UNIT / TARGET RESET: a LOGICAL UNIT RESET of the
        backend LUN (the frontend refuses a target reset the backend does
        not report, ``target_reset_supported``)."""
        b: Link | None = self.reset_target(nexus)  # type: ignore[assignment]
        if b is not None and b.session is not None:
            self._forward_tmf(b, "LOGICAL UNIT RESET", lambda s: s.lun_reset(self.lun))

    def clear_task_set(self, nexus: Nexus) -> None:
        b = self._backends.get(self.backend_key(nexus))
        if b is not None and b.session is not None:
            self._forward_tmf(b, "CLEAR TASK SET", lambda s: s.clear_task_set(self.lun))

    def _forward_tmf(self, b: Link, what: str, call: Callable[[Session], Any]) -> None:
        """Every backend's commands wait until the backend answered the
        function (the guest has its response already)."""
        self._tmf = self._bg.spawn(self._run_tmf(b, self._tmf, what, call))
        for other in self._backends.values():
            other.pause(True)

    async def _run_tmf(self, b: Link, before: Any, what: str, call: Callable[[Session], Any]) -> None:
        me = asyncio.current_task()
        try:
            if before is not None:
                await asyncio.wait([before])
            if b.session is None:
                raise IscsiError("backend nexus closed")
            await call(b.session)
            self.log.info("%s done on the backend", what)
        except IscsiError as exc:
            self.log.warning("backend %s failed: %s", what, exc)
        finally:
            if self._tmf is me:
                self._tmf = None
                for x in self._backends.values():  # send what waited for it
                    x.pause(False)
                    if x.session is not None and x.closing is None:
                        self._send_waiting(x, x.session)
                    elif x.waiting and not self._closed and x.opening is None:
                        x.opening = self._bg.spawn(self._open(x))


def chain(src: Answer, dst: asyncio.Future[Result]) -> None:
    on_outcome(src, lambda r: settle(dst, r))


def settle(dst: asyncio.Future[Result], r: Result | BaseException | None) -> None:
    if dst.done():
        return
    if r is None:
        dst.cancel()
    elif isinstance(r, BaseException):
        dst.set_exception(r)
    else:
        dst.set_result(r)


def map_answer(src: asyncio.Future[Result], dst: asyncio.Future[Result], fn: Callable[[Result], Result]) -> asyncio.Future[Result]:
    on_outcome(src, lambda r: settle(dst, fn(r) if isinstance(r, Result) else r))
    return dst


def on_outcome(r: Answer, fn: Callable[[Result | BaseException | None], Any]) -> None:
    """``fn(result, error, or None when cancelled)`` once ``r`` is settled
    (at once when it is a Result)."""
    if isinstance(r, Result):
        fn(r)
        return

    def settled(f: asyncio.Future[Result]) -> None:
        fn(None if f.cancelled() else (f.exception() or f.result()))

    r.add_done_callback(settled)


def on_answer(r: Answer, fn: Callable[[Result], Any]) -> None:
    """``fn(result)`` once the backend's answer is there (at once if it is:
    before whoever awaits it can send the next command)."""
    if isinstance(r, Result):
        fn(r)
    elif r.done():
        if not r.cancelled() and r.exception() is None:
            fn(r.result())
    else:
        r.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None else fn(f.result()))



__all__ = [
    "Answer",
    "submit_retrying",
    "BackendSessions",
    "Connector",
    "Link",
    "chain",
    "map_answer",
    "on_answer",
    "on_outcome",
    "settle",
]
