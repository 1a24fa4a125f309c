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

import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ..lun.types import Result
from ..scsi.constants import SenseKey, Status
from ..scsi.sense import DecodedSense, SenseDecodeError, decode_sense
from .pdu import (
    R2T,
    RESERVED_TAG,
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
    ScsiCommand,
    ScsiResponse,
    TaskAttribute,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    TmfFunction,
    decode_pdu,
)

log = logging.getLogger(__name__)

SN_MASK = 0xFFFFFFFF
_HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b on 32 bits (RFC 1982, RFC 7143 4.2.2.1)."""
    return a != b and ((b - a) & SN_MASK) < _HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


# --------------------------------------------------------------------- errors


class IscsiError(Exception):
    """Base of the initiator's errors."""


class LoginError(IscsiError):
    """Login failed; ``status`` is Status-Class << 8 | Status-Detail, or -1
    for a failure found on our side (negotiation, authentication)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


class Rule(Enum):
    """How a negotiated key's result is found (RFC 7143 6.2, 13)."""

    OR = "or"  # boolean, Yes if either side says Yes
    AND = "and"  # boolean, Yes only if both say Yes
    MIN = "min"  # numerical minimum
    MAX = "max"  # numerical maximum
    LIST = "list"  # responder picks the first of the originator's list it supports
    DECLARE = "declare"  # each side declares its own value


# key -> (rule, default). RFC 7143 13.1-13.24.
KEYS: dict[str, tuple[Rule, str]] = {
    "HeaderDigest": (Rule.LIST, "None"),  # 13.1
    "DataDigest": (Rule.LIST, "None"),  # 13.1
    "MaxConnections": (Rule.MIN, "1"),  # 13.2
    "InitialR2T": (Rule.OR, "Yes"),  # 13.10
    "ImmediateData": (Rule.AND, "Yes"),  # 13.11
    "MaxRecvDataSegmentLength": (Rule.DECLARE, "8192"),  # 13.12
    "MaxBurstLength": (Rule.MIN, "262144"),  # 13.13
    "FirstBurstLength": (Rule.MIN, "65536"),  # 13.14
    "DefaultTime2Wait": (Rule.MAX, "2"),  # 13.15
    "DefaultTime2Retain": (Rule.MIN, "20"),  # 13.16
    "MaxOutstandingR2T": (Rule.MIN, "1"),  # 13.17
    "DataPDUInOrder": (Rule.OR, "Yes"),  # 13.18
    "DataSequenceInOrder": (Rule.OR, "Yes"),  # 13.19
    "ErrorRecoveryLevel": (Rule.MIN, "0"),  # 13.20
}
_NOT_VALUES = ("Reject", "Irrelevant", "NotUnderstood")


def negotiate(rule: Rule, ours: str, theirs: str) -> str:
    """Result of one key given our offer and the target's answer or offer."""
    if rule is Rule.OR:
        return "Yes" if "Yes" in (ours, theirs) else "No"
    if rule is Rule.AND:
        return "Yes" if ours == theirs == "Yes" else "No"
    if rule in (Rule.MIN, Rule.MAX):
        a, b = int(ours), int(theirs)
        return str(min(a, b) if rule is Rule.MIN else max(a, b))
    if rule is Rule.LIST:
        mine = ours.split(",")
        for v in theirs.split(","):
            if v in mine:
                return v
        raise ValueError(f"no common value in {ours!r} / {theirs!r}")
    return theirs


def decode_text(data: bytes) -> list[tuple[str, str]]:
    """``key=value\\0`` pairs of a login/text data segment (RFC 7143 6.1)."""
    out = []
    for item in data.split(b"\0"):
        if not item:
            continue
        k, sep, v = item.decode("utf-8", "replace").partition("=")
        if not sep:
            raise ValueError(f"text item without '=': {k!r}")
        out.append((k, v))
    return out


