"""One backend nexus of a guest over several paths (asyncio): ``MultipathSession``.

It presents the initiator ``Session`` interface the device uses (``submit``,
``submit_then``, ``submit_relay``, ``submit_retrying``, ``lun_reset``,
``clear_task_set``, ``close``, ``logged_in``, ``link_state``,
``core.outstanding``, ``inquiry``, ``read_capacity16``,
``report_supported_tmfs``, ``retry_now``) over one initiator ``Session``
per path, and carries out what ``paths.PathSet`` decides: where each
command goes, the PR OUT fan-out, the PR IN rewrite, path failure and
return. ``sessions.BackendSessions._open_session`` opens one instead of a
plain session when the device has several backends.

Path failure: a path session in a multipath set holds its commands only
``PATH_HOLD_TIMEOUT`` (not ``HOLD_TIMEOUT``) while its connection is down,
then answers them BUSY; a BUSY (or a transport error) from a path that is
not up is re-issued here on another path, so the guest sees no error. With
every path down a command waits here up to ``hold_timeout`` (the device's
``HOLD_TIMEOUT``), then is answered BUSY: the single-path behaviour.
The paths' link states are polled every ``WATCH_INTERVAL`` seconds: a path
that went down is taken out (its reservation moved, ``PathSet.holder_lost``),
one that came back registers again before it carries I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..aio import settle
from ..iscsi.initiator import IscsiError, LoginError, Session, retry_unit_attentions
from ..iscsi.initiator_core import HOLD_TIMEOUT, LinkState
from ..lun.types import Result, unit_attention
from ..scsi.constants import Opcode, PrInAction, PrOutAction, PrType, Status
from ..scsi.pr import (
    PrDecodeError,
    PrOutParams,
    ReadFullStatus,
    ReadKeys,
    RegisterAndMoveParams,
    pr_in_cdb,
    pr_out_cdb,
    pr_out_params,
)
from ..scsi.sense import Sense, encode_sense
from ..scsi.transport_id import TransportId
from .links import Login
from .paths import HOLDER_ONLY_TYPES, Op, Path, PathSet, PathState, Route, rewrite_pr_in, same_lu

log = logging.getLogger("prmigrate.device.multipath")

PATH_HOLD_TIMEOUT = 1.0  # a path session's hold before BUSY: then the command fails over
WATCH_INTERVAL = 0.1  # seconds between two looks at the paths' link states
UA_RETRIES = 4  # sends of one command on a non-primary path while it meets unit attentions
MOVES = 8  # re-issues of one command on other paths before its last answer is the guest's
PR_IN_READ = 8192  # the allocation of a guest's PR IN read here before the rewrite
_SCSI2 = frozenset({Opcode.RESERVE_6, Opcode.RELEASE_6, Opcode.RESERVE_10, Opcode.RELEASE_10})
_PR_OUT, _PR_IN = Opcode.PERSISTENT_RESERVE_OUT, Opcode.PERSISTENT_RESERVE_IN
# the shortest time between two READ FULL STATUS looks after a RESERVATION
# CONFLICT on a round robin path (``MultipathSession._recheck``)
RECHECK_INTERVAL = 1.0

# PR OUTs whose effect on the guest's paths depends on other nexuses (who
# held the reservation: SPC-5 5.14.11.4, 5.14.8, 5.14.12): read back after
_READ_BACK = frozenset({PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT, PrOutAction.REGISTER_AND_MOVE,
                        PrOutAction.REPLACE_LOST_RESERVATION})


class _Outstanding:
    """``core.outstanding`` of the set: the paths' and the commands parked here."""

    def __init__(self, mp: MultipathSession) -> None:
        self._mp = mp

    @property
    def outstanding(self) -> int:
        mp = self._mp
        return len(mp._parked) + mp._busy + sum(s.core.outstanding for s in mp.sessions if s is not None)

    @property
    def held(self) -> int:
        return len(self._mp._parked)


@dataclass(slots=True)
class _Cmd:
    lun: int
    cdb: bytes
    data_out: Any
    n: int
    done: Callable[[Result | BaseException], Any]
    moves: int = 0
    uas: int = 0
    parked_at: float | None = None
    rechecked: bool = False  # a conflict sent it back once after a READ FULL STATUS


