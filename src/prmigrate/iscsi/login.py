"""iSCSI login: text keys, negotiation and login stages, sans-IO (RFC 7143 6, 13).

Three parts, usable by the target and the initiator alike:

* the text codec: ``key=value`` pairs, NUL terminated (RFC 7143 6.1),
  :func:`encode_text` / :func:`decode_text`, and :class:`TextAccumulator`
  for text split over PDUs with the C (continue) bit;
* ONE table of negotiation keys, :data:`KEYS` (RFC 7143 13), and the
  :class:`Negotiation` that applies it: the same object answers the other
  side's offers (``receive``) and tracks answers to its own (``offer``);
* :class:`LoginStages`, the CSG/NSG/T stage machine (RFC 7143 6.3, 11.12.3).

Every failure raises :class:`LoginError` carrying the login status
class/detail to send (or that was received).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum
from typing import Any

from .pdu import LoginStatus

MAX_KEY_NAME = 63  # RFC 7143 6.1
MAX_VALUE = 255  # simple values; binary (CHAP) values up to 8192 bytes
MAX_LONG_VALUE = 8192 * 2 + 2
MAX_TEXT = 64 * 1024  # accumulated text across C-bit PDUs (RFC 7143 6.1: >= 8192)


class LoginError(Exception):
    """Login fails with ``status`` (RFC 7143 11.13.5)."""

    def __init__(self, status: LoginStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Stage(IntEnum):
    """CSG / NSG values, RFC 7143 11.12.3."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class Role(Enum):
    INITIATOR = "initiator"
    TARGET = "target"


class Kind(Enum):
    """How a key's result is computed, RFC 7143 6.2."""

    DECLARATIVE = "declarative"
    AND = "boolean-and"
    OR = "boolean-or"
    MIN = "numerical-min"
    MAX = "numerical-max"
    LIST = "list"


class Phase(Enum):
    """Where a key may appear."""

    SECURITY = "security"  # security negotiation stage only (AuthMethod, CHAP_*)
    OPERATIONAL = "operational"  # login, either stage (operational parameters)
    DECLARATION = "declaration"  # names and addresses, any login stage
    FULL_FEATURE = "full-feature"  # text requests only (SendTargets)


class Sender(Enum):
    INITIATOR = "initiator"
    TARGET = "target"
    BOTH = "both"


class Special(StrEnum):
    """Reserved answer values, RFC 7143 6.2."""

    NOT_UNDERSTOOD = "NotUnderstood"
    IRRELEVANT = "Irrelevant"
    REJECT = "Reject"


