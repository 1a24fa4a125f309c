"""The guest write relay end to end: a guest (our initiator) writes through
the guest frontend (our target serving the passthrough device) to the
backend LU (our target again, reached with our initiator). A WRITE whose
data the device only passes on goes through ``PassthroughDevice.relay_write``
(counted by a wrapper), whatever carried its data from the guest
(immediate data, unsolicited Data-Out, R2T-solicited bursts smaller than
the write, data digests on); the data is then read back from the backend LU
directly. What the device must see keeps the general path: a held device
holds the write, and a backend failure comes back as the backend's sense."""

from __future__ import annotations

import asyncio
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from prmigrate.iscsi.initiator import Session, connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.types import Result
from prmigrate.scsi.constants import SenseKey, Status
from prmigrate.scsi.sense import decode_sense

from .test_passthrough import G1, Rig, run

FRONTEND = "iqn.2026-11.org.prmigrate:vm1"


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0) + bytes(6)


def read_back(rig: Rig, lba: int, blocks: int) -> bytes:
    """The backend LU's own answer, not through the device."""
    r = rig.lu.execute(rig.other, struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0), b"")
    assert isinstance(r, Result) and r.status == Status.GOOD
    return bytes(r.data_in)


class Counted:
    """Wraps the device's relay_write: how many writes it took."""

    def __init__(self, rig: Rig) -> None:
        self.taken = 0
        real = rig.dev.relay_write

        def relay_write(*a: Any) -> bool:
            ok = real(*a)
            self.taken += ok
            return ok

        rig.dev.relay_write = relay_write  # type: ignore[method-assign]  # before any connection asks


async def frontend_and_guest(rig: Rig, **options: Any) -> tuple[IscsiTarget, Session]:
    frontend = IscsiTarget([TargetNode(FRONTEND, {0: rig.dev})])
    (fh, fp), *_ = await frontend.start(rig.host, 0)
    guest = await connect(f"iscsi://{fh}:{fp}/{FRONTEND}/0", initiator_name=G1, isid=0x23D000000031,
                          reconnect=False, command_timeout=10, **options)
    while (await guest.submit(0, bytes(16), b"", 0)).status != 0:  # the first contact's UA
        pass
    return frontend, guest


GUEST_DATA_OUT = {
    "immediate": {"immediate_data": True, "initial_r2t": True},
    "unsolicited": {"immediate_data": False, "initial_r2t": False, "first_burst_length": 16384},
    "immediate+unsolicited": {"immediate_data": True, "initial_r2t": False, "first_burst_length": 65536,
                              "max_recv_data_segment_length": 8192},
    "r2t-bursts": {"immediate_data": False, "initial_r2t": True, "max_burst_length": 8192,
                   "max_outstanding_r2t": 4},
    "digests": {"header_digest": True, "data_digest": True, "initial_r2t": False, "max_burst_length": 16384},
}


