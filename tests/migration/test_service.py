"""The migration service on real sockets, in one process: two host daemons,
one shared LU behind our target, a guest that is our initiator. After each
move the target's READ FULL STATUS is the judge."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from prmigrate.device.identity import derive_isid
from prmigrate.lun.types import Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadFullStatus, ReadReservation, pr_in_cdb, pr_out_cdb, pr_out_params
from prmigrate.scsi.sense import Sense, encode_sense

from .service_rig import GUEST, HOST_A, HOST_B, OBSERVER, Cluster, good, run

KEY = 0x1122334455667788
REG, RES = PrOutAction.REGISTER, PrOutAction.RESERVE


async def _setup_pr(guest, rtype: PrType | None) -> None:
    r = await guest.pr_out(REG, 0, pr_out_params(0, KEY))
    assert good(r), r
    if rtype is not None:
        r = await guest.pr_out(RES, rtype, pr_out_params(KEY, 0))
        assert good(r), r


@pytest.mark.parametrize("rtype", [None, *[PrType(t) for t in (1, 3, 5, 6, 7, 8)]],
                         ids=lambda t: "register-only" if t is None else t.name)
@run(40)
async def test_reservation_moves_with_the_device(tmp_path: Path, rtype: PrType | None) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, rtype)
        data = os.urandom(4096)
        await guest.write(0, data)
        writes = asyncio.ensure_future(_writer(guest))
        await asyncio.sleep(0.05)
        q = await c.migrate()
        stop_at = await writes
        assert q["status"] == "completed", q
        assert q["success"] is True
        t = q["timings"]
        assert t["pause_s"] is not None and t["pause_s"] < 2
        # The target: the key on B's nexus, holding as before; nothing on A's.
        assert c.entries_of(HOST_A) == []
        (b,) = c.entries_of(HOST_B)
        assert b.key == KEY
        if rtype is None:
            assert not any(e.holder for e in c.full_status().entries)
        else:
            assert b.holder and int(b.rtype) == rtype and b.scope == 0
        # The guest moved to B by itself (redirect) and still writes/reads.
        assert "vm1" in c.daemons["hostb"].devices and "vm1" not in c.daemons["hosta"].devices
        assert await guest.read(0, 8) == data
        r = await guest.pr_in(PrInAction.READ_RESERVATION)
        assert good(r)
        rr = ReadReservation.decode(bytes(r.data_in))
        assert (rr.key is None) == (rtype is None)
        for lba, blob in stop_at:
            assert await guest.read(lba, 1) == blob
    finally:
        await c.close()


async def _writer(guest, n: int = 40) -> list[tuple[int, bytes]]:
    """Acknowledged writes during the migration; all must read back."""
    acked = []
    for i in range(n):
        blob = os.urandom(512)
        r = await guest.submit(0, _write10(100 + i, 1), blob)
        assert r.status == Status.GOOD, r  # never RESERVATION CONFLICT
        acked.append((100 + i, blob))
        await asyncio.sleep(0.005)
    return acked


def _write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


@run(40)
async def test_control_api(tmp_path: Path) -> None:
    """migrate / query-migrate / migrate-cancel and MIGRATION events on the
    JSON control socket."""
    from prmigrate.host.control import CommandError, control_call, control_events

    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.EXCLUSIVE_ACCESS)
        sock = tmp_path / "hosta.sock"
        events: list[dict] = []

        async def collect() -> None:
            async for ev in control_events(sock):
                if ev["event"] == "MIGRATION":
                    events.append(ev["data"])
                    if ev["data"].get("finished"):
                        return

        collector = asyncio.ensure_future(collect())
        await asyncio.sleep(0.1)
        h, p = c.migration_address("hostb")
        with pytest.raises(CommandError) as e:
            await control_call(sock, "migrate", {"device": "nope", "to": f"{h}:{p}"})
        assert e.value.cls == "DeviceNotFound"
        with pytest.raises(CommandError) as e:
            await control_call(sock, "migrate", {"device": "vm1", "to": f"{h}:{p}", "strategy": "x"})
        assert e.value.cls == "InvalidParameter"
        with pytest.raises(CommandError) as e:
            await control_call(sock, "migrate", {"device": "vm1", "to": "no-port"})
        assert e.value.cls == "InvalidParameter"
        started = await control_call(sock, "migrate", {"device": "vm1", "to": f"{h}:{p}"})
        await asyncio.wait_for(collector, 20)
        (rec,) = await control_call(sock, "query-migrate", {"device": "vm1"})
        assert rec["id"] == started["id"] and rec["finished"] and rec["success"], rec
        assert rec["role"] == "source" and rec["status"] == "completed"
        t = rec["timings"]
        assert t["round_trips_in_pause"] == 1 and 0 < t["takeover_s"] <= t["pause_s"] <= t["total_s"]
        assert [e["status"] for e in events] == [
            "idle", "connecting", "setup", "stopping", "transferred", "handover", "completed"]
        assert events[-1]["success"] is True and events[-1]["timings"]["pause_s"] == t["pause_s"]
        assert await control_call(sock, "migrate-cancel", {"device": "vm1"}) == {"cancelled": False}
        (rec_b,) = await control_call(tmp_path / "hostb.sock", "query-migrate")
        assert rec_b["role"] == "destination" and rec_b["status"] == "resumed" and rec_b["success"]
    finally:
        await c.close()


@run(60)
async def test_a_restarted_source_keeps_redirecting_and_takes_the_device_back(tmp_path: Path) -> None:
    """After a move, the source's redirect survives a restart of the source
    daemon (``<device>.moved.json`` in its state directory): the restarted
    daemon does not serve the configured device, a guest logging in there
    lands on the destination; moving the device back clears the record."""
    from prmigrate.host.daemon import HostDaemon
    from prmigrate.host.migration_control import attach_migration

    from .service_rig import GUEST, SECRET

    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.WRITE_EXCLUSIVE)
        data = os.urandom(4096)
        await guest.write(0, data)
        assert (await c.migrate())["success"] is True
        record = tmp_path / "hosta" / "vm1.moved.json"
        assert record.exists()
        # restart A: same configuration, state directory and portal (a
        # guest goes back to the portal it was first given)
        old = c.daemons["hosta"]
        await c.services["hosta"].close()
        await old.close()
        a = HostDaemon(dataclasses.replace(old.config, listen=[old.listening[0][:2]]))
        await a.start()
        c.daemons["hosta"] = a
        c.services["hosta"] = await attach_migration(a, ("127.0.0.2", 0), SECRET)
        assert "vm1" not in a.devices and a.moved["vm1"]["port"] == c.daemons["hostb"].listening[0][1]
        assert a._cmd_query_host({})["moved"] == {"vm1": f"127.0.0.3:{c.daemons['hostb'].listening[0][1]}"}
        # A never opened a backend nexus for the guest again
        assert c.entries_of(HOST_A) == []
        # a guest logging in at A lands on B and sees its data and reservation
        from prmigrate.iscsi.initiator import connect

        late = await connect(c.frontend_url("hosta"), initiator_name=GUEST, isid=0x23D000000043,
                             command_timeout=20, reconnect=False)
        try:
            assert await late.read(0, 8) == data
            rr = ReadReservation.decode(bytes((await late.pr_in(PrInAction.READ_RESERVATION)).data_in))
            assert rr.key == KEY
        finally:
            await late.close()
        # and back to A: served there again, the record gone
        assert (await c.migrate("hostb", "hosta"))["success"] is True
        assert "vm1" in a.devices and not record.exists() and not a.moved
        assert await guest.read(0, 8) == data
        (e,) = c.entries_of(HOST_A)
        assert e.key == KEY and e.holder
    finally:
        await c.close()


def observer_register(c: Cluster, rk: int, sark: int) -> None:
    """REGISTER from the observer host, straight on the LU."""
    params = pr_out_params(rk, sark)
    assert good(c.lu.execute(OBSERVER, pr_out_cdb(REG, PrType.NONE, 0, len(params)), params))


@run(40)
async def test_a_move_that_would_preempt_another_hosts_registration_moves_by_register_and_move(tmp_path: Path) -> None:
    """The guest holds WE with a key the observer host has registered too.
    The takeover PREEMPT (SARK = key) would remove the observer's
    registration, fencing a host the guest never meant to: the source
    moves the reservation with REGISTER AND MOVE instead, one PR round trip
    in the pause, and the observer's registration is still there."""
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.WRITE_EXCLUSIVE)
        observer_register(c, 0, KEY)
        q = await c.migrate()
        assert q["status"] == "completed", q
        assert q["timings"]["round_trips_in_pause"] == 1, q
        (b,) = c.entries_of(HOST_B)
        assert b.key == KEY and b.holder and int(b.rtype) == PrType.WRITE_EXCLUSIVE
        assert c.entries_of(HOST_A) == []
        assert [e.key for e in c.full_status().entries if e.transport_id.name.lower() == OBSERVER.initiator] == [KEY]
    finally:
        await c.close()


