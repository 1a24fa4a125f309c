"""A guest whose key another host shares moves by REGISTER AND MOVE.

``prmigrate target`` (127.0.0.1), host daemons A and B (``migration_cluster``)
and a third initiator, the other host, registered directly on the target
with the guest's key (as another node of a cluster sharing the key). A
takeover PREEMPT would remove that registration too, so for a single
holder (types 1, 3, 5, 6) the source moves the reservation to B's nexus
with one PERSISTENT RESERVE OUT REGISTER AND MOVE inside the pause; the
other cases (register-only, all-registrants) move as before, by the
destination's setup registration and the source's release. Judged by
READ FULL STATUS from an independent observer nexus: B's nexus holds,
the other host's nexus is still registered with the key, nothing of A is
left. Then the rollbacks (the channel cut once the reservation moved, the
operator cancelling while it is on B) and a backend without REGISTER AND
MOVE, which refuses the move before the pause.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from prmigrate.iscsi.initiator import Session, connect
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType
from prmigrate.scsi.pr import ReadKeys, ReadReservation, pr_out_params

from .migration_cluster import SHARED, FrameProxy, ProcCluster, cluster
from .test_migration_e2e import KEY, Writer, guest_session, take_reservation

pytestmark = pytest.mark.interop

OTHER_HOST = "iqn.2026-11.org.prmigrate:other-node"
OTHER_ISID = 0x23D0000000A1
SINGLE = [PrType(t) for t in (1, 3, 5, 6)]
RTYPES = [None, *SINGLE, PrType(7), PrType(8)]


def _run(coro, timeout: float = 150):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def other_host(c: ProcCluster) -> Session:
    """Another host's nexus registered with the guest's key, on the target directly."""
    s = await connect(c.target_url, initiator_name=OTHER_HOST, isid=OTHER_ISID, command_timeout=10,
                      reconnect=False)
    r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
    assert r.good, r
    return s


async def other_entries(c: ProcCluster) -> list[Any]:
    return [e for e in (await c.full_status()).entries
            if e.transport_id.name.lower() == OTHER_HOST and e.transport_id.isid == OTHER_ISID]


async def judge(c: ProcCluster, on: str, off: str, rtype: PrType | None) -> None:
    """READ FULL STATUS from the observer: ``on``'s nexus has the key and,
    with a type, holds it; ``off``'s has nothing; the other host's nexus is
    registered with the key (a holder too under an all-registrants type)."""
    (e,) = await c.entries_of(on)
    assert e.key == KEY, e
    if rtype is None:
        assert not any(x.holder for x in (await c.full_status()).entries)
    else:
        assert e.holder and int(e.rtype) == rtype and e.scope == 0, e
    assert await c.entries_of(off) == []
    (o,) = await other_entries(c)
    assert o.key == KEY and o.holder == (rtype is not None and rtype.all_registrants), o


@pytest.mark.parametrize("rtype", RTYPES, ids=lambda t: "register-only" if t is None else t.name)
def test_a_shared_key_moves_and_the_other_host_stays_registered(tmp_path: Path, rtype: PrType | None) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            o = await other_host(c)
            try:
                await take_reservation(s, rtype)
                w = Writer(s)
                await asyncio.sleep(0.2)
                code, out = await c.migrate("hosta", "hostb")
                await asyncio.sleep(0.3)
                await w.stop()
                assert code == 0, out
                assert "PR round trips in the pause: 1" in out, out
                await c.wait_device("hostb", True)
                await c.wait_device("hosta", False)
                await judge(c, "hostb", "hosta", rtype)
                moved = "by REGISTER AND MOVE" in c.procs["hostb"].log
                assert moved == (rtype in SINGLE), c.procs["hostb"].log[-3000:]
                assert not w.bad, w.bad
                assert await w.verify() > 10
            finally:
                await s.close()
                await o.close()

        _run(go())


def test_there_and_back_again_by_register_and_move(tmp_path: Path) -> None:
    """A -> B -> A, each move a REGISTER AND MOVE (the other host's
    registration stays throughout)."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            o = await other_host(c)
            try:
                await take_reservation(s, PrType.EXCLUSIVE_ACCESS)
                for src, dst in (("hosta", "hostb"), ("hostb", "hosta")):
                    code, out = await c.migrate(src, dst)
                    assert code == 0, out
                    assert "PR round trips in the pause: 1" in out, out
                    await c.wait_device(dst, True)
                    await c.wait_device(src, False)
                    await judge(c, dst, src, PrType.EXCLUSIVE_ACCESS)
                assert c.procs["hosta"].log.count("by REGISTER AND MOVE") == 1  # A was the destination once
            finally:
                await s.close()
                await o.close()

        _run(go())


