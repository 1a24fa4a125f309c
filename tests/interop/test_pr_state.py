"""Beyond the seed's limitations, with real processes (issue 5).

* restart safety: a clean stop, a kill -9, and a kill -9 between the
  backend's GOOD to the guest's RESERVE and the journal write (the
  ``PRMIGRATE_TEST_CRASH_AFTER_GOOD`` hook) are each followed by a restart
  and a migration that still moves the guest's reservation;
* reconciliation from the LUN: a reservation made with ``prmigrate pr`` on
  the device's backend nexus outside the guest is adopted (``reconcile-pr``)
  and migrates; a registration another initiator preempted is dropped
  before the migration and nothing stale lands on the destination;
* two guests on one host, same LUN, each through its own device, different
  keys, EA_RO held by one: each keeps its own registration through the
  migration of either, and neither can take over or release the other's;
* tgt (no READ FULL STATUS) as the backend: the READ KEYS + READ
  RESERVATION fallback is named in ``query-devices`` with what it cannot
  tell, and the reservation still migrates;
* operations: ``prmigrate host --status`` and the JSON lines event log.

The judge is READ FULL STATUS on the prmigrate target, from an observer
nexus (READ RESERVATION and the guest's own writes on tgt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prmigrate.device.identity import derive_isid
from prmigrate.device.passthrough import CRASH_ENV, KEYS_METHOD
from prmigrate.host.eventlog import read_events
from prmigrate.iscsi.initiator import connect
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadReservation, pr_out_params

from .conftest import INITIATOR1
from .migration_cluster import GUEST, INITIATORS, SHARED, ProcCluster, cluster, env
from .test_migration_e2e import KEY, Writer, guest_session, take_reservation

pytestmark = pytest.mark.interop

WE = PrType.WRITE_EXCLUSIVE
EA_RO = PrType(6)
GUEST2 = "iqn.2026-11.org.prmigrate:guest2"
VM2_FRONTEND = "iqn.2026-11.org.prmigrate:vm2"
KEY2 = 0x2222222222222222
OTHER_KEY = 0x0BAD0BAD0BAD0BAD


def _run(coro, timeout: float = 120):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _events(c: ProcCluster, host: str, name: str) -> list[dict[str, Any]]:
    path = c.workdir / f"{host}-state" / "events.jsonl"
    return [e for e in read_events(path) if e["event"] == name]


async def _device(c: ProcCluster, host: str, device: str = "vm1") -> dict[str, Any]:
    (d,) = await c.call(host, "query-devices", {"device": device})
    return d  # type: ignore[no-any-return]


async def _moved(c: ProcCluster, rtype: PrType | None, src: str = "hosta",
                 dst: str = "hostb") -> None:
    """The guest's key is on ``dst``'s nexus (holding ``rtype``), nothing on ``src``'s."""
    assert await c.entries_of(src) == []
    (e,) = await c.entries_of(dst)
    assert e.key == KEY
    assert e.holder == (rtype is not None)
    if rtype is not None:
        assert int(e.rtype) == rtype


async def _migrate_ok(c: ProcCluster, src: str = "hosta", dst: str = "hostb",
                      device: str = "vm1") -> str:
    code, out = await c.migrate(src, dst, device=device)
    assert code == 0, out
    await c.wait_device(dst, True, device=device)
    await c.wait_device(src, False, device=device)
    return out


async def _wait_back(s: Any) -> None:
    """The guest's session is usable again (it reconnects by itself)."""
    r = await s.submit(0, bytes(6), b"", 0)  # TEST UNIT READY
    for _ in range(3):
        if r.status == Status.GOOD:
            return
        r = await s.submit(0, bytes(6), b"", 0)  # unit attentions first
    assert r.status == Status.GOOD, r


# ------------------------------------------------------------ restart safety


