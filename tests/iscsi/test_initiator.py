"""The iSCSI initiator: sans-IO core against scripted PDUs, the asyncio
session against tgtd (Debian's userspace target) and a scripted fake target."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import (
    ConnectionLost,
    LoginError,
    LoginTimeout,
    connect,
    discover,
)
from prmigrate.iscsi.initiator_core import (
    CommandDone,
    ConnectionFailed,
    InitiatorCore,
    LoginDone,
    LoginFailed,
    LoginRedirect,
    SessionConfig,
    UnitAttention,
)
from prmigrate.iscsi.login import decode_text, encode_text
from prmigrate.iscsi.pdu import (
    R2T,
    AsyncEvent,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    NopIn,
    NopOut,
    PduReader,
    ResponseFlags,
    ScsiCommand,
    ScsiResponse,
    decode_pdu,
    sense_segment,
)
from prmigrate.lun.types import Result
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadKeys, pr_out_params
from prmigrate.scsi.sense import Sense, encode_sense

INITIATOR = "iqn.2026-11.org.prmigrate:test-initiator"
TARGET = "iqn.2026-11.org.prmigrate:tgt-target"

# --------------------------------------------------------------------------
# sans-IO core


def _pdus(data: bytes, **kw: object) -> list[object]:
    r = PduReader(max_data_length=1 << 24, **kw)  # type: ignore[arg-type]
    r.feed(data)
    return [decode_pdu(p) for p in r]


class ScriptedTarget:
    """Answers an InitiatorCore's login like a target accepting everything."""

    def __init__(self, core: InitiatorCore, answers: dict[str, str] | None = None,
                 bytewise: bool = False) -> None:
        self.core = core
        self.bytewise = bytewise
        self.statsn = 100
        self.answers = answers or {}
        self.max_cmdsn = 10

    def login(self) -> list[object]:
        self.core.start_login(0.0)
        events: list[object] = []
        for _ in range(10):
            out = _pdus(self.core.data_to_send())
            assert len(out) == 1
            req = out[0]
            assert isinstance(req, LoginRequest)
            keys = dict(decode_text(req.data))
            reply = []
            for k, v in keys.items():
                if k in ("HeaderDigest", "DataDigest", "AuthMethod"):
                    reply.append((k, self.answers.get(k, v.split(",")[-1])))
                elif k in ("InitiatorName", "TargetName", "SessionType"):
                    continue
                elif k == "MaxRecvDataSegmentLength":
                    reply.append((k, self.answers.get("TargetMRDSL", "8192")))
                else:
                    reply.append((k, self.answers.get(k, v)))
            nsg = req.nsg if req.transit else req.csg
            rsp = LoginResponse(
                req.isid, 7 if nsg == 3 else 0, req.itt, self.statsn, req.cmdsn, self.max_cmdsn,
                req.csg, nsg, req.transit, data=encode_text(reply),
            )
            self.statsn += 1
            wire = rsp.encode()
            if self.bytewise:
                for i in range(len(wire)):
                    events += self.core.receive_data(wire[i : i + 1], 0.0)
            else:
                events += self.core.receive_data(wire, 0.0)
            if any(isinstance(e, LoginDone) for e in events):
                return events
        raise AssertionError("login did not finish")


def _core(**kw: object) -> InitiatorCore:
    cfg = SessionConfig(INITIATOR, 0x23D000000042, TARGET, **kw)  # type: ignore[arg-type]
    return InitiatorCore(cfg, random_bytes=lambda n: bytes(range(1, n + 1)))


def test_core_login_offers_keys_and_uses_answers() -> None:
    core = _core(initial_r2t=False, first_burst_length=16384)
    t = ScriptedTarget(core, {"TargetMRDSL": "4096", "MaxBurstLength": "65536"})
    events = t.login()
    assert isinstance(events[-1], LoginDone)
    p = core.params
    assert p.max_xmit_data_segment_length == 4096
    assert p.max_burst_length == 65536
    assert p.first_burst_length == 16384
    assert p.initial_r2t is False and p.immediate_data is True
    assert core.negotiated.tsih == 7
    assert core.logged_in


def test_core_login_fed_one_byte_at_a_time() -> None:
    core = _core(header_digest="CRC32C,None")
    events = ScriptedTarget(core, {"HeaderDigest": "CRC32C"}, bytewise=True).login()
    assert isinstance(events[-1], LoginDone) and core.params.header_digest
    # the first full-feature PDU already carries a header digest
    core.submit(0, bytes(6))
    (cmd,) = _pdus(core.data_to_send(), header_digest=True)
    rsp = ScsiResponse(cmd.itt, Status.GOOD, 300, 2, 20).encode(header_digest=True)  # type: ignore[attr-defined]
    got = [e for i in range(len(rsp)) for e in core.receive_data(rsp[i : i + 1], 0.0)]
    assert len(got) == 1 and isinstance(got[0], CommandDone)


def test_core_login_redirect_and_refusal() -> None:
    core = _core()
    core.start_login(0.0)
    (req,) = _pdus(core.data_to_send())
    moved = LoginResponse(req.isid, 0, req.itt, 1, 1, 1, 0, 0, False,  # type: ignore[attr-defined]
                          status=LoginStatus.TARGET_MOVED_TEMPORARILY,
                          data=encode_text([("TargetAddress", "127.0.0.2:3261,1")]))
    (ev,) = core.receive_data(moved.encode(), 0.0)
    assert ev == LoginRedirect("127.0.0.2:3261,1", False)
    core.start_login(0.0)
    (req,) = _pdus(core.data_to_send())
    refused = LoginResponse(req.isid, 0, req.itt, 1, 1, 1, 0, 0, False,  # type: ignore[attr-defined]
                            status=LoginStatus.NOT_FOUND)
    (ev,) = core.receive_data(refused.encode(), 0.0)
    assert isinstance(ev, LoginFailed) and ev.error.status == LoginStatus.NOT_FOUND


