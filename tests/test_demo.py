"""``prmigrate demo``: its pieces (stamped blocks, the ledger, the guest
workload against a real ``prmigrate target``) and the whole command run as a
subprocess, including that it leaves no process behind when interrupted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prmigrate.demo.cluster import Cluster
from prmigrate.demo.guest import Guest
from prmigrate.demo.observer import Observer, probe_write
from prmigrate.demo.stamp import Check, Ledger, read_stamp, stamp_block
from prmigrate.scsi.constants import PrOutAction, PrType, Status
from prmigrate.scsi.pr import pr_out_params

RUN = 0x1122334455667788


# ----------------------------------------------------------------- stamp


def test_stamp_round_trip_and_damage() -> None:
    b = stamp_block(RUN, 7, 42, 512)
    assert len(b) == 512
    assert read_stamp(b) is not None and read_stamp(b).seq == 7 and read_stamp(b).lba == 42
    assert stamp_block(RUN, 7, 42, 4096)[:32] == b[:32]
    for pos in (0, 20, 300, 511):  # magic, header, filler, CRC
        bad = bytearray(b)
        bad[pos] ^= 0x01
        assert read_stamp(bad) is None
    assert read_stamp(bytes(512)) is None
    assert read_stamp(b[:30]) is None
    with pytest.raises(ValueError):
        stamp_block(RUN, 1, 1, 16)


def test_ledger_verifies_and_never_rewrites_a_pending_lba() -> None:
    led = Ledger(RUN, first_lba=100, blocks=2)
    s1, l1 = led.issue()  # type: ignore[misc]
    s2, l2 = led.issue()  # type: ignore[misc]
    assert (l1, l2) == (100, 101)
    assert led.issue() is None  # both in flight
    led.acknowledged(s1, l1)
    assert led.issue() is None  # acknowledged, not read back yet
    assert led.check(l1, stamp_block(RUN, s1, l1)) is Check.VERIFIED
    s3, l3 = led.issue()  # type: ignore[misc]
    assert l3 == 100 and s3 == 3
    c = led.counters
    assert (c.issued, c.acknowledged, c.verified, c.lost) == (3, 1, 1, 0)


def test_ledger_detects_a_lost_write_once() -> None:
    led = Ledger(RUN, 0, 4)
    seq, lba = led.issue()  # type: ignore[misc]
    led.acknowledged(seq, lba)
    assert led.check(lba, bytes(512)) is Check.LOST
    assert led.check(lba, bytes(512)) is Check.LOST  # seen again: still one loss
    assert led.counters.lost == 1 and led.counters.verified == 0
    assert led.lost_writes == [(seq, lba, "no intact stamp")]


def test_ledger_write_that_vanished_after_verification_is_lost() -> None:
    led = Ledger(RUN, 0, 1)
    seq, lba = led.issue()  # type: ignore[misc]
    led.acknowledged(seq, lba)
    led.check(lba, stamp_block(RUN, seq, lba))
    assert led.counters.verified == 1
    older = stamp_block(RUN, seq - 1 if seq > 1 else 0, lba)
    assert led.check(lba, older) is Check.LOST  # e.g. a stale copy came back
    assert (led.counters.verified, led.counters.lost) == (0, 1)


def test_ledger_accepts_a_newer_unacknowledged_write_but_not_foreign_data() -> None:
    led = Ledger(RUN, 0, 1)
    s1, lba = led.issue()  # type: ignore[misc]
    led.acknowledged(s1, lba)
    led.check(lba, stamp_block(RUN, s1, lba))
    s2, _ = led.issue()  # type: ignore[misc]
    led.not_written(s2, lba, conflict=False)  # no status: it may have landed
    assert led.check(lba, stamp_block(RUN, s2, lba)) is Check.NEWER
    assert led.check(lba, stamp_block(RUN, s1, lba)) is Check.VERIFIED
    assert led.check(lba, stamp_block(RUN + 1, s1, lba)) is Check.LOST  # another run's
    assert led.check(lba, stamp_block(RUN, s1, lba + 1)) is Check.LOST  # misplaced
    assert led.counters.errors == 1 and led.counters.lost == 1  # one write, lost once
    assert [w[2] for w in led.lost_writes] == [f"data of another run (seq {s1})"]


# ------------------------------------------- guest against prmigrate target


async def _with_target(tmp_path: Path, body: Any) -> None:
    cluster = Cluster(tmp_path)
    try:
        target = await cluster.start_target(1, "16M")
        await body(target)
    finally:
        await cluster.close()
    assert not any(m.running for m in cluster.processes.values())


def test_guest_workload_against_prmigrate_target(tmp_path: Path) -> None:
    """The guest registers, reserves, writes and verifies; READ FULL STATUS from
    the observer shows the guest's nexus holding; another nexus is refused."""

    async def body(target: Any) -> None:
        url = target.url(0)
        guest = Guest(url, "iqn.2026-11.org.prmigrate:testguest", key=0xABCD,
                      rtype=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, blocks=256, depth=4)
        obs = Observer(url)
        try:
            await guest.login()
            assert guest.block_size == 512 and guest.capacity == 16 * 2048
            await guest.register_and_reserve()
            guest.start_writing()
            await asyncio.sleep(0.4)
            await guest.stop_writing()
            sweep = await guest.verify_all()
            await obs.open()
            snap = await obs.full_status()
            (h,) = snap.holders
            assert h.is_port("iqn.2026-11.org.prmigrate:testguest", guest.isid)
            assert h.key == 0xABCD and h.rtype == PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            probe = await probe_write(url, "iqn.2026-11.org.prmigrate:intruder", 0x23D0000000EE,
                                      guest.capacity - 1)
            assert probe.fenced and probe.status == "RESERVATION CONFLICT"
            assert "RELEASE GOOD" in await guest.release_and_unregister()
            assert (await obs.full_status()).registrations == ()
        finally:
            await guest.close()
            await obs.close()
        c = guest.counters
        assert c.acknowledged > 50
        assert c.lost == 0 and c.conflicts == 0 and c.errors == 0
        assert c.verified == c.acknowledged
        assert sweep["blocks_checked"] == min(256, c.acknowledged)

    asyncio.run(_with_target(tmp_path, body))