@pytest.mark.parametrize("kind", sorted(GUEST_DATA_OUT))
@run
async def test_writes_are_relayed_whatever_carried_their_data(tmp_path: Path, kind: str) -> None:
    rig = Rig(tmp_path, lun_size=8 << 20)
    await rig.start()
    counted = Counted(rig)
    frontend, guest = await frontend_and_guest(rig, **GUEST_DATA_OUT[kind])
    try:
        rng = random.Random(kind)
        written: list[tuple[int, bytes]] = []
        for i, blocks in enumerate((1, 8, 31, 64, 128, 512)):
            lba = 1024 * i + rng.randrange(8)
            data = os.urandom(blocks * 512)
            cdb = write10(lba, blocks) if i % 2 else write16(lba, blocks)
            r = await guest.submit(0, cdb, data, 0)
            assert r.status == Status.GOOD and not r.sense
            written.append((lba, data))
        # more than the backend session's FirstBurstLength (256 KiB): R2T-solicited there too
        lba, data = 7296, os.urandom(1024 * 512)
        r = await guest.submit(0, write16(lba, 1024), data, 0)
        assert r.status == Status.GOOD and not r.sense
        written.append((lba, data))
        # several at once: their answers may overtake each other
        batch = [(6144 + 64 * j, os.urandom(32 * 512)) for j in range(16)]
        rs = await asyncio.gather(*(guest.submit(0, write16(lba, 32), d, 0) for lba, d in batch))
        assert all(r.status == Status.GOOD for r in rs)
        for lba, data in written + batch:
            assert read_back(rig, lba, len(data) // 512) == data
        assert counted.taken == len(written) + len(batch)
    finally:
        await guest.close()
        await frontend.close()
        await rig.close()


@run
async def test_a_write_the_backend_fails_comes_back_with_its_sense(tmp_path: Path) -> None:
    rig = Rig(tmp_path, lun_size=1 << 20)
    await rig.start()
    counted = Counted(rig)
    frontend, guest = await frontend_and_guest(rig, max_burst_length=4096, initial_r2t=True)
    try:
        r = await guest.submit(0, write16((1 << 20) // 512 - 2, 16), b"\x01" * 8192, 0)
        assert r.status == Status.CHECK_CONDITION
        s = decode_sense(r.sense)
        assert (s.key, s.asc, s.ascq) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
        assert counted.taken == 1
        # the connection goes on
        assert (await guest.submit(0, write16(0, 1), b"\x02" * 512, 0)).status == Status.GOOD
        assert read_back(rig, 0, 1) == b"\x02" * 512
    finally:
        await guest.close()
        await frontend.close()
        await rig.close()


@run
async def test_writes_to_a_held_device_are_held_not_relayed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, lun_size=1 << 20)
    await rig.start()
    counted = Counted(rig)
    frontend, guest = await frontend_and_guest(rig)
    try:
        assert (await guest.submit(0, write16(0, 8), b"\x03" * 4096, 0)).status == Status.GOOD
        assert counted.taken == 1
        rig.dev.hold()
        held = asyncio.ensure_future(guest.submit(0, write16(8, 8), b"\x04" * 4096, 0))
        await asyncio.sleep(0.2)
        assert not held.done() and rig.dev.held == 1
        assert read_back(rig, 8, 8) == bytes(4096)  # not passed on while held
        rig.dev.release_held()
        assert (await held).status == Status.GOOD
        assert read_back(rig, 8, 8) == b"\x04" * 4096
        assert counted.taken == 1  # the held write took the general path
        # and the relay again once released
        assert (await guest.submit(0, write16(16, 8), b"\x05" * 4096, 0)).status == Status.GOOD
        assert counted.taken == 2
    finally:
        await guest.close()
        await frontend.close()
        await rig.close()


@run
async def test_a_guest_connection_lost_mid_write_leaves_the_device_serving(tmp_path: Path) -> None:
    """The guest's connection ends while relayed writes are on the backend
    and one waits for its R2T-solicited data: the guest's commands fail
    (no hang), answers that come back later are dropped, and the guest's
    next connection writes through the relay again."""
    rig = Rig(tmp_path, lun_size=1 << 20)
    await rig.start()
    counted = Counted(rig)
    frontend, guest = await frontend_and_guest(rig, initial_r2t=True, first_burst_length=4096,
                                               max_burst_length=4096)
    try:
        inflight = [asyncio.ensure_future(guest.submit(0, write16(64 * j, 64), b"\x06" * 32768, 0))
                    for j in range(4)]
        await asyncio.sleep(0.01)
        guest._proto.transport.abort()  # type: ignore[union-attr]  # as a reset connection
        done = await asyncio.wait_for(asyncio.gather(*inflight, return_exceptions=True), 10)
        assert all(isinstance(r, Exception) or r.status == Status.GOOD for r in done)
        await guest.close()
        _, guest = await frontend_and_guest(rig)
        before = counted.taken
        assert (await guest.submit(0, write16(512, 8), b"\x07" * 4096, 0)).status == Status.GOOD
        assert read_back(rig, 512, 8) == b"\x07" * 4096
        assert counted.taken == before + 1
    finally:
        await guest.close()
        await frontend.close()
        await rig.close()


@run
async def test_a_backend_connection_lost_mid_write_sends_the_write_again(tmp_path: Path) -> None:
    """The device's backend connection ends with relayed writes on it: the
    backend session logs in again and sends them again, data and all; the
    guest gets GOOD and the data is on the LU."""
    rig = Rig(tmp_path, lun_size=1 << 20)
    await rig.start()
    counted = Counted(rig)
    frontend, guest = await frontend_and_guest(rig)
    try:
        backend = await rig.dev.backend_session(G1)
        writes = [(64 * j, os.urandom(32768)) for j in range(4)]
        inflight = [asyncio.ensure_future(guest.submit(0, write16(lba, 64), d, 0)) for lba, d in writes]
        while counted.taken < len(writes):
            await asyncio.sleep(0)
        backend._proto.transport.abort()  # type: ignore[union-attr]
        rs = await asyncio.wait_for(asyncio.gather(*inflight), 15)
        assert all(r.status == Status.GOOD for r in rs), rs
        for lba, data in writes:
            assert read_back(rig, lba, 64) == data
    finally:
        await guest.close()
        await frontend.close()
        await rig.close()