def encode_text(pairs: list[tuple[str, str]] | dict[str, str]) -> bytes:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in items)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Operational parameters in force after login."""

    header_digest: bool = False
    data_digest: bool = False
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst: int = 262144
    first_burst: int = 65536
    target_mrdsl: int = 8192  # what we may send in one PDU
    our_mrdsl: int = 8192  # what the target may send us
    max_outstanding_r2t: int = 1
    error_recovery_level: int = 0
    tsih: int = 0
    target_portal_group_tag: int = 0
    target_alias: str = ""


def _chap_value(text: str) -> bytes:
    """CHAP binary values: 0x hex or 0b base64 (RFC 7143 6.1)."""
    import base64

    if text[:2].lower() == "0x":
        h = text[2:]
        return bytes.fromhex(h if len(h) % 2 == 0 else "0" + h)
    if text[:2].lower() == "0b":
        return base64.b64decode(text[2:])
    raise ValueError(f"bad CHAP binary value {text!r}")


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP MD5 response: MD5(identifier || secret || challenge) (RFC 1994)."""
    return hashlib.md5(bytes((ident & 0xFF,)) + secret + challenge).digest()


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
    first_burst_length: int = 65536
    max_outstanding_r2t: int = 1
    queue_depth: int = 64
    max_retries: int = 3
    command_timeout: float = 30.0
    nop_interval: float = 5.0  # seconds of silence before a NOP-Out ping
    nop_timeout: float = 10.0  # a ping unanswered this long drops the connection
    cid: int = 0

    @property
    def discovery(self) -> bool:
        return not self.target_name


def _digest_offer(v: bool | str) -> str:
    if isinstance(v, str):
        return v
    return "CRC32C" if v else "None"


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class LoginDone:
    params: Negotiated


@dataclass(frozen=True, slots=True)
class LoginRedirect:
    address: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class LoginFailed:
    error: LoginError


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


class State(Enum):
    FREE = "free"  # no connection
    SECURITY = "security"  # login, CSG 0
    OPERATIONAL = "operational"  # login, CSG 1
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"


# Login stages on the wire (RFC 7143 11.12.3).
_CSG = {State.SECURITY: 0, State.OPERATIONAL: 1}
_FFP = 3
_MAX_LOGIN_EXCHANGES = 16


