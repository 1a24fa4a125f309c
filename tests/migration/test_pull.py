"""Incoming devices pulled on first use (migration/pull.py), on real sockets
in one process: host A serves the device to a guest holding a reservation,
host B adds it with incoming-from=A's migration listener, a second session
of the guest's initiator ("the destination QEMU") logs in to B."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prmigrate.host.config import device_from_table
from prmigrate.host.control import CommandError
from prmigrate.iscsi.initiator import Session, connect
from prmigrate.scsi.constants import Opcode, PrOutAction, PrType, Status
from prmigrate.scsi.pr import pr_out_params
from prmigrate.scsi.sense import decode_sense

from ..tcp_proxy import StoppableProxy
from .service_rig import GUEST, HOST_A, HOST_B, Cluster, good, run

KEY = 0x1122334455667788
TUR = bytes(6)
INQUIRY = bytes([Opcode.INQUIRY, 0, 0, 0, 96, 0])
READ_CAPACITY = bytes([Opcode.READ_CAPACITY_10]) + bytes(9)


def _write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def _read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


async def _reserved_guest(c: Cluster, rtype: PrType = PrType.WRITE_EXCLUSIVE) -> Session:
    guest = await c.connect_guest()
    assert good(await guest.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY)))
    assert good(await guest.pr_out(PrOutAction.RESERVE, rtype, pr_out_params(KEY, 0)))
    return guest


async def _add_incoming(c: Cluster, source: tuple[str, int] | None = None) -> dict:
    h, p = source or c.migration_address("hosta")
    return await c.daemons["hostb"]._cmd_device_add(
        {"name": "vm1", "backend": c.backend_url, "incoming-from": f"{h}:{p}"})


async def _second_session(c: Cluster) -> Session:
    return await connect(c.frontend_url("hostb"), initiator_name=GUEST, isid=0x23D000000077, command_timeout=20)


def _on(c: Cluster, host_initiator: str) -> list:
    return c.entries_of(host_initiator)


async def reserved_guest_and_incoming(c: Cluster, source: tuple[str, int] | None = None) -> Session:
    """A's guest holding a reservation and B's incoming device for it (from ``source``, else A): the guest."""
    guest = await _reserved_guest(c)
    await _add_incoming(c, source)
    return guest


@asynccontextmanager
async def started_cluster(tmp_path: Path, **kw: Any) -> AsyncIterator[Cluster]:
    """The in-process cluster (target, hosts A and B), started; closed at the end."""
    c = Cluster(tmp_path, **kw)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


@asynccontextmanager
async def destination_session(c: Cluster) -> AsyncIterator[Session]:
    """The destination QEMU's session on B's frontend (``_second_session``); closed at the end."""
    b = await _second_session(c)
    try:
        yield b
    finally:
        await asyncio.wait_for(b.close(), 5)


async def wait_until(cond: Callable[[], bool], tries: int, every: float) -> None:
    """Until ``cond()`` holds, at most ``tries`` looks ``every`` seconds apart; the caller asserts it."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(every)


@run(60)
async def test_answers_without_a_move_then_a_write_pulls(tmp_path: Path) -> None:
    async with started_cluster(tmp_path) as c:
        guest = await _reserved_guest(c)
        out = await _add_incoming(c)
        assert out["node"] == "iqn.2026-11.org.prmigrate:vm1"
        desc = c.daemons["hostb"]._cmd_query_devices({"device": "vm1"})[0]
        assert desc["incoming-from"]
        async with destination_session(c) as b_session:
            for cdb, n in ((INQUIRY, 96), (READ_CAPACITY, 8), (TUR, 0)):
                r = await b_session.submit(0, cdb, b"", n)
                if r.status == Status.CHECK_CONDITION:  # a new nexus's unit attention, once
                    r = await b_session.submit(0, cdb, b"", n)
                assert good(r), (cdb, r)
            # nothing moved: the reservation is on A's nexus, A serves the guest
            (a,) = _on(c, HOST_A)
            assert a.holder and a.key == KEY
            assert _on(c, HOST_B) == []
            assert "vm1" in c.daemons["hosta"].devices
            assert good(await guest.submit(0, _write10(3, 1), b"a" * 512))
            # a WRITE on B pulls the device, then runs
            r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
            assert good(r), r
            assert _on(c, HOST_A) == []
            (b,) = _on(c, HOST_B)
            assert b.holder and b.key == KEY and int(b.rtype) == PrType.WRITE_EXCLUSIVE
            runner = c.services["hosta"].get("vm1")
            assert runner is not None
            await asyncio.wait_for(asyncio.shield(runner.done), 10)  # the source's handover settles
            assert "vm1" not in c.daemons["hosta"].devices
            assert "vm1" not in c.daemons["hostb"].incoming_devices
            assert bytes(c.lu.store.read(5 * 512, 512)) == b"b" * 512
            # A's guest was asked to log out and redirected: it writes through B now
            assert good(await guest.submit(0, _write10(6, 1), b"c" * 512))
            assert good(await b_session.submit(0, _read10(6, 1), b"", 512))
            q = c.services["hosta"].query("vm1")[0]
            assert q["success"] is True and q["role"] == "source"
            # the run-time record is now the device as it runs, no longer incoming
            record = c.daemons["hostb"].runtime["vm1"]
            assert "incoming-from" not in record
            dc = device_from_table(record)
            assert (dc.machine, dc.frontend_iqn, dc.migrate_pr) == (c.config.machine, c.config.frontend_iqn,
                                                                    c.config.migrate_pr)


