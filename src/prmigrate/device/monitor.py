"""The device's monitor nexus: how it reads the backend without touching a
guest's nexus (asyncio).

Host initiator name, ISID ``derive_isid(device, MONITOR)``, never
registered: a PR IN issued on a guest's own nexus could consume a unit
attention meant for the guest. Unit attentions met here are the monitor's
own: retried (``UaRetry``) and dropped. What the answers mean is decided
by ``verify.Verification``; this module only sends.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from ..iscsi.initiator import IscsiError, Session
from ..lun.types import Result
from ..scsi.cdb import SupportedTmfs
from ..scsi.constants import PrInAction
from ..scsi.pr import ReadFullStatus, ReadKeys, ReadReservation, pr_in_cdb
from .core import UaRetry
from .identity import DeviceIdentity
from .verify import PR_IN_ALLOC, Verification


async def submit_retrying(session: Session, lun: int, cdb: bytes, data: Any, n: int = 0) -> tuple[Result, list[bytes]]:
    """One of the device's own commands under the one unit attention rule
    (``UaRetry``): the last answer and the unit attentions met."""
    retry = UaRetry()
    while True:
        r = await session.submit(lun, cdb, data, n)
        if not retry.again(r):
            return r, retry.met


class Monitor:
    def __init__(
        self, open_session: Callable[[], Awaitable[Session]], lun: int, verification: Verification, log: Any
    ) -> None:
        self._open = open_session
        self.lun = lun
        self.verification = verification
        self.log = log
        self.session: Session | None = None
        self._lock = asyncio.Lock()

    async def _session(self) -> Session:
        async with self._lock:
            if self.session is None:
                self.session = await self._open()
            return self.session

    async def run(self, cdb: bytes, alloc: int) -> Result:
        r, _ = await submit_retrying(await self._session(), self.lun, cdb, b"", alloc)
        return r

    async def read_full_status(self) -> ReadFullStatus | None:
        """READ FULL STATUS (grown until complete); None when the backend
        does not implement it."""
        v = self.verification
        if v.full_status is False:
            return None
        alloc: int | None = PR_IN_ALLOC
        while alloc is not None:
            known = v.full_status
            r = await self.run(pr_in_cdb(PrInAction.READ_FULL_STATUS, alloc), alloc)
            rfs, alloc = v.full_status_answer(r, alloc)
            if rfs is not None:
                return rfs
            if v.full_status is False and known is None:
                self.log.info("backend has no READ FULL STATUS: using READ KEYS + READ RESERVATION")
        return None

    async def read_keys_and_reservation(self) -> tuple[ReadKeys, ReadReservation]:
        keys = self.verification.keys_answer(
            await self.run(pr_in_cdb(PrInAction.READ_KEYS, PR_IN_ALLOC), PR_IN_ALLOC)
        )
        rr = self.verification.reservation_answer(
            await self.run(pr_in_cdb(PrInAction.READ_RESERVATION, PR_IN_ALLOC), PR_IN_ALLOC)
        )
        return keys, rr

    async def capture_identity(self) -> DeviceIdentity:
        """Standard INQUIRY, VPD 80h/83h and READ CAPACITY(16) from the backend."""
        s = await self._session()
        std = await s.inquiry(alloc=255, lun=self.lun)
        vpd: dict[int, bytes] = {}
        for page in (0x80, 0x83):
            try:
                vpd[page] = await s.inquiry(page, alloc=255, lun=self.lun)
            except IscsiError:
                pass
        try:
            blocks, size = await s.read_capacity16(lun=self.lun)
            rc = struct.pack(">QI", blocks - 1, size)
        except IscsiError:
            rc = None
        ident = DeviceIdentity.capture(std, vpd, rc)
        self.log.info(
            "backend LUN: %s %s serial %s, %d x %d bytes",
            ident.vendor, ident.product, ident.serial, ident.capacity_blocks, ident.block_size,
        )
        return ident

    async def capture_tmfs(self) -> SupportedTmfs | None:
        """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS from the backend LUN;
        None when the backend does not implement it (tgt) or fails it."""
        s = await self._session()
        try:
            tmfs = await s.report_supported_tmfs(lun=self.lun)
        except IscsiError as exc:
            self.log.info("backend task management functions unknown (target resets refused): %s", exc)
            return None
        self.log.info("backend task management functions: %s", ", ".join(tmfs.names()) or "none")
        return tmfs


__all__ = ["Monitor", "submit_retrying"]
