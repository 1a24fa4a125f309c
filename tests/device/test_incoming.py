"""The incoming device's gate (device/incoming.py): what it answers before
the move, what it holds and pulls for, and what a failed pull answers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from prmigrate.device.incoming import NOT_ACCESSIBLE, IncomingGate, answered_before_move
from prmigrate.lun.types import Nexus, Result
from prmigrate.scsi.constants import (
    MaintenanceIn,
    Opcode,
    PrInAction,
    PrOutAction,
    ServiceActionIn16,
    Status,
)
from prmigrate.scsi.sense import decode_sense

NEXUS = Nexus.make("iqn.2026-11.org.prmigrate:guest1", 0x23D000000077, "iqn.2026-11.org.prmigrate:vm1")

BEFORE_MOVE = {
    "TEST UNIT READY": bytes(6),
    "INQUIRY": bytes([Opcode.INQUIRY, 0, 0, 0, 96, 0]),
    "INQUIRY VPD 83h": bytes([Opcode.INQUIRY, 1, 0x83, 0, 255, 0]),
    "REPORT LUNS": bytes([Opcode.REPORT_LUNS]) + bytes(11),
    "READ CAPACITY(10)": bytes([Opcode.READ_CAPACITY_10]) + bytes(9),
    "READ CAPACITY(16)": bytes([Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16]) + bytes(14),
    "REPORT SUPPORTED OPERATION CODES": bytes([Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES])
    + bytes(10),
    "REQUEST SENSE": bytes([Opcode.REQUEST_SENSE, 0, 0, 0, 252, 0]),
    "MODE SENSE(6)": bytes([Opcode.MODE_SENSE_6, 0, 0x3F, 0, 255, 0]),  # QEMU's open: no pull
}
NEEDS_NEXUS = {
    "READ(10)": bytes([Opcode.READ_10]) + bytes(9),
    "WRITE(10)": bytes([Opcode.WRITE_10]) + bytes(9),
    "PR IN READ KEYS": bytes([Opcode.PERSISTENT_RESERVE_IN, PrInAction.READ_KEYS]) + bytes(8),
    "PR OUT REGISTER": bytes([Opcode.PERSISTENT_RESERVE_OUT, PrOutAction.REGISTER]) + bytes(8),
    "RESERVE(6)": bytes([Opcode.RESERVE_6]) + bytes(5),
    "RELEASE(6)": bytes([Opcode.RELEASE_6]) + bytes(5),
    "MODE SELECT(6)": bytes([Opcode.MODE_SELECT_6, 0x10, 0, 0, 24, 0]),
    "GET LBA STATUS": bytes([Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS]) + bytes(14),
    "SYNCHRONIZE CACHE(10)": bytes([Opcode.SYNCHRONIZE_CACHE_10]) + bytes(9),
    "unknown opcode": bytes([0xC7]) + bytes(9),
    "empty CDB": b"",
}


@pytest.mark.parametrize("name", sorted(BEFORE_MOVE))
def test_answered_before_the_move(name: str) -> None:
    assert answered_before_move(BEFORE_MOVE[name])


@pytest.mark.parametrize("name", sorted(NEEDS_NEXUS))
def test_needs_the_guests_nexus(name: str) -> None:
    assert not answered_before_move(NEEDS_NEXUS[name])


class FakeDevice:
    def __init__(self) -> None:
        self.executed: list[bytes] = []
        self.log = logging.getLogger("test.incoming")

    def execute(self, nexus: Nexus, cdb: bytes, data_out: Any = b"", data_in_len: int | None = None) -> Result:
        self.executed.append(bytes(cdb))
        return Result()

    def nexus_lost(self, nexus: Nexus) -> None:
        pass


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_a_held_command_runs_once_the_device_arrives() -> None:
    async def go() -> None:
        dev = FakeDevice()
        arrived: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        gate = IncomingGate(dev, lambda: arrived)  # type: ignore[arg-type]
        assert gate.execute(NEXUS, BEFORE_MOVE["INQUIRY"]).status == Status.GOOD
        w1 = gate.execute(NEXUS, NEEDS_NEXUS["WRITE(10)"], b"x" * 512)
        # (a READ-class command is tried on the host's own nexus first: its
        # holding is tests/device/test_incoming_qemu_open.py's)
        w2 = gate.execute(NEXUS, NEEDS_NEXUS["SYNCHRONIZE CACHE(10)"])
        await asyncio.sleep(0)
        assert isinstance(w1, asyncio.Future) and not w1.done() and gate.pulls == 1  # one pull for both
        assert dev.executed == [BEFORE_MOVE["INQUIRY"]]
        gate.arrive()
        arrived.set_result(None)
        assert (await w1).status == Status.GOOD and (await w2).status == Status.GOOD  # type: ignore[misc]
        assert dev.executed[1:] == [NEEDS_NEXUS["WRITE(10)"], NEEDS_NEXUS["SYNCHRONIZE CACHE(10)"]]
        assert gate.execute(NEXUS, NEEDS_NEXUS["WRITE(10)"]).status == Status.GOOD  # passes through now

    _run(go())


def test_a_failed_pull_answers_not_ready_and_the_next_command_pulls_again() -> None:
    async def go() -> None:
        dev = FakeDevice()
        pulls: list[asyncio.Future[str | None]] = []

        def pull() -> asyncio.Future[str | None]:
            fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            pulls.append(fut)
            return fut

        gate = IncomingGate(dev, pull)  # type: ignore[arg-type]
        w = gate.execute(NEXUS, NEEDS_NEXUS["WRITE(10)"])
        await asyncio.sleep(0)
        pulls[0].set_result("source unreachable")
        r = await w  # type: ignore[misc]
        assert r is NOT_ACCESSIBLE and r.status == Status.CHECK_CONDITION
        s = decode_sense(bytes(r.sense))
        assert (int(s.key), s.asc, s.ascq) == (0x02, 0x04, 0x0A)
        assert dev.executed == []  # never forwarded
        w = gate.execute(NEXUS, NEEDS_NEXUS["WRITE(10)"])
        await asyncio.sleep(0)
        assert len(pulls) == 2
        gate.arrive()
        pulls[1].set_result(None)
        assert (await w).status == Status.GOOD  # type: ignore[misc]

    _run(go())


def test_a_deleted_incoming_device_answers_what_waits() -> None:
    async def go() -> None:
        never: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        gate = IncomingGate(FakeDevice(), lambda: never)  # type: ignore[arg-type]
        w = gate.execute(NEXUS, NEEDS_NEXUS["PR OUT REGISTER"])
        gate.close()
        assert (await w) is NOT_ACCESSIBLE  # type: ignore[misc]
        assert gate.execute(NEXUS, NEEDS_NEXUS["WRITE(10)"]) is NOT_ACCESSIBLE
        never.cancel()

    _run(go())


def test_a_lost_nexus_drops_its_held_commands() -> None:
    async def go() -> None:
        never: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        gate = IncomingGate(FakeDevice(), lambda: never)  # type: ignore[arg-type]
        w = gate.execute(NEXUS, NEEDS_NEXUS["WRITE(10)"])
        gate.nexus_lost(NEXUS)
        assert isinstance(w, asyncio.Future) and w.cancelled()
        never.cancel()

    _run(go())


# ---------------------------------------------------------------- the device key

BACKEND = "iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0"


def test_the_incoming_from_key() -> None:
    from prmigrate.commands.device import spec_arguments
    from prmigrate.device.config import parse_device_spec

    spec = f"name=vm1,backend={BACKEND},incoming-from=127.0.0.2:4444"
    dc = parse_device_spec(spec)
    assert dc.incoming_from == "127.0.0.2:4444"
    assert "incoming_from" not in dc.to_dict()  # never carried by the migration stream
    assert parse_device_spec(dc.to_spec()) == dc
    assert spec_arguments(spec)["incoming-from"] == "127.0.0.2:4444"
    assert parse_device_spec(f"name=vm1,backend={BACKEND}").incoming_from is None


@pytest.mark.parametrize("bad", ["127.0.0.2", "127.0.0.2:0", "127.0.0.2:http", ":4444", "127.0.0.2:70000"])
def test_a_bad_incoming_from_is_refused(bad: str) -> None:
    from prmigrate.device.config import ConfigError, parse_device_spec

    with pytest.raises(ConfigError, match="incoming-from"):
        parse_device_spec(f"name=vm1,backend={BACKEND},incoming-from={bad}")
