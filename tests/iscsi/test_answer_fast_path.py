"""A late answer (an LU's ``execute_then`` callback, as the passthrough device
gives) is sent byte for byte as the general path sends it: the same commands
go to two connections whose LU answers after the batch, one with
``Connection._answer`` as it is (one Data-In with status built inline for a
read of exactly the EDTL) and one with ``_answer`` replaced by the general
path (``_respond`` for every answer); every byte sent back must match."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.login import encode_text
from prmigrate.iscsi.session import Connection, TargetNode, TargetSettings
from prmigrate.iscsi.target import IscsiTarget
from prmigrate.lun.types import Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import Status
from prmigrate.scsi.sense import Sense, encode_sense

TARGET = "iqn.2026-11.org.prmigrate:late"
INITIATOR = "iqn.2026-11.org.prmigrate:client"
BLOCKS = 256
FAIL_OP = 0xC1  # vendor opcode: the LU's answer is an exception


class LateLU:
    """A LogicalUnit answering through ``execute_then`` after the batch."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        self.block_size = lu.block_size
        self.waiting: list[tuple[Any, Any]] = []

    def execute(self, nexus, cdb, data_out=b""):  # type: ignore[no-untyped-def]
        return self.lu.execute(nexus, cdb, data_out)

    def execute_then(self, nexus, cdb, data_out, done):  # type: ignore[no-untyped-def]
        if cdb[0] == FAIL_OP:
            answer: Any = ConnectionError("backend gone")
        else:
            answer = self.lu.execute(nexus, cdb, bytes(data_out))
        self.waiting.append((done, answer))
        return None

    def answer(self, order: list[int] | None = None) -> None:
        waiting, self.waiting = self.waiting, []
        for i in order if order is not None else range(len(waiting)):
            done, answer = waiting[i]
            done(answer)

    def attach(self, nexus):  # type: ignore[no-untyped-def]
        self.lu.attach(nexus)

    def nexus_lost(self, nexus):  # type: ignore[no-untyped-def]
        self.lu.nexus_lost(nexus)

    def reset(self, nexus, cold=False, target_reset=False):  # type: ignore[no-untyped-def]
        self.lu.reset(nexus, cold, target_reset)

    def clear_task_set(self, nexus):  # type: ignore[no-untyped-def]
        self.lu.clear_task_set(nexus)


class RelayLU(LateLU):
    """A LateLU that also takes reads through ``relay_read`` (as the
    passthrough device does) and answers them through the sink: one
    Data-In's worth (``relay_data``) when the read got all its data and no
    sense, as the initiator core's fast path would, else ``relay_result``."""

    def __init__(self, lu: LogicalUnit) -> None:
        super().__init__(lu)
        self.relayed = 0

    def relay_read(self, nexus, cdb, edtl, sink, token):  # type: ignore[no-untyped-def]
        if cdb[0] != 0x28 or ((cdb[7] << 8) | cdb[8]) * self.block_size != edtl:
            return False
        answer = self.lu.execute(nexus, cdb, b"")
        self.relayed += 1

        def done(_: Any) -> None:
            if answer.status == Status.GOOD and not answer.sense and len(answer.data_in) == edtl:
                sink.relay_data(token, answer.status, bytearray(answer.data_in))
            else:
                sink.relay_result(token, answer)

        self.waiting.append((done, answer))
        return True


def general_answer(self: Connection, itt: int, res: Any, edtl: int, flags: int, residual: int,
                   write: bool) -> None:
    """``_answer`` without its read fast path: ``_respond`` for everything."""
    del self.pending[itt]
    if isinstance(res, BaseException):
        res = Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INTERNAL_TARGET_FAILURE))
    self._respond(itt, res, edtl, flags, residual, write)
    if not self._in_batch:
        self.flush()


class Side:
    def __init__(self, tmp: Path, name: str, fast: bool, hd: bool, dd: bool, mrdsl: int,
                 relay: bool = False) -> None:
        img = tmp / f"{name}.img"
        lu = LogicalUnit(img, BLOCKS * 512, name="late-lu", serial="SN1")
        with open(img, "r+b") as f:
            f.write(bytes(i & 0xFF for i in range(BLOCKS * 512)))
        self.lu = RelayLU(lu) if relay else LateLU(lu)
        self.target = IscsiTarget([TargetNode(TARGET, {0: self.lu})], TargetSettings())
        self.sent: list[bytes] = []
        self.conn = Connection(self.target, "peer", ("127.0.0.1", 3260),
                               lambda parts: self.sent.append(b"".join(bytes(p) for p in parts)),
                               lambda: None)
        if not fast:
            self.conn._answer = general_answer.__get__(self.conn)  # type: ignore[method-assign]
        keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C" if hd else "None"), ("DataDigest", "CRC32C" if dd else "None"),
                ("MaxRecvDataSegmentLength", str(mrdsl)), ("ImmediateData", "Yes"),
                ("InitialR2T", "No")]
        self.conn.data_received(P.LoginRequest(
            isid=0x400000000001, tsih=0, itt=1, cid=0, cmdsn=1, exp_statsn=0, csg=1, nsg=3,
            transit=True, data=encode_text(keys)).encode())
        assert self.conn.state == Connection.FULL_FEATURE

    def run(self, data: bytes, order: list[int] | None) -> bytes:
        self.sent.clear()
        self.conn.data_received(data)
        self.lu.answer(order)
        return b"".join(self.sent)


