"""``prmigrate target`` with two ``--listen`` portals: two target portal
groups, two target ports of one LU, against real peers.

- libiscsi's ``iscsi-ls`` (SendTargets) lists both portals, each with its
  own tag, from either portal;
- ``iscsi-test-cu``'s MultipathIO family runs over the two portals (it
  checks that both paths report the same LU designator, then does I/O,
  resets and COMPARE AND WRITE across them) and passes without [SKIPPED];
- the reservation families (27 tests) pass through the second portal
  (relative target port 2) as through the first of a single-portal target;
- ``qemu-io`` writes through one portal and reads the pattern back through
  the other;
- one initiator port logged in through both portals is two I_T nexuses:
  separate registrations, READ FULL STATUS with each relative target port,
  ALL_TG_PT on both, REPORT TARGET PORT GROUPS and VPD 83h per port, and the
  control socket's query-sessions showing each session's port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import connect
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadFullStatus, pr_out_params
from prmigrate.scsi.tpg import AccessState, ReportTpgCdb, decode_report

from .conftest import (
    IQN,
    TargetProcess,
    free_loopback_port,
    need,
    start_target,
    stop,
    wait_listening,
)
from .test_conformance import RESERVATION, parse_cunit, run_suite

pytestmark = pytest.mark.interop

GUEST = "iqn.2026-11.org.prmigrate:multipath-guest"
ISID = 0x23D0000000A1
KEY, KEY2 = 0x6D70000000000001, 0x6D70000000000002
RESERVATION_FAMILIES = ",".join(f"ALL.{f}" for f in (
    "PrinReadKeys", "PrinServiceactionRange", "PrinReportCapabilities", "ProutRegister", "ProutReserve",
    "ProutClear", "ProutPreempt", "Reserve6"))


class TwoPortals:
    def __init__(self, t: TargetProcess, host2: str, port2: int, control: Path | None) -> None:
        self.t, self.host2, self.port2, self.control = t, host2, port2, control

    def url(self, portal: int, lun: int = 0) -> str:
        host, port = (self.t.host, self.t.port) if portal == 1 else (self.host2, self.port2)
        return f"iscsi://{host}:{port}/{self.t.iqn}/{lun}"

    def portal(self, n: int) -> str:
        return f"{self.t.host}:{self.t.port}" if n == 1 else f"{self.host2}:{self.port2}"


def start_two_portals(workdir: Path, size: str = "64M", control: bool = False) -> TwoPortals:
    while True:
        host2, port2 = free_loopback_port()
        extra = ["--listen", f"{host2}:{port2}"]
        sock = workdir / "target.sock" if control else None
        if sock is not None:
            extra += ["--control", str(sock)]
        t = start_target(workdir, size=size, extra=extra)
        if (t.host, t.port) != (host2, port2):
            break
        stop(t.proc)  # the two picks collided: try again
    try:
        wait_listening(host2, port2, t.proc)
    except Exception:
        stop(t.proc)
        raise
    return TwoPortals(t, host2, port2, sock)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[TwoPortals]:
    tp = start_two_portals(tmp_path, control=True)
    try:
        yield tp
    finally:
        stop(tp.t.proc)
    assert "Traceback" not in tp.t.log


def test_send_targets_lists_both_portals_with_their_tags(two: TwoPortals) -> None:
    need("iscsi-ls")
    for n in (1, 2):
        out = subprocess.run(["iscsi-ls", "-s", f"iscsi://{two.portal(n)}"], capture_output=True, text=True,
                             timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        portals = re.findall(rf"Target:{re.escape(IQN)} Portal:(\S+)", out.stdout)
        assert sorted(portals) == sorted([f"{two.portal(1)},1", f"{two.portal(2)},2"]), out.stdout
        assert out.stdout.count("Lun:0    Type:DIRECT_ACCESS") == 2, out.stdout
    log = two.t.log
    assert "(portal group 1, relative target port 1)" in log and "(portal group 2, relative target port 2)" in log


def test_iscsi_test_cu_multipathio_over_two_portals(two: TwoPortals, tmp_path: Path) -> None:
    need("iscsi-test-cu")
    text = run_suite(two.url(1), "ALL.MultipathIO", tmp_path / "mpio.txt", timeout=180, verbose_scsi=False,
                     multipath_url=two.url(2))
    tests = parse_cunit(text)
    assert sorted(tests) == sorted(f"ALL.MultipathIO.{n}" for n in
                                   ("Simple", "Reset", "CompareAndWrite", "CompareAndWriteAsync")), text[-2000:]
    assert all(o.passed and not o.failed and not o.skipped for o in tests.values()), text[-2000:]
    assert "found matching LU device identifier for all (2) paths" in text
    # the suite's sessions really went through both target ports
    log = two.t.log
    assert re.search(rf"login to {re.escape(IQN)} ", log)
    assert re.search(rf"->{re.escape(IQN)},t,1\]", log) and re.search(rf"->{re.escape(IQN)},t,2\]", log)


def test_reservation_families_through_the_second_portal(two: TwoPortals, tmp_path: Path) -> None:
    need("iscsi-test-cu")
    text = run_suite(two.url(2), RESERVATION_FAMILIES, tmp_path / "pr.txt", timeout=240)
    tests = parse_cunit(text)
    reservation = {n: o for n, o in tests.items() if RESERVATION.search(n)}
    assert len(reservation) == 27 and len(tests) == 27, sorted(tests)
    assert not [n for n, o in reservation.items() if o.skipped], "reservation tests skipped"
    assert all(o.passed and not o.failed for o in reservation.values()), [n for n, o in tests.items()
                                                                          if not o.passed or o.failed]
    assert len(re.findall(r"Send PROUT/", text)) >= 50
    assert "not implemented" not in text.lower()
    log = two.t.log
    for word in ("registered", "reserved", "released", "preempt", "clear"):
        assert re.search(rf"prmigrate\.lun[\w.]*: .*{word}", log, re.IGNORECASE), word
    assert "on port 2" in log and "on port 1" not in log  # every registration was made on target port 2


def test_qemu_io_writes_through_one_portal_and_reads_through_the_other(two: TwoPortals) -> None:
    need("qemu-io")

    def qemu_io(url: str, command: str) -> str:
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", command, url], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, (command, r.stdout, r.stderr)
        return r.stdout

    assert "wrote 65536/65536 bytes" in qemu_io(two.url(1), "write -P 0x5a 0 64k")
    assert "read 65536/65536 bytes" in qemu_io(two.url(2), "read -P 0x5a 0 64k")
    assert "wrote 65536/65536 bytes" in qemu_io(two.url(2), "write -P 0xa5 1M 64k")
    assert "read 65536/65536 bytes" in qemu_io(two.url(1), "read -P 0xa5 1M 64k")
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", two.url(2)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert "Pattern verification failed" in r.stdout + r.stderr  # the check does check


def _full_status(data: bytes) -> list[tuple[int, int, bool, bool]]:
    return [(e.key, e.rel_tgt_port, e.holder, e.all_tg_pt) for e in ReadFullStatus.decode(data).entries]


def _sessions(control: Path) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "prmigrate.cli", "target", "sessions", "--control", str(control),
                        "--json"], capture_output=True, text=True, timeout=30, check=False, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_one_initiator_port_through_two_portals_is_two_nexuses(two: TwoPortals) -> None:
    assert two.control is not None
    control = two.control

    async def go() -> None:
        p1 = await connect(two.url(1), initiator_name=GUEST, isid=ISID)
        p2 = await connect(two.url(2), initiator_name=GUEST, isid=ISID)  # the same initiator port
        try:
            mine = sorted((s["tpgt"], s["relative-target-port"], s["nexus"])
                          for s in await asyncio.to_thread(_sessions, control) if s["initiator"] == GUEST)
            assert [m[:2] for m in mine] == [(1, 1), (2, 2)], mine
            assert mine[0][2].endswith(f"{IQN},t,1") and mine[1][2].endswith(f"{IQN},t,2")

            # REPORT TARGET PORT GROUPS and VPD 83h from each path
            for session, port in ((p1, 1), (p2, 2)):
                r = await session.submit(0, ReportTpgCdb.encode(256), b"", 256)
                assert r.status == Status.GOOD
                groups = decode_report(bytes(r.data_in))
                assert [(g.group, g.ports, g.state) for g in groups] == [
                    (1, (1,), AccessState.ACTIVE_OPTIMIZED), (2, (2,), AccessState.ACTIVE_OPTIMIZED)]
                page = await session.inquiry(0x83)
                assert bytes.fromhex(f"519400040000000{port}") in page  # relative target port designator
                assert bytes.fromhex(f"519500040000000{port}") in page  # target port group designator
                assert (await session.inquiry(alloc=36))[5] & 0x30 == 0x10  # TPGS 01b

            # separate registrations per nexus
            assert (await p1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))).status == Status.GOOD
            assert (await p2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY2))).status == Status.GOOD
            r = await p2.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY2, 0))
            assert r.status == Status.GOOD
            full = _full_status(bytes((await p1.pr_in(PrInAction.READ_FULL_STATUS)).data_in))
            assert full == [(KEY, 1, False, False), (KEY2, 2, True, False)]
            await p2.write(8, b"\x77" * 512)  # the holder writes
            r = await p1.submit(0, bytes.fromhex("2a00 00000008 00 0001 00"), b"\x88" * 512)
            assert r.status == Status.RESERVATION_CONFLICT  # the other nexus of the same initiator port may not
            sessions = await asyncio.to_thread(_sessions, control)
            regs = {s["relative-target-port"]: s["registered"] for s in sessions if s["initiator"] == GUEST}
            assert regs == {1: {"0": {"key": f"0x{KEY:x}", "holder": False, "all-tg-pt": False}},
                            2: {"0": {"key": f"0x{KEY2:x}", "holder": True, "all-tg-pt": False}}}, regs

            # ALL_TG_PT: one registration for the initiator port on both target ports
            r = await p1.pr_out(PrOutAction.CLEAR, 0, pr_out_params(KEY, 0))
            assert r.status == Status.GOOD
            r = await p1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY, all_tg_pt=True))
            assert r.status == Status.GOOD
            r = await p2.pr_out(PrOutAction.RESERVE, PrType.EXCLUSIVE_ACCESS, pr_out_params(KEY, 0))
            assert r.status == Status.GOOD  # port 2 acts under port 1's ALL_TG_PT registration
            full = _full_status(bytes((await p2.pr_in(PrInAction.READ_FULL_STATUS)).data_in))
            assert [(k, h, a) for k, _, h, a in full] == [(KEY, True, True)]
            assert await p1.read(8, 1) == b"\x77" * 512 and await p2.read(8, 1) == b"\x77" * 512
        finally:
            await p1.close()
            await p2.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_portal_that_cannot_be_bound_stops_the_target_with_a_message(tmp_path: Path) -> None:
    host, port = free_loopback_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{host}:{port}",
                        "--listen", f"{host}:{port}", "--iqn", IQN, "--lun", f"0={tmp_path / 'img'}",
                        "--size", "16M"], capture_output=True, text=True, timeout=30, check=False, env=env)
    assert r.returncode == 1, r.stderr
    assert f"cannot listen on {host}:{port}: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{host}:{port}",
                        "--listen", f"{host}:{port + 1}", "--tpgt", "3", "--iqn", IQN, "--lun",
                        f"0={tmp_path / 'img'}"], capture_output=True, text=True, timeout=30, check=False, env=env)
    assert r.returncode != 0 and "--tpgt goes with a single --listen" in r.stderr, r.stderr
