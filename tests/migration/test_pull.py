"""Incoming devices pulled on first use (migration/pull.py), on real sockets
in one process: host A serves the device to a guest holding a reservation,
host B adds it with incoming-from=A's migration listener, a second session
of the guest's initiator ("the destination QEMU") logs in to B."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


@run(60)
async def test_answers_without_a_move_then_a_write_pulls(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    b_session = None
    try:
        guest = await _reserved_guest(c)
        out = await _add_incoming(c)
        assert out["node"] == "iqn.2026-11.org.prmigrate:vm1"
        desc = c.daemons["hostb"]._cmd_query_devices({"device": "vm1"})[0]
        assert desc["incoming-from"]
        b_session = await _second_session(c)
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
    finally:
        if b_session is not None:
            await asyncio.wait_for(b_session.close(), 5)
        await c.close()


@run(60)
async def test_a_failed_pull_answers_not_ready_and_a_later_one_moves(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    proxy = StoppableProxy(c.migration_address("hosta"))
    await proxy.start()
    b_session = None
    try:
        await _reserved_guest(c)
        await _add_incoming(c, proxy.address)
        b_session = await _second_session(c)
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
        if b_session is not None:
            await asyncio.wait_for(b_session.close(), 5)
        await proxy.stop()
        await c.close()


@run(60)
async def test_the_source_hands_over_when_its_guest_is_gone(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await _reserved_guest(c)
        await _add_incoming(c)
        await asyncio.sleep(0.3)
        assert "vm1" in c.daemons["hosta"].devices  # the guest is still there
        await guest.close()  # the source QEMU quit
        c.guest = None
        for _ in range(100):
            if "vm1" not in c.daemons["hostb"].incoming_devices:
                break
            await asyncio.sleep(0.1)
        assert "vm1" not in c.daemons["hostb"].incoming_devices
        assert _on(c, HOST_A) == [] and _on(c, HOST_B)[0].holder
    finally:
        await c.close()


@run(60)
async def test_no_command_moves_nothing_and_the_device_can_be_deleted(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        await _reserved_guest(c)
        await _add_incoming(c)
        b = await _second_session(c)
        await b.submit(0, INQUIRY, b"", 96)
        await b.close()  # the cancelled VM migration kills the destination QEMU
        await c.daemons["hostb"]._cmd_device_del({"device": "vm1"})
        await asyncio.sleep(0.3)
        assert "vm1" not in c.daemons["hostb"].devices
        (a,) = _on(c, HOST_A)
        assert a.holder and "vm1" in c.daemons["hosta"].devices
        assert not c.services["hosta"].watches
    finally:
        await c.close()


@run(60)
async def test_migrate_pr_off_moves_the_device_not_the_reservation(tmp_path: Path) -> None:
    c = Cluster(tmp_path, machine="pc-q35-10.2")
    await c.start()
    b_session = None
    try:
        await _reserved_guest(c)
        await _add_incoming(c)
        b_session = await _second_session(c)
        await b_session.submit(0, TUR, b"", 0)
        r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
        if r.status == Status.CHECK_CONDITION and decode_sense(bytes(r.sense)).key == 0x06:
            r = await b_session.submit(0, _write10(5, 1), b"b" * 512)
        assert r.status == Status.RESERVATION_CONFLICT  # the reservation stayed with A's nexus
        assert "vm1" not in c.daemons["hostb"].incoming_devices
        (a,) = _on(c, HOST_A)
        assert a.holder
        assert _on(c, HOST_B) == []
    finally:
        if b_session is not None:
            await asyncio.wait_for(b_session.close(), 5)
        await c.close()


@run(30)
async def test_a_source_without_the_device_refuses_the_add(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        h, p = c.migration_address("hosta")
        try:
            await c.daemons["hostb"]._cmd_device_add(
                {"name": "vm9", "backend": c.backend_url, "incoming-from": f"{h}:{p}"})
        except CommandError as e:
            assert "not served here" in e.desc
        else:
            raise AssertionError("device-add succeeded")
        assert "vm9" not in c.daemons["hostb"].devices
    finally:
        await c.close()