def test_core_login_request_carries_isid_and_names() -> None:
    core = _core()
    core.start_login(0.0)
    (req,) = _pdus(core.data_to_send())
    assert isinstance(req, LoginRequest)
    assert req.isid == 0x23D000000042 and req.tsih == 0
    keys = dict(decode_text(req.data))
    assert keys["InitiatorName"] == INITIATOR
    assert keys["TargetName"] == TARGET
    assert keys["SessionType"] == "Normal"
    assert keys["AuthMethod"] == "None"


def test_core_write_uses_immediate_unsolicited_then_r2t() -> None:
    core = _core(initial_r2t=False, first_burst_length=16384)
    ScriptedTarget(core, {"TargetMRDSL": "4096"}).login()
    payload = bytes(random.Random(1).randbytes(40000))
    h = core.submit(1, b"\x8a" + bytes(15), payload)
    sent = _pdus(core.data_to_send())
    cmd = sent[0]
    assert isinstance(cmd, ScsiCommand)
    assert cmd.write and cmd.expected_length == 40000 and len(cmd.data) == 4096
    assert not cmd.final  # unsolicited Data-Out follows
    douts = sent[1:]
    assert [d.offset for d in douts] == [4096, 8192, 12288]  # type: ignore[attr-defined]
    assert all(isinstance(d, DataOut) and d.ttt == 0xFFFFFFFF for d in douts)
    assert douts[-1].final and sum(len(d.data) for d in douts) == 16384 - 4096  # type: ignore[attr-defined]
    # the target asks for the rest in one burst; answered in MRDSL pieces
    r2t = R2T(cmd.itt, 0x55, 0, 16384, 40000 - 16384, 200, 2, 20)
    assert core.receive_data(r2t.encode(), 0.0) == []
    out = _pdus(core.data_to_send())
    assert all(isinstance(d, DataOut) and d.ttt == 0x55 and len(d.data) <= 4096 for d in out)
    assert [d.datasn for d in out] == list(range(len(out)))  # type: ignore[attr-defined]
    assert b"".join(d.data for d in out) == payload[16384:]  # type: ignore[attr-defined]
    rsp = ScsiResponse(cmd.itt, Status.GOOD, 200, 2, 20)
    (done,) = core.receive_data(rsp.encode(), 0.0)
    assert isinstance(done, CommandDone) and done.handle == h and done.result.status == Status.GOOD


def test_core_data_in_reassembly_and_residual() -> None:
    core = _core()
    ScriptedTarget(core).login()
    h = core.submit(1, b"\x88" + bytes(15), data_in_len=4096)
    (cmd,) = _pdus(core.data_to_send())
    # out of order pieces, 3000 bytes transferred, underflow residual 1096
    a = DataIn(cmd.itt, 1, 1000, b"B" * 2000, final=False, expcmdsn=2, maxcmdsn=20)
    b = DataIn(cmd.itt, 0, 0, b"A" * 1000, final=True, status=Status.GOOD, statsn=200,
               expcmdsn=2, maxcmdsn=20, flags=ResponseFlags.UNDERFLOW, residual=1096)
    events = core.receive_data(a.encode() + b.encode(), 0.0)
    (done,) = events
    assert isinstance(done, CommandDone) and done.handle == h
    assert done.result.data_in == b"A" * 1000 + b"B" * 2000
    assert core.exp_statsn == 201


def test_core_read_fast_path_matches_general_path() -> None:
    """Single Data-In-with-status answers are completed in place; the events,
    sequence numbers and the commands pumped afterwards equal the general
    path's (the same core with the fast path switched off)."""
    cores = [_core(queue_depth=4), _core(queue_depth=4)]
    cores[1]._reads_done = lambda events, now: None  # type: ignore[method-assign]
    results = []
    for core in cores:
        ScriptedTarget(core).login()
        handles = [core.submit(1, b"\x28" + bytes(9), data_in_len=512 * (i + 1)) for i in range(10)]
        cmds = _pdus(core.data_to_send())
        assert len(cmds) == 4
        a, b, c, d = cmds
        wire = b"".join([
            DataIn(a.itt, 0, 0, b"a" * 512, status=Status.GOOD, statsn=200, expcmdsn=2, maxcmdsn=30).encode(),
            # stale window values are ignored, status other than GOOD kept
            DataIn(b.itt, 0, 0, b"b" * 1024, status=Status.CONDITION_MET, statsn=201, expcmdsn=1,
                   maxcmdsn=3).encode(),
            # underflow: the general path (residual)
            DataIn(c.itt, 0, 0, b"c" * 1000, status=Status.GOOD, statsn=202, expcmdsn=4, maxcmdsn=31,
                   flags=ResponseFlags.UNDERFLOW, residual=536).encode(),
            DataIn(d.itt, 0, 0, b"d" * 2048, status=Status.GOOD, statsn=203, expcmdsn=5, maxcmdsn=32).encode(),
        ])
        events = core.receive_data(wire, 0.0)
        more = core.data_to_send()
        results.append((events, more, core.exp_statsn, core.exp_cmdsn, core.max_cmdsn, core.outstanding))
        assert [e.handle for e in events] == handles[:4]  # type: ignore[attr-defined]
    assert results[0] == results[1]
    events = results[0][0]
    assert events[1].result.status == Status.CONDITION_MET and events[2].result.data_in == b"c" * 1000
    assert results[0][2:5] == (204, 5, 32)


def test_core_issues_commands_as_scsi_command_encodes_them() -> None:
    for digests in (False, True):
        core = _core(header_digest=digests, data_digest=digests)
        ScriptedTarget(core, {"HeaderDigest": "CRC32C" if digests else "None",
                              "DataDigest": "CRC32C" if digests else "None"}).login()
        core.submit(300, b"\x28" + bytes(9), data_in_len=4096)
        core.submit(2, b"\x8a" + bytes(15), b"x" * 1001)
        core.submit(300, b"\x2a" + bytes(9), b"y" * 4096)
        sent = core.data_to_send()
        itt, cmdsn = core._itt, core.cmdsn
        want = (
            ScsiCommand(itt - 2, 300, b"\x28" + bytes(15), cmdsn - 3, core.exp_statsn, 4096, True, False, True)
            .encode(digests, digests)
            + ScsiCommand(itt - 1, 2, b"\x8a" + bytes(15), cmdsn - 2, core.exp_statsn, 1001, False, True, True,
                          data=b"x" * 1001).encode(digests, digests)
            + ScsiCommand(itt, 300, b"\x2a" + bytes(15), cmdsn - 1, core.exp_statsn, 4096, False, True, True,
                          data=b"y" * 4096).encode(digests, digests)
        )
        assert sent == want


