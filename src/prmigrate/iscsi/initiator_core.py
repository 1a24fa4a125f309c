"""Sans-IO iSCSI initiator: one session over one connection (RFC 7143).

The core is fed bytes (``receive_data``) and the clock (``handle_timer(now)``),
is asked to do things (``start_login``, ``submit``, ``task_management``,
``send_targets``, ``logout``) and answers with events (returned lists) and
bytes to write (``data_to_send``). It never touches a socket, an event loop
or the system clock; ``initiator.py`` is the asyncio shell around it.

Invariants kept here:

* CmdSN: every non-immediate request takes the next CmdSN and is sent only
  while ``CmdSN <= MaxCmdSN`` (serial arithmetic, RFC 7143 4.2.2.1) and fewer
  than ``queue_depth`` SCSI commands are outstanding; immediate PDUs (NOP-Out,
  task management, text, logout) carry the current CmdSN without taking it.
* ExpStatSN = last StatSN + 1, advanced by every status-carrying PDU
  (a NOP-In with ITT 0xffffffff reports the next StatSN without using it).
* A SCSI command is "without status" from the moment it is queued until a
  SCSI Response or a Data-In with S arrives. After a lost connection every
  such command goes back to the front of the queue (new ITT, new CmdSN) and
  is sent again once a new login (same ISID: session reinstatement, RFC
  7143 6.3.5) succeeds, at most ``max_retries`` times.
* Outgoing data: immediate data up to min(FirstBurstLength, target's
  MaxRecvDataSegmentLength) when ImmediateData=Yes; unsolicited Data-Out up
  to FirstBurstLength when InitialR2T=No; the rest only as R2Ts ask, each
  Data-Out PDU at most the target's MaxRecvDataSegmentLength (RFC 7143 4.2,
  13.7-13.14).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

from ..logprefix import PrefixLog
from ..lun.types import Result
from ..scsi.constants import Status
from ..scsi.sense import DecodedSense, SenseDecodeError, decode_sense, unit_attention_of
from .chap import ChapClient, ChapCredentials
from .login import (
    LoginError,
    LoginStages,
    Negotiation,
    Role,
    SessionParams,
    Stage,
    decode_text,
    encode_text,
)
from .pdu import (
    _HDR_U32,
    R2T,
    RESERVED_TAG,
    SCSI_COMMAND,
    AsyncEvent,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Opcode,
    PduReader,
    ProtocolError,
    RawPdu,
    Reject,
    RejectReason,
    ResponseFlags,
    ScsiResponse,
    TaskAttribute,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    TmfFunction,
    decode_pdu,
    encode_lun,
    frame_into,
    place_segment,
)

log = logging.getLogger(__name__)
_STATUS = {int(s): s for s in Status}  # status byte -> Status
_NO_DATA = memoryview(b"")
_OWNABLE = (bytes, bytearray)  # what submit_relay takes over without a copy
_RESIDUAL = (ResponseFlags.UNDERFLOW | ResponseFlags.OVERFLOW
             | ResponseFlags.BIDI_UNDERFLOW | ResponseFlags.BIDI_OVERFLOW)


class SessionLog(PrefixLog):
    """Prefixes every line with the session's I_T nexus name (an argument,
    never part of the format string: a name may contain ``%``)."""

SN_MASK = 0xFFFFFFFF
_HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b on 32 bits (RFC 1982, RFC 7143 4.2.2.1)."""
    return a != b and ((b - a) & SN_MASK) < _HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def describe_result(result: Result) -> str:
    """``GOOD`` / ``RESERVATION CONFLICT`` / ``CHECK CONDITION: ILLEGAL
    REQUEST: INVALID FIELD IN CDB``."""
    try:
        text = Status(result.status).name.replace("_", " ")
    except ValueError:
        text = f"status 0x{int(result.status):02x}"
    if result.status == Status.CHECK_CONDITION:
        try:
            text += ": " + decode_sense(result.sense).describe()
        except SenseDecodeError:
            text += " (no valid sense data)"
    return text


def link_state_of(session: object) -> dict[str, Any] | None:
    """``Session.link_state()`` of ``session``; None for no session or an
    object without one (a test's stand-in)."""
    fn = getattr(session, "link_state", None)
    return fn() if callable(fn) else None


# --------------------------------------------------------------------- errors


class IscsiError(Exception):
    """Base of the initiator's errors."""


class SessionLoginError(IscsiError, LoginError):
    """Login refused or failed: both an IscsiError and a ``login.LoginError``
    (``status`` is the login status class/detail)."""


class LoginTimeout(IscsiError, TimeoutError):
    """The target did not complete the login in time."""


class ConnectionLost(IscsiError):
    """The connection dropped and the command could not be re-issued."""


class CommandRejected(IscsiError):
    """The target rejected the PDU (Reject PDU, RFC 7143 11.17)."""

    def __init__(self, reason: int) -> None:
        super().__init__(f"rejected by target, reason 0x{reason:02x}")
        self.reason = reason


class TaskAborted(IscsiError):
    """The command was aborted by a task management function."""


class TargetFailure(IscsiError):
    """SCSI Response with response code TARGET FAILURE (RFC 7143 11.4.3)."""


# --------------------------------------------------------------- negotiation


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What a login established: the negotiated parameters plus the
    session identity the target gave."""

    params: SessionParams = field(default_factory=SessionParams)
    tsih: int = 0
    target_portal_group_tag: int = 0
    target_alias: str = ""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What the caller chose for the session."""

    initiator_name: str
    isid: int
    target_name: str = ""  # "" = discovery session
    header_digest: bool | str = False
    data_digest: bool | str = False
    chap: tuple[str, str] | None = None  # (user, secret) we answer with
    mutual: tuple[str, str] | None = None  # (target user, target secret) we check
    initial_r2t: bool = False
    immediate_data: bool = True
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 262144
    # offered as high as MaxBurstLength: a write up to it goes whole as
    # immediate data (when the target agrees), without an R2T round trip
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 1
    queue_depth: int = 64
    max_retries: int = 3
    command_timeout: float = 30.0
    nop_interval: float = 5.0  # seconds of silence before a NOP-Out ping
    nop_timeout: float = 10.0  # a ping unanswered this long drops the connection
    cid: int = 0
    # While the session is down (or held after a re-login, see ``gate``), a
    # command waits at most this long, then completes with BUSY status
    # (``expire_held``); None: it waits for the next login however long.
    hold_timeout: float | None = None

    @property
    def discovery(self) -> bool:
        return not self.target_name


def _digest_offer(v: bool | str) -> tuple[str, ...]:
    """True: CRC32C only; False: None only; a string: that list ("CRC32C,None")."""
    if isinstance(v, str):
        return tuple(v.split(","))
    return ("CRC32C",) if v else ("None",)


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class LoginDone:
    negotiated: Negotiated


@dataclass(frozen=True, slots=True)
class LoginRedirect:
    address: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class LoginFailed:
    error: SessionLoginError