YES, NO = "Yes", "No"
_BOOL = {YES: True, NO: False}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One row of the key table."""

    name: str
    phase: Phase
    kind: Kind
    default: object  # bool, int, str (list: the default value) or None
    lo: int = 0
    hi: int = 0
    values: tuple[str, ...] = ()  # LIST / enumerated declarative values
    sender: Sender = Sender.BOTH
    leading_only: bool = True
    clause: str = ""

    def parse(self, raw: str) -> object:
        """Wire string -> typed value; ValueError when malformed or out of range."""
        if self.kind in (Kind.AND, Kind.OR):
            if raw not in _BOOL:
                raise ValueError(f"{self.name}: {raw!r} is not Yes/No")
            return _BOOL[raw]
        if self.kind in (Kind.MIN, Kind.MAX) or (self.kind is Kind.DECLARATIVE and self.hi):
            value = parse_number(raw)
            if not self.lo <= value <= self.hi:
                raise ValueError(f"{self.name}: {value} outside {self.lo}..{self.hi}")
            return value
        if self.kind is Kind.LIST:
            items = tuple(v for v in raw.split(","))
            if not items or any(not v for v in items):
                raise ValueError(f"{self.name}: malformed list {raw!r}")
            return items
        if self.values and raw not in self.values:
            raise ValueError(f"{self.name}: {raw!r} not one of {self.values}")
        return raw

    def format(self, value: object) -> str:
        if isinstance(value, bool):
            return YES if value else NO
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


_S, _O, _D, _F = Phase.SECURITY, Phase.OPERATIONAL, Phase.DECLARATION, Phase.FULL_FEATURE
_N24 = (1 << 24) - 1

# RFC 7143 13 (and RFC 7144 for iSCSIProtocolLevel / TaskReporting).
KEYS: dict[str, KeySpec] = {
    k.name: k
    for k in (
        KeySpec("AuthMethod", _S, Kind.LIST, "None", values=("CHAP", "None"), clause="12.1"),
        KeySpec("HeaderDigest", _O, Kind.LIST, "None", values=("CRC32C", "None"), leading_only=False, clause="13.1"),
        KeySpec("DataDigest", _O, Kind.LIST, "None", values=("CRC32C", "None"), leading_only=False, clause="13.1"),
        KeySpec("MaxConnections", _O, Kind.MIN, 1, 1, 65535, clause="13.2"),
        KeySpec("SendTargets", _F, Kind.DECLARATIVE, None, sender=Sender.INITIATOR, clause="13.3"),
        KeySpec("TargetName", _D, Kind.DECLARATIVE, None, sender=Sender.BOTH, clause="13.4"),
        KeySpec("InitiatorName", _D, Kind.DECLARATIVE, None, sender=Sender.INITIATOR, clause="13.5"),
        KeySpec("TargetAlias", _D, Kind.DECLARATIVE, None, sender=Sender.TARGET, clause="13.6"),
        KeySpec("InitiatorAlias", _D, Kind.DECLARATIVE, None, sender=Sender.INITIATOR, clause="13.7"),
        KeySpec("TargetAddress", _D, Kind.DECLARATIVE, None, sender=Sender.TARGET, clause="13.8"),
        KeySpec("TargetPortalGroupTag", _D, Kind.DECLARATIVE, None, 0, 65535, sender=Sender.TARGET, clause="13.9"),
        KeySpec("InitialR2T", _O, Kind.OR, True, clause="13.10"),
        KeySpec("ImmediateData", _O, Kind.AND, True, clause="13.11"),
        KeySpec("MaxRecvDataSegmentLength", _O, Kind.DECLARATIVE, 8192, 512, _N24, leading_only=False, clause="13.12"),
        KeySpec("MaxBurstLength", _O, Kind.MIN, 262144, 512, _N24, clause="13.13"),
        KeySpec("FirstBurstLength", _O, Kind.MIN, 65536, 512, _N24, clause="13.14"),
        KeySpec("DefaultTime2Wait", _O, Kind.MAX, 2, 0, 3600, clause="13.15"),
        KeySpec("DefaultTime2Retain", _O, Kind.MIN, 20, 0, 3600, clause="13.16"),
        KeySpec("MaxOutstandingR2T", _O, Kind.MIN, 1, 1, 65535, clause="13.17"),
        KeySpec("DataPDUInOrder", _O, Kind.OR, True, clause="13.18"),
        KeySpec("DataSequenceInOrder", _O, Kind.OR, True, clause="13.19"),
        KeySpec("ErrorRecoveryLevel", _O, Kind.MIN, 0, 0, 2, clause="13.20"),
        KeySpec("SessionType", _D, Kind.DECLARATIVE, "Normal", values=("Discovery", "Normal"),
                sender=Sender.INITIATOR, clause="13.21"),
        # Markers were removed by RFC 7143; old initiators still offer them.
        KeySpec("IFMarker", _O, Kind.AND, False, leading_only=False, clause="RFC 3720 A.3.2"),
        KeySpec("OFMarker", _O, Kind.AND, False, leading_only=False, clause="RFC 3720 A.3.2"),
        KeySpec("iSCSIProtocolLevel", _O, Kind.MIN, 1, 0, 31, clause="RFC 7144 4.1"),
        KeySpec("TaskReporting", _O, Kind.LIST, "RFC3720", values=("RFC3720", "ResponseFence", "FastAbort"),
                clause="RFC 7144 4.2"),
    )
}

# Keys whose value is a name or address, not subject to MAX_VALUE on length.
_LONG_KEYS = frozenset({"CHAP_C", "CHAP_R", "SendTargets", "TargetAddress"})


def parse_number(raw: str) -> int:
    """Decimal or 0x-hex numerical value (RFC 7143 6.1)."""
    if raw[:2] in ("0x", "0X"):
        return int(raw[2:], 16)
    if not raw.isdigit():
        raise ValueError(f"{raw!r} is not a number")
    return int(raw)


# --------------------------------------------------------------------------
# Text codec


def encode_text(pairs: Iterable[tuple[str, object]]) -> bytes:
    """``[(key, value)]`` -> ``key=value\\0...`` (values formatted with the table)."""
    out = []
    for key, value in pairs:
        spec = KEYS.get(key)
        text = spec.format(value) if spec is not None else (
            (YES if value else NO) if isinstance(value, bool) else str(value)
        )
        out.append(f"{key}={text}\0")
    return "".join(out).encode("utf-8")


def decode_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Text data segment -> ordered ``[(key, value)]``; LoginError when malformed."""
    raw = bytes(data)
    out: list[tuple[str, str]] = []
    if not raw:
        return out
    parts = raw.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    for part in parts:
        if not part:
            continue  # tolerate empty records (padding written as NULs by some peers)
        key, eq, value = part.partition(b"=")
        if not eq or not key:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"malformed text record {part[:40]!r}")
        try:
            k, v = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "text is not UTF-8") from exc
        if len(k) > MAX_KEY_NAME:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"key name of {len(k)} characters")
        if len(v) > (MAX_LONG_VALUE if k in _LONG_KEYS else MAX_VALUE):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"value of {k} too long")
        out.append((k, v))
    return out


