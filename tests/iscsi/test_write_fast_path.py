"""The target's WRITE(10)/WRITE(16) fast path (``LogicalUnit.write_fast``,
taken in ``Connection._fast_reads`` for a write whose data all came as
immediate data) answers byte for byte like the general path and leaves the
same image: the same byte stream goes to a connection over a LogicalUnit
(fast path), to one over the same LU hidden behind a wrapper without the
fast contracts with the fast loop switched off (general path) and to one
with the wrapper and the loop on, and every byte sent back and every byte of
the image must match."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from prmigrate.iscsi import pdu as P
from prmigrate.lun.types import Nexus
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.sense import Sense

from .test_read_fast_path import BLOCKS, OTHER, Side, Stream, read10


def write10(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, n, 0)


def write16(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, n, 0, 0)


class WStream(Stream):
    def wcmd(self, cdb: bytes, data: bytes, edtl: int | None = None, *, final: bool = True,
             cmdsn: int | None = None) -> bytes:
        self.itt += 1
        if cmdsn is None:
            cmdsn = self.cmdsn
            self.cmdsn += 1
        return P.ScsiCommand(itt=self.itt, lun=0, cdb=cdb, cmdsn=cmdsn, exp_statsn=0,
                             expected_length=len(data) if edtl is None else edtl, write=True, final=final,
                             data=data).encode(self.hd, self.dd)


def block(i: int, n: int = 1) -> bytes:
    return bytes((i * 7 + j) & 0xFF for j in range(n * 512))


class WSide(Side):
    def __init__(self, tmp: Path, name: str, fast: bool, hd: bool, dd: bool, loop: bool = True) -> None:
        super().__init__(tmp, name, fast, hd, dd, 262144, loop)
        self.image = tmp / f"{name}.img"
        self.fast_writes = 0
        if fast:
            inner = self.lu.write_fast

            def counted(nexus, cdb, data):
                ok = inner(nexus, cdb, data)
                self.fast_writes += ok
                return ok

            self.lu.write_fast = counted  # type: ignore[method-assign]


def run_all(tmp: Path, script, hd=False, dd=False, setup=None, fast=True) -> list[bytes]:
    sides = [WSide(tmp, "fast", True, hd, dd), WSide(tmp, "general", False, hd, dd, loop=False),
             WSide(tmp, "direct", False, hd, dd)]
    outs: list[list[bytes]] = []
    for side in sides:
        if setup is not None:
            setup(side.lu, side.conn.nexus)
        outs.append([side.feed(batch) for batch in script(WStream(hd, dd))])
    assert outs[0] == outs[1]
    assert outs[2] == outs[1]
    images = [s.image.read_bytes() for s in sides]
    assert images[0] == images[1] == images[2]
    assert bool(sides[0].fast_writes) == fast and not sides[1].fast_writes
    return outs[0]


def plain(s: WStream) -> list[bytes]:
    return [b"".join(s.wcmd(write10(i * 8, 8), block(i, 8)) for i in range(16)),
            b"".join(s.wcmd(write16(200 + i * 3, 3), block(i, 3)) for i in range(8)),
            b"".join(s.cmd(read10(i * 8, 8), 4096) for i in range(4))]


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (True, True)])
def test_plain_writes_match(tmp_path: Path, hd: bool, dd: bool) -> None:
    out = run_all(tmp_path, plain, hd=hd, dd=dd)
    assert len(out[0]) == 16 * (48 + (4 if hd else 0))  # one SCSI Response each
    assert out[0][0] & 0x3F == P.Opcode.SCSI_RESPONSE and out[0][3] == 0  # GOOD


def test_what_the_fast_path_declines_matches(tmp_path: Path) -> None:
    def script(s: WStream) -> list[bytes]:
        return [
            s.wcmd(write10(0, 8), block(1, 8)),  # fast
            s.wcmd(write10(0, 8), block(2, 4)),  # less data than the CDB (EDTL underflow)
            s.wcmd(write10(8, 2), block(3, 4)),  # more data than the CDB (EDTL overflow)
            s.wcmd(write10(BLOCKS - 4, 8), block(4, 8)),  # LBA out of range
            s.wcmd(write10(16, 8, flags=0x20), block(5, 8)),  # WRPROTECT
            s.wcmd(write10(24, 8, flags=0x08), block(6, 8)),  # FUA: flushed by the general path
            s.wcmd(write16(32, 8), block(7, 8)[:1024], 4096, final=False),  # Data-Out to come
            s.wcmd(write10(40, 0), b"", 0),  # no transfer
            # out of order: the second arrives first and waits for the gap
            s.wcmd(write10(48, 1), block(8), cmdsn=s.cmdsn + 1) + s.wcmd(write10(56, 1), block(9), cmdsn=s.cmdsn),
            s.wcmd(write10(64, 1), block(10), cmdsn=s.cmdsn + 500),  # outside the window: dropped
            s.wcmd(write10(72, 1), block(11)),
            s.cmd(read10(0, 8), 4096) + s.cmd(read10(8, 8), 4096),
        ]

    run_all(tmp_path, script)


def test_write_cache_off_matches(tmp_path: Path) -> None:
    def setup(lu: LogicalUnit, nexus: Nexus) -> None:
        page = bytearray(lu.modes.current[0x08])
        page[2] &= ~0x04  # WCE off: every write is flushed, by the general path
        lu.modes.current[0x08] = page
        assert not lu.modes.wce

    run_all(tmp_path, plain, setup=setup, fast=False)


def test_unit_attention_matches(tmp_path: Path) -> None:
    def setup(lu: LogicalUnit, nexus: Nexus) -> None:
        lu.ua.establish(nexus, Sense.POWER_ON_OCCURRED)

    out = run_all(tmp_path, plain, setup=setup)
    assert out[0][0] & 0x3F == P.Opcode.SCSI_RESPONSE and out[0][3] == 0x02  # the UA, then GOOD


def test_reservation_conflict_matches(tmp_path: Path) -> None:
    def setup(lu: LogicalUnit, nexus: Nexus) -> None:
        lu.attach(OTHER)
        assert lu.execute(OTHER, bytes([0x16, 0, 0, 0, 0, 0])).status == 0  # RESERVE(6)

    out = run_all(tmp_path, plain, setup=setup, fast=False)
    assert out[0][3] == 0x18  # RESERVATION CONFLICT, nothing written


def test_data_digest_error_matches(tmp_path: Path) -> None:
    def script(s: WStream) -> list[bytes]:
        good = s.wcmd(write10(0, 8), block(1, 8))
        bad = bytearray(s.wcmd(write10(8, 8), block(2, 8)))
        bad[60] ^= 1  # in the data: the digest fails, the general path answers
        return [good + bytes(bad) + s.wcmd(write10(16, 8), block(3, 8), cmdsn=s.cmdsn - 1)]

    run_all(tmp_path, script, hd=True, dd=True)


def test_a_failing_write_is_answered_by_the_general_path(tmp_path: Path, caplog) -> None:
    """A write the store refuses (ENOSPC) raises in ``write_fast``: the
    general path runs it again and answers CHECK CONDITION, as it answers
    it without the fast path; the connection keeps serving."""

    def setup(lu: LogicalUnit, nexus: Nexus) -> None:
        def full(offset: int, data: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        lu.store.write = full  # type: ignore[method-assign]

    out = run_all(tmp_path, plain, setup=setup, fast=False)
    assert out[0][0] & 0x3F == P.Opcode.SCSI_RESPONSE and out[0][3] == 0x02  # CHECK CONDITION
    assert len(out[2]) == 4 * (48 + 4096)  # the reads after them are answered
    assert "internal error" in caplog.text


def _response_status(out: bytes, hd: bool) -> int:
    """The status of the one SCSI Response in ``out``."""
    assert len(out) == 48 + (4 if hd else 0)
    assert out[0] & 0x3F == P.Opcode.SCSI_RESPONSE and out[2] == 0  # COMMAND COMPLETED
    return out[3]


def _one_block_write_size(s: WStream) -> int:
    """The bytes of a one-block WRITE(10) on ``s``'s wire (built, not sent)."""
    size = len(s.wcmd(write10(0, 1), block(0)))
    s.cmdsn -= 1  # that one was not sent
    return size


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (True, True)])
def test_a_write_split_at_any_byte_is_taken_once_whole_and_reads_back(tmp_path: Path, hd: bool, dd: bool) -> None:
    """libiscsi sends a write's BHS and its data in two system calls, so a
    read of the frontend often ends between them: a write split at every
    byte (in the BHS, after it, in the data, in the digests) is answered
    nothing before its last byte, then GOOD by the fast path, and a read
    gives its data back."""
    side = WSide(tmp_path, "split", True, hd, dd)
    s = WStream(hd, dd)
    size = _one_block_write_size(s)
    for k in range(1, size):
        data = block(k)
        wire = s.wcmd(write10(3, 1), data)
        assert len(wire) == size
        assert side.feed(wire[:k]) == b""
        assert _response_status(side.feed(wire[k:]), hd) == 0
        back = side.feed(s.cmd(read10(3, 1), 512))
        at = 48 + (4 if hd else 0)
        assert back[0] & 0x3F == P.Opcode.DATA_IN and back[at : at + 512] == data
    assert side.fast_writes == size - 1


