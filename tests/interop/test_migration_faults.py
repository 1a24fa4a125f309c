"""Faults at each phase of a migration, with real processes.

The migration channel runs through a ``FrameProxy`` that sees the frame
types, so a fault lands at an exact phase: the destination killed after
its setup or right after its PREEMPT, the source killed after it stopped
the guest, the channel cut, a frame held while the operator cancels, a
destination without the cluster secret. Invariants checked after each:
the guest ends on exactly one host, that host's nexus holds the guest's
reservation (READ FULL STATUS on the target), the other host's nexus holds
nothing, the guest never got RESERVATION CONFLICT and no acknowledged write
is lost; ``prmigrate migrate`` exits non-zero with the reason.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from prmigrate.scsi.constants import PrType

from .migration_cluster import INITIATORS, SECRET, FrameProxy, ProcCluster, cluster
from .test_migration_e2e import KEY, Writer, guest_session, take_reservation

pytestmark = pytest.mark.interop

WE = PrType.WRITE_EXCLUSIVE


def _run(coro, timeout: float = 150):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _sigkill(c: ProcCluster, name: str) -> None:
    p = c.procs[name].proc
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)


async def _holds(c: ProcCluster, host: str, other: str, rtype: PrType | None = WE) -> None:
    """The guest's key is on ``host``'s nexus only, holding ``rtype`` (None:
    registered, no reservation anywhere)."""
    (e,) = await c.entries_of(host)
    if rtype is None:
        assert e.key == KEY and not any(x.holder for x in (await c.full_status()).entries), e
    else:
        assert e.key == KEY and e.holder and int(e.rtype) == rtype, e
    assert await c.entries_of(other) == [], await c.entries_of(other)


async def _faulty_migration(c: ProcCluster, rule: Any, *, rtype: PrType | None = WE,
                            during: Any = None) -> tuple[int, str, Writer, Any]:
    """Guest on A holding ``rtype`` and writing; a migration to B through a
    FrameProxy with ``rule``; ``during(c)`` runs alongside. Returns the
    migrate exit status and output, the writer (still running) and the guest."""
    s = await guest_session(c.frontend_url("hosta"))
    await take_reservation(s, rtype)
    proxy = FrameProxy(("127.0.0.3", c.procs["hostb"].migrate_port), rule)
    to = await proxy.start()
    w = Writer(s)
    await asyncio.sleep(0.2)
    try:
        if during is not None:
            side = asyncio.ensure_future(during(c))
        code, out = await c.migrate("hosta", "hostb", to=to)
        if during is not None:
            await side
    finally:
        await proxy.close()
    return code, out, w, s


async def _guest_fine(w: Writer, s: Any) -> None:
    await asyncio.sleep(0.5)
    await w.stop()
    assert not w.bad, w.bad  # no RESERVATION CONFLICT, no error
    assert await w.verify() > 5
    await s.close()


@pytest.mark.parametrize("rtype", [WE, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, None],
                         ids=["WE", "WE_AR", "register-only"])
def test_destination_killed_after_setup(tmp_path: Path, rtype: PrType | None) -> None:
    """B dies once it registered the key (SETUP_OK never arrives): A keeps
    the guest and its reservation, and removes the registration the dead B
    left on its nexus (with an all-registrants type it would hold the
    reservation too) before the guest runs again."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            if frame == "SETUP_OK":
                _sigkill(c, "hostb")
                return "drop"
            return None

        async def go() -> None:
            code, out, w, s = await _faulty_migration(c, rule, rtype=rtype)
            assert code == 1, out
            assert "stays on the source" in out and "connection-lost" in out, out
            await c.wait_device("hosta", True)
            await _holds(c, "hosta", "hostb", rtype)
            await _guest_fine(w, s)

        _run(go())


@pytest.mark.parametrize("rtype", [WE, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                                   PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, None],
                         ids=["WE", "EA_RO", "EA_AR", "register-only"])
