"""A tiny logical unit and a raw PDU-level client for target tests."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.chap import ChapClient, ChapCredentials
from prmigrate.iscsi.login import decode_text, encode_text
from prmigrate.iscsi.session import TargetNode, TargetSettings
from prmigrate.iscsi.target import IscsiTarget
from prmigrate.lun.types import Nexus, Result
from prmigrate.scsi.constants import Status
from prmigrate.scsi.sense import Sense, encode_sense

TARGET = "iqn.2026-11.org.prmigrate:test"
INITIATOR = "iqn.2026-11.org.prmigrate:client"
ASYNC_OP = 0xC0  # vendor opcode: answered with a Future the test resolves


class MemoryLU:
    """512-byte blocks in memory; READ/WRITE(10), TUR, INQUIRY, REPORT LUNS."""

    block_size = 512

    def __init__(self, blocks: int = 2048) -> None:
        self.data = bytearray(blocks * 512)
        self.lost: list[Nexus] = []
        self.resets: list[tuple[Nexus, bool, bool]] = []
        self.cleared: list[Nexus] = []
        self.attached: list[Nexus] = []
        self.futures: list[asyncio.Future[Result]] = []
        self.report_luns = lambda: [0]
        self.abort_hook = None
        self.seen: list[Nexus] = []

    def attach(self, nexus: Nexus) -> None:
        self.attached.append(nexus)

    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview = b"") -> object:
        self.seen.append(nexus)
        op = cdb[0]
        if op == 0x00:
            return Result()
        if op == 0x12:
            return Result(Status.GOOD, (bytes([0, 0, 6, 2, 31, 0, 0, 2]) + b"TEST    " + b"MEMLU".ljust(16) + b"0001")[: int.from_bytes(cdb[3:5], "big")])
        if op == 0xA0:
            luns = self.report_luns()
            body = b"".join(bytes((0, n, 0, 0, 0, 0, 0, 0)) for n in luns)
            return Result(Status.GOOD, struct.pack(">II", len(body), 0) + body)
        if op in (0x28, 0x2A):
            lba = int.from_bytes(cdb[2:6], "big")
            n = int.from_bytes(cdb[7:9], "big") * 512
            if lba * 512 + n > len(self.data):
                return Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.LBA_OUT_OF_RANGE))
            if op == 0x28:
                return Result(Status.GOOD, bytes(self.data[lba * 512 : lba * 512 + n]))
            if len(data_out) != n:
                return Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB))
            self.data[lba * 512 : lba * 512 + n] = data_out
            return Result()
        if op == ASYNC_OP:
            fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self.futures.append(fut)
            return fut
        return Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_OPCODE))

    def nexus_lost(self, nexus: Nexus) -> None:
        self.lost.append(nexus)

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        self.resets.append((nexus, cold, target_reset))

    def clear_task_set(self, nexus: Nexus) -> None:
        self.cleared.append(nexus)


async def make_target(node_kw: dict | None = None, settings: TargetSettings | None = None, **kw):
    lu = MemoryLU()
    node = TargetNode(TARGET, {0: lu}, **(node_kw or {}))
    target = IscsiTarget([node], settings, **kw)
    (host, port), *_ = await target.start("127.0.0.1", 0)
    return target, node, lu, host, port


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    framer: P.PduReader = field(default_factory=lambda: P.PduReader(max_data_length=1 << 24))
    cmdsn: int = 0
    statsn: int = 0
    itt: int = 0
    hd: bool = False
    dd: bool = False
    tsih: int = 0

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_pdu(self, pdu: P.Pdu) -> None:
        self.writer.write(pdu.encode(self.hd, self.dd))

    async def recv(self, timeout: float = 3.0) -> P.Pdu:
        while True:
            raw = self.framer.next_pdu()
            if raw is not None:
                pdu = P.decode_pdu(raw)
                sn = getattr(pdu, "statsn", None)
                if sn is not None:
                    self.statsn = sn
                return pdu
            chunk = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            if not chunk:
                raise ConnectionError("closed")
            self.framer.feed(chunk)

    async def closed(self, timeout: float = 3.0) -> bool:
        try:
            while True:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
                if not chunk:
                    return True
        except (ConnectionError, TimeoutError):
            return isinstance(self.reader.exception(), ConnectionError) if self.reader.exception() else False

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    async def login(
        self, initiator: str = INITIATOR, target: str | None = TARGET, isid: int = 0x400000000001,
        keys: list[tuple[str, str]] | None = None, chap: tuple[str, str] | None = None,
        mutual: tuple[str, str] | None = None,
    ) -> P.LoginResponse:
        decl = [("InitiatorName", initiator)]
        if target is None:
            decl.append(("SessionType", "Discovery"))
        else:
            decl += [("TargetName", target), ("SessionType", "Normal")]
        itt = self.next_itt()
        if chap is not None:
            client = ChapClient(ChapCredentials.make(*chap),
                                ChapCredentials.make(*mutual) if mutual else None)
            rsp = await self._login_pdu(isid, itt, 0, 1, False, decl + [("AuthMethod", "CHAP,None")])
            if rsp.status:
                return rsp
            rsp = await self._login_pdu(isid, itt, 0, 1, False, client.start())
            if rsp.status:
                return rsp
            reply = client.step(dict(decode_text(rsp.data)))
            rsp = await self._login_pdu(isid, itt, 0, 1, True, reply)
            if rsp.status:
                return rsp
            client.step(dict(decode_text(rsp.data)))
            assert client.done
            decl = []
        op = [("HeaderDigest", "CRC32C" if self.hd else "None"), ("DataDigest", "CRC32C" if self.dd else "None"),
              ("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("MaxRecvDataSegmentLength", "8192"),
              ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"), ("MaxOutstandingR2T", "1")]
        override = dict(keys or [])
        op = [(k, override.pop(k, v)) for k, v in op]
        keys = list(override.items())
        want_hd, want_dd = self.hd, self.dd
        self.hd = self.dd = False
        rsp = await self._login_pdu(isid, itt, 1, 3, True, decl + op + (keys or []))
        if rsp.status == 0 and rsp.transit and rsp.nsg == 3:
            self.hd, self.dd = want_hd, want_dd
            self.framer.header_digest, self.framer.data_digest = want_hd, want_dd
            self.tsih = rsp.tsih
        return rsp

    async def _login_pdu(self, isid, itt, csg, nsg, transit, pairs) -> P.LoginResponse:
        self.send_pdu(P.LoginRequest(isid=isid, tsih=0, itt=itt, cid=0, cmdsn=self.cmdsn,
                                     exp_statsn=self.statsn, csg=csg, nsg=nsg, transit=transit,
                                     data=encode_text(pairs)))
        rsp = await self.recv()
        assert isinstance(rsp, P.LoginResponse)
        self.statsn = rsp.statsn + 1
        self.cmdsn = rsp.expcmdsn
        return rsp

    async def command(self, cdb: bytes, *, lun: int = 0, data_out: bytes = b"", edtl: int | None = None,
                      read: bool = False, immediate_data: bool = True,
                      unsolicited: int = 0) -> tuple[P.ScsiResponse | P.DataIn, bytes]:
        """Send one command (answering R2Ts), return (final PDU, Data-In bytes)."""
        itt = self.next_itt()
        edtl = len(data_out) if edtl is None and not read else (edtl or 0)
        imm = data_out[:65536] if immediate_data else b""
        sent = len(imm)
        self.send_pdu(P.ScsiCommand(itt=itt, lun=lun, cdb=cdb, cmdsn=self.cmdsn, exp_statsn=self.statsn,
                                    expected_length=edtl, read=read, write=bool(data_out), data=imm,
                                    final=not unsolicited))
        self.cmdsn += 1
        if unsolicited:  # Data-Out with TTT ffffffff up to ``unsolicited`` bytes (InitialR2T=No)
            end = min(unsolicited, len(data_out))
            for i, off in enumerate(range(sent, end, 8192)):
                part = data_out[off : min(off + 8192, end)]
                self.send_pdu(P.DataOut(itt=itt, ttt=P.RESERVED_TAG, datasn=i, offset=off, data=part,
                                        final=off + len(part) >= end, lun=lun))
        got = bytearray()
        while True:
            pdu = await self.recv()
            if isinstance(pdu, P.R2T):
                chunk = data_out[pdu.offset : pdu.offset + pdu.length]
                for i, off in enumerate(range(0, len(chunk), 8192)):
                    part = chunk[off : off + 8192]
                    self.send_pdu(P.DataOut(itt=itt, ttt=pdu.ttt, datasn=i, offset=pdu.offset + off,
                                            data=part, final=off + 8192 >= len(chunk), lun=lun))
                continue
            if isinstance(pdu, P.DataIn):
                assert pdu.offset == len(got)
                got += pdu.data
                if pdu.status is not None:
                    return pdu, bytes(got)
                continue
            assert isinstance(pdu, P.ScsiResponse), pdu
            return pdu, bytes(got)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