def test_core_check_condition_sense_and_unit_attention() -> None:
    core = _core()
    ScriptedTarget(core).login()
    core.submit(3, bytes(6))
    (cmd,) = _pdus(core.data_to_send())
    sense = encode_sense(Sense.RESERVATIONS_PREEMPTED)
    rsp = ScsiResponse(cmd.itt, Status.CHECK_CONDITION, 200, 2, 20, data=sense_segment(sense))
    done, ua = core.receive_data(rsp.encode(), 0.0)
    assert isinstance(done, CommandDone)
    assert done.result == Result(Status.CHECK_CONDITION, b"", sense)
    assert isinstance(ua, UnitAttention) and ua.lun == 3
    assert ua.sense.describe() == "UNIT ATTENTION: RESERVATIONS PREEMPTED"


def test_core_cmdsn_window_and_queue_depth() -> None:
    core = _core(queue_depth=4)
    t = ScriptedTarget(core)
    t.max_cmdsn = 2  # window: CmdSN 1 and 2 only (ExpCmdSN = 1)
    t.login()
    for _ in range(6):
        core.submit(1, bytes(6))
    sent = _pdus(core.data_to_send())
    assert [c.cmdsn for c in sent] == [1, 2]  # type: ignore[attr-defined]
    # the target opens the window wide: queue depth 4 now limits
    rsp = ScsiResponse(sent[0].itt, 0, 200, 2, 100)  # type: ignore[attr-defined]
    core.receive_data(rsp.encode(), 0.0)
    more = _pdus(core.data_to_send())
    assert [c.cmdsn for c in more] == [3, 4, 5]  # type: ignore[attr-defined]
    assert core.outstanding == 5


def test_core_answers_target_nop_in() -> None:
    core = _core()
    ScriptedTarget(core).login()
    core.receive_data(NopIn(0xFFFFFFFF, 0x1234, 200, 1, 20, 0, b"ping").encode(), 0.0)
    (nop,) = _pdus(core.data_to_send())
    assert isinstance(nop, NopOut)
    assert nop.itt == 0xFFFFFFFF and nop.ttt == 0x1234 and nop.data == b"ping"


def test_core_keepalive_ping_and_timeout() -> None:
    core = _core(nop_interval=5, nop_timeout=10)
    ScriptedTarget(core).login()
    assert core.handle_timer(4.0) == [] and core.data_to_send() == b""
    core.handle_timer(6.0)
    (nop,) = _pdus(core.data_to_send())
    assert isinstance(nop, NopOut) and nop.itt != 0xFFFFFFFF
    (ev,) = core.handle_timer(17.0)
    assert isinstance(ev, ConnectionFailed)


def test_core_garbage_drops_connection_and_requeues() -> None:
    core = _core(max_retries=1)
    ScriptedTarget(core).login()
    h = core.submit(1, bytes(6))
    core.data_to_send()
    bad = bytearray(ScsiResponse(0xDEAD, 0, 200, 2, 20).encode())  # unknown ITT
    (ev,) = core.receive_data(bytes(bad), 0.0)
    assert isinstance(ev, ConnectionFailed)
    assert core.connection_lost(retry=True) == []
    assert core.outstanding == 1  # queued for the next login
    t = ScriptedTarget(core)
    t.login()  # same ISID, the command goes out again
    (cmd,) = _pdus(core.data_to_send())
    assert isinstance(cmd, ScsiCommand)
    (lost,) = core.connection_lost(retry=True)  # second loss: retries used up
    assert lost.handle == h  # type: ignore[union-attr]


def test_core_data_digest_error_drops_connection() -> None:
    core = _core(header_digest=True, data_digest=True)
    ScriptedTarget(core, {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}).login()
    assert core.params.header_digest and core.params.data_digest
    core.submit(1, b"\x88" + bytes(15), data_in_len=512)
    (cmd,) = _pdus(core.data_to_send(), header_digest=True, data_digest=True)
    wire = bytearray(DataIn(cmd.itt, 0, 0, bytes(512), True, Status.GOOD, 200, 2, 20).encode(True, True))
    wire[-1] ^= 0xFF  # break the data digest
    (ev,) = core.receive_data(bytes(wire), 0.0)
    assert isinstance(ev, ConnectionFailed)


# --------------------------------------------------------------------------
# tgtd