class _NoPortInVpd83(LogicalUnit):
    """A LU whose VPD 83h names no relative target port (as tgt's): REPORT
    TARGET PORT GROUPS is where the port is found."""

    def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
        r = super().execute(nexus, cdb, data_out)
        if cdb[:3] == b"\x12\x01\x83" and r.status == Status.GOOD:
            page, out, off = bytes(r.data_in), b"", 4
            while off + 4 <= len(page):
                d = page[off : off + 4 + page[off + 3]]
                if d[1] & 0x3F != 0x14:  # drop association 01b, type 4h
                    out += d
                off += len(d)
            return Result(Status.GOOD, page[:2] + len(out).to_bytes(2, "big") + out)
        return r


@run(40)
async def test_the_destination_port_from_report_target_port_groups(tmp_path: Path) -> None:
    """VPD 83h names no relative target port; REPORT TARGET PORT GROUPS
    names one: the move by REGISTER AND MOVE goes to that port."""
    from prmigrate.scsi.inquiry import relative_target_port

    c = Cluster(tmp_path, unit_cls=_NoPortInVpd83)
    await c.start()
    try:
        page = c.lu.execute(OBSERVER, bytes((0x12, 1, 0x83, 0, 255, 0)))
        assert page.status == Status.GOOD and relative_target_port(bytes(page.data_in)) is None
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
        observer_register(c, 0, KEY)
        q = await c.migrate()
        assert q["status"] == "completed", q
        (b,) = c.entries_of(HOST_B)
        assert b.key == KEY and b.holder and c.entries_of(HOST_A) == []
        assert [e.key for e in c.full_status().entries if e.transport_id.name.lower() == OBSERVER.initiator] == [KEY]
    finally:
        await c.close()