def test_destination_killed_after_its_preempt(tmp_path: Path, rtype: PrType) -> None:
    """B took the reservation and dies before the source hears of it: the
    source takes it back with a PREEMPT from its own nexus and resumes the
    guest; nothing is left on B's nexus."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            if frame == "TAKEOVER_DONE":
                _sigkill(c, "hostb")
                return "drop"
            return None

        async def go() -> None:
            code, out, w, s = await _faulty_migration(c, rule, rtype=rtype)
            assert code == 1, out
            assert "stays on the source" in out, out
            assert "PR round trips in the pause: 0" not in out  # the reclaim ran inside the pause
            await _holds(c, "hosta", "hostb", rtype)
            await _guest_fine(w, s)

        _run(go())


def test_source_killed_after_stop(tmp_path: Path) -> None:
    """A dies after holding the guest, before STATE reaches B: B never
    preempts, unregisters what it registered and drops the device; A comes
    back (same state dir), the guest reconnects to it and still holds its
    reservation."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            if frame == "STATE":
                _sigkill(c, "hosta")
                return "drop"
            return None

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            await take_reservation(s, WE)
            proxy = FrameProxy(("127.0.0.3", c.procs["hostb"].migrate_port), rule)
            to = await proxy.start()
            try:
                code, out = await c.migrate("hosta", "hostb", to=to)
            finally:
                await proxy.close()
            assert code != 0, out
            await c.wait_device("hostb", False)
            assert await c.entries_of("hostb") == []
            c.procs["hosta"].proc.wait(10)
            c.restart_host("hosta")
            await c.wait_device("hosta", True)
            await _holds(c, "hosta", "hostb")
            # the guest's session comes back to A by itself
            w = Writer(s)
            await _guest_fine(w, s)

        _run(go())


@pytest.mark.parametrize("at", ["SETUP_OK", "STATE", "TAKEOVER_DONE"])
def test_channel_cut(tmp_path: Path, at: str) -> None:
    """The channel dies before ``at`` is delivered: the source rolls back
    (taking the reservation back if B may have preempted) and B leaves no
    registration behind."""
    with cluster(tmp_path) as c:
        def rule(direction: str, frame: str) -> str | None:
            return "cut" if frame == at else None

        async def go() -> None:
            code, out, w, s = await _faulty_migration(c, rule)
            assert code == 1, out
            assert "stays on the source" in out, out
            await _holds(c, "hosta", "hostb")
            await _guest_fine(w, s)
            # B gives up its copy (after its rollback hold when it had preempted)
            await c.wait_device("hostb", False, timeout=45)
            await _holds(c, "hosta", "hostb")

        _run(go())


def test_cancel_while_the_destination_holds_the_reservation(tmp_path: Path) -> None:
    """TAKEOVER_DONE is held back for 2 s while the operator cancels: the
    source sends ROLLBACK, B (which preempted) ACKs and waits, the source
    reclaims, then B unregisters. Exit status 1, reason cancelled."""
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
            code, out, w, s = await _faulty_migration(c, rule, during=cancel)
            assert code == 1, out
            assert "cancelled" in out, out
            await _holds(c, "hosta", "hostb")
            await c.wait_device("hostb", False, timeout=20)
            await _holds(c, "hosta", "hostb")
            await _guest_fine(w, s)

        _run(go())


def test_peer_without_the_secret_is_refused(tmp_path: Path) -> None:
    with cluster(tmp_path, secrets={"hostb": "another-cluster-secret-xyz"}) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            await take_reservation(s, WE)
            code, out = await c.migrate("hosta", "hostb")
            assert code == 1, out
            assert "authentication" in out, out
            await c.wait_device("hosta", True)
            await _holds(c, "hosta", "hostb")
            assert (await c.call("hostb", "query-devices")) == []
            w = Writer(s)
            await _guest_fine(w, s)

        _run(go())
    assert SECRET


@pytest.mark.parametrize("rtype", [WE, PrType.EXCLUSIVE_ACCESS], ids=["WE", "EA"])
def test_backend_refuses_preempt(tmp_path: Path, rtype: PrType) -> None:
    """The target (its own process) answers B's PREEMPT with RESERVATION
    CONFLICT: B aborts without having preempted and unregisters, the source
    resumes the guest with its reservation untouched."""
    with cluster(tmp_path, refuse_preempt_from=INITIATORS["hostb"]) as c:

        async def go() -> None:
            code, out, w, s = await _faulty_migration(c, lambda d, f: None, rtype=rtype)
            assert code == 1, out
            assert "pr-takeover" in out and "RESERVATION CONFLICT" in out, out
            await _holds(c, "hosta", "hostb", rtype)
            await c.wait_device("hostb", False)
            await _holds(c, "hosta", "hostb", rtype)
            await _guest_fine(w, s)
            assert "refusing PREEMPT" in c.procs["target"].log

        _run(go())


