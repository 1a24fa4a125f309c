"""The demo's guest: an iSCSI initiator that holds a reservation and writes
verifiable data without pause, whichever host serves its device.

It is an ordinary client of the host daemon's guest frontend (our asyncio
initiator, ``iscsi/initiator.py``): it logs in to the device's URL on host
A, registers a key, takes a reservation, then ``depth`` writers each loop

    pick a free LBA (``stamp.Ledger``) -> WRITE(16) a stamped block
    -> GOOD: read it back (READ(16)) and let the ledger verify it
    -> RESERVATION CONFLICT / error: counted, short back-off

When the device migrates, the source host sends an Asynchronous Message
(event 1, logout requested); the initiator drops the connection, logs in
again to the portal it first used, and follows the redirect (login status
0x0101) to the destination; commands that got no status are re-issued
there. Nothing here knows about migration: the counters and the stall
tracker show what a guest would notice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..iscsi.initiator import IscsiError, LoginError, Session, connect, describe_result
from ..iscsi.pdu import AsyncEvent, AsyncMessage
from ..lun.types import Result
from ..scsi.constants import Opcode, PrOutAction, PrType, Status
from ..scsi.pr import pr_out_params
from ..scsi.sense import DecodedSense
from ..scsi.vocabulary import format_key, words
from .stamp import Check, Counters, Ledger, stamp_block

log = logging.getLogger(__name__)

_UA_RETRIES = 4  # submissions again after a unit attention
_BACKOFF = 0.01  # after a conflict or an error: a real guest would not spin
_SWEEP_BLOCKS = 128  # blocks per READ in the final verification sweep


class GuestError(Exception):
    """The guest could not set itself up (login, PR OUT refused...)."""


@dataclass(frozen=True, slots=True)
class GuestEvent:
    at: float  # seconds since the guest started
    what: str


class _RedirectWatch(logging.Handler):
    """Notes the initiator's "login redirected" and "session reinstated"
    lines for this guest's session: the initiator follows a redirect inside
    its re-login and has no callback for either, so its log lines are how
    the guest's timeline shows them."""

    REDIRECTED = "login redirected from %s to %s"
    REINSTATED = "session to %s reinstated (isid 0x%012x)"

    def __init__(self, guest: Guest) -> None:
        super().__init__(logging.INFO)
        self.guest = guest

    def emit(self, record: logging.LogRecord) -> None:
        # The session's log adapter (logprefix.PrefixLog) puts its I_T nexus
        # in front, as the first argument; the line's own arguments follow.
        text = str(record.msg)
        if not isinstance(record.args, tuple):
            return
        try:
            line = record.getMessage()
        except (TypeError, ValueError):
            return
        if self.guest.nexus.lower() not in line.lower():
            return
        if text.endswith(self.REDIRECTED) and len(record.args) >= 2:
            self.guest.redirects += 1
            self.guest._event(f"login to {record.args[-2]} redirected to {record.args[-1]}")
        elif text.endswith(self.REINSTATED):
            self.guest._event(f"logged in again, connected to {self.guest.connected_portal()}"
                              " (same ISID: session reinstated)")


