"""A host drained in one batch: ``prmigrate migrate --all`` with real
processes. Ten devices on host A, each on its own LUN of one
``prmigrate target``, each guest (our initiator) holding a reservation and
writing continuously; one ``migrate --all`` moves them all to B. Then READ
FULL STATUS on the target shows every guest's key on B's nexus, holding,
nothing on A's; no write got RESERVATION CONFLICT, every guest kept writing
after the move and every acknowledged write reads back."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from prmigrate.device.identity import derive_isid
from prmigrate.iscsi.initiator import Session, connect
from prmigrate.scsi.constants import PrType

from .conftest import stop, wait_listening
from .migration_cluster import (
    GUEST,
    INITIATORS,
    SHARED,
    ProcCluster,
    cluster,
    env,
    free_port,
    spawn,
)
from .test_migration_e2e import Writer, take_reservation

pytestmark = pytest.mark.interop

DEVICES = 10


def _frontend(i: int) -> str:
    return f"iqn.2026-11.org.prmigrate:vm{i}"


@contextmanager
def batch_cluster(tmp_path: Path) -> Iterator[ProcCluster]:
    """The target with one LUN per device, A serving vm1..vm10, B empty (as ``cluster``: logs on failure, all stopped)."""
    host, port = "127.0.0.1", free_port("127.0.0.1")
    luns = [a for i in range(DEVICES) for a in ("--lun", f"{i}={tmp_path / f'lun{i}.img'}")]
    t = spawn("target", [sys.executable, "-m", "prmigrate.cli", "target", "--listen",
                         f"{host}:{port}", "--iqn", SHARED, "--size", "16M", *luns,
                         "--state-dir", str(tmp_path / "target-state")], tmp_path)
    t.host, t.port = host, port
    try:
        wait_listening(t.host, t.port, t.proc)
    except BaseException:
        stop(t.proc)
        raise
    base = f"iscsi://{host}:{port}/{SHARED}"
    machine = ProcCluster.machine  # the cluster's default machine type
    devices = [f"name=vm{i},backend={base}/{i - 1},target={_frontend(i)},machine={machine}"
               for i in range(2, DEVICES + 1)]
    with cluster(tmp_path, procs={"target": t}, extra_devices=devices) as c:
        yield c


@asynccontextmanager
async def reserved_guests(c: ProcCluster, rtype: PrType) -> AsyncIterator[list[Session]]:
    """Each device's guest session on A's frontend, holding a ``rtype`` reservation; all closed at the end."""
    a = c.procs["hosta"]
    sessions: list[Session] = []
    try:
        for i in range(1, DEVICES + 1):
            s = await connect(f"iscsi://{a.host}:{a.port}/{_frontend(i)}/0", initiator_name=GUEST,
                              isid=0x23D000000042, command_timeout=30, reconnect_timeout=30)
            sessions.append(s)
            await take_reservation(s, rtype)
        yield sessions
    finally:
        for s in sessions:
            await s.close()


async def migrate_to_b(c: ProcCluster, *which: str) -> tuple[int | None, str]:
    """``prmigrate migrate --control A <which> --to B`` as a subprocess: (exit status, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prmigrate.cli", "migrate", "--control", str(c.procs["hosta"].control),
        *which, "--to", c.procs["hostb"].migrate_addr,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env())
    out_b, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode, out_b.decode(errors="replace")


async def guest_entries(c: ProcCluster, i: int) -> list[Any]:
    """READ FULL STATUS entries of vm{i}'s guest nexus (its ISID, through any host) on LUN i-1."""
    rfs = await c.full_status(i - 1)
    isid = derive_isid(f"vm{i}", GUEST)
    return [e for e in rfs.entries if e.transport_id.isid == isid]


def test_migrate_all_moves_every_device_with_its_reservation(tmp_path: Path) -> None:
    with batch_cluster(tmp_path) as c:

        async def go() -> None:
            async with reserved_guests(c, PrType.WRITE_EXCLUSIVE) as sessions:
                writers = [Writer(s) for s in sessions]
                await asyncio.sleep(0.3)
                rc, out = await migrate_to_b(c, "--all")
                assert rc == 0, out
                assert f"{DEVICES} of {DEVICES} moved" in out, out
                before = [len(w.acked) for w in writers]
                await asyncio.sleep(0.5)
                for w, n in zip(writers, before, strict=True):
                    await w.stop()
                    assert not w.bad, w.bad  # never RESERVATION CONFLICT
                    assert len(w.acked) > n, "a guest stopped writing after the move"
                for w in writers:
                    assert await w.verify() > 5
                # every reservation moved: on B's nexus of its device, nothing on A's
                for i in range(1, DEVICES + 1):
                    sess = await c.call("hostb", "query-devices", {"device": f"vm{i}"})
                    assert sess, f"vm{i} not on B"
                assert await c.call("hosta", "query-devices") == []
                for i in range(1, DEVICES + 1):
                    mine = await guest_entries(c, i)
                    assert [e.transport_id.name.lower() for e in mine] == [INITIATORS["hostb"]], (i, mine)
                    assert mine[0].holder and int(mine[0].rtype) == PrType.WRITE_EXCLUSIVE
                # each pause is printed; none is long
                pauses = [float(m) for m in re.findall(r"\(pause ([\d.]+) ms\)", out)]
                assert len(pauses) == DEVICES, out
                print(out)

        asyncio.run(asyncio.wait_for(go(), 180))


def test_a_move_refused_in_a_batch_rolls_back_alone(tmp_path: Path) -> None:
    """B already has a device named vm3: that move fails in setup and vm3
    stays on A with its guest and reservation; the other nine move."""
    with batch_cluster(tmp_path) as c:

        async def go() -> None:
            t = c.procs["target"]
            await c.call("hostb", "device-add", {
                "name": "vm3", "backend": f"iscsi://{t.host}:{t.port}/{SHARED}/2",
                "target": "iqn.2026-11.org.prmigrate:other-vm3"})
            async with reserved_guests(c, PrType.EXCLUSIVE_ACCESS) as sessions:
                writers = [Writer(s) for s in sessions]
                await asyncio.sleep(0.2)
                rc, out = await migrate_to_b(c, *[x for i in range(1, DEVICES + 1) for x in ("--device", f"vm{i}")])
                assert rc == 1, out  # the worst of the moves: one failed, stayed
                assert f"{DEVICES - 1} of {DEVICES} moved" in out, out
                assert re.search(r"^vm3: failed, stays on the source: .*already exists", out, re.M), out
                await asyncio.sleep(0.3)
                for w in writers:
                    await w.stop()
                    assert not w.bad, w.bad
                    assert await w.verify() > 5
                on_a = [d["name"] for d in await c.call("hosta", "query-devices")]
                assert on_a == ["vm3"], on_a
                for i in range(1, DEVICES + 1):
                    mine = await guest_entries(c, i)
                    host = "hosta" if i == 3 else "hostb"
                    assert [e.transport_id.name.lower() for e in mine] == [INITIATORS[host]], (i, mine)
                    assert mine[0].holder

        asyncio.run(asyncio.wait_for(go(), 180))