@dataclass(frozen=True, slots=True)
class CommandDone:
    handle: int
    result: Result


@dataclass(frozen=True, slots=True)
class CommandFailed:
    handle: int
    error: Exception


@dataclass(frozen=True, slots=True)
class TmfDone:
    handle: int
    response: int


@dataclass(frozen=True, slots=True)
class TextDone:
    handle: int
    pairs: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class LogoutDone:
    handle: int
    response: int


@dataclass(frozen=True, slots=True)
class AsyncEventReceived:
    message: AsyncMessage
    sense: DecodedSense | None


@dataclass(frozen=True, slots=True)
class UnitAttention:
    lun: int
    sense: DecodedSense


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The core wants the connection dropped (protocol error, timeout)."""

    reason: str


Event = (
    LoginDone | LoginRedirect | LoginFailed | CommandDone | CommandFailed | TmfDone | TextDone
    | LogoutDone | AsyncEventReceived | UnitAttention | ConnectionFailed
)


# ------------------------------------------------------------------ commands


@dataclass(slots=True)
class _Command:
    handle: int
    lun: int
    cdb: bytes
    data_out: memoryview
    data_in_len: int
    attr: TaskAttribute
    itt: int = RESERVED_TAG
    cmdsn: int = 0
    buf: bytearray | None = None
    high: int = 0  # highest byte of Data-In received
    sent_at: float = 0.0
    retries: int = 0
    sink: RelaySink | None = None  # completes by call instead of event (see submit_relay)
    token: Any = None  # the sink's name for the command
    held_since: float | None = None  # queued while the session was down (see expire_held)


def _check_lengths(cdb: bytes, data_in_len: int, data_out_len: int) -> None:
    """ValueError for what one SCSI Command PDU cannot carry: a CDB over
    16 bytes (no AHS here), a length outside the 32-bit EDTL field."""
    if len(cdb) > 16:
        raise ValueError("CDBs longer than 16 bytes are not supported")
    if not 0 <= data_in_len <= SN_MASK or data_out_len > SN_MASK:
        raise ValueError("an expected data transfer length is 0 to 2^32 - 1 bytes")


class RelaySink(Protocol):
    """Where a relayed command completes (see ``InitiatorCore.submit_relay``).

    Both methods are called synchronously from ``receive_data`` (or from the
    call that ends the command: ``connection_lost``, ``fail_all``...) and
    must not call back into the core."""

    def relay_data(self, token: Any, status: int, data: bytearray) -> None:
        """The read ended with one Data-In carrying all of its data and the
        status; ``data`` (a copy out of the receive buffer) is the sink's. A
        write (no data in) ends here with GOOD, no sense and no residual,
        ``data`` empty."""

    def relay_result(self, token: Any, result: Result | Exception) -> None:
        """Any other end: the Result (any status) or the error a
        ``CommandDone``/``CommandFailed`` would have carried."""


@dataclass(slots=True)
class _Other:
    """A non-SCSI request awaiting its response: tmf, text, logout, nop."""

    kind: str
    handle: int
    sent_at: float
    lun: int = 0
    function: int = 0
    ref_itt: int = RESERVED_TAG
    text: bytearray = field(default_factory=bytearray)
    cmdsn: int = 0  # the CmdSN the (immediate) request carried


class State(Enum):
    FREE = "free"  # no connection
    SECURITY = "security"  # login, CSG 0
    OPERATIONAL = "operational"  # login, CSG 1
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"


# --------------------------------------------------------------- reconnect


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a session whose connection was lost logs in again.

    The delay before attempt n+1 (n failed attempts so far, n >= 1) is
    ``first * factor ** (n - 1)``, at most ``cap``, spread by +/- ``jitter``
    (a fraction) so that the sessions of many devices do not log in at the
    same instant. ``give_up_after`` seconds after the loss the session stops
    trying and fails what it holds; None: it tries for as long as it lives.
    """

    first: float = 0.5
    factor: float = 2.0
    cap: float = 15.0
    jitter: float = 0.2
    give_up_after: float | None = None

    def delay(self, failed: int, rand: float) -> float:
        """The wait after ``failed`` failed attempts; ``rand`` in [0, 1)."""
        base = min(self.cap, self.first * self.factor ** max(0, failed - 1))
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rand - 1.0)))


# What a forwarding device's backend sessions use: never give up (an outage
# of any length ends when the target is back), at most 15 s (+/- 20 %)
# between two attempts.
PERSISTENT = ReconnectPolicy()

# How long a forwarding device's backend session holds a guest's command
# while it is down, before answering BUSY (SessionConfig.hold_timeout): well
# under the guests' command timeouts (Linux sd 30 s, Windows 60 s), so the
# guest sees a status it retries rather than a timeout it escalates into
# aborts and resets; long enough that an outage of a few seconds is only
# a stall.
HOLD_TIMEOUT = 10.0


class LinkState(Enum):
    """A session's connection as its users see it (one log line per change)."""

    UP = "up"  # logged in, commands flow
    DOWN = "down"  # connection lost, the first login attempt under way
    RETRYING = "retrying"  # a login attempt failed; the next one is scheduled
    CLOSED = "closed"  # closed by its owner, or given up: commands fail


@dataclass(slots=True)
class Link:
    """The connection state of one session over time: when it went down,
    how many login attempts failed, the delay before the next one. Each
    method returns the log line its transition deserves, or None: a
    failed attempt is logged while the delay still grows or the error
    changes, so an outage of any length costs a bounded number of lines."""

    policy: ReconnectPolicy
    state: LinkState = LinkState.UP
    since: float = 0.0  # clock of the last change of ``state``
    down_since: float | None = None
    failed: int = 0  # login attempts failed since ``down_since``
    next_delay: float = 0.0
    last_error: str = ""

    def _enter(self, state: LinkState, now: float) -> None:
        if state is not self.state:
            self.state, self.since = state, now

    def lost(self, now: float, reason: str) -> str:
        self._enter(LinkState.DOWN, now)
        self.down_since, self.failed, self.next_delay, self.last_error = now, 0, 0.0, reason
        return f"connection down ({reason}): logging in again"

    def attempt_failed(self, now: float, error: str, rand: float) -> tuple[float, str | None]:
        """A login attempt failed: (delay before the next one, log line)."""
        self.failed += 1
        delay = self.policy.delay(self.failed, rand)
        grew = self.failed == 1 or self.policy.delay(self.failed - 1, 0.5) < self.policy.delay(self.failed, 0.5)
        changed = error != self.last_error
        self.next_delay, self.last_error = delay, error
        self._enter(LinkState.RETRYING, now)
        if not (grew or changed):
            return delay, None
        tail = "" if grew else f" (retrying every {self.policy.cap:.0f} s, logged again on a change)"
        return delay, (f"login attempt {self.failed} failed ({error}); next in {delay:.1f} s{tail}")

    def exhausted(self, now: float) -> bool:
        """True when the policy gives up on this outage."""
        limit = self.policy.give_up_after
        return limit is not None and self.down_since is not None and now - self.down_since >= limit

    def up(self, now: float) -> str:
        down = 0.0 if self.down_since is None else now - self.down_since
        line = f"back up after {down:.1f} s down ({self.failed} failed login attempt(s))"
        self._enter(LinkState.UP, now)
        self.down_since, self.failed, self.next_delay, self.last_error = None, 0, 0.0, ""
        return line

    def closed(self, now: float, why: str = "") -> None:
        self._enter(LinkState.CLOSED, now)
        if why:
            self.last_error = why


