"""The authenticated channel between the source and destination daemons (sans-IO).

No sockets here: the shell feeds received bytes to ``receive_data()`` and
writes what ``data_to_send()`` returns, as h11 and aioquic do. Nonces are
parameters so tests are deterministic; the shell passes ``os.urandom(32)``.

Frames (all integers big-endian)::

    frame = length u32 (bytes after this field) | type u8 | body
    handshake bodies (before authentication, at most 512 bytes):
      HELLO     client -> server: version u16 | client nonce (32) | id_len u8 | client id
      CHALLENGE server -> client: version u16 | server nonce (32) | server proof (32)
                                  | id_len u8 | server id
      AUTH      client -> server: client proof (32)
    authenticated bodies (AUTH_OK and every protocol message):
      seq u64 | payload | MAC (32)

Mutual authentication with the per-cluster shared secret (HMAC-SHA256), the
transcript ``T = c_nonce | s_nonce | len|c_id | len|s_id``:

- server proof = HMAC(secret, "prmigrate/1 server proof" | T): checked by the
  client before it sends its own proof, so a server without the secret learns
  nothing usable and the client sends no state to it;
- client proof = HMAC(secret, "prmigrate/1 client proof" | T): checked by the
  server before it accepts any message (distinct labels: a proof cannot be
  reflected back; a peer echoing our own nonce is refused);
- per-direction session keys K_c2s / K_s2c = HMAC(secret, label | T);
- each authenticated frame: MAC = HMAC(K_dir, length | type | seq | payload);
  ``seq`` starts at 0 per direction and must be exactly the next one, so a
  replayed, dropped or reordered frame is refused (``ReplayError``), and a
  frame from another session fails its MAC (fresh nonces, fresh keys).

Any error closes the channel for good (``ChannelClosed`` afterwards).
Protocol messages are frozen dataclasses; their payload is
``json_len u32 | canonical JSON | blob`` (the blob carries the state stream).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, ClassVar

from .errors import (
    AbortReason,
    AuthenticationFailed,
    ChannelClosed,
    ChannelError,
    FrameError,
    IntegrityError,
    ReplayError,
)
from .plan import MovePort, Strategy

PROTOCOL_VERSION = 1
NONCE_LEN = 32
MAC_LEN = 32
MIN_SECRET_LEN = 16
MAX_HANDSHAKE_FRAME = 512
MAX_FRAME = 32 << 20  # a state stream is small, but bound it anyway
MAX_JSON = 1 << 20

_LEN = struct.Struct(">I")
_LEN_TYPE = struct.Struct(">IB")
_SEQ = struct.Struct(">Q")
_U16 = struct.Struct(">H")


class MsgType(IntEnum):
    # handshake (unauthenticated)
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    # authenticated
    AUTH_OK = 0x04
    SETUP = 0x10
    SETUP_OK = 0x11
    STATE = 0x12
    TAKEOVER_DONE = 0x13
    RESUME = 0x14
    ROLLBACK = 0x15
    ABORT = 0x16
    ACK = 0x17
    # an incoming device (pull.py): destination -> source WATCH, PULL;
    # source -> destination DESCRIBED, PULLED (a refusal is an ABORT)
    WATCH = 0x20
    DESCRIBED = 0x21
    PULL = 0x22
    PULLED = 0x23


_HANDSHAKE_TYPES = {MsgType.HELLO, MsgType.CHALLENGE, MsgType.AUTH}
_STRATEGIES = frozenset(s.value for s in Strategy)


# ---------------------------------------------------------------- messages


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise FrameError(what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[MsgType]

    def fields(self) -> dict[str, Any]:
        return {}

    @property
    def blob(self) -> bytes:
        return b""

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Message:
        _check(not f and not blob, f"{cls.TYPE.name}: unexpected payload")
        return cls()


@dataclass(frozen=True, slots=True)
class Setup(Message):
    """Source -> destination: create the device and register the guests' keys.

    ``stream`` is a state stream (``stream.encode_stream``) as of now; the PR
    section may still change before the pause, STATE carries the final one."""

    TYPE: ClassVar[MsgType] = MsgType.SETUP
    migration_id: str
    stream: bytes
    strategy: str = "prmigrate"  # plan.Strategy value

    def fields(self) -> dict[str, Any]:
        return {"migration_id": self.migration_id, "strategy": self.strategy}

    @property
    def blob(self) -> bytes:
        return self.stream

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Setup:
        _check(set(f) == {"migration_id", "strategy"} and isinstance(f["migration_id"], str), "SETUP: bad fields")
        _check(f["strategy"] in _STRATEGIES, f"SETUP: unknown strategy {f['strategy']!r}")
        _check(bool(blob), "SETUP: no stream")
        return cls(f["migration_id"], blob, f["strategy"])


@dataclass(frozen=True, slots=True)
class SetupOk(Message):
    """Destination -> source: device created; ``registered`` maps each guest
    to the key now registered on its destination nexus.

    ``move``: the holders whose reservation the source moves with REGISTER
    AND MOVE (``plan.SetupPlan.move``), each to the destination nexus's
    TransportID and relative target port (``"move": {guest: [TransportID,
    port]}``). Present only when not empty, so a SETUP_OK without it is,
    byte for byte, what a peer that does not know the field sends and
    accepts; such a peer, as the source, refuses a SETUP_OK with it as
    malformed, so that move fails before the pause, as every such move did
    before the field existed."""

    TYPE: ClassVar[MsgType] = MsgType.SETUP_OK
    registered: Mapping[str, int] = field(default_factory=dict)
    read_full_status: bool = False
    move: Mapping[str, MovePort] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        f: dict[str, Any] = {"registered": dict(sorted(self.registered.items())), "read_full_status": self.read_full_status}
        if self.move:
            f["move"] = {g: p.to_wire() for g, p in sorted(self.move.items())}
        return f

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> SetupOk:
        _check(set(f) - {"move"} == {"registered", "read_full_status"} and not blob, "SETUP_OK: bad fields")
        reg = f["registered"]
        _check(isinstance(reg, dict), "SETUP_OK: registered must be a mapping")
        _check(all(_is_int(k) and 0 < k < 1 << 64 for k in reg.values()), "SETUP_OK: bad key")
        _check(isinstance(f["read_full_status"], bool), "SETUP_OK: read_full_status must be a boolean")
        raw = f.get("move", {})
        _check(isinstance(raw, dict) and ("move" not in f or bool(raw)), "SETUP_OK: move must be a non-empty mapping")
        move: dict[str, MovePort] = {}
        for g, v in raw.items():
            try:
                move[g] = MovePort.from_wire(v)
            except ValueError as e:
                raise FrameError(f"SETUP_OK: move of {g!r}: {e}") from None
        return cls(dict(reg), f["read_full_status"], move)


@dataclass(frozen=True, slots=True)
class State(Message):
    """Source -> destination, inside the pause: the final state stream."""

    TYPE: ClassVar[MsgType] = MsgType.STATE
    stream: bytes

    @property
    def blob(self) -> bytes:
        return self.stream

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> State:
        _check(not f and bool(blob), "STATE: bad payload")
        return cls(blob)


@dataclass(frozen=True, slots=True)
class TakeoverDone(Message):
    """Destination -> source: the reservation (and registrations) are now on
    the destination's nexuses; ``round_trips`` PR OUT commands it took."""

    TYPE: ClassVar[MsgType] = MsgType.TAKEOVER_DONE
    round_trips: int = 0
    takeover_us: int = 0  # the destination's own PR takeover time (its clock)

    def fields(self) -> dict[str, Any]:
        return {"round_trips": self.round_trips, "takeover_us": self.takeover_us}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> TakeoverDone:
        ok = set(f) == {"round_trips", "takeover_us"} and not blob
        ok = ok and all(_is_int(f[k]) and 0 <= f[k] < 1 << 48 for k in f)
        _check(ok, "TAKEOVER_DONE: bad fields")
        return cls(f["round_trips"], f["takeover_us"])


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Source -> destination: the commit point. Run the guest."""

    TYPE: ClassVar[MsgType] = MsgType.RESUME


def _reason(v: Any, what: str) -> AbortReason:
    _check(_is_int(v), f"{what}: bad reason")
    try:
        return AbortReason(v)
    except ValueError:
        return AbortReason.UNSPECIFIED  # a newer peer's reason: still an abort


@dataclass(frozen=True, slots=True)
class Rollback(Message):
    """Source -> destination: stop, issue no more PR commands, report whether
    you preempted (ACK), then wait for ABORT before unregistering."""

    TYPE: ClassVar[MsgType] = MsgType.ROLLBACK
    reason: AbortReason = AbortReason.UNSPECIFIED
    detail: str = ""

    def fields(self) -> dict[str, Any]:
        return {"reason": int(self.reason), "detail": self.detail[:512]}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Rollback:
        _check(set(f) == {"reason", "detail"} and isinstance(f["detail"], str) and not blob, "ROLLBACK: bad fields")
        return cls(_reason(f["reason"], "ROLLBACK"), f["detail"])


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Either way: the migration is over. From the destination, ``preempted``
    says whether its PREEMPT took the reservation (the source must take it
    back); from the source, it is the order to unregister and drop the device."""

    TYPE: ClassVar[MsgType] = MsgType.ABORT
    reason: AbortReason = AbortReason.UNSPECIFIED
    detail: str = ""
    preempted: bool = False

    def fields(self) -> dict[str, Any]:
        return {"reason": int(self.reason), "detail": self.detail[:512], "preempted": self.preempted}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Abort:
        _check(
            set(f) == {"reason", "detail", "preempted"} and isinstance(f["detail"], str) and isinstance(f["preempted"], bool) and not blob,
            "ABORT: bad fields",
        )
        return cls(_reason(f["reason"], "ABORT"), f["detail"], f["preempted"])


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Acknowledges RESUME (destination resumed) or ROLLBACK (destination
    stopped; ``preempted`` as in ABORT)."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    of: MsgType = MsgType.RESUME
    preempted: bool = False

    def fields(self) -> dict[str, Any]:
        return {"of": int(self.of), "preempted": self.preempted}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Ack:
        _check(set(f) == {"of", "preempted"} and _is_int(f["of"]) and isinstance(f["preempted"], bool) and not blob, "ACK: bad fields")
        try:
            of = MsgType(f["of"])
        except ValueError:
            raise FrameError(f"ACK of unknown type {f['of']}") from None
        return cls(of, f["preempted"])


