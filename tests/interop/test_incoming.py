"""Incoming devices pulled on first use, with real processes.

``prmigrate target``, host daemons A (the device, a guest holding a
reservation) and B; ``prmigrate device add --host B name=vm1,backend=...,
incoming-from=A_MIGRATION_ADDR`` as the operator (or a libvirt hook) runs
it. A second session of the guest's initiator on B plays the destination
QEMU: what it sends to open its drive is answered without a move, its first
WRITE pulls the device. READ FULL STATUS from an observer nexus is the judge.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import Session
from prmigrate.scsi.constants import Opcode, PrType, Status
from prmigrate.scsi.sense import decode_sense

from ..tcp_proxy import StoppableProxy
from .conftest import need, stop
from .migration_cluster import FRONTEND, GUEST, INITIATORS, ProcCluster, cluster, env
from .test_migration_e2e import KEY, _write10, guest_session, take_reservation

pytestmark = pytest.mark.interop

TUR = bytes(6)
INQUIRY = bytes([Opcode.INQUIRY, 0, 0, 0, 96, 0])
READ_CAPACITY = bytes([Opcode.READ_CAPACITY_10]) + bytes(9)
B_ISID = 0x23D000000077  # the destination QEMU's session: same initiator, new ISID


def _run(coro, timeout: float = 120):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def device_add(c: ProcCluster, source: str | None = None) -> str:
    """``prmigrate device add`` on B with the documented spec (from A unless ``source``): its output."""
    spec = f"name=vm1,backend={c.backend_url},incoming-from={source or c.procs['hosta'].migrate_addr}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prmigrate.cli", "device", "add", "--host", str(c.procs["hostb"].control), spec,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env())
    out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
    out = out_b.decode(errors="replace")
    assert proc.returncode == 0, out
    return out


@asynccontextmanager
async def reserved_guest(c: ProcCluster, rtype: PrType = PrType.WRITE_EXCLUSIVE) -> AsyncIterator[Session]:
    """The guest's session on A's frontend holding a ``rtype`` reservation; closed at the end."""
    a = await guest_session(c.frontend_url("hosta"))
    try:
        await take_reservation(a, rtype)
        yield a
    finally:
        await a.close()


@asynccontextmanager
async def destination_session(c: ProcCluster, host: str = "hostb", isid: int = B_ISID) -> AsyncIterator[Session]:
    """The destination QEMU's session (the guest's initiator, a new ISID) on ``host``; closed at the end."""
    b = await guest_session(c.frontend_url(host), isid=isid)
    try:
        yield b
    finally:
        await b.close()


async def submit_once_past_ua(s: Session, cdb: bytes, data: bytes = b"", n: int = 0):  # type: ignore[no-untyped-def]
    r = await s.submit(0, cdb, data, n)
    if r.status == Status.CHECK_CONDITION and decode_sense(bytes(r.sense)).key == 0x06:
        r = await s.submit(0, cdb, data, n)  # a new nexus's unit attention, once
    return r


async def wait_for(cond, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def test_answered_without_a_move_then_pulled_by_a_write(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            async with reserved_guest(c) as a:
                out = await device_add(c)
                assert FRONTEND in out or "vm1" in out, out
                async with destination_session(c) as b:
                    for cdb, n in ((INQUIRY, 96), (READ_CAPACITY, 8), (TUR, 0)):
                        r = await submit_once_past_ua(b, cdb, b"", n)
                        assert r.good, (cdb.hex(), r)
                    # nothing moved
                    (on_a,) = await c.entries_of("hosta")
                    assert on_a.holder and on_a.key == KEY
                    assert await c.entries_of("hostb") == []
                    q = await c.call("hostb", "query-devices")
                    assert q[0]["incoming-from"] == c.procs["hosta"].migrate_addr
                    assert (await a.submit(0, _write10(10, 1), b"a" * 512)).good
                    # the first WRITE on B pulls the device, then runs
                    r = await submit_once_past_ua(b, _write10(11, 1), b"b" * 512)
                    assert r.good, r
                    assert await c.entries_of("hosta") == []
                    (on_b,) = await c.entries_of("hostb")
                    assert on_b.holder and on_b.key == KEY and int(on_b.rtype) == PrType.WRITE_EXCLUSIVE
                    assert await b.read(11, 1) == b"b" * 512
                    await c.wait_device("hosta", False)
                    # A's guest got the logout request and the redirect: it is on B now
                    r = await submit_once_past_ua(a, _write10(12, 1), b"c" * 512)
                    assert r.good, r
                    sessions = (await c.call("hostb", "query-devices"))[0]["frontend"]["sessions"]
                    assert any("0x23d000000042" in s for s in sessions), sessions
                    assert "incoming-from" not in (await c.call("hostb", "query-devices"))[0]

        _run(go())


def test_a_failed_pull_is_retried_by_the_next_command(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            host, port = c.procs["hosta"].migrate_addr.rsplit(":", 1)
            proxy = StoppableProxy((host, int(port)))
            await proxy.start()
            try:
                async with reserved_guest(c) as a:
                    await device_add(c, f"127.0.0.1:{proxy.port}")
                    async with destination_session(c) as b:
                        assert (await submit_once_past_ua(b, TUR)).good
                        await proxy.stop()  # A's migration listener unreachable from B
                        r = await b.submit(0, _write10(11, 1), b"b" * 512)
                        assert r.status == Status.CHECK_CONDITION, r
                        s = decode_sense(bytes(r.sense))
                        assert (int(s.key), s.asc, s.ascq) == (0x02, 0x04, 0x0A)
                        (on_a,) = await c.entries_of("hosta")
                        assert on_a.holder  # the source keeps serving
                        assert (await a.submit(0, _write10(10, 1), b"a" * 512)).good
                        await proxy.start()
                        r = await submit_once_past_ua(b, _write10(11, 1), b"b" * 512)
                        assert r.good, r
                        assert await c.entries_of("hosta") == []
                        assert (await c.entries_of("hostb"))[0].holder
            finally:
                await proxy.stop()

        _run(go())


def test_the_source_hands_over_when_its_guest_quits(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            async with reserved_guest(c, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY):
                await device_add(c)
                await asyncio.sleep(0.5)
                assert (await c.entries_of("hosta"))[0].holder  # the guest is still on A
            # the guest's session closed: the source QEMU quit after its migration
            await c.wait_device("hosta", False, timeout=15)

            async def on_b() -> bool:
                return bool(await c.entries_of("hostb")) and not await c.entries_of("hosta")

            await wait_for(on_b)
            q = (await c.call("hostb", "query-devices"))[0]
            assert "incoming-from" not in q

        _run(go())


def test_a_cancelled_vm_migration_moves_nothing(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            async with reserved_guest(c) as a:
                await device_add(c)
                async with destination_session(c) as b:
                    assert (await submit_once_past_ua(b, INQUIRY, b"", 96)).good
                # B's session closed: the destination QEMU is killed
                res = subprocess.run(
                    [sys.executable, "-m", "prmigrate.cli", "device", "list", "--host", str(c.procs["hostb"].control)],
                    capture_output=True, text=True, env=env(), timeout=30)
                assert f"incoming from {c.procs['hosta'].migrate_addr}" in res.stdout, res.stdout + res.stderr
                res = subprocess.run(
                    [sys.executable, "-m", "prmigrate.cli", "device", "del", "--host",
                     str(c.procs["hostb"].control), "vm1"],
                    capture_output=True, text=True, env=env(), timeout=30)
                assert res.returncode == 0, res.stdout + res.stderr
                await c.wait_device("hostb", False)
                (on_a,) = await c.entries_of("hosta")
                assert on_a.holder and on_a.key == KEY
                assert (await a.submit(0, _write10(10, 1), b"a" * 512)).good

        _run(go())


def test_migrate_pr_off_moves_the_device_not_the_reservation(tmp_path: Path) -> None:
    with cluster(tmp_path, machine="pc-q35-10.2") as c:

        async def go() -> None:
            async with reserved_guest(c):
                await device_add(c)
                async with destination_session(c) as b:
                    r = await submit_once_past_ua(b, _write10(11, 1), b"b" * 512)
                    # moved, but the reservation stayed with A's nexus (as a push)
                    assert r.status == Status.RESERVATION_CONFLICT, r
                    await c.wait_device("hosta", False)
                    (on_a,) = await c.entries_of("hosta")
                    assert on_a.holder
                    assert await c.entries_of("hostb") == []

        _run(go())


def test_qemu_io_opens_without_a_move_and_its_write_pulls(tmp_path: Path) -> None:
    """qemu-io (libiscsi, what QEMU's iSCSI driver sends to open a drive:
    INQUIRY and VPD pages, READ CAPACITY, MODE SENSE, TEST UNIT READY) on
    B's frontend: opening moves nothing; its write pulls the device."""
    need("qemu-io")
    with cluster(tmp_path) as c:

        async def qemu_io(*commands: str) -> tuple[int, str]:
            b = c.procs["hostb"]
            args = ["qemu-io", "--image-opts",
                    f"driver=iscsi,transport=tcp,portal={b.host}:{b.port},target={FRONTEND},lun=0,"
                    f"initiator-name={GUEST}"]
            for cmd in commands:
                args += ["-c", cmd]
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode or 0, out.decode(errors="replace")

        async def go() -> None:
            async with reserved_guest(c):
                await device_add(c)
                rc, out = await qemu_io("sleep 200")  # open and close the drive only
                assert rc == 0, out
                (on_a,) = await c.entries_of("hosta")
                assert on_a.holder and await c.entries_of("hostb") == []
                rc, out = await qemu_io("write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
                assert rc == 0 and "wrote 65536/65536" in out and "read 65536/65536" in out, out
                assert "fail" not in out.lower() and "error" not in out.lower(), out
                assert await c.entries_of("hosta") == []
                (on_b,) = await c.entries_of("hostb")
                assert on_b.holder and on_b.key == KEY

        _run(go())


def test_an_incoming_device_survives_a_restart_of_its_host(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            async with reserved_guest(c):
                await device_add(c)
                stop(c.procs["hostb"].proc, timeout=10)
                c.restart_host("hostb")
                await c.wait_device("hostb", True)
                q = (await c.call("hostb", "query-devices"))[0]
                assert q["incoming-from"] == c.procs["hosta"].migrate_addr  # described again, still incoming
                assert (await c.entries_of("hosta"))[0].holder
                async with destination_session(c) as b:
                    r = await submit_once_past_ua(b, _write10(11, 1), b"b" * 512)
                    assert r.good, r
                    assert await c.entries_of("hosta") == [] and (await c.entries_of("hostb"))[0].holder

        _run(go())


def test_a_refused_takeover_leaves_the_device_on_the_source(tmp_path: Path) -> None:
    """The target answers B's takeover PREEMPT with RESERVATION CONFLICT: the
    pulled migration rolls back, A serves its guest on with its reservation,
    B's held write gets 02/04/0A and the device stays incoming there."""
    with cluster(tmp_path, refuse_preempt_from=INITIATORS["hostb"]) as c:

        async def go() -> None:
            async with reserved_guest(c) as a:
                await device_add(c)
                async with destination_session(c) as b:
                    r = await submit_once_past_ua(b, _write10(11, 1), b"b" * 512)
                    assert r.status == Status.CHECK_CONDITION, r
                    s = decode_sense(bytes(r.sense))
                    assert (int(s.key), s.asc, s.ascq) == (0x02, 0x04, 0x0A)
                    assert "refusing PREEMPT" in c.procs["target"].log
                    (on_a,) = await c.entries_of("hosta")
                    assert on_a.holder and on_a.key == KEY
                    assert await c.entries_of("hostb") == []
                    assert (await a.submit(0, _write10(10, 1), b"a" * 512)).good
                    q = (await c.call("hostb", "query-devices"))[0]
                    assert "incoming-from" in q

        _run(go())


def test_pulled_there_and_back_again(tmp_path: Path) -> None:
    """A -> B -> A by pulls only; A is started with the device configured, so
    the way back adds an incoming device where the configured one moved away."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            async with reserved_guest(c) as a:
                for i, (src, dst) in enumerate((("hosta", "hostb"), ("hostb", "hosta"))):
                    await c.wait_device(dst, False, timeout=15)
                    if dst == "hostb":
                        await device_add(c, c.procs[src].migrate_addr)
                    else:
                        await c.call(dst, "device-add", {"name": "vm1", "backend": c.backend_url,
                                                         "incoming-from": c.procs[src].migrate_addr})
                    async with destination_session(c, dst, B_ISID + i) as s:
                        r = await submit_once_past_ua(s, _write10(20 + i, 1), bytes([i]) * 512)
                        assert r.good, r
                    assert await c.entries_of(src) == []
                    (e,) = await c.entries_of(dst)
                    assert e.holder and e.key == KEY
                    # the first guest followed the device (logout request, redirect)
                    assert (await submit_once_past_ua(a, _write10(30 + i, 1), b"g" * 512)).good
                assert "incoming-from" not in (await c.call("hosta", "query-devices"))[0]

        _run(go())


def test_a_two_path_device_is_pulled_by_a_write(tmp_path: Path) -> None:
    """The same pull on a two-path device (``backend=`` twice, the target's
    two portals): B's incoming device, added with both backends, is pulled
    by its first WRITE; then both of B's path nexuses have the key, one
    holds the WRITE EXCLUSIVE reservation, nothing of A is left on any
    path, and the write went to the medium."""
    from .test_multipath_migration import path_entries, settled, two_path_cluster

    with two_path_cluster(tmp_path) as (c, second):

        async def go() -> None:
            async with reserved_guest(c):
                ans = await c.call("hostb", "device-add", {
                    "name": "vm1", "backend": [c.backend_url, second],
                    "incoming-from": c.procs["hosta"].migrate_addr})
                assert ans, ans
                async with destination_session(c) as b:
                    r = await submit_once_past_ua(b, TUR)
                    assert r.good, r
                    assert await path_entries(c, "hostb") == {}  # nothing moved yet
                    r = await submit_once_past_ua(b, _write10(21, 1), b"m" * 512)
                    assert r.good, r
                    seen = await settled(c, "hostb")  # B's other path registers again right after the takeover
                    assert {p: k for p, (k, _, _) in seen.items()} == {0: KEY, 1: KEY}, seen
                    holders = [p for p, (_, h, _) in seen.items() if h]
                    assert len(holders) == 1 and seen[holders[0]][2] == PrType.WRITE_EXCLUSIVE, seen
                    assert await path_entries(c, "hosta") == {}
                    assert await b.read(21, 1) == b"m" * 512
                    for lba in range(22, 30):  # the holder's path carries the writes: no conflict
                        assert (await b.submit(0, _write10(lba, 1), bytes([lba]) * 512)).good

        _run(go())