def read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)


def write10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)


class Stream:
    def __init__(self, hd: bool, dd: bool) -> None:
        self.hd, self.dd = hd, dd
        self.cmdsn = 1
        self.itt = 100

    def cmd(self, cdb: bytes, edtl: int, *, read: bool = True, data: bytes = b"") -> bytes:
        self.itt += 1
        self.cmdsn += 1
        return P.ScsiCommand(itt=self.itt, lun=0, cdb=cdb, cmdsn=self.cmdsn - 1, exp_statsn=0,
                             expected_length=edtl, read=read and not data, write=bool(data),
                             data=data).encode(self.hd, self.dd)


def mixed(s: Stream) -> list[bytes]:
    return [
        b"".join(s.cmd(read10(i * 8, 8), 4096) for i in range(16)),  # the fast path
        s.cmd(read10(0, 8), 8192)  # underflow
        + s.cmd(read10(0, 8), 1000)  # overflow
        + s.cmd(read10(BLOCKS - 4, 8), 4096)  # CHECK CONDITION with sense
        + s.cmd(read10(0, 0), 0)  # GOOD without data
        + s.cmd(bytes([FAIL_OP]) + bytes(9), 512)  # the LU's answer is an exception
        + s.cmd(read10(8, 1), 512)
        + s.cmd(write10(8, 1), 512, read=False, data=bytes(range(256)) * 2)  # a write
        + s.cmd(read10(16, 3), 1536),
        b"".join(s.cmd(read10(i, 1 + i), 512 * (1 + i)) for i in range(6)),  # odd sizes
    ]


def run_both(tmp: Path, hd: bool = False, dd: bool = False, mrdsl: int = 262144) -> list[bytes]:
    """The fast, the relayed and the general answers: byte for byte equal."""
    sides = [Side(tmp, "fast", True, hd, dd, mrdsl), Side(tmp, "general", False, hd, dd, mrdsl),
             Side(tmp, "relay", True, hd, dd, mrdsl, relay=True)]
    outs = [[side.run(batch, None) for batch in mixed(Stream(hd, dd))] for side in sides]
    assert outs[0] == outs[1]
    assert outs[2] == outs[1]
    relay = sides[2].lu
    # every read of at most one Data-In went the relay path (16 of the
    # first batch alone); the longer ones the general path
    assert isinstance(relay, RelayLU) and relay.relayed >= (16 if mrdsl >= 4096 else 3)
    return outs[0]


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (True, True)])
def test_late_answers_match(tmp_path: Path, hd: bool, dd: bool) -> None:
    out = run_both(tmp_path, hd=hd, dd=dd)
    assert len(out[0]) == 16 * (48 + 4096 + (4 if hd else 0) + (4 if dd else 0))


def test_late_segmented_answers_match(tmp_path: Path) -> None:
    run_both(tmp_path, mrdsl=1024)


def test_late_answers_in_reverse_order_match(tmp_path: Path) -> None:
    sides = [Side(tmp_path, "fast", True, False, False, 262144),
             Side(tmp_path, "general", False, False, False, 262144),
             Side(tmp_path, "relay", True, False, False, 262144, relay=True)]
    outs = []
    for side in sides:
        s = Stream(False, False)
        batch = b"".join(s.cmd(read10(i * 8, 8), 4096) for i in range(8)) + s.cmd(read10(0, 8), 8192)
        outs.append(side.run(batch, list(range(9))[::-1]))
    assert outs[0] == outs[1] == outs[2]
    # answered in the order the LU gave
    rsp = P.PduReader(max_data_length=1 << 20)
    rsp.feed(outs[0])
    pdus = [P.decode_pdu(r) for r in rsp]
    assert [p.itt for p in pdus] == list(range(109, 100, -1))


def test_relayed_answer_of_an_aborted_task_is_dropped(tmp_path: Path) -> None:
    side = Side(tmp_path, "relay", True, False, False, 262144, relay=True)
    s = Stream(False, False)
    read = s.cmd(read10(0, 8), 4096)
    abort = P.TaskMgmtRequest(itt=500, function=P.TmfFunction.ABORT_TASK, lun=0, referenced_itt=s.itt,
                              cmdsn=s.cmdsn, exp_statsn=0, ref_cmdsn=s.cmdsn - 1).encode()  # immediate
    side.sent.clear()
    side.conn.data_received(read + abort)
    assert isinstance(side.lu, RelayLU) and side.lu.relayed == 1
    side.lu.answer()  # the backend's answer comes after the abort: dropped
    rsp = P.PduReader(max_data_length=1 << 20)
    rsp.feed(b"".join(side.sent))
    pdus = [P.decode_pdu(r) for r in rsp]
    assert [type(p) for p in pdus] == [P.TaskMgmtResponse]
    # the ITT used again gets its own answer, not the aborted one's
    s.itt -= 1
    again = s.cmd(read10(8, 8), 4096)
    assert side.run(again, None)[48:] == bytes(i & 0xFF for i in range(4096, 8192))
