"""The passthrough device's asyncio shell: QEMU's ``scsi-block,migrate-pr=on``.

One ``PassthroughDevice`` per ``--device``: a logical unit towards the guest
(``execute``, ``execute_then``, ``relay_read``), iSCSI initiator sessions
towards the shared LUN. Every decision is the core's (``core.py``, which
explains the rules); this shell only moves commands to backend sessions,
answers back, and arms timers. The plain forward is one ``Session.submit``
(or ``submit_then`` / ``submit_relay``) handed straight to the target: no
Task, no copy. The monitor nexus is ``monitor.py``.

Migration hooks: ``hold()``, ``await drain()``, ``release_held()``,
``discard_held()``, ``snapshot() -> DeviceSnapshot``, ``restore(...)``,
``await backend_session(guest)``, ``await pr_out(...)`` (the one backend
PR OUT port: journaled, snooped, unit attentions retried and owed to the
guest), ``await verify()``, ``await close()``.

Task management: the guest's LOGICAL UNIT RESET, TARGET WARM/COLD RESET
become a LOGICAL UNIT RESET of the backend LUN on the guest's nexus (a guest
must not reset the shared target); CLEAR TASK SET is forwarded as is. The
guest has the function's response at once, so until the backend answered it
every guest command waits (all backend nexuses), as on a LU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..aio import BackgroundTasks
from ..iscsi import initiator as _initiator
from ..iscsi.initiator import IscsiError, Session
from ..iscsi.initiator_core import RelaySink
from ..iscsi.url import parse_url
from ..lun.types import Nexus, Result
from ..scsi.constants import Opcode, PrOutAction, PrType, Status
from ..scsi.pr import (
    PrDecodeError,
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    pr_out_cdb,
    pr_out_params,
)
from ..scsi.sense import Sense, encode_sense
from .config import DeviceConfig
from .core import MONITOR, SPECIAL, Backend, DeviceCore, DeviceError, Forward, Held, Kind
from .datain import DATA_IN_ONLY, expected_in_len
from .describe import describe_device
from .identity import DeviceIdentity, IdentityMode, derive_isid
from .monitor import Monitor, submit_retrying
from .reconcile import ReconcileError
from .snapshot import DeviceSnapshot
from .state import DevicePrState, StateChange
from .verify import FULL_STATUS_METHOD, KEYS_METHOD, KEYS_METHOD_LIMITS, failure_text

_CHECK = Status.CHECK_CONDITION
_ABORTED = Result(_CHECK, b"", encode_sense(Sense.COMMAND_ABORTED))
Connector = Callable[..., Any]  # iscsi.initiator.connect's signature
Answer = Result | asyncio.Future[Result]
_GUEST = IdentityMode.GUEST


class _Link(Backend):
    """A backend nexus with its session and the commands waiting for it."""

    def __init__(self, key: str, port: Any) -> None:
        super().__init__(key, port)
        self.session: Session | None = None
        self.opening: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None
        self.waiting: list[tuple[bytes, Any, int, asyncio.Future[Result]]] = []


class PassthroughDevice(DeviceCore):
    """A guest-facing logical unit forwarding to a shared backend LUN."""

    _backends: dict[str, _Link]  # type: ignore[assignment]

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
        self._monitor = Monitor(lambda: self._open_session(derive_isid(self.name, MONITOR), "monitor"),
                                self.lun, self.verification, self.log)
        self._inflight: set[asyncio.Future[Any]] = set()
        self._bg = BackgroundTasks(self, "background task")
        self._verifying: asyncio.Task[Any] | None = None
        self._verify_again = False
        self._verify_reason = "unit attention"
        self._verify_retry: asyncio.TimerHandle | None = None  # after a failed verification
        # fn(device, reconciliation dict) after every reconciliation (verify)
        self.on_reconcile: Callable[[PassthroughDevice, dict[str, Any]], Any] | None = None
        self.on_state_change: Callable[[PassthroughDevice, tuple[StateChange, ...]], Any] | None = None

    def _new_backend(self, key: str, port: Any) -> _Link:
        return _Link(key, port)

    def connected(self, b: Backend) -> bool:
        s = getattr(b, "session", None)
        return s is not None and s.logged_in

    # ------------------------------------------------------------- life
    async def start(self, *, capture_identity: bool = True, reconcile: bool = True) -> None:
        """Load the journal, capture the LUN's identity (a migrated device
        must front the same LUN) and its task management functions, then
        reconcile before the caller exposes the device: a journal state that
        cannot be verified stops the start (DeviceError); otherwise a failed
        reconciliation is only logged. A migration's given state is not
        reconciled: the backend shows it on the source's nexuses."""
        self.load_journal()
        if capture_identity:
            self.adopt_identity(await self.capture_identity())
            self.backend_tmfs = await self.capture_tmfs()
        how = self.start_verify
        if how == "start (journal)":
            await self.verify(how)
            if self.journal is not None:
                self.journal.clear_intents(self.snooper.state)
        elif how is not None and reconcile and capture_identity:
            try:
                await self.verify(how)
            except DeviceError as exc:
                self.log.warning("reconciliation at start failed: %s", exc)

    async def close(self) -> None:
        """Log out of every backend session; pending guest commands fail."""
        if self._closed:
            return
        self._closed = True
        self._bg.cancel_all()
        if self._verify_retry is not None:
            self._verify_retry.cancel()
            self._verify_retry = None
        for b in self._backends.values():
            for *_, fut in b.waiting:
                if not fut.done():
                    fut.set_exception(DeviceError("device closed"))
            b.waiting.clear()
        sessions = [b.session for b in self._backends.values() if b.session is not None]
        if self._monitor.session is not None:
            sessions.append(self._monitor.session)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        for b in self._backends.values():
            b.session = None
        self._monitor.session = None

    # --------------------------------------------------------- sessions
    async def _open_session(self, isid: int, what: str, on_ua: Any = None, on_event: Any = None) -> Session:
        opts = dict(self._session_options)
        opts.setdefault("queue_depth", 128)
        if on_event is not None:
            opts["on_async_event"] = on_event
        session: Session = await self._connect(self.url, self.target_iqn, self.host_initiator, isid,
                                               on_unit_attention=on_ua, **opts)
        self.log.info("backend nexus %s,i,0x%012x -> %s (%s) open", self.host_initiator, isid,
                      self.target_iqn, what)
        return session

    async def _open(self, b: _Link) -> None:
        try:
            if b.closing is not None:
                await asyncio.shield(b.closing)
            b.session = await self._open_session(
                b.port.isid, f"guest {b.key}",
                lambda lun, sense: self.unit_attention_met(b, sense.asc, sense.ascq),
                lambda message, sense: self.async_unit_attention(b, sense))
        except (IscsiError, OSError, TimeoutError) as exc:
            self.log.error("cannot open backend nexus for %s: %s", b.key, exc)
            waiting, b.waiting = b.waiting, []
            for *_, fut in waiting:
                if not fut.done():
                    fut.set_result(_ABORTED)
            return
        finally:
            b.opening = None
        if self._tmf is None:  # else the waiting commands go when the function is done
            self._send_waiting(b, b.session)

    def _send_waiting(self, b: _Link, s: Session) -> None:
        """Forward, in order, the commands that waited on ``b``."""
        waiting, b.waiting = b.waiting, []
        for cdb, data_out, n, fut in waiting:
            _chain(self._submit_now(s, cdb, data_out, n), fut)

    async def _close_backend(self, b: _Link) -> None:
        session, b.session = b.session, None
        if session is not None:
            self.log.info("guest %s left: closing its backend nexus (I_T nexus loss)", b.key)
            b.drop_reservation()  # the LU sees the nexus loss and releases it
            await session.close()
        b.closing = None

    def _close_if_unused(self, b: _Link) -> None:
        if not (b.frontends or b.session is None or b.closing is not None or self._closed):
            b.closing = self._bg.spawn(self._close_backend(b))

    async def backend_session(self, guest: str) -> Session:
        """The backend session of ``guest`` (opened if needed)."""
        b: _Link = self._backend(guest)  # type: ignore[assignment]
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
        return _ABORTED

    def _submit(self, b: _Link, cdb: bytes, data_out: Any, n: int) -> Answer:
        s = b.session
        if s is not None and b.closing is None and self._tmf is None:
            return self._submit_now(s, cdb, data_out, n)
        if self._closed:
            return _ABORTED
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

    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview = b"",
                data_in_len: int | None = None) -> Answer:
        """The LU contract: forward ``cdb`` for the guest of ``nexus``."""
        b = self._backends.get(nexus.initiator) if self.mode is _GUEST else None
        if b is None:
            b = self._backend(nexus.initiator)  # type: ignore[assignment]
            assert b is not None
        if nexus not in b.frontends:
            b.attach(nexus)
        if self._held is not None:
            fut = self._future()
            self._held.append(Held(nexus, cdb, data_out, data_in_len, fut))
            return fut
        f = self.route(b, nexus, cdb, data_out, data_in_len)
        if isinstance(f, Result):
            return f  # the device's own answer: no backend UA in it
        r = self._forward(b, nexus, f)
        if len(b.frontends) > 1:
            _on_answer(r, lambda result: self.shared_answered(b, nexus, result))
        return r

    def _forward(self, b: _Link, nexus: Nexus, f: Forward) -> Answer:
        sent = self._submit(b, f.cdb, f.data_out, f.data_in_len)
        cdb = bytes(f.cdb)
        if f.kind is Kind.SCSI2:
            _on_answer(sent, lambda r: self.scsi2_answered(b, nexus, cdb, r))
        elif f.kind is Kind.PR_IN:
            if self.snooper.state.generation is not None:
                _on_answer(sent, lambda r: self.generation_seen(b, cdb, r))
            if self.masks_pr_in(cdb) and not isinstance(sent, Result):
                return _then(sent, self._future(), lambda r: self.mask_pr_in(cdb, r))
        elif f.kind is Kind.PR_OUT:
            out = self._future()
            self._inflight.add(out)
            out.add_done_callback(self._inflight.discard)
            guest, data, intent = nexus.initiator, f.data_out, f.intent

            def answered(r: Result | BaseException | None) -> None:
                if not isinstance(r, Result):
                    self.pr_out_lost(b.key, intent)
                    _settle(out, r)
                elif self.pr_out_answered(guest, cdb, data, r, intent):
                    self._bg.spawn(self._verify_then(out, r))
                elif not out.done():
                    out.set_result(r)

            _on_outcome(sent, answered)
            return out
        return sent

    def execute_then(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview,
                     done: Callable[[Result | BaseException], Any]) -> Result | None:
        """``execute`` for a transport that takes a completion callback: the
        Result when known at once, else None and ``done(result or error)``
        later. The plain forward (``SharedNexus.sole``, not held, no special
        case, data direction as sent) goes to ``Session.submit_then``."""
        b = self._backends.get(nexus.initiator) if self.mode is _GUEST else None
        if b is not None and self._held is None and not b.owed_uas and b.sole is nexus:
            s = b.session
            op = cdb[0] if cdb else -1
            if s is not None and b.closing is None and op not in SPECIAL and not (data_out and op in DATA_IN_ONLY):
                n = 0 if len(data_out) else expected_in_len(cdb, self.block_size)
                try:
                    s.submit_then(self.lun, cdb, data_out, n, done)
                except (IscsiError, ValueError) as exc:
                    return self._not_forwarded(cdb, exc)
                return None
        r = self.execute(nexus, cdb, data_out)
        if isinstance(r, Result):
            return r
        _on_outcome(r, lambda x: done(asyncio.CancelledError() if x is None else x))
        return None

    def relay_read(self, nexus: Nexus, cdb: bytes, edtl: int, sink: RelaySink, token: Any) -> bool:
        """The read path (``Connection._fast_reads``): a READ(10)/(16) whose
        length is the EDTL goes to ``Session.submit_relay`` as is. False
        leaves it to ``execute_then`` (not ``sole``, held, UA owed...)."""
        b = self._backends.get(nexus.initiator) if self.mode is _GUEST else None
        if b is None or self._held is not None or b.owed_uas or b.sole is not nexus:
            return False
        s = b.session
        if s is None or b.closing is not None:
            return False
        op = cdb[0]
        if op == 0x28:
            blocks = (cdb[7] << 8) | cdb[8]
        elif op == 0x88:
            blocks = int.from_bytes(cdb[10:14], "big")
        else:
            return False
        if blocks * self.block_size != edtl:
            return False
        try:
            s.submit_relay(self.lun, cdb, edtl, sink, token)
        except (IscsiError, ValueError):
            return False  # execute_then answers it (and logs why)
        return True

    # ------------------------------------------------------- verification
    def want_verify(self, reason: str = "state in doubt") -> None:
        """One coalesced verification in the background."""
        if self._closed:
            return
        self._verify_reason = reason
        if self._verifying is not None:
            self._verify_again = True
            return
        self._verifying = self._bg.spawn(self._verify_loop())

    schedule_verify = want_verify

    async def _verify_loop(self) -> None:
        try:
            while True:
                self._verify_again = False
                try:
                    await self.verify(self._verify_reason)
                except Exception as exc:
                    self.log.warning("verification failed: %s", exc)
                    if not self._verify_again:
                        self._retry_verify_later()
                        return
                if not self._verify_again:
                    return
        finally:
            self._verifying = None

    async def _verify_then(self, out: asyncio.Future[Result], result: Result) -> None:
        try:
            await self.verify("after a PR OUT")
        except Exception as exc:  # the guest still gets the backend's answer
            self.log.warning("verification failed: %s", exc)
            self._retry_verify_later()
        if not out.done():
            out.set_result(result)

    def _retry_verify_later(self) -> None:
        """A timer, not a task: ``drain`` (a migration's hold) does not wait for it."""
        if self._closed or self._verify_retry is not None:
            return
        delay = self.verification.next_retry()
        self.log.info("verifying again in %.1f s", delay)

        def fire() -> None:
            self._verify_retry = None
            self.want_verify("retry after a failed verification")

        self._verify_retry = asyncio.get_running_loop().call_later(delay, fire)

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

    async def capture_tmfs(self) -> Any:
        return await self._monitor.capture_tmfs()

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
            self.verification.failed(failure_text(exc, isinstance(exc, IscsiError)))
            self._reconciled(reason, None, (), self.last_verify_error)
            raise DeviceError(self.last_verify_error) from exc
        if self._verify_retry is not None:  # this one did it
            self._verify_retry.cancel()
            self._verify_retry = None
        self.verified(reason, how, changes, before)
        self._reconciled(reason, how, changes, None)
        return changes

    def _reconciled(self, reason: str, method: str | None, changes: tuple[StateChange, ...],
                    error: str | None) -> None:
        if self.on_reconcile is None:
            return
        info: dict[str, Any] = {"reason": reason, "method": method, "changes": [c.describe() for c in changes],
                                "unknown": list(self.verify_unknown) if error is None else []}
        if error is not None:
            info["error"] = error
        try:
            self.on_reconcile(self, info)
        except Exception:
            self.log.exception("reconcile listener failed")

    # ------------------------------------------------ the backend PR OUT port
    async def pr_out(self, guest: str, action: PrOutAction | int, rtype: PrType | int, rk: int, sark: int,
                     scope: int = 0, aptpl: bool = False) -> Result:
        """A PR OUT on ``guest``'s backend nexus, journaled and snooped as a
        guest's own. Unit attentions are retried (``UaRetry``) and owed to
        the guest (reported on its next command)."""
        b = self._backend(guest)
        session = await self.backend_session(guest)
        cdb, data = pr_out_cdb(action, rtype, scope), pr_out_params(rk, sark, aptpl=aptpl)
        intent = self.begin(b.key, cdb, data)
        r, met = await submit_retrying(session, self.lun, cdb, data)
        self.owe(b.key, met)
        if self.pr_out_answered(guest, cdb, data, r, intent):
            try:
                await self.verify(f"after {PrOutAction(action).name}")
            except DeviceError as exc:
                self.log.warning("verification after %s failed: %s", PrOutAction(action).name, exc)
        return r

    # ------------------------------------------------------ migration hooks
    async def drain(self) -> None:
        """Wait for every forwarded command and the snooping/verification
        that follows it."""
        while True:
            waits: list[Any] = list(self._inflight)
            waits += [t for t in (self._verifying, self._tmf) if t is not None]
            waits += [b.opening for b in self._backends.values() if b.opening is not None]
            if waits:
                await asyncio.wait(waits)
                continue
            if not any(b.session is not None and b.session.core.outstanding for b in self._backends.values()):
                return
            await asyncio.sleep(0.001)

    def release_held(self) -> None:
        """Rollback: forward the queued commands in order and resume."""
        was_held = self.held
        for h in self.take_held():
            b = self._backends.get(self.backend_key(h.nexus))
            if h.token.done() or b is None or h.nexus not in b.frontends:
                continue  # its session ended meanwhile: nobody to answer
            _chain(self.execute(h.nexus, h.cdb, h.data_out, h.data_in_len), h.token)
        if was_held:
            for b in self._backends.values():
                if not b.frontends:
                    self._close_if_unused(b)

    def describe(self) -> dict[str, object]:
        """``query-devices`` entry."""
        return describe_device(self, time.time())

    # --------------------------------------------------- nexus events, TMFs
    def nexus_lost(self, nexus: Nexus) -> None:
        b, release = self.frontend_left(nexus)
        if b is None:
            return
        link: _Link = b  # type: ignore[assignment]
        if release is not None:  # like a TMF: what any guest sends next reaches the LU after it
            self._forward_tmf(link, Opcode(release[0]).name, lambda s: self._release_for_lost(link, s, release))
        if not b.frontends and self._held is None:
            self._close_if_unused(link)

    async def _release_for_lost(self, b: _Link, s: Session, cdb: bytes) -> None:
        """RELEASE for a holder that left; its UAs reached no frontend: all get them."""
        if b.closing is not None:
            return  # the backend nexus ends: its loss releases the reservation
        what = Opcode(cdb[0]).name
        try:
            r, met = await submit_retrying(s, self.lun, cdb, b"")
        except IscsiError as exc:
            self.log.warning("%s on the backend nexus of %s failed: %s", what, b.key, exc)
            return
        for sense in met:
            self.fan_out(b, None, sense)
        self.log.info("%s on the backend nexus of %s -> %s", what, b.key, _initiator.describe_result(r))

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        """A guest's LOGICAL UNIT / TARGET RESET: a LOGICAL UNIT RESET of the
        backend LUN (the frontend refuses a target reset the backend does
        not report, ``target_reset_supported``)."""
        b: _Link | None = self.reset_target(nexus)  # type: ignore[assignment]
        if b is not None and b.session is not None:
            self._forward_tmf(b, "LOGICAL UNIT RESET", lambda s: s.lun_reset(self.lun))

    def clear_task_set(self, nexus: Nexus) -> None:
        b = self._backends.get(self.backend_key(nexus))
        if b is not None and b.session is not None:
            self._forward_tmf(b, "CLEAR TASK SET", lambda s: s.clear_task_set(self.lun))

    def _forward_tmf(self, b: _Link, what: str, call: Callable[[Session], Any]) -> None:
        """Every backend's commands wait until the backend answered the
        function (the guest has its response already)."""
        self._tmf = self._bg.spawn(self._run_tmf(b, self._tmf, what, call))
        for other in self._backends.values():
            other.pause(True)

    async def _run_tmf(self, b: _Link, before: Any, what: str, call: Callable[[Session], Any]) -> None:
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


