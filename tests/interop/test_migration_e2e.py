"""Live migration end to end, with real processes and real clients.

``prmigrate target`` (127.0.0.1), host daemons A (127.0.0.2) and B
(127.0.0.3), ``prmigrate migrate`` as the operator. For every reservation
type and register-only, the guest (our initiator, on A's frontend) holds
its reservation and writes continuously while the device moves; afterwards
READ FULL STATUS on the target shows the guest's key on B's nexus, holding
the same type and scope, nothing on A's; no write got RESERVATION CONFLICT,
every acknowledged write reads back. A guest nobody here wrote: qemu-io
(libiscsi) writing and verifying patterns across the move, and
iscsi-test-cu's reservation tests through B after the move.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import Session, connect, describe_result
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadReservation, pr_out_params

from .conftest import INITIATOR1, INITIATOR2, need
from .migration_cluster import FRONTEND, GUEST, cluster, env
from .test_conformance import parse_cunit, run_suite

pytestmark = pytest.mark.interop

KEY = 0xABCDEF0012345678


def _run(coro, timeout: float = 120):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


async def guest_session(url: str, name: str = GUEST, isid: int = 0x23D000000042) -> Session:
    return await connect(url, initiator_name=name, isid=isid, command_timeout=30,
                         reconnect_timeout=30)


async def take_reservation(s: Session, rtype: PrType | None) -> None:
    r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
    assert r.good, r
    if rtype is not None:
        r = await s.pr_out(PrOutAction.RESERVE, rtype, pr_out_params(KEY, 0))
        assert r.good, r


class Writer:
    """Writes distinct blocks continuously; records what was acknowledged."""

    def __init__(self, s: Session, base: int = 1000) -> None:
        self.s, self.base = s, base
        self.acked: list[tuple[int, bytes]] = []
        self.bad: list[str] = []
        self._stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            lba = self.base + i % 4000
            blob = os.urandom(512)
            r = await self.s.submit(0, _write10(lba, 1), blob)
            if r.status == Status.GOOD:
                self.acked = [(a, b) for a, b in self.acked if a != lba] + [(lba, blob)]
            else:
                self.bad.append(f"write {lba}: status 0x{int(r.status):02x} ({describe_result(r)})")
            i += 1
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stop.set()
        await self.task

    async def verify(self) -> int:
        for lba, blob in self.acked:
            got = await self.s.read(lba, 1)
            assert got == blob, f"acknowledged write to LBA {lba} lost"
        return len(self.acked)


RTYPES = [None, *[PrType(t) for t in (1, 3, 5, 6, 7, 8)]]


@pytest.mark.parametrize("rtype", RTYPES, ids=lambda t: "register-only" if t is None else t.name)
def test_reservation_follows_the_device(tmp_path: Path, rtype: PrType | None) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, rtype)
                w = Writer(s)
                await asyncio.sleep(0.2)
                code, out = await c.migrate("hosta", "hostb")
                await asyncio.sleep(0.3)
                await w.stop()
                assert code == 0, out
                assert re.search(r"guest pause:\s+[\d.]+ ms", out), out
                assert "PR round trips in the pause: 1" in out or rtype in (None, PrType(7), PrType(8)), out
                await c.wait_device("hostb", True)
                await c.wait_device("hosta", False)
                assert await c.entries_of("hosta") == []
                (b,) = await c.entries_of("hostb")
                assert b.key == KEY
                if rtype is None:
                    assert not any(e.holder for e in (await c.full_status()).entries)
                else:
                    assert b.holder and int(b.rtype) == rtype and b.scope == 0
                assert not w.bad, w.bad  # never RESERVATION CONFLICT
                assert await w.verify() > 10
                # the guest is on B now (redirected by A), with its reservation
                r = await s.pr_in(PrInAction.READ_RESERVATION)
                rr = ReadReservation.decode(bytes(r.data_in))
                assert (rr.key is not None) == (rtype is not None)
                q = await c.call("hostb", "query-devices")
                assert q[0]["frontend"]["sessions"], q
            finally:
                await s.close()

        _run(go())


def test_there_and_back_again(tmp_path: Path) -> None:
    """A -> B -> A -> B: the guest returns to A (its original portal serves
    again, replacing the redirect it left), then moves on once more."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, PrType.EXCLUSIVE_ACCESS)
                w = Writer(s)
                for src, dst in (("hosta", "hostb"), ("hostb", "hosta"), ("hosta", "hostb")):
                    await asyncio.sleep(0.2)
                    code, out = await c.migrate(src, dst)
                    assert code == 0, out
                    await c.wait_device(dst, True)
                    (e,) = await c.entries_of(dst)
                    assert e.holder and e.key == KEY
                    assert await c.entries_of(src) == []
                await asyncio.sleep(0.2)
                await w.stop()
                assert not w.bad, w.bad
                await w.verify()
                q = await c.call("hostb", "query-devices")
                assert q[0]["frontend"]["sessions"], q
                assert await c.call("hosta", "query-devices") == []
            finally:
                await s.close()

        _run(go())