TGTD = shutil.which("tgtd")
TGTADM = shutil.which("tgtadm")
needs_tgt = pytest.mark.skipif(not (TGTD and TGTADM), reason="tgt (tgtd/tgtadm) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tgt:
    """A tgtd on 127.0.0.1 with its own control port, killed on stop."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(50):
            self.control = random.randint(2000, 32000)  # tgtd rejects large -C values
            if not self._running(self.control):
                break

    @staticmethod
    def _running(control: int) -> bool:
        r = subprocess.run([TGTADM or "tgtadm", "-C", str(control), "--mode", "system", "--op", "show"],
                           capture_output=True, timeout=10)
        return r.returncode == 0

    def adm(self, *args: str, check: bool = True) -> str:
        r = subprocess.run([TGTADM or "tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                           capture_output=True, text=True, timeout=10)
        if check and r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def start(self) -> None:
        log = open(self.workdir / "tgtd.log", "wb")
        self.proc = subprocess.Popen(
            [TGTD or "tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not self._running(self.control):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tgtd did not start")
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while True:  # the portal listens a moment after the control socket
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("tgtd portal not listening")
            time.sleep(0.05)

    def add_target(self, tid: int, iqn: str, size: int = 64 << 20) -> Path:
        path = self.workdir / f"lun{tid}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        self.adm("--mode", "target", "--op", "new", "--tid", str(tid), "-T", iqn)
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", "1", "-b", str(path))
        self.adm("--mode", "target", "--op", "bind", "--tid", str(tid), "-I", "ALL")
        return path

    def set_param(self, tid: int, name: str, value: str) -> None:
        self.adm("--mode", "target", "--op", "update", "--tid", str(tid), "--name", name, "--value", value)

    def sessions(self, tid: int) -> list[int]:
        out = self.adm("--mode", "target", "--op", "show")
        ids, cur = [], None
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Target "):
                cur = int(line.split()[1].rstrip(":"))
            elif line.startswith("I_T nexus:") and cur == tid:
                ids.append(int(line.split()[-1]))
        return ids

    def kill_connections(self, tid: int) -> int:
        """Close every connection of the target from the server side."""
        n = 0
        for sid in self.sessions(tid):
            self.adm("--mode", "conn", "--op", "delete", "--tid", str(tid), "--sid", str(sid),
                     "--cid", "0", check=False)
            n += 1
        return n

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            subprocess.run([TGTADM or "tgtadm", "-C", str(self.control), "--mode", "system", "--op",
                            "delete"], capture_output=True, timeout=5)
        try:  # tgtd -f ignores SIGTERM; SIGKILL when it does not go by itself
            self.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def tgt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tgt]:
    if not (TGTD and TGTADM):
        pytest.skip("tgt (tgtd/tgtadm) is not installed")
    t = Tgt(tmp_path_factory.mktemp("tgt"))
    try:
        t.start()
        t.add_target(1, TARGET)
        t.set_param(1, "HeaderDigest", "CRC32C,None")
        t.set_param(1, "DataDigest", "CRC32C,None")
        yield t
    finally:
        t.stop()


def url(t: Tgt, target: str = TARGET, lun: int = 1) -> str:
    return f"iscsi://127.0.0.1:{t.port}/{target}/{lun}"


def run(coro: object, timeout: float = 60) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


SIZES = [512, 4096, 8192, 8704, 65536, 65536 + 512, 262144, 262144 + 4096, 1 << 20]


@needs_tgt
def test_tgt_discovery(tgt: Tgt) -> None:
    found = run(discover(f"127.0.0.1:{tgt.port}", INITIATOR))
    assert (TARGET, [f"127.0.0.1:{tgt.port},1"]) in found  # type: ignore[operator]


@needs_tgt
@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
def test_tgt_read_write_sizes(tgt: Tgt, digests: bool) -> None:
    async def body() -> None:
        s = await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000100 + digests,
                          header_digest=digests, data_digest=digests)
        try:
            assert s.params.header_digest is digests and s.params.data_digest is digests
            blocks, bs = await s.read_capacity16()
            assert (blocks, bs) == ((64 << 20) // 512, 512)
            rng = random.Random(digests)
            lba = 2048 * (1 + digests)
            for size in SIZES:
                data = rng.randbytes(size)
                await s.write(lba, data)
                assert await s.read(lba, size // 512) == data
            inq = await s.inquiry()
            assert inq[8:16] == b"IET     "
        finally:
            await s.close()

    run(body())


@needs_tgt
def test_tgt_queue_depth_32_pipelined(tgt: Tgt) -> None:
    async def body() -> None:
        s = await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000200, queue_depth=32)
        try:
            await s.test_unit_ready()
            blobs = [bytes([i]) * 8192 for i in range(64)]
            base = 16384
            writes = [s.submit(1, _rw16(0x8A, base + 16 * i, 16), blobs[i]) for i in range(64)]
            assert s.core.outstanding == 64
            wire = len(s.core._active)
            assert 1 < wire <= 32
            assert all(r.status == Status.GOOD for r in await asyncio.gather(*writes))
            reads = [s.submit(1, _rw16(0x88, base + 16 * i, 16), data_in_len=8192) for i in range(64)]
            results = await asyncio.gather(*reads)
            assert [bytes(r.data_in) for r in results] == blobs
        finally:
            await s.close()

    run(body())


def _rw16(op: int, lba: int, blocks: int) -> bytes:
    return bytes([op, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


@needs_tgt
def test_tgt_chap_one_way_and_mutual(tgt: Tgt) -> None:
    tgt.adm("--mode", "account", "--op", "new", "--user", "hostuser", "--password", "hostsecret1234")
    tgt.adm("--mode", "account", "--op", "new", "--user", "tgtuser", "--password", "tgtsecret12345")
    tgt.adm("--mode", "account", "--op", "bind", "--tid", "1", "--user", "hostuser")
    try:
        async def body() -> None:
            with pytest.raises(LoginError) as e:
                await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000300)
            assert e.value.status == LoginStatus.AUTHENTICATION_FAILURE
            with pytest.raises(LoginError):
                await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000300,
                              chap=("hostuser", "wrong-secret-99"))
            u = f"iscsi://hostuser%hostsecret1234@127.0.0.1:{tgt.port}/{TARGET}/1"
            s = await connect(u, initiator_name=INITIATOR, isid=0x23D000000300)
            assert (await s.read_capacity16())[1] == 512
            await s.close()
            tgt.adm("--mode", "account", "--op", "bind", "--tid", "1", "--user", "tgtuser", "--outgoing")
            s = await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000300,
                              chap=("hostuser", "hostsecret1234"), mutual=("tgtuser", "tgtsecret12345"))
            assert (await s.read_capacity16())[1] == 512
            await s.close()
            with pytest.raises(LoginError):  # the target does not know this secret
                await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000300,
                              chap=("hostuser", "hostsecret1234"), mutual=("tgtuser", "not-its-secret"))

        run(body())
    finally:
        tgt.adm("--mode", "account", "--op", "unbind", "--tid", "1", "--user", "hostuser", check=False)
        tgt.adm("--mode", "account", "--op", "unbind", "--tid", "1", "--user", "tgtuser", "--outgoing",
                check=False)
        tgt.adm("--mode", "account", "--op", "delete", "--user", "hostuser", check=False)
        tgt.adm("--mode", "account", "--op", "delete", "--user", "tgtuser", check=False)


@needs_tgt
def test_tgt_reconnect_same_isid_reissues_commands(tgt: Tgt) -> None:
    async def body() -> None:
        s = await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000400,
                          reconnect_timeout=20)
        try:
            await s.test_unit_ready()
            tsih = s.negotiated.tsih
            await asyncio.to_thread(tgt.kill_connections, 1)
            # commands submitted while the connection dies are re-issued
            data = os.urandom(65536)
            w = s.submit(1, _rw16(0x8A, 40960, 128), data)
            r = await w
            assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
            for _ in range(50):
                if s.reconnects:
                    break
                await asyncio.sleep(0.1)
            assert s.reconnects == 1 and s.isid == 0x23D000000400
            assert s.negotiated.tsih != tsih
            await s.write(40960, data)
            assert await s.read(40960, 128) == data
        finally:
            await s.close()

    run(body())


@needs_tgt
def test_tgt_registration_survives_reconnect(tgt: Tgt) -> None:
    key = 0x1234ABCD

    async def body() -> None:
        s = await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000500,
                          reconnect_timeout=20)
        try:
            r = await s.pr_out(PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, PrType.NONE,
                               pr_out_params(0, key))
            assert r.status == Status.GOOD
            assert key in ReadKeys.decode((await s.pr_in(PrInAction.READ_KEYS)).data_in).keys
            await asyncio.to_thread(tgt.kill_connections, 1)
            r = await s.pr_in(PrInAction.READ_KEYS)  # waits for the re-login
            assert s.reconnects == 1
            assert key in ReadKeys.decode(r.data_in).keys
            # tgt ties a registration to its internal nexus number, which a
            # reinstated session does not inherit: the key stays listed, but
            # the new session is not its owner (REGISTER with RK = key
            # conflicts). prmigrate's target keys on (initiator, ISID); the
            # same check there expects GOOD (test_pr_tool).
            r = await s.pr_out(PrOutAction.REGISTER, PrType.NONE, pr_out_params(key, 0))
            assert r.status == Status.RESERVATION_CONFLICT, r
            # clean up for other tests: CLEAR needs a registered nexus
            r = await s.pr_out(PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, PrType.NONE,
                               pr_out_params(0, key))
            assert r.status == Status.GOOD
            r = await s.pr_out(PrOutAction.CLEAR, PrType.NONE, pr_out_params(key, 0))
            assert r.status == Status.GOOD
            assert ReadKeys.decode((await s.pr_in(PrInAction.READ_KEYS)).data_in).keys == ()
        finally:
            await s.close()

    run(body())


# --------------------------------------------------------------------------
# scripted fake target (bad input, timeouts, redirection)


async def _fake_target(handler: object) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


def test_login_timeout_when_target_is_silent() -> None:
    async def body() -> None:
        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(1 << 16)
            await asyncio.sleep(5)
            w.close()

        server, port = await _fake_target(silent)
        try:
            t0 = time.monotonic()
            with pytest.raises(LoginTimeout):
                await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, login_timeout=0.5)
            assert time.monotonic() - t0 < 3
        finally:
            server.close()

    run(body(), 20)


def test_garbage_from_target_fails_pending_commands() -> None:
    """A target that answers the login and then sends junk: the session drops
    the connection, retries (same ISID), and finally fails the command."""
    logins: list[int] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = PduReader()
        statsn = 1
        while True:
            data = await r.read(65536)
            if not data:
                break
            reader.feed(data)
            for raw in reader:
                pdu = decode_pdu(raw)
                if isinstance(pdu, LoginRequest):
                    logins.append(pdu.isid)
                    keys = dict(decode_text(pdu.data))
                    reply = [(k, "None") for k in ("AuthMethod", "HeaderDigest", "DataDigest") if k in keys]
                    nsg = pdu.nsg
                    w.write(LoginResponse(pdu.isid, 9, pdu.itt, statsn, pdu.cmdsn, pdu.cmdsn + 8,
                                          pdu.csg, nsg, True, data=encode_text(reply)).encode())
                    statsn += 1
                elif isinstance(pdu, ScsiCommand):
                    # a malformed Data-In: random bytes, but no AHS and a
                    # DataSegmentLength beyond our MaxRecvDataSegmentLength
                    # (RFC 7143 13.12), so the header alone is the protocol
                    # error (fully random bytes sometimes announced a segment
                    # that never came, and the test then hung)
                    junk = bytearray(os.urandom(48))
                    junk[0:2] = b"\x25\x80"
                    junk[4:8] = b"\x00\xff\xff\xff"
                    w.write(bytes(junk) + os.urandom(100))
        w.close()

    async def body() -> None:
        server, port = await _fake_target(handler)
        try:
            s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, isid=0x23D0000000AA,
                              max_retries=2, reconnect_timeout=5)
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(s.submit(0, bytes(6), data_in_len=0), 10)
            # first login + two reinstatements carried the command; the session
            # goes on logging in (same ISID) after the command has failed
            assert len(logins) >= 3 and set(logins) == {0x23D0000000AA}
            await s.close()
        finally:
            server.close()

    run(body(), 30)


@needs_tgt
def test_login_redirection_is_followed(tgt: Tgt) -> None:
    async def redirect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = PduReader()
        reader.feed(await r.read(65536))
        req = decode_pdu(next(iter(reader)))
        assert isinstance(req, LoginRequest)
        w.write(LoginResponse(req.isid, 0, req.itt, 0, req.cmdsn, req.cmdsn, req.csg, 0, False,
                              status=LoginStatus.TARGET_MOVED_TEMPORARILY,
                              data=encode_text([("TargetAddress", f"127.0.0.1:{tgt.port},1")])).encode())
        await w.drain()
        w.close()

    async def body() -> None:
        server, port = await _fake_target(redirect)
        try:
            s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, isid=0x23D000000600, lun=1)
            assert (await s.read_capacity16())[1] == 512
            assert s.portal == f"127.0.0.1:{port}"  # temporary: keep the original portal
            await s.close()
        finally:
            server.close()

    run(body())


def test_check_condition_in_scsi_response_reaches_callback() -> None:
    seen: list[tuple[int, str]] = []
    sense = encode_sense(Sense.REGISTRATIONS_PREEMPTED)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = PduReader()
        statsn = 1
        while data := await r.read(65536):
            reader.feed(data)
            for raw in reader:
                pdu = decode_pdu(raw)
                if isinstance(pdu, LoginRequest):
                    w.write(LoginResponse(pdu.isid, 3, pdu.itt, statsn, pdu.cmdsn, pdu.cmdsn + 8,
                                          pdu.csg, pdu.nsg, True,
                                          data=encode_text([("AuthMethod", "None")] if pdu.csg == 0 else [])).encode())
                elif isinstance(pdu, ScsiCommand):
                    w.write(ScsiResponse(pdu.itt, Status.CHECK_CONDITION, statsn, pdu.cmdsn + 1,
                                         pdu.cmdsn + 8, data=sense_segment(sense)).encode())
                statsn += 1
        w.close()

    async def body() -> None:
        server, port = await _fake_target(handler)
        try:
            s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR,
                              on_unit_attention=lambda lun, ds: seen.append((lun, ds.describe())))
            r = await s.submit(5, bytes(6))
            assert r.status == Status.CHECK_CONDITION and r.sense == sense
            assert seen == [(5, "UNIT ATTENTION: REGISTRATIONS PREEMPTED")]
            await s.close()
        finally:
            server.close()

    run(body(), 20)


# --------------------------------------------------------------------------
# prmigrate's own target (`prmigrate target`), a second real peer

PRM_TARGET = "iqn.2026-11.org.prmigrate:own-target"


class PrmTarget:
    """`python -m prmigrate.cli target` on 127.0.0.1, killed on stop."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / "target.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"127.0.0.1:{self.port}",
             "--iqn", PRM_TARGET, "--lun", f"0={self.workdir / 'lun0.img'}", "--size", "64M",
             "--state-dir", str(self.workdir), *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prmigrate target did not start: "
                                   + (self.workdir / "target.log").read_text()[-2000:])
            time.sleep(0.05)

    def kill_connections(self) -> None:
        """Close the target's end of every TCP connection (ss -K, iproute2)."""
        subprocess.run(["ss", "-K", "src", "127.0.0.1", "sport", "=", str(self.port)],
                       capture_output=True, timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def prm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrmTarget]:
    t = PrmTarget(tmp_path_factory.mktemp("prm"))
    try:
        t.start()
        yield t
    finally:
        t.stop()