@dataclass(frozen=True, slots=True)
class Watch(Message):
    """Destination -> source, on a channel the destination opened: an
    incoming device waits here for ``device``; ``to`` is the destination's
    migration listener (HOST:PORT), where the source migrates it to."""

    TYPE: ClassVar[MsgType] = MsgType.WATCH
    device: str
    to: str

    def fields(self) -> dict[str, Any]:
        return {"device": self.device, "to": self.to}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Watch:
        ok = set(f) == {"device", "to"} and all(isinstance(f[k], str) and 0 < len(f[k]) <= 255 for k in f)
        _check(ok and not blob, "WATCH: bad fields")
        return cls(f["device"], f["to"])


@dataclass(frozen=True, slots=True)
class Described(Message):
    """Source -> destination: the device as the guest sees it on the source
    (a state stream of one device, its config and identity; the destination
    ignores its PR section until a migration carries it)."""

    TYPE: ClassVar[MsgType] = MsgType.DESCRIBED
    stream: bytes

    @property
    def blob(self) -> bytes:
        return self.stream

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Described:
        _check(not f and bool(blob), "DESCRIBED: bad payload")
        return cls(blob)


@dataclass(frozen=True, slots=True)
class Pull(Message):
    """Destination -> source: a guest command needs the device here; migrate
    it to the watching destination now (as a pushed ``migrate``)."""

    TYPE: ClassVar[MsgType] = MsgType.PULL


