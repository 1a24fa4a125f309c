"""An in-process backend for device tests: ``LogicalUnit`` behind a fake
initiator ``Session`` (same methods the device uses), so each device
command reaches the LU on the device's real backend nexus (host initiator
name + derived ISID) without sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from prmigrate.iscsi.initiator import Session
from prmigrate.lun.types import Nexus, Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, SenseKey, Status
from prmigrate.scsi.sense import decode_sense

NO_FULL_STATUS = object()


class _Core:
    outstanding = 0


class FakeSession:
    def __init__(
        self,
        lu: LogicalUnit,
        backend: FakeBackend,
        target: str,
        initiator: str,
        isid: int,
        on_unit_attention: Any = None,
    ) -> None:
        self.lu = lu
        self.backend = backend
        self.nexus = Nexus.make(initiator, isid, target)
        self.isid = isid
        self.on_unit_attention = on_unit_attention
        self.logged_in = True
        self.closed = False
        self.submitted: list[bytes] = []
        self.core = _Core()  # commands complete at once: nothing outstanding
        lu.attach(self.nexus)

    def submit(
        self, lun: int, cdb: bytes, data_out: Any = b"", data_in_len: int = 0, **_: Any
    ) -> asyncio.Future[Result]:
        if self.closed:
            from prmigrate.iscsi.initiator import ConnectionLost

            raise ConnectionLost("session is closed")
        cdb = bytes(cdb)
        self.submitted.append(cdb)
        if self.backend.pr_out_status is not None and cdb[0] == 0x5F:
            r = Result(self.backend.pr_out_status)  # the LUN never saw it
        elif (
            self.backend.no_full_status
            and cdb[0] == 0x5E
            and cdb[1] & 0x1F == PrInAction.READ_FULL_STATUS
        ):
            from prmigrate.scsi.sense import Sense, encode_sense

            r = Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB))
        else:
            r = self.lu.execute(self.nexus, cdb, bytes(data_out))
        r = Result(r.status, bytes(r.data_in)[:data_in_len], r.sense)
        if r.status == Status.CHECK_CONDITION and self.on_unit_attention is not None:
            s = decode_sense(r.sense)
            if s.key == SenseKey.UNIT_ATTENTION:
                self.on_unit_attention(lun, s)
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        fut.set_result(r)
        return fut

    # the initiator's one unit attention retry, over this session's submit
    submit_retrying = Session.submit_retrying

    def submit_then(self, lun: int, cdb: bytes, data_out: Any, data_in_len: int, done: Any) -> None:
        fut = self.submit(lun, cdb, data_out, data_in_len)
        fut.add_done_callback(lambda f: done(f.exception() or f.result()))

    def submit_relay(self, lun: int, cdb: bytes, data_in_len: int, sink: Any, token: Any,
                     data_out: Any = b"") -> None:
        """As the real session: a full read with GOOD and no sense, or a
        write ending GOOD without sense, goes to ``relay_data``, anything
        else to ``relay_result``."""
        fut = self.submit(lun, cdb, bytes(data_out), data_in_len)

        def done(f: asyncio.Future[Result]) -> None:
            r = f.exception() or f.result()
            if (isinstance(r, Result) and not r.sense and len(r.data_in) == data_in_len
                    and (data_in_len or r.status == Status.GOOD)):
                sink.relay_data(token, r.status, bytearray(r.data_in))
            else:
                sink.relay_result(token, r)

        fut.add_done_callback(done)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.logged_in = False
            self.lu.nexus_lost(self.nexus)

    async def lun_reset(self, lun: int) -> int:
        self.lu.reset(self.nexus)
        return 0

    async def clear_task_set(self, lun: int) -> int:
        self.lu.clear_task_set(self.nexus)
        return 0

    async def _good(self, cdb: bytes, n: int) -> bytes:
        r = await self.submit(0, cdb, b"", n)
        assert r.status == Status.GOOD, r
        return bytes(r.data_in)

    async def inquiry(
        self, evpd_page: int | None = None, alloc: int = 255, *, lun: int | None = None
    ) -> bytes:
        import struct

        cdb = struct.pack(
            ">BBBHB", 0x12, 1 if evpd_page is not None else 0, evpd_page or 0, alloc, 0
        )
        return await self._good(cdb, alloc)

    async def read_capacity16(self, *, lun: int | None = None) -> tuple[int, int]:
        import struct

        data = await self._good(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), 32)
        last, size = struct.unpack_from(">QI", data)
        return last + 1, size

    async def report_supported_tmfs(self, *, lun: int | None = None) -> Any:
        """As ``Session.report_supported_tmfs``: unit attentions retried,
        ScsiError when not GOOD."""
        from prmigrate.iscsi.initiator import ScsiError
        from prmigrate.scsi.cdb import ReportTmfsCdb, SupportedTmfs

        r = await self.submit_retrying(0, ReportTmfsCdb.encode(4), b"", 4, tries=5)
        if r.status != Status.GOOD:
            raise ScsiError(r, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS")
        return SupportedTmfs.decode(bytes(r.data_in))


class FakeBackend:
    """``connect`` replacement; records every session opened."""

    def __init__(self, lu: LogicalUnit, *, no_full_status: bool = False) -> None:
        self.lu = lu
        self.no_full_status = no_full_status
        self.pr_out_status: Status | None = None  # answer every PR OUT with this status
        self.sessions: list[FakeSession] = []

    async def connect(
        self,
        url: Any,
        target: str,
        initiator_name: str,
        isid: int,
        on_unit_attention: Any = None,
        **_: Any,
    ) -> FakeSession:
        s = FakeSession(self.lu, self, target, initiator_name, isid, on_unit_attention)
        self.sessions.append(s)
        return s

    def open_sessions(self) -> list[FakeSession]:
        return [s for s in self.sessions if not s.closed]