def test_guest_verification_catches_an_overwritten_block(tmp_path: Path) -> None:
    """A registrant (allowed to write under WE - REGISTRANTS ONLY) zeroes an
    acknowledged block: the final read-back reports exactly that write lost."""
    from prmigrate.iscsi.initiator import connect

    async def body(target: Any) -> None:
        url = target.url(0)
        guest = Guest(url, "iqn.2026-11.org.prmigrate:testguest", key=0x1,
                      rtype=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, blocks=64, depth=2)
        try:
            await guest.login()
            await guest.register_and_reserve()
            guest.start_writing()
            await asyncio.sleep(0.2)
            await guest.stop_writing()
            assert guest.counters.lost == 0
            lba = guest.ledger.acknowledged_lbas()[5]
            other = await connect(url, initiator_name="iqn.2026-11.org.prmigrate:other",
                                  isid=0x23D0000000F0, reconnect=False)
            try:
                r = await other.pr_out(PrOutAction.REGISTER, PrType.NONE, pr_out_params(0, 0x2))
                assert r.status == Status.GOOD
                await other.write(lba, bytes(512))
                await other.pr_out(PrOutAction.REGISTER, PrType.NONE, pr_out_params(0x2, 0))
            finally:
                await other.close()
            await guest.verify_all()
            await guest.release_and_unregister()
        finally:
            await guest.close()
        c = guest.counters
        assert c.lost == 1 and c.verified == c.acknowledged - 1
        assert [w[1] for w in guest.ledger.lost_writes] == [lba]

    asyncio.run(_with_target(tmp_path, body))


# --------------------------------------------------------- the command


def _demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prmigrate.cli", "demo", *args],
                          capture_output=True, text=True, timeout=timeout)


def _processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd:
            found.append(f"{d.name}: {cmd}")
    return found


def _holder(snap: dict[str, Any]) -> dict[str, Any]:
    assert snap["holder"] is not None, snap
    return snap["holder"]