@dataclass(frozen=True, slots=True)
class Pulled(Message):
    """Source -> destination: the migration a PULL (or the source's own
    handover) started has ended; ``success``: the destination serves the
    device now."""

    TYPE: ClassVar[MsgType] = MsgType.PULLED
    success: bool = False
    detail: str = ""

    def fields(self) -> dict[str, Any]:
        return {"success": self.success, "detail": self.detail[:512]}

    @classmethod
    def from_fields(cls, f: Mapping[str, Any], blob: bytes) -> Pulled:
        ok = set(f) == {"success", "detail"} and isinstance(f["success"], bool) and isinstance(f["detail"], str)
        _check(ok and not blob, "PULLED: bad fields")
        return cls(f["success"], f["detail"])


@dataclass(frozen=True, slots=True)
class AuthOk(Message):
    TYPE: ClassVar[MsgType] = MsgType.AUTH_OK


MESSAGES: dict[MsgType, type[Message]] = {
    m.TYPE: m for m in (AuthOk, Setup, SetupOk, State, TakeoverDone, Resume, Rollback, Abort, Ack,
                        Watch, Described, Pull, Pulled)
}


def encode_payload(msg: Message) -> bytes:
    f = msg.fields()
    j = json.dumps(f, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() if f else b""
    return _LEN.pack(len(j)) + j + msg.blob


def decode_payload(mtype: MsgType, payload: bytes | memoryview) -> Message:
    mv = memoryview(payload)
    _check(len(mv) >= 4, f"{mtype.name}: payload shorter than its JSON length")
    (jlen,) = _LEN.unpack(mv[:4])
    _check(jlen <= MAX_JSON and 4 + jlen <= len(mv), f"{mtype.name}: JSON length {jlen} out of bounds")
    f: Any = {}
    if jlen:
        try:
            f = json.loads(bytes(mv[4 : 4 + jlen]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FrameError(f"{mtype.name}: bad JSON: {e}") from None
        _check(isinstance(f, dict), f"{mtype.name}: JSON must be an object")
    return MESSAGES[mtype].from_fields(f, bytes(mv[4 + jlen :]))


# ---------------------------------------------------------------- the channel


class Role(Enum):
    CLIENT = "client"  # the source daemon connects
    SERVER = "server"  # the destination daemon listens


class ChannelState(Enum):
    START = "start"  # client: before start(); server: waiting for HELLO
    HELLO_SENT = "hello_sent"
    CHALLENGE_SENT = "challenge_sent"
    AUTH_SENT = "auth_sent"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Event: the peer proved it holds the secret; messages may now flow."""

    peer_id: str


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _lp(b: bytes) -> bytes:
    return bytes([len(b)]) + b


class Channel:
    """One end of the channel. Call ``start()`` on the client, then loop:
    ``receive_data(bytes) -> events``, ``send(message)``, ``data_to_send()``."""

    def __init__(self, role: Role, secret: bytes, nonce: bytes, local_id: str = "", *, max_frame: int = MAX_FRAME) -> None:
        if len(secret) < MIN_SECRET_LEN:
            raise ValueError(f"cluster secret must be at least {MIN_SECRET_LEN} bytes")
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        self.role = role
        self.state = ChannelState.START
        self.local_id = local_id
        self.peer_id: str | None = None
        self.max_frame = max_frame
        self._secret = bytes(secret)
        self._nonce = bytes(nonce)
        self._peer_nonce = b""
        self._tx_key = b""
        self._rx_key = b""
        self._tx_seq = 0
        self._rx_seq = 0
        self._in = bytearray()
        self._out = bytearray()

    # -- public API
    @property
    def is_open(self) -> bool:
        return self.state is ChannelState.OPEN

    def start(self) -> None:
        if self.role is not Role.CLIENT or self.state is not ChannelState.START:
            raise ChannelError("start() is for a client that has not started")
        body = _U16.pack(PROTOCOL_VERSION) + self._nonce + _lp(self.local_id.encode()[:255])
        self._queue_plain(MsgType.HELLO, body)
        self.state = ChannelState.HELLO_SENT

    def send(self, msg: Message) -> None:
        if self.state is not ChannelState.OPEN:
            raise ChannelClosed(f"cannot send {msg.TYPE.name}: channel is {self.state.value}")
        self._queue_sealed(msg.TYPE, encode_payload(msg))

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self) -> None:
        self.state = ChannelState.CLOSED

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Authenticated | Message]:
        """Feed bytes; return the events completed by them. Any error closes
        the channel and is raised (typed: see errors.ChannelError)."""
        if self.state is ChannelState.CLOSED:
            raise ChannelClosed("channel is closed")
        self._in += data
        events: list[Authenticated | Message] = []
        try:
            while True:
                ev = self._next_frame()
                if ev is None:
                    return events
                if ev is not _NOTHING:
                    events.append(ev)  # type: ignore[arg-type]
        except ChannelError:
            self.state = ChannelState.CLOSED
            self._in.clear()
            raise

    # -- framing
    def _limit(self) -> int:
        return self.max_frame if self.state is ChannelState.OPEN else MAX_HANDSHAKE_FRAME

    def _next_frame(self) -> object | None:
        if len(self._in) < 4:
            return None
        (length,) = _LEN.unpack_from(self._in)
        if length < 1 or length > self._limit():
            raise FrameError(f"frame length {length} out of bounds (1..{self._limit()})")
        if len(self._in) < 4 + length:
            return None
        frame = bytes(self._in[: 4 + length])
        del self._in[: 4 + length]
        try:
            mtype = MsgType(frame[4])
        except ValueError:
            raise FrameError(f"unknown frame type 0x{frame[4]:02x}") from None
        if mtype in _HANDSHAKE_TYPES:
            return self._handshake(mtype, frame[5:])
        if not self._rx_key:
            raise AuthenticationFailed(f"{mtype.name} before authentication")
        return self._sealed(mtype, frame)

    def _queue_plain(self, mtype: MsgType, body: bytes) -> None:
        self._out += _LEN_TYPE.pack(1 + len(body), mtype) + body

    def _queue_sealed(self, mtype: MsgType, payload: bytes) -> None:
        length = 1 + 8 + len(payload) + MAC_LEN
        if length > self.max_frame:
            raise FrameError(f"{mtype.name} of {length} bytes exceeds {self.max_frame}")
        head = _LEN_TYPE.pack(length, mtype) + _SEQ.pack(self._tx_seq)
        self._out += head + payload + _mac(self._tx_key, head + payload)
        self._tx_seq += 1

    def _sealed(self, mtype: MsgType, frame: bytes) -> object:
        if len(frame) < 5 + 8 + MAC_LEN:
            raise FrameError(f"{mtype.name}: frame too short for seq and MAC")
        signed, tag = frame[:-MAC_LEN], frame[-MAC_LEN:]
        if not hmac.compare_digest(_mac(self._rx_key, signed), tag):
            raise IntegrityError(f"{mtype.name}: MAC does not verify")
        (seq,) = _SEQ.unpack_from(frame, 5)
        if seq != self._rx_seq:
            raise ReplayError(f"{mtype.name}: sequence {seq}, expected {self._rx_seq}")
        self._rx_seq += 1
        msg = decode_payload(mtype, memoryview(signed)[13:])
        if mtype is MsgType.AUTH_OK:
            if self.role is not Role.CLIENT or self.state is not ChannelState.AUTH_SENT:
                raise FrameError("unexpected AUTH_OK")
            self.state = ChannelState.OPEN
            return Authenticated(self.peer_id or "")
        if self.state is not ChannelState.OPEN:
            raise FrameError(f"{mtype.name} before AUTH_OK")
        return msg

    # -- handshake
    def _transcript(self) -> bytes:
        if self.role is Role.CLIENT:
            c_nonce, s_nonce, c_id, s_id = self._nonce, self._peer_nonce, self.local_id, self.peer_id or ""
        else:
            c_nonce, s_nonce, c_id, s_id = self._peer_nonce, self._nonce, self.peer_id or "", self.local_id
        return c_nonce + s_nonce + _lp(c_id.encode()[:255]) + _lp(s_id.encode()[:255])

    def _proof(self, who: bytes) -> bytes:
        return _mac(self._secret, b"prmigrate/1 " + who + b" proof\x00" + self._transcript())

    def _derive_keys(self) -> None:
        t = self._transcript()
        c2s = _mac(self._secret, b"prmigrate/1 key c2s\x00" + t)
        s2c = _mac(self._secret, b"prmigrate/1 key s2c\x00" + t)
        self._tx_key, self._rx_key = (c2s, s2c) if self.role is Role.CLIENT else (s2c, c2s)

    def _parse_hello(self, body: bytes, with_proof: bool) -> bytes:
        need = 2 + NONCE_LEN + (MAC_LEN if with_proof else 0) + 1
        _check(len(body) >= need, "handshake frame too short")
        (version,) = _U16.unpack_from(body)
        if version != PROTOCOL_VERSION:
            raise FrameError(f"peer speaks channel version {version}, we speak {PROTOCOL_VERSION}")
        nonce = body[2 : 2 + NONCE_LEN]
        proof = body[2 + NONCE_LEN : need - 1]
        idlen = body[need - 1]
        _check(len(body) == need + idlen, "handshake frame length mismatch")
        if hmac.compare_digest(nonce, self._nonce):
            raise AuthenticationFailed("peer echoed our nonce (reflection)")
        try:
            self.peer_id = body[need:].decode()
        except UnicodeDecodeError:
            raise FrameError("peer id is not UTF-8") from None
        self._peer_nonce = bytes(nonce)
        return bytes(proof)

    def _handshake(self, mtype: MsgType, body: bytes) -> object:
        st, role = self.state, self.role
        if role is Role.SERVER and st is ChannelState.START and mtype is MsgType.HELLO:
            self._parse_hello(body, with_proof=False)
            out = _U16.pack(PROTOCOL_VERSION) + self._nonce + self._proof(b"server") + _lp(self.local_id.encode()[:255])
            self._queue_plain(MsgType.CHALLENGE, out)
            self.state = ChannelState.CHALLENGE_SENT
            return _NOTHING
        if role is Role.CLIENT and st is ChannelState.HELLO_SENT and mtype is MsgType.CHALLENGE:
            proof = self._parse_hello(body, with_proof=True)
            if not hmac.compare_digest(proof, self._proof(b"server")):
                raise AuthenticationFailed("server proof does not verify: wrong cluster secret")
            self._queue_plain(MsgType.AUTH, self._proof(b"client"))
            self._derive_keys()
            self.state = ChannelState.AUTH_SENT
            return _NOTHING
        if role is Role.SERVER and st is ChannelState.CHALLENGE_SENT and mtype is MsgType.AUTH:
            _check(len(body) == MAC_LEN, "AUTH: bad length")
            if not hmac.compare_digest(body, self._proof(b"client")):
                raise AuthenticationFailed("client proof does not verify: wrong cluster secret")
            self._derive_keys()
            self.state = ChannelState.OPEN
            self._queue_sealed(MsgType.AUTH_OK, encode_payload(AuthOk()))
            return Authenticated(self.peer_id or "")
        raise FrameError(f"{mtype.name} not legal for a {role.value} in state {st.value}")


_NOTHING = object()
