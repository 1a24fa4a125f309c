"""Failures the migration service must survive, in one process: the backend
refuses the destination's PREEMPT, the operator cancels in every phase, the
destination cannot create the device, the peer does not know the secret.
After each, the target shows the reservation on A's nexus only, the guest
runs on A and its writes never see RESERVATION CONFLICT."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from prmigrate.lun.types import Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrOutAction, PrType, Status

from .service_rig import HOST_A, HOST_B, Cluster, run
from .test_service import KEY, _setup_pr, _write10

WE = PrType.WRITE_EXCLUSIVE


class RefusesPreemptFromB(LogicalUnit):
    """A LUN that answers host B's PREEMPT with RESERVATION CONFLICT."""

    def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
        if cdb[:1] == b"\x5f" and cdb[1] & 0x1F == PrOutAction.PREEMPT and nexus.initiator == HOST_B:
            return Result(Status.RESERVATION_CONFLICT)
        return super().execute(nexus, cdb, data_out)


async def _check_on_a(c: Cluster, rtype: PrType = WE) -> None:
    (a,) = c.entries_of(HOST_A)
    assert a.key == KEY and a.holder and int(a.rtype) == rtype
    assert c.entries_of(HOST_B) == []
    assert "vm1" in c.daemons["hosta"].devices
    guest = c.guest
    assert guest is not None
    blob = os.urandom(512)
    r = await guest.submit(0, _write10(5, 1), blob)
    assert r.status == Status.GOOD, r
    assert await guest.read(5, 1) == blob


async def _until_b_dropped(c: Cluster, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while "vm1" in c.daemons["hostb"].devices:
        assert loop.time() < deadline, "B kept the device"
        await asyncio.sleep(0.02)


@run(40)
async def test_backend_refuses_preempt(tmp_path: Path) -> None:
    c = Cluster(tmp_path, unit_cls=RefusesPreemptFromB)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        q = await c.migrate()
        assert q["status"] == "rolled_back" and q["success"] is False, q
        assert q["reason"].startswith("pr-takeover"), q
        assert "RESERVATION CONFLICT" in q["reason"], q
        await _until_b_dropped(c)
        await _check_on_a(c)
    finally:
        await c.close()


@pytest.mark.parametrize("status", ["connecting", "setup", "stopping", "transferred"])
@run(40)
async def test_cancel_in_every_phase(tmp_path: Path, status: str) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        svc = c.services["hosta"]

        def listener(msg: dict) -> None:  # type: ignore[type-arg]
            d = msg.get("data", {})
            if msg.get("event") == "MIGRATION" and d.get("role") == "source" and d.get("status") == status:
                assert svc.cancel("vm1") is True

        c.daemons["hosta"].add_listener(listener)
        q = await c.migrate()
        assert q["status"] == "rolled_back", q
        assert q["reason"].startswith("cancelled"), q
        assert svc.cancel("vm1") is False  # finished: nothing to cancel
        await _until_b_dropped(c)
        await _check_on_a(c)
        assert not c.daemons["hosta"].devices["vm1"].held
    finally:
        await c.close()


@run(40)
async def test_destination_cannot_create_the_device(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        await c.daemons["hostb"].add_device(c.config, expose=False)  # name taken on B
        q = await c.migrate()
        assert q["status"] == "rolled_back" and q["reason"].startswith("device"), q
        await _check_on_a(c)
    finally:
        await c.close()


@run(40)
async def test_peer_without_the_secret(tmp_path: Path) -> None:
    c = Cluster(tmp_path, secret_b=b"some-other-cluster-secret")
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        q = await c.migrate()
        assert q["status"] == "rolled_back" and q["reason"].startswith("authentication"), q
        assert "vm1" not in c.daemons["hostb"].devices
        await _check_on_a(c)
    finally:
        await c.close()


@run(40)
async def test_qemu_strategy_takes_two_round_trips_in_the_pause(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        q = await c.migrate(strategy="qemu")
        assert q["status"] == "completed", q
        assert q["timings"]["round_trips_in_pause"] == 2, q
        (b,) = c.entries_of(HOST_B)
        assert b.holder and b.key == KEY and c.entries_of(HOST_A) == []
        q = await c.migrate("hostb", "hosta")
        assert q["status"] == "completed" and q["timings"]["round_trips_in_pause"] == 1, q
    finally:
        await c.close()