@pytest.mark.parametrize(
    "machine,migrate_pr,moves",
    [("pc-q35-10.2", None, False), ("pc-q35-10.2", "on", True),
     ("pc-q35-11.0", None, True), ("pc-q35-11.0", "off", False)],
)
def test_machine_types(tmp_path: Path, machine: str, migrate_pr: str | None, moves: bool) -> None:
    """migrate-pr off: the device moves, the reservation stays on A's nexus
    and B does not touch PR state (the guest's writes on B then conflict)."""
    with cluster(tmp_path, machine=machine, migrate_pr=migrate_pr) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, PrType.WRITE_EXCLUSIVE)
                code, out = await c.migrate("hosta", "hostb")
                assert code == 0, out
                await c.wait_device("hostb", True)
                r = await s.submit(0, _write10(7, 1), b"\x5a" * 512)
                a, b = await c.entries_of("hosta"), await c.entries_of("hostb")
                if moves:
                    assert a == [] and b[0].holder and b[0].key == KEY
                    assert r.status == Status.GOOD
                    assert "PR round trips in the pause: 1" in out
                else:
                    assert b == [] and a[0].holder and a[0].key == KEY
                    assert r.status == Status.RESERVATION_CONFLICT
                    assert "PR round trips in the pause: 0" in out
            finally:
                await s.close()

        _run(go())


def _qemu_io_args(c) -> list[str]:  # type: ignore[no-untyped-def]
    # The guest's own initiator name, so that qemu-io writes through the
    # backend nexus that holds the reservation (the device keys a guest's
    # nexus by its initiator name).
    a = c.procs["hosta"]
    return ["qemu-io", "--image-opts",
            f"driver=iscsi,transport=tcp,portal={a.host}:{a.port},target={FRONTEND},lun=0,"
            f"initiator-name={GUEST}"]


def test_qemu_io_writes_across_a_migration(tmp_path: Path) -> None:
    """qemu-io (libiscsi) runs back to back on A's frontend while the device
    moves; each writes a pattern to its own region, pauses, and reads it
    back, so runs straddle the hand-over: their session is asked to log out,
    reconnects to A, is redirected to B and goes on. A last run verifies
    every region from B. Our initiator holds the reservation (WE) under the
    same guest name, so the writes need it."""
    need("qemu-io")
    with cluster(tmp_path) as c:

        async def qemu_io(*commands: str) -> tuple[int, str, float, float]:
            args = _qemu_io_args(c)
            for cmd in commands:
                args += ["-c", cmd]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return -1, "timed out", t0, loop.time()
            return proc.returncode or 0, out.decode(errors="replace"), t0, loop.time()

        def pattern(k: int) -> str:
            return f"{0x10 + k % 0xE0:#x}"

        async def go() -> None:
            holder = await guest_session(c.frontend_url("hosta"), isid=0x23D000000043)
            try:
                await take_reservation(holder, PrType.WRITE_EXCLUSIVE)
                loop = asyncio.get_running_loop()
                runs = []
                migration = None
                moved_at = None
                k = 0
                while k < 30 and (migration is None or not migration.done() or k < 12):
                    runs.append(asyncio.ensure_future(qemu_io(
                        f"write -P {pattern(k)} {k * 65536} 64k", "sleep 400",
                        f"read -P {pattern(k)} {k * 65536} 64k")))
                    k += 1
                    if k == 4:
                        migration = asyncio.ensure_future(c.migrate("hosta", "hostb"))
                    await asyncio.sleep(0.1)
                    if migration is not None and migration.done() and moved_at is None:
                        moved_at = loop.time()
                assert migration is not None
                code, text = await migration
                assert code == 0, text
                moved_at = moved_at or loop.time()
                results = await asyncio.gather(*runs)
                for i, (rc, out, _, _) in enumerate(results):
                    assert rc == 0, f"run {i}: {out}"
                    assert "wrote 65536/65536" in out and "read 65536/65536" in out, f"run {i}: {out}"
                    assert "fail" not in out.lower() and "error" not in out.lower(), f"run {i}: {out}"
                straddled = [i for i, (_, _, t0, t1) in enumerate(results) if t0 < moved_at < t1]
                assert straddled, "no qemu-io run crossed the hand-over"
                # every region, read back through B (via A's redirect) in one run
                rc, out, _, _ = await qemu_io(*(f"read -P {pattern(i)} {i * 65536} 64k" for i in range(k)))
                assert rc == 0 and out.count("read 65536/65536") == k, out
                assert "fail" not in out.lower(), out
            finally:
                await holder.close()
            assert "redirected" in c.procs["hosta"].log
            # qemu-io's sessions (libiscsi picks its own ISIDs) reached B
            assert re.search(r"guest1,i,0x80[0-9a-f]+ from [\d.:]+\] login to " + FRONTEND,
                             c.procs["hostb"].log)

        _run(go(), 240)


