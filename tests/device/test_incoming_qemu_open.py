"""device/incoming.py's gate on MODE SENSE and READ, the commands a QEMU
started with -incoming sends when it opens its drive: answered before the move where a
non-registrant may send it (Write Exclusive types), pulled where the target
refuses it (Exclusive Access types). Real sockets, one process (the rig of
tests/migration/test_pull.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prmigrate.iscsi.initiator import Session
from prmigrate.scsi.constants import Opcode, PrType, Status

from ..migration.service_rig import HOST_A, HOST_B, Cluster, good, run
from ..migration.test_pull import KEY, _add_incoming, _on, _reserved_guest, _second_session

READ_LBA0 = bytes([Opcode.READ_10]) + bytes(6) + b"\x00\x01\x00"
MODE_SENSE_6_ALL = bytes([Opcode.MODE_SENSE_6, 0x08, 0x3F, 0, 0xFF, 0])  # as QEMU's iscsi_open


async def _mode_sense(s: Session) -> object:
    r = await s.submit(0, MODE_SENSE_6_ALL, b"", 255)
    if r.status == Status.CHECK_CONDITION:  # a new nexus's unit attention, once
        r = await s.submit(0, MODE_SENSE_6_ALL, b"", 255)
    return r


@run(60)
async def test_mode_sense_and_read_under_write_exclusive_are_answered_without_a_move(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    b_session = None
    try:
        await _reserved_guest(c, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
        await _add_incoming(c)
        b_session = await _second_session(c)
        r = await _mode_sense(b_session)
        assert good(r), r
        r = await b_session.submit(0, READ_LBA0, b"", 512)  # QEMU's other open-time command
        assert good(r), r
        (a,) = _on(c, HOST_A)
        assert a.holder and a.key == KEY
        assert _on(c, HOST_B) == []
        assert "vm1" in c.daemons["hosta"].devices
        assert "vm1" in c.daemons["hostb"].incoming_devices
    finally:
        if b_session is not None:
            await asyncio.wait_for(b_session.close(), 5)
        await c.close()


@run(60)
async def test_under_exclusive_access_a_read_pulls_the_device(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    b_session = None
    try:
        await _reserved_guest(c, PrType.EXCLUSIVE_ACCESS)
        await _add_incoming(c)
        b_session = await _second_session(c)
        r = await _mode_sense(b_session)
        assert r.status == Status.RESERVATION_CONFLICT, r  # type: ignore[attr-defined]
        assert _on(c, HOST_B) == []  # nothing moved
        r = await b_session.submit(0, READ_LBA0, b"", 512)
        assert good(r), r  # refused on B's own nexus: held, pulled, then run on the guest's
        assert _on(c, HOST_A) == []
        (b,) = _on(c, HOST_B)
        assert b.holder and b.key == KEY and int(b.rtype) == PrType.EXCLUSIVE_ACCESS
    finally:
        if b_session is not None:
            await asyncio.wait_for(b_session.close(), 5)
        await c.close()