def prm_url(t: PrmTarget) -> str:
    return f"iscsi://127.0.0.1:{t.port}/{PRM_TARGET}/0"


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
def test_prm_read_write_sizes_unsolicited_data(prm: PrmTarget, digests: bool) -> None:
    async def body() -> None:
        s = await connect(prm_url(prm), initiator_name=INITIATOR, isid=0x23D000000700 + digests,
                          header_digest=digests, data_digest=digests, first_burst_length=16384,
                          max_recv_data_segment_length=8192)
        try:
            assert s.params.initial_r2t is False  # immediate + unsolicited + R2T all used
            assert s.params.max_recv_data_segment_length == 8192
            rng = random.Random(7 + digests)
            for size in SIZES:
                data = rng.randbytes(size)
                await s.write(4096 * (1 + digests), data)
                assert await s.read(4096 * (1 + digests), size // 512) == data
        finally:
            await s.close()

    run(body())


@pytest.mark.skipif(not shutil.which("ss"), reason="iproute2 (ss) is not installed")
def test_prm_registration_survives_reconnect_as_same_nexus(prm: PrmTarget) -> None:
    key = 0xC0FFEE

    async def body() -> None:
        s = await connect(prm_url(prm), initiator_name=INITIATOR, isid=0x23D000000800,
                          reconnect_timeout=20)
        try:
            r = await s.pr_out(PrOutAction.REGISTER, PrType.NONE, pr_out_params(0, key))
            assert r.status == Status.GOOD
            r = await s.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(key, 0))
            assert r.status == Status.GOOD
            # the target's socket dies; 32 commands submitted meanwhile all
            # complete over the reinstated session
            await asyncio.to_thread(prm.kill_connections)
            pending = [s.submit(0, _rw16(0x88, 64 * i, 64), data_in_len=32768) for i in range(32)]
            results = await asyncio.gather(*pending)
            assert all(r.status in (Status.GOOD, Status.CHECK_CONDITION) for r in results)
            assert s.reconnects == 1
            assert key in ReadKeys.decode((await s.pr_in(PrInAction.READ_KEYS)).data_in).keys
            # the reinstated session is the same I_T nexus: it still holds the
            # reservation, writes pass, and it can release and unregister
            await s.write(0, bytes(512))
            r = await s.pr_out(PrOutAction.RELEASE, PrType.WRITE_EXCLUSIVE, pr_out_params(key, 0))
            assert r.status == Status.GOOD
            r = await s.pr_out(PrOutAction.REGISTER, PrType.NONE, pr_out_params(key, 0))
            assert r.status == Status.GOOD
            assert ReadKeys.decode((await s.pr_in(PrInAction.READ_KEYS)).data_in).keys == ()
        finally:
            await s.close()

    run(body())


