"""The passthrough device: QEMU's ``scsi-block,migrate-pr=on`` as an asyncio shell.

One ``PassthroughDevice`` per ``--device``. Towards the guest it is a logical
unit (``lun/types.py``: ``execute(nexus, cdb, data_out) -> Result | Future``)
served by the host daemon's iSCSI target; towards the shared LUN it is a set
of iSCSI initiator sessions (``iscsi/initiator.py``). The rules live in the
pure core it imports: ``snoop.py`` (what a PR OUT did), ``mask.py`` (what the
guest may not see or do), ``identity.py`` (which backend nexus a guest
uses), ``journal.py`` (crash-safe state), ``reconcile.py`` (backend's view).

Forwarding
----------
Every guest command goes to the backend unchanged (same CDB and data-out)
and the backend's status, sense and data come back unchanged. The data path
is one ``Session.submit`` whose Future is handed straight to the target: no
Task, no callback, no copy. The exceptions, each one small handler in
``_SPECIAL``:

* PERSISTENT RESERVE OUT: with migrate-pr on, SPEC_I_PT / ALL_TG_PT are
  refused before they reach the backend (``mask.refuse_pr_out``). Otherwise
  a journal intent is written, the command forwarded, and when the backend
  answers the snooper observes it (only GOOD changes state). When the
  outcome depends on other initiators the device verifies with READ FULL
  STATUS (READ KEYS + READ RESERVATION when the backend answers INVALID
  OPCODE / INVALID FIELD to it, like tgt) *before* the guest gets its answer,
  so a drained device's state is always verified or explicitly marked not.
* PERSISTENT RESERVE IN / REPORT CAPABILITIES: with migrate-pr on, SIP_C and
  ATP_C are cleared in the answer (``mask.mask_pr_in``).
* REPORT LUNS is answered by the device, like QEMU's SCSI bus does: the guest
  sees its own LUN (``frontend_lun``), not the backend's LUN inventory.
* Unit attentions 2A/03, 2A/04, 2A/05 and 29/xx in any backend answer mark
  the guest's state unverified and start one (coalesced) verification; the
  answer itself is forwarded untouched.
* RESERVE / RELEASE (6/10): forwarded; the answer tells which frontend
  nexus holds the SCSI-2 reservation (below).

Verification uses a separate *monitor* nexus (host initiator name, ISID
``derive_isid(device, MONITOR)``) that never registers: a PR IN issued on a
guest's own nexus could consume a unit attention meant for the guest.

Identity
--------
``identity=guest``: each guest initiator NAME gets its own backend session
(host initiator name, ISID from ``identity.backend_port``), opened on its first
command. libiscsi picks a new ISID on each reconnect, so the guest's PR state
is keyed by its name, never by its frontend ISID. ``identity=host``: one
shared backend session for every guest (the seed's behaviour).

Frontend nexuses sharing a backend nexus: several sessions of one guest
name (identity=guest: a multipath guest, a reconnect with a new ISID), or
every guest (identity=host), use one backend I_T nexus. What a LU keeps per
I_T nexus is then kept per frontend nexus by the device (``frontends.py``):
a unit attention the backend reports to one of them is queued for the
others (one the device meets on its own commands, for all; a frontend that
logs in later gets none of the older ones, as on a LU); a SCSI-2
reservation is held by the frontend whose RESERVE got GOOD, and the
device answers the others' commands as the LU would answer another nexus
(RESERVATION CONFLICT, RELEASE without effect). Unit attentions owed to the
guest (``owed_uas``: migrated, or met by the device's own PR OUTs) go to
its first frontend command and are queued for its other frontends then.
The plain forward below is for a backend nexus with one frontend and
nothing queued (``SharedNexus.sole``).

SCSI-2 RESERVE and nexus loss: when the frontend holding the reservation
ends (``nexus_lost``) while other frontends keep the backend nexus, the
device sends RELEASE (6 or 10, as reserved) there, as the LU would drop it
on that nexus loss; guest commands wait for it as for a task management
function (below), so none meets the departed session's reservation. When the last frontend nexus of a guest ends, its
backend session is logged out, so the LUN sees the I_T nexus loss itself.
While the device is held (a migration is moving it) nexus loss does not
close anything: the decision waits for ``release_held()`` (rollback) or
``close()``.

Hooks for the migration service
-------------------------------
``hold()``
    Stop forwarding guest commands: new ones are queued (not answered).
``await drain()``
    Wait until every forwarded command, snoop and verification is done.
``release_held()``
    Rollback: forward the queued commands in arrival order and resume.
``discard_held()``
    After a successful move: forget the queued commands without answering
    (the guest re-issues them on the destination). The device stays held.
``snapshot() -> DeviceSnapshot``
    ``(config, identity, state, pending_uas)``, a NamedTuple.
    ``pending_uas``: state key -> [(sense key, ASC, ASCQ)] of unit attentions
    the device took on the guest's nexus (its own commands, e.g. the
    takeover) and still owes the guest, then those still queued for one of
    its frontend nexuses (each once): reported on its next command.
``restore(state, identity=None, pending_uas=None)``
    Destination: adopt a migrated state (journaled at once).
``await backend_session(guest) -> Session``
    The guest's backend session, opened if needed.
``await pr_out(guest, action, rtype, rk, sark, scope=0, aptpl=False) -> Result``
    A PR OUT on the guest's backend nexus (the takeover's REGISTER and
    PREEMPT), journaled and snooped like a guest's own; unit attentions it
    meets are retried and owed to the guest.
``await read_full_status() -> ReadFullStatus | None``
    On the monitor nexus; None when the backend does not implement it.
``await verify(reason="on demand") -> tuple[StateChange, ...]``
    Reconcile every tracked guest with the backend now.
``await close()``
    Log out every backend session.

Data-in length: the LU contract carries no Expected Data Transfer Length,
so the backend is asked for the length the CDB itself allows
(``expected_in_len``: allocation length or transfer length x block size).
The frontend target then truncates to the guest's EDTL and reports the
residual against it, exactly as the backend would have (iSCSIResiduals
tests pass through the device). ``execute(..., data_in_len=N)`` overrides it.
A command that only moves data in but arrives with data-out (a READ flagged
as a write) is forwarded without the data, as a LUN would ignore it.

Task management: the guest's LOGICAL UNIT RESET, TARGET WARM/COLD RESET
become a LOGICAL UNIT RESET of the backend LUN on the guest's nexus (a guest
must not reset the shared target); CLEAR TASK SET is forwarded as is. The
guest has the function's response at once, so until the backend answered it
every guest command waits (all backend nexuses): a command sent after the
response reaches the LU after the function, as on a LU (MultipathIO.Reset
resets through one path and expects the UA on the next command of each).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..aio import BackgroundTasks
from ..iscsi import initiator as _initiator
from ..iscsi.initiator import IscsiError, Session
from ..iscsi.initiator_core import HOLD_TIMEOUT, PERSISTENT, RelaySink
from ..iscsi.url import parse_url
from ..lun.types import Nexus, Result
from ..lun.ua import UA_EXEMPT
from ..scsi.cdb import SupportedTmfs
from ..scsi.constants import Opcode, PrInAction, PrOutAction, PrType, SenseKey, Status
from ..scsi.pr import (
    PrDecodeError,
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    pr_in_cdb,
    pr_out_cdb,
    pr_out_params,
)
from ..scsi.sense import Sense, SenseDecodeError, decode_sense, encode_sense
from .config import DeviceConfig
from .frontends import (
    SharedNexus,
    Verdict,
    drops_scsi2,
    request_sense_data,
    unit_attention,
)
from .identity import (
    BackendPort,
    DeviceIdentity,
    IdentityMode,
    backend_port,
    derive_isid,
    state_key,
)
from .journal import Intent, JournalError, PrJournal
from .mask import PrFilter
from .reconcile import ReconcileError
from .snoop import PrSnooper, puts_state_in_doubt
from .state import DevicePrState, StateChange, describe_guest

log = logging.getLogger(__name__)

MONITOR = ".monitor"  # not an iSCSI name: its derived ISID is no guest's
_GOOD = Status.GOOD
_CHECK = Status.CHECK_CONDITION
_PR_IN_ALLOC = 8192
_UA_RETRIES = 8
# a failed verification (backend unreachable, or a SCSI-2 reservation of
# another initiator refusing PERSISTENT RESERVE IN) is tried again after
# this long, doubling up to the maximum, until one succeeds
VERIFY_RETRY_FIRST = 0.5
VERIFY_RETRY_MAX = 30.0
# Backend answers meaning "READ FULL STATUS is not implemented here".
_NOT_IMPLEMENTED = frozenset(
    {(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00), (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)}
)
# Crash-test hook: with this variable set to a PR OUT service action name
# (REGISTER, RESERVE, ...; ANY for every one), the process kills itself with
# SIGKILL after the backend answered GOOD to that action and before the
# journal records the outcome: only the intent is on disk.
CRASH_ENV = "PRMIGRATE_TEST_CRASH_AFTER_GOOD"
FULL_STATUS_METHOD = "READ FULL STATUS"
KEYS_METHOD = "READ KEYS + READ RESERVATION"
# What the READ KEYS + READ RESERVATION fallback cannot tell (reconcile.py).
KEYS_METHOD_LIMITS = (
    "which nexus a listed key is registered on (another initiator may use the same key)",
    "which nexus holds a non-all-registrants reservation carrying a guest's key",
    "registrations or reservations made on the device's nexus outside the guest with a key "
    "the device does not track (they are not adopted)",
)


class DeviceError(Exception):
    """A device operation failed (backend unreachable, closed device...)."""


class DeviceSnapshot(NamedTuple):
    """What the migration stream carries for one device."""

    config: DeviceConfig
    identity: DeviceIdentity | None
    state: DevicePrState
    pending_uas: dict[str, list[tuple[int, int, int]]]  # (key, ASC, ASCQ)


# ------------------------------------------------------ expected data-in


def _be(cdb: bytes, start: int, n: int) -> int:
    return int.from_bytes(cdb[start : start + n], "big") if len(cdb) >= start + n else 0


def expected_in_len(cdb: bytes, block_size: int = 512) -> int:
    """The data-in length a command asks for, from its CDB alone (SPC-5
    allocation length fields, SBC-4 transfer lengths). Only used when the
    transport did not pass the guest's Expected Data Transfer Length.
    At most 2^32 - 1, the most an EDTL field carries (a guest's transport
    could not have asked for more: the backend answers the CDB itself)."""
    if not cdb:
        return 0
    op = cdb[0]
    rule = _IN_LEN.get(op)
    if rule is not None:
        return min(rule(cdb, block_size), _MAX_EDTL)
    group = op >> 5
    if group == 0:
        return cdb[4] if len(cdb) > 4 else 0
    if group in (1, 2):
        return _be(cdb, 7, 2)
    if group == 5:
        return _be(cdb, 6, 4)
    if group == 4:
        return _be(cdb, 10, 4)
    return 0


_MAX_EDTL = 0xFFFFFFFF
_ZERO: Callable[[bytes, int], int] = lambda c, b: 0  # noqa: E731
_IN_LEN: dict[int, Callable[[bytes, int], int]] = {
    Opcode.READ_6: lambda c, b: ((c[4] if len(c) > 4 else 0) or 256) * b,
    # the data path's reads: _be inlined
    Opcode.READ_10: lambda c, b: int.from_bytes(c[7:9], "big") * b if len(c) >= 9 else 0,
    Opcode.READ_12: lambda c, b: _be(c, 6, 4) * b,
    Opcode.READ_16: lambda c, b: int.from_bytes(c[10:14], "big") * b if len(c) >= 14 else 0,
    Opcode.INQUIRY: lambda c, b: _be(c, 3, 2),
    Opcode.READ_CAPACITY_10: lambda c, b: 8,
    Opcode.REPORT_LUNS: lambda c, b: _be(c, 6, 4),
    Opcode.MAINTENANCE_IN: lambda c, b: _be(c, 6, 4),
    Opcode.PERSISTENT_RESERVE_IN: lambda c, b: _be(c, 7, 2),
    Opcode.READ_DEFECT_DATA_12: lambda c, b: _be(c, 6, 4),
    Opcode.RECEIVE_DIAGNOSTIC_RESULTS: lambda c, b: _be(c, 3, 2),
    Opcode.READ_BUFFER: lambda c, b: _be(c, 6, 3),
    # data-out or no-data commands of groups that would otherwise guess
    Opcode.TEST_UNIT_READY: _ZERO,
    Opcode.START_STOP_UNIT: _ZERO,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: _ZERO,
    Opcode.RESERVE_6: _ZERO,
    Opcode.RELEASE_6: _ZERO,
    Opcode.VERIFY_10: _ZERO,
    Opcode.VERIFY_12: _ZERO,
    Opcode.VERIFY_16: _ZERO,
    Opcode.SYNCHRONIZE_CACHE_10: _ZERO,
    Opcode.SYNCHRONIZE_CACHE_16: _ZERO,
    Opcode.PRE_FETCH_10: _ZERO,
    Opcode.PRE_FETCH_16: _ZERO,
    Opcode.WRITE_6: _ZERO,
    Opcode.WRITE_10: _ZERO,
    Opcode.WRITE_12: _ZERO,
    Opcode.WRITE_16: _ZERO,
    Opcode.WRITE_SAME_10: _ZERO,
    Opcode.WRITE_SAME_16: _ZERO,
    Opcode.WRITE_ATOMIC_16: _ZERO,
    Opcode.EXTENDED_COPY: _ZERO,  # bytes 10-13: the parameter list (Data-Out) length
    Opcode.RECEIVE_COPY_RESULTS: lambda c, b: _be(c, 10, 4),
    Opcode.UNMAP: _ZERO,
    Opcode.SANITIZE: _ZERO,  # bytes 7-8 are the parameter list (Data-Out) length
    Opcode.MODE_SELECT_6: _ZERO,
    Opcode.MODE_SELECT_10: _ZERO,
    Opcode.PERSISTENT_RESERVE_OUT: _ZERO,
    Opcode.RESERVE_10: _ZERO,
    Opcode.RELEASE_10: _ZERO,
}
# Commands that only move data in: a guest flagging one as a write (the
# iSCSI W bit with data) has its data ignored, as a LUN would; forwarding the
# data would make the backend answer Data-In to a write.
_DATA_IN_ONLY = frozenset(op for op, rule in _IN_LEN.items() if rule is not _ZERO)


# ------------------------------------------------------------ backends


@dataclass(eq=False)
class _Backend(SharedNexus):
    """One backend I_T nexus (a guest's, or the shared one with identity=host),
    with the frontend nexuses sharing it (``SharedNexus``: ``frontends``,
    their unit attention queues, the SCSI-2 reservation holder)."""

    key: str  # state key: guest name, or SHARED_NEXUS
    port: BackendPort
    session: Session | None = None
    opening: asyncio.Task[None] | None = None
    closing: asyncio.Task[None] | None = None
    waiting: list[tuple[bytes, Any, int, asyncio.Future[Result]]] = field(default_factory=list)
    # sense owed to the guest (its own nexus's UAs the device took, migrated
    # ones): reported to the first frontend command, then queued for the others
    owed_uas: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        SharedNexus.__init__(self)


@dataclass(eq=False)
class _Held:
    nexus: Nexus
    cdb: bytes
    data_out: Any
    data_in_len: int | None
    future: asyncio.Future[Result]


Connector = Callable[..., Any]  # iscsi.initiator.connect's signature


class PassthroughDevice:
    """A guest-facing logical unit forwarding to a shared backend LUN."""

    def __init__(
        self,
        config: DeviceConfig,
        host_initiator: str,
        *,
        state_dir: str | Path | None = None,
        identity: DeviceIdentity | None = None,
        state: DevicePrState | None = None,
        frontend_lun: int = 0,
        connect: Connector | None = None,
        session_options: dict[str, Any] | None = None,
        fsync: bool = True,
    ) -> None:
        self.config = config
        self.name = config.name
        self.host_initiator = host_initiator.lower()
        self.identity = identity
        # the backend's answer to REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
        # (``start``): a guest's target reset is taken only when the backend
        # reports target resets (see ``reset``); None: not asked or not known
        self.backend_tmfs: SupportedTmfs | None = None
        self.frontend_lun = frontend_lun
        self.migrate_pr = config.effective_migrate_pr
        self.mode = IdentityMode(config.identity)
        self.filter = PrFilter(self.migrate_pr)
        self.url = parse_url(config.backend_url, require_lun=False)
        self.portal = self.url.portal
        self.target_iqn = config.target_iqn
        self.lun = config.lun
        self._connect = connect or _initiator.connect
        self._session_options = dict(session_options or {})
        self.snooper = PrSnooper(state, mode=self.mode)
        self.journal: PrJournal | None = None
        if state_dir is not None:
            self.journal = PrJournal(Path(state_dir) / f"{config.name}.pr.json", fsync=fsync)
        self.log = logging.LoggerAdapter(log, {"device": config.name})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backends: dict[str, _Backend] = {}
        self._monitor: Session | None = None
        self._monitor_lock: asyncio.Lock | None = None
        self._full_status: bool | None = None  # None: not known yet
        self._inflight: set[asyncio.Future[Any]] = set()
        self._bg = BackgroundTasks(self, "background task")
        self._verifying: asyncio.Task[Any] | None = None
        self._verify_again = False
        self._verify_retry: asyncio.TimerHandle | None = None  # after a failed verification
        self._verify_retry_delay = VERIFY_RETRY_FIRST
        self._held: list[_Held] | None = None
        # a guest's task management function forwarded and not answered yet:
        # every backend's commands wait in ``waiting`` (the LU runs them after it)
        self._tmf: asyncio.Task[None] | None = None
        self._closed = False
        self.on_state_change: Callable[[PassthroughDevice, tuple[StateChange, ...]], Any] | None = (
            None
        )
        # fn(device, reconciliation dict) after every reconciliation (verify)
        self.on_reconcile: Callable[[PassthroughDevice, dict[str, Any]], Any] | None = None
        self.last_verified: float | None = None  # wall clock of the last good verify
        self.last_verify_error: str | None = None
        self.verify_unknown: tuple[str, ...] = ()
        self._verify_reason = "unit attention"
        self._crash_after = os.environ.get(CRASH_ENV, "").upper() or None
        self._given_state = state is not None  # a migration's: not reconciled at start
        self._special: dict[int, Callable[..., Any]] = {
            Opcode.PERSISTENT_RESERVE_OUT: self._pr_out,
            Opcode.PERSISTENT_RESERVE_IN: self._pr_in,
            Opcode.REPORT_LUNS: self._report_luns,
            Opcode.RESERVE_6: self._scsi2,
            Opcode.RESERVE_10: self._scsi2,
            Opcode.RELEASE_6: self._scsi2,
            Opcode.RELEASE_10: self._scsi2,
        }
        for guest in self.snooper.state.guests:
            self._note_port(guest)
        # Guests named in the ACL: their nexuses are known before they log
        # in, so a reservation taken on one outside the guest is adopted.
        if self.mode is IdentityMode.GUEST:
            for guest in config.guests or ():
                self._note_port(state_key(self.mode, guest))

    # ------------------------------------------------------------- life
    async def start(self, *, capture_identity: bool = True, reconcile: bool = True) -> None:
        """Load the journal, open the monitor session and capture the LUN's
        identity if not given, then (``reconcile``) reconcile with the
        backend before the caller exposes the device: state found in the
        journal may be stale (others changed it while the daemon was down,
        or a PR OUT was in flight at the crash), and a reservation may have
        been taken on a known guest's nexus outside the guest. A journal
        state that cannot be verified stops the start (DeviceError); with no
        journal state a failed reconciliation is only logged. State given to
        the constructor (a migration's) is not reconciled (``reconcile``
        False): the backend shows it on the source's nexuses until the
        takeover."""
        self._loop = asyncio.get_running_loop()
        self._monitor_lock = asyncio.Lock()
        if self.journal is not None and not self.snooper.state.guests:
            try:
                record = self.journal.load()
            except JournalError as exc:
                self.log.error("journal unreadable, starting empty: %s", exc)
                record = None
            if record is not None:
                self.snooper.state = record.state.copy()
                for guest in record.state.guests:
                    self._note_port(guest)
                self.log.info(
                    "journal seq %d: %s", record.seq, self._describe_state() or "no PR state"
                )
                if record.needs_reconcile:
                    self.log.warning(
                        "%d PR OUT(s) were in flight at the last stop: reconciling",
                        len(record.intents),
                    )
                for guest in record.state.guests:
                    self.snooper.state.mark_unverified(guest)
                for intent in record.intents:
                    self.snooper.state.mark_unverified(intent.guest)
        elif self.journal is not None:
            self._save()
        if capture_identity:
            seen = await self.capture_identity()
            if self.identity is None:
                self.identity = seen
            elif not self.identity.same_lun(seen):
                # a migrated device must front the same LUN on both hosts
                raise DeviceError(
                    f"backend {self.config.backend_url} is not the device's LUN: "
                    + "; ".join(self.identity.differences(seen, ("serial", "naa_id")))
                )
            self.backend_tmfs = await self.capture_tmfs()
        if self.snooper.state.unverified or (
            self.journal is not None and self.journal.pending_intents
        ):
            await self.verify("start (journal)")
            if self.journal is not None:
                self.journal.clear_intents(self.snooper.state)
        elif reconcile and capture_identity and not self._given_state:
            try:
                await self.verify("start")
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
        if self._monitor is not None:
            sessions.append(self._monitor)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        for b in self._backends.values():
            b.session = None
        self._monitor = None

    # --------------------------------------------------------- sessions
    def _port(self, key: str) -> BackendPort:
        guest = key if self.mode is IdentityMode.GUEST else "*"
        return backend_port(self.mode, self.host_initiator, self.name, guest)

    def _note_port(self, key: str) -> None:
        self.snooper.transport_ids[key] = self._port(key).transport_id

    def _backend(self, guest: str) -> _Backend:
        key = state_key(self.mode, guest)
        b = self._backends.get(key)
        if b is None:
            b = self._backends[key] = _Backend(key, self._port(key))
            self._note_port(key)
            if self._tmf is not None:
                b.pause(True)
        return b

    async def _open_session(
        self, isid: int, what: str, on_ua: Any = None, on_event: Any = None,
        on_reconnect: Any = None,
    ) -> Session:
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
        session: Session = await self._connect(
            self.url,
            self.target_iqn,
            self.host_initiator,
            isid,
            on_unit_attention=on_ua,
            **opts,
        )
        self.log.info(
            "backend nexus %s,i,0x%012x -> %s (%s) open",
            self.host_initiator,
            isid,
            self.target_iqn,
            what,
        )
        return session

    async def _open(self, b: _Backend) -> None:
        try:
            if b.closing is not None:
                await asyncio.shield(b.closing)
            # the backend down: its commands wait (HOLD_TIMEOUT) as a
            # reconnecting session's do, then get BUSY, which guests retry
            b.session = await _initiator.login_within(
                lambda: self._open_session(
                    b.port.isid,
                    f"guest {b.key}",
                    lambda lun, sense: self._on_ua(b, sense),
                    lambda message, sense: self._on_async_event(b, message, sense),
                    lambda: self._verify_after_login(b.key),
                ),
                HOLD_TIMEOUT, PERSISTENT,
                lambda exc: self.log.warning("backend nexus for %s: %s; trying again", b.key, exc),
            )
        except (IscsiError, OSError, TimeoutError) as exc:
            self.log.error("cannot open backend nexus for %s: %s", b.key, exc)
            waiting, b.waiting = b.waiting, []
            failed = Result(Status.BUSY, b"", b"")
            for *_, fut in waiting:
                if not fut.done():
                    fut.set_result(failed)
            return
        finally:
            b.opening = None
        if self._tmf is not None:
            return  # the waiting commands go when the function is done
        self._send_waiting(b, b.session)

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

    def _send_waiting(self, b: _Backend, s: Session) -> None:
        """Forward, in order, the commands that waited on ``b``."""
        waiting, b.waiting = b.waiting, []
        for cdb, data_out, n, fut in waiting:
            self._chain(self._submit_now(s, cdb, data_out, n), fut)

    async def _close_backend(self, b: _Backend) -> None:
        session, b.session = b.session, None
        if session is not None:
            self.log.info("guest %s left: closing its backend nexus (I_T nexus loss)", b.key)
            b.drop_reservation()  # the LU sees the nexus loss and releases it
            await session.close()
        b.closing = None

    async def backend_session(self, guest: str) -> Session:
        """The backend session of ``guest`` (opened if needed)."""
        b = self._backend(guest)
        while b.session is None:
            if self._closed:
                raise DeviceError("device closed")
            if b.opening is None:
                b.opening = self._bg.spawn(self._open(b))
            await asyncio.shield(b.opening)
            if b.session is None:
                raise DeviceError(f"cannot reach the backend for {guest}")
        return b.session

    async def _monitor_session(self) -> Session:
        assert self._monitor_lock is not None
        async with self._monitor_lock:
            if self._monitor is None:
                self._monitor = await self._open_session(derive_isid(self.name, MONITOR), "monitor")
            return self._monitor

    # ------------------------------------------------------ forwarding
    def _submit_now(
        self, session: Session, cdb: bytes, data_out: Any, n: int
    ) -> asyncio.Future[Result] | Result:
        try:
            fut = session.submit(self.lun, cdb, data_out, 0 if len(data_out) else n)
        except (IscsiError, ValueError) as exc:
            return self._not_forwarded(cdb, exc)
        # No per-command bookkeeping: drain() asks the sessions how many
        # commands they still have without status.
        return fut

    def _not_forwarded(self, cdb: bytes, exc: Exception) -> Result:
        self.log.warning("cannot forward CDB %s: %s", bytes(cdb[:16]).hex(), exc)
        return Result(
            _CHECK,
            b"",
            encode_sense(
                Sense.INVALID_FIELD_IN_CDB if isinstance(exc, ValueError) else Sense.COMMAND_ABORTED
            ),
        )

    def _submit(
        self, b: _Backend, cdb: bytes, data_out: Any, n: int
    ) -> asyncio.Future[Result] | Result:
        s = b.session
        if s is not None and b.closing is None and self._tmf is None:
            return self._submit_now(s, cdb, data_out, n)
        if self._closed:
            return Result(_CHECK, b"", encode_sense(Sense.COMMAND_ABORTED))
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Result] = loop.create_future()
        b.waiting.append((cdb, data_out, n, fut))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        if b.opening is None and (s is None or self._tmf is None):
            b.opening = self._bg.spawn(self._open(b))
        return fut

    @staticmethod
    def _chain(src: asyncio.Future[Result] | Result, dst: asyncio.Future[Result]) -> None:
        if isinstance(src, Result):
            if not dst.done():
                dst.set_result(src)
            return

        def done(f: asyncio.Future[Result]) -> None:
            if dst.done():
                return
            if f.cancelled():
                dst.cancel()
            elif f.exception() is not None:
                dst.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                dst.set_result(f.result())

        src.add_done_callback(done)

    def execute(
        self,
        nexus: Nexus,
        cdb: bytes,
        data_out: bytes | memoryview = b"",
        data_in_len: int | None = None,
    ) -> Result | asyncio.Future[Result]:
        """The LU contract: forward ``cdb`` for the guest of ``nexus``."""
        b = self._backends.get(nexus.initiator) if self.mode is IdentityMode.GUEST else None
        if b is None:
            b = self._backend(nexus.initiator)
        if nexus not in b.frontends:
            b.attach(nexus)
        if self._held is not None:
            loop = self._loop or asyncio.get_running_loop()
            fut: asyncio.Future[Result] = loop.create_future()
            self._held.append(_Held(nexus, cdb, data_out, data_in_len, fut))
            return fut
        op = cdb[0] if cdb else -1
        if b.owed_uas and op not in UA_EXEMPT:
            sense = b.owed_uas.pop(0)
            self._fan_out(b, nexus, sense)
            return Result(_CHECK, b"", sense)
        if b.uas and nexus in b.uas:
            queued = b.take_ua(nexus, op)
            if queued is not None:
                if op == Opcode.REQUEST_SENSE:  # SPC-5 6.39: the UA is the data
                    return Result(_GOOD, request_sense_data(queued, bytes(cdb)))
                return Result(_CHECK, b"", queued)
        if b.holder is not None and b.holder != nexus:
            verdict = b.check(nexus, bytes(cdb))
            if verdict is not Verdict.FORWARD:
                return self._scsi2_refused(b, nexus, op, verdict)
        if data_out and op in _DATA_IN_ONLY:
            data_out = b""
        if data_in_len is None:
            data_in_len = expected_in_len(cdb, self.block_size)
        special = self._special.get(op)
        if special is not None:
            r = special(b, nexus, cdb, data_out, data_in_len)
        else:
            r = self._submit(b, cdb, data_out, data_in_len)
        if len(b.frontends) > 1:
            self._watch(b, nexus, r)
        return r

    def execute_then(
        self,
        nexus: Nexus,
        cdb: bytes,
        data_out: bytes | memoryview,
        done: Callable[[Result | BaseException], Any],
    ) -> Result | None:
        """``execute`` for a transport that takes a completion callback (the
        target's ``Connection``): returns the Result when it is known at once,
        else None and calls ``done(result)`` (or ``done(error)``) once later.

        The plain forward (guest's backend session open, not held, no UA
        owed or queued, the nexus alone on its backend nexus, no special
        case, data direction as sent) goes to
        ``Session.submit_then`` with ``done`` itself: no Future, no loop turn
        between the backend's answer and the guest's. Everything else is
        ``execute``'s answer, its Future's outcome passed on."""
        b = self._backends.get(nexus.initiator) if self.mode is IdentityMode.GUEST else None
        if b is not None and self._held is None and not b.owed_uas and b.sole is nexus:
            s = b.session
            op = cdb[0] if cdb else -1
            if (
                s is not None
                and b.closing is None
                and op not in self._special
                and not (data_out and op in _DATA_IN_ONLY)
            ):
                n = 0 if len(data_out) else expected_in_len(cdb, self.block_size)
                try:
                    s.submit_then(self.lun, cdb, data_out, n, done)
                except (IscsiError, ValueError) as exc:
                    return self._not_forwarded(cdb, exc)
                return None
        r = self.execute(nexus, cdb, data_out)
        if isinstance(r, Result):
            return r

        def outcome(f: asyncio.Future[Result]) -> None:
            if f.cancelled():
                done(asyncio.CancelledError())
            else:
                exc = f.exception()
                done(exc if exc is not None else f.result())

        r.add_done_callback(outcome)
        return None

    def relay_read(self, nexus: Nexus, cdb: bytes, edtl: int, sink: RelaySink, token: Any) -> bool:
        """The read path of a guest connection (``Connection._fast_reads``):
        a READ(10)/READ(16) whose expected length is the CDB's transfer
        length goes to the guest's backend session as is and is answered
        through ``sink`` (``Session.submit_relay``): no Result, Future or
        callback per command. True when taken; False leaves the command to
        ``execute_then`` (the guest's backend session not open yet, the
        device held for a move, a UA owed or queued, another frontend nexus
        on the same backend nexus, a task management function in flight:
        what ``SharedNexus.sole`` sums up; another length; identity=host)."""
        b = self._backends.get(nexus.initiator) if self.mode is IdentityMode.GUEST else None
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

    # --------------------------------------------------- special cases
    def _report_luns(self, b: _Backend, nexus: Nexus, cdb: bytes, data_out: Any, n: int) -> Result:
        """SPC-5 6.33, answered by the device: the guest's one LUN."""
        if len(cdb) < 12:
            return self._invalid_cdb(0)  # as the LU answers a short CDB (CdbTooShort)
        select, alloc = cdb[2], _be(cdb, 6, 4)
        if select not in (0x00, 0x01, 0x02):
            return self._invalid_cdb(2)
        if alloc < 16:
            return self._invalid_cdb(6)
        if b.owed_uas and b.owed_uas[0][12:14] == b"\x3f\x0e":
            self._fan_out(b, nexus, b.owed_uas.pop(0))
        if b.uas:
            b.discard_ua(nexus, 0x3F, 0x0E)
        luns = [] if select == 0x01 else sorted(set(self.report_luns()))
        body = b"".join(
            bytes((0, lun, 0, 0, 0, 0, 0, 0))
            if lun < 256
            else bytes((0x40 | (lun >> 8) & 0x3F, lun & 0xFF, 0, 0, 0, 0, 0, 0))
            for lun in luns
        )
        return Result(_GOOD, (struct.pack(">I4x", len(body)) + body)[:alloc])

    @staticmethod
    def _invalid_cdb(byte: int) -> Result:
        from ..scsi.cdb import invalid_cdb

        return Result(_CHECK, b"", invalid_cdb(byte).encode())

    def _scsi2(
        self, b: _Backend, nexus: Nexus, cdb: bytes, data_out: Any, n: int
    ) -> asyncio.Future[Result] | Result:
        """RESERVE / RELEASE (6/10), forwarded; the answer tells which
        frontend nexus holds the reservation (``frontends.py``)."""
        sent = self._submit(b, cdb, data_out, n)
        cdb = bytes(cdb)
        _on_answer(sent, lambda r: self._scsi2_answered(b, nexus, cdb, r))
        return sent

    def _scsi2_answered(self, b: _Backend, nexus: Nexus, cdb: bytes, r: Result) -> None:
        held = b.holder is not None
        note = b.observe(nexus, cdb, r, registered=b.key in self.snooper.state.guests)
        if note is not None:
            self.log.info("SCSI-2 reservation on the backend nexus of %s: %s", b.key, note)
        if held and b.holder is None and self.snooper.state.unverified:
            # a verification the reservation refused (every PR IN conflicts
            # with it, SPC-5 5.14.3) can run now
            self._schedule_verify("SCSI-2 reservation released")

    def _scsi2_refused(self, b: _Backend, nexus: Nexus, op: int, verdict: Verdict) -> Result:
        """A frontend that does not hold the SCSI-2 reservation another
        frontend of its backend nexus holds: answered here (SPC-2 5.5.1)."""
        holder = b.holder.initiator_port if b.holder is not None else "?"
        name = Opcode(op).name if op in Opcode._value2member_map_ else f"opcode 0x{op:02x}"
        if verdict is Verdict.GOOD:
            self.log.info(
                "%s from %s: GOOD without effect, %s holds the SCSI-2 reservation",
                name, nexus.initiator_port, holder,
            )
            return Result(_GOOD)
        self.log.info(
            "%s from %s: RESERVATION CONFLICT, %s holds the SCSI-2 reservation",
            name, nexus.initiator_port, holder,
        )
        return Result(Status.RESERVATION_CONFLICT)

    def _pr_in(
        self, b: _Backend, nexus: Nexus, cdb: bytes, data_out: Any, n: int
    ) -> asyncio.Future[Result] | Result:
        sent = self._submit(b, cdb, data_out, n)
        if self.snooper.state.generation is not None:
            # the guest's PR IN carries the PRgeneration: a change nobody
            # here made starts a reconciliation (snoop.py, _observe_pr_in)
            if isinstance(sent, Result):
                self._check_generation(b, cdb, sent)
            else:
                sent.add_done_callback(
                    lambda f: None
                    if f.cancelled() or f.exception() is not None
                    else self._check_generation(b, cdb, f.result())
                )
        if not self.migrate_pr or len(cdb) < 2 or (cdb[1] & 0x1F) != PrInAction.REPORT_CAPABILITIES:
            return sent
        if isinstance(sent, Result):
            return sent
        loop = self._loop or asyncio.get_running_loop()
        out: asyncio.Future[Result] = loop.create_future()

        def masked(f: asyncio.Future[Result]) -> None:
            if out.done():
                return
            if f.cancelled() or f.exception() is not None:
                self._chain(f, out)
                return
            r = f.result()
            if r.status == _GOOD:
                r = Result(r.status, self.filter.mask_pr_in(cdb, r.data_in), r.sense)
            out.set_result(r)

        sent.add_done_callback(masked)
        return out

    def _pr_out(
        self, b: _Backend, nexus: Nexus, cdb: bytes, data_out: Any, n: int
    ) -> asyncio.Future[Result] | Result:
        refusal = self.filter.refuse_pr_out(cdb, data_out)
        if refusal is not None:
            self.log.info(
                "refused PR OUT from %s with SPEC_I_PT/ALL_TG_PT (migrate-pr on)", nexus.initiator
            )
            return Result(_CHECK, b"", refusal.encode())
        data = bytes(data_out)
        try:
            intent = self._begin(b.key, bytes(cdb), data)
        except DeviceError:  # fail closed: what cannot be journaled is not done
            return Result(_CHECK, b"", encode_sense(Sense.INSUFFICIENT_REGISTRATION_RESOURCES))
        sent = self._submit(b, cdb, data, 0)
        loop = self._loop or asyncio.get_running_loop()
        out: asyncio.Future[Result] = loop.create_future()
        self._inflight.add(out)
        out.add_done_callback(self._inflight.discard)
        guest = nexus.initiator

        def answered(f: asyncio.Future[Result] | Result) -> None:
            if isinstance(f, Result):
                result = f
            elif f.cancelled() or f.exception() is not None:
                self._commit(intent, None)
                self.snooper.state.mark_unverified(b.key)
                self._schedule_verify()
                self._chain(f, out)
                return
            else:
                result = f.result()
            if self._snoop(guest, bytes(cdb), data, result, intent):
                self._bg.spawn(self._verify_then(out, result))
            elif not out.done():
                out.set_result(result)

        if isinstance(sent, Result):
            answered(sent)
        else:
            sent.add_done_callback(answered)
        return out

    def _check_generation(self, b: _Backend, cdb: bytes, result: Result) -> None:
        outcome = self.snooper.observe(b.key, cdb, b"", result)
        if outcome.verify:
            self.log.info("guest %s PR IN: %s: verifying PR state", b.key, outcome.note)
            self._schedule_verify("PRgeneration changed")

    async def _verify_then(self, out: asyncio.Future[Result], result: Result) -> None:
        try:
            await self.verify("after a PR OUT")
        except Exception as exc:  # the guest still gets the backend's answer
            self.log.warning("verification failed: %s", exc)
            self._retry_verify_later()
        if not out.done():
            out.set_result(result)

    def _snoop(
        self, guest: str, cdb: bytes, data: bytes, result: Result, intent: Intent | None
    ) -> bool:
        """Feed one PR OUT answer to the snooper; journal; True: verify now."""
        # a SCSI-2 reservation one of the device's nexuses holds explains a
        # conflict (one taken by another host is not known here: verified)
        scsi2 = any(x.holder is not None for x in self._backends.values())
        outcome = self.snooper.observe(guest, cdb, data, result, scsi2_held=scsi2)
        action = outcome.action.name if outcome.action is not None else "PR OUT"
        if (
            self._crash_after is not None
            and result.status == _GOOD
            and self._crash_after in (action, "ANY")
        ):
            # test hook: die between the backend's GOOD and the journal write
            self.log.warning("%s: killing the process after GOOD to %s", CRASH_ENV, action)
            os.kill(os.getpid(), signal.SIGKILL)
        self.log.info(
            "guest %s %s -> %s%s",
            outcome.guest or guest,
            action,
            _initiator.describe_result(result),
            f" ({outcome.note})" if outcome.note else "",
        )
        self._report(outcome.changes)
        self._commit(intent, self.snooper.state if outcome.changed else None)
        return outcome.verify

    def _report(self, changes: tuple[StateChange, ...]) -> None:
        for c in changes:
            self.log.info("PR state %s", c.describe())
        if changes and self.on_state_change is not None:
            try:
                self.on_state_change(self, changes)
            except Exception:
                self.log.exception("state change listener failed")

    # ------------------------------------------------------------ journal
    def _begin(self, key: str, cdb: bytes, data: bytes) -> Intent | None:
        if self.journal is None:
            return None
        try:
            return self.journal.begin(key, cdb, data)
        except JournalError as exc:
            self.log.error("journal: cannot record PR OUT intent, not forwarded: %s", exc)
            raise DeviceError(f"cannot journal the PR OUT: {exc}") from exc

    def _commit(self, intent: Intent | None, state: DevicePrState | None) -> None:
        if self.journal is None:
            return
        try:
            if intent is not None:
                self.journal.commit(intent, state)
            elif state is not None:
                self.journal.save(state)
        except JournalError as exc:
            self.log.error("journal: cannot write PR state: %s", exc)

    def _save(self) -> None:
        self._commit(None, self.snooper.state)

    # ------------------------------------------------------ unit attentions
    def _watch(self, b: _Backend, nexus: Nexus, r: asyncio.Future[Result] | Result) -> None:
        """``nexus`` shares ``b`` with other frontends: a unit attention in
        the backend's answer to it was theirs too (``frontends.py``)."""
        _on_answer(r, lambda result: self._reported(b, nexus, result))

    def _reported(self, b: _Backend, nexus: Nexus | None, r: Result) -> None:
        if r.status == _CHECK and unit_attention(r) is not None:
            self._fan_out(b, nexus, bytes(r.sense))

    def _fan_out(self, b: _Backend, receiver: Nexus | None, sense: bytes) -> None:
        """``sense`` (a UA of the backend nexus) went to ``receiver`` (None:
        to no frontend): queue it for the other frontends of ``b``."""
        n = b.establish(sense, receiver)
        if n:
            t = _sense_triple(sense)
            self.log.info(
                "unit attention %s of %s's backend nexus %s: queued for %d other frontend nexus(es)",
                f"{t[1]:02X}/{t[2]:02X}" if t is not None else "?",
                b.key,
                f"reported to {receiver.initiator_port}" if receiver is not None else "reported to none",
                n,
            )

    def _on_async_event(self, b: _Backend, message: Any, sense: Any) -> None:
        """A unit attention the backend reported asynchronously reached no
        frontend: every frontend of ``b`` gets it on its next command."""
        if sense is not None and sense.key == SenseKey.UNIT_ATTENTION:
            self._fan_out(b, None, _ua_sense((sense.asc, sense.ascq)))

    def _on_ua(self, b: _Backend, sense: Any) -> None:
        """A backend answer on ``b`` carried a unit attention (already
        forwarded to whoever asked): doubt the state, verify soon; a reset
        or nexus loss also ended any SCSI-2 reservation there."""
        if b.holder is not None and drops_scsi2(sense.asc, sense.ascq):
            holder = b.drop_reservation()
            self.log.info(
                "unit attention %02X/%02X on %s: SCSI-2 reservation of %s gone",
                sense.asc, sense.ascq, b.key, holder.initiator_port if holder else "?",
            )
        if puts_state_in_doubt((sense.asc, sense.ascq)):
            self.log.info(
                "unit attention %02X/%02X on %s: verifying PR state", sense.asc, sense.ascq, b.key
            )
            self.snooper.state.mark_unverified(b.key)
            self._schedule_verify(f"unit attention {sense.asc:02X}/{sense.ascq:02X}")

    def _schedule_verify(self, reason: str = "state in doubt") -> None:
        if self._closed:
            return
        self._verify_reason = reason
        if self._verifying is not None:
            self._verify_again = True
            return
        self._verifying = self._bg.spawn(self._verify_loop())

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

    def _retry_verify_later(self) -> None:
        """After a failed verification: another one later (backing off), so
        a guest's state in doubt does not stay so until some other trigger.
        A timer, not a task: ``drain`` (a migration's hold) does not wait
        for it."""
        if self._closed or self._verify_retry is not None:
            return
        delay = self._verify_retry_delay
        self._verify_retry_delay = min(delay * 2, VERIFY_RETRY_MAX)
        self.log.info("verifying again in %.1f s", delay)

        def fire() -> None:
            self._verify_retry = None
            self._schedule_verify("retry after a failed verification")

        self._verify_retry = asyncio.get_running_loop().call_later(delay, fire)

    # ------------------------------------------------------- verification
    async def _monitor_run(self, cdb: bytes, alloc: int) -> Result:
        s = await self._monitor_session()
        for _ in range(_UA_RETRIES):
            r = await s.submit(self.lun, cdb, b"", alloc)
            if not _is_ua(r):
                return r
        return r

    async def read_full_status(self) -> ReadFullStatus | None:
        """READ FULL STATUS on the monitor nexus (grown until complete);
        None when the backend does not implement it."""
        if self._full_status is False:
            return None
        alloc = _PR_IN_ALLOC
        while True:
            r = await self._monitor_run(pr_in_cdb(PrInAction.READ_FULL_STATUS, alloc), alloc)
            if r.status == _CHECK and _sense_triple(r.sense) in _NOT_IMPLEMENTED:
                if self._full_status is None:
                    self.log.info(
                        "backend has no READ FULL STATUS: using READ KEYS + READ RESERVATION"
                    )
                self._full_status = False
                return None
            if r.status != _GOOD:
                raise DeviceError(f"READ FULL STATUS: {_initiator.describe_result(r)}")
            self._full_status = True
            rfs = ReadFullStatus.decode(bytes(r.data_in))
            if not rfs.truncated or alloc >= 0xFFFF:
                return rfs
            alloc = min(0xFFFF, (rfs.additional_length or 0) + 8)

    async def read_keys_and_reservation(self) -> tuple[ReadKeys, ReadReservation]:
        """READ KEYS and READ RESERVATION on the monitor nexus (unit
        attentions retried there, none taken from a guest's nexus)."""
        return await self._read_keys_and_reservation()

    async def _read_keys_and_reservation(self) -> tuple[ReadKeys, ReadReservation]:
        alloc = _PR_IN_ALLOC
        r = await self._monitor_run(pr_in_cdb(PrInAction.READ_KEYS, alloc), alloc)
        if r.status != _GOOD:
            raise DeviceError(f"READ KEYS: {_initiator.describe_result(r)}")
        keys = ReadKeys.decode(bytes(r.data_in))
        r = await self._monitor_run(pr_in_cdb(PrInAction.READ_RESERVATION, alloc), alloc)
        if r.status != _GOOD:
            raise DeviceError(f"READ RESERVATION: {_initiator.describe_result(r)}")
        return keys, ReadReservation.decode(bytes(r.data_in))

    @property
    def verify_method(self) -> str | None:
        """How the backend is read back: READ FULL STATUS, or the READ KEYS
        + READ RESERVATION fallback; None until the first reconciliation."""
        if self._full_status is None:
            return None
        return FULL_STATUS_METHOD if self._full_status else KEYS_METHOD

    async def verify(self, reason: str = "on demand") -> tuple[StateChange, ...]:
        """Reconcile the tracked state of every known guest with the backend
        (READ FULL STATUS filtered by the device's own TransportIDs, or the
        READ KEYS + READ RESERVATION fallback). Every change is journaled."""
        for key in list(self.snooper.state.guests) + list(self.snooper.state.unverified):
            if key not in self.snooper.transport_ids:
                self._note_port(key)
        before = self.snooper.state.to_dict()
        unknown: tuple[str, ...] = ()
        try:
            rfs = await self.read_full_status()
            if rfs is not None:
                changes = self.snooper.apply_full_status(rfs)
                how = FULL_STATUS_METHOD
            else:
                keys, rr = await self._read_keys_and_reservation()
                rec = self.snooper.apply_keys(keys, rr)
                changes = rec.changes
                how = KEYS_METHOD
                unknown = tuple(u.describe() for u in rec.unknown)
                for u in unknown:
                    self.log.debug("verification left open: %s", u)
        except (PrDecodeError, ReconcileError, IscsiError, DeviceError) as exc:
            what = (
                "backend unreachable" if isinstance(exc, IscsiError)
                else "backend refused" if isinstance(exc, DeviceError)
                else "backend PR data unusable"
            )
            self.last_verify_error = f"{what}: {exc}"
            self._reconciled(reason, None, (), (), self.last_verify_error)
            raise DeviceError(self.last_verify_error) from exc
        self.last_verified = time.time()
        self.last_verify_error = None
        self._verify_retry_delay = VERIFY_RETRY_FIRST
        if self._verify_retry is not None:  # this one did it
            self._verify_retry.cancel()
            self._verify_retry = None
        self.verify_unknown = unknown
        if changes:
            self.log.info("verified by %s (%s): %d change(s)", how, reason, len(changes))
            self._report(changes)
        if changes or self.snooper.state.to_dict() != before:
            self._save()
        self._reconciled(reason, how, changes, unknown, None)
        return changes

    def _reconciled(
        self,
        reason: str,
        method: str | None,
        changes: tuple[StateChange, ...],
        unknown: tuple[str, ...],
        error: str | None,
    ) -> None:
        if self.on_reconcile is None:
            return
        info: dict[str, Any] = {
            "reason": reason,
            "method": method,
            "changes": [c.describe() for c in changes],
            "unknown": list(unknown),
        }
        if error is not None:
            info["error"] = error
        try:
            self.on_reconcile(self, info)
        except Exception:
            self.log.exception("reconcile listener failed")

    # --------------------------------------------------------- guest events
    @property
    def block_size(self) -> int:
        """The LUN's block size (512 until the identity is known); the
        target's write residuals use it too."""
        return self.identity.block_size if self.identity is not None else 512

    def report_luns(self) -> list[int]:
        """The LUNs REPORT LUNS lists (the target node replaces this)."""
        return [self.frontend_lun]

    def attach(self, nexus: Nexus) -> None:
        """A guest logged in (called by the target for each new nexus). It
        starts with no unit attention queued, as a new nexus on a LU."""
        self._backend(nexus.initiator).attach(nexus)

    def nexus_lost(self, nexus: Nexus) -> None:
        key = state_key(self.mode, nexus.initiator)
        b = self._backends.get(key)
        if b is None:
            return
        held = b.holder is not None and b.holder == nexus
        release = b.detach(nexus)
        if release is not None:
            # the LU would drop the reservation on this nexus loss; the
            # backend nexus stays for the other frontends: release it there
            self.log.info(
                "%s left holding the SCSI-2 reservation; %d other frontend(s) keep the "
                "backend nexus of %s: sending %s",
                nexus.initiator_port, len(b.frontends), b.key, Opcode(release[0]).name,
            )
            # like a task management function: what any guest sends after
            # the logout reaches the LU after the release
            self._forward_tmf(
                b, Opcode(release[0]).name, lambda s: self._release_for_lost(b, s, release)
            )
        elif held:
            self.log.info(
                "%s left holding the SCSI-2 reservation; its backend nexus closes (I_T nexus loss)",
                nexus.initiator_port,
            )
        if not b.frontends and self._held is None:
            self._close_if_unused(b)

    async def _release_for_lost(self, b: _Backend, s: Session, cdb: bytes) -> None:
        """RELEASE on ``b``'s backend nexus for a holder that left. Unit
        attentions it meets reached no frontend: all of them get them."""
        if b.closing is not None:
            return  # the backend nexus ends: its loss releases the reservation
        what = Opcode(cdb[0]).name
        r = Result()
        try:
            for _ in range(_UA_RETRIES):
                r = await s.submit(self.lun, cdb, b"", 0)
                if unit_attention(r) is None:
                    break
                self._fan_out(b, None, bytes(r.sense))
        except IscsiError as exc:
            self.log.warning("%s on the backend nexus of %s failed: %s", what, b.key, exc)
            return
        self.log.info(
            "%s on the backend nexus of %s -> %s", what, b.key, _initiator.describe_result(r)
        )

    def _close_if_unused(self, b: _Backend) -> None:
        if b.frontends or b.session is None or b.closing is not None or self._closed:
            return
        b.closing = self._bg.spawn(self._close_backend(b))

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        """A guest's LOGICAL UNIT / TARGET RESET: the device is one LU of the
        backend, so every kind becomes a LOGICAL UNIT RESET there (a guest
        must not reset the whole shared target). The frontend answers a
        target reset "function not supported" instead, without calling
        this, when the backend does not report target resets
        (``target_reset_supported``)."""
        b = self._backends.get(state_key(self.mode, nexus.initiator))
        if b is not None and b.session is not None:
            holder = b.drop_reservation()  # SAM-5 6.3.3: a LU reset releases it
            if holder is not None:
                self.log.info(
                    "reset from %s: SCSI-2 reservation of %s released",
                    nexus.initiator_port, holder.initiator_port,
                )
            self._forward_tmf(b, "LOGICAL UNIT RESET", lambda s: s.lun_reset(self.lun))

    def clear_task_set(self, nexus: Nexus) -> None:
        b = self._backends.get(state_key(self.mode, nexus.initiator))
        if b is not None and b.session is not None:
            self._forward_tmf(b, "CLEAR TASK SET", lambda s: s.clear_task_set(self.lun))

    def _forward_tmf(self, b: _Backend, what: str, call: Callable[[Session], Any]) -> None:
        """The guest has its task management response already, so a command
        any guest sends after it must reach the backend LU after the
        function (as on a LU, where the function is done when answered):
        every backend's commands wait until the backend answered it. (Our
        initiator would also count a command sent on ``b`` meanwhile among
        the function's victims.)"""
        self._tmf = self._bg.spawn(self._run_tmf(b, self._tmf, what, call))
        for other in self._backends.values():
            other.pause(True)

    async def _run_tmf(
        self, b: _Backend, before: asyncio.Task[None] | None, what: str, call: Callable[[Session], Any]
    ) -> None:
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
                self._resume()

    def _resume(self) -> None:
        """Send what waited for a task management function."""
        for b in self._backends.values():
            b.pause(False)
            s = b.session
            if s is not None and b.closing is None:
                self._send_waiting(b, s)
            elif b.waiting and not self._closed and b.opening is None:
                b.opening = self._bg.spawn(self._open(b))

    # ------------------------------------------------------ migration hooks
    @property
    def held(self) -> bool:
        return self._held is not None

    def hold(self) -> None:
        """Stop forwarding: guest commands from now on are queued."""
        if self._held is None:
            self._held = []
            self.log.info("holding guest commands")

    async def drain(self) -> None:
        """Wait for every forwarded command and the snooping/verification
        that follows it."""
        while True:
            waits: list[Any] = list(self._inflight)
            if self._verifying is not None:
                waits.append(self._verifying)
            if self._tmf is not None:
                waits.append(self._tmf)
            waits += [b.opening for b in self._backends.values() if b.opening is not None]
            if waits:
                await asyncio.wait(waits)
                continue
            if not any(
                b.session is not None and b.session.core.outstanding
                for b in self._backends.values()
            ):
                return
            await asyncio.sleep(0.001)

    def release_held(self) -> None:
        """Rollback: forward the queued commands in order and resume."""
        held, self._held = self._held, None
        if held is None:
            return
        self.log.info("resuming; forwarding %d held command(s)", len(held))
        for h in held:
            b = self._backends.get(state_key(self.mode, h.nexus.initiator))
            if h.future.done() or b is None or h.nexus not in b.frontends:
                continue  # its session ended meanwhile: nobody to answer
            self._chain(self.execute(h.nexus, h.cdb, h.data_out, h.data_in_len), h.future)
        for b in self._backends.values():
            if not b.frontends:
                self._close_if_unused(b)

    def discard_held(self) -> int:
        """After a move: drop the queued commands unanswered (the guest
        re-issues them on the destination). The device stays held."""
        held = self._held or []
        if self._held is not None:
            self._held = []
        self.log.info("discarding %d held command(s)", len(held))
        return len(held)

    def snapshot(self) -> DeviceSnapshot:
        return DeviceSnapshot(
            self.config,
            self.identity,
            self.snooper.state.copy(),
            {
                b.key: _owed(b)
                for b in self._backends.values()
                if b.owed_uas or b.uas
            },
        )

    def restore(
        self,
        state: DevicePrState,
        identity: DeviceIdentity | None = None,
        pending_uas: dict[str, list[Any]] | None = None,
    ) -> None:
        """Adopt a migrated state (and identity, and UAs owed to guests:
        (key, ASC, ASCQ) or (ASC, ASCQ) tuples, ``Sense`` members or sense bytes)."""
        self.snooper.state = state.copy()
        for guest in state.guests:
            self._note_port(guest)
        if identity is not None:
            self.identity = identity
        for key, uas in (pending_uas or {}).items():
            self._backend(key).owed_uas.extend(_ua_sense(u) for u in uas)
        self._save()
        self.log.info("restored PR state: %s", self._describe_state() or "none")

    async def pr_out(
        self,
        guest: str,
        action: PrOutAction | int,
        rtype: PrType | int,
        rk: int,
        sark: int,
        scope: int = 0,
        aptpl: bool = False,
    ) -> Result:
        """A PR OUT on ``guest``'s backend nexus, journaled and snooped.
        Unit attentions are retried and kept to be reported to the guest.
        DeviceError, and nothing sent, when its intent cannot be journaled."""
        b = self._backend(guest)
        session = await self.backend_session(guest)
        cdb = pr_out_cdb(action, rtype, scope)
        data = pr_out_params(rk, sark, aptpl=aptpl)
        intent = self._begin(b.key, cdb, data)
        r = Result()
        for _ in range(_UA_RETRIES):
            r = await session.submit(self.lun, cdb, data)
            if not _is_ua(r):
                break
            b.owed_uas.append(bytes(r.sense))
        if self._snoop(guest, cdb, data, r, intent):
            try:
                await self.verify(f"after {PrOutAction(action).name}")
            except DeviceError as exc:
                self.log.warning("verification after %s failed: %s", PrOutAction(action).name, exc)
        return r

    # ------------------------------------------------------------ identity
    async def capture_identity(self) -> DeviceIdentity:
        """Standard INQUIRY, VPD 80h/83h and READ CAPACITY(16) from the backend."""
        s = await self._monitor_session()
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
        if not std or std[0] >> 5 != 0 or rc is None:
            # SPC-5 6.7.2: qualifier 011b, no LU at this LUN (READ CAPACITY
            # then fails too): nothing to front
            raise DeviceError(
                f"backend {self.config.backend_url} has no logical unit {self.lun}"
                f" (INQUIRY peripheral qualifier {std[0] >> 5 if std else '?'}"
                f"{', READ CAPACITY failed' if rc is None else ''})"
            )
        ident = DeviceIdentity.capture(std, vpd, rc)
        self.log.info(
            "backend LUN: %s %s serial %s, %d x %d bytes",
            ident.vendor,
            ident.product,
            ident.serial,
            ident.capacity_blocks,
            ident.block_size,
        )
        return ident

    async def capture_tmfs(self) -> SupportedTmfs | None:
        """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS from the backend LUN;
        None when the backend does not implement it (tgt) or fails it."""
        s = await self._monitor_session()
        try:
            tmfs = await s.report_supported_tmfs(lun=self.lun)
        except IscsiError as exc:
            self.log.info("backend task management functions unknown (target resets refused): %s", exc)
            return None
        self.log.info("backend task management functions: %s", ", ".join(tmfs.names()) or "none")
        return tmfs

    @property
    def target_reset_supported(self) -> bool:
        """Whether the guest frontend takes a TARGET WARM/COLD RESET (as a
        LOGICAL UNIT RESET of the backend LUN, see ``reset``): only when
        the backend reports target resets, so a guest sees the same TMF
        support through the device as on the backend (a guest REPORT
        SUPPORTED TASK MANAGEMENT FUNCTIONS reaches the backend)."""
        return self.backend_tmfs is not None and self.backend_tmfs.target_reset

    # ------------------------------------------------------------ reporting
    def _describe_state(self) -> str:
        return "; ".join(
            f"{g}: {describe_guest(s)}" for g, s in sorted(self.snooper.state.guests.items())
        )

    def describe(self) -> dict[str, object]:
        """``query-devices`` entry."""
        st = self.snooper.state
        nexuses = {}
        for key, b in sorted(self._backends.items()):
            nexuses[key] = {
                "initiator": b.port.initiator,
                "isid": f"0x{b.port.isid:012x}",
                "transport_id": str(b.port),
                "connected": b.session is not None and b.session.logged_in,
                "session": _initiator.link_state_of(b.session),
                "frontends": sorted(n.initiator_port for n in b.frontends),
            }
        return {
            "name": self.name,
            "properties": {
                "backend": self.config.backend_url,
                "target": self.config.target_iqn,
                "lun": self.config.lun,
                "machine": self.config.machine,
                "migrate-pr": None
                if self.config.migrate_pr is None
                else ("on" if self.config.migrate_pr else "off"),
                "guests": None if self.config.guests is None else sorted(self.config.guests),
                "identity": str(self.config.identity),
            },
            "machine": self.config.machine,
            "migrate-pr": self.migrate_pr,
            "held": self.held,
            "backend-nexus": nexuses,
            "monitor-session": _initiator.link_state_of(self._monitor),
            # REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS of the backend (None:
            # not implemented there); target-reset: what the frontend takes
            "backend-tmfs": None if self.backend_tmfs is None else list(self.backend_tmfs.names()),
            "target-reset": self.target_reset_supported,
            "pr-state": {
                "method": self.verify_method,
                "method-cannot-tell": list(KEYS_METHOD_LIMITS)
                if self.verify_method == KEYS_METHOD
                else [],
                "open-questions": list(self.verify_unknown),
                "last-verified": None
                if self.last_verified is None
                else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_verified)),
                "last-verified-age-s": None
                if self.last_verified is None
                else round(time.time() - self.last_verified, 3),
                "last-verify-error": self.last_verify_error,
                "guests": {
                    g: {
                        "key": f"0x{s.key:016x}",
                        "backend-nexus": str(self._port(g)),
                        "aptpl": s.aptpl,
                        "holder": s.holder,
                        "type": s.rtype.name if s.holder else None,
                        "scope": s.scope,
                        "verified": g not in st.unverified,
                    }
                    for g, s in sorted(st.guests.items())
                },
                "generation": st.generation,
                "unverified": sorted(st.unverified),
            },
            "identity": None
            if self.identity is None
            else {
                "vendor": self.identity.vendor,
                "product": self.identity.product,
                "serial": self.identity.serial,
                "naa": self.identity.naa_id,
                "blocks": self.identity.capacity_blocks,
                "block_size": self.identity.block_size,
            },
        }


