"""EXTENDED COPY between two LUs of one ``prmigrate target`` node, over
iSCSI: the copy manager of LUN 0 finds LUN 1 by the NAA designator LUN 1
reports in VPD page 83h, copies, and reports the copy in COPY STATUS."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import connect
from prmigrate.scsi.constants import Status

from .conftest import INITIATOR1, start_target, stop

pytestmark = pytest.mark.interop

BLOCKS = 64


def naa_of(vpd83: bytes) -> bytes:
    off = 4
    while off + 4 <= len(vpd83):
        dlen = vpd83[off + 3]
        if vpd83[off + 1] & 0x3F == 0x03:  # association LU, type NAA
            return vpd83[off + 4 : off + 4 + dlen]
        off += 4 + dlen
    raise AssertionError("no NAA designator")


def e4(naa: bytes) -> bytes:
    d = bytearray(32)
    d[0], d[4], d[5], d[7] = 0xE4, 0x01, 0x03, len(naa)
    d[8 : 8 + len(naa)] = naa
    d[29:32] = (512).to_bytes(3, "big")
    return bytes(d)


def test_copy_between_two_luns(tmp_path: Path) -> None:
    t = start_target(tmp_path, size="16M", luns=2)

    async def main() -> None:
        s = await connect(t.url(), initiator_name=INITIATOR1, isid=0x23D000000091)
        try:
            async def cmd(lun: int, cdb: bytes, data: bytes = b"", din: int = 0) -> bytes:
                for _ in range(3):  # the first command of each LU meets its power-on UA
                    r = await s.submit(lun, cdb, data, din)
                    if r.status == Status.GOOD:
                        return bytes(r.data_in)
                raise AssertionError(r)

            payload = b"".join(bytes([i]) * 512 for i in range(1, BLOCKS + 1))
            await cmd(0, struct.pack(">BBQIBB", 0x8A, 0, 0, BLOCKS, 0, 0), payload)
            naa0 = naa_of(await cmd(0, bytes((0x12, 1, 0x83, 1, 0, 0)), din=256))
            naa1 = naa_of(await cmd(1, bytes((0x12, 1, 0x83, 1, 0, 0)), din=256))
            assert naa0 != naa1
            seg = struct.pack(">BBHHHxxHQQ", 0x02, 0, 0x18, 0, 1, BLOCKS, 0, 100)
            plist = struct.pack(">BBH4xII", 5, 0, 64, len(seg), 0) + e4(naa0) + e4(naa1) + seg
            await cmd(0, struct.pack(">BB8xIxB", 0x83, 0, len(plist), 0), plist)
            got = await cmd(1, struct.pack(">BBQIBB", 0x88, 0, 100, BLOCKS, 0, 0), din=BLOCKS * 512)
            assert got == payload
            status = await cmd(0, struct.pack(">BBB7xIxB", 0x84, 0, 5, 64, 0), din=64)
            assert status == struct.pack(">IBHBI", 8, 0x01, 1, 0, BLOCKS * 512)
        finally:
            await s.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        stop(t.proc)
    assert "Traceback" not in t.log