OpenPath = Callable[[int, Callable[[int, Any], Any], Callable[[], Awaitable[Any]]], Awaitable[Session]]


class MultipathSession:
    """The paths of one backend nexus, as one ``Session`` to the device."""

    def __init__(self, urls: Sequence[str], tids: Sequence[TransportId], open_path: OpenPath, *,
                 rewrite_pr_in: bool = True, peers: list[PathSet] | None = None, on_unit_attention: Callable[[int, Any], Any] | None = None,
                 on_reconnect: Callable[[], Awaitable[Any]] | None = None, lun: int = 0,
                 hold_timeout: float = HOLD_TIMEOUT, logger: Any = log) -> None:
        self.set = PathSet([Path(u, t) for u, t in zip(urls, tids, strict=True)])
        self.sessions: list[Session | None] = [None] * len(urls)
        self._open_path = open_path
        self.rewrite = rewrite_pr_in
        # every guest's path set on this device (ours among them): a PR IN
        # answer shows each of them as one nexus
        self.peers = peers if peers is not None else []
        if rewrite_pr_in:
            self.peers.append(self.set)
        self.on_unit_attention = on_unit_attention
        self.on_reconnect = on_reconnect
        self.lun = lun
        self.hold_timeout = hold_timeout
        self.log = logger
        self.core = _Outstanding(self)
        self._loop = asyncio.get_running_loop()
        self._parked: list[_Cmd] = []
        self._busy = 0  # PR OUTs and path ops under way here
        self._managing = 0  # our own path PR OUTs under way (a conflict meanwhile is retried)
        self._pr_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch: asyncio.TimerHandle | None = None
        self._opening: set[int] = set()
        self._designators: bytes | None = None  # path 0's (or the first's) VPD 83h
        self._wrong: set[int] = set()  # paths that reach another LU: never used
        self._closed = False
        self.block_size = 512
        # media commands that met RESERVATION CONFLICT on a round robin path,
        # waiting for the READ FULL STATUS that tells whether the guest's
        # nexus became a holder unannounced (``_recheck``)
        self._rechecking: list[_Cmd] | None = None
        self._rechecked_at = -RECHECK_INTERVAL

    # ----------------------------------------------------------- open
    async def open(self) -> MultipathSession:
        """Log in on every path (at least one must answer), check that they
        reach one LU (VPD 83h logical unit designators), learn what is
        registered on them, start watching."""
        results = await asyncio.gather(*(self._login(i) for i in range(len(self.sessions))),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if all(s is None for s in self.sessions):
            raise errors[0] if errors else IscsiError("no path to the backend")
        try:
            for i, s in enumerate(self.sessions):
                if s is not None:
                    await self._check_lu(i, s)
            await self._learn()
        except BaseException:
            await self.close()
            raise
        for i, s in enumerate(self.sessions):
            if s is None:
                self._spawn(self._keep_opening(i))
        self._arm_watch()
        return self

    async def _login(self, i: int) -> None:
        self.sessions[i] = await self._open_path(
            i, functools.partial(self._ua_seen, i), functools.partial(self._relogged, i))

    async def _keep_opening(self, i: int) -> None:
        """A path that was down at the first login: tried again until it logs in."""
        delay = 0.5
        while not self._closed and self.sessions[i] is None:
            try:
                await self._login(i)
                s = self.sessions[i]
                assert s is not None
                await self._check_lu(i, s)
            except (IscsiError, LoginError, OSError, TimeoutError) as exc:
                if i in self._wrong:
                    self.log.error("path %d left out: %s", i, exc)
                    return
                self.log.debug("path %d (%s) not open yet: %s", i, self.set.paths[i].url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _check_lu(self, i: int, s: Session) -> None:
        page = await s.inquiry(0x83, alloc=1024, lun=self.lun)
        if self._designators is None:
            self._designators = page
            return
        try:
            ok = same_lu([self._designators, page])
        except PrDecodeError:
            ok = False
        if not ok:
            self._wrong.add(i)
            raise IscsiError(f"path {i} ({self.set.paths[i].url}) reaches another logical unit than path 0"
                             " (VPD 83h logical unit designators differ): every backend= must name the same LUN")

    async def _learn(self) -> None:
        """What the target has registered on the paths (READ FULL STATUS; a
        host restarted with the guest registered): the key, the holder,
        the paths that must register again before they carry I/O."""
        for i, s in enumerate(self.sessions):
            if s is not None and self.set.paths[i].state is PathState.DOWN:
                self.set.mark(i, PathState.UP)
        p = self.set.primary()
        if p is None or not self.rewrite:
            return
        s = self.sessions[p]
        assert s is not None
        rfs = await self._full_status(s)
        if rfs is None:
            return  # no READ FULL STATUS (tgt): the guest's own PR OUTs will tell
        self.set.seen(rfs)
        if self.set.key:
            for i, path in enumerate(self.set.paths):
                if not path.registered and self.sessions[i] is not None:
                    await self._register_path(i)

    async def _full_status(self, s: Session) -> ReadFullStatus | None:
        r = await s.submit_retrying(self.lun, pr_in_cdb(PrInAction.READ_FULL_STATUS, PR_IN_READ), b"", PR_IN_READ)
        if r.status != Status.GOOD:
            return None
        try:
            return ReadFullStatus.decode(bytes(r.data_in))
        except PrDecodeError:
            return None

    # ----------------------------------------------------------- watching
    def _arm_watch(self) -> None:
        if not self._closed:
            self._watch = self._loop.call_later(WATCH_INTERVAL, self._look)

    def _look(self) -> None:
        self._watch = None
        for i, s in enumerate(self.sessions):
            if s is None or i in self._wrong:
                continue
            up = s.link.state is LinkState.UP and s.logged_in
            st = self.set.paths[i].state
            if st is not PathState.DOWN and not up:
                self._path_down(i)
            elif st is PathState.DOWN and up and i not in self._opening:
                self._opening.add(i)
                self._spawn(self._path_back(i))
        self._unpark()
        self._arm_watch()

    def _path_down(self, i: int) -> None:
        self.set.mark(i, PathState.DOWN)
        if self.set.scsi2 == i:  # the nexus loss releases a SCSI-2 reservation (SPC-2 5.5.1)
            self.set.scsi2 = None
        self.log.warning("path %d (%s, nexus %s) down: taken out", i, self.set.paths[i].url,
                         self.set.paths[i].transport_id)
        if self.set.holder == i and self.set.holder_lost():
            self._spawn(self._move_holder())

    async def _move_holder(self) -> None:
        async with self._pr_lock:
            await self._move_holder_locked()
        self._unpark()

    async def _move_holder_locked(self) -> None:
        """``PathSet.holder_lost``'s PREEMPT, then the other paths register again."""
        for op in self.set.holder_lost():
            r = await self._send_op(op)
            self.log.info("reservation of path %s moved to path %d: %s", self.set.holder, op.path,
                          "done" if r is not None and r.status == Status.GOOD else f"failed ({r})")
            if r is not None and r.status == Status.GOOD:
                again = self.set.answered(op.path, op.action, op.rtype, op.scope, op.rk, op.sark, op.aptpl)
                await self._register_again(again)

    async def _resync(self) -> None:
        """A PR OUT's outcome on a path that went down is in doubt: read
        what the LU has on the guest's paths (READ FULL STATUS on the new
        primary) and move a reservation left on the lost path, before the
        command is sent again there."""
        await self._refresh()
        await self._move_holder_locked()

    async def _path_back(self, i: int) -> None:
        """A path logged in again: registered again (when the guest's key
        is still registered on the LU) before it carries I/O."""
        try:
            self.set.mark(i, PathState.REGISTERING)
            async with self._pr_lock:
                if self.set.key:  # kept through the outage or not: RAIEK restores or repeats it
                    await self._register_path(i)
                if self.set.paths[i].state is PathState.REGISTERING:
                    self.set.mark(i, PathState.UP)
                    self.log.info("path %d (%s, nexus %s) back: %s", i, self.set.paths[i].url,
                                  self.set.paths[i].transport_id,
                                  "registered again" if self.set.paths[i].registered else "carrying I/O")
        finally:
            self._opening.discard(i)
        self._unpark()

    async def _register_path(self, i: int) -> None:
        """RAIEK with the guest's key on path ``i``, if READ KEYS still lists
        the key (else another initiator removed it: the fencing stands)."""
        s = self.sessions[i]
        if s is None or not self.set.key:
            return
        if not await self._key_still_ours(s):
            self.log.warning("path %d: key 0x%x no longer registered on the LU: not registered again", i,
                             self.set.key)
            self.set.lost()
            return
        op = self.set.back_op(i)
        if op is not None:
            r2 = await self._send_op(op)
            if r2 is not None and r2.status == Status.GOOD:
                self.set.registered_on(i, op.sark)
            else:
                self.log.warning("path %d: REGISTER AND IGNORE EXISTING KEY failed: %s", i, r2)

    async def _key_still_ours(self, s: Session) -> bool:
        """Is the guest's key registered on one of its paths' nexuses? READ
        FULL STATUS tells; without it (tgt) READ KEYS listing the key."""
        r = await s.submit_retrying(self.lun, pr_in_cdb(PrInAction.READ_FULL_STATUS, PR_IN_READ), b"", PR_IN_READ)
        try:
            if r.status == Status.GOOD:
                return any(e.key == self.set.key and self.set._ours(e.transport_id) is not None
                           for e in ReadFullStatus.decode(bytes(r.data_in)).entries)
            r = await s.submit_retrying(self.lun, pr_in_cdb(PrInAction.READ_KEYS, PR_IN_READ), b"", PR_IN_READ)
            return r.status == Status.GOOD and self.set.key in ReadKeys.decode(bytes(r.data_in)).keys
        except PrDecodeError:
            return False

    async def _unregister(self, ops: list[Op]) -> None:
        """After a REGISTER AND MOVE with UNREG: the guest's other paths
        unregister (``PathSet.unregister_others``), then the state is read
        back."""
        for op in ops:
            r = await self._send_op(op)
            if r is not None and r.status == Status.GOOD:
                self.set.unregistered_on(op.path)
            else:
                self.log.warning("path %d: key 0x%x not unregistered after REGISTER AND MOVE (%s)",
                                 op.path, op.rk, r)
        await self._refresh()

    async def _register_again(self, paths: list[int]) -> None:
        """After a PREEMPT of the guest's own key: the other paths register
        again (carrying no I/O meanwhile)."""
        for i in paths:
            if self.set.paths[i].state is PathState.UP:
                self.set.mark(i, PathState.REGISTERING)
        for i in paths:
            op = self.set.back_op(i)
            if op is None or self.sessions[i] is None:
                continue
            r = await self._send_op(op)
            if r is not None and r.status == Status.GOOD:
                self.set.registered_on(i, op.sark)
            if self.set.paths[i].state is PathState.REGISTERING:
                self.set.mark(i, PathState.UP)
        # what the PREEMPT left (a reservation, or none: SPC-5 5.14.11.4.4
        # with no reservation only removes registrations), read back
        await self._refresh()
        self._unpark()

    async def _refresh(self) -> None:
        """READ FULL STATUS on the primary path: who holds what on the
        guest's paths, after a PR OUT whose effect depends on the state of
        other nexuses (``_READ_BACK``). Without READ FULL STATUS (tgt) the
        path set keeps what the answers told it."""
        p = self.set.primary()
        s = None if p is None else self.sessions[p]
        rfs = None if s is None or not self.rewrite else await self._full_status(s)
        if rfs is not None:
            self.set.seen(rfs)

    async def _send_op(self, op: Op) -> Result | None:
        s = self.sessions[op.path]
        if s is None:
            return None
        cdb = pr_out_cdb(op.action, op.rtype, op.scope)
        data = pr_out_params(op.rk, op.sark, aptpl=op.aptpl, all_tg_pt=op.all_tg_pt)
        self._busy += 1
        self._managing += 1
        try:
            return await s.submit_retrying(self.lun, cdb, data, 0, tries=UA_RETRIES)
        except IscsiError as exc:
            self.log.warning("path %d: %s failed: %s", op.path, op.action.name, exc)
            return None
        finally:
            self._busy -= 1
            self._managing -= 1

    # ----------------------------------------------------------- unit attentions, re-logins
    def _ua_seen(self, i: int, lun: int, sense: Any) -> None:
        """The primary path's unit attentions are the guest's (the device
        hears of them); those met on other paths are retried there. SPC-5
        5.14.11.4: 2A/05 REGISTRATIONS PREEMPTED says this path's nexus lost
        its registration, 2A/03 / 2A/04 its reservation."""
        if sense.asc == 0x2A and sense.ascq == 0x05:
            self.set.paths[i].registered = False
        elif sense.asc == 0x2A and sense.ascq in (0x03, 0x04) and self.set.holder == i:
            self.set.holder, self.set.rtype = None, PrType.NONE
        if self.on_unit_attention is not None and i == self.set.primary():
            self.on_unit_attention(lun, sense)

    async def _relogged(self, i: int) -> None:
        """Awaited by path ``i``'s session after a re-login, before what it
        holds goes: the device's check (its PR state verified)."""
        if self.on_reconnect is not None:
            await self.on_reconnect()

    # ----------------------------------------------------------- commands
    def _route(self, cdb: bytes) -> int | None:
        op = cdb[0] if cdb else -1
        if op in (_PR_OUT, _PR_IN) or op in _SCSI2:
            return self.set.primary()
        return self.set.media_path()

    def _dispatch(self, cmd: _Cmd) -> None:
        if self._closed:
            cmd.done(IscsiError("session is closed"))
            return
        i = self._route(cmd.cdb)
        s = None if i is None else self.sessions[i]
        if i is None or s is None:
            if cmd.parked_at is None:
                cmd.parked_at = self._loop.time()
            self._parked.append(cmd)
            return
        try:
            s.submit_then(cmd.lun, cmd.cdb, cmd.data_out, cmd.n, functools.partial(self._answered, cmd, i))
        except ValueError:  # a CDB the initiator cannot send: as the single-path device answers it
            cmd.done(Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB)))
        except IscsiError as exc:
            self._loop.call_soon(self._answered, cmd, i, exc)

    def _answered(self, cmd: _Cmd, i: int, r: Result | BaseException) -> None:
        s = self.sessions[i]
        path_up = s is not None and s.link.state is LinkState.UP and self.set.paths[i].state is not PathState.DOWN
        again = False
        if isinstance(r, BaseException):
            again = isinstance(r, IscsiError) and not self._closed
        elif r.status == Status.BUSY and not path_up:
            again = True  # held on a path that went down: on another one
        elif r.status == Status.RESERVATION_CONFLICT and cmd.cdb[0] not in (_PR_OUT, _PR_IN) and (
                (self.set.key and not self.set.paths[i].registered) or self.set.paths[i].state is not PathState.UP
                or self._managing):
            again = True  # a path our own PR OUTs are re-registering (else the conflict is the guest's)
        elif r.status == Status.RESERVATION_CONFLICT and cmd.cdb[0] not in (_PR_OUT, _PR_IN) and not cmd.rechecked \
                and self.set.key and not (self.set.holder == i and self.set.rtype in HOLDER_ONLY_TYPES) \
                and self._loop.time() - self._rechecked_at >= RECHECK_INTERVAL:
            cmd.rechecked = True  # sent by round robin: is the guest a holder we do not know of?
            self._recheck(cmd)
            return
        elif unit_attention(r) is not None and i != self.set.primary() and cmd.uas < UA_RETRIES:
            cmd.uas += 1  # not the primary's: absorbed, sent again
            self._loop.call_soon(self._dispatch, cmd)
            return
        elif isinstance(r, Result) and r.status == Status.GOOD and cmd.cdb[0] in _SCSI2:
            # SAM-5 / SPC-2 RESERVE(6/10): an I_T nexus's; the guest's commands stay on its path
            self.set.scsi2 = i if cmd.cdb[0] in (Opcode.RESERVE_6, Opcode.RESERVE_10) else None
        if again and cmd.moves < MOVES:
            cmd.moves += 1
            if self.set.paths[i].state is not PathState.DOWN and not path_up:
                self._path_down(i)
            self._loop.call_soon(self._dispatch, cmd)
            return
        cmd.done(r)

    def _recheck(self, cmd: _Cmd) -> None:
        """A media command met RESERVATION CONFLICT on a path chosen by
        round robin: the guest's nexus may have become the holder of a
        write exclusive / exclusive access reservation without a PR OUT of
        ours (another nexus's REGISTER AND MOVE onto it, a migration's: SPC-5
        5.14.8 sends that nexus no unit attention). One READ FULL STATUS for
        every command that meets it meanwhile, then each is sent again where
        the path set now says; a conflict after that is the guest's. At most
        one such look per ``RECHECK_INTERVAL``: a guest fenced for good gets
        its conflicts without a READ FULL STATUS each."""
        if self._rechecking is not None:
            self._rechecking.append(cmd)
            return
        self._rechecking = [cmd]

        async def look() -> None:
            try:
                async with self._pr_lock:
                    await self._refresh()
            finally:
                self._rechecked_at = self._loop.time()
                waiting, self._rechecking = self._rechecking or [], None
                for c in waiting:
                    self._dispatch(c)

        self._spawn(look())

    def _unpark(self) -> None:
        if not self._parked:
            return
        parked, self._parked = self._parked, []
        now = self._loop.time()
        for cmd in parked:
            if self._route(cmd.cdb) is not None:
                self._dispatch(cmd)
            elif cmd.parked_at is not None and now - cmd.parked_at >= self.hold_timeout:
                cmd.done(Result(Status.BUSY, b"", b""))  # SAM-5 5.3.1, as a single path session answers
            else:
                self._parked.append(cmd)

    def submit_then(self, lun: int, cdb: bytes, data_out: Any, data_in_len: int,
                    done: Callable[[Result | BaseException], Any]) -> None:
        if self._closed:
            raise IscsiError("session is closed")
        cdb = bytes(cdb)
        if cdb and cdb[0] == _PR_OUT:
            fut = self._loop.create_future()
            fut.add_done_callback(lambda f: done(f.exception() or f.result()) if not f.cancelled() else None)
            self._spawn(self._pr_out(lun, cdb, bytes(data_out), fut))
            return
        if cdb and cdb[0] == _PR_IN and self.rewrite and len(cdb) >= 9:
            alloc = int.from_bytes(cdb[7:9], "big")
            big = bytearray(cdb)
            big[7:9] = max(alloc, PR_IN_READ).to_bytes(2, "big")

            def rewritten(r: Result | BaseException) -> None:
                if isinstance(r, Result) and r.status == Status.GOOD:
                    r = Result(r.status, rewrite_pr_in(cdb, bytes(r.data_in), alloc, self.peers), r.sense)
                done(r)

            self._dispatch(_Cmd(lun, bytes(big), data_out, max(alloc, PR_IN_READ), rewritten))
            return
        self._dispatch(_Cmd(lun, cdb, data_out, data_in_len, done))

    def submit(self, lun: int, cdb: bytes, data_out: Any = b"", data_in_len: int = 0, **_: Any) -> asyncio.Future[Result]:
        fut: asyncio.Future[Result] = self._loop.create_future()
        self.submit_then(lun, cdb, data_out, data_in_len, functools.partial(settle, fut))
        return fut

    def submit_relay(self, lun: int, cdb: bytes, data_in_len: int, sink: Any, token: Any,
                     data_out: Any = b"") -> None:
        """The relayed read/write: completed through ``sink`` as the path's would be."""

        def done(r: Result | BaseException) -> None:
            if isinstance(r, Result) and r.status == Status.GOOD and data_in_len and len(r.data_in) == data_in_len:
                sink.relay_data(token, int(r.status), bytearray(r.data_in))
            else:
                sink.relay_result(token, r)

        self.submit_then(lun, cdb, data_out, data_in_len, done)

    async def submit_retrying(self, lun: int, cdb: bytes, data_out: Any = b"", data_in_len: int = 0, *,
                              tries: int = UA_RETRIES, on_retry: Callable[[Result], Any] | None = None) -> Result:
        return await retry_unit_attentions(self.submit, lun, cdb, data_out, data_in_len, tries, on_retry)

    # ----------------------------------------------------------- PR OUT
    async def _pr_out(self, lun: int, cdb: bytes, data: bytes, fut: asyncio.Future[Result]) -> None:
        """A PR OUT as ``paths.PR_OUT_ROUTES`` says: on the primary; after a
        GOOD REGISTER, the same registration on every other path; after a
        PREEMPT of the guest's own key, the other paths registered again
        (answered first: the takeover's one round trip)."""
        self._busy += 1
        try:
            async with self._pr_lock:
                i, r = await self._pr_out_primary(lun, cdb, data)
                if fut.done():
                    return
                if not isinstance(r, Result) or r.status != Status.GOOD or i is None:
                    settle(fut, r)
                    return
                action, rtype, scope = cdb[1] & 0x1F, cdb[2] & 0x0F, cdb[2] >> 4
                try:
                    p = PrOutParams.decode(data) if action != PrOutAction.REGISTER_AND_MOVE else None
                except ValueError:
                    p = None
                rk, sark = (p.rk, p.sark) if p is not None else (0, 0)
                aptpl = bool(p.aptpl) if p is not None else False
                again = self.set.answered(i, action, rtype, scope, rk, sark, aptpl)
                if self.set.route(action) is Route.EVERY_PATH and p is not None:
                    ops = self.set.fan_out(i, sark, aptpl, p.all_tg_pt)
                    answers = await asyncio.gather(*(self._send_op(op) for op in ops))
                    for op, a in zip(ops, answers, strict=True):
                        if a is not None and a.status == Status.GOOD:
                            self.set.registered_on(op.path, op.sark)
                        else:
                            self.log.warning("path %d: registration not carried (%s): it registers when it "
                                             "is back", op.path, a)
                            self.set.paths[op.path].registered = False
                    settle(fut, r)
                    return
                moved = _unreg(data) if action == PrOutAction.REGISTER_AND_MOVE else False
                leave = self.set.unregister_others(i) if moved else []
                settle(fut, r)
                if again:
                    await self._register_again(again)
                elif leave:
                    await self._unregister(leave)
                elif action in _READ_BACK:
                    await self._refresh()
        except Exception as exc:  # noqa: BLE001 - the guest gets the error as a path's answer
            settle(fut, exc)
        finally:
            self._busy -= 1
            self._unpark()

    async def _pr_out_primary(self, lun: int, cdb: bytes, data: bytes) -> tuple[int | None, Result | BaseException]:
        """The PR OUT on the primary path, re-issued on another when that
        one fails; (the path that answered, its answer)."""
        tried = 0
        while True:
            i = self.set.primary()
            s = None if i is None else self.sessions[i]
            if s is None:
                if tried * WATCH_INTERVAL >= self.hold_timeout:
                    return None, Result(Status.BUSY, b"", b"")
                tried += 1
                await asyncio.sleep(WATCH_INTERVAL)
                continue
            answer: asyncio.Future[Result | BaseException] = self._loop.create_future()
            try:
                s.submit_then(lun, cdb, data, 0, functools.partial(_resolve, answer))
            except IscsiError as exc:
                answer.set_result(exc)
            r = await answer
            up = s.link.state is LinkState.UP
            if (isinstance(r, IscsiError) or (isinstance(r, Result) and r.status == Status.BUSY and not up)) \
                    and tried < MOVES:
                tried += 1
                if i is not None and not up and self.set.paths[i].state is not PathState.DOWN:
                    self.set.mark(i, PathState.DOWN)
                    self.log.warning("path %d down during a PR OUT: sent again on another path", i)
                await self._resync()
                continue
            return i, r

    # ----------------------------------------------------------- the rest of Session
    def _first(self) -> Session:
        i = self.set.primary()
        s = self.sessions[i] if i is not None else next((x for x in self.sessions if x is not None), None)
        if s is None:
            raise IscsiError("no path to the backend is open")
        return s

    async def lun_reset(self, lun: int) -> int:
        return await self._first().lun_reset(lun)  # resets the LU for every nexus

    async def clear_task_set(self, lun: int) -> int:
        answers = await asyncio.gather(*(s.clear_task_set(lun) for i, s in enumerate(self.sessions)
                                         if s is not None and self.set.paths[i].state is not PathState.DOWN),
                                       return_exceptions=True)
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return int(answers[0]) if answers else 0  # type: ignore[arg-type]

    async def inquiry(self, evpd_page: int | None = None, alloc: int = 255, *, lun: int | None = None) -> bytes:
        return await self._first().inquiry(evpd_page, alloc, lun=lun)

    async def read_capacity16(self, *, lun: int | None = None) -> tuple[int, int]:
        blocks, size = await self._first().read_capacity16(lun=lun)
        self.block_size = size or self.block_size
        return blocks, size

    async def report_supported_tmfs(self, *, lun: int | None = None) -> Any:
        return await self._first().report_supported_tmfs(lun=lun)

    def retry_now(self) -> None:
        for s in self.sessions:
            if s is not None:
                s.retry_now()

    @property
    def logged_in(self) -> bool:
        return any(s is not None and s.logged_in for s in self.sessions)

    @property
    def reconnects(self) -> int:
        return sum(s.reconnects for s in self.sessions if s is not None)

    @property
    def isid(self) -> int:
        return self.set.paths[0].transport_id.isid or 0

    def link_state(self) -> dict[str, Any]:
        """The set's state (up while a path is) and every path's, for ``query-devices``."""
        paths = self.set.describe()
        for p, s in zip(paths, self.sessions, strict=True):
            p["session"] = None if s is None else s.link_state()
        up = [p for p in paths if p["state"] == "up"]
        return {"state": "up" if up else "down", "paths": paths, "held-commands": len(self._parked),
                "reconnects": self.reconnects}

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            self.log.warning("path management: %s", t.exception())

    async def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.peers[:] = [p for p in self.peers if p is not self.set]
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for t in list(self._tasks):
            t.cancel()
        parked, self._parked = self._parked, []
        for cmd in parked:
            cmd.done(IscsiError("session closed"))
        await asyncio.gather(*(s.close(timeout) for s in self.sessions if s is not None), return_exceptions=True)
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _unreg(data: bytes) -> bool:
    """The UNREG bit of a REGISTER AND MOVE parameter list (False when it
    does not decode: the target refused it then)."""
    try:
        return RegisterAndMoveParams.decode(data).unreg
    except ValueError:
        return False


