"""The asyncio iSCSI target (RFC 7143, ErrorRecoveryLevel 0).

Public API (reused by the host daemon)::

    node = TargetNode(name, luns={0: unit}, acl=None, chap=None, tpgt=1, alias=None)
    node.redirect = ("127.0.0.3", 3260, 1)      # optional: every login gets 0x0101
    target = IscsiTarget(nodes=[node], settings=TargetSettings(), keepalive=None,
                         portal_group_tag=None)   # set: TPGT of every node added
    await target.start("127.0.0.1", 3260)      # -> list of bound (host, port)
    await target.start("127.0.0.1", 3261, tpgt=2)  # a portal of target portal group 2
    target.portal_groups -> {tpgt: PortalGroup}  # .rel_port, .portals (bound addresses)
    target.add_node(node); target.remove_node(name)
    target.add_lun(name, 1, unit); target.remove_lun(name, 1) -> unit   # at run time
    target.sessions(name) -> list[Session]      # .nexus, .tsih, .initiator, .isid
    target.request_logout(name, initiator=None, wait=2, enforce=False,
                          time2wait=None) -> int   # Async event 1 (then 3, see below)
    target.drop_sessions(name, initiator=None) -> int            # nexus_lost to the LUs
    target.lu_counters -> {(node name, LUN): counters.LuCounters}  # exported by metrics.py
    await target.close()

Target portal groups (RFC 7143 4.4.1): a portal started with ``tpgt`` belongs
to that portal group, and each portal group is one SCSI target port, with
relative target port identifiers 1, 2, ... in the order the groups are first
started (SPC-5 4.3.2; VPD 83h, READ FULL STATUS, REPORT TARGET PORT GROUPS).
A session's I_T nexus is its initiator port with the target port of the
portal it logged in through: one initiator port on two portal groups has two
nexuses and two sessions. SendTargets lists every portal of every group with
its tag. A portal started without ``tpgt`` serves as before portal groups:
the node's ``tpgt``, relative target port 1, SendTargets naming it alone.

``TargetNode``, ``ChapConfig``, ``TargetSettings`` and ``Session`` come from
``session.py``, where the per-connection protocol logic lives (no asyncio);
a connection reaches this target only through ``session.ConnectionOwner``,
which ``IscsiTarget`` implements (session.py imports nothing from here).
This module only moves bytes: ``_IscsiProtocol`` reads into one reused
buffer and feeds every read to the connection, which parses all PDUs of the
batch in place and sends all their responses with one ``transport.write``. No Task, coroutine or executor
job per command. Optional keepalive: a NOP-In every ``keepalive`` seconds on
idle connections; an unanswered one closes the connection.

Logical units are any object with ``execute``/``nexus_lost``/``reset``/
``clear_task_set`` (``lun.types.LogicalUnitLike``); optional attributes used
when present: ``report_luns`` (set to list the node's LUNs), ``abort_hook``
(PREEMPT AND ABORT drops the preempted nexuses' queued tasks), ``attach``
(called for each new nexus), ``block_size`` (residual handling),
``read_fast(nexus, cdb) -> bytes | None`` (READ(10)/(16) answered from the
receive buffer when nothing is to report), ``execute_then(nexus, cdb,
data_out, done) -> Result | None`` (a late answer by callback, no Future).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from functools import partial

from ..counters import LuCounters
from ..lun.types import LogicalUnitLike, Nexus
from ..scsi.sense import Sense
from . import flushpoint
from .pdu import AsyncEvent
from .session import ChapConfig, Connection, PortalGroup, Session, TargetNode, TargetSettings

__all__ = ["ChapConfig", "IscsiTarget", "PortalGroup", "Session", "TargetNode", "TargetSettings"]

log = logging.getLogger("prmigrate.iscsi.target")


_RECV_BUFFER = 256 * 1024


class _IscsiProtocol(asyncio.BufferedProtocol):
    """Receives into one buffer per connection (``recv_into``): a plain
    Protocol gets a fresh 256 KiB bytes object per read, which costs an
    mmap, an mremap and an munmap plus page faults on every read event."""

    __slots__ = ("target", "group", "conn", "transport", "_timer", "_active", "_view")

    def __init__(self, target: IscsiTarget, group: PortalGroup | None = None) -> None:
        self.target = target
        self.group = group
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._active = False
        self._view = memoryview(bytearray(_RECV_BUFFER))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        # one writelines per batch: a single write(2) (joined by asyncio,
        # writev on uvloop)
        self.conn = Connection(
            self.target, peer_s, (local[0], local[1]) if local else None,
            transport.writelines,  # type: ignore[attr-defined]
            transport.close,
            partial(flushpoint.defer, call_soon=asyncio.get_running_loop().call_soon),
        )
        self.conn.portal_group = self.group
        self.target._connections.add(self.conn)
        if self.target.keepalive:
            self._arm()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._active = True
        conn = self.conn
        if conn is not None:
            # the connection copies what it keeps: the buffer is reused.
            # Flushes deferred meanwhile (other connections') run at the end.
            flushpoint.begin()
            try:
                conn.data_received(self._view[:nbytes])
            finally:
                flushpoint.end()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.conn is not None:
            self.conn.connection_lost()
            self.target._connections.discard(self.conn)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.target.keepalive or 0, self._tick)

    def _tick(self) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        if self._active:
            self._active = False
        elif not conn.ping():
            conn.log.warning("keepalive NOP-In not answered: closing")
            conn.close()
            return
        self._arm()


class IscsiTarget:
    """Registry of nodes and sessions plus the listening sockets."""

    def __init__(
        self,
        nodes: Iterable[TargetNode] = (),
        settings: TargetSettings | None = None,
        keepalive: float | None = None,
        max_task_bytes: int = 64 << 20,
        portal_group_tag: int | None = None,
    ) -> None:
        self.settings = settings or TargetSettings()
        self.portal_group_tag = portal_group_tag  # when set, the TPGT of every node added
        self.keepalive = keepalive
        self.max_task_bytes = max_task_bytes
        self.nodes: dict[str, TargetNode] = {}
        self._sessions: dict[tuple[str, int, str, int], Session] = {}
        self._connections: set[Connection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._tsih = 0
        self.portal_groups: dict[int, PortalGroup] = {}  # by tag, in the order first started
        # per (node name, LUN): what the connections did (counters.py; read
        # by metrics.py); the clock the connections time commands with
        self.lu_counters: dict[tuple[str, int], LuCounters] = {}
        self.clock_ns = time.perf_counter_ns
        for node in nodes:
            self.add_node(node)

    # ------------------------------------------------------------ nodes
    def add_node(self, node: TargetNode) -> None:
        if self.portal_group_tag is not None:
            node.tpgt = self.portal_group_tag
        self.nodes[node.name.lower()] = node
        for lu in node.luns.values():
            self._present(lu)

    def _present(self, lu: LogicalUnitLike) -> None:
        if hasattr(lu, "abort_hook"):
            lu.abort_hook = self._abort_nexuses  # type: ignore[attr-defined]
        if hasattr(lu, "target_ports"):
            lu.target_ports = self.target_ports  # type: ignore[attr-defined]

    def target_ports(self) -> dict[int, int]:
        """Relative target port identifier -> portal group tag of every target
        port (the portal groups; ``{1: 1}`` while none is started)."""
        return {g.rel_port: g.tpgt for g in self.portal_groups.values()} or {1: 1}

    def remove_node(self, name: str) -> TargetNode | None:
        node = self.nodes.pop(name.lower(), None)
        if node is not None:
            self.drop_sessions(name)
        return node

    def node(self, name: str) -> TargetNode | None:
        return self.nodes.get(name.lower())

    def counters_for(self, node_name: str, lun: int) -> LuCounters:
        key = (node_name, lun)
        c = self.lu_counters.get(key)
        if c is None:
            c = self.lu_counters[key] = LuCounters()
        return c

    # ------------------------------------------------------------ LUNs at run time
    def add_lun(self, node_name: str, lun: int, lu: LogicalUnitLike) -> None:
        """Present ``lu`` as ``lun`` of a running node. The node's sessions
        keep running; each of their nexuses is attached to the new LU and gets
        REPORTED LUNS DATA HAS CHANGED (3F/0E) on every LU of the node."""
        node = self._existing_node(node_name)
        if lun in node.luns:
            raise ValueError(f"LUN {lun} of {node.name} exists")
        self._present(lu)
        nexuses = self._nexuses(node)
        attach = getattr(lu, "attach", None)
        if attach is not None:
            for n in nexuses:
                attach(n)
        node.add_lun(lun, lu)
        self._luns_changed(node, nexuses)

    def remove_lun(self, node_name: str, lun: int) -> LogicalUnitLike:
        """Stop presenting ``lun``; the caller closes the LU it gets back.
        Tasks of that LU still queued are dropped (never answered: the LU is
        gone); every other LU, session, registration and reservation stays,
        and the sessions get 3F/0E on the remaining LUs."""
        node = self._existing_node(node_name)
        lu = node.luns.pop(lun)
        self.abort_lu(lu, None)
        self._luns_changed(node, self._nexuses(node))
        return lu

    def _existing_node(self, name: str) -> TargetNode:
        node = self.node(name)
        if node is None:
            raise KeyError(f"no target node {name}")
        return node

    def _nexuses(self, node: TargetNode) -> list[Nexus]:
        return [s.nexus for s in self.sessions(node.name) if s.nexus is not None]

    @staticmethod
    def _luns_changed(node: TargetNode, nexuses: list[Nexus]) -> None:
        # SPC-5 6.33 / SAM-5 5.14: the logical unit inventory changed; REPORT
        # LUNS clears the condition (lun/unit.py _report_luns).
        for lu in node.luns.values():
            ua = getattr(lu, "ua", None)
            if ua is not None:
                for n in nexuses:
                    ua.establish(n, Sense.REPORTED_LUNS_DATA_HAS_CHANGED)

    # ------------------------------------------------------------ sessions
    def sessions(self, node_name: str | None = None) -> list[Session]:
        """Live sessions (of one node; ``None``: all, discovery included)."""
        if node_name is None:
            return list(self._sessions.values())
        key = node_name.lower()
        return [s for s in self._sessions.values() if s.node is not None and s.node.name.lower() == key]

    def _select(self, node_name: str, initiator: str | None) -> list[Session]:
        return [s for s in self.sessions(node_name) if initiator is None or s.initiator.lower() == initiator.lower()]

    def request_logout(
        self, node_name: str, initiator: str | None = None, wait: int = 2, enforce: bool = False,
        time2wait: int | None = None,
    ) -> int:
        """Ask sessions to log out (Async Message, event 1, Parameter3 = ``wait`` s).

        With ``enforce``, a session still present ``wait`` + 1 s later is
        dropped (RFC 7143 11.9.1). With ``time2wait``, event 3 (the target
        drops the session's connections) follows at once with Parameter2 =
        ``time2wait``: the time the initiator waits before it logs in again.
        The negotiated DefaultTime2Wait, which an initiator waits after a
        logout, cannot be lowered by the target (RFC 7143 13.15: result
        function Maximum; open-iscsi offers 2 s); event 3's Parameter2
        replaces it for the reconnection (open-iscsi's iscsid takes it as
        its Time2Wait; libiscsi reconnects at once either way). The
        connections do end: by the initiator's logout, or dropped by the
        caller (``enforce``, ``drop_sessions``). Returns the number of
        sessions asked.
        """
        chosen = self._select(node_name, initiator)
        for s in chosen:
            if s.conn is not None:
                s.conn.log.info("asking the initiator to log out within %d s", wait)
                s.conn.send_async(AsyncEvent.LOGOUT_REQUEST, parameter3=wait)
                if time2wait is not None:
                    # RFC 7143 11.9.1, AsyncEvent 3: Parameter2 = Time2Wait,
                    # Parameter3 = Time2Retain (no task reassignment at ERL 0).
                    s.conn.send_async(AsyncEvent.SESSION_DROP, parameter2=time2wait,
                                      parameter3=s.conn.settings.default_time2retain)
                if enforce:
                    asyncio.get_running_loop().call_later(wait + 1, self._enforce_logout, s)
        return len(chosen)

    def _enforce_logout(self, s: Session) -> None:
        if self._sessions.get(s.key) is s and s.conn is not None:
            s.conn.log.warning("no logout after the Async Message: dropping the session")
            s.conn.close()

    def drop_sessions(self, node_name: str, initiator: str | None = None) -> int:
        """Close sessions now; their LUs are told the nexus is lost."""
        chosen = self._select(node_name, initiator)
        for s in chosen:
            if s.conn is not None:
                s.conn.log.info("session dropped by the target")
                s.conn.close()
            else:
                self._end_session(s, nexus_lost=True)
        return len(chosen)

    def register_session(self, session: Session) -> bool:
        """Add a session at the end of its login; True when it reinstates one."""
        key = session.key
        old = self._sessions.get(key)
        reinstated = False
        if old is not None:
            # RFC 7143 6.3.5: same initiator port + target: close the old
            # session; the I_T nexus continues, so the LU is not told.
            reinstated = True
            self._sessions.pop(key, None)
            if old.conn is not None:
                old.conn.log.info("session reinstated by a new login: closing the old connection")
                old.conn.session = None
                old.conn.close()
        self._tsih = self._tsih % 0xFFFF + 1
        while any(s.tsih == self._tsih for s in self._sessions.values()):
            self._tsih = self._tsih % 0xFFFF + 1
        session.tsih = self._tsih
        self._sessions[key] = session
        if not reinstated and session.node is not None and session.nexus is not None:
            for lu in session.node.luns.values():
                attach = getattr(lu, "attach", None)
                if attach is not None:
                    attach(session.nexus)
        return reinstated

    def connection_closed(self, conn: Connection) -> None:
        self._connections.discard(conn)
        s = conn.session
        if s is not None and self._sessions.get(s.key) is s:
            self._end_session(s, nexus_lost=not conn.ended_by_reset)

    def _end_session(self, s: Session, nexus_lost: bool) -> None:
        self._sessions.pop(s.key, None)
        s.conn = None
        if s.node is not None and s.nexus is not None:
            log.info("[%s] session tsih %d ended%s", s.describe(), s.tsih, "" if nexus_lost else " (reset)")
            if nexus_lost:
                for lu in s.node.luns.values():
                    try:
                        lu.nexus_lost(s.nexus)
                    except Exception:
                        log.exception("nexus_lost failed for %s", s.nexus)

    def abort_lu(self, lu: LogicalUnitLike, nexuses: set[Nexus] | None) -> None:
        for conn in list(self._connections):
            if nexuses is None or conn.nexus in nexuses:
                conn.abort_tasks(lu)

    def _abort_nexuses(self, nexuses: set[Nexus]) -> None:
        for conn in list(self._connections):
            if conn.nexus in nexuses:
                conn.abort_tasks()

    def cold_reset(self, node: TargetNode) -> None:
        """TARGET COLD RESET: every session of the node ends after its answer."""
        for s in self.sessions(node.name):
            if s.conn is not None:
                s.conn.end_after_answers()

    # ------------------------------------------------------------ server
    async def start(
        self, host: str = "127.0.0.1", port: int = 3260, tpgt: int | None = None
    ) -> list[tuple[str, int]]:
        """Listen on ``host:port``; with ``tpgt``, as a portal of that target
        portal group (created on first use, with the next relative target
        port identifier)."""
        loop = asyncio.get_running_loop()
        group = None
        if tpgt is not None:
            group = self.portal_groups.get(tpgt)
            if group is None:
                group = PortalGroup(tpgt, len(self.portal_groups) + 1)
        server = await loop.create_server(lambda: _IscsiProtocol(self, group), host, port, reuse_address=True)
        self._servers.append(server)
        bound = [s.getsockname()[:2] for s in server.sockets]
        if group is not None:
            group.portals += bound
            self.portal_groups.setdefault(group.tpgt, group)
            log.info("listening on %s (portal group %d, relative target port %d)",
                     ", ".join(f"{h}:{p}" for h, p in bound), group.tpgt, group.rel_port)
        else:
            log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