@pytest.mark.parametrize("how", ["clean", "kill-9"])
def test_restart_then_migrate(tmp_path: Path, how: str) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, WE)
                a = c.procs["hosta"]
                if how == "clean":
                    a.proc.send_signal(signal.SIGTERM)
                else:
                    a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(15)
                c.restart_host("hosta")
                await c.wait_device("hosta", True)
                d = await _device(c, "hosta")
                g = d["pr-state"]["guests"][GUEST]
                assert g["key"] == f"0x{KEY:x}" and g["holder"] and g["verified"], d
                assert d["pr-state"]["method"] == "READ FULL STATUS"
                assert d["pr-state"]["last-verified"] is not None
                rec = _events(c, "hosta", "PR_RECONCILED")
                assert any(e["data"]["reason"] == "start (journal)" for e in rec), rec
                await _wait_back(s)
                w = Writer(s)
                await asyncio.sleep(0.2)
                await _migrate_ok(c)
                await asyncio.sleep(0.2)
                await w.stop()
                await _moved(c, WE)
                assert not w.bad, w.bad
                assert await w.verify() > 5
            finally:
                await s.close()

        _run(go())


def test_kill_between_good_and_journal_then_migrate(tmp_path: Path) -> None:
    """A dies (SIGKILL by the test hook) after the backend answered GOOD to
    the guest's RESERVE and before the journal recorded it: the journal has
    the registration and the RESERVE's intent. The restarted A reconciles,
    adopts the reservation, and the migration moves it."""
    with cluster(tmp_path, host_env={"hosta": {CRASH_ENV: "RESERVE"}}) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
                assert r.good, r
                reserve = asyncio.ensure_future(
                    s.pr_out(PrOutAction.RESERVE, WE, pr_out_params(KEY, 0)))
                a = c.procs["hosta"]
                await asyncio.get_running_loop().run_in_executor(None, a.proc.wait, 15)
                assert a.proc.returncode == -signal.SIGKILL, c.dump_logs()
                journal = json.loads((tmp_path / "hosta-state" / "vm1.pr.json").read_text())
                text = json.dumps(journal)
                assert "intent" in text, journal  # the RESERVE is only an intent
                (e,) = await c.entries_of("hosta")
                assert e.holder and e.key == KEY  # the LUN did reserve
                del c.host_env["hosta"]
                c.restart_host("hosta")
                await c.wait_device("hosta", True)
                d = await _device(c, "hosta")
                g = d["pr-state"]["guests"][GUEST]
                assert g["holder"] and g["type"] == "Write Exclusive" and g["verified"], d
                rec = _events(c, "hosta", "PR_RECONCILED")
                assert any(e["data"]["reason"] == "start (journal)" and e["data"]["changes"]
                           for e in rec), rec
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reserve, 30)
                await _wait_back(s)
                await _migrate_ok(c)
                await _moved(c, WE)
                w = Writer(s)
                await asyncio.sleep(0.3)
                await w.stop()
                assert not w.bad, w.bad
            finally:
                await s.close()

        _run(go())


# ---------------------------------------------------- reconciliation from the LUN


def _pr_tool(url: str, initiator: str, isid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prmigrate.cli", "pr", url, "--initiator", initiator,
         "--isid", f"0x{isid:012x}", *args],
        capture_output=True, text=True, timeout=30, env=env(),
    )


def test_reservation_made_outside_the_guest_is_adopted_and_migrates(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))  # the guest exists, holds nothing
            try:
                isid = derive_isid("vm1", GUEST)
                for args in (["--register", "--sa-key", f"{KEY:x}"],
                             ["--reserve", "--key", f"{KEY:x}", "--type", "1"]):
                    p = _pr_tool(c.target_url, INITIATORS["hosta"], isid, *args)
                    assert p.returncode == 0, p.stdout + p.stderr
                assert (await _device(c, "hosta"))["pr-state"]["guests"] == {}
                (res,) = await c.call("hosta", "reconcile-pr", {"device": "vm1"})
                assert res["method"] == "READ FULL STATUS" and res["changes"], res
                d = await _device(c, "hosta")
                g = d["pr-state"]["guests"][GUEST]
                assert g["holder"] and g["key"] == f"0x{KEY:x}", d
                rec = _events(c, "hosta", "PR_RECONCILED")
                assert any(e["data"]["reason"] == "reconcile-pr" for e in rec), rec
                w = Writer(s)
                await asyncio.sleep(0.2)
                await _migrate_ok(c)
                await asyncio.sleep(0.2)
                await w.stop()
                await _moved(c, WE)
                assert not w.bad, w.bad
            finally:
                await s.close()

        _run(go())