# Login stages on the wire (RFC 7143 11.12.3).
_CSG = {State.SECURITY: Stage.SECURITY, State.OPERATIONAL: Stage.OPERATIONAL}
_MAX_LOGIN_EXCHANGES = 16


class InitiatorCore:
    """One iSCSI session, one connection at a time, no I/O."""

    def __init__(
        self,
        config: SessionConfig,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.log = SessionLog(log, {"session": (
            f"{config.initiator_name},i,0x{config.isid:012x}->{config.target_name or 'discovery'}")})
        self._random = random_bytes
        self.state = State.FREE
        self.cmdsn = 1
        self.exp_cmdsn = 1
        self.max_cmdsn = 1
        self.exp_statsn = 0
        self._itt = 0
        self._handle = 0
        self._out: list[bytes] = []
        self._reader = PduReader()
        self._waiting: deque[_Command] = deque()
        self._active: dict[int, _Command] = {}  # itt -> command on the wire
        self._by_handle: dict[int, _Command] = {}
        self._other: dict[int, _Other] = {}  # itt -> request
        self._last_rx = 0.0
        self._ping_itt: int | None = None
        # True: logged in, but queued commands are not sent (``gate``)
        self.gated = False
        # login
        self.negotiated = Negotiated()
        self._login_itt = 0
        self._login_exchanges = 0
        self._stages = LoginStages()
        self._neg = Negotiation(Role.INITIATOR)
        self._chap: ChapClient | None = None
        self._chap_started = False
        self._digests_pending = False

    # ---------------------------------------------------------------- plumbing

    @property
    def params(self) -> SessionParams:
        """Negotiated operational parameters of the current login."""
        return self.negotiated.params

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _send(self, pdu: object) -> None:
        hd = self.params.header_digest and self.state is State.FULL_FEATURE
        dd = self.params.data_digest and self.state is State.FULL_FEATURE
        self._out.append(pdu.encode(hd, dd))  # type: ignore[attr-defined]

    def _next_itt(self) -> int:
        self._itt = (self._itt + 1) & 0x7FFFFFFF or 1
        return self._itt

    def _next_handle(self) -> int:
        self._handle += 1
        return self._handle

    @property
    def outstanding(self) -> int:
        """SCSI commands without status (queued or on the wire)."""
        return len(self._by_handle)

    @property
    def logged_in(self) -> bool:
        return self.state is State.FULL_FEATURE

    # ------------------------------------------------------------------- login

    def start_login(self, now: float) -> None:
        """A new TCP connection is up: begin a login with the session's ISID
        and TSIH 0 (a new session, or reinstatement of an old one with the
        same ISID, RFC 7143 6.3.5)."""
        cfg = self.config
        self.state = State.SECURITY
        self.negotiated = Negotiated()
        self._reader = PduReader(max_data_length=8192)
        self._out.clear()
        self.exp_statsn = 0
        self._login_itt = self._next_itt()
        self._login_exchanges = 0
        self._last_rx = now
        self._ping_itt = None
        self._stages = LoginStages()
        self._chap_started = False
        self._neg = Negotiation(Role.INITIATOR, self._local_values())
        self._chap = (
            ChapClient(ChapCredentials.make(*cfg.chap),
                       ChapCredentials.make(*cfg.mutual) if cfg.mutual else None,
                       self._random)
            if cfg.chap else None
        )
        keys: list[tuple[str, str]] = [("InitiatorName", cfg.initiator_name)]
        if cfg.discovery:
            keys.append(("SessionType", "Discovery"))
        else:
            keys += [("SessionType", "Normal"), ("TargetName", cfg.target_name)]
        keys += self._neg.offer(["AuthMethod"])
        # With CHAP on offer the target will not leave the security stage at
        # once; without it we ask to move on right away.
        self._login_request(keys, transit=self._chap is None)

    def _local_values(self) -> dict[str, object]:
        cfg = self.config
        return {
            "AuthMethod": (("CHAP",) if cfg.mutual else ("CHAP", "None")) if cfg.chap else ("None",),
            "HeaderDigest": _digest_offer(cfg.header_digest),
            "DataDigest": _digest_offer(cfg.data_digest),
            "MaxRecvDataSegmentLength": cfg.max_recv_data_segment_length,
            "InitialR2T": cfg.initial_r2t,
            "ImmediateData": cfg.immediate_data,
            "MaxBurstLength": cfg.max_burst_length,
            "FirstBurstLength": min(cfg.first_burst_length, cfg.max_burst_length),
            "MaxOutstandingR2T": cfg.max_outstanding_r2t,
            "MaxConnections": 1,
            "ErrorRecoveryLevel": 0,
            "DefaultTime2Wait": 0,
            "DefaultTime2Retain": 0,
        }

    def _login_request(self, keys: list[tuple[str, str]], transit: bool) -> None:
        self._login_exchanges += 1
        csg = _CSG[self.state]
        nsg = Stage.OPERATIONAL if self.state is State.SECURITY else Stage.FULL_FEATURE
        self._stages.offered(Stage(csg), nsg if transit else None)
        self._send(
            LoginRequest(
                self.config.isid, 0, self._login_itt, self.config.cid, self.cmdsn,
                self.exp_statsn, csg, nsg, transit, data=encode_text(keys),
            )
        )

    def _operational_offer(self) -> list[tuple[str, str]]:
        names = ["HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength"]
        if not self.config.discovery:
            names += [
                "InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                "MaxOutstandingR2T", "MaxConnections", "ErrorRecoveryLevel",
                "DefaultTime2Wait", "DefaultTime2Retain",
            ]
        return self._neg.offer(names)

    def _login_fail(self, status: int, message: str) -> list[Event]:
        self.state = State.FREE
        self.log.info("login failed: %s", message)
        try:
            st = LoginStatus(status)
        except ValueError:
            st = LoginStatus.TARGET_ERROR if status >> 8 == 3 else LoginStatus.INITIATOR_ERROR
        return [LoginFailed(SessionLoginError(st, message))]

    def _on_login_response(self, rsp: LoginResponse, now: float) -> list[Event]:
        if rsp.itt != self._login_itt:
            return self._login_fail(LoginStatus.TARGET_ERROR, "login response with a foreign ITT")
        self.exp_statsn = (rsp.statsn + 1) & SN_MASK
        self._update_window(rsp.expcmdsn, rsp.maxcmdsn, force=True)
        try:
            pairs = decode_text(rsp.data)
        except LoginError as exc:
            return self._login_fail(LoginStatus.TARGET_ERROR, f"bad login text: {exc}")
        if rsp.status != LoginStatus.SUCCESS:
            if rsp.status >> 8 == 1:  # redirection (RFC 7143 11.13.5)
                addr = dict(pairs).get("TargetAddress")
                if not addr:
                    return self._login_fail(rsp.status, "redirection without TargetAddress")
                self.state = State.FREE
                return [LoginRedirect(addr, rsp.status == LoginStatus.TARGET_MOVED_PERMANENTLY)]
            try:
                name = LoginStatus(rsp.status).name
            except ValueError:
                name = f"0x{rsp.status:04x}"
            return self._login_fail(rsp.status, f"target refused login: {name}")
        if rsp.cont:
            return self._login_fail(LoginStatus.TARGET_ERROR, "continued login responses are not supported")
        if self._login_exchanges > _MAX_LOGIN_EXCHANGES:
            return self._login_fail(LoginStatus.TARGET_ERROR, "login does not converge")
        try:
            self._stages.response(rsp.csg, rsp.nsg, rsp.transit)
            if self.state is State.SECURITY:
                return self._security_step(rsp, pairs)
            return self._operational_step(rsp, pairs, now)
        except LoginError as exc:
            return self._login_fail(exc.status, f"login failed: {exc}")

    def _security_step(self, rsp: LoginResponse, pairs: list[tuple[str, str]]) -> list[Event]:
        replies = self._neg.receive(pairs, Stage.SECURITY)
        self._note_declared()
        method = self._neg.results.get("AuthMethod")
        chap_keys = {k: v for k, v in pairs if k.startswith("CHAP_")}
        if method == "CHAP" and self._chap is not None and not self._chap.done:
            if not self._chap_started:
                self._chap_started = True
                self._login_request(replies + self._chap.start(), transit=False)
                return []
            if chap_keys or not self._chap.answered:
                out = self._chap.step(chap_keys)
                if out or not self._chap.done:
                    # our response (and mutual challenge) goes with the wish to move on
                    self._login_request(replies + out, transit=True)
                    return []
        if self.config.mutual and not (self._chap and self._chap.done):
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE,
                             "target did not authenticate itself (mutual CHAP)")
        if self._chap is not None and method == "CHAP" and not self._chap.done:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP exchange incomplete")
        if self._stages.stage is Stage.SECURITY:
            self._login_request(replies, transit=True)
            return []
        self.state = State.OPERATIONAL
        self._login_request(replies + self._operational_offer(), transit=True)
        return []

    def _note_declared(self) -> None:
        d = self._neg.declared
        if "TargetPortalGroupTag" in d or "TargetAlias" in d:
            self.negotiated = replace(
                self.negotiated,
                target_portal_group_tag=int(d.get("TargetPortalGroupTag", "0")),
                target_alias=d.get("TargetAlias", ""),
            )

    def _operational_step(
        self, rsp: LoginResponse, pairs: list[tuple[str, str]], now: float
    ) -> list[Event]:
        replies = self._neg.receive(pairs, Stage.OPERATIONAL)
        self._note_declared()
        if self._stages.complete:
            if replies:
                raise LoginError(LoginStatus.TARGET_ERROR,
                                 "target offered keys in its final login response")
            return self._login_complete(rsp, now)
        self._login_request(replies, transit=True)
        return []

    def _login_complete(self, rsp: LoginResponse, now: float) -> list[Event]:
        params = self._neg.params()
        if params.error_recovery_level != 0:
            raise LoginError(LoginStatus.TARGET_ERROR, "only ErrorRecoveryLevel 0 is supported")
        self.negotiated = replace(self.negotiated, params=params, tsih=rsp.tsih)
        self.state = State.FULL_FEATURE
        self._digests_pending = True
        self._last_rx = now
        self.log.info(
            "logged in: tsih=%d digests=%s/%s mrdsl=%d/%d burst=%d first=%d r2t=%s imm=%s",
            rsp.tsih, params.header_digest, params.data_digest,
            params.max_recv_data_segment_length, params.max_xmit_data_segment_length,
            params.max_burst_length, params.first_burst_length, params.initial_r2t,
            params.immediate_data,
        )
        self._pump(now)
        return [LoginDone(self.negotiated)]

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | memoryview, now: float) -> list[Event]:
        """Feed bytes from the connection; returns the resulting events.

        A malformed PDU or a digest error yields ``ConnectionFailed``: the
        shell must drop the connection and call ``connection_lost``.
        """
        events: list[Event] = []
        reader = self._reader
        reader.feed(data)
        self._last_rx = now
        while self.state not in (State.FREE, State.LOGGED_OUT):
            if (
                self.state is State.FULL_FEATURE
                and not reader.header_digest
                and not reader.data_digest
            ):
                self._reads_done(events, now)
            try:
                raw = reader.next_pdu()
                if raw is None:
                    break
                events += self._dispatch(raw, now)
            except ProtocolError as exc:
                # ERL 0 has no recovery inside a connection (digest errors included).
                events.append(ConnectionFailed(f"bad PDU from target: {exc}"))
                break
            if self._digests_pending:  # the final login response: digests start now
                self._digests_pending = False
                reader.header_digest = self.params.header_digest
                reader.data_digest = self.params.data_digest
                reader.max_data_length = self.params.max_recv_data_segment_length
        return events

    def _reads_done(self, events: list[Event], now: float) -> None:
        """Complete the reads whose single Data-In with status is at the head
        of the buffer (the common answer to a read).

        The receive fast path: the BHS is parsed in place and the command
        completed without a DataIn object. It takes only what ``_on_data_in``
        would complete the same way: Data-In with F and S (no A, O, U), no
        AHS, offset 0 and exactly the command's expected data length; and the
        SCSI Response of a relayed write ending GOOD (no flags, sense or
        data), which ``_on_scsi_response`` would give its sink the same way;
        without digests. Anything else stops the run and goes through
        ``next_pdu``.
        """
        reader = self._reader
        buf, pos = reader.window()
        end = len(buf)
        active = self._active
        by_handle = self._by_handle
        limit = reader.max_data_length
        unpack = _HDR_U32.unpack_from
        waiting = self._waiting
        exp_statsn, exp_cmdsn, max_cmdsn = self.exp_statsn, self.exp_cmdsn, self.max_cmdsn
        start = pos
        while end - pos >= 48:
            op = buf[pos]
            if op == 0x25 and buf[pos + 1] & 0xC7 == 0x81:
                _, _, b23, word, _, itt, _, statsn, exp, mx, _, offset, _ = unpack(buf, pos)
                dlen = word & 0xFFFFFF
                total = 48 + dlen + (-dlen & 3)
                if word >> 24 or offset or dlen > limit or end - pos < total:
                    break
                cmd = active.get(itt)
                if cmd is None or dlen != cmd.data_in_len or not dlen or cmd.high:
                    break
            elif op == 0x21 and buf[pos + 1] == 0x80:
                # a SCSI Response without flags, data or status: a relayed
                # write's GOOD (what _on_scsi_response gives its sink)
                _, _, b23, word, _, itt, _, statsn, exp, mx, _, _, _ = unpack(buf, pos)
                cmd = active.get(itt)
                if word or b23 & 0xFFFF or cmd is None or cmd.sink is None or cmd.data_in_len:
                    break
                dlen = 0
                total = 48
            else:
                break
            # _update_window / _status_seen (RFC 7143 4.2.2.1), inline
            if ((mx - exp + 1) & SN_MASK) < _HALF:
                if exp != exp_cmdsn and ((exp - exp_cmdsn) & SN_MASK) < _HALF:
                    exp_cmdsn = exp
                if mx != max_cmdsn and ((mx - max_cmdsn) & SN_MASK) < _HALF:
                    max_cmdsn = mx
            nxt = (statsn + 1) & SN_MASK
            if nxt != exp_statsn and ((nxt - exp_statsn) & SN_MASK) < _HALF:
                exp_statsn = nxt
            at = pos + 48
            pos += total
            del active[itt]
            del by_handle[cmd.handle]
            status = b23 & 0xFF
            sink = cmd.sink
            if not dlen:  # the write above
                sink.relay_data(cmd.token, 0, bytearray())  # type: ignore[union-attr]  # checked above
                if waiting:
                    self.exp_statsn, self.exp_cmdsn, self.max_cmdsn = exp_statsn, exp_cmdsn, max_cmdsn
                    self._pump(now)
                continue
            if sink is not None:  # relayed: the slice is a copy, the sink's
                sink.relay_data(cmd.token, status, buf[at : at + dlen])
            else:
                events.append(CommandDone(cmd.handle, Result(
                    _STATUS.get(status, status), buf[at : at + dlen], b"")))  # type: ignore[arg-type]
            if waiting:  # room for a queued command: sent as _on_data_in would
                self.exp_statsn, self.exp_cmdsn, self.max_cmdsn = exp_statsn, exp_cmdsn, max_cmdsn
                self._pump(now)
        if pos != start:
            self.exp_statsn, self.exp_cmdsn, self.max_cmdsn = exp_statsn, exp_cmdsn, max_cmdsn
            reader.consumed(pos)

    def _dispatch(self, raw: RawPdu, now: float) -> list[Event]:
        op = raw.opcode
        if self.state in (State.SECURITY, State.OPERATIONAL):
            if op != Opcode.LOGIN_RESPONSE:
                raise ProtocolError(RejectReason.PROTOCOL_ERROR, f"opcode 0x{op:02x} during login")
            return self._on_login_response(LoginResponse.decode(raw), now)
        pdu = decode_pdu(raw)
        handler = _HANDLERS.get(type(pdu))
        if handler is None:
            raise ProtocolError(RejectReason.PROTOCOL_ERROR, f"unexpected opcode 0x{op:02x}")
        return handler(self, pdu, now)

    def _update_window(self, exp: int, mx: int, force: bool = False) -> None:
        # RFC 7143 4.2.2.1: ignore MaxCmdSN < ExpCmdSN - 1 and stale values.
        if not sn_le((exp - 1) & SN_MASK, mx):
            return
        if force or sn_lt(self.exp_cmdsn, exp):
            self.exp_cmdsn = exp
        if force or sn_lt(self.max_cmdsn, mx):
            self.max_cmdsn = mx

    def _status_seen(self, statsn: int) -> None:
        nxt = (statsn + 1) & SN_MASK
        if sn_lt(self.exp_statsn, nxt):
            self.exp_statsn = nxt

    def _on_scsi_response(self, rsp: ScsiResponse, now: float) -> list[Event]:
        self._status_seen(rsp.statsn)
        self._update_window(rsp.expcmdsn, rsp.maxcmdsn)
        cmd = self._active.pop(rsp.itt, None)
        if cmd is None:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"SCSI response for unknown ITT 0x{rsp.itt:x}")
        del self._by_handle[cmd.handle]
        events: list[Event]
        if rsp.response != 0:
            events = self._failed(cmd, TargetFailure(f"target failure 0x{rsp.response:02x}"))
        else:
            sense = rsp.sense if rsp.status == Status.CHECK_CONDITION else b""
            events = self._complete(cmd, rsp.status, rsp.flags, rsp.residual, bytes(sense))
        self._pump(now)
        return events

    @staticmethod
    def _failed(cmd: _Command, error: Exception) -> list[Event]:
        """``cmd`` ends with ``error``: its event, or its sink called."""
        if cmd.sink is not None:
            cmd.sink.relay_result(cmd.token, error)
            return []
        return [CommandFailed(cmd.handle, error)]

    def _complete(
        self, cmd: _Command, status: int, flags: int, residual: int, sense: bytes
    ) -> list[Event]:
        sink = cmd.sink
        if sink is not None and not status and not sense and not cmd.data_in_len and not flags & _RESIDUAL:
            sink.relay_data(cmd.token, 0, bytearray())  # a relayed write ended GOOD: no Result
            return []
        n = cmd.high
        if flags & ResponseFlags.UNDERFLOW:
            n = min(n, max(0, cmd.data_in_len - residual))
        # the reassembly buffer itself is handed over (no copy) when it is full
        buf = cmd.buf
        data: bytes | bytearray = b"" if buf is None else (buf if n == len(buf) else buf[:n])
        st = _STATUS.get(status, status)
        result = Result(st, data, sense)  # type: ignore[arg-type]
        events: list[Event] = []
        if cmd.sink is not None:
            cmd.sink.relay_result(cmd.token, result)
        else:
            events.append(CommandDone(cmd.handle, result))
        if sense and unit_attention_of(sense) is not None:
            events.append(UnitAttention(cmd.lun, decode_sense(sense)))
        return events

    def _on_data_in(self, pdu: DataIn, now: float) -> list[Event]:
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        cmd = self._active.get(pdu.itt)
        if cmd is None or not cmd.data_in_len:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"Data-In for unknown or write ITT 0x{pdu.itt:x}")
        end = pdu.offset + len(pdu.data)
        if end > cmd.data_in_len:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD,
                                f"Data-In beyond the expected length ({end} > {cmd.data_in_len})")
        if cmd.buf is None:  # at the first Data-In; it grows with the data (an
            # EDTL of gigabytes, as a guest may ask, answered with a few bytes
            # allocates a few bytes)
            cmd.buf = bytearray()
        place_segment(cmd.buf, pdu.offset, pdu.data)
        if end > cmd.high:
            cmd.high = end
        if pdu.status is None:
            return []
        if not pdu.final:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "Data-In with S but without F")
        self._status_seen(pdu.statsn)
        del self._active[pdu.itt]
        del self._by_handle[cmd.handle]
        events = self._complete(cmd, pdu.status, pdu.flags, pdu.residual, b"")
        self._pump(now)
        return events

    def _on_r2t(self, r2t: R2T, now: float) -> list[Event]:
        self._update_window(r2t.expcmdsn, r2t.maxcmdsn)
        cmd = self._active.get(r2t.itt)
        if cmd is None:
            # The command may have completed or been aborted meanwhile.
            return []
        end = r2t.offset + r2t.length
        if end > len(cmd.data_out) or r2t.length == 0:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"R2T for bytes {r2t.offset}..{end} of {len(cmd.data_out)}")
        if r2t.length > self.params.max_burst_length:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "R2T larger than MaxBurstLength")
        self._send_data_out(cmd, r2t.offset, end, r2t.ttt)
        return []

    def _send_data_out(self, cmd: _Command, start: int, end: int, ttt: int) -> None:
        step = self.params.max_xmit_data_segment_length
        datasn = 0
        off = start
        while off < end:
            n = min(step, end - off)
            self._send(
                DataOut(cmd.itt, ttt, datasn, off, cmd.data_out[off : off + n],  # type: ignore[arg-type]
                        off + n >= end, self.exp_statsn, cmd.lun)
            )
            datasn += 1
            off += n

    def _on_nop_in(self, nop: NopIn, now: float) -> list[Event]:
        self._update_window(nop.expcmdsn, nop.maxcmdsn)
        if nop.itt != RESERVED_TAG:
            self._status_seen(nop.statsn)
            req = self._other.pop(nop.itt, None)
            if req is not None and nop.itt == self._ping_itt:
                self._ping_itt = None
        if nop.ttt != RESERVED_TAG:  # the target pings us: echo (RFC 7143 11.19)
            self._send(NopOut(RESERVED_TAG, self.cmdsn, self.exp_statsn, nop.ttt, nop.lun,
                              True, nop.data))
        self._pump(now)
        return []

    def _on_tmf_response(self, rsp: TaskMgmtResponse, now: float) -> list[Event]:
        self._status_seen(rsp.statsn)
        self._update_window(rsp.expcmdsn, rsp.maxcmdsn)
        req = self._other.pop(rsp.itt, None)
        if req is None:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"TMF response for unknown ITT 0x{rsp.itt:x}")
        events: list[Event] = [TmfDone(req.handle, rsp.response)]
        if rsp.response == 0:
            # The target sends no response for the tasks it aborted: fail them here.
            for cmd in self._aborted_by(req):
                events += self._failed(cmd, TaskAborted(f"aborted by {TmfFunction(req.function).name}"))
        self._pump(now)
        return events

    def _aborted_by(self, req: _Other) -> list[_Command]:
        """The commands a successful function ended without a response: those
        sent before it (a lower CmdSN, RFC 7143 4.2.3.3 / 11.5.1); a command
        sent after the request reaches the target after it and is answered."""
        f = req.function
        before = req.cmdsn
        if f == TmfFunction.ABORT_TASK:
            victims = [c for c in self._active.values() if c.itt == req.ref_itt]
        elif f in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                   TmfFunction.LOGICAL_UNIT_RESET):
            victims = [c for c in self._active.values() if c.lun == req.lun and sn_lt(c.cmdsn, before)]
        elif f in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            victims = [c for c in self._active.values() if sn_lt(c.cmdsn, before)]
        else:
            victims = []
        for c in victims:
            del self._active[c.itt]
            del self._by_handle[c.handle]
        return victims

    def _on_text_response(self, rsp: TextResponse, now: float) -> list[Event]:
        self._status_seen(rsp.statsn)
        self._update_window(rsp.expcmdsn, rsp.maxcmdsn)
        req = self._other.get(rsp.itt)
        if req is None or req.kind != "text":
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"text response for unknown ITT 0x{rsp.itt:x}")
        req.text += rsp.data
        if not rsp.final or rsp.cont:  # more to come: ask with the target's TTT
            self._send(TextRequest(rsp.itt, self.cmdsn, self.exp_statsn, rsp.ttt, True, False,
                                   0, True, b""))
            return []
        del self._other[rsp.itt]
        try:
            pairs = decode_text(bytes(req.text))
        except LoginError as exc:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, str(exc)) from exc
        return [TextDone(req.handle, pairs)]

    def _on_logout_response(self, rsp: LogoutResponse, now: float) -> list[Event]:
        self._status_seen(rsp.statsn)
        req = self._other.pop(rsp.itt, None)
        if req is None:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "logout response for unknown ITT")
        self.state = State.LOGGED_OUT
        return [LogoutDone(req.handle, rsp.response)]

    def _on_async(self, msg: AsyncMessage, now: float) -> list[Event]:
        self._status_seen(msg.statsn)
        self._update_window(msg.expcmdsn, msg.maxcmdsn)
        sense = None
        raw = b""
        events: list[Event] = []
        if msg.event == AsyncEvent.SCSI_ASYNC_EVENT and len(msg.data) >= 2:
            n = int.from_bytes(msg.data[:2], "big")
            raw = bytes(msg.data[2 : 2 + n])
            try:
                sense = decode_sense(raw)
            except SenseDecodeError:
                sense = None
        events.append(AsyncEventReceived(msg, sense))
        if sense is not None and unit_attention_of(raw) is not None:
            events.append(UnitAttention(msg.lun, sense))
        if msg.event in (AsyncEvent.LOGOUT_REQUEST, AsyncEvent.CONNECTION_DROP,
                         AsyncEvent.SESSION_DROP):
            # At ErrorRecoveryLevel 0 the simplest correct answer is a new
            # login: drop the connection; commands without status are re-issued.
            events.append(ConnectionFailed(f"target asked to end the connection (event {msg.event})"))
        self._pump(now)
        return events

    def _on_reject(self, rej: Reject, now: float) -> list[Event]:
        self._status_seen(rej.statsn)
        self._update_window(rej.expcmdsn, rej.maxcmdsn)
        hdr = rej.data
        if len(hdr) < 48:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "Reject without the rejected header")
        itt = int.from_bytes(hdr[16:20], "big")
        op = hdr[0] & 0x3F
        events: list[Event] = []
        if op == Opcode.SCSI_COMMAND and itt in self._active:
            cmd = self._active.pop(itt)
            del self._by_handle[cmd.handle]
            events += self._failed(cmd, CommandRejected(rej.reason))
        elif op == Opcode.DATA_OUT:
            # At ERL 0 a lost Data-Out cannot be recovered on this connection.
            events.append(ConnectionFailed(f"target rejected a Data-Out (reason {rej.reason})"))
        elif itt in self._other:
            req = self._other.pop(itt)
            events.append(CommandFailed(req.handle, CommandRejected(rej.reason)))
        self._pump(now)
        return events

    # --------------------------------------------------------------- sending

    def submit(
        self,
        lun: int,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview = b"",
        data_in_len: int = 0,
        attr: TaskAttribute = TaskAttribute.SIMPLE,
        now: float = 0.0,
    ) -> int:
        """Queue a SCSI command; returns its handle (CommandDone/Failed name it)."""
        _check_lengths(cdb, data_in_len, len(data_out))
        if len(data_out) and data_in_len:
            raise ValueError("bidirectional commands are not supported")
        cmd = _Command(self._next_handle(), lun, bytes(cdb), memoryview(bytes(data_out)),
                       data_in_len, attr)
        return self._enqueue(cmd, now)

    def submit_relay(
        self, lun: int, cdb: bytes, data_in_len: int, sink: RelaySink, token: Any, now: float = 0.0,
        data_out: bytes | bytearray | memoryview = b"",
    ) -> int:
        """Queue a command that completes by calling ``sink`` instead of
        returning an event: ``sink.relay_data`` for a read answered by one
        Data-In with status (the common answer, taken in ``_reads_done``
        without a Result) and for a write (``data_out``, sent as ``submit``
        sends it: immediate, unsolicited and R2T-solicited data) answered GOOD
        without sense or residual, ``sink.relay_result`` for any other end,
        errors included. Otherwise as ``submit`` (queued, re-issued after a
        reconnect, counted in ``outstanding``). The forwarding device uses it
        to pass a guest's reads and writes through without a Result per
        command. ``data_out`` becomes the core's: ``bytes`` and a
        ``bytearray`` (handed over: the caller no longer changes it) are sent
        as they are, anything else is copied."""
        _check_lengths(cdb, data_in_len, len(data_out))
        if data_out and data_in_len:
            raise ValueError("bidirectional commands are not supported")
        self._handle = handle = self._handle + 1
        cmd = _Command(handle, lun, cdb, (
            memoryview(data_out if type(data_out) in _OWNABLE else bytes(data_out)) if data_out else _NO_DATA), data_in_len,
                       TaskAttribute.SIMPLE, sink=sink, token=token)
        return self._enqueue(cmd, now)

    def _enqueue(self, cmd: _Command, now: float) -> int:
        """Register a new command and send it now if nothing waits before it
        and the queue depth and the CmdSN window allow (what ``_pump`` would
        do with it), else queue it."""
        self._by_handle[cmd.handle] = cmd
        if (
            not self._waiting
            and self.state is State.FULL_FEATURE
            and not self.gated
            and len(self._active) < self.config.queue_depth
            and ((self.max_cmdsn - self.cmdsn) & SN_MASK) < _HALF  # sn_le(cmdsn, max_cmdsn)
        ):
            self._issue(cmd, now)
        else:
            if self.state is not State.FULL_FEATURE or self.gated:
                cmd.held_since = now
            self._waiting.append(cmd)
            self._pump(now)
        return cmd.handle

    def _pump(self, now: float) -> None:
        if self.state is not State.FULL_FEATURE or self.gated:
            return
        while (
            self._waiting
            and len(self._active) < self.config.queue_depth
            and sn_le(self.cmdsn, self.max_cmdsn)
        ):
            self._issue(self._waiting.popleft(), now)

    def _issue(self, cmd: _Command, now: float) -> None:
        p = self.negotiated.params
        self._itt = itt = (self._itt + 1) & 0x7FFFFFFF or 1  # _next_itt
        cmd.itt = itt
        cmd.cmdsn = cmdsn = self.cmdsn
        self.cmdsn = (cmdsn + 1) & SN_MASK
        cmd.sent_at = now
        cmd.held_since = None
        cmd.high = 0
        cmd.buf = None  # the reassembly buffer, allocated at the first Data-In
        total = len(cmd.data_out)
        if not total and not p.header_digest:
            # no data out: the BHS is the whole PDU (ScsiCommand.encode's bytes)
            self._active[itt] = cmd
            lun = cmd.lun
            self._out.append(SCSI_COMMAND.pack(
                0x01, (0xC0 if cmd.data_in_len else 0x80) | (cmd.attr & 7), 0, 0,
                lun << 48 if lun < 256 else encode_lun(lun), itt, cmd.data_in_len, cmdsn, self.exp_statsn,
                cmd.cdb.ljust(16, b"\0"),
            ))
            return
        if (
            p.immediate_data and total <= p.first_burst_length and total <= p.max_xmit_data_segment_length
            and not p.header_digest and not p.data_digest
        ):
            # all the data as immediate data (the common write): F set, no
            # Data-Out follows; the bytes of the general case below
            self._active[itt] = cmd
            lun = cmd.lun
            out = self._out
            out.append(SCSI_COMMAND.pack(
                0x01, 0xA0 | (cmd.attr & 7), 0, total, lun << 48 if lun < 256 else encode_lun(lun), itt, total,
                cmdsn, self.exp_statsn, cmd.cdb.ljust(16, b"\0"),
            ))
            out.append(cmd.data_out)  # type: ignore[arg-type]  # joined by data_to_send
            if total & 3:
                out.append(bytes(-total & 3))
            return
        immediate = min(total, p.first_burst_length, p.max_xmit_data_segment_length) if p.immediate_data else 0
        unsolicited_end = min(total, p.first_burst_length) if not p.initial_r2t else immediate
        more = unsolicited_end > immediate
        self._active[cmd.itt] = cmd
        # what ScsiCommand(...).encode() gives, packed here (RFC 7143 11.3)
        b1 = (0 if more else 0x80) | (0x40 if cmd.data_in_len else 0) | (0x20 if total else 0) | (cmd.attr & 7)
        bhs = SCSI_COMMAND.pack(
            Opcode.SCSI_COMMAND, b1, 0, immediate, encode_lun(cmd.lun), cmd.itt,
            total if total else cmd.data_in_len, cmd.cmdsn, self.exp_statsn, cmd.cdb.ljust(16, b"\0"),
        )
        out = self._out
        if immediate or p.header_digest:
            frame_into(out, bhs, cmd.data_out[:immediate], p.header_digest, p.data_digest)  # joined once
        else:
            out.append(bhs)
        if more:
            self._send_data_out(cmd, immediate, unsolicited_end, RESERVED_TAG)

    def _immediate_request(
        self, kind: str, now: float, lun: int = 0, function: int = 0, ref_itt: int = RESERVED_TAG
    ) -> tuple[int, int]:
        if self.state is not State.FULL_FEATURE:
            raise ConnectionLost("not logged in")
        itt = self._next_itt()
        handle = self._next_handle()
        self._other[itt] = _Other(kind, handle, now, lun, function, ref_itt, cmdsn=self.cmdsn)
        return itt, handle

    def task_management(
        self, function: TmfFunction, lun: int = 0, ref_handle: int | None = None, now: float = 0.0
    ) -> int:
        """Send a task management request; returns its handle (TmfDone).
        For ABORT TASK, ``ref_handle`` names the command (queued commands
        are dropped locally: the target never saw them)."""
        ref_itt, ref_cmdsn = RESERVED_TAG, self.cmdsn
        if function == TmfFunction.ABORT_TASK:
            cmd = self._by_handle.get(ref_handle) if ref_handle is not None else None
            if cmd is None:
                raise KeyError("no such command")
            lun = cmd.lun
            if cmd.itt not in self._active:
                raise KeyError("command not sent yet: use cancel_queued")
            ref_itt, ref_cmdsn = cmd.itt, cmd.cmdsn
        itt, handle = self._immediate_request("tmf", now, lun=lun, function=int(function),
                                              ref_itt=ref_itt)
        self._send(TaskMgmtRequest(itt, int(function), self.cmdsn, self.exp_statsn, lun,
                                   ref_itt, ref_cmdsn, 0, True))
        return handle

    def cancel_queued(self, handle: int) -> bool:
        """Forget a command that is still queued (not sent); False if it is
        on the wire or unknown."""
        cmd = self._by_handle.get(handle)
        if cmd is None or cmd.itt in self._active:
            return False
        self._waiting.remove(cmd)
        del self._by_handle[handle]
        return True

    def send_targets(self, what: str = "All", now: float = 0.0) -> int:
        itt, handle = self._immediate_request("text", now)
        self._send(TextRequest(itt, self.cmdsn, self.exp_statsn, RESERVED_TAG, True, False, 0,
                               True, encode_text([("SendTargets", what)])))
        return handle

    def logout(self, now: float = 0.0) -> int:
        itt, handle = self._immediate_request("logout", now)
        self._send(LogoutRequest(itt, LogoutReason.CLOSE_SESSION, self.cmdsn, self.exp_statsn,
                                 self.config.cid, True))
        return handle

    def ping(self, now: float) -> int:
        itt, handle = self._immediate_request("nop", now)
        self._ping_itt = itt
        self._send(NopOut(itt, self.cmdsn, self.exp_statsn, RESERVED_TAG, 0, True, b""))
        return handle

    # ------------------------------------------------------------- timers

    def handle_timer(self, now: float) -> list[Event]:
        """Keepalive and command timeouts; call about once a second."""
        if self.state is not State.FULL_FEATURE:
            return []
        cfg = self.config
        if self._ping_itt is not None:
            req = self._other.get(self._ping_itt)
            if req is not None and now - req.sent_at > cfg.nop_timeout:
                return [ConnectionFailed("NOP-Out ping unanswered")]
        elif now - self._last_rx > cfg.nop_interval:
            self.ping(now)
        for cmd in self._active.values():
            if now - cmd.sent_at > cfg.command_timeout:
                return [ConnectionFailed(f"command 0x{cmd.cdb[0]:02x} timed out")]
        for req in self._other.values():
            if req.kind != "nop" and now - req.sent_at > cfg.command_timeout:
                return [ConnectionFailed(f"{req.kind} request timed out")]
        return []

    # ----------------------------------------------------- connection loss

    def connection_lost(self, retry: bool = True, now: float | None = None) -> list[Event]:
        """The TCP connection is gone. Commands without status go back to
        the queue (or fail when ``retry`` is false or their retries are used
        up); other requests fail. ``now``: from then on the queued commands
        count as held (``expire_held``)."""
        was = self.state
        self.state = State.FREE
        self._out.clear()
        self._ping_itt = None
        events: list[Event] = []
        for req in self._other.values():
            if req.kind != "nop":
                events.append(CommandFailed(req.handle, ConnectionLost("connection lost")))
        self._other.clear()
        resend = sorted(self._active.values(), key=lambda c: c.handle)
        self._active.clear()
        for cmd in reversed(resend):
            cmd.retries += 1
            cmd.itt = RESERVED_TAG
            if retry and cmd.retries <= self.config.max_retries:
                self._waiting.appendleft(cmd)
            else:
                del self._by_handle[cmd.handle]
                events += self._failed(cmd, ConnectionLost(f"connection lost (after {cmd.retries} attempts)"))
        if not retry:
            events += self.fail_all(ConnectionLost("connection lost"))
        elif now is not None:
            for cmd in self._waiting:
                if cmd.held_since is None:
                    cmd.held_since = now
        if was is State.FULL_FEATURE and not retry:
            self.log.info("connection lost")
        return events

    # ------------------------------------------------------- held commands

    def gate(self) -> None:
        """Keep queued and new commands from being sent, even once logged in,
        until ``release_gate``: the caller checks something first (the
        forwarding device verifies its PR state after a re-login)."""
        self.gated = True

    def release_gate(self, now: float) -> None:
        self.gated = False
        self._pump(now)

    def expire_held(self, now: float) -> list[Event]:
        """Commands queued while the session is down (or gated) for
        ``hold_timeout`` or longer complete with BUSY status, no sense: the
        status SAM-5 5.3.1 gives a device server that cannot accept a
        command for now, which the initiators retry (Linux: ADD_TO_MLQUEUE
        until its overall command deadline; QEMU's iSCSI driver: seven
        retries with growing delays) rather than fail. Returns their events."""
        hold = self.config.hold_timeout
        if hold is None or (self.state is State.FULL_FEATURE and not self.gated):
            return []
        events: list[Event] = []
        keep: deque[_Command] = deque()
        for cmd in self._waiting:
            if cmd.held_since is not None and now - cmd.held_since >= hold:
                del self._by_handle[cmd.handle]
                result = Result(Status.BUSY, b"", b"")
                if cmd.sink is not None:
                    cmd.sink.relay_result(cmd.token, result)
                else:
                    events.append(CommandDone(cmd.handle, result))
            else:
                keep.append(cmd)
        self._waiting = keep
        return events

    @property
    def held(self) -> int:
        """Commands queued and not sendable now (session down or gated)."""
        if self.state is State.FULL_FEATURE and not self.gated:
            return 0
        return len(self._waiting)

    def fail_all(self, error: Exception) -> list[Event]:
        events: list[Event] = []
        waiting, active = list(self._waiting), list(self._active.values())
        self._waiting.clear()
        self._active.clear()
        for c in waiting + active:
            self._by_handle.pop(c.handle, None)
            events += self._failed(c, error)
        for req in self._other.values():
            events.append(CommandFailed(req.handle, error))
        self._other.clear()
        return events


_HANDLERS: dict[type, Callable[[InitiatorCore, object, float], list[Event]]] = {
    ScsiResponse: InitiatorCore._on_scsi_response,  # type: ignore[dict-item]
    DataIn: InitiatorCore._on_data_in,  # type: ignore[dict-item]
    R2T: InitiatorCore._on_r2t,  # type: ignore[dict-item]
    NopIn: InitiatorCore._on_nop_in,  # type: ignore[dict-item]
    TaskMgmtResponse: InitiatorCore._on_tmf_response,  # type: ignore[dict-item]
    TextResponse: InitiatorCore._on_text_response,  # type: ignore[dict-item]
    LogoutResponse: InitiatorCore._on_logout_response,  # type: ignore[dict-item]
    AsyncMessage: InitiatorCore._on_async,  # type: ignore[dict-item]
    Reject: InitiatorCore._on_reject,  # type: ignore[dict-item]
}
