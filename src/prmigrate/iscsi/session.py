"""Target-side iSCSI connection and session logic (RFC 7143, ErrorRecoveryLevel 0).

No asyncio here: a :class:`Connection` is fed bytes (``data_received``),
appends the response bytes of the whole batch to one list and hands it to the
``send`` callable once per batch; ``close`` is called when the connection must
end. Timers (keepalive) live in the asyncio layer (``target.py``).

A logical unit's ``execute`` may return a ``Result`` or a future-like object
(``add_done_callback``/``result``); the latter is completed by callback, with
no Task per command. A completion that finds its connection gone is dropped;
the answers of all completions of one loop turn go out in one write (the
shell's ``defer``).

Phases of a connection: LOGIN (only Login Requests; stage machine and key
negotiation from ``login.py``; CHAP from ``chap.py``) -> FULL_FEATURE
(dispatch table by opcode) -> CLOSED. Every PDU in full feature phase goes
through one table ``{opcode: handler}``; anything missing is rejected.

Sequence numbers (RFC 7143 4.2.2): StatSN is assigned when a response is
built; ExpCmdSN/MaxCmdSN are sampled at the same moment. Non-immediate
commands outside [ExpCmdSN, MaxCmdSN] are dropped silently (4.2.2.1);
in-window commands ahead of ExpCmdSN wait until the gap is filled.

Metrics: each command adds plain integers to the ``LuCounters`` of its
logical unit (``counters.py``, from ``ConnectionOwner.counters_for``); the
answers of a read event get their latency with one clock read once they are
written, late answers with one clock read each. No library call per command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..counters import KIND_OF, OTHER, READ, WRITE, LuCounters, latency_bucket, pr_action_of
from ..logprefix import PrefixLog
from ..lun.types import LogicalUnitLike, Nexus, Result
from ..scsi.constants import Opcode as ScsiOp
from ..scsi.constants import Status
from ..scsi.sense import Sense, encode_sense
from .chap import ChapAuthenticator, ChapCredentials
from .digest import digest_bytes
from .login import (
    KEYS,
    LoginError,
    LoginStages,
    Negotiation,
    Role,
    SessionParams,
    Stage,
    TextAccumulator,
    encode_text,
)
from .lu import LuContracts, contracts_of
from .pdu import (
    _HDR_U32,
    RESERVED_TAG,
    SCSI_COMMAND,
    Ahs,
    AhsType,
    AsyncEvent,
    AsyncMessage,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    Opcode,
    PduReader,
    ProtocolError,
    RawPdu,
    RejectReason,
    ResponseFlags,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    TmfFunction,
    TmfResponse,
    decode_lun,
    frame_into,
    pack_scsi_response,
    place_segment,
)

log = logging.getLogger("prmigrate.iscsi.target")

SN_MOD = 1 << 32
_HALF = 1 << 31
_GOOD = Status.GOOD
_RELAYED = frozenset((0x28, 0x88))  # READ(10), READ(16): what _fast_reads may relay
_CHECK = Status.CHECK_CONDITION


def sn_diff(a: int, b: int) -> int:
    """Serial number arithmetic (RFC 1982): a - b as a signed 32-bit distance."""
    d = (a - b) & 0xFFFFFFFF
    return d - SN_MOD if d >= _HALF else d


# --------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class ChapConfig:
    """CHAP for a node: the initiator must answer as ``user``/``secret``;
    with ``mutual_user``/``mutual_secret`` the target proves itself too."""

    user: str
    secret: str | bytes
    mutual_user: str | None = None
    mutual_secret: str | bytes | None = None

    def authenticator(self) -> ChapAuthenticator:
        secret = self.secret.encode() if isinstance(self.secret, str) else self.secret
        mutual = None
        if self.mutual_user is not None and self.mutual_secret is not None:
            mutual = ChapCredentials.make(self.mutual_user, self.mutual_secret)
        return ChapAuthenticator({self.user: secret}, mutual)


@dataclass(eq=False)
class TargetNode:
    """One iSCSI target node: a name, its LUNs and who may log in."""

    name: str
    luns: dict[int, LogicalUnitLike]
    acl: set[str] | None = None  # initiator names allowed (case-insensitive); None = all
    chap: ChapConfig | None = None
    tpgt: int = 1
    alias: str | None = None
    redirect: tuple[str, int, int] | None = None  # (host, port, tpgt): login answered 0x0101

    def __post_init__(self) -> None:
        if self.acl is not None:
            self.acl = {a.lower() for a in self.acl}
        for lu in self.luns.values():
            self._present(lu)

    def _present(self, lu: LogicalUnitLike) -> None:
        # REPORT LUNS from any LU of the node lists every LUN of the node.
        if hasattr(lu, "report_luns"):
            lu.report_luns = lambda: sorted(self.luns)  # type: ignore[attr-defined]

    def add_lun(self, lun: int, lu: LogicalUnitLike) -> None:
        self.luns[lun] = lu
        self._present(lu)

    def allows(self, initiator: str) -> bool:
        return self.acl is None or initiator.lower() in self.acl


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """What the target offers / accepts in negotiation."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 8
    initial_r2t: bool = False
    immediate_data: bool = True
    header_digest: tuple[str, ...] = ("None", "CRC32C")
    data_digest: tuple[str, ...] = ("None", "CRC32C")
    cmd_window: int = 128  # MaxCmdSN - ExpCmdSN + 1
    default_time2wait: int = 2
    default_time2retain: int = 20

    def local_keys(self) -> dict[str, object]:
        return {
            "MaxRecvDataSegmentLength": self.max_recv_data_segment_length,
            "MaxBurstLength": self.max_burst_length,
            "FirstBurstLength": self.first_burst_length,
            "MaxOutstandingR2T": self.max_outstanding_r2t,
            "InitialR2T": self.initial_r2t,
            "ImmediateData": self.immediate_data,
            "HeaderDigest": self.header_digest,
            "DataDigest": self.data_digest,
            "DefaultTime2Wait": self.default_time2wait,
            "DefaultTime2Retain": self.default_time2retain,
            "ErrorRecoveryLevel": 0,
            "MaxConnections": 1,
        }


class SessionLog(PrefixLog):
    """Prefixes every line with the session's I_T nexus name (an argument,
    never part of the format string: a name may contain ``%``)."""


@dataclass(eq=False)
class Session:
    """One iSCSI session (one connection: MaxConnections=1)."""

    tsih: int
    initiator: str
    isid: int
    node: TargetNode | None  # None: discovery session
    nexus: Nexus | None
    params: SessionParams
    conn: Connection | None = None
    exp_cmdsn: int = 0
    window: int = 128

    @property
    def discovery(self) -> bool:
        return self.node is None

    @property
    def key(self) -> tuple[str, int, str, int]:
        # RFC 7143 4.4.3: a session is its initiator port and target portal
        # group (the same ISID through another portal group is another session)
        return (self.initiator.lower(), self.isid, self.node.name.lower() if self.node else "",
                self.nexus.tpgt if self.nexus is not None else 0)

    def describe(self) -> str:
        if self.nexus is not None:
            return str(self.nexus)
        return f"{self.initiator},i,0x{self.isid:012x}->discovery"


# --------------------------------------------------------------------------
# Tasks waiting for Data-Out


@dataclass(slots=True)
class _Burst:
    offset: int
    length: int
    received: int = 0
    next_datasn: int = 0


@dataclass(slots=True)
class WriteTask:
    itt: int
    lun: int
    lu: LogicalUnitLike | None
    cdb: bytes
    edtl: int
    read: bool
    cmdsn: int
    buf: bytearray
    received: int
    unsolicited_open: bool  # unsolicited Data-Out (TTT=ffffffff) may still come
    unsolicited_datasn: int = 0
    unsolicited_limit: int = 0
    next_offset: int = 0  # next offset an R2T will ask for
    r2tsn: int = 0
    bursts: dict[int, _Burst] = field(default_factory=dict)


class _Ignored(Exception):
    """Stop handling the current PDU; nothing more to send."""


class _Fatal(Exception):
    """The connection must be dropped (ERL 0) after flushing what was queued."""


# Block data transfer commands: opcode -> (CDB length, transfer length offset, size)
_XFER_FIELD: dict[int, tuple[int, int, int]] = {
    ScsiOp.READ_6: (6, 4, 1),
    ScsiOp.WRITE_6: (6, 4, 1),
    ScsiOp.READ_10: (10, 7, 2),
    ScsiOp.WRITE_10: (10, 7, 2),
    ScsiOp.WRITE_AND_VERIFY_10: (10, 7, 2),
    ScsiOp.READ_12: (12, 6, 4),
    ScsiOp.WRITE_12: (12, 6, 4),
    ScsiOp.WRITE_AND_VERIFY_12: (12, 6, 4),
    ScsiOp.READ_16: (16, 10, 4),
    ScsiOp.WRITE_16: (16, 10, 4),
    ScsiOp.WRITE_AND_VERIFY_16: (16, 10, 4),
    ScsiOp.WRITE_ATOMIC_16: (16, 12, 2),
}
# Writes that must not be cut to the blocks an overflowing EDTL carries: a
# shorter WRITE ATOMIC would be another atomic write; the LU refuses the
# short Data-Out instead, with nothing written.
_WHOLE_ONLY = frozenset({ScsiOp.WRITE_ATOMIC_16})
_MAX_RESIDUAL = 0xFFFFFFFF