@pytest.mark.timeout(180)
def test_demo_quick_json(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = _demo("--quick", "--json", "--workdir", str(tmp_path))
    elapsed = time.monotonic() - t0
    assert p.stdout, p.stderr
    rep = json.loads(p.stdout)
    failed = [c for r in rep["runs"] for c in r["checks"] if not c["ok"]]
    assert p.returncode == 0 and rep["ok"], (failed, p.stderr[-3000:])
    assert elapsed < 60
    assert rep["left_running"] == [] and _processes_under(tmp_path) == []
    on, off = rep["runs"]

    # migrate-pr=on: the reservation follows the device, A -> B -> A
    assert on["name"] == "migrate-pr=on" and on["migrate_pr"] is True
    key, rtype = on["key"], on["reservation_type"]
    assert rtype in ("Write Exclusive, registrants only", "Exclusive Access")
    isid = on["backend_isid"]
    init = {n: h["initiator"] for n, h in on["hosts"].items()}
    assert _holder(on["initial"])["port"] == f"{init['hosta']},i,{isid}"
    assert [(m["from"], m["to"]) for m in on["moves"]] == [("hosta", "hostb"), ("hostb", "hosta")]
    for m in on["moves"]:
        h = _holder(m["after"])
        assert h["port"] == f"{init[m['to']]},i,{isid}"
        assert h["key"] == key and h["type"] == rtype
        assert [r for r in m["after"]["registrations"]
                if r["initiator"] == init[m["from"]]] == []
        assert m["source_probe"]["fenced"] is True
        assert m["source_probe"]["status"] == "RESERVATION CONFLICT"
        assert m["source_probe"]["nexus"] == f"{init[m['from']]},i,{isid}"
        t = m["migration"]["timings"]
        assert t["pause_s"] is not None and t["takeover_s"] is not None
        assert t["round_trips_in_pause"] >= 1
        assert m["guest"]["writes"]["acknowledged"] > 0
    assert on["moves"][0]["source_probe"]["nexus"].startswith(init["hosta"])
    # the guest's side of move 1: logout requested, re-login to A redirected to B
    events = [e["what"] for e in on["moves"][0]["guest"]["events"]]
    assert events[0].startswith("Asynchronous Message: logout requested"), events
    assert any(e.startswith(f"login to {on['hosts']['hosta']['frontend']} redirected to "
                            f"{on['hosts']['hostb']['frontend']}") for e in events), events
    assert on["moves"][0]["guest"]["connected_to"] == on["hosts"]["hostb"]["frontend"]
    w = on["guest"]["writes"]
    assert w["lost"] == 0 and w["conflicts"] == 0
    assert w["acknowledged"] > 0 and w["verified"] == w["acknowledged"]
    assert on["guest"]["logout_requests"] == 2

    # migrate-pr=off: the reservation stays on A; the guest's writes on B conflict
    assert off["name"] == "migrate-pr=off" and off["migrate_pr"] is False
    assert off["machine"] == "pc-q35-10.2"
    for m in off["moves"]:
        h = _holder(m["after"])
        assert h["port"] == f"{init['hosta']},i,{isid}" and h["key"] == key
        assert [r for r in m["after"]["registrations"] if r["initiator"] == init["hostb"]] == []
    on_b = off["moves"][0]["guest"]["writes"]
    assert on_b["conflicts"] > 0 and on_b["acknowledged"] == 0
    assert off["moves"][0]["source_probe"]["fenced"] is False  # A still holds it
    assert off["moves"][1]["guest"]["writes"]["acknowledged"] > 0  # back on A
    assert off["guest"]["writes"]["lost"] == 0


@pytest.mark.timeout(120)
def test_demo_text_report_and_type_choice(tmp_path: Path) -> None:
    p = _demo("--quick", "--type", "ea", "--workdir", str(tmp_path))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    out = p.stdout
    assert "Exclusive Access" in out and "FAILED" not in out
    assert out.count("RESERVATION CONFLICT: FENCED") >= 2
    assert "lost 0" in out and "result: OK" in out
    assert _processes_under(tmp_path) == []


@pytest.mark.timeout(120)
def test_demo_interrupted_leaves_no_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "prmigrate.cli", "demo", "--quick",
                             "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "hostb.sock").exists():  # target and both hosts are up
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        assert len(_processes_under(tmp_path)) >= 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    time.sleep(0.2)
    assert _processes_under(tmp_path) == []
    assert not (tmp_path / "hosta.sock").exists()


@pytest.mark.timeout(60)
def test_demo_children_die_with_it(tmp_path: Path) -> None:
    """Even SIGKILL of the demo leaves no daemon behind (PR_SET_PDEATHSIG)."""
    proc = subprocess.Popen([sys.executable, "-m", "prmigrate.cli", "demo", "--quick",
                             "--workdir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "hostb.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while _processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_under(tmp_path) == []


# ------------------------------------------------------- report and exit


def _fake_report(lost: int) -> dict[str, Any]:
    port = "iqn.2026-11.org.prmigrate:hostb,i,0x80a711821e1e"
    after = {"generation": 3, "holder": {"port": port, "host": "hostb", "key": "0x1",
                                         "type": "Exclusive Access"},
             "registrations": [{"port": port, "host": "hostb", "key": "0x1", "holder": True}]}
    writes = {"issued": 10, "acknowledged": 10, "verified": 10 - lost, "lost": lost,
              "conflicts": 0, "errors": 0}
    check = {"name": "no acknowledged write lost", "ok": lost == 0, "detail": f"{lost} lost"}
    return {
        "ok": lost == 0, "elapsed_s": 1.0, "processes": [], "left_running": [],
        "runs": [{
            "name": "migrate-pr=on", "machine": "pc-q35-11.0", "device": "vm1", "migrate_pr": True,
            "key": "0x1", "reservation_type": "Exclusive Access", "checks": [check],
            "moves": [{"n": 1, "from": "hosta", "to": "hostb", "after": after, "before": after,
                       "migration": {"status": "completed", "timings": {
                           "pause_s": 0.004, "takeover_s": 0.003, "total_s": 0.02,
                           "round_trips_in_pause": 1, "peer_takeover_us": 900}},
                       "source_probe": {"nexus": "x", "status": "RESERVATION CONFLICT",
                                        "fenced": True, "unit_attentions": []},
                       "guest": {"writes": writes, "during_move": writes}}],
            "guest": {"initiator": "g", "isid": "0x1", "writes": writes,
                      "lost_writes": [{"seq": 3, "lba": 9, "why": "no intact stamp"}] * lost,
                      "logout_requests": 1, "reconnects": 1, "unit_attentions": []},
        }],
    }


def test_report_text() -> None:
    from prmigrate.demo.report import render, summary_rows

    text = render(_fake_report(0))
    assert "holder after:    hostb iqn.2026-11.org.prmigrate:hostb,i,0x80a711821e1e  key 0x1  " \
           "Exclusive Access" in text
    assert "PR takeover 0.9 ms at the destination" in text
    assert "backend PR round trips in the pause: 1" in text
    assert "result: OK" in text
    (row,) = summary_rows(_fake_report(0))
    assert row["source_fenced"] is True and row["round_trips"] == 1 and row["takeover_ms"] == 0.9
    bad = render(_fake_report(1))
    assert "LOST seq 3 LBA 9: no intact stamp" in bad
    assert "[  FAILED] no acknowledged write lost" in bad and "result: FAILED" in bad


@pytest.mark.parametrize("lost, status", [(0, 0), (1, 1)])
def test_exit_status_follows_the_checks(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str],
                                        lost: int, status: int) -> None:
    import prmigrate.demo.scenario as scenario
    from prmigrate.cli import main

    async def fake_run_demo(**kw: Any) -> dict[str, Any]:
        return _fake_report(lost)

    monkeypatch.setattr(scenario, "run_demo", fake_run_demo)
    assert main(["demo", "--json"]) == status
    assert json.loads(capsys.readouterr().out)["runs"][0]["guest"]["writes"]["lost"] == lost


@pytest.mark.timeout(120)
def test_demo_reports_a_failed_move_and_stops_everything(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination dies before the first move: the move fails, the run is
    reported failed with the reason, the guest kept its reservation on A, and
    no process is left."""
    import prmigrate.demo.scenario as scenario

    real_migrate = scenario.migrate

    async def migrate_to_a_dead_host(cluster: Cluster, src: Any, dst: Any, device: str) -> Any:
        await cluster.stop(dst.name)
        return await real_migrate(cluster, src, dst, device)

    monkeypatch.setattr(scenario, "migrate", migrate_to_a_dead_host)
    rep = asyncio.run(scenario.run_demo(workdir=tmp_path, quick=True, runs=scenario.RUNS[:1]))
    assert rep["ok"] is False and rep["left_running"] == []
    (run,) = rep["runs"]
    failed = {c["name"]: c["detail"] for c in run["checks"] if not c["ok"]}
    assert "move 1 (hosta -> hostb): migration succeeded" in failed
    assert "run completed" in failed and "failed" in run["error"]
    (move,) = run["moves"]
    assert move["migration"]["success"] is False and move["migration"]["reason"]
    assert move["after"]["holder"]["host"] == "hosta"  # the source kept the reservation
    assert move["after"]["holder"]["key"] == run["key"]
    assert run["guest"]["writes"]["lost"] == 0
    assert _processes_under(tmp_path) == []
    from prmigrate.demo.report import render

    assert "result: FAILED" in render(rep)
