"""asyncio iSCSI initiator: a thin shell around ``InitiatorCore``.

The shell owns the socket, the clock and the futures; everything about the
protocol lives in :mod:`prmigrate.iscsi.initiator_core`. There is no Task per
command: ``submit`` returns a Future that the core's events complete, and all
bytes the core produces during one ``data_received`` (or one loop iteration
of submits) go out in one ``write``.

    session = await connect("iscsi://127.0.0.1:3260/iqn.x:t/1",
                            initiator_name="iqn.x:host1", isid=0x23d000000001)
    result = await session.submit(1, cdb, data_in_len=512)
    await session.close()

After a lost connection the session logs in again with the same ISID (session
reinstatement keeps the I_T nexus, hence PR registrations) and re-issues
every command that got no status; ``reconnect=False`` fails them instead.
How often and how long it tries is a ``ReconnectPolicy`` (by default 0.05 s
doubling to 2 s, giving up ``reconnect_timeout`` after the loss;
``initiator_core.PERSISTENT`` never gives up). With ``hold_timeout`` a
command that waits that long for the session to come back completes with
BUSY; ``on_reconnect`` is awaited after a re-login before any queued
command is sent. ``link_state()`` tells whether the session is up, down
or retrying, and since when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..lun.types import Result, unit_attention
from ..scsi.cdb import ReportTmfsCdb, SupportedTmfs
from ..scsi.constants import (
    Opcode,
    PrInAction,
    PrOutAction,
    PrType,
    ServiceActionIn16,
    Status,
)
from ..scsi.sense import DecodedSense
from . import flushpoint
from .initiator_core import (
    AsyncEventReceived,
    CommandDone,
    CommandFailed,
    ConnectionFailed,
    ConnectionLost,
    Event,
    InitiatorCore,
    IscsiError,
    Link,
    LinkState,
    LoginDone,
    LoginFailed,
    LoginRedirect,
    LoginTimeout,
    LogoutDone,
    Negotiated,
    ReconnectPolicy,
    RelaySink,
    SessionConfig,
    SessionLoginError,
    TaskAborted,
    TextDone,
    TmfDone,
    UnitAttention,
    describe_result,
    link_state_of,
)
from .login import LoginError, SessionParams
from .pdu import AsyncMessage, LoginStatus, TaskAttribute, TmfFunction, TmfResponse
from .url import IscsiUrl, parse_portal, parse_url

log = logging.getLogger(__name__)

SIMPLE = TaskAttribute.SIMPLE
ORDERED = TaskAttribute.ORDERED
HEAD_OF_QUEUE = TaskAttribute.HEAD_OF_QUEUE

_TICK = 0.5  # seconds between timer calls into the core
_MAX_REDIRECTS = 8
UA_RETRIES = 4  # submissions of one command while it meets unit attentions


__all__ = [
    "ConnectionLost",
    "IscsiError",
    "LoginError",
    "LoginTimeout",
    "ScsiError",
    "SessionLoginError",
    "Session",
    "TmfError",
    "connect",
    "describe_result",
    "discover",
    "link_state_of",
]


class ScsiError(IscsiError):
    """A convenience helper's command did not end with GOOD status."""

    def __init__(self, result: Result, what: str) -> None:
        self.result = result
        super().__init__(f"{what}: {describe_result(result)}")


class TmfError(IscsiError):
    def __init__(self, response: int) -> None:
        try:
            name = TmfResponse(response).name
        except ValueError:
            name = f"0x{response:02x}"
        super().__init__(f"task management function failed: {name}")
        self.response = response


_RECV_BUFFER = 256 * 1024