def fit_write(
    cdb: bytes, data: Any, edtl: int, block_size: int
) -> tuple[bytes | None, Any, int, int] | None:
    """A block WRITE whose EDTL is not its CDB's transfer length, as the
    target runs it (RFC 7143 / SAM-5 residuals: write what both lengths
    allow): (CDB, data-out, response flags, residual), the CDB None when
    nothing is to be written (a WRITE(6) of no whole block: GOOD); None when
    the lengths agree or the command is not a block write. An EDTL beyond
    the transfer length writes the transfer length (underflow); a shorter
    one writes its whole blocks, with the CDB's length cut to them
    (overflow), except WRITE ATOMIC, which the LU refuses whole."""
    xfer = scsi_transfer(cdb, block_size)
    if xfer is None:
        return None
    scsi_len, blocks, off, size = xfer
    if edtl > scsi_len:
        return cdb, memoryview(data)[:scsi_len], ResponseFlags.UNDERFLOW, edtl - scsi_len
    if edtl == scsi_len:
        return None
    # the Residual Count field is 32 bits: a transfer length of up to
    # 2^32 blocks overflows it, and saturates
    over = min(scsi_len - edtl, _MAX_RESIDUAL)
    if cdb[0] in _WHOLE_ONLY:
        return cdb, data, ResponseFlags.OVERFLOW, over
    bs = scsi_len // blocks
    keep = edtl // bs
    if keep == 0 and size == 1:
        return None, data, ResponseFlags.OVERFLOW, over
    c = bytearray(cdb)
    c[off : off + size] = keep.to_bytes(size, "big")
    return bytes(c), memoryview(data)[: keep * bs], ResponseFlags.OVERFLOW, over


def scsi_transfer(cdb: bytes, block_size: int) -> tuple[int, int, int, int] | None:
    """(bytes the CDB transfers, blocks, field offset, field size) for block
    READ/WRITE commands; None for others."""
    spec = _XFER_FIELD.get(cdb[0]) if cdb else None
    if spec is None or len(cdb) < spec[0]:
        return None
    _, off, size = spec
    blocks = int.from_bytes(cdb[off : off + size], "big")
    if size == 1 and blocks == 0:
        blocks = 256  # SBC-4: READ(6)/WRITE(6) length 0 means 256 blocks
    return blocks * block_size, blocks, off, size


def _inquiry_no_lun(cdb: bytes) -> bytes:
    # SPC-5 6.7.2: peripheral qualifier 011b, device type 1Fh: no LU here.
    alloc = int.from_bytes(cdb[3:5], "big") if len(cdb) >= 5 else 36
    data = bytes((0x7F, 0, 6, 0x02, 31)) + bytes(3) + b"PRMIGRAT" + b"NO LUN".ljust(16) + b"0001"
    return data[:alloc]


# --------------------------------------------------------------------------
# The connection


@dataclass(eq=False)
class PortalGroup:
    """A target portal group: its tag, the relative target port identifier of
    the target port it is, and the addresses its portals are bound to."""

    tpgt: int
    rel_port: int
    portals: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.tpgt <= 0xFFFF:  # RFC 7143 13.9: 16 bits
            raise ValueError(f"portal group tag {self.tpgt} is not 0..65535")
        if not 0 < self.rel_port <= 0xFFFF:  # SPC-5 4.3.2: 0 is reserved
            raise ValueError(f"relative target port {self.rel_port} is not 1..65535")

    def addresses(self, local_host: str) -> list[tuple[str, int]]:
        """The portals to advertise; a wildcard address becomes ``local_host``
        (the address the asking connection reached)."""
        out: list[tuple[str, int]] = []
        for h, p in self.portals:
            a = (local_host if h in ("0.0.0.0", "::", "") else h, p)
            if a not in out:
                out.append(a)
        return out


class ConnectionOwner(Protocol):
    """What a target connection needs of the target that owns it: the
    node registry, the session table (RFC 7143 6.3.5 reinstatement), the
    per-LU counters and clock of the metrics, and the resets that reach every connection (``iscsi/target.py`` implements it;
    this module imports nothing of it)."""

    settings: TargetSettings
    max_task_bytes: int  # the largest EDTL a command may announce
    nodes: dict[str, TargetNode]  # lower-cased name -> node (SendTargets)
    portal_groups: dict[int, PortalGroup]  # by tag (SendTargets lists every portal)
    clock_ns: Callable[[], int]  # the clock commands are timed with (metrics)

    def node(self, name: str) -> TargetNode | None:
        ...

    def counters_for(self, node_name: str, lun: int) -> LuCounters:
        """The counters of one logical unit (``counters.py``), shared by
        every connection to it."""
        ...

    def register_session(self, session: Session) -> bool:
        """Add a session at the end of its login; True when it reinstates one."""
        ...

    def connection_closed(self, conn: Connection) -> None:
        ...

    def abort_lu(self, lu: LogicalUnitLike, nexuses: set[Nexus] | None) -> None:
        """Abort the tasks of ``lu`` on every connection (of ``nexuses``)."""
        ...

    def cold_reset(self, node: TargetNode) -> None:
        """TARGET COLD RESET: every session of ``node`` ends after its answer."""
        ...