def test_prm_task_management(prm: PrmTarget) -> None:
    async def body() -> None:
        s = await connect(prm_url(prm), initiator_name=INITIATOR, isid=0x23D000000900)
        try:
            await s.test_unit_ready()
            assert await s.lun_reset(0) == 0
            r = await s.test_unit_ready()  # the reset's unit attention is retried away
            assert r.status == Status.GOOD
            assert await s.target_warm_reset() == 0
        finally:
            await s.close()

    run(body())


def _accepting_target(writers: list[asyncio.StreamWriter], answer: bool = True) -> object:
    """A fake target that logs everyone in and (optionally) answers GOOD."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        reader = PduReader()
        statsn = 1
        while data := await r.read(65536):
            reader.feed(data)
            for raw in reader:
                pdu = decode_pdu(raw)
                if isinstance(pdu, LoginRequest):
                    keys = [("AuthMethod", "None")] if pdu.csg == 0 else []
                    w.write(LoginResponse(pdu.isid, 3, pdu.itt, statsn, pdu.cmdsn, pdu.cmdsn + 8,
                                          pdu.csg, pdu.nsg, True, data=encode_text(keys)).encode())
                elif isinstance(pdu, ScsiCommand) and answer:
                    w.write(ScsiResponse(pdu.itt, Status.GOOD, statsn, pdu.cmdsn + 1,
                                         pdu.cmdsn + 8).encode())
                statsn += 1
        w.close()

    return handler


def test_reconnect_gives_up_and_session_fails_cleanly() -> None:
    async def body() -> None:
        writers: list[asyncio.StreamWriter] = []
        server, port = await _fake_target(_accepting_target(writers, answer=False))
        s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, reconnect_timeout=1.0)
        pending = s.submit(0, bytes(6))  # never answered
        await asyncio.sleep(0.1)
        server.close()
        for w in writers:
            w.transport.abort()
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(pending, 10)
        assert time.monotonic() - t0 < 5
        with pytest.raises(ConnectionLost):
            s.submit(0, bytes(6))
        await s.close()

    run(body(), 20)


def test_command_timeout_reissues_then_fails() -> None:
    async def body() -> None:
        writers: list[asyncio.StreamWriter] = []
        server, port = await _fake_target(_accepting_target(writers, answer=False))
        try:
            s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, command_timeout=0.6,
                              max_retries=1, reconnect_timeout=5)
            t0 = time.monotonic()
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(s.submit(0, bytes(6)), 10)
            assert time.monotonic() - t0 < 5
            assert len(writers) >= 2  # the command was re-issued on a new connection
            await s.close()
        finally:
            server.close()

    run(body(), 20)


@needs_tgt
@pytest.mark.interop
@pytest.mark.skipif(not shutil.which("tshark"), reason="tshark is not installed")
def test_tshark_dissects_our_pdus_without_errors(tgt: Tgt, tmp_path: Path) -> None:
    """Wireshark's iSCSI dissector as an independent check that every PDU we
    send (login, commands, immediate/solicited data, TMF, logout) is well formed."""
    pcap = tmp_path / "cap.pcap"
    cap = subprocess.Popen(["tshark", "-i", "lo", "-f", f"tcp port {tgt.port}", "-w", str(pcap),
                            "-a", "duration:30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert cap.stderr is not None
        seen = []
        for _ in range(5):  # a root warning may come first, then "Capturing on 'Loopback: lo'"
            line = cap.stderr.readline().decode()
            seen.append(line.strip())
            if "Capturing on" in line or not line:
                break
        if "Capturing on" not in line:
            pytest.skip(f"tshark cannot capture on lo here: {' / '.join(seen)}")
        time.sleep(0.3)

        async def body() -> None:
            s = await connect(url(tgt), initiator_name=INITIATOR, isid=0x23D000000A00)
            try:
                await s.test_unit_ready()
                data = os.urandom(300 * 1024)
                await s.write(8192, data)
                assert await s.read(8192, len(data) // 512) == data
                await s.pr_in(PrInAction.READ_KEYS)
                await s.lun_reset(1)
            finally:
                await s.close()

        run(body())
        time.sleep(0.5)
    finally:
        cap.terminate()
        cap.wait(10)
    fields = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"tcp.port=={tgt.port},iscsi", "-T", "fields",
         "-e", "iscsi.opcode"], capture_output=True, text=True, timeout=60).stdout
    opcodes = {int(o, 16) for o in fields.replace(",", "\n").split() if o}
    assert {0x03, 0x01, 0x05, 0x02, 0x06} <= opcodes  # login, command, Data-Out, TMF, logout
    bad = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"tcp.port=={tgt.port},iscsi", "-Y", "_ws.malformed"],
        capture_output=True, text=True, timeout=60).stdout
    assert bad.strip() == ""


def test_async_event_and_target_nop_in_over_the_wire() -> None:
    """An Asynchronous Message carrying a unit attention reaches both callbacks;
    a NOP-In ping from the target is echoed."""
    events: list[tuple[int, str | None]] = []
    uas: list[tuple[int, str]] = []
    echoed: list[bytes] = []
    sense = encode_sense(Sense.REPORTED_LUNS_DATA_HAS_CHANGED)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = PduReader()
        statsn = 1
        while data := await r.read(65536):
            reader.feed(data)
            for raw in reader:
                pdu = decode_pdu(raw)
                if isinstance(pdu, LoginRequest):
                    keys = [("AuthMethod", "None")] if pdu.csg == 0 else []
                    w.write(LoginResponse(pdu.isid, 3, pdu.itt, statsn, pdu.cmdsn, pdu.cmdsn + 8,
                                          pdu.csg, pdu.nsg, True, data=encode_text(keys)).encode())
                    statsn += 1
                    if pdu.nsg == 3 and pdu.transit:
                        w.write(AsyncMessage(AsyncEvent.SCSI_ASYNC_EVENT, statsn, pdu.cmdsn,
                                             pdu.cmdsn + 8, lun=2, data=sense_segment(sense)).encode())
                        statsn += 1
                        w.write(NopIn(0xFFFFFFFF, 0x77, statsn, pdu.cmdsn, pdu.cmdsn + 8, 0,
                                      b"are you there").encode())
                elif isinstance(pdu, NopOut):
                    echoed.append(pdu.data)
        w.close()

    async def body() -> None:
        server, port = await _fake_target(handler)
        try:
            s = await connect(
                f"127.0.0.1:{port}", TARGET, INITIATOR,
                on_async_event=lambda msg, ds: events.append((msg.event, ds and ds.describe())),
                on_unit_attention=lambda lun, ds: uas.append((lun, ds.describe())),
            )
            for _ in range(50):
                if events and echoed:
                    break
                await asyncio.sleep(0.05)
            await s.close(timeout=0.5)  # this fake target does not answer logouts
        finally:
            server.close()

    run(body(), 20)
    assert events == [(0, "UNIT ATTENTION: REPORTED LUNS DATA HAS CHANGED")]
    assert uas == [(2, "UNIT ATTENTION: REPORTED LUNS DATA HAS CHANGED")]
    assert echoed == [b"are you there"]


def test_abort_task_over_the_wire() -> None:
    """ABORT TASK for a command the target sits on: the TMF names the
    command's ITT and CmdSN; on FUNCTION COMPLETE the command's future fails
    with TaskAborted. A command still queued is dropped without asking."""
    from prmigrate.iscsi.initiator_core import TaskAborted
    from prmigrate.iscsi.pdu import TaskMgmtRequest, TaskMgmtResponse, TmfFunction

    tmfs: list[TaskMgmtRequest] = []
    commands: dict[int, int] = {}

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = PduReader()
        statsn = 1
        while data := await r.read(65536):
            reader.feed(data)
            for raw in reader:
                pdu = decode_pdu(raw)
                if isinstance(pdu, LoginRequest):
                    keys = [("AuthMethod", "None")] if pdu.csg == 0 else []
                    # window of one command: the second waits in the queue
                    w.write(LoginResponse(pdu.isid, 3, pdu.itt, statsn, pdu.cmdsn, pdu.cmdsn,
                                          pdu.csg, pdu.nsg, True, data=encode_text(keys)).encode())
                elif isinstance(pdu, ScsiCommand):
                    commands[pdu.itt] = pdu.cmdsn
                elif isinstance(pdu, TaskMgmtRequest):
                    tmfs.append(pdu)
                    w.write(TaskMgmtResponse(pdu.itt, 0, statsn, pdu.cmdsn, pdu.cmdsn).encode())
                statsn += 1
        w.close()

    async def body() -> None:
        server, port = await _fake_target(handler)
        try:
            s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR)
            first = s.submit(0, bytes(6))
            second = s.submit(0, bytes(6))
            await asyncio.sleep(0.2)
            assert len(commands) == 1  # MaxCmdSN holds the second back
            assert await s.abort_task(second) == 0  # queued: no TMF needed
            with pytest.raises(TaskAborted):
                await second
            assert tmfs == []
            assert await s.abort_task(first) == 0
            with pytest.raises(TaskAborted):
                await first
            (tmf,) = tmfs
            (itt, cmdsn), = commands.items()
            assert tmf.function == TmfFunction.ABORT_TASK
            assert (tmf.referenced_itt, tmf.ref_cmdsn) == (itt, cmdsn)
            await s.close(timeout=0.5)
        finally:
            server.close()

    run(body(), 20)


def test_login_refusal_is_an_iscsi_error_and_a_login_error() -> None:
    from prmigrate.iscsi.initiator import IscsiError

    async def refuse(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = PduReader()
        reader.feed(await r.read(65536))
        req = decode_pdu(next(iter(reader)))
        assert isinstance(req, LoginRequest)
        w.write(LoginResponse(req.isid, 0, req.itt, 0, req.cmdsn, req.cmdsn, 0, 0, False,
                              status=LoginStatus.NOT_FOUND).encode())
        await w.drain()
        w.close()

    async def body() -> None:
        server, port = await _fake_target(refuse)
        try:
            with pytest.raises(IscsiError) as e:
                await connect(f"127.0.0.1:{port}", TARGET, INITIATOR)
            assert isinstance(e.value, LoginError) and e.value.status == LoginStatus.NOT_FOUND
        finally:
            server.close()

    run(body(), 20)


def test_core_huge_expected_length_short_answer_allocates_little() -> None:
    """An EDTL of 256 MiB answered with 36 bytes (a guest may ask for any
    allocation length; the passthrough device passes it on): the reassembly
    buffer holds what came, not the EDTL."""
    import tracemalloc

    core = _core()
    ScriptedTarget(core).login()
    tracemalloc.start()
    try:
        h = core.submit(1, b"\x12\x00\x00\xff\xff\x00", data_in_len=256 << 20)
        (cmd,) = _pdus(core.data_to_send())
        rsp = DataIn(cmd.itt, 0, 0, b"I" * 36, final=True, status=Status.GOOD, statsn=200, expcmdsn=2,
                     maxcmdsn=20, flags=ResponseFlags.UNDERFLOW, residual=(256 << 20) - 36)
        (done,) = core.receive_data(rsp.encode(), 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(done, CommandDone) and done.handle == h and done.result.data_in == b"I" * 36
    assert peak < 8 << 20, peak


def test_core_data_in_out_of_order_past_the_data_so_far() -> None:
    """A 3 MiB read whose pieces come last, first, middle: the buffer grows
    to the last piece with zeros in the gap, then holds every byte."""
    core = _core(max_recv_data_segment_length=1 << 20)
    ScriptedTarget(core, answers={"TargetMRDSL": str(1 << 20)}).login()
    mib = 1 << 20
    h = core.submit(1, b"\x88" + bytes(15), data_in_len=3 * mib)
    (cmd,) = _pdus(core.data_to_send())
    parts = [DataIn(cmd.itt, 2, 2 * mib, b"C" * mib, final=False, expcmdsn=2, maxcmdsn=20),
             DataIn(cmd.itt, 0, 0, b"A" * mib, final=False, expcmdsn=2, maxcmdsn=20),
             DataIn(cmd.itt, 1, mib, b"B" * mib, final=True, status=Status.GOOD, statsn=200,
                    expcmdsn=2, maxcmdsn=20)]
    events: list[object] = []
    for p in parts:
        events += core.receive_data(p.encode(), 0.0)
    (done,) = events
    assert isinstance(done, CommandDone) and done.handle == h
    assert done.result.data_in == b"A" * mib + b"B" * mib + b"C" * mib


def test_core_data_in_past_the_expected_length_is_a_protocol_error() -> None:
    core = _core()
    ScriptedTarget(core).login()
    core.submit(1, b"\x88" + bytes(15), data_in_len=4096)
    (cmd,) = _pdus(core.data_to_send())
    bad = DataIn(cmd.itt, 0, 4000, b"X" * 200, final=True, status=Status.GOOD, statsn=200, expcmdsn=2,
                 maxcmdsn=20)
    (ev,) = core.receive_data(bad.encode(), 0.0)
    assert isinstance(ev, ConnectionFailed) and "beyond the expected length" in ev.reason