def test_source_killed_after_the_destination_preempted(tmp_path: Path) -> None:
    """A dies after B's PREEMPT took the reservation, before RESUME: B never
    serves the guest (it waits for the source, then gives up and
    unregisters). A, started again, finds its record of the interrupted
    migration, holds the device before any guest command, takes the
    reservation back from its own nexus and serves the guest again."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            if frame == "TAKEOVER_DONE":
                _sigkill(c, "hosta")
                return "drop"
            return None

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            await take_reservation(s, WE)
            proxy = FrameProxy(("127.0.0.3", c.procs["hostb"].migrate_port), rule)
            to = await proxy.start()
            try:
                code, out = await c.migrate("hosta", "hostb", to=to)
            finally:
                await proxy.close()
            assert code != 0, out
            (b,) = await c.entries_of("hostb")  # B holds it now, and does not serve
            assert b.holder
            q = await c.call("hostb", "query-devices")
            assert not q[0]["frontend"]["exposed"], q
            c.procs["hosta"].proc.wait(10)
            c.restart_host("hosta")
            await c.wait_device("hosta", True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not await c.entries_of("hosta"):
                assert loop.time() < deadline, "A did not take its reservation back"
                await asyncio.sleep(0.1)
            await _holds(c, "hosta", "hostb")
            assert "interrupted migration" in c.procs["hosta"].log
            w = Writer(s)  # the guest's session comes back to A by itself
            await asyncio.sleep(0.5)
            # B gives up after its rollback hold and leaves nothing behind
            await c.wait_device("hostb", False, timeout=45)
            await _holds(c, "hosta", "hostb")
            await _guest_fine(w, s)

        _run(go(), 200)


def test_source_killed_right_after_resume(tmp_path: Path) -> None:
    """A dies (SIGKILL) as its RESUME passes, the commit point: B serves the
    guest. A, started again, finds its resume-sent marker: it never opens
    the device, lists it as moved to B's frontend portal and redirects a
    guest login there; the guest's own session lands on B by itself and its
    writes go on with its reservation."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            if frame == "RESUME" and direction == "to_dst":
                _sigkill(c, "hosta")
            return None

        async def go() -> None:
            code, out, w, s = await _faulty_migration(c, rule)
            assert code != 0, out  # the source died under prmigrate migrate
            c.procs["hosta"].proc.wait(10)
            await c.wait_device("hostb", True)
            await _holds(c, "hostb", "hosta")
            c.restart_host("hosta")
            host = await c.call("hosta", "query-host")
            assert host["devices"] == [], host
            assert host["moved"] == {"vm1": f"127.0.0.3:{c.procs['hostb'].port}"}, host
            assert await c.call("hosta", "query-devices") == []
            assert "passed its commit point" in c.procs["hosta"].log
            # another login at A is redirected to B, which serves the device
            other = await guest_session(c.frontend_url("hosta"), isid=0x23D000000077)
            try:
                assert len(await other.read(0, 1)) == 512
            finally:
                await other.close()
            await _holds(c, "hostb", "hosta")  # A's nexus never came back
            await _guest_fine(w, s)
            await _holds(c, "hostb", "hosta")
            assert "Traceback" not in c.procs["hosta"].log, c.procs["hosta"].log[-3000:]

        _run(go(), 200)


def test_channel_cut_after_resume_in_doubt(tmp_path: Path) -> None:
    """RESUME reached B (which serves the guest from then on) but its ACK
    never came back: A cannot know, ends in doubt (exit status 3), keeps the
    device held and still sends the guest's sessions to B, where the guest
    finds its reservation. A never serves the guest again."""
    with cluster(tmp_path) as c:

        def rule(direction: str, frame: str) -> str | None:
            return "cut" if frame == "ACK" and direction == "to_src" else None

        async def go() -> None:
            code, out, w, s = await _faulty_migration(c, rule)
            assert code == 3, out
            assert "in doubt" in out or "in_doubt" in out, out
            await _holds(c, "hostb", "hosta")
            (rec,) = await c.call("hosta", "query-migrate", {"device": "vm1"})
            assert rec["status"] == "in_doubt" and rec["finished"], rec
            qa = await c.call("hosta", "query-devices")
            assert qa[0]["held"] and not qa[0]["frontend"]["sessions"], qa
            qb = await c.call("hostb", "query-devices")
            assert qb[0]["frontend"]["sessions"], qb
            await _guest_fine(w, s)

        _run(go())