def test_one_qemu_io_process_across_a_migration(tmp_path: Path) -> None:
    """One qemu-io process (one libiscsi session) issues 12,000 commands
    back to back while the device moves: its session is asked to log out in
    the middle of the stream, logs in again, is redirected to B, re-issues
    what got no status and goes on; every read checks the pattern just
    written. The reservation (WE) is held by our initiator under the same
    guest name, so every write needs it."""
    need("qemu-io")
    with cluster(tmp_path) as c:

        async def go() -> None:
            holder = await guest_session(c.frontend_url("hosta"), isid=0x23D000000043)
            try:
                await take_reservation(holder, PrType.WRITE_EXCLUSIVE)
                args = _qemu_io_args(c)
                for k in range(6000):
                    p, off = f"{0x10 + k % 200:#x}", (k % 2000) * 4096
                    args += ["-c", f"write -P {p} {off} 4k", "-c", f"read -P {p} {off} 4k"]
                proc = await asyncio.create_subprocess_exec(
                    *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                try:
                    await asyncio.sleep(0.5)
                    code, text = await c.migrate("hosta", "hostb")
                    assert code == 0, text
                    out, _ = await asyncio.wait_for(proc.communicate(), 90)
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                log = out.decode(errors="replace")
                assert proc.returncode == 0, log[-2000:]
                assert log.count("wrote 4096/4096") == 6000, log[-2000:]
                assert log.count("read 4096/4096") == 6000, log[-2000:]
                assert "fail" not in log.lower() and "error" not in log.lower(), log[-2000:]
            finally:
                await holder.close()
            # the run was in the middle of its stream when the device moved
            assert re.search(r"guest1,i,0x80[0-9a-f]+ from [\d.:]+\] asking the initiator to log out",
                             c.procs["hosta"].log), c.procs["hosta"].log[-3000:]
            assert re.search(r"guest1,i,0x80[0-9a-f]+ from [\d.:]+\] login to " + FRONTEND,
                             c.procs["hostb"].log)

        _run(go(), 200)


def test_iscsi_test_cu_reservations_through_the_destination(tmp_path: Path) -> None:
    """After a migration, libiscsi's reservation tests through B's frontend
    pass as they do directly against the target."""
    need("iscsi-test-cu")
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, PrType.WRITE_EXCLUSIVE)
                code, out = await c.migrate("hosta", "hostb")
                assert code == 0, out
                # the guest lets go of the LUN before the suite runs
                r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(KEY, 0))
                assert r.good, r
            finally:
                await s.close()

        _run(go())
        families = "ALL.PrinReadKeys,ALL.PrinServiceactionRange,ALL.ProutRegister,ALL.ProutReserve,ALL.ProutClear,ALL.ProutPreempt,ALL.Reserve6"
        # run through B's frontend (the migrated device) and directly
        via = parse_cunit(run_suite(c.frontend_url("hostb"), families, tmp_path / "via-b.txt", timeout=300))
        direct = parse_cunit(run_suite(c.target_url, families, tmp_path / "direct.txt", timeout=300))
        assert len(via) >= 15, via
        ran = {n: o for n, o in via.items() if not o.skipped}
        assert len(ran) >= 15, via
        failed = sorted(n for n, o in via.items() if o.failed or not o.passed)
        failed_direct = sorted(n for n, o in direct.items() if o.failed or not o.passed)
        assert failed == failed_direct, (failed, failed_direct)
        assert not failed, failed
        assert INITIATOR1 and INITIATOR2


def test_prmigrate_pr_tool_reads_the_moved_reservation(tmp_path: Path) -> None:
    """``prmigrate pr`` (another client) sees the reservation on B's nexus."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
                code, out = await c.migrate("hosta", "hostb")
                assert code == 0, out
            finally:
                await s.close()

        _run(go())
        out = subprocess.run(
            [sys.executable, "-m", "prmigrate.cli", "pr", "-s", c.target_url],
            capture_output=True, text=True, timeout=60, env=env(),
        )
        assert out.returncode == 0, out.stderr + out.stdout
        assert "hostb" in out.stdout and "hosta" not in out.stdout, out.stdout