class _NoRegisterAndMove(LogicalUnit):
    """A LU without PR OUT REGISTER AND MOVE: REPORT SUPPORTED OPERATION
    CODES says so (SUPPORT 001b) and the service action is refused."""

    def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
        if cdb[:2] == b"\xa3\x0c" and len(cdb) >= 6 and cdb[3] == 0x5F and cdb[5] == PrOutAction.REGISTER_AND_MOVE:
            return Result(Status.GOOD, bytes((0, 0x01, 0, 0)))
        if cdb[:1] == b"\x5f" and len(cdb) > 1 and cdb[1] & 0x1F == PrOutAction.REGISTER_AND_MOVE:
            return Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB))
        return super().execute(nexus, cdb, data_out)


@run(40)
async def test_a_move_that_would_preempt_another_hosts_registration_is_refused_without_register_and_move(tmp_path: Path) -> None:
    """As above on a backend without REGISTER AND MOVE: the destination
    refuses in setup, the source keeps the guest, nothing on the LU
    changes. Once the observer has another key, the move goes through."""
    c = Cluster(tmp_path, unit_cls=_NoRegisterAndMove)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.WRITE_EXCLUSIVE)
        observer_register(c, 0, KEY)
        before = c.full_status()
        q = await c.migrate()
        assert q["status"] == "rolled_back" and q["success"] is False, q
        assert "outside the device" in q["reason"] and "observer" in q["reason"], q
        assert "does not support REGISTER AND MOVE" in q["reason"], q
        assert "vm1" in c.daemons["hosta"].devices and "vm1" not in c.daemons["hostb"].devices
        assert c.full_status() == before
        assert good(await guest.submit(0, _write10(7, 1), bytes(512)))
        observer_register(c, KEY, 0x77)
        q = await c.migrate()
        assert q["status"] == "completed", q
        (b,) = c.entries_of(HOST_B)
        assert b.key == KEY and b.holder
        assert [e.key for e in c.full_status().entries if e.transport_id.name.lower() == OBSERVER.initiator] == [0x77]
    finally:
        await c.close()


class _NoFullStatus(LogicalUnit):
    """A LU without READ FULL STATUS (as tgt): READ KEYS is all there is."""

    def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
        if cdb[:1] == b"\x5e" and len(cdb) > 1 and cdb[1] & 0x1F == PrInAction.READ_FULL_STATUS:
            return Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB))
        return super().execute(nexus, cdb, data_out)


class _NoFullStatusNorMove(_NoFullStatus, _NoRegisterAndMove):
    """Neither READ FULL STATUS nor REGISTER AND MOVE."""