class InitiatorCore:
    """One iSCSI session, one connection at a time, no I/O."""

    def __init__(
        self,
        config: SessionConfig,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self._random = random_bytes
        self.state = State.FREE
        self.params = Negotiated()
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
        # login
        self._login_itt = 0
        self._login_exchanges = 0
        self._offered: dict[str, str] = {}
        self._agreed: dict[str, str] = {}
        self._replies: list[tuple[str, str]] = []
        self._chap_step = ""
        self._chap_mutual_id = 0
        self._chap_mutual_challenge = b""
        self._digests_pending = False

    # ---------------------------------------------------------------- plumbing

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
        same ISID)."""
        self.state = State.SECURITY
        self.params = Negotiated()
        self._reader = PduReader(max_data_length=8192)
        self._out.clear()
        self.exp_statsn = 0
        self._login_itt = self._next_itt()
        self._login_exchanges = 0
        self._offered = {}
        self._agreed = {}
        self._replies = []
        self._chap_step = ""
        self._last_rx = now
        self._ping_itt = None
        cfg = self.config
        keys = [("InitiatorName", cfg.initiator_name)]
        if cfg.discovery:
            keys.append(("SessionType", "Discovery"))
        else:
            keys += [("SessionType", "Normal"), ("TargetName", cfg.target_name)]
        if cfg.chap:
            keys.append(("AuthMethod", "CHAP" if cfg.mutual else "CHAP,None"))
            self._chap_step = "method"
            self._login_request(keys, transit=False)
        else:
            keys.append(("AuthMethod", "None"))
            self._login_request(keys, transit=True)

    def _login_request(self, keys: list[tuple[str, str]], transit: bool) -> None:
        self._login_exchanges += 1
        csg = _CSG[self.state]
        nsg = 1 if self.state is State.SECURITY else _FFP
        self._send(
            LoginRequest(
                self.config.isid, 0, self._login_itt, self.config.cid, self.cmdsn,
                self.exp_statsn, csg, nsg, transit, data=encode_text(keys),
            )
        )

    def _operational_offer(self) -> list[tuple[str, str]]:
        cfg = self.config
        offer = [
            ("HeaderDigest", _digest_offer(cfg.header_digest)),
            ("DataDigest", _digest_offer(cfg.data_digest)),
            ("MaxRecvDataSegmentLength", str(cfg.max_recv_data_segment_length)),
        ]
        if not cfg.discovery:
            offer += [
                ("InitialR2T", "Yes" if cfg.initial_r2t else "No"),
                ("ImmediateData", "Yes" if cfg.immediate_data else "No"),
                ("MaxBurstLength", str(cfg.max_burst_length)),
                ("FirstBurstLength", str(cfg.first_burst_length)),
                ("MaxOutstandingR2T", str(cfg.max_outstanding_r2t)),
                ("MaxConnections", "1"),
                ("ErrorRecoveryLevel", "0"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
            ]
        for k, v in offer:
            if k != "MaxRecvDataSegmentLength":
                self._offered[k] = v
        return offer

    def _login_fail(self, status: int, message: str) -> list[Event]:
        self.state = State.FREE
        log.info("login to %s failed: %s", self.config.target_name or "discovery", message)
        return [LoginFailed(LoginError(status, message))]

    def _on_login_response(self, rsp: LoginResponse, now: float) -> list[Event]:
        if rsp.itt != self._login_itt:
            return self._login_fail(-1, "login response with a foreign ITT")
        self.exp_statsn = (rsp.statsn + 1) & SN_MASK
        self._update_window(rsp.expcmdsn, rsp.maxcmdsn, force=True)
        try:
            pairs = decode_text(rsp.data)
        except ValueError as exc:
            return self._login_fail(-1, f"bad login text: {exc}")
        if rsp.status != LoginStatus.SUCCESS:
            if rsp.status >> 8 == 1:
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
            return self._login_fail(-1, "continued login responses are not supported")
        if self._login_exchanges > _MAX_LOGIN_EXCHANGES:
            return self._login_fail(-1, "login does not converge")
        try:
            if self.state is State.SECURITY:
                return self._security_step(rsp, pairs)
            return self._operational_step(rsp, pairs, now)
        except (ValueError, KeyError) as exc:
            return self._login_fail(-1, f"negotiation failed: {exc}")

    def _security_step(self, rsp: LoginResponse, pairs: list[tuple[str, str]]) -> list[Event]:
        cfg = self.config
        got = dict(pairs)
        if rsp.csg != 0:
            raise ValueError("login response in an unexpected stage")
        method = got.get("AuthMethod")
        if method is not None:
            if method == "CHAP":
                if not cfg.chap:
                    raise ValueError("target chose CHAP but no CHAP credentials were given")
                self._chap_step = "algorithm"
                self._login_request([("CHAP_A", "5")], transit=False)
                return []
            if method == "None":
                if cfg.mutual:
                    raise ValueError("target refused CHAP but mutual authentication was required")
                self._chap_step = ""
            else:
                raise ValueError(f"unexpected AuthMethod {method!r}")
        if "CHAP_C" in got:
            if self._chap_step != "algorithm":
                raise ValueError("unexpected CHAP challenge")
            if got.get("CHAP_A") != "5":
                raise ValueError(f"unsupported CHAP algorithm {got.get('CHAP_A')!r}")
            assert cfg.chap is not None
            user, secret = cfg.chap
            ident = int(got["CHAP_I"], 0)
            resp = chap_response(ident, secret.encode(), _chap_value(got["CHAP_C"]))
            keys = [("CHAP_N", user), ("CHAP_R", "0x" + resp.hex())]
            if cfg.mutual:
                self._chap_mutual_id = self._random(1)[0]
                self._chap_mutual_challenge = self._random(16)
                keys += [("CHAP_I", str(self._chap_mutual_id)),
                         ("CHAP_C", "0x" + self._chap_mutual_challenge.hex())]
            self._chap_step = "response"
            self._login_request(keys, transit=True)
            return []
        if self._chap_step == "response" and cfg.mutual:
            if "CHAP_R" not in got:
                raise ValueError("target did not answer the mutual CHAP challenge")
            want = chap_response(self._chap_mutual_id, cfg.mutual[1].encode(),
                                 self._chap_mutual_challenge)
            if _chap_value(got["CHAP_R"]) != want:
                raise ValueError("target failed mutual CHAP authentication")
            if got.get("CHAP_N", cfg.mutual[0]) != cfg.mutual[0]:
                raise ValueError(f"target authenticated as {got.get('CHAP_N')!r}")
            self._chap_step = "done"
        if self._chap_step in ("method", "algorithm"):
            raise ValueError("target left the security stage without authenticating")
        for k in ("TargetPortalGroupTag", "TargetAlias"):
            if k in got:
                self._agreed[k] = got[k]
        if rsp.transit:
            if rsp.nsg == _FFP:
                raise ValueError("target skipped the operational stage")
            self.state = State.OPERATIONAL
            self._login_request(self._operational_offer(), transit=True)
        else:
            self._login_request([], transit=True)
        return []

    def _operational_step(
        self, rsp: LoginResponse, pairs: list[tuple[str, str]], now: float
    ) -> list[Event]:
        replies: list[tuple[str, str]] = []
        for k, v in pairs:
            if k in ("TargetPortalGroupTag", "TargetAlias", "TargetAddress"):
                self._agreed[k] = v
                continue
            if k == "MaxRecvDataSegmentLength":
                self._agreed["TargetMRDSL"] = v
                continue
            rule_default = KEYS.get(k)
            if rule_default is None:
                if k in self._offered or k.startswith("X-") or k.startswith("X#"):
                    continue
                replies.append((k, "NotUnderstood"))
                continue
            rule, default = rule_default
            if k in self._offered:  # an answer to our offer
                if v in _NOT_VALUES:
                    self._agreed[k] = default
                elif rule is Rule.LIST:
                    if v not in self._offered[k].split(","):
                        raise ValueError(f"{k}={v} was not offered")
                    self._agreed[k] = v
                else:
                    self._agreed[k] = negotiate(rule, self._offered[k], v)
            else:  # the target offers: answer with the result
                ours = self._our_value(k, default)
                res = negotiate(rule, ours, v)
                self._agreed[k] = res
                replies.append((k, res))
        if rsp.transit and rsp.nsg == _FFP:
            if replies:
                raise ValueError("target offered keys in its final login response")
            return self._login_complete(rsp, now)
        self._login_request(replies, transit=True)
        return []

    def _our_value(self, key: str, default: str) -> str:
        for k, v in self._operational_offer():
            if k == key:
                return v
        return default

    def _login_complete(self, rsp: LoginResponse, now: float) -> list[Event]:
        a = self._agreed
        cfg = self.config

        def yes(key: str) -> bool:
            return a.get(key, KEYS[key][1]) == "Yes"

        def num(key: str) -> int:
            return int(a.get(key, KEYS[key][1]))

        self.params = Negotiated(
            header_digest=a.get("HeaderDigest", "None") == "CRC32C",
            data_digest=a.get("DataDigest", "None") == "CRC32C",
            initial_r2t=yes("InitialR2T"),
            immediate_data=yes("ImmediateData"),
            max_burst=num("MaxBurstLength"),
            first_burst=min(num("FirstBurstLength"), num("MaxBurstLength")),
            target_mrdsl=int(a.get("TargetMRDSL", "8192")),
            our_mrdsl=cfg.max_recv_data_segment_length,
            max_outstanding_r2t=num("MaxOutstandingR2T"),
            error_recovery_level=num("ErrorRecoveryLevel"),
            tsih=rsp.tsih,
            target_portal_group_tag=int(a.get("TargetPortalGroupTag", "0")),
            target_alias=a.get("TargetAlias", ""),
        )
        if self.params.target_mrdsl < 512:
            raise ValueError("target MaxRecvDataSegmentLength below 512")
        self.state = State.FULL_FEATURE
        self._digests_pending = True
        self._last_rx = now
        log.info(
            "logged in to %s isid=0x%012x tsih=%d digests=%s/%s",
            cfg.target_name or "discovery", cfg.isid, rsp.tsih,
            self.params.header_digest, self.params.data_digest,
        )
        self._pump(now)
        return [LoginDone(self.params)]

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the connection; returns the resulting events.

        A malformed PDU or a digest error yields ``ConnectionFailed``: the
        shell must drop the connection and call ``connection_lost``.
        """
        events: list[Event] = []
        reader = self._reader
        reader.feed(data)
        self._last_rx = now
        while self.state not in (State.FREE, State.LOGGED_OUT):
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
                reader.max_data_length = self.params.our_mrdsl
        return events

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
            events = [CommandFailed(cmd.handle, TargetFailure(f"target failure 0x{rsp.response:02x}"))]
        else:
            sense = rsp.sense if rsp.status == Status.CHECK_CONDITION else b""
            events = self._complete(cmd, rsp.status, rsp.flags, rsp.residual, bytes(sense))
        self._pump(now)
        return events

    def _complete(
        self, cmd: _Command, status: int, flags: int, residual: int, sense: bytes
    ) -> list[Event]:
        n = cmd.high
        if flags & ResponseFlags.UNDERFLOW:
            n = min(n, max(0, cmd.data_in_len - residual))
        data = b"" if cmd.buf is None else bytes(memoryview(cmd.buf)[:n])
        try:
            st: Status | int = Status(status)
        except ValueError:
            st = status
        events: list[Event] = [CommandDone(cmd.handle, Result(st, data, sense))]
        if sense:
            try:
                ds = decode_sense(sense)
            except SenseDecodeError:
                ds = None
            if ds is not None and ds.key == SenseKey.UNIT_ATTENTION:
                events.append(UnitAttention(cmd.lun, ds))
        return events

    def _on_data_in(self, pdu: DataIn, now: float) -> list[Event]:
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        cmd = self._active.get(pdu.itt)
        if cmd is None or cmd.buf is None:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"Data-In for unknown or write ITT 0x{pdu.itt:x}")
        end = pdu.offset + len(pdu.data)
        if end > len(cmd.buf):
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"Data-In beyond the expected length ({end} > {len(cmd.buf)})")
        cmd.buf[pdu.offset : end] = pdu.data
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
        if r2t.length > self.params.max_burst:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "R2T larger than MaxBurstLength")
        self._send_data_out(cmd, r2t.offset, end, r2t.ttt)
        return []

    def _send_data_out(self, cmd: _Command, start: int, end: int, ttt: int) -> None:
        step = self.params.target_mrdsl
        datasn = 0
        off = start
        while off < end:
            n = min(step, end - off)
            self._send(
                DataOut(cmd.itt, ttt, datasn, off, cmd.data_out[off : off + n],
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
                events.append(CommandFailed(cmd.handle, TaskAborted(
                    f"aborted by {TmfFunction(req.function).name}")))
        self._pump(now)
        return events

    def _aborted_by(self, req: _Other) -> list[_Command]:
        f = req.function
        if f == TmfFunction.ABORT_TASK:
            victims = [c for c in self._active.values() if c.itt == req.ref_itt]
        elif f in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                   TmfFunction.LOGICAL_UNIT_RESET):
            victims = [c for c in self._active.values() if c.lun == req.lun]
        elif f in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            victims = list(self._active.values())
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
        except ValueError as exc:
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
        events: list[Event] = []
        if msg.event == AsyncEvent.SCSI_ASYNC_EVENT and len(msg.data) >= 2:
            n = int.from_bytes(msg.data[:2], "big")
            try:
                sense = decode_sense(msg.data[2 : 2 + n])
            except SenseDecodeError:
                sense = None
        events.append(AsyncEventReceived(msg, sense))
        if sense is not None and sense.key == SenseKey.UNIT_ATTENTION:
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
            events.append(CommandFailed(cmd.handle, CommandRejected(rej.reason)))
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
        if len(cdb) > 16:
            raise ValueError("CDBs longer than 16 bytes are not supported")
        if len(data_out) and data_in_len:
            raise ValueError("bidirectional commands are not supported")
        cmd = _Command(self._next_handle(), lun, bytes(cdb), memoryview(bytes(data_out)),
                       data_in_len, attr)
        self._by_handle[cmd.handle] = cmd
        self._waiting.append(cmd)
        self._pump(now)
        return cmd.handle

    def _pump(self, now: float) -> None:
        if self.state is not State.FULL_FEATURE:
            return
        while (
            self._waiting
            and len(self._active) < self.config.queue_depth
            and sn_le(self.cmdsn, self.max_cmdsn)
        ):
            self._issue(self._waiting.popleft(), now)

    def _issue(self, cmd: _Command, now: float) -> None:
        p = self.params
        cmd.itt = self._next_itt()
        cmd.cmdsn = self.cmdsn
        self.cmdsn = (self.cmdsn + 1) & SN_MASK
        cmd.sent_at = now
        cmd.high = 0
        cmd.buf = bytearray(cmd.data_in_len) if cmd.data_in_len else None
        total = len(cmd.data_out)
        immediate = min(total, p.first_burst, p.target_mrdsl) if p.immediate_data else 0
        unsolicited_end = min(total, p.first_burst) if not p.initial_r2t else immediate
        more = unsolicited_end > immediate
        self._active[cmd.itt] = cmd
        self._send(
            ScsiCommand(
                cmd.itt, cmd.lun, cmd.cdb, cmd.cmdsn, self.exp_statsn,
                total if total else cmd.data_in_len, cmd.data_in_len > 0, total > 0,
                not more, cmd.attr, False, bytes(cmd.data_out[:immediate]),
            )
        )
        if more:
            self._send_data_out(cmd, immediate, unsolicited_end, RESERVED_TAG)

    def _immediate_request(self, kind: str, now: float, **kw: int) -> tuple[int, int]:
        if self.state is not State.FULL_FEATURE:
            raise ConnectionLost("not logged in")
        itt = self._next_itt()
        handle = self._next_handle()
        self._other[itt] = _Other(kind, handle, now, **kw)
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

    def connection_lost(self, retry: bool = True) -> list[Event]:
        """The TCP connection is gone. Commands without status go back to
        the queue (or fail when ``retry`` is false or their retries are used
        up); other requests fail."""
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
                events.append(CommandFailed(cmd.handle, ConnectionLost(
                    f"connection lost (after {cmd.retries} attempts)")))
        if not retry:
            events += self.fail_all(ConnectionLost("connection lost"))
        if was is State.FULL_FEATURE:
            log.info("connection lost; %d commands to re-issue", len(self._waiting))
        return events

    def fail_all(self, error: Exception) -> list[Event]:
        events: list[Event] = [CommandFailed(c.handle, error) for c in self._waiting]
        for c in self._waiting:
            self._by_handle.pop(c.handle, None)
        self._waiting.clear()
        for c in self._active.values():
            events.append(CommandFailed(c.handle, error))
            self._by_handle.pop(c.handle, None)
        self._active.clear()
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