class RelayingUnit:
    """An LU that relays every plain write as the passthrough device does
    (``relay_write``), recording what it was handed; answered later with
    ``Connection.relay_data`` as the backend session answers."""

    block_size = 512

    def __init__(self) -> None:
        self.relayed: list[tuple[bytes, bytes, object]] = []

    def relay_write(self, nexus: Nexus, cdb: bytes, data: object, sink: object, token: object) -> bool:
        self.relayed.append((bytes(cdb), bytes(data), token))  # type: ignore[call-overload]
        return True

    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes = b"") -> object:
        raise AssertionError(f"not relayed: {bytes(cdb[:1]).hex()}")

    def attach(self, nexus: Nexus) -> None:
        pass

    def nexus_lost(self, nexus: Nexus) -> None:
        pass

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        pass

    def clear_task_set(self, nexus: Nexus) -> None:
        pass


@pytest.mark.parametrize("hd,dd", [(False, False), (True, True)])
def test_a_relayed_write_split_at_any_byte_goes_on_once_whole(tmp_path: Path, hd: bool, dd: bool) -> None:
    """The same split writes in front of a relaying LU: each is handed to
    ``relay_write`` once, whole, with exactly its data, and its GOOD from
    the backend comes back as one SCSI Response."""
    side = WSide(tmp_path, "relay", True, hd, dd)
    unit = RelayingUnit()
    side.conn.luns[0] = unit  # type: ignore[index]
    s = WStream(hd, dd)
    size = _one_block_write_size(s)
    for k in range(1, size):
        data = block(k)
        wire = s.wcmd(write10(5, 1), data)
        assert side.feed(wire[:k]) == b"" and not unit.relayed
        assert side.feed(wire[k:]) == b""  # answered by the backend, later
        ((cdb, got, token),) = unit.relayed
        assert cdb[:9] == write10(5, 1)[:9] and got == data
        unit.relayed.clear()
        side.sent.clear()
        side.conn.relay_data(token, 0, bytearray())  # type: ignore[arg-type]
        assert _response_status(b"".join(side.sent), hd) == 0
    assert not side.conn.pending
