"""An in-process cluster for the migration service tests.

One shared logical unit served by our iSCSI target on 127.0.0.1, host
daemons A (127.0.0.2) and B (127.0.0.3) with the migration service, and a
guest that is our own initiator logged in to A's frontend with a guest
initiator name. Everything runs on one event loop; ports are ephemeral.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prmigrate.device.config import DeviceConfig
from prmigrate.device.identity import derive_isid
from prmigrate.host.config import HostConfig
from prmigrate.host.daemon import HostDaemon, frontend_iqn
from prmigrate.host.migration_control import attach_migration
from prmigrate.iscsi.initiator import Session, connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.types import Nexus, Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.migration.machine import Timeouts
from prmigrate.migration.service import MigrationService
from prmigrate.scsi.constants import PrInAction, Status
from prmigrate.scsi.pr import ReadFullStatus, pr_in_cdb

SHARED = "iqn.2026-11.org.prmigrate:shared"
GUEST = "iqn.2026-11.org.prmigrate:guest1"
HOST_A = "iqn.2026-11.org.prmigrate:hosta"
HOST_B = "iqn.2026-11.org.prmigrate:hostb"
SECRET = b"0123456789abcdef-cluster"
OBSERVER = Nexus.make("iqn.2026-11.org.prmigrate:observer", 0x23D0000000FF, SHARED)


def run(timeout: float = 30.0) -> Callable[..., Any]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout))

        return wrapper

    return deco


class Cluster:
    def __init__(
        self,
        tmp: Path,
        *,
        machine: str = "pc-q35-11.0",
        migrate_pr: bool | None = None,
        unit_cls: type[LogicalUnit] = LogicalUnit,
        timeouts: Timeouts | None = None,
        secret_b: bytes = SECRET,
    ) -> None:
        self.tmp = tmp
        self.lu = unit_cls(tmp / "disk.img", 8 << 20)
        self.lu.attach(OBSERVER)
        self.machine = machine
        self.migrate_pr = migrate_pr
        self.timeouts = timeouts
        self.secret_b = secret_b
        self.target = IscsiTarget([TargetNode(SHARED, {0: self.lu})])
        self.daemons: dict[str, HostDaemon] = {}
        self.services: dict[str, MigrationService] = {}
        self.guest: Session | None = None

    async def start(self) -> None:
        (h, p), *_ = await self.target.start("127.0.0.1", 0)
        self.backend_url = f"iscsi://{h}:{p}/{SHARED}/0"
        self.config = DeviceConfig(
            "vm1", self.backend_url, SHARED, machine=self.machine, migrate_pr=self.migrate_pr,
            frontend_iqn="iqn.2026-11.org.prmigrate:vm1",
        )
        for name, addr, init, devices, secret in (
            ("hosta", "127.0.0.2", HOST_A, [self.config], SECRET),
            ("hostb", "127.0.0.3", HOST_B, [], self.secret_b),
        ):
            cfg = HostConfig(name=name, initiator=init, listen=[(addr, 0)],
                             control=self.tmp / f"{name}.sock",
                             state_dir=self.tmp / name, devices=devices).validate()
            d = HostDaemon(cfg)
            await d.start()
            self.daemons[name] = d
            self.services[name] = await attach_migration(d, (addr, 0), secret, timeouts=self.timeouts)

    def frontend_url(self, host: str = "hosta") -> str:
        h, p = self.daemons[host].listening[0][:2]
        return f"iscsi://{h}:{p}/{frontend_iqn(self.config)}/0"

    def migration_address(self, host: str) -> tuple[str, int]:
        return self.services[host].listening[0]

    async def connect_guest(self, host: str = "hosta", **kw: Any) -> Session:
        self.guest = await connect(self.frontend_url(host), initiator_name=GUEST,
                                   isid=0x23D000000042, command_timeout=20, **kw)
        return self.guest

    async def migrate(self, src: str = "hosta", dst: str = "hostb", **kw: Any) -> dict[str, Any]:
        runner = self.services[src].migrate("vm1", self.migration_address(dst), **kw)
        await asyncio.wait_for(asyncio.shield(runner.done), 30)
        return runner.query()

    def full_status(self) -> ReadFullStatus:
        r = self.lu.execute(OBSERVER, pr_in_cdb(PrInAction.READ_FULL_STATUS, 8192))
        assert r.status == Status.GOOD
        return ReadFullStatus.decode(bytes(r.data_in))

    def entries_of(self, host_initiator: str) -> list[Any]:
        isid = derive_isid("vm1", GUEST)
        return [e for e in self.full_status().entries
                if e.transport_id.name.lower() == host_initiator and e.transport_id.isid == isid]

    async def close(self) -> None:
        if self.guest is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.guest.close(), 5)
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(d.close(), 5)
        for s in self.services.values():
            with contextlib.suppress(Exception):
                await s.close()
        await self.target.close()


def good(r: Result) -> bool:
    return r.status == Status.GOOD
