"""The target's READ(10)/READ(16) fast path answers byte for byte like the
general path: the same byte stream goes to a connection over a LogicalUnit
(fast path), to one over the same LU hidden behind a wrapper without
``read_fast`` (commands handed straight to ``_execute``) and to one with the
fast path switched off (general path), and every byte sent back must match."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.login import encode_text
from prmigrate.iscsi.session import Connection, TargetNode, TargetSettings
from prmigrate.iscsi.target import IscsiTarget
from prmigrate.lun.types import Nexus
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.sense import Sense

TARGET = "iqn.2026-11.org.prmigrate:fast"
INITIATOR = "iqn.2026-11.org.prmigrate:client"
BLOCKS = 256
OTHER = Nexus.make("iqn.2026-11.org.prmigrate:other", 0x400000000009, TARGET)


class GeneralOnly:
    """The same LU without ``read_fast``: every command takes the general path."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        self.block_size = lu.block_size

    def execute(self, nexus, cdb, data_out=b""):
        return self.lu.execute(nexus, cdb, data_out)

    def attach(self, nexus):
        self.lu.attach(nexus)

    def nexus_lost(self, nexus):
        self.lu.nexus_lost(nexus)

    def reset(self, nexus, cold=False, target_reset=False):
        self.lu.reset(nexus, cold, target_reset)

    def clear_task_set(self, nexus):
        self.lu.clear_task_set(nexus)


class Side:
    def __init__(self, tmp: Path, name: str, fast: bool, hd: bool, dd: bool, mrdsl: int, loop: bool = True) -> None:
        self.lu = LogicalUnit(tmp / f"{name}.img", BLOCKS * 512, name="fast-path-lu", serial="SN1")
        with open(tmp / f"{name}.img", "r+b") as f:
            f.write(bytes(i & 0xFF for i in range(BLOCKS * 512)))
        self.fast_reads = 0
        if fast:
            inner = self.lu.read_fast

            def counted(nexus, cdb):
                data = inner(nexus, cdb)
                self.fast_reads += data is not None
                return data

            self.lu.read_fast = counted  # type: ignore[method-assign]
        node = TargetNode(TARGET, {0: self.lu if fast else GeneralOnly(self.lu)})
        self.target = IscsiTarget([node], TargetSettings())
        self.sent: list[bytes] = []
        self.conn = Connection(self.target, "peer", ("127.0.0.1", 3260),
                               lambda parts: self.sent.append(b"".join(bytes(p) for p in parts)), lambda: None)
        keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C" if hd else "None"), ("DataDigest", "CRC32C" if dd else "None"),
                ("MaxRecvDataSegmentLength", str(mrdsl))]
        self.feed(P.LoginRequest(isid=0x400000000001, tsih=0, itt=1, cid=0, cmdsn=1, exp_statsn=0, csg=1,
                                 nsg=3, transit=True, data=encode_text(keys)).encode())
        assert self.conn.state == Connection.FULL_FEATURE
        if not loop:
            self.conn._fast_reads = lambda: None  # type: ignore[method-assign]

    def feed(self, data: bytes) -> bytes:
        self.sent.clear()
        self.conn.data_received(data)
        return b"".join(self.sent)


def read10(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, n, 0)


def read16(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x88, flags, lba, n, 0, 0)


class Stream:
    def __init__(self, hd: bool, dd: bool) -> None:
        self.hd, self.dd = hd, dd
        self.cmdsn = 1
        self.itt = 100

    def cmd(self, cdb: bytes, edtl: int, *, cmdsn: int | None = None, immediate: bool = False,
            read: bool = True, lun: int = 0) -> bytes:
        self.itt += 1
        if cmdsn is None:
            cmdsn = self.cmdsn
            if not immediate:
                self.cmdsn += 1
        return P.ScsiCommand(itt=self.itt, lun=lun, cdb=cdb, cmdsn=cmdsn, exp_statsn=0, expected_length=edtl,
                             read=read, immediate=immediate).encode(self.hd, self.dd)