def test_preempted_registration_is_dropped_before_the_migration(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            other = await connect(c.target_url, initiator_name=INITIATOR1, isid=0x23D000000077,
                                  reconnect=False, command_timeout=10)
            try:
                await take_reservation(s, WE)
                r = await other.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, OTHER_KEY))
                assert r.good, r
                r = await other.pr_out(PrOutAction.PREEMPT, WE, pr_out_params(OTHER_KEY, KEY))
                assert r.good, r
                # the device has not been told: it still tracks the reservation
                g = (await _device(c, "hosta"))["pr-state"]["guests"][GUEST]
                assert g["holder"], g
                await _migrate_ok(c)
                # nothing stale on the destination, the preemptor keeps its reservation
                assert await c.entries_of("hostb") == []
                assert await c.entries_of("hosta") == []
                rfs = await c.full_status()
                (e,) = rfs.entries
                assert e.key == OTHER_KEY and e.holder and e.transport_id.name.lower() == INITIATOR1
                d = await _device(c, "hostb")
                assert d["pr-state"]["guests"] == {}, d
                rec = _events(c, "hosta", "PR_RECONCILED")
                assert any(e["data"]["reason"] == "before migration" and e["data"]["changes"]
                           for e in rec), rec
            finally:
                await other.close()
                await s.close()

        _run(go())


# ------------------------------------------------------- two guests, one host


def test_two_guests_on_one_host_keep_their_own_registrations(tmp_path: Path) -> None:
    c = ProcCluster(tmp_path)
    try:
        c.start_target()
        c.extra_devices = [f"name=vm2,backend={c.backend_url},target={VM2_FRONTEND},"
                           f"machine={c.machine}"]
        c.start()

        async def holder_port() -> tuple[str, int | None]:
            (h,) = [e for e in (await c.full_status()).entries if e.holder]
            return h.transport_id.name.lower(), h.transport_id.isid

        async def go() -> None:
            p = c.procs["hosta"]
            g1 = await guest_session(c.frontend_url("hosta"))
            g2 = await connect(f"iscsi://{p.host}:{p.port}/{VM2_FRONTEND}/0",
                               initiator_name=GUEST2, isid=0x23D000000043, command_timeout=30,
                               reconnect_timeout=30)
            try:
                await take_reservation(g1, EA_RO)
                r = await g2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY2))
                assert r.good, r
                g1_port = (INITIATORS["hosta"], derive_isid("vm1", GUEST))
                assert await holder_port() == g1_port
                # guest2 cannot release or take guest1's reservation with guest1's key
                r = await g2.pr_out(PrOutAction.RELEASE, EA_RO, pr_out_params(KEY2, 0))
                assert r.good, r  # a registrant that is not the holder: no effect
                r = await g2.pr_out(PrOutAction.RESERVE, EA_RO, pr_out_params(KEY, 0))
                assert r.status == Status.RESERVATION_CONFLICT, r
                r = await g2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(KEY, 0x3333))
                assert r.status == Status.RESERVATION_CONFLICT, r
                assert await holder_port() == g1_port
                vm2 = (await _device(c, "hosta", "vm2"))["pr-state"]["guests"]
                assert list(vm2) == [GUEST2] and not vm2[GUEST2]["holder"], vm2
                vm1 = (await _device(c, "hosta", "vm1"))["pr-state"]["guests"]
                assert list(vm1) == [GUEST] and vm1[GUEST]["holder"], vm1

                await _migrate_ok(c, device="vm1")
                (e1,) = await c.entries_of("hostb")
                assert e1.key == KEY and e1.holder and int(e1.rtype) == EA_RO
                (e2,) = await c.entries_of("hosta", GUEST2, "vm2")
                assert e2.key == KEY2 and not e2.holder
                assert await c.entries_of("hosta") == []
                await _wait_back(g2)
                await g2.write(10, b"\x22" * 512)  # a registrant of EA_RO may write

                await _migrate_ok(c, device="vm2")
                (e2,) = await c.entries_of("hostb", GUEST2, "vm2")
                assert e2.key == KEY2 and not e2.holder
                assert await c.entries_of("hosta", GUEST2, "vm2") == []
                (e1,) = await c.entries_of("hostb")
                assert e1.key == KEY and e1.holder and int(e1.rtype) == EA_RO
                assert len((await c.full_status()).entries) == 2
                await _wait_back(g1)
                await g1.write(11, b"\x11" * 512)
                await _wait_back(g2)
                await g2.write(12, b"\x22" * 512)
            finally:
                await g2.close()
                await g1.close()

        _run(go())
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()