class Connection:
    """One TCP connection: login, then full feature phase.

    ``send(parts)`` writes the concatenation of ``parts`` (one write per batch);
    ``close()`` ends the transport. ``target`` is the registry of nodes and
    sessions, seen through ``ConnectionOwner`` (``target.py``'s
    ``IscsiTarget`` implements it).
    """

    LOGIN, FULL_FEATURE, CLOSED = 0, 1, 2

    def __init__(
        self,
        target: ConnectionOwner,
        peer: str,
        local_address: tuple[str, int] | None,
        send: Callable[[list[Any]], None],
        close: Callable[[], None],
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.target = target
        # ``defer(fn)`` runs ``fn`` once the current loop turn is done (the
        # shell passes ``loop.call_soon``): LU futures completed in one turn
        # are answered with one write. Without it each completion is sent at once.
        self._defer = defer
        self._flush_deferred = False
        self.settings: TargetSettings = target.settings
        self.peer = peer
        self.local_address = local_address
        self._send = send
        self._close_transport = close
        self.reader = PduReader(max_data_length=8192)  # RFC 7143 6.1: login text <= 8192 per PDU
        self.state = Connection.LOGIN
        self.out: list[Any] = []
        self.session: Session | None = None
        self.node: TargetNode | None = None
        self.nexus: Nexus | None = None
        self.luns: dict[int, LogicalUnitLike] = {}
        self.params = SessionParams()
        self.statsn = 0
        self.exp_cmdsn = 0
        self.window = self.settings.cmd_window
        self._max_adv = 0xFFFFFFFF  # highest MaxCmdSN advertised so far
        self.hd = False
        self.dd = False
        self.log = SessionLog(log, {"session": peer})
        self.tasks: dict[int, WriteTask] = {}  # write commands waiting for data
        self.pending: dict[int, tuple[Any, LogicalUnitLike]] = {}  # itt -> (future or marker, LU)
        self.queued: dict[int, RawPdu] = {}  # cmdsn -> command waiting for a gap
        self._ttt = 0
        self._text_rest: dict[int, bytes] = {}
        self._in_batch = False
        self._close_after_flush = False
        self._nop_ttt: int | None = None
        self._failed_itts: set[int] = set()
        self._skip_cmdsn: set[int] = set()
        self._cold = False  # ended by TARGET COLD RESET: the LUs were reset already
        self._fast_lu: LogicalUnitLike | None = None  # last LU the read fast path met
        self._fast_fn: Callable[..., Any] | None = None  # its read_fast, if any
        self._fast_relay: Callable[..., bool] | None = None  # its relay_read, if any
        self._fast_wrelay: Callable[..., bool] | None = None  # its relay_write, if any
        self._fast_wfast: Callable[..., bool] | None = None  # its write_fast, if any
        self._contracts: dict[int, tuple[object, LuContracts]] = {}  # id(LU) -> its optional contracts
        # metrics (counters.py): the shell's clock (ns), when the current
        # batch came, the counters of each LUN met, the answers of this batch
        # (latency taken once it is written), pending commands' records
        self._now: Callable[[], int] = target.clock_ns
        self._t_in = 0
        self._lu_counters: dict[int, LuCounters] = {}
        self._fast_counters: LuCounters | None = None  # the counters of _fast_lu
        self._batch: list[LuCounters] = []  # counters with answers of this batch (LuCounters.batch)
        self._late: dict[int, tuple[LuCounters, int, int, int]] = {}  # itt -> (counters, kind, t, PR action)
        # login state
        self._stages = LoginStages()
        self._text = TextAccumulator()
        self._text_in = TextAccumulator()
        self._neg: Negotiation | None = None
        self._login_first: LoginRequest | None = None
        self._chap: ChapAuthenticator | None = None
        self._auth_required = False
        self._auth_done = False
        self._discovery = False
        self._initiator = ""
        self._sent_tpgt = False
        self.portal_group: PortalGroup | None = None  # the portal's group (set by the shell)
        self.handlers: dict[int, Callable[[RawPdu], None]] = {
            Opcode.SCSI_COMMAND: self._scsi_command,
            Opcode.DATA_OUT: self._data_out,
            Opcode.NOP_OUT: self._nop_out,
            Opcode.TASK_MGMT_REQUEST: self._task_mgmt,
            Opcode.TEXT_REQUEST: self._text_request,
            Opcode.LOGOUT_REQUEST: self._logout,
            Opcode.SNACK_REQUEST: self._snack,
            Opcode.LOGIN_REQUEST: self._login_in_ffp,
        }
        # opcodes that carry a CmdSN subject to ordering
        self._sequenced = frozenset(
            {Opcode.SCSI_COMMAND, Opcode.NOP_OUT, Opcode.TASK_MGMT_REQUEST, Opcode.TEXT_REQUEST,
             Opcode.LOGOUT_REQUEST}
        )

    # ------------------------------------------------------------ plumbing
    @property
    def max_cmdsn(self) -> int:
        """MaxCmdSN to advertise now (sampled when a response is built).

        The window shrinks by the commands still outstanding (waiting for
        Data-Out or for an LU future), so a slow backend throttles the
        initiator; an advertised MaxCmdSN never moves back (RFC 7143 4.2.2.1).
        """
        want = (self.exp_cmdsn + self.window - 1 - len(self.pending) - len(self.tasks)) & 0xFFFFFFFF
        if sn_diff(want, self._max_adv) > 0:
            self._max_adv = want
        return self._max_adv

    @property
    def closed(self) -> bool:
        return self.state == Connection.CLOSED

    @property
    def ended_by_reset(self) -> bool:
        """Ended by TARGET COLD RESET: its LUs were reset already, so the
        end of its session is not a nexus loss for them."""
        return self._cold

    def end_after_answers(self) -> None:
        """TARGET COLD RESET of the connection's node (RFC 7143 11.5.1):
        the connection closes once what is queued has been sent."""
        self._cold = True
        self._close_after_flush = True
        if not self._in_batch:
            self.flush()

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _emit(self, bhs: bytes, data: Any = b"") -> None:
        """Queue one PDU (BHS already carries DataSegmentLength)."""
        frame_into(self.out, bhs, data, self.hd, self.dd)

    def _emit_pdu(self, pdu: Any) -> None:
        wire = pdu.encode()
        data = pdu.data if hasattr(pdu, "data") else b""
        self._emit(wire[:48], data)

    def flush(self) -> None:
        if self.out and self.state != Connection.CLOSED:
            out, self.out = self.out, []
            self._send(out)
        else:
            self.out = []
        if self._close_after_flush:
            self.close()

    def data_received(self, data: bytes | memoryview) -> None:
        if self.state == Connection.CLOSED:
            return
        reader = self.reader
        reader.feed(data)
        if reader.missing():
            # the PDU at the head is not whole (libiscsi sends a write's BHS
            # and its data in two system calls, so a read often ends between
            # them): nothing can be taken before the rest comes
            if self.out or self._close_after_flush:
                self.flush()
            return
        self._in_batch = True
        self._t_in = self._now()
        try:
            while self.state != Connection.CLOSED and not self._close_after_flush:
                if self.state == Connection.FULL_FEATURE and not self.queued and not self._skip_cmdsn:
                    self._fast_reads()
                try:
                    raw = reader.next_pdu()
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    continue
                if raw is None:
                    break
                try:
                    self._dispatch(raw)
                except ProtocolError as exc:
                    if exc.header is None:
                        exc.header = raw.bhs
                    self._protocol_error(exc)
                except _Ignored:
                    pass
                except _Fatal:
                    self._close_after_flush = True
                except Exception:  # never let one bad PDU take down the server
                    self.log.exception("internal error on PDU %s", raw.bhs[:8].hex())
                    self._close_after_flush = True
        finally:
            self._in_batch = False
        self.flush()
        batch = self._batch
        if batch:  # the answers of this batch are written: their latency is now
            ns = self._now() - self._t_in
            for c in batch:
                c.close_batch(ns)
            batch.clear()
        if len(self._late) > 256:
            self._prune_late()

    # ------------------------------------------------------------ metrics
    def _counters_of(self, lun: int) -> LuCounters:
        c = self._lu_counters.get(lun)
        if c is None:
            node = self.node.name if self.node is not None else ""
            c = self._lu_counters[lun] = self.target.counters_for(node, lun)
        return c

    def _prune_late(self) -> None:
        if len(self._late) > len(self.pending) + 256:  # records of aborted tasks
            self._late = {itt: r for itt, r in self._late.items() if itt in self.pending}

    def _count_fast(self, c: LuCounters | None, kind: int, n: int, nbytes: int, good: int) -> None:
        """What ``_fast_reads`` took for one LU: ``n`` reads or writes
        (``kind``), ``good`` of them answered."""
        if c is not None and n:
            c.commands[kind] += n
            c.bytes[kind] += nbytes
            if good:
                c.batch[kind] += good
                if not c.in_batch:
                    c.in_batch = True
                    self._batch.append(c)

    def _answered_now(self, c: LuCounters, kind: int, status: int, sense: Any, cdb: bytes) -> None:
        """A command of this batch answered at once: its latency when the batch is written."""
        c.batch[kind] += 1
        if not c.in_batch:
            c.in_batch = True
            self._batch.append(c)
        if status or (cdb and cdb[0] == 0x5F):
            c.answered(status, sense, pr_action_of(cdb))

    def _late_answered(self, itt: int, status: int, sense: Any) -> None:
        rec = self._late.pop(itt, None)
        if rec is not None:
            c, kind, t, pr_action = rec
            ns = self._now() - t
            c.latency[kind][latency_bucket(ns)] += 1
            c.latency_ns[kind] += ns
            if status or pr_action >= 0:
                c.answered(status, sense, pr_action)

    def _fast_reads(self) -> None:
        """Answer the READ(10)/READ(16) commands at the head of the buffer.

        The read fast path: each BHS is parsed in place (no RawPdu, Result or
        dispatch) and answered with one Data-In carrying the status. It only
        takes what the general path would answer the same way: a non-immediate
        SCSI Command with F and R set, W clear, no AHS and no data, CmdSN equal
        to ExpCmdSN, a correct header digest, and an LU whose ``read_fast``
        returns the data (no UA, no possible conflict, no sense; see
        ``LogicalUnit.read_fast``). Anything else stops the run and the PDU
        goes through ``next_pdu``/``_dispatch`` untouched. A read whose length
        differs from the EDTL or exceeds one Data-In is answered by
        ``_respond`` (residuals, sequences). Such a command for an LU without
        ``read_fast`` goes straight to ``_execute``, as ``_scsi_command``
        would send it. A WRITE with F and W set whose data all came as
        immediate data (ImmediateData, within FirstBurstLength, digests
        checked) is handed to the LU's ``relay_write`` when it has one, else
        written by its ``write_fast`` and answered with a SCSI Response GOOD
        (what ``_respond`` sends for it); not taken, it stops the run for
        the general path."""
        reader = self.reader
        buf, pos = reader.window()
        end = len(buf)
        hd = self.hd
        hlen = 52 if hd else 48
        if end - pos < hlen:
            return
        luns = self.luns
        nexus = self.nexus
        exp = self.exp_cmdsn
        adv = self._max_adv
        base = self.window - 1 - len(self.pending) - len(self.tasks)
        params = self.params
        limit = min(params.max_xmit_data_segment_length, params.max_burst_length)
        failed = self._failed_itts
        out = self.out
        dd = self.dd
        unpack = SCSI_COMMAND.unpack_from
        pack = _HDR_U32.pack
        frame = frame_into
        last_lu = self._fast_lu
        fn = self._fast_fn
        relay = self._fast_relay
        wrelay = self._fast_wrelay
        wfast = self._fast_wfast
        # a write may come whole as immediate data (what _scsi_command checks)
        imm = min(params.first_burst_length, reader.max_data_length) if params.immediate_data else 0
        ddlen = 4 if dd else 0
        statsn = self.statsn
        fc = self._fast_counters
        late = self._late
        t_in = self._t_in
        # counted into fc at the end or when the LU changes (_count_fast)
        nread = nbytes = ngood = nwrite = nwbytes = nwgood = 0
        try:
            while end - pos >= hlen and buf[pos] == 0x01:
                b1 = buf[pos + 1] & 0xE0
                if b1 != 0xC0 and b1 != 0xA0:
                    break
                _, _, _, word, lunf, itt, edtl, cmdsn, _, cdb = unpack(buf, pos)
                if cmdsn != exp:
                    break
                if b1 == 0xA0:
                    # a WRITE with all its data immediate (F, W; no AHS:
                    # the word is the data length, the EDTL)
                    if word != edtl or not edtl or edtl > imm:
                        break
                    plen = edtl + (-edtl & 3)
                    total = hlen + plen + ddlen
                    if end - pos < total:
                        break
                elif word:
                    break
                if hd and digest_bytes(bytes(buf[pos : pos + 48])) != buf[pos + 48 : pos + 52]:
                    break
                lun = (lunf >> 48) & 0xFF if not lunf & 0xFF00FFFFFFFFFFFF else decode_lun(lunf)
                lu = luns.get(lun)
                if lu is not last_lu:
                    if nread:
                        self._count_fast(fc, READ, nread, nbytes, ngood)
                        nread = nbytes = ngood = 0
                    if nwrite:
                        self._count_fast(fc, WRITE, nwrite, nwbytes, nwgood)
                        nwrite = nwbytes = nwgood = 0
                    last_lu = self._fast_lu = lu
                    contracts = self._contracts_of(lu)
                    fn = self._fast_fn = contracts.read_fast
                    relay = self._fast_relay = contracts.relay_read
                    wrelay = self._fast_wrelay = contracts.relay_write
                    wfast = self._fast_wfast = contracts.write_fast
                    fc = self._fast_counters = None if lu is None else self._counters_of(lun)
                if b1 == 0xA0:
                    if wrelay is None and wfast is None:
                        break
                    if wrelay is not None and (itt in self.pending or itt in self.tasks):
                        break
                    at = pos + hlen
                    seg: bytes | None = None
                    if dd:
                        seg = bytes(buf[at : at + plen])
                        if digest_bytes(seg) != buf[at + plen : at + plen + 4]:
                            break  # the general path rejects it
                    if wrelay is None:
                        # written before the buffer moves
                        view = memoryview(buf)[at : at + edtl] if seg is None else memoryview(seg)[:edtl]
                        try:
                            ok = wfast(nexus, cdb, view)  # type: ignore[misc]  # not None: checked above
                        except Exception:  # the general path runs it again and answers
                            ok = False
                        finally:
                            view.release()
                        if not ok:
                            break
                        pos += total
                        exp = (exp + 1) & 0xFFFFFFFF
                        if failed:
                            failed.discard(itt)
                        nwrite += 1
                        nwbytes += edtl
                        nwgood += 1
                        # the SCSI Response GOOD of _respond, MaxCmdSN as the reads'
                        mx = (exp + base) & 0xFFFFFFFF
                        d = (mx - adv) & 0xFFFFFFFF
                        if d and d < _HALF:
                            adv = mx
                        bhs = pack(0x21, 0x80, 0, 0, 0, itt, 0, statsn, exp, adv, 0, 0, 0)
                        statsn = (statsn + 1) & 0xFFFFFFFF
                        if hd:
                            frame(out, bhs, b"", hd, dd)
                        else:
                            out.append(bhs)
                        continue
                    wdata: bytes | bytearray
                    if seg is not None:
                        wdata = seg if plen == edtl else seg[:edtl]
                    else:
                        wdata = buf[at : at + edtl]  # a copy, the backend session's (submit_relay)
                    if not wrelay(nexus, cdb, wdata, self, wtoken := (itt, edtl, True)):
                        break  # the general path runs it (execute_then)
                    # forwarded as is: answered by relay_data/relay_result
                    self.pending[itt] = (wtoken, lu)  # type: ignore[assignment]  # lu: wrelay is its
                    late[itt] = (fc, WRITE, t_in, -1)  # type: ignore[assignment]  # fc: lu is set
                    nwrite += 1
                    nwbytes += edtl
                    pos += total
                    exp = (exp + 1) & 0xFFFFFFFF
                    if failed:
                        failed.discard(itt)
                    base -= 1
                    continue
                if fn is None:
                    if lu is None:
                        break
                    if (
                        relay is not None and edtl and edtl <= limit and cdb[0] in _RELAYED
                        and relay(nexus, cdb, edtl, self, token := (itt, edtl))
                    ):
                        # forwarded as is (the passthrough device): answered
                        # by relay_data/relay_result, no Result in between
                        self.pending[itt] = (token, lu)
                        late[itt] = (fc, READ, t_in, -1)  # type: ignore[assignment]  # fc: lu is set
                        nread += 1
                        nbytes += edtl
                        pos += hlen
                        exp = (exp + 1) & 0xFFFFFFFF
                        if failed:
                            failed.discard(itt)
                        base -= 1
                        continue
                    # an LU without read_fast (e.g. the passthrough device):
                    # what _scsi_command does for this PDU, without RawPdu
                    pos += hlen
                    exp = (exp + 1) & 0xFFFFFFFF
                    if failed:
                        failed.discard(itt)
                    self.exp_cmdsn, self._max_adv, self.statsn = exp, adv, statsn
                    try:
                        self._execute(itt, lun, lu, cdb, b"", edtl, False)
                    except Exception:  # as data_received: never let one PDU take down the server
                        self.log.exception("internal error on PDU %s", bytes(buf[pos - hlen : pos - hlen + 8]).hex())
                        self._close_after_flush = True
                        break
                    adv, statsn = self._max_adv, self.statsn
                    base = self.window - 1 - len(self.pending) - len(self.tasks)
                    if self.state != Connection.FULL_FEATURE or self._close_after_flush:
                        break  # the LU ended the connection: as data_received's loop
                    continue
                try:
                    data = fn(nexus, cdb)
                except Exception:  # the general path runs it again and answers
                    break
                if data is None:
                    break
                pos += hlen
                exp = (exp + 1) & 0xFFFFFFFF
                if failed:
                    failed.discard(itt)
                nread += 1
                nbytes += edtl
                ngood += 1
                n = len(data)
                if n != edtl or n > limit or not n:
                    self.exp_cmdsn, self._max_adv, self.statsn = exp, adv, statsn
                    self._respond(itt, Result(_GOOD, data), edtl, 0, 0, False)
                    adv, statsn = self._max_adv, self.statsn
                    continue
                # MaxCmdSN: ExpCmdSN + window - 1 - outstanding, never moved back
                mx = (exp + base) & 0xFFFFFFFF
                d = (mx - adv) & 0xFFFFFFFF
                if d and d < _HALF:
                    adv = mx
                bhs = pack(0x25, 0x81, 0, n, 0, itt, 0xFFFFFFFF, statsn, exp, adv, 0, 0, 0)
                statsn = (statsn + 1) & 0xFFFFFFFF
                frame(out, bhs, data, hd, dd)
        finally:
            self.exp_cmdsn, self._max_adv, self.statsn = exp, adv, statsn
            reader.consumed(pos)
            if nread and fc is not None:  # _count_fast, inline
                fc.commands[READ] += nread
                fc.bytes[READ] += nbytes
                if ngood:
                    fc.batch[READ] += ngood
                    if not fc.in_batch:
                        fc.in_batch = True
                        self._batch.append(fc)
            if nwrite:
                self._count_fast(fc, WRITE, nwrite, nwbytes, nwgood)

    def _protocol_error(self, exc: ProtocolError) -> None:
        hdr = exc.header or b""
        self.log.warning("rejected PDU (%s, reason %s): %s", hdr[:8].hex(), exc.reason.name, exc)
        if self.state == Connection.FULL_FEATURE and hdr:
            self._reject(exc.reason, hdr)
        if exc.fatal or self.state == Connection.LOGIN:
            self._close_after_flush = True

    def _reject(self, reason: RejectReason, header: bytes, datasn: int = 0) -> None:
        bhs = _HDR_U32.pack(
            Opcode.REJECT, 0x80, reason << 8, 48, 0, RESERVED_TAG, 0, self._next_statsn(),
            self.exp_cmdsn, self.max_cmdsn, datasn, 0, 0,
        )
        self._emit(bhs, bytes(header[:48]))

    def _dispatch(self, raw: RawPdu) -> None:
        if self.state == Connection.LOGIN:
            if raw.opcode != Opcode.LOGIN_REQUEST:
                self.log.warning("opcode 0x%02x before login completed: closing", raw.opcode)
                raise _Fatal()
            self._login(raw)
            return
        op = raw.opcode
        handler = self.handlers.get(op)
        if handler is None:
            raise ProtocolError(RejectReason.COMMAND_NOT_SUPPORTED, f"opcode 0x{op:02x}", raw.bhs)
        if op in self._sequenced and not (raw.bhs[0] & 0x40):
            cmdsn = int.from_bytes(raw.bhs[24:28], "big")
            if cmdsn != self.exp_cmdsn:
                d = sn_diff(cmdsn, self.exp_cmdsn)
                if 0 < d <= sn_diff(self._max_adv, self.exp_cmdsn):
                    self.queued[cmdsn] = raw  # wait for the gap (RFC 7143 4.2.2.1)
                else:
                    self.log.debug("CmdSN %d outside [%d, %d]: dropped", cmdsn, self.exp_cmdsn, self._max_adv)
                return
            self.exp_cmdsn = (self.exp_cmdsn + 1) & 0xFFFFFFFF
            if self._skip_cmdsn and cmdsn in self._skip_cmdsn:
                self._skip_cmdsn.discard(cmdsn)  # aborted before it arrived
            else:
                handler(raw)
            while self.queued and self.exp_cmdsn in self.queued and self.state == Connection.FULL_FEATURE:
                nxt = self.queued.pop(self.exp_cmdsn)
                self.exp_cmdsn = (self.exp_cmdsn + 1) & 0xFFFFFFFF
                self.handlers[nxt.opcode](nxt)
            return
        handler(raw)

    def close(self) -> None:
        """End the connection; a session that ends with it loses its nexus."""
        if self.state == Connection.CLOSED:
            return
        if self.out:
            out, self.out = self.out, []
            self._send(out)
        self.state = Connection.CLOSED
        self.tasks.clear()
        self.pending.clear()
        self.queued.clear()
        self._close_transport()
        self.target.connection_closed(self)

    def connection_lost(self) -> None:
        if self.state != Connection.CLOSED:
            self.state = Connection.CLOSED
            self.tasks.clear()
            self.pending.clear()
            self.target.connection_closed(self)

    # ------------------------------------------------------------ login
    def _login(self, raw: RawPdu) -> None:
        req = LoginRequest.decode(raw)
        first = self._login_first is None
        if first:
            self._login_first = req
            self.statsn = req.exp_statsn
            self.exp_cmdsn = req.cmdsn
            self._max_adv = (req.cmdsn - 1) & 0xFFFFFFFF
        try:
            self._login_step(req, first)
        except LoginError as exc:
            self._login_reject(req, exc.status, str(exc))

    def _login_reject(self, req: LoginRequest, status: LoginStatus, why: str, keys: bytes = b"") -> None:
        rsp = LoginResponse(
            isid=req.isid, tsih=0, itt=req.itt, statsn=self._next_statsn(), expcmdsn=self.exp_cmdsn,
            maxcmdsn=self.exp_cmdsn, csg=0, nsg=0, transit=False, status=status, data=keys,
        )
        self._emit_pdu(rsp)
        level = logging.INFO if status >> 8 == 1 else logging.WARNING
        self.log.log(level, "login of %s (isid 0x%012x) refused: %s (0x%04x) %s",
                     self._initiator or "?", req.isid, status.name, status, why)
        self._close_after_flush = True

    def _login_step(self, req: LoginRequest, first: bool) -> None:
        f = self._login_first
        assert f is not None
        if req.version_min > 0:
            raise LoginError(LoginStatus.UNSUPPORTED_VERSION, f"version {req.version_min}")
        if not first and (req.isid != f.isid or req.tsih != f.tsih or req.cid != f.cid or req.itt != f.itt):
            raise LoginError(LoginStatus.INITIATOR_ERROR, "ISID/TSIH/CID/ITT changed during login")
        self._stages.request(req.csg, req.nsg, req.transit, req.cont)
        pairs = self._text.add(req.data, req.cont)
        if pairs is None:  # more text to come (C bit): acknowledge with an empty response
            self._login_respond(req, Stage(req.csg), Stage(req.csg), False, b"", cont=False)
            return
        keys = dict(pairs)
        self.log.debug("login CSG %d keys %s", req.csg, [(k, v) for k, v in pairs if not k.startswith("CHAP_")])
        answer: list[tuple[str, str]] = []
        if self._neg is None:
            self._login_declarations(req, keys)
            if self.node is not None and self.node.redirect is not None:
                host, port, tpgt = self.node.redirect
                addr = f"[{host}]" if ":" in host else host
                self._login_reject(req, LoginStatus.TARGET_MOVED_TEMPORARILY, "redirected",
                                   encode_text([("TargetAddress", f"{addr}:{port},{tpgt}")]))
                return
        neg = self._neg
        assert neg is not None
        stage = Stage(req.csg)
        if stage is Stage.OPERATIONAL and self._auth_required and not self._auth_done:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "authentication required")
        answer += neg.receive(pairs, stage)
        if stage is Stage.SECURITY:
            answer += self._security(keys)
        if not self._sent_tpgt and not self._discovery and self.node is not None:
            answer.append(("TargetPortalGroupTag", str(self._target_port(self.node)[0])))
            if self.node.alias:
                answer.append(("TargetAlias", self.node.alias))
            self._sent_tpgt = True
        agree = req.transit
        if stage is Stage.SECURITY and req.transit and not self._auth_done:
            if self._chap is not None:
                agree = False  # the CHAP exchange is still running
            else:
                raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "no acceptable AuthMethod")
        if agree and req.nsg == Stage.FULL_FEATURE and neg.pending:
            agree = False
        csg, nsg, transit = self._stages.respond(agree)
        if transit and nsg is Stage.FULL_FEATURE:
            self._login_complete(req, neg, encode_text(answer))
            return
        self._login_respond(req, csg, nsg, transit, encode_text(answer))

    def _login_respond(
        self, req: LoginRequest, csg: Stage, nsg: Stage, transit: bool, data: bytes, cont: bool = False,
        tsih: int = 0,
    ) -> None:
        rsp = LoginResponse(
            isid=req.isid, tsih=tsih, itt=req.itt, statsn=self._next_statsn(), expcmdsn=self.exp_cmdsn,
            maxcmdsn=self.max_cmdsn, csg=csg, nsg=nsg, transit=transit, cont=cont, data=data,
        )
        self._emit_pdu(rsp)

    def _login_declarations(self, req: LoginRequest, keys: dict[str, str]) -> None:
        initiator = keys.get("InitiatorName")
        if not initiator:
            raise LoginError(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
        self._initiator = initiator
        self.log = SessionLog(log, {"session": f"{initiator},i,0x{req.isid:012x} from {self.peer}"})
        stype = keys.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"SessionType {stype}")
        self._discovery = stype == "Discovery"
        if req.tsih != 0:
            raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, "adding connections is not supported")
        local = self.settings.local_keys()
        if self._discovery:
            auth = ("None",)
        else:
            name = keys.get("TargetName")
            if not name:
                raise LoginError(LoginStatus.MISSING_PARAMETER, "TargetName missing")
            node = self.target.node(name)
            if node is None:
                raise LoginError(LoginStatus.NOT_FOUND, f"no target {name}")
            self.node = node
            if node.redirect is not None:
                self._neg = Negotiation(Role.TARGET, local)
                return
            if not node.allows(initiator):
                raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, f"{initiator} not in the ACL of {node.name}")
            if node.chap is not None:
                self._auth_required = True
                self._chap = node.chap.authenticator()
                auth = ("CHAP",)
            else:
                auth = ("None",)
        local["AuthMethod"] = auth
        self._neg = Negotiation(Role.TARGET, local)
        if req.csg == Stage.OPERATIONAL and not self._auth_required:
            self._auth_done = True

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        neg = self._neg
        assert neg is not None
        method = neg.results.get("AuthMethod")
        if method == "None" or (method is None and "AuthMethod" not in neg.results and not self._auth_required
                                and not any(k.startswith("CHAP_") for k in keys)):
            if not self._auth_required:
                self._auth_done = True
            return []
        if method == "CHAP" and self._chap is not None:
            chap_keys = {k: v for k, v in keys.items() if k.startswith("CHAP_")}
            if not chap_keys:
                return []
            out = self._chap.step(chap_keys)
            if self._chap.done:
                self._auth_done = True
                self.log.info("CHAP authenticated as %s", self._chap.user)
            return out
        if self._auth_required:
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
        return []

    def _login_complete(self, req: LoginRequest, neg: Negotiation, text: bytes) -> None:
        params = neg.params()
        self.params = params
        node = self.node
        nexus = None
        if node is not None:
            nexus = Nexus.make(self._initiator, req.isid, node.name, *self._target_port(node))
            self.luns = node.luns
        self.nexus = nexus
        session = Session(0, self._initiator, req.isid, node, nexus, params, self, self.exp_cmdsn, self.window)
        reinstated = self.target.register_session(session)
        self.session = session
        self._login_respond(req, Stage.OPERATIONAL if req.csg == Stage.OPERATIONAL else Stage.SECURITY,
                            Stage.FULL_FEATURE, True, text, tsih=session.tsih)
        self.state = Connection.FULL_FEATURE
        # digests and our MaxRecvDataSegmentLength apply from the next PDU on
        self.hd, self.dd = params.header_digest, params.data_digest
        self.reader.header_digest = self.hd
        self.reader.data_digest = self.dd
        self.reader.max_data_length = params.max_recv_data_segment_length
        self.log.info(
            "login %s session tsih %d%s (hd=%s dd=%s mrdsl=%d/%d burst=%d first=%d r2t=%s imm=%s)",
            "discovery" if node is None else f"to {node.name}", session.tsih,
            " (reinstated)" if reinstated else "", params.header_digest, params.data_digest,
            params.max_recv_data_segment_length, params.max_xmit_data_segment_length,
            params.max_burst_length, params.first_burst_length, params.initial_r2t, params.immediate_data,
        )

    def _target_port(self, node: TargetNode) -> tuple[int, int]:
        """(portal group tag, relative target port) of this connection's portal."""
        group = self.portal_group
        return (node.tpgt, 1) if group is None else (group.tpgt, group.rel_port)

    def _login_in_ffp(self, raw: RawPdu) -> None:
        raise ProtocolError(RejectReason.PROTOCOL_ERROR, "Login Request in full feature phase", raw.bhs)

    # ------------------------------------------------------------ SCSI
    def _scsi_command(self, raw: RawPdu) -> None:
        _, b1, _, _, lunf, itt, edtl, cmdsn, _, cdb = SCSI_COMMAND.unpack_from(raw.bhs)
        if self.node is None:
            raise ProtocolError(RejectReason.PROTOCOL_ERROR, "SCSI command in a discovery session", raw.bhs)
        if raw.ahs:
            for a in Ahs.decode_all(raw.ahs):
                if a.type == AhsType.EXTENDED_CDB:
                    cdb += a.data
        # single-level peripheral addressing (the common case) decoded inline
        lun = (lunf >> 48) & 0xFF if not lunf & 0xFF00FFFFFFFFFFFF else decode_lun(lunf)
        lu = self.luns.get(lun)
        if self._failed_itts:
            self._failed_itts.discard(itt)
        read = bool(b1 & 0x40)
        write = bool(b1 & 0x20)
        data = raw.data
        n = len(data)
        params = self.params
        if n:
            if not write:
                raise ProtocolError(RejectReason.PROTOCOL_ERROR, "immediate data without W bit", raw.bhs)
            if not params.immediate_data:
                raise ProtocolError(RejectReason.PROTOCOL_ERROR, "ImmediateData=No but data sent", raw.bhs)
            if n > edtl or n > params.first_burst_length:
                raise ProtocolError(RejectReason.PROTOCOL_ERROR, "immediate data beyond EDTL/FirstBurst", raw.bhs)
        if write and edtl > n:
            if edtl > self.target.max_task_bytes:
                raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"EDTL {edtl} too large", raw.bhs)
            buf = bytearray(data)  # grows with the Data-Out that comes (place_segment)
            unsolicited = not params.initial_r2t and not (b1 & 0x80)
            task = WriteTask(
                itt, lun, lu, cdb, edtl, read, cmdsn, buf, n, unsolicited,
                unsolicited_limit=min(params.first_burst_length, edtl), next_offset=n,
            )
            if itt in self.tasks or itt in self.pending:
                raise ProtocolError(RejectReason.TASK_IN_PROGRESS, f"ITT 0x{itt:x} in use", raw.bhs)
            self.tasks[itt] = task
            if not unsolicited:
                self._issue_r2ts(task)
            return
        self._execute(itt, lun, lu, cdb, data, edtl, write)

    def _issue_r2ts(self, task: WriteTask) -> None:
        params = self.params
        limit = params.max_outstanding_r2t
        while len(task.bursts) < limit and task.next_offset < task.edtl:
            length = min(params.max_burst_length, task.edtl - task.next_offset)
            self._ttt = ttt = (self._ttt + 1) & 0x7FFFFFFF
            task.bursts[ttt] = _Burst(task.next_offset, length)
            bhs = _HDR_U32.pack(
                Opcode.R2T, 0x80, 0, 0, (task.lun << 48) if task.lun < 256 else ((0x4000 | task.lun) << 48),
                task.itt, ttt, self.statsn, self.exp_cmdsn, self.max_cmdsn, task.r2tsn,
                task.next_offset, length,
            )
            self._emit(bhs)
            task.r2tsn += 1
            task.next_offset += length

    def _data_out(self, raw: RawPdu) -> None:
        _, b1, _, _, _, itt, ttt, _, _, _, datasn, offset, _ = _HDR_U32.unpack_from(raw.bhs)
        task = self.tasks.get(itt)
        if task is None:
            if itt in self._failed_itts:
                return  # rest of a failed or aborted task's data
            # data for a task that never existed
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"Data-Out for unknown ITT 0x{itt:x}", raw.bhs)
        data = raw.data
        n = len(data)
        final = bool(b1 & 0x80)
        if ttt == RESERVED_TAG:
            if not task.unsolicited_open:
                self._data_error(raw, "unsolicited Data-Out not expected")
            if datasn != task.unsolicited_datasn or offset != task.received:
                self._data_error(raw, f"unsolicited DataSN {datasn}/offset {offset} out of order")
            if offset + n > task.unsolicited_limit:
                self._data_error(raw, "unsolicited data beyond FirstBurstLength")
            task.unsolicited_datasn += 1
            place_segment(task.buf, offset, data)
            task.received += n
            if final:
                task.unsolicited_open = False
                task.next_offset = task.received
                if task.received < task.edtl:
                    self._issue_r2ts(task)
        else:
            burst = task.bursts.get(ttt)
            if burst is None:
                self._data_error(raw, f"Data-Out for unknown TTT 0x{ttt:x}")
                return
            if datasn != burst.next_datasn:
                self._data_error(raw, f"DataSN {datasn}, expected {burst.next_datasn}")
            if offset != burst.offset + burst.received:
                self._data_error(raw, f"buffer offset {offset}, expected {burst.offset + burst.received}")
            if burst.received + n > burst.length:
                self._data_error(raw, "more data than the R2T asked for")
            burst.next_datasn += 1
            place_segment(task.buf, offset, data)
            burst.received += n
            task.received += n
            if final:
                if burst.received != burst.length:
                    self._data_error(raw, "final Data-Out before the burst is complete")
                del task.bursts[ttt]
                self._issue_r2ts(task)
        if task.received >= task.edtl and not task.bursts and not task.unsolicited_open:
            del self.tasks[itt]
            self._execute(itt, task.lun, task.lu, task.cdb, task.buf, task.edtl, True)

    def _data_error(self, raw: RawPdu, why: str) -> None:
        # A Data-Out sequence error (DataSN, offset, TTT, length) fails the
        # task: CHECK CONDITION, ABORTED COMMAND / DATA PHASE ERROR; later
        # Data-Out PDUs of the task are ignored. The connection stays up.
        itt = int.from_bytes(raw.bhs[16:20], "big")
        self.log.warning("rejected Data-Out for ITT 0x%x: %s", itt, why)
        task = self.tasks.pop(itt, None)
        self._failed_itts.add(itt)
        if len(self._failed_itts) > 256:
            self._failed_itts.pop()
        if task is not None:
            res = Result(_CHECK, b"", encode_sense(Sense.DATA_PHASE_ERROR))
            self._respond(itt, res, task.edtl, 0, 0, True)
        raise _Ignored()

    def _contracts_of(self, lu: object) -> LuContracts:
        """The optional contracts (``lu.py``) ``lu`` implements, asked once."""
        entry = self._contracts.get(id(lu))
        if entry is None or entry[0] is not lu:
            entry = self._contracts[id(lu)] = (lu, contracts_of(lu))
        return entry[1]

    def _execute(
        self, itt: int, lun: int, lu: LogicalUnitLike | None, cdb: bytes, data: Any, edtl: int, write: bool,
    ) -> None:
        """Run the command on the LU and answer it (now or when its future resolves)."""
        flags = 0
        residual = 0
        c: LuCounters | None = None
        if lu is None:
            op = cdb[0] if cdb else -1
            if op == ScsiOp.INQUIRY:
                res = Result(_GOOD, _inquiry_no_lun(cdb))
            elif op == ScsiOp.REPORT_LUNS and self.luns:
                res = next(iter(self.luns.values())).execute(self.nexus, cdb, data)  # type: ignore[arg-type,assignment]
            else:
                res = Result(_CHECK, b"", encode_sense(Sense.LU_NOT_SUPPORTED))
        else:
            c = self._lu_counters.get(lun) or self._counters_of(lun)
            kind = KIND_OF[cdb[0]] if cdb else OTHER
            c.commands[kind] += 1
            c.bytes[kind] += edtl
            if write:
                fit = fit_write(cdb, data, edtl, getattr(lu, "block_size", 512))
                if fit is not None:
                    fitted, data, flags, residual = fit
                    if fitted is None:
                        self._answered_now(c, kind, _GOOD, None, cdb)
                        self._respond(itt, Result(_GOOD), edtl, flags, residual, True)
                        return
                    cdb = fitted
                else:
                    relay = self._contracts_of(lu).relay_write
                    nexus = self.nexus
                    if (
                        relay is not None and nexus is not None
                        and relay(nexus, cdb, data, self, token := (itt, edtl, True))
                    ):
                        # forwarded as is (the passthrough device): answered by
                        # relay_data/relay_result, no Result in between
                        self.pending[itt] = (token, lu)
                        self._late[itt] = (c, kind, self._t_in, -1)
                        return
            then = self._contracts_of(lu).execute_then
            try:
                if then is not None:
                    # completion by callback, no Future (the passthrough device).
                    # ``mine`` marks this task's entry: a callback naming itself
                    # would be a reference cycle, freed by the GC, not at once.
                    mine = object()

                    def done(r: Any) -> None:
                        entry = self.pending.get(itt)
                        if self.state == Connection.FULL_FEATURE and entry is not None and entry[0] is mine:
                            self._answer(itt, r, edtl, flags, residual, write)

                    self.pending[itt] = (mine, lu)
                    self._late[itt] = (c, kind, self._t_in, pr_action_of(cdb))
                    answer = then(self.nexus, cdb, data, done)  # type: ignore[arg-type]
                    if answer is None:
                        return
                    res = answer
                    self.pending.pop(itt, None)
                else:
                    res = lu.execute(self.nexus, cdb, data)  # type: ignore[arg-type,assignment]
            except Exception:
                self.pending.pop(itt, None)
                self.log.exception("LU %d raised on CDB %s", lun, bytes(cdb[:16]).hex())
                res = Result(_CHECK, b"", encode_sense(Sense.INTERNAL_TARGET_FAILURE))
            if type(res) is not Result and hasattr(res, "add_done_callback"):
                fut = res
                self.pending[itt] = (fut, lu)
                self._late[itt] = (c, kind, self._t_in, pr_action_of(cdb))
                fut.add_done_callback(lambda f: self._completed(itt, f, edtl, flags, residual, write))
                return
            if self._late:
                self._late.pop(itt, None)  # execute_then answered at once
            self._answered_now(c, kind, res.status, res.sense, cdb)  # type: ignore[union-attr]
        self._respond(itt, res, edtl, flags, residual, write)  # type: ignore[arg-type]

    def _completed(self, itt: int, fut: Any, edtl: int, flags: int, residual: int, write: bool) -> None:
        entry = self.pending.get(itt)
        if self.state != Connection.FULL_FEATURE or entry is None or entry[0] is not fut:
            return  # connection gone or task aborted: drop
        try:
            res = fut.result()
        except BaseException as exc:  # noqa: BLE001 - cancelled or failed backend
            res = exc
        self._answer(itt, res, edtl, flags, residual, write)

    def _answer(self, itt: int, res: Any, edtl: int, flags: int, residual: int, write: bool) -> None:
        """An LU's late answer (Result, or the exception its future ended
        with) to the pending task ``itt``."""
        del self.pending[itt]
        if isinstance(res, Result):
            self._late_answered(itt, res.status, res.sense)
        else:
            self._late_answered(itt, _CHECK, None)
        data = res.data_in if type(res) is Result and not write and not flags and not res.sense else None
        n = len(data) if data else 0
        p = self.params
        if (
            n == edtl and n and res.status == _GOOD
            and n <= p.max_xmit_data_segment_length and n <= p.max_burst_length
        ):
            self._data_in_with_status(itt, _GOOD, data)  # type: ignore[arg-type]  # n > 0: data is set
        else:
            if isinstance(res, BaseException):
                self.log.warning("LU result for ITT 0x%x failed: %r", itt, res)
                res = Result(_CHECK, b"", encode_sense(Sense.INTERNAL_TARGET_FAILURE))
            self._respond(itt, res, edtl, flags, residual, write)
        self._late_flush()

    def _data_in_with_status(self, itt: int, status: int, data: bytes | bytearray | memoryview) -> None:
        """Queue the answer of a read that got all its data (EDTL, one
        Data-In's worth): one Data-In with status, as _respond builds it (no
        residual), StatSN and MaxCmdSN (see max_cmdsn) inline."""
        n = len(data)
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        exp = self.exp_cmdsn
        want = (exp + self.window - 1 - len(self.pending) - len(self.tasks)) & 0xFFFFFFFF
        adv = self._max_adv
        d = (want - adv) & 0xFFFFFFFF
        if d and d < _HALF:
            self._max_adv = adv = want
        self._emit(_HDR_U32.pack(Opcode.DATA_IN, 0x81, status, n, 0, itt, RESERVED_TAG, statsn, exp, adv,
                                 0, 0, 0), data)

    def _late_flush(self) -> None:
        """Send what an answer outside a read event of this connection
        queued: at the end of the current read event (another connection's),
        else at once."""
        if not self._in_batch:
            if self._defer is None:
                self.flush()
            elif not self._flush_deferred:
                self._flush_deferred = True
                self._defer(self._deferred_flush)

    # The relay sink (iscsi.initiator_core.RelaySink) of the reads that
    # _fast_reads hands to an LU's relay_read: ``token`` is (ITT, EDTL), the
    # pending entry's marker, so an answer for an aborted task whose ITT was
    # used again is dropped.
    #
    # The writes _execute hands to an LU's relay_write (all their data in,
    # exactly what the CDB asks for) have the token (ITT, EDTL, True).
    def relay_data(self, token: tuple[int, ...], status: int, data: bytearray) -> None:
        """The backend answered the read with one Data-In carrying all the
        data and the status: the guest gets the same, StatSN and window ours.
        A write answered GOOD without sense or residual: a SCSI Response."""
        itt = token[0]
        entry = self.pending.get(itt)
        if entry is None or entry[0] is not token or self.state != Connection.FULL_FEATURE:
            return  # connection gone or task aborted: drop
        del self.pending[itt]
        self._late_answered(itt, status, None)
        if len(token) == 2:
            self._data_in_with_status(itt, status, data)  # data: a copy, queued as is
        else:
            # pack_scsi_response's BHS, StatSN and MaxCmdSN (see max_cmdsn) inline
            statsn = self.statsn
            self.statsn = (statsn + 1) & 0xFFFFFFFF
            exp = self.exp_cmdsn
            want = (exp + self.window - 1 - len(self.pending) - len(self.tasks)) & 0xFFFFFFFF
            adv = self._max_adv
            d = (want - adv) & 0xFFFFFFFF
            if d and d < _HALF:
                self._max_adv = adv = want
            bhs = _HDR_U32.pack(Opcode.SCSI_RESPONSE, 0x80, status, 0, 0, itt, 0, statsn, exp, adv, 0, 0, 0)
            if self.hd:
                frame_into(self.out, bhs, b"", True, self.dd)
            else:
                self.out.append(bhs)
        self._late_flush()

    def relay_result(self, token: tuple[int, ...], result: Any) -> None:
        """Any other end of a relayed read or write (sense, residual, several
        Data-In, an error): answered as the LU's late answer."""
        itt, edtl = token[0], token[1]
        entry = self.pending.get(itt)
        if self.state == Connection.FULL_FEATURE and entry is not None and entry[0] is token:
            self._answer(itt, result, edtl, 0, 0, len(token) == 3)

    def _deferred_flush(self) -> None:
        self._flush_deferred = False
        if not self._in_batch and self.out:
            self.flush()

    def _respond(self, itt: int, res: Result, edtl: int, flags: int, residual: int, write: bool) -> None:
        status = res.status
        data = res.data_in
        n = len(data) if data else 0
        if not write:
            if n > edtl:
                flags, residual = ResponseFlags.OVERFLOW, n - edtl
                n = edtl
            elif n < edtl:
                flags, residual = ResponseFlags.UNDERFLOW, edtl - n
        sense = res.sense
        collapse = status == _GOOD and not sense
        params = self.params
        if collapse and n and n <= params.max_xmit_data_segment_length and n <= params.max_burst_length:
            # the common read: one Data-In carrying the status (phase collapse)
            bhs = _HDR_U32.pack(
                Opcode.DATA_IN, 0x81 | flags, status, n, 0, itt, RESERVED_TAG, self._next_statsn(),
                self.exp_cmdsn, self.max_cmdsn, 0, 0, residual,
            )
            self._emit(bhs, data if len(data) == n else memoryview(data)[:n])
            return
        datasn = 0
        if n:
            view = memoryview(data)
            mx = self.params.max_xmit_data_segment_length
            burst = self.params.max_burst_length
            off = 0
            out = self.out
            hd, dd = self.hd, self.dd
            in_burst = 0
            while off < n:
                seg = min(mx, n - off, burst - in_burst)
                end = off + seg
                last = end == n
                in_burst += seg
                seq_end = last or in_burst == burst
                if last and collapse:
                    bhs = _HDR_U32.pack(
                        Opcode.DATA_IN, 0x81 | flags, status, seg, 0, itt, RESERVED_TAG, self._next_statsn(),
                        self.exp_cmdsn, self.max_cmdsn, datasn, off, residual,
                    )
                else:
                    bhs = _HDR_U32.pack(
                        Opcode.DATA_IN, 0x80 if seq_end else 0, 0, seg, 0, itt, RESERVED_TAG, 0,
                        self.exp_cmdsn, self.max_cmdsn, datasn, off, 0,
                    )
                if seq_end:
                    in_burst = 0
                frame_into(out, bhs, view[off:end], hd, dd)
                datasn += 1
                off = end
            if collapse:
                return
        segment = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        bhs = pack_scsi_response(
            itt, status, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn, flags, residual, segment,
            exp_datasn=datasn,
        )
        self._emit(bhs, segment)

    # ------------------------------------------------------------ NOP, text, logout
    def _nop_out(self, raw: RawPdu) -> None:
        _, _, _, _, lunf, itt, ttt, *_ = _HDR_U32.unpack_from(raw.bhs)
        if itt == RESERVED_TAG:
            if ttt == self._nop_ttt:
                self._nop_ttt = None  # answer to our keepalive
            return
        rsp = NopIn(itt, RESERVED_TAG, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn,
                    decode_lun(lunf) if decode_lun(lunf) >= 0 else 0, raw.data)
        self._emit_pdu(rsp)

    def ping(self) -> bool:
        """Target-initiated NOP-In; False when the previous one was not answered."""
        if self.state != Connection.FULL_FEATURE:
            return True
        if self._nop_ttt is not None:
            return False
        self._ttt = self._nop_ttt = (self._ttt + 1) & 0x7FFFFFFF
        self._emit_pdu(NopIn(RESERVED_TAG, self._nop_ttt, self.statsn, self.exp_cmdsn, self.max_cmdsn))
        self.flush()
        return True

    def _text_request(self, raw: RawPdu) -> None:
        req = TextRequest.decode(raw)
        if req.ttt != RESERVED_TAG:
            rest = self._text_rest.pop(req.ttt, None)
            if rest is None:
                raise ProtocolError(RejectReason.INVALID_PDU_FIELD, "unknown Text TTT", raw.bhs)
            self._send_text(req.itt, rest)
            return
        try:
            pairs = self._text_in.add(req.data, req.cont)
        except LoginError as exc:
            self._text_in = TextAccumulator()
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, str(exc), raw.bhs) from None
        if pairs is None:  # C bit: more text follows; acknowledge (RFC 7143 11.10.2)
            self._emit_pdu(TextResponse(req.itt, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn,
                                        RESERVED_TAG, final=False))
            return
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value)
            else:
                # no operational renegotiation in full feature phase
                answer.append((key, "NotUnderstood" if key not in KEYS else "Reject"))
        self._send_text(req.itt, encode_text(answer))

    def _send_text(self, itt: int, text: bytes) -> None:
        mx = self.params.max_xmit_data_segment_length
        ttt = RESERVED_TAG
        more = len(text) > mx
        if more:
            self._ttt = ttt = (self._ttt + 1) & 0x7FFFFFFF
            self._text_rest[ttt] = text[mx:]
            text = text[:mx]
        self._emit_pdu(TextResponse(itt, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn, ttt,
                                    final=not more, cont=more, data=text))

    def _send_targets(self, which: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        host, port = self.local_address or ("127.0.0.1", 3260)
        addr = f"[{host}]" if ":" in host else host
        for node in self.target.nodes.values():
            if which == "All" and self.node is None:
                pass
            elif which in ("", "All") and self.node is not None:
                if node is not self.node:
                    continue
            elif which.lower() != node.name.lower():
                continue
            if not node.allows(self._initiator):
                continue
            out.append(("TargetName", node.name))
            if node.redirect is not None:
                rh, rp, rt = node.redirect
                out.append(("TargetAddress", f"{rh}:{rp},{rt}"))
            elif self.portal_group is None or not self.target.portal_groups:
                out.append(("TargetAddress", f"{addr}:{port},{node.tpgt}"))
            else:
                out += self._portal_addresses(self.portal_group, host, port)
        return out

    def _portal_addresses(self, own: PortalGroup, host: str, port: int) -> list[tuple[str, str]]:
        """Every portal of every portal group (RFC 7143 12.11, appendix D):
        the one this connection reached (of group ``own``) first, then the
        others of its group, then the other groups'."""
        out = [(host, port, own.tpgt)]
        for group in (own, *(g for g in self.target.portal_groups.values() if g is not own)):
            out += [(h, p, group.tpgt) for h, p in group.addresses(host) if (h, p) != (host, port)]
        return [("TargetAddress", f"{f'[{h}]' if ':' in h else h}:{p},{t}") for h, p, t in out]

    def _logout(self, raw: RawPdu) -> None:
        req = LogoutRequest.decode(raw)
        if req.reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            code = LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        elif req.reason == LogoutReason.CLOSE_CONNECTION and self._login_first and req.cid != self._login_first.cid:
            code = LogoutResponseCode.CID_NOT_FOUND
        elif req.reason in (LogoutReason.CLOSE_SESSION, LogoutReason.CLOSE_CONNECTION):
            code = LogoutResponseCode.SUCCESS
        else:
            raise ProtocolError(RejectReason.INVALID_PDU_FIELD, f"logout reason {req.reason}", raw.bhs)
        self._emit_pdu(LogoutResponse(req.itt, code, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn,
                                      self.settings.default_time2wait, self.settings.default_time2retain))
        self.log.info("logout (%s): %s", LogoutReason(req.reason).name if req.reason < 3 else req.reason,
                      LogoutResponseCode(code).name)
        if code == LogoutResponseCode.SUCCESS:
            self._close_after_flush = True

    def _snack(self, raw: RawPdu) -> None:
        raise ProtocolError(RejectReason.COMMAND_NOT_SUPPORTED, "SNACK at ErrorRecoveryLevel 0", raw.bhs)

    def send_async(self, event: AsyncEvent, parameter3: int = 0, parameter1: int = 0, parameter2: int = 0) -> None:
        if self.state != Connection.FULL_FEATURE:
            return
        self._emit_pdu(AsyncMessage(event, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn,
                                    parameter1=parameter1, parameter2=parameter2, parameter3=parameter3))
        if not self._in_batch:
            self.flush()

    # ------------------------------------------------------------ task management
    def abort_tasks(self, lu: LogicalUnitLike | None = None) -> set[int]:
        """Forget tasks (all, or those of ``lu``); their answers are never sent."""
        gone = set()
        for itt, task in list(self.tasks.items()):
            if lu is None or task.lu is lu:
                del self.tasks[itt]
                gone.add(itt)
        for itt in list(self.pending):
            if lu is None or self.pending[itt][1] is lu:
                del self.pending[itt]
                gone.add(itt)
        return gone

    def _task_mgmt(self, raw: RawPdu) -> None:
        req = TaskMgmtRequest.decode(raw)
        fn = req.function
        lu = self.luns.get(req.lun)
        nexus = self.nexus
        resp = TmfResponse.FUNCTION_COMPLETE
        cold = False
        if self.node is None or nexus is None:
            resp = TmfResponse.AUTHORIZATION_FAILED
        elif fn == TmfFunction.ABORT_TASK:
            rtt = req.referenced_itt
            if rtt in self.tasks:
                del self.tasks[rtt]
                self._failed_itts.add(rtt)
            elif rtt in self.pending:
                del self.pending[rtt]
            elif self.queued.pop(req.ref_cmdsn, None) is None:
                # RFC 7143 11.6.1: a task not received yet whose RefCmdSN is
                # before the TMF's CmdSN counts as received and aborted; a
                # task that already completed does not exist any more.
                d = sn_diff(req.ref_cmdsn, self.exp_cmdsn)
                if 0 <= d < sn_diff(req.cmdsn, self.exp_cmdsn):
                    self._skip_cmdsn.add(req.ref_cmdsn)
                else:
                    resp = TmfResponse.TASK_DOES_NOT_EXIST
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            if lu is None:
                resp = TmfResponse.LUN_DOES_NOT_EXIST
            elif fn == TmfFunction.ABORT_TASK_SET:
                self.abort_tasks(lu)
            elif fn == TmfFunction.CLEAR_TASK_SET:
                self.target.abort_lu(lu, None)
                lu.clear_task_set(nexus)
            else:
                self.target.abort_lu(lu, None)
                lu.reset(nexus)
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            if not all(getattr(unit, "target_reset_supported", True) for unit in self.luns.values()):
                # an LU that cannot take part (the passthrough device in front
                # of a backend without target resets): nothing is reset
                resp = TmfResponse.NOT_SUPPORTED
            else:
                cold = fn == TmfFunction.TARGET_COLD_RESET
                for unit in self.luns.values():
                    self.target.abort_lu(unit, None)
                    unit.reset(nexus, cold=cold, target_reset=True)
        elif fn == TmfFunction.TASK_REASSIGN:
            resp = TmfResponse.REASSIGNMENT_NOT_SUPPORTED
        else:
            resp = TmfResponse.NOT_SUPPORTED
        self.log.info("task management %s lun %d: %s",
                      TmfFunction(fn).name if fn in TmfFunction._value2member_map_ else fn, req.lun,
                      TmfResponse(resp).name)
        self._emit_pdu(TaskMgmtResponse(req.itt, resp, self._next_statsn(), self.exp_cmdsn, self.max_cmdsn))
        if cold and self.node is not None:
            self.target.cold_reset(self.node)