@run(60)
async def test_a_failed_pull_answers_not_ready_and_a_later_one_moves(tmp_path: Path) -> None:
    async with started_cluster(tmp_path) as c:
        proxy = StoppableProxy(c.migration_address("hosta"))
        await proxy.start()
        try:
            await reserved_guest_and_incoming(c, proxy.address)
            async with destination_session(c) as b_session:
                await b_session.submit(0, TUR, b"", 0)
                await proxy.stop()  # A's migration listener is unreachable from B
                r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
                assert r.status == Status.CHECK_CONDITION
                s = decode_sense(bytes(r.sense))
                assert (int(s.key), s.asc, s.ascq) == (0x02, 0x04, 0x0A)
                (a,) = _on(c, HOST_A)
                assert a.holder  # the source keeps serving
                assert "vm1" in c.daemons["hosta"].devices
                await proxy.start()
                r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
                assert good(r), r
                assert _on(c, HOST_A) == [] and _on(c, HOST_B)[0].holder
        finally:
            await proxy.stop()


@run(60)
async def test_the_source_hands_over_when_its_guest_is_gone(tmp_path: Path) -> None:
    async with started_cluster(tmp_path) as c:
        guest = await reserved_guest_and_incoming(c)
        await asyncio.sleep(0.3)
        assert "vm1" in c.daemons["hosta"].devices  # the guest is still there
        await guest.close()  # the source QEMU quit
        c.guest = None
        await wait_until(lambda: "vm1" not in c.daemons["hostb"].incoming_devices, 100, 0.1)
        assert "vm1" not in c.daemons["hostb"].incoming_devices
        assert _on(c, HOST_A) == [] and _on(c, HOST_B)[0].holder


@run(60)
async def test_no_command_moves_nothing_and_the_device_can_be_deleted(tmp_path: Path) -> None:
    async with started_cluster(tmp_path) as c:
        await reserved_guest_and_incoming(c)
        async with destination_session(c) as b:
            await b.submit(0, INQUIRY, b"", 96)
        # B's session closed: the cancelled VM migration kills the destination QEMU
        await c.daemons["hostb"]._cmd_device_del({"device": "vm1"})
        await asyncio.sleep(0.3)
        assert "vm1" not in c.daemons["hostb"].devices
        (a,) = _on(c, HOST_A)
        assert a.holder and "vm1" in c.daemons["hosta"].devices
        assert not c.services["hosta"].watches


@run(60)
async def test_migrate_pr_off_moves_the_device_not_the_reservation(tmp_path: Path) -> None:
    async with started_cluster(tmp_path, machine="pc-q35-10.2") as c:
        await reserved_guest_and_incoming(c)
        async with destination_session(c) as b_session:
            await b_session.submit(0, TUR, b"", 0)
            r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
            if r.status == Status.CHECK_CONDITION and decode_sense(bytes(r.sense)).key == 0x06:
                r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
            assert r.status == Status.RESERVATION_CONFLICT  # the reservation stayed with A's nexus
            assert "vm1" not in c.daemons["hostb"].incoming_devices
            (a,) = _on(c, HOST_A)
            assert a.holder
            assert _on(c, HOST_B) == []


@run(30)
async def test_a_source_without_the_device_refuses_the_add(tmp_path: Path) -> None:
    async with started_cluster(tmp_path) as c:
        h, p = c.migration_address("hosta")
        try:
            await c.daemons["hostb"]._cmd_device_add(
                {"name": "vm9", "backend": c.backend_url, "incoming-from": f"{h}:{p}"})
        except CommandError as e:
            assert "not served here" in e.desc
        else:
            raise AssertionError("device-add succeeded")
        assert "vm9" not in c.daemons["hostb"].devices


@run(60)
async def test_a_push_arrives_into_the_incoming_device(tmp_path: Path) -> None:
    async with started_cluster(tmp_path) as c:
        guest = await reserved_guest_and_incoming(c)
        b_dev = c.daemons["hostb"].devices["vm1"]
        q = await c.migrate()  # prmigrate migrate A -> B, as before
        assert q["success"] is True, q
        assert c.daemons["hostb"].devices["vm1"] is b_dev  # adopted, not created again
        assert "vm1" not in c.daemons["hostb"].incoming_devices
        node = c.daemons["hostb"].target.node("iqn.2026-11.org.prmigrate:vm1")
        assert node is not None and node.luns[0] is b_dev  # the gate is gone
        assert _on(c, HOST_A) == [] and _on(c, HOST_B)[0].holder
        assert good(await guest.submit(0, _write10(6, 1), b"c" * 512))


@run(60)
async def test_an_aborted_migration_leaves_the_device_incoming(tmp_path: Path) -> None:
    """The pushed migration into the incoming device is cancelled before
    its switchover: the device stays incoming on B, and a later pull moves it."""
    async with started_cluster(tmp_path) as c:
        await reserved_guest_and_incoming(c)
        runner = c.services["hosta"].migrate("vm1", c.migration_address("hostb"))
        inc = c.daemons["hostb"].incoming_devices["vm1"]
        await wait_until(lambda: inc.adopted, 200, 0.002)  # B's destination runner took the incoming device
        assert inc.adopted
        assert runner.cancel()
        await asyncio.wait_for(asyncio.shield(runner.done), 10)
        assert not runner.succeeded
        await wait_until(lambda: not inc.adopted, 100, 0.02)  # B's cleanup releases it
        assert not inc.adopted and "vm1" in c.daemons["hostb"].incoming_devices
        assert not c.daemons["hostb"].devices["vm1"].snooper.state.guests  # nothing of the guest's PR state
        assert _on(c, HOST_A)[0].holder and "vm1" in c.daemons["hosta"].devices
        async with destination_session(c) as b_session:
            r = await b_session.submit(0, TUR, b"", 0)
            r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
            if r.status == Status.CHECK_CONDITION:
                r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
            assert good(r), r
            assert _on(c, HOST_A) == [] and _on(c, HOST_B)[0].holder