def _rw16(opcode: Opcode, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", opcode, 0, lba, blocks, 0, 0)


class Guest:
    """One guest initiator with a stamped-write workload."""

    def __init__(
        self,
        url: str,
        initiator: str,
        *,
        key: int,
        rtype: PrType,
        first_lba: int = 0,
        blocks: int = 4096,
        depth: int = 4,
        isid: int | None = None,
        run_id: int | None = None,
    ) -> None:
        self.url = url
        self.initiator = initiator
        self.isid = isid if isid is not None else 0x23D000000000 | int.from_bytes(os.urandom(2), "big")
        self.key = key
        self.rtype = rtype
        self.depth = depth
        self.ledger = Ledger(run_id or int.from_bytes(os.urandom(8), "big"), first_lba, blocks)
        self.session: Session | None = None
        self.capacity = 0  # blocks, from READ CAPACITY(16) at login
        self.block_size = 512
        self.events: list[GuestEvent] = []
        self.unit_attentions: list[str] = []
        self.logout_requests = 0
        self.redirects = 0
        self.last_status: dict[str, str] = {}  # first non-GOOD answer per kind
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._last_done: float | None = None
        self._max_gap = 0.0
        self._window_start = self._t0

    @property
    def nexus(self) -> str:
        """The guest's initiator port: name,i,0xISID."""
        return f"{self.initiator},i,0x{self.isid:012x}"

    @property
    def counters(self) -> Counters:
        return self.ledger.counters

    def _event(self, what: str) -> None:
        self.events.append(GuestEvent(round(self._loop.time() - self._t0, 4), what))
        log.info("guest %s: %s", self.initiator, what)

    # ------------------------------------------------------------- session
    def _on_async(self, msg: AsyncMessage, sense: DecodedSense | None) -> None:
        if msg.event == AsyncEvent.LOGOUT_REQUEST:
            self.logout_requests += 1
            self._event(f"Asynchronous Message: logout requested (Time2Wait {msg.parameter3} s)")
        else:
            self._event(f"Asynchronous Message event {msg.event}"
                        + (f" ({sense.describe()})" if sense else ""))

    def _on_ua(self, lun: int, sense: DecodedSense) -> None:
        self.unit_attentions.append(sense.describe())
        self._event(f"unit attention: {sense.describe()}")

    async def login(self) -> None:
        self._watch = _RedirectWatch(self)
        core_log = logging.getLogger("prmigrate.iscsi.initiator_core")
        if not core_log.isEnabledFor(logging.INFO):
            core_log.setLevel(logging.INFO)
        core_log.addHandler(self._watch)
        try:
            self.session = await connect(
                self.url,
                initiator_name=self.initiator,
                isid=self.isid,
                on_async_event=self._on_async,
                on_unit_attention=self._on_ua,
                reconnect=True,
                reconnect_timeout=30.0,
                login_timeout=5.0,
            )
            self.capacity, self.block_size = await self.session.read_capacity16()
        except (IscsiError, LoginError, OSError) as e:
            raise GuestError(f"guest login to {self.url} failed: {e}") from e
        self._event(f"logged in to {self.connected_portal()} as {self.nexus}")

    def connected_portal(self) -> str | None:
        """The portal the session's TCP connection goes to right now."""
        proto = getattr(self.session, "_proto", None)
        transport = getattr(proto, "transport", None)
        if transport is None:
            return None
        peer = transport.get_extra_info("peername")
        return None if peer is None else f"{peer[0]}:{peer[1]}"

    @property
    def reconnects(self) -> int:
        return 0 if self.session is None else self.session.reconnects

    async def _submit(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        assert self.session is not None
        return await self.session.submit_retrying(self.session.lun, cdb, data_out, data_in_len,
                                                  tries=_UA_RETRIES + 1)

    async def _pr_out(self, action: PrOutAction, rtype: PrType | int, rk: int, sark: int) -> Result:
        from ..scsi.pr import pr_out_cdb

        params = pr_out_params(rk, sark)
        return await self._submit(pr_out_cdb(action, rtype, 0, len(params)), params)

    async def register_and_reserve(self) -> None:
        """PR OUT REGISTER (SARK = key), then RESERVE with the chosen type."""
        r = await self._pr_out(PrOutAction.REGISTER, PrType.NONE, 0, self.key)
        if r.status != Status.GOOD:
            raise GuestError(f"REGISTER key 0x{self.key:x}: {describe_result(r)}")
        self._event(f"registered key 0x{self.key:x}")
        r = await self._pr_out(PrOutAction.RESERVE, self.rtype, self.key, 0)
        if r.status != Status.GOOD:
            raise GuestError(f"RESERVE {words(self.rtype)}: {describe_result(r)}")
        self._event(f"reserved ({words(self.rtype)})")

    async def release_and_unregister(self) -> str:
        """Leave the LUN as found: RELEASE, then REGISTER SARK = 0."""
        r1 = await self._pr_out(PrOutAction.RELEASE, self.rtype, self.key, 0)
        r2 = await self._pr_out(PrOutAction.REGISTER, PrType.NONE, self.key, 0)
        return f"RELEASE {describe_result(r1)}, unregister {describe_result(r2)}"

    # ------------------------------------------------------------ workload
    def start_writing(self) -> None:
        self._stop.clear()
        self._workers = [asyncio.create_task(self._writer(i)) for i in range(self.depth)]

    async def stop_writing(self) -> None:
        self._stop.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    def _done(self) -> None:
        now = self._loop.time()
        if self._last_done is not None:
            self._max_gap = max(self._max_gap, now - self._last_done)
        self._last_done = now

    def window(self) -> tuple[Counters, float]:
        """Counters so far and the longest gap (s) between two command
        completions since the previous call; starts a new window."""
        gap = self._max_gap
        if self._last_done is not None:  # a stall still going on counts too
            gap = max(gap, self._loop.time() - self._last_done)
        self._max_gap = 0.0
        return self.counters.copy(), gap

    def _note(self, kind: str, r: Result | str) -> None:
        if kind not in self.last_status:
            text = r if isinstance(r, str) else describe_result(r)
            self.last_status[kind] = text
            self._event(f"first {kind}: {text}")

    async def _writer(self, n: int) -> None:
        bs = self.session.block_size if self.session else 512
        while not self._stop.is_set():
            nxt = self.ledger.issue()
            if nxt is None:
                await asyncio.sleep(_BACKOFF)
                continue
            seq, lba = nxt
            data = stamp_block(self.ledger.run_id, seq, lba, bs)
            try:
                r = await self._submit(_rw16(Opcode.WRITE_16, lba, 1), data)
            except IscsiError as e:
                self.ledger.not_written(seq, lba, conflict=False)
                self._note("write error", str(e))
                await asyncio.sleep(_BACKOFF * 5)
                continue
            self._done()
            if r.status == Status.RESERVATION_CONFLICT:
                self.ledger.not_written(seq, lba, conflict=True)
                self._note("write conflict", r)
                await asyncio.sleep(_BACKOFF)
                continue
            if r.status != Status.GOOD:
                self.ledger.not_written(seq, lba, conflict=False)
                self._note("write error", r)
                await asyncio.sleep(_BACKOFF)
                continue
            self.ledger.acknowledged(seq, lba)
            await self._read_back(lba, bs)

    async def _read_back(self, lba: int, bs: int) -> None:
        try:
            r = await self._submit(_rw16(Opcode.READ_16, lba, 1), data_in_len=bs)
        except IscsiError as e:
            self.ledger.defer(lba)
            self._note("read error", str(e))
            return
        self._done()
        if r.status != Status.GOOD:
            self.ledger.defer(lba)
            self._note("read conflict" if r.status == Status.RESERVATION_CONFLICT
                       else "read error", r)
            return
        if self.ledger.check(lba, bytes(r.data_in)) is Check.LOST:
            seq, _, why = self.ledger.lost_writes[-1]
            self._event(f"LOST write seq {seq} at LBA {lba}: {why}")

    async def verify_all(self) -> dict[str, int]:
        """Read back every LBA holding an acknowledged write (the workload
        stopped) and check the last acknowledged write of each is there."""
        assert self.session is not None
        bs = self.session.block_size
        lbas = self.ledger.acknowledged_lbas()
        checked = unreadable = 0
        i = 0
        while i < len(lbas):
            # one READ per run of consecutive LBAs, at most _SWEEP_BLOCKS long
            j = i + 1
            while j < len(lbas) and lbas[j] == lbas[j - 1] + 1 and j - i < _SWEEP_BLOCKS:
                j += 1
            first, count = lbas[i], j - i
            r = await self._submit(_rw16(Opcode.READ_16, first, count), data_in_len=count * bs)
            if r.status != Status.GOOD:
                unreadable += count
                self._note("sweep read error", r)
            else:
                data = memoryview(bytes(r.data_in))
                for k in range(count):
                    self.ledger.check(first + k, data[k * bs:(k + 1) * bs])
                    checked += 1
            i = j
        return {"blocks_checked": checked, "blocks_unreadable": unreadable}

    async def close(self) -> None:
        """Stop the writers and log out. The session is closed before the
        writers are awaited: on an error path a writer may wait on a command
        that no host will answer, and closing fails it at once."""
        self._stop.set()
        if self.session is not None:
            await self.session.close(timeout=2.0)
        await self.stop_writing()
        watch = getattr(self, "_watch", None)
        if watch is not None:
            logging.getLogger("prmigrate.iscsi.initiator_core").removeHandler(watch)

    def summary(self) -> dict[str, Any]:
        return {
            "initiator": self.initiator,
            "isid": f"0x{self.isid:012x}",
            "key": format_key(self.key),
            "type": words(self.rtype),
            "writes": self.counters.to_dict(),
            "lost_writes": [
                {"seq": s, "lba": lba, "why": why} for s, lba, why in self.ledger.lost_writes[:20]
            ],
            "logout_requests": self.logout_requests,
            "reconnects": self.reconnects,
            "redirects": self.redirects,
            "unit_attentions": list(self.unit_attentions),
            "first_failures": dict(self.last_status),
            "events": [{"t": e.at, "what": e.what} for e in self.events],
        }