@dataclass(slots=True)
class TextAccumulator:
    """Joins text data over PDUs with C=1 (RFC 7143 6.1: a pair may span PDUs)."""

    limit: int = MAX_TEXT
    _parts: list[bytes] = field(default_factory=list)
    _size: int = 0

    def add(self, data: bytes, more: bool) -> list[tuple[str, str]] | None:
        """Add one PDU's text; the decoded pairs when ``more`` is False."""
        self._size += len(data)
        if self._size > self.limit:
            raise LoginError(LoginStatus.OUT_OF_RESOURCES, "text exceeds buffer")
        self._parts.append(bytes(data))
        if more:
            return None
        joined = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return decode_text(joined)


# --------------------------------------------------------------------------
# Negotiation


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Negotiated operational parameters of a connection/session."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    # MaxRecvDataSegmentLength: what we receive / what the peer receives
    max_recv_data_segment_length: int = 8192
    max_xmit_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0


class Negotiation:
    """Key negotiation for one login, for either role (RFC 7143 6.2).

    ``local`` holds our values: what we offer, and our limit when answering
    (booleans, numbers, or for LIST keys a tuple of supported values in
    preference order). ``receive(pairs, stage)`` takes the keys of one
    received PDU and returns the pairs to send back: answers to the peer's
    offers, plus our own declarations. Answers to our earlier ``offer``
    are checked and recorded. ``declared`` holds the peer's declarative keys.
    """

    def __init__(
        self,
        role: Role,
        local: Mapping[str, object] | None = None,
        *,
        leading: bool = True,
    ) -> None:
        self.role = role
        self.leading = leading
        self.local: dict[str, object] = {}
        for name, spec in KEYS.items():
            if spec.kind is Kind.LIST:
                self.local[name] = (spec.default,)
            elif spec.kind is not Kind.DECLARATIVE or name == "MaxRecvDataSegmentLength":
                self.local[name] = spec.default
        if local:
            for k, v in local.items():
                if KEYS[k].kind is Kind.LIST and isinstance(v, str):
                    v = tuple(v.split(","))
                self.local[k] = v
        self.results: dict[str, object] = {}
        self.declared: dict[str, str] = {}
        self._pending: dict[str, object] = {}  # our offers awaiting an answer
        self._answered: set[str] = set()  # peer offers already answered
        self._declared_mrdsl = False

    # -- originator side
    def offer(self, names: Iterable[str]) -> list[tuple[str, str]]:
        """Pairs offering our values for ``names``; their answers are awaited."""
        out = []
        for name in names:
            spec = KEYS[name]
            value = self.local[name]
            if spec.kind is Kind.DECLARATIVE:
                if name == "MaxRecvDataSegmentLength":
                    self._declared_mrdsl = True
                out.append((name, spec.format(value)))
                continue
            self._pending[name] = value
            out.append((name, spec.format(value)))
        return out

    @property
    def pending(self) -> frozenset[str]:
        """Offers of ours that were not answered yet."""
        return frozenset(self._pending)

    # -- both sides
    def receive(self, pairs: Iterable[tuple[str, str]], stage: Stage) -> list[tuple[str, str]]:
        """Apply received pairs; return the pairs to answer with."""
        out: list[tuple[str, str]] = []
        for key, raw in pairs:
            if key.startswith("CHAP_"):
                continue  # handled by the authentication exchange
            if key in self._pending:
                self._answer_received(key, raw)
                continue
            answer = self._offer_received(key, raw, stage)
            if answer is not None:
                out.append((key, answer))
            if key == "MaxRecvDataSegmentLength" and not self._declared_mrdsl:
                self._declared_mrdsl = True
                out.append((key, str(self.local[key])))
        return out

    def _offer_received(self, key: str, raw: str, stage: Stage) -> str | None:
        spec = KEYS.get(key)
        if spec is None:
            return Special.NOT_UNDERSTOOD.value
        if raw in (Special.NOT_UNDERSTOOD.value, Special.IRRELEVANT.value, Special.REJECT.value):
            return None  # an answer to something we did not offer: ignore
        if spec.phase is Phase.SECURITY and stage is not Stage.SECURITY:
            return Special.REJECT.value
        if spec.phase is Phase.FULL_FEATURE and stage is not Stage.FULL_FEATURE:
            return Special.REJECT.value
        if spec.phase is Phase.OPERATIONAL and stage is Stage.FULL_FEATURE:
            return Special.REJECT.value  # no renegotiation in full feature phase
        if spec.leading_only and not self.leading and spec.phase is Phase.OPERATIONAL:
            return Special.IRRELEVANT.value
        if spec.sender is Sender.INITIATOR and self.role is Role.INITIATOR:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"{key} sent by the target")
        if spec.sender is Sender.TARGET and self.role is Role.TARGET:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"{key} sent by the initiator")
        if key in self._answered:
            # RFC 7143 6.2: a key must not be offered twice in one negotiation
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"{key} negotiated twice")
        try:
            value: Any = spec.parse(raw)
        except ValueError:
            if spec.kind is Kind.DECLARATIVE:
                raise LoginError(LoginStatus.INITIATOR_ERROR, f"bad value for {key}: {raw[:40]!r}") from None
            self._answered.add(key)
            return Special.REJECT.value
        self._answered.add(key)
        kind = spec.kind
        if kind is Kind.DECLARATIVE:
            self.declared[key] = raw
            if key == "MaxRecvDataSegmentLength":
                self.results["PeerMaxRecvDataSegmentLength"] = value
            return None
        mine: Any = self.local[key]
        if kind is Kind.AND:
            result: object = bool(value) and bool(mine)
        elif kind is Kind.OR:
            result = bool(value) or bool(mine)
        elif kind is Kind.MIN:
            result = min(value, mine)
        elif kind is Kind.MAX:
            result = max(value, mine)
        else:  # LIST: the first of the offered values that we support
            supported = mine if isinstance(mine, tuple) else (mine,)
            choice = next((v for v in value if v in supported), None)
            if choice is None:
                return Special.REJECT.value
            result = choice
        self.results[key] = result
        return spec.format(result)

    def _answer_received(self, key: str, raw: str) -> None:
        spec = KEYS[key]
        offered: Any = self._pending.pop(key)
        if raw in (Special.NOT_UNDERSTOOD.value, Special.IRRELEVANT.value, Special.REJECT.value):
            return  # the default stays in force
        try:
            value: Any = spec.parse(raw)
        except ValueError as exc:
            raise LoginError(LoginStatus.INITIATOR_ERROR, str(exc)) from None
        kind = spec.kind
        ok = True
        if kind is Kind.AND:
            ok = not value or bool(offered)
        elif kind is Kind.OR:
            ok = bool(value) or not offered
        elif kind is Kind.MIN:
            ok = value <= offered
        elif kind is Kind.MAX:
            ok = value >= offered
        elif kind is Kind.LIST:
            if len(value) != 1 or value[0] not in offered:
                ok = False
            else:
                value = value[0]
        if not ok:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"answer {key}={raw} contradicts our offer")
        self.results[key] = value

    # -- outcome
    def value(self, key: str) -> object:
        """Negotiated value of ``key`` (the table default when not negotiated)."""
        if key in self.results:
            return self.results[key]
        spec = KEYS[key]
        return spec.default

    def params(self) -> SessionParams:
        """The negotiated parameters (RFC 7143 13.14: FirstBurst <= MaxBurst)."""
        v = self.value
        max_burst = int(v("MaxBurstLength"))  # type: ignore[call-overload]
        peer = self.results.get("PeerMaxRecvDataSegmentLength", 8192)
        return SessionParams(
            header_digest=v("HeaderDigest") == "CRC32C",
            data_digest=v("DataDigest") == "CRC32C",
            max_connections=int(v("MaxConnections")),  # type: ignore[call-overload]
            initial_r2t=bool(v("InitialR2T")),
            immediate_data=bool(v("ImmediateData")),
            max_recv_data_segment_length=int(self.local["MaxRecvDataSegmentLength"]),  # type: ignore[call-overload]
            max_xmit_data_segment_length=int(peer),  # type: ignore[call-overload]
            max_burst_length=max_burst,
            first_burst_length=min(int(v("FirstBurstLength")), max_burst),  # type: ignore[call-overload]
            default_time2wait=int(v("DefaultTime2Wait")),  # type: ignore[call-overload]
            default_time2retain=int(v("DefaultTime2Retain")),  # type: ignore[call-overload]
            max_outstanding_r2t=int(v("MaxOutstandingR2T")),  # type: ignore[call-overload]
            data_pdu_in_order=bool(v("DataPDUInOrder")),
            data_sequence_in_order=bool(v("DataSequenceInOrder")),
            error_recovery_level=int(v("ErrorRecoveryLevel")),  # type: ignore[call-overload]
        )