def _chain(src: Answer, dst: asyncio.Future[Result]) -> None:
    _on_outcome(src, lambda r: _settle(dst, r))


def _settle(dst: asyncio.Future[Result], r: Result | BaseException | None) -> None:
    if dst.done():
        return
    if r is None:
        dst.cancel()
    elif isinstance(r, BaseException):
        dst.set_exception(r)
    else:
        dst.set_result(r)


def _then(src: asyncio.Future[Result], dst: asyncio.Future[Result], fn: Callable[[Result], Result]) -> asyncio.Future[Result]:
    _on_outcome(src, lambda r: _settle(dst, fn(r) if isinstance(r, Result) else r))
    return dst


def _on_outcome(r: Answer, fn: Callable[[Result | BaseException | None], Any]) -> None:
    """``fn(result, error, or None when cancelled)`` once ``r`` is settled
    (at once when it is a Result)."""
    if isinstance(r, Result):
        fn(r)
        return

    def settled(f: asyncio.Future[Result]) -> None:
        fn(None if f.cancelled() else (f.exception() or f.result()))

    r.add_done_callback(settled)


def _on_answer(r: Answer, fn: Callable[[Result], Any]) -> None:
    """``fn(result)`` once the backend's answer is there (at once if it is:
    before whoever awaits it can send the next command)."""
    if isinstance(r, Result):
        fn(r)
    elif r.done():
        if not r.cancelled() and r.exception() is None:
            fn(r.result())
    else:
        r.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None else fn(f.result()))


__all__ = ["DeviceError", "DeviceSnapshot", "MONITOR", "PassthroughDevice", "expected_in_len",
           "FULL_STATUS_METHOD", "KEYS_METHOD", "KEYS_METHOD_LIMITS"]