class _Protocol(asyncio.BufferedProtocol):
    """Receives into one buffer per connection (``recv_into``): a plain
    Protocol gets a fresh 256 KiB bytes object per read, which costs an
    mmap, an mremap and an munmap plus page faults on every read event."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self._view = memoryview(bytearray(_RECV_BUFFER))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        # the core copies what it keeps: the buffer is reused by the next read.
        # Flushes deferred meanwhile (e.g. a guest's answers) run at the end.
        flushpoint.begin()
        try:
            self.session._on_data(self, self._view[:nbytes])
        finally:
            flushpoint.end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._on_lost(self, exc)


class Session:
    """One iSCSI session (one connection at a time) to a target."""

    def __init__(
        self,
        portal: str,
        config: SessionConfig,
        *,
        login_timeout: float = 10.0,
        reconnect: bool = True,
        reconnect_timeout: float = 30.0,
        on_async_event: Callable[[AsyncMessage, DecodedSense | None], Any] | None = None,
        on_unit_attention: Callable[[int, DecodedSense], Any] | None = None,
        lun: int = 0,
        reconnect_policy: ReconnectPolicy | None = None,
        on_reconnect: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.portal = portal
        self.lun = lun  # default LUN of the helpers
        self.block_size = 512  # of read/write; read_capacity16 updates it
        self.config = config
        self.login_timeout = login_timeout
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        if reconnect_policy is None:
            reconnect_policy = ReconnectPolicy(
                first=0.05, cap=2.0, jitter=0.0, give_up_after=reconnect_timeout)
        self.link = Link(reconnect_policy)
        # awaited after a re-login, before the queued commands go (bounded
        # by the command timeout; its failure is logged and they go anyway)
        self.on_reconnect = on_reconnect
        self._hold_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()  # cuts the wait before the next login attempt (retry_now)
        self.on_async_event = on_async_event
        self.on_unit_attention = on_unit_attention
        self.core = InitiatorCore(config)
        self.reconnects = 0  # successful re-logins after a lost connection
        self._loop = asyncio.get_running_loop()
        self._proto: _Protocol | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._done_callbacks: dict[int, Callable[[Any], Any]] = {}  # handle -> submit_then's done
        self._login_fut: asyncio.Future[Event] | None = None
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._reconnecting: asyncio.Future[None] | None = None
        self._closing = False
        self._dead = False  # the connection is gone for good (no reconnect)
        self._closed = asyncio.Event()
        self.link.since = self._loop.time()

    # ------------------------------------------------------------ properties

    def link_state(self) -> dict[str, Any]:
        """The connection's state for a status report: ``state`` (up, down,
        retrying, closed), ``since`` (UTC, ISO 8601) and, while down, the
        failed login attempts, the next delay, the last error and the
        commands held."""
        now = self._loop.time()
        link = self.link
        info: dict[str, Any] = {
            "state": link.state.value,
            "since": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (now - link.since))),
            "for-s": round(now - link.since, 3),
            "reconnects": self.reconnects,
        }
        if link.state is not LinkState.UP:
            info.update({"failed-attempts": link.failed, "next-delay-s": round(link.next_delay, 3),
                         "error": link.last_error, "held-commands": self.core.held})
        return info

    @property
    def params(self) -> SessionParams:
        """Negotiated operational parameters (digests, burst lengths...)."""
        return self.core.params

    @property
    def negotiated(self) -> Negotiated:
        """Parameters plus TSIH, target portal group tag and alias."""
        return self.core.negotiated

    @property
    def logged_in(self) -> bool:
        return self.core.logged_in

    @property
    def isid(self) -> int:
        return self.config.isid

    # ----------------------------------------------------------------- login

    async def _login(self) -> None:
        """Connect and log in, following redirections (status class 1)."""
        address = self.portal
        for _ in range(_MAX_REDIRECTS):
            host, port = parse_portal(address)
            try:
                _, proto = await asyncio.wait_for(
                    self._loop.create_connection(lambda: _Protocol(self), host, port),
                    self.login_timeout,
                )
            except (TimeoutError, OSError) as exc:
                raise ConnectionLost(f"cannot connect to {address}: {exc}") from exc
            self._proto = proto
            self._login_fut = self._loop.create_future()
            self.core.start_login(self._loop.time())
            self._flush()
            try:
                ev = await asyncio.wait_for(asyncio.shield(self._login_fut), self.login_timeout)
            except TimeoutError:
                self._drop(proto)
                raise LoginTimeout(f"login to {address} timed out") from None
            finally:
                self._login_fut = None
            if isinstance(ev, LoginDone):
                self._arm_timer()
                return
            self._drop(proto)
            if isinstance(ev, LoginRedirect):
                self.core.log.info("login redirected from %s to %s", address, ev.address)
                address = ev.address
                if ev.permanent:
                    self.portal = ev.address
                continue
            if isinstance(ev, LoginFailed):
                raise ev.error
            raise ConnectionLost(f"connection to {address} lost during login")
        raise SessionLoginError(LoginStatus.TARGET_ERROR, "too many login redirections")

    def _drop(self, proto: _Protocol | None) -> None:
        """Abort a connection; its connection_lost will be ignored."""
        if proto is self._proto:
            self._proto = None
        if proto is not None and proto.transport is not None:
            proto.transport.abort()

    # ------------------------------------------------------------ byte path

    def _on_data(self, proto: _Protocol, data: bytes | memoryview) -> None:
        if proto is not self._proto:
            return
        self._handle(self.core.receive_data(data, self._loop.time()))
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self.core.data_to_send()
        if out and self._proto is not None and self._proto.transport is not None:
            self._proto.transport.write(out)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            flushpoint.defer(self._flush, self._loop.call_soon)

    def _arm_timer(self) -> None:
        if self._timer is None and not self._closing:
            self._timer = self._loop.call_later(_TICK, self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        self._handle(self.core.handle_timer(self._loop.time()))
        self._flush()
        if self.core.logged_in:
            self._arm_timer()

    def _handle(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, CommandDone):
                cb = self._done_callbacks.pop(ev.handle, None) if self._done_callbacks else None
                if cb is not None:
                    try:  # _callback, inlined on the data path
                        cb(ev.result)
                    except Exception:
                        log.exception("callback %r failed", cb)
                else:
                    self._resolve(ev.handle, ev.result)
            elif isinstance(ev, (TmfDone, TextDone, LogoutDone)):
                self._resolve(ev.handle, ev)
            elif isinstance(ev, CommandFailed):
                cb = self._done_callbacks.pop(ev.handle, None) if self._done_callbacks else None
                if cb is not None:
                    self._callback(cb, ev.error)
                    continue
                fut = self._futures.pop(ev.handle, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ev.error)
            elif isinstance(ev, UnitAttention):
                if self.on_unit_attention is not None:
                    self._callback(self.on_unit_attention, ev.lun, ev.sense)
            elif isinstance(ev, AsyncEventReceived):
                if self.on_async_event is not None:
                    self._callback(self.on_async_event, ev.message, ev.sense)
            elif isinstance(ev, (LoginDone, LoginRedirect, LoginFailed)):
                if self._login_fut is not None and not self._login_fut.done():
                    self._login_fut.set_result(ev)
            elif isinstance(ev, ConnectionFailed):
                self.core.log.warning("dropping connection to %s: %s", self.portal, ev.reason)
                proto = self._proto
                self._on_lost(proto, None)  # at once: later bytes are not trusted
                self._drop(proto)
                return

    def _resolve(self, handle: int, value: object) -> None:
        fut = self._futures.pop(handle, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _callback(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a caller's bug must not break the session
            log.exception("callback %r failed", fn)

    def _on_lost(self, proto: _Protocol | None, exc: Exception | None) -> None:
        if proto is None or proto is not self._proto:
            return
        self._proto = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._login_fut is not None and not self._login_fut.done():
            self._login_fut.set_result(ConnectionFailed(f"connection lost: {exc}"))
        if not self.core.logged_in:
            # Lost during a login: the login attempt reports it; queued
            # commands wait for the next attempt (or fail when they stop).
            self._handle(self.core.connection_lost(retry=True))
            return
        retry = self.reconnect and not self._closing
        now = self._loop.time()
        self._handle(self.core.connection_lost(retry=retry, now=now))
        if retry:
            why = f"connection to {self.portal} lost" + (f": {exc}" if exc else "")
            self.core.log.warning("%s; %d command(s) to re-issue", self.link.lost(now, why),
                                  self.core.outstanding)
            self._arm_hold_timer()
            if self._reconnecting is None:
                self._reconnecting = asyncio.ensure_future(self._reconnect())
        else:
            self.link.closed(now, "connection lost")
            self._dead = True
            self._closed.set()

    def retry_now(self) -> None:
        """While waiting to log in again: try at once (another session to
        the same target just got in, so it is probably back)."""
        self._wake.set()

    def _arm_hold_timer(self) -> None:
        """While the session is down or gated: let the core complete the
        commands held too long (``SessionConfig.hold_timeout``)."""
        if self._hold_timer is None and self.config.hold_timeout is not None and not self._closing:
            self._hold_timer = self._loop.call_later(_TICK, self._on_hold_tick)

    def _on_hold_tick(self) -> None:
        self._hold_timer = None
        self._handle(self.core.expire_held(self._loop.time()))
        if self.link.state is not LinkState.UP or self.core.gated:
            self._arm_hold_timer()

    async def _reconnect(self) -> None:
        """Log in again with the same ISID, waiting as ``self.link.policy``
        says between attempts, until it works or the policy gives up; with
        ``on_reconnect``, await it (commands held) before resuming."""
        try:
            while not self._closing:
                if self.on_reconnect is not None:
                    self.core.gate()
                try:
                    await self._login()
                except (IscsiError, LoginError) as exc:
                    now = self._loop.time()
                    if self.link.exhausted(now):
                        self.core.log.error("giving up reconnecting to %s: %s", self.portal, exc)
                        break
                    delay, line = self.link.attempt_failed(now, str(exc), random.random())
                    if line is not None:
                        self.core.log.info("%s", line)
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
                self.reconnects += 1
                self.core.log.info("session to %s reinstated (isid 0x%012x), %s", self.portal,
                                   self.isid, self.link.up(self._loop.time()))
                if self.on_reconnect is not None:
                    try:
                        await asyncio.wait_for(self.on_reconnect(), self.config.command_timeout)
                    except Exception as exc:  # noqa: BLE001 - the owner's check; logged, then resume
                        self.core.log.warning("check after the re-login failed (%s); resuming", exc)
                    if not self.core.logged_in:  # lost again meanwhile: try again
                        continue
                    self.core.release_gate(self._loop.time())
                self._flush()
                return
            self._dead = True
            self.link.closed(self._loop.time(), "gave up reconnecting")
            self._handle(self.core.fail_all(ConnectionLost("reconnection failed")))
            self._closed.set()
        finally:
            self._reconnecting = None
            if self.core.gated and (self._closing or self._dead):
                self.core.gated = False

    # ---------------------------------------------------------------- public

    def _new_future(self, handle: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._futures[handle] = fut
        self._schedule_flush()
        return fut

    def submit(
        self,
        lun: int,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview = b"",
        data_in_len: int = 0,
        *,
        attr: TaskAttribute = SIMPLE,
    ) -> asyncio.Future[Result]:
        """Queue a SCSI command; the Future resolves to its Result (any status)
        or fails with an IscsiError (connection lost for good, rejected...)."""
        if self._closing or self._dead:
            raise ConnectionLost("session is closed" if self._closing else "connection lost")
        handle = self.core.submit(lun, cdb, data_out, data_in_len, attr, self._loop.time())
        return self._new_future(handle)

    def submit_then(
        self,
        lun: int,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview,
        data_in_len: int,
        done: Callable[[Result | BaseException], Any],
    ) -> None:
        """``submit`` without a Future: ``done(result)`` (or ``done(error)``
        with the IscsiError the Future would have failed with) is called once,
        synchronously from the receive path, so a forwarding device answers
        in the same loop turn. Raises like ``submit``."""
        if self._closing or self._dead:
            raise ConnectionLost("session is closed" if self._closing else "connection lost")
        handle = self.core.submit(lun, cdb, data_out, data_in_len, SIMPLE, self._loop.time())
        self._done_callbacks[handle] = done
        if not self._flush_scheduled:
            self._flush_scheduled = True
            flushpoint.defer(self._flush, self._loop.call_soon)

    def submit_relay(
        self, lun: int, cdb: bytes, data_in_len: int, sink: RelaySink, token: Any, data_out: bytes | bytearray | memoryview = b""
    ) -> None:
        """A command that completes by calling ``sink``
        (``InitiatorCore.submit_relay``): the forwarding device's read and
        write paths, no Future, no Result, no callback table. ``data_out``
        (a write's) becomes the session's (see the core's). Raises like ``submit``."""
        if self._closing or self._dead:
            raise ConnectionLost("session is closed" if self._closing else "connection lost")
        self.core.submit_relay(lun, cdb, data_in_len, sink, token, self._loop.time(), data_out)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            flushpoint.defer(self._flush, self._loop.call_soon)

    async def _tmf(self, function: TmfFunction, lun: int = 0, ref: int | None = None) -> int:
        handle = self.core.task_management(function, lun, ref, self._loop.time())
        ev: TmfDone = await self._new_future(handle)
        if ev.response != TmfResponse.FUNCTION_COMPLETE:
            raise TmfError(ev.response)
        return ev.response

    async def abort_task(self, future: asyncio.Future[Result]) -> int:
        """ABORT TASK for a Future returned by ``submit``."""
        handle = next((h for h, f in self._futures.items() if f is future), None)
        if handle is None:
            raise KeyError("not an outstanding command of this session")
        if self.core.cancel_queued(handle):  # never sent: nothing to ask the target
            fut = self._futures.pop(handle)
            fut.set_exception(TaskAborted("aborted before it was sent"))
            return TmfResponse.FUNCTION_COMPLETE
        return await self._tmf(TmfFunction.ABORT_TASK, 0, handle)

    async def abort_task_set(self, lun: int) -> int:
        return await self._tmf(TmfFunction.ABORT_TASK_SET, lun)

    async def clear_task_set(self, lun: int) -> int:
        return await self._tmf(TmfFunction.CLEAR_TASK_SET, lun)

    async def lun_reset(self, lun: int) -> int:
        return await self._tmf(TmfFunction.LOGICAL_UNIT_RESET, lun)

    async def target_warm_reset(self) -> int:
        return await self._tmf(TmfFunction.TARGET_WARM_RESET)

    async def target_cold_reset(self) -> int:
        return await self._tmf(TmfFunction.TARGET_COLD_RESET)

    async def send_targets(self, what: str = "All") -> list[tuple[str, str]]:
        ev: TextDone = await asyncio.wait_for(
            self._new_future(self.core.send_targets(what, self._loop.time())),
            self.config.command_timeout,
        )
        return ev.pairs

    async def close(self, timeout: float = 5.0) -> None:
        """Log out (if logged in) and close the connection."""
        if self._closing:
            return
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        proto = self._proto
        if self.core.logged_in and proto is not None:
            try:
                fut = self._new_future(self.core.logout(self._loop.time()))
                await asyncio.wait_for(fut, timeout)
            except (TimeoutError, IscsiError) as exc:
                self.core.log.info("logout from %s failed: %s", self.portal, exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.link.closed(self._loop.time(), "closed")
        self._handle(self.core.fail_all(ConnectionLost("session closed")))
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        self._proto = None

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def drop_connection(self) -> None:
        """Abort the TCP connection as if the network failed (tests, recovery)."""
        self._drop(self._proto)

    # ------------------------------------------------------- SCSI helpers
    # They address ``self.lun`` (the URL's LUN, or ``lun=`` given to
    # ``connect``) unless a ``lun`` keyword says otherwise.

    def _lun(self, lun: int | None) -> int:
        return self.lun if lun is None else lun

    async def submit_retrying(
        self,
        lun: int,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview = b"",
        data_in_len: int = 0,
        *,
        tries: int = UA_RETRIES,
        on_retry: Callable[[Result], Any] | None = None,
    ) -> Result:
        """Submit; an answer that is a UNIT ATTENTION (already reported
        through ``on_unit_attention``) is submitted again, as a disk driver
        would (SAM-5 5.14: a unit attention is reported once, then cleared),
        up to ``tries`` submissions in all. ``on_retry(result)`` sees every
        unit attention answer met, the last one too. The last answer is
        returned whatever its status. The one unit attention retry loop of
        prmigrate's initiator users (helpers below, the device's own commands:
        its PR OUT port, used by the migration too, its monitor and RELEASE,
        ``device/sessions.py``; the demo's guest and observer)."""
        return await retry_unit_attentions(self.submit, lun, cdb, data_out, data_in_len, tries, on_retry)

    async def _run(self, lun: int | None, cdb: bytes, data_out: bytes | bytearray | memoryview = b"",
                   data_in_len: int = 0) -> Result:
        return await self.submit_retrying(self._lun(lun), cdb, data_out, data_in_len)

    async def _good(self, lun: int | None, cdb: bytes, what: str, data_out: bytes | bytearray | memoryview = b"",
                    data_in_len: int = 0) -> Result:
        r = await self._run(lun, cdb, data_out, data_in_len)
        if r.status != Status.GOOD:
            raise ScsiError(r, what)
        return r

    async def test_unit_ready(self, *, lun: int | None = None) -> Result:
        """TEST UNIT READY; the Result whatever its status (unit attentions retried)."""
        return await self._run(lun, bytes(6))

    async def inquiry(self, evpd_page: int | None = None, alloc: int = 255, *,
                      lun: int | None = None) -> bytes:
        """INQUIRY data (standard, or the VPD page ``evpd_page``); ScsiError if not GOOD."""
        cdb = struct.pack(">BBBHB", Opcode.INQUIRY, 1 if evpd_page is not None else 0,
                          evpd_page or 0, alloc, 0)
        return bytes((await self._good(lun, cdb, "INQUIRY", data_in_len=alloc)).data_in)

    async def read_capacity16(self, *, lun: int | None = None) -> tuple[int, int]:
        """(number of blocks, block size); the block size is remembered for read/write."""
        cdb = struct.pack(">BBQIBB", Opcode.SERVICE_ACTION_IN_16,
                          ServiceActionIn16.READ_CAPACITY_16, 0, 32, 0, 0)
        data = bytes((await self._good(lun, cdb, "READ CAPACITY(16)", data_in_len=32)).data_in)
        if len(data) < 12:
            raise IscsiError("short READ CAPACITY(16) data")
        last, size = struct.unpack_from(">QI", data)
        if size:
            self.block_size = size
        return last + 1, size

    async def report_supported_tmfs(self, *, lun: int | None = None) -> SupportedTmfs:
        """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS; ScsiError if not GOOD."""
        r = await self._good(lun, ReportTmfsCdb.encode(4), "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
                             data_in_len=4)
        if not r.data_in:
            raise IscsiError("no REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS data")
        return SupportedTmfs.decode(bytes(r.data_in[:4]))

    async def read(self, lba: int, blocks: int, *, lun: int | None = None) -> bytes:
        """READ(16) of ``blocks`` blocks of ``self.block_size`` bytes; ScsiError if not GOOD."""
        cdb = struct.pack(">BBQIBB", Opcode.READ_16, 0, lba, blocks, 0, 0)
        r = await self._good(lun, cdb, "READ(16)", data_in_len=blocks * self.block_size)
        return bytes(r.data_in)

    async def write(self, lba: int, data: bytes, *, lun: int | None = None) -> None:
        """WRITE(16) of whole blocks; ScsiError if not GOOD."""
        if len(data) % self.block_size:
            raise ValueError("data is not a whole number of blocks")
        cdb = struct.pack(">BBQIBB", Opcode.WRITE_16, 0, lba, len(data) // self.block_size, 0, 0)
        await self._good(lun, cdb, "WRITE(16)", data_out=data)

    async def pr_in(self, action: PrInAction | int, alloc: int = 8192, *,
                    lun: int | None = None) -> Result:
        """PERSISTENT RESERVE IN; the Result is returned whatever its status
        (unit attentions are retried). Decode with ``prmigrate.scsi.pr``."""
        from ..scsi.pr import pr_in_cdb

        return await self._run(lun, pr_in_cdb(action, alloc), data_in_len=alloc)

    async def pr_out(
        self,
        action: PrOutAction | int,
        rtype: PrType | int,
        params: bytes,
        scope: int = 0,
        *,
        lun: int | None = None,
    ) -> Result:
        """PERSISTENT RESERVE OUT with a ready parameter list (``scsi.pr.
        pr_out_params``); any status returned (unit attentions are retried)."""
        from ..scsi.pr import pr_out_cdb

        return await self._run(lun, pr_out_cdb(action, rtype, scope, len(params)), params)


async def retry_unit_attentions(
    submit: Callable[[int, bytes, Any, int], Awaitable[Result]], lun: int, cdb: bytes, data_out: Any,
    data_in_len: int, tries: int, on_retry: Callable[[Result], Any] | None,
) -> Result:
    """The one unit attention retry loop (``Session.submit_retrying``, and a
    session that presents its interface, ``device/multipath.py``): up to
    ``tries`` submissions through ``submit``, again after each UNIT
    ATTENTION answer (SAM-5 5.14), which ``on_retry`` sees; the last answer."""
    r = Result()
    for _ in range(tries):
        r = await submit(lun, cdb, data_out, data_in_len)
        if unit_attention(r) is None:
            break
        if on_retry is not None:
            on_retry(r)
    return r


async def login_within(
    open_session: Callable[[], Awaitable[Session]],
    within: float,
    policy: ReconnectPolicy,
    on_first_failure: Callable[[BaseException], Any] | None = None,
) -> Session:
    """``await open_session()`` (a first login), tried again as ``policy``
    says for up to ``within`` seconds; the last error is raised. A
    forwarding device opens a guest's backend session this way, so a guest
    that logs in while the backend is down waits like a reconnecting one."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    failed = 0
    while True:
        try:
            return await open_session()
        except (IscsiError, LoginError, OSError, TimeoutError) as exc:
            failed += 1
            delay = policy.delay(failed, random.random())
            if loop.time() + delay > end:
                raise
            if failed == 1 and on_first_failure is not None:
                on_first_failure(exc)
            await asyncio.sleep(delay)


async def connect(
    url_or_portal: str | IscsiUrl,
    target: str | None = None,
    initiator_name: str = "iqn.2026-11.org.prmigrate:initiator",
    isid: int = 0x23D000000001,
    *,
    header_digest: bool | str = False,
    data_digest: bool | str = False,
    chap: tuple[str, str] | None = None,
    mutual: tuple[str, str] | None = None,
    queue_depth: int = 64,
    login_timeout: float = 10.0,
    command_timeout: float = 30.0,
    reconnect: bool = True,
    reconnect_timeout: float = 30.0,
    max_retries: int = 3,
    on_async_event: Callable[[AsyncMessage, DecodedSense | None], Any] | None = None,
    on_unit_attention: Callable[[int, DecodedSense], Any] | None = None,
    lun: int | None = None,
    reconnect_policy: ReconnectPolicy | None = None,
    on_reconnect: Callable[[], Awaitable[Any]] | None = None,
    **options: Any,
) -> Session:
    """Log in to ``target`` at a portal (``host[:port]``) or at an ``iscsi://``
    URL (whose target and user%password are used unless given). ``target``
    "" opens a discovery session. ``options`` go to SessionConfig
    (initial_r2t, immediate_data, max_burst_length, first_burst_length,
    max_recv_data_segment_length, max_outstanding_r2t, nop_interval...).
    ``lun`` is the helpers' default LUN (default: the URL's, else 0)."""
    if isinstance(url_or_portal, str) and url_or_portal.lower().startswith("iscsi://"):
        url_or_portal = parse_url(url_or_portal, require_lun=False)
    if isinstance(url_or_portal, IscsiUrl):
        portal = url_or_portal.portal
        if target is None:
            target = url_or_portal.target
        if chap is None and url_or_portal.user is not None:
            chap = (url_or_portal.user, url_or_portal.password or "")
        if lun is None:
            lun = url_or_portal.lun
    else:
        portal = url_or_portal
    if target is None:
        raise ValueError("no target name given")
    config = SessionConfig(
        initiator_name=initiator_name,
        isid=isid & 0xFFFFFFFFFFFF,
        target_name=target,
        header_digest=header_digest,
        data_digest=data_digest,
        chap=chap,
        mutual=mutual,
        queue_depth=queue_depth,
        command_timeout=command_timeout,
        max_retries=max_retries,
        **options,
    )
    session = Session(
        portal, config, login_timeout=login_timeout, reconnect=reconnect,
        reconnect_timeout=reconnect_timeout, on_async_event=on_async_event,
        on_unit_attention=on_unit_attention, lun=lun or 0,
        reconnect_policy=reconnect_policy, on_reconnect=on_reconnect,
    )
    await session._login()
    return session


async def discover(
    portal: str,
    initiator_name: str,
    *,
    isid: int = 0x23D000000000,
    chap: tuple[str, str] | None = None,
    mutual: tuple[str, str] | None = None,
    login_timeout: float = 10.0,
) -> list[tuple[str, list[str]]]:
    """SendTargets=All over a discovery session: [(target, [address,tpgt...])]."""
    if portal.lower().startswith("iscsi://"):
        portal = parse_url(portal, require_lun=False).portal
    session = await connect(portal, "", initiator_name, isid, chap=chap, mutual=mutual,
                            login_timeout=login_timeout, command_timeout=login_timeout,
                            reconnect=False)
    try:
        pairs = await session.send_targets("All")
    finally:
        await session.close()
    out: list[tuple[str, list[str]]] = []
    for k, v in pairs:
        if k == "TargetName":
            out.append((v, []))
        elif k == "TargetAddress" and out:
            out[-1][1].append(v)
    return out