async def _move_with(c: ProcCluster, rule: Any, rtype: PrType, during: Any = None) -> tuple[int, str, Writer, Session, Session]:
    s = await guest_session(c.frontend_url("hosta"))
    o = await other_host(c)
    await take_reservation(s, rtype)
    proxy = FrameProxy(("127.0.0.3", c.procs["hostb"].migrate_port), rule)
    to = await proxy.start()
    w = Writer(s)
    await asyncio.sleep(0.2)
    try:
        side = asyncio.ensure_future(during(c)) if during is not None else None
        code, out = await c.migrate("hosta", "hostb", to=to)
        if side is not None:
            await side
    finally:
        await proxy.close()
    return code, out, w, s, o


async def _guest_fine(w: Writer, s: Session, o: Session) -> None:
    await asyncio.sleep(0.5)
    await w.stop()
    assert not w.bad, w.bad
    assert await w.verify() > 5
    await s.close()
    await o.close()


def test_channel_cut_after_the_move_gives_the_reservation_back(tmp_path: Path) -> None:
    """The channel is cut when B reports the takeover (the reservation is on
    B's nexus): B moves it back to A's nexus by REGISTER AND MOVE, A
    registers again and RESERVEs after its rollback timer; no PREEMPT: the
    other host's registration is there throughout."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            return "cut" if frame == "TAKEOVER_DONE" else None

        async def go() -> None:
            code, out, w, s, o = await _move_with(c, rule, PrType.WRITE_EXCLUSIVE)
            assert code == 1, out
            assert "stays on the source" in out, out
            await judge(c, "hosta", "hostb", PrType.WRITE_EXCLUSIVE)
            assert "moving the reservation back to the source's nexus" in c.procs["hostb"].log
            await _guest_fine(w, s, o)
            await c.wait_device("hostb", False, timeout=45)
            await judge(c, "hosta", "hostb", PrType.WRITE_EXCLUSIVE)

        _run(go())


def test_cancel_while_the_reservation_is_on_the_destination(tmp_path: Path) -> None:
    """TAKEOVER_DONE is held back while the operator cancels: A sends
    ROLLBACK, B moves the reservation back and ACKs, A reclaims (register,
    RESERVE) and resumes the guest."""
    with cluster(tmp_path) as c:
        held = asyncio.Event()

        def rule(direction: str, frame: str) -> float | None:
            if frame == "TAKEOVER_DONE":
                held.set()
                return 2.0
            return None

        async def cancel(c: ProcCluster) -> None:
            await asyncio.wait_for(held.wait(), 30)
            code, out = await c.migrate("hosta", "hostb", "--cancel")
            assert code == 0 and "cancelled" in out, out

        async def go() -> None:
            code, out, w, s, o = await _move_with(c, rule, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, cancel)
            assert code == 1, out
            assert "cancelled" in out, out
            await judge(c, "hosta", "hostb", PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
            await c.wait_device("hostb", False, timeout=45)
            await judge(c, "hosta", "hostb", PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
            await _guest_fine(w, s, o)

        _run(go())


def test_a_backend_without_register_and_move_refuses_the_move(tmp_path: Path) -> None:
    """The target says REGISTER AND MOVE is not supported (REPORT SUPPORTED
    OPERATION CODES): the move is refused in setup, before the pause, with
    the reason; the guest keeps running on A with its reservation."""
    with cluster(tmp_path, without_register_and_move=True) as c:

        async def go() -> None:
            code, out, w, s, o = await _move_with(c, lambda d, f: None, PrType.WRITE_EXCLUSIVE)
            assert code == 1, out
            assert "does not support REGISTER AND MOVE" in out, out
            assert "also registered by" in out and OTHER_HOST in out, out
            await c.wait_device("hostb", False)
            await judge(c, "hosta", "hostb", PrType.WRITE_EXCLUSIVE)
            await _guest_fine(w, s, o)
            assert "REGISTER AND MOVE from" not in c.procs["target"].log  # never tried

        _run(go())


def test_tgt_refuses_the_move_before_the_pause(tmp_path: Path) -> None:
    """tgt (1.0.85) as the backend: no READ FULL STATUS (the shared key
    shows in READ KEYS), and a REGISTER AND MOVE that cannot serve here:
    it names its destination nexus nowhere (no relative target port in VPD
    83h, no REPORT TARGET PORT GROUPS), and it answers GOOD to a non-holder
    and looks the destination up by SARK among existing registrations,
    which a shared key makes ambiguous. The move is refused in setup, the
    guest keeps running on A with its reservation, the other host's
    registration stays."""
    from tests.iscsi.test_initiator import TGTADM, TGTD, Tgt

    if not (TGTD and TGTADM):
        pytest.fail("tgt (tgtd/tgtadm) is not installed: apt-get install tgt")
    t = Tgt(tmp_path)
    t.start()
    try:
        t.add_target(1, SHARED, 64 << 20)
        url = f"iscsi://127.0.0.1:{t.port}/{SHARED}/1"
        with cluster(tmp_path, backend=url) as c:

            async def go() -> None:
                s = await guest_session(c.frontend_url("hosta"))
                o = await connect(url, initiator_name=OTHER_HOST, isid=OTHER_ISID, command_timeout=10, reconnect=False)
                try:
                    await take_reservation(s, PrType.WRITE_EXCLUSIVE)
                    r = await o.submit(1, bytes(6))  # tgt: POWER ON RESET on a new nexus
                    r = await o.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
                    assert r.good, r
                    code, out = await c.migrate("hosta", "hostb")
                    assert code == 1, out
                    assert "also registered by" in out and "not moved" in out, out
                    assert "target port are not known" in out, out
                    assert "PR round trips in the pause: 0" in out, out  # never paused for it
                    await c.wait_device("hostb", False)
                    await c.wait_device("hosta", True)
                    keys = ReadKeys.decode(bytes((await o.pr_in(PrInAction.READ_KEYS)).data_in))
                    assert sorted(keys.keys) == [KEY, KEY], keys  # A's nexus and the other host's; none of B
                    rr = ReadReservation.decode(bytes((await o.pr_in(PrInAction.READ_RESERVATION)).data_in))
                    assert rr.key == KEY and int(rr.rtype) == PrType.WRITE_EXCLUSIVE, rr
                    # the guest still writes through A
                    r = await s.write(20, b"\x5a" * 512)
                    assert await s.read(20, 1) == b"\x5a" * 512
                finally:
                    await s.close()
                    await o.close()

            _run(go())
    finally:
        t.stop()


def test_a_two_path_device_moves_by_register_and_move(tmp_path: Path) -> None:
    """A two-path device (``backend=`` twice, the target's two portals)
    whose key the other host shares: A -> B -> A by REGISTER AND MOVE
    (UNREG) from the holder's path; the source's other path unregisters
    right after, the destination's paths both stay registered (setup), so
    after each move both of the new host's path nexuses have the key, one
    holds, nothing of the old host is left on any path, and the other
    host's registration is still there."""
    from .test_multipath_migration import path_entries, settled, two_path_cluster

    with two_path_cluster(tmp_path) as (c, _):

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            o = await other_host(c)
            try:
                await take_reservation(s, PrType.WRITE_EXCLUSIVE)
                w = Writer(s)
                for src, dst in (("hosta", "hostb"), ("hostb", "hosta")):
                    await asyncio.sleep(0.2)
                    code, out = await c.migrate(src, dst)
                    assert code == 0, out
                    assert "PR round trips in the pause: 1" in out, out
                    await c.wait_device(dst, True)
                    await c.wait_device(src, False)
                    seen = await settled(c, dst, gone=src)  # the source's other path unregisters right after
                    assert {p: k for p, (k, _, _) in seen.items()} == {0: KEY, 1: KEY}, seen
                    assert [p for p, (_, h, t) in seen.items() if h] == [0], seen
                    assert seen[0][2] == PrType.WRITE_EXCLUSIVE, seen
                    assert await path_entries(c, src) == {}, await c.full_status()
                    (e,) = await other_entries(c)
                    assert e.key == KEY and not e.holder, e
                assert c.procs["hostb"].log.count("by REGISTER AND MOVE") == 1
                await asyncio.sleep(0.3)
                await w.stop()
                assert not w.bad, w.bad
                assert await w.verify() > 10
            finally:
                await s.close()
                await o.close()

        _run(go())