@run(40)
async def test_a_shared_key_is_counted_in_read_keys_without_full_status(tmp_path: Path) -> None:
    """Without READ FULL STATUS the destination counts READ KEYS: the key
    listed once more than the device's own registrations of it is shared
    with a nexus outside the device; the move is refused the same way on a
    backend without REGISTER AND MOVE, and moves by it on one that has it."""
    c = Cluster(tmp_path, unit_cls=_NoFullStatusNorMove)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.EXCLUSIVE_ACCESS)
        observer_register(c, 0, KEY)
        q = await c.migrate()
        assert q["status"] == "rolled_back" and "outside the device" in q["reason"], q
        assert "1 nexus(es) not the device's" in q["reason"], q
        observer_register(c, KEY, 0)  # the observer unregisters: the move goes through
        q = await c.migrate()
        assert q["status"] == "completed", q
    finally:
        await c.close()


@run(40)
async def test_a_shared_key_without_full_status_moves_by_register_and_move(tmp_path: Path) -> None:
    c = Cluster(tmp_path, unit_cls=_NoFullStatus)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.EXCLUSIVE_ACCESS)
        observer_register(c, 0, KEY)
        q = await c.migrate()
        assert q["status"] == "completed", q
        # the judge reads READ FULL STATUS past the LU's refusal of it
        r = LogicalUnit.execute(c.lu, OBSERVER, pr_in_cdb(PrInAction.READ_FULL_STATUS, 8192))
        entries = ReadFullStatus.decode(bytes(r.data_in)).entries
        isid = derive_isid("vm1", GUEST)
        (b,) = [e for e in entries if e.transport_id.isid == isid and e.transport_id.name.lower() == HOST_B]
        assert b.key == KEY and b.holder and not [e for e in entries if e.transport_id.name.lower() == HOST_A]
        assert [e.key for e in entries if e.transport_id.name.lower() == OBSERVER.initiator] == [KEY]
    finally:
        await c.close()


@run(60)
async def test_batch_control_api(tmp_path: Path) -> None:
    """migrate with devices / all: refused as a whole before anything
    starts; a batch's move goes through READY, its pause begins after its
    setup and the reservation moves."""
    from prmigrate.host.control import CommandError, control_call, control_events

    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, PrType.WRITE_EXCLUSIVE)
        sock = tmp_path / "hosta.sock"
        h, p = c.migration_address("hostb")
        to = f"{h}:{p}"
        for args, cls in (({"devices": ["vm1", "nope"]}, "DeviceNotFound"),
                          ({"devices": []}, "InvalidParameter"),
                          ({"all": True, "device": "vm1"}, "InvalidParameter"),
                          ({"devices": ["vm1"], "device": "vm1"}, "InvalidParameter"),
                          ({"all": True, "pause-parallel": 0}, "InvalidParameter"),
                          ({"all": True, "strategy": "x"}, "InvalidParameter")):
            with pytest.raises(CommandError) as e:
                await control_call(sock, "migrate", {"to": to, **args})
            assert e.value.cls == cls, (args, e.value)
        assert await control_call(sock, "query-migrate") == []  # nothing started
        events: list[dict] = []

        async def collect() -> None:
            async for ev in control_events(sock):
                if ev["event"] == "MIGRATION":
                    events.append(ev["data"])
                    if ev["data"].get("finished"):
                        return

        collector = asyncio.ensure_future(collect())
        await asyncio.sleep(0.1)
        started = await control_call(sock, "migrate", {"all": True, "to": to})
        assert [m["device"] for m in started["migrations"]] == ["vm1"] and started["batch"]
        with pytest.raises(CommandError) as e:  # already migrating
            await control_call(sock, "migrate", {"devices": ["vm1"], "to": to})
        assert e.value.cls == "GenericError"
        await asyncio.wait_for(collector, 20)
        assert [e["status"] for e in events] == [
            "idle", "connecting", "setup", "ready", "stopping", "transferred", "handover", "completed"]
        (rec,) = await control_call(sock, "query-migrate", {"device": "vm1"})
        assert rec["success"] and rec["timings"]["round_trips_in_pause"] == 1
        hist = {x["event"]: x["t"] for x in rec["history"]}
        assert hist["SetupOk"] <= hist["Go"]
        assert c.entries_of(HOST_A) == []
        (b,) = c.entries_of(HOST_B)
        assert b.holder and b.key == KEY
    finally:
        await c.close()