def run_both(tmp: Path, script, hd=False, dd=False, mrdsl=262144, setup=None, fast=True) -> list[bytes]:
    sides = [Side(tmp, "fast", True, hd, dd, mrdsl), Side(tmp, "general", False, hd, dd, mrdsl, loop=False),
             Side(tmp, "direct", False, hd, dd, mrdsl)]
    outs: list[list[bytes]] = []
    for side in sides:
        if setup is not None:
            setup(side.lu, side.conn.nexus)
        outs.append([side.feed(batch) for batch in script(Stream(hd, dd))])
    assert outs[0] == outs[1]
    assert outs[2] == outs[1]
    assert bool(sides[0].fast_reads) == fast and not sides[1].fast_reads
    return outs[0]


def plain(s: Stream) -> list[bytes]:
    return [b"".join(s.cmd(read10(i * 8, 8), 4096) for i in range(16)),
            b"".join(s.cmd(read16(i * 3, 5), 2560) for i in range(8))]


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (True, True)])
def test_plain_reads_match(tmp_path: Path, hd: bool, dd: bool) -> None:
    out = run_both(tmp_path, plain, hd=hd, dd=dd)
    assert len(out[0]) == 16 * (48 + 4096 + (4 if hd else 0) + (4 if dd else 0))


def test_residuals_errors_and_order_match(tmp_path: Path) -> None:
    def script(s: Stream) -> list[bytes]:
        return [
            s.cmd(read10(0, 8), 8192),  # underflow
            s.cmd(read10(0, 8), 1000),  # overflow
            s.cmd(read10(BLOCKS - 4, 8), 4096),  # LBA out of range
            s.cmd(read10(0, 8, flags=0x20), 4096),  # RDPROTECT
            s.cmd(read10(0, 0), 0),  # no transfer
            s.cmd(read16(0, 8), 4096, lun=3),  # no such LUN
            s.cmd(read10(0, 8), 4096, immediate=True),
            s.cmd(read10(8, 8), 4096, read=False),  # no R bit
            # out of order: the second arrives first and waits for the gap
            s.cmd(read10(16, 8), 4096, cmdsn=s.cmdsn + 1) + s.cmd(read10(24, 8), 4096, cmdsn=s.cmdsn),
            s.cmd(read10(32, 8), 4096, cmdsn=s.cmdsn + 500),  # outside the window: dropped
            s.cmd(read10(40, 8), 4096, cmdsn=s.cmdsn + 2),
        ]

    run_both(tmp_path, script)


def test_segmented_data_in_matches(tmp_path: Path) -> None:
    run_both(tmp_path, lambda s: [s.cmd(read10(0, 64), 64 * 512) + s.cmd(read10(0, 8), 4096)], mrdsl=8192)


def test_unit_attention_matches(tmp_path: Path) -> None:
    def setup(lu: LogicalUnit, nexus: Nexus) -> None:
        lu.ua.establish(nexus, Sense.POWER_ON_OCCURRED)

    out = run_both(tmp_path, plain, setup=setup)
    assert out[0][0] & 0x3F == P.Opcode.SCSI_RESPONSE  # the UA, then the data


def test_reservation_conflict_matches(tmp_path: Path) -> None:
    def setup(lu: LogicalUnit, nexus: Nexus) -> None:
        lu.attach(OTHER)
        assert lu.execute(OTHER, bytes([0x16, 0, 0, 0, 0, 0])).status == 0  # RESERVE(6)

    out = run_both(tmp_path, plain, setup=setup, fast=False)
    assert out[0][3] == 0x18  # RESERVATION CONFLICT


def test_header_digest_error_matches(tmp_path: Path) -> None:
    def script(s: Stream) -> list[bytes]:
        good = s.cmd(read10(0, 8), 4096)
        bad = bytearray(s.cmd(read10(8, 8), 4096))
        bad[50] ^= 1
        return [good + bytes(bad)]

    run_both(tmp_path, script, hd=True)