def _resolve(fut: asyncio.Future[Any], r: Any) -> None:
    if not fut.done():
        fut.set_result(r)


async def open_multipath(connect: Callable[..., Awaitable[Session]], urls: Sequence[str], target_iqn: str,
                         initiator: str, isids: Sequence[int], opts: dict[str, Any], *, rewrite_pr_in: bool,
                         lun: int, logger: Any, peers: list[PathSet] | None = None, on_unit_attention: Callable[[int, Any], Any] | None = None,
                         on_reconnect: Callable[[], Awaitable[Any]] | None = None) -> MultipathSession:
    """A ``MultipathSession`` over ``urls``, path ``i`` the nexus
    (``initiator``, ``isids[i]``); ``opts`` the plain sessions' options
    (each path holds its commands ``PATH_HOLD_TIMEOUT`` instead of their
    ``hold_timeout``, which the set keeps for when every path is down)."""
    from ..iscsi.url import parse_url

    hold = opts.get("hold_timeout") or HOLD_TIMEOUT
    path_opts = {k: v for k, v in opts.items() if k not in ("on_reconnect", "hold_timeout")}
    path_opts["hold_timeout"] = min(PATH_HOLD_TIMEOUT, hold)

    async def open_path(i: int, on_ua: Callable[[int, Any], Any], relogged: Callable[[], Awaitable[Any]]) -> Session:
        return await connect(parse_url(urls[i], require_lun=False), target_iqn, initiator, isids[i],
                             on_unit_attention=on_ua, on_reconnect=relogged, **path_opts)

    tids = [TransportId(initiator.lower(), isid) for isid in isids]
    mp = MultipathSession(urls, tids, open_path, rewrite_pr_in=rewrite_pr_in, peers=peers,
                          on_unit_attention=on_unit_attention,
                          on_reconnect=on_reconnect, lun=lun, hold_timeout=hold, logger=logger)
    return await mp.open()


async def open_paths_of(dev: Any, login: Login) -> Any:
    """The backend nexus ``login.what`` of the device ``dev``
    (``BackendSessions``) on each of its backends, path ``i`` with ISID
    ``login.isids[i]`` (``links.Login``); the monitor's answers are not
    rewritten (it reads the LU as it is)."""
    isids, opts = login.isids, login.options
    mp = await open_multipath(dev._connect, dev.config.backend_urls, dev.target_iqn, dev.host_initiator, isids,
                              opts, rewrite_pr_in=login.what != "monitor", lun=dev.lun, logger=dev.log,
                              peers=dev.path_sets, on_unit_attention=login.on_ua,
                              on_reconnect=opts.get("on_reconnect"))
    dev.log.info("backend nexus %s (%s) open on %d paths", ", ".join(
        f"{dev.host_initiator},i,0x{i:012x}" for i in isids), login.what, len(isids))
    return mp


__all__ = ["MultipathSession", "PATH_HOLD_TIMEOUT", "WATCH_INTERVAL", "open_multipath", "open_paths_of"]