# ------------------------------------------------------------- tgt backend


def test_tgt_backend_uses_the_keys_fallback_and_migrates(tmp_path: Path) -> None:
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
                try:
                    await take_reservation(s, WE)
                    (res,) = await c.call("hosta", "reconcile-pr", {"device": "vm1"})
                    assert res["method"] == KEYS_METHOD, res
                    d = await _device(c, "hosta")
                    pr = d["pr-state"]
                    assert pr["method"] == KEYS_METHOD
                    assert any("which nexus" in x for x in pr["method-cannot-tell"]), pr
                    assert pr["guests"][GUEST]["holder"], pr
                    st = subprocess.run(
                        [sys.executable, "-m", "prmigrate.cli", "host", "--status",
                         "--control", str(c.procs["hosta"].control)],
                        capture_output=True, text=True, timeout=30, env=env())
                    assert st.returncode == 0, st.stderr
                    assert "READ KEYS + READ RESERVATION" in st.stdout
                    assert "cannot tell" in st.stdout, st.stdout
                    w = Writer(s)
                    await asyncio.sleep(0.2)
                    await _migrate_ok(c)
                    await asyncio.sleep(0.2)
                    await w.stop()
                    # the guest kept write access through B; tgt reports POWER ON
                    # RESET on each new nexus, and the guest is owed B's once
                    assert all("POWER ON RESET" in b for b in w.bad), w.bad
                    assert len(w.bad) <= 1, w.bad
                    assert await w.verify() > 5
                    g = (await _device(c, "hostb"))["pr-state"]["guests"][GUEST]
                    assert g["holder"] and g["key"] == f"0x{KEY:x}", g
                    obs = await connect(url, initiator_name=INITIATOR1, isid=0x23D000000078,
                                        reconnect=False, command_timeout=10)
                    try:
                        r = await obs.pr_in(PrInAction.READ_RESERVATION)
                        rr = ReadReservation.decode(bytes(r.data_in))
                        assert rr.key == KEY and int(rr.rtype) == WE, rr
                        r = await obs.pr_in(PrInAction.READ_KEYS)
                        assert r.good
                    finally:
                        await obs.close()
                finally:
                    await s.close()

            _run(go())
    finally:
        t.stop()


# ------------------------------------------------------------- operations


def test_status_and_event_log(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, WE)
                control = str(c.procs["hosta"].control)
                st = subprocess.run(
                    [sys.executable, "-m", "prmigrate.cli", "host", "--status", "--control",
                     control], capture_output=True, text=True, timeout=30, env=env())
                assert st.returncode == 0, st.stderr
                out = st.stdout
                assert "device vm1" in out and GUEST in out, out
                assert f"key 0x{KEY:x}, holds Write Exclusive" in out, out
                assert f"guest URL: {c.frontend_url('hosta')}" in out, out
                assert INITIATORS["hosta"] in out and "verified:" in out, out
                assert "by READ FULL STATUS" in out, out
                js = subprocess.run(
                    [sys.executable, "-m", "prmigrate.cli", "host", "--status", "--json",
                     "--control", control], capture_output=True, text=True, timeout=30, env=env())
                (d,) = json.loads(js.stdout)
                g = d["pr-state"]["guests"][GUEST]
                assert g["backend-nexus"].startswith(INITIATORS["hosta"]), g
                await _migrate_ok(c)
            finally:
                await s.close()

        _run(go())
        changed = _events(c, "hosta", "PR_STATE_CHANGED")
        assert any(e["data"]["changes"][0]["after"].get("holder") for e in changed), changed
        rec = _events(c, "hosta", "PR_RECONCILED")
        assert {"start", "before migration"} <= {e["data"]["reason"] for e in rec}, rec
        mig = _events(c, "hosta", "MIGRATION")
        assert mig and mig[-1]["data"].get("success") is True, mig
        assert mig[-1]["data"]["timings"]["pause_s"] is not None, mig[-1]
        dst = _events(c, "hostb", "MIGRATION")
        assert dst and dst[-1]["data"].get("success") is True, dst
        assert _events(c, "hostb", "PR_STATE_CHANGED") or _events(c, "hostb", "DEVICE_ADDED")