# --------------------------------------------------------------------------
# Login stages

# (current stage, next stage) pairs a T=1 request may ask for, RFC 7143 6.3.
TRANSITIONS: frozenset[tuple[Stage, Stage]] = frozenset(
    {
        (Stage.SECURITY, Stage.OPERATIONAL),
        (Stage.SECURITY, Stage.FULL_FEATURE),
        (Stage.OPERATIONAL, Stage.FULL_FEATURE),
    }
)
FIRST_STAGES = frozenset({Stage.SECURITY, Stage.OPERATIONAL})


@dataclass(slots=True)
class LoginStages:
    """CSG/NSG/T bookkeeping of one login, for either role.

    Target: ``request(csg, nsg, transit, cont)`` validates a Login Request,
    ``respond(agree)`` gives the (csg, nsg, transit) to answer with and
    advances. Initiator: ``response(csg, nsg, transit)`` validates a Login
    Response to the last request and advances.
    """

    stage: Stage | None = None  # None until the first request
    complete: bool = False
    _want: Stage | None = None  # NSG of a pending T=1 request

    def request(self, csg: int, nsg: int, transit: bool, cont: bool = False) -> None:
        if self.complete:
            raise LoginError(LoginStatus.INVALID_DURING_LOGIN, "login already complete")
        if csg not in Stage._value2member_map_:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"CSG {csg} reserved")
        cur = Stage(csg)
        if self.stage is None:
            if cur not in FIRST_STAGES:
                raise LoginError(LoginStatus.INITIATOR_ERROR, f"login cannot start in stage {cur.name}")
            self.stage = cur
        elif cur is not self.stage:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"CSG {cur.name} but stage is {self.stage.name}")
        if transit and cont:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "T and C bits both set")
        self._want = None
        if transit:
            if nsg not in Stage._value2member_map_ or (cur, Stage(nsg)) not in TRANSITIONS:
                raise LoginError(LoginStatus.INITIATOR_ERROR, f"transition {csg}->{nsg} not allowed")
            self._want = Stage(nsg)

    def respond(self, agree: bool) -> tuple[Stage, Stage, bool]:
        """(CSG, NSG, T) of the response; ``agree`` False stays in the stage."""
        assert self.stage is not None
        cur = self.stage
        if self._want is not None and agree:
            nxt = self._want
            self.stage = nxt
            self._want = None
            if nxt is Stage.FULL_FEATURE:
                self.complete = True
            return cur, nxt, True
        return cur, Stage.SECURITY if cur is Stage.SECURITY else cur, False

    def offered(self, csg: Stage, nsg: Stage | None) -> None:
        """Initiator: a request is sent in ``csg``, asking for ``nsg`` (T=1) or not."""
        if self.stage is None:
            self.stage = csg
        self._want = nsg

    def response(self, csg: int, nsg: int, transit: bool) -> None:
        """Initiator: validate a Login Response (RFC 7143 11.13.3)."""
        if self.stage is None or csg != self.stage:
            raise LoginError(LoginStatus.TARGET_ERROR, f"response CSG {csg} but stage {self.stage}")
        if transit:
            if self._want is None:
                raise LoginError(LoginStatus.TARGET_ERROR, "target transits without T=1 request")
            if nsg not in Stage._value2member_map_ or (Stage(csg), Stage(nsg)) not in TRANSITIONS:
                raise LoginError(LoginStatus.TARGET_ERROR, f"transition {csg}->{nsg} not allowed")
            if nsg > self._want:
                raise LoginError(LoginStatus.TARGET_ERROR, "target skipped beyond the requested stage")
            self.stage = Stage(nsg)
            if self.stage is Stage.FULL_FEATURE:
                self.complete = True
        self._want = None