def _sense_triple(sense: bytes) -> tuple[int, int, int] | None:
    try:
        s = decode_sense(sense)
    except SenseDecodeError:
        return None
    return (int(s.key), s.asc, s.ascq)


def _owed(b: _Backend) -> list[tuple[int, int, int]]:
    """What a snapshot owes the guest of ``b``: the UAs owed to the guest,
    then each one still queued for one of its frontend nexuses (once)."""
    out = [t for t in (_sense_triple(u) for u in b.owed_uas) if t is not None]
    for u in b.pending_uas():
        t = _sense_triple(u)
        if t is not None and t not in out:
            out.append(t)
    return out


def _ua_sense(ua: Any) -> bytes:
    """Fixed-format sense for a unit attention given in any of the forms
    ``restore`` accepts."""
    if isinstance(ua, bytes | bytearray):
        return bytes(ua)
    value = getattr(ua, "value", ua)
    asc, ascq = int(value[-2]), int(value[-1])
    known = Sense.lookup(SenseKey.UNIT_ATTENTION, asc, ascq)
    if known is not None:
        return encode_sense(known)
    raw = bytearray(encode_sense(Sense.POWER_ON_RESET))
    raw[12], raw[13] = asc, ascq
    return bytes(raw)


def _on_answer(r: asyncio.Future[Result] | Result, fn: Callable[[Result], Any]) -> None:
    """``fn(result)`` once the backend's answer is there (at once if it is:
    before whoever awaits it can send the next command)."""
    if isinstance(r, Result):
        fn(r)
        return

    def answered(f: asyncio.Future[Result]) -> None:
        if not f.cancelled() and f.exception() is None:
            fn(f.result())

    if r.done():
        answered(r)
    else:
        r.add_done_callback(answered)


def _is_ua(r: Result) -> bool:
    if r.status != _CHECK:
        return False
    t = _sense_triple(bytes(r.sense))
    return t is not None and t[0] == SenseKey.UNIT_ATTENTION


__all__ = [
    "DeviceError",
    "DeviceSnapshot",
    "MONITOR",
    "PassthroughDevice",
    "expected_in_len",
]
