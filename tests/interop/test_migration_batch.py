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
from pathlib import Path

import pytest

from prmigrate.device.identity import derive_isid
from prmigrate.iscsi.initiator import connect
from prmigrate.scsi.constants import PrType

from .conftest import wait_listening
from .migration_cluster import GUEST, INITIATORS, SHARED, ProcCluster, env, free_port, spawn
from .test_migration_e2e import Writer, take_reservation

pytestmark = pytest.mark.interop

DEVICES = 10


def _frontend(i: int) -> str:
    return f"iqn.2026-11.org.prmigrate:vm{i}"


def _start(tmp_path: Path) -> ProcCluster:
    c = ProcCluster(tmp_path)
    port = free_port(c.target_host)
    luns = [a for i in range(DEVICES) for a in ("--lun", f"{i}={tmp_path / f'lun{i}.img'}")]
    p = spawn("target", [sys.executable, "-m", "prmigrate.cli", "target", "--listen",
                         f"{c.target_host}:{port}", "--iqn", SHARED, "--size", "16M", *luns,
                         "--state-dir", str(tmp_path / "target-state")], tmp_path)
    p.host, p.port = c.target_host, port
    c.procs["target"] = p
    wait_listening(p.host, p.port, p.proc)
    base = f"iscsi://{p.host}:{port}/{SHARED}"
    c.extra_devices = [f"name=vm{i},backend={base}/{i - 1},target={_frontend(i)},machine={c.machine}"
                       for i in range(2, DEVICES + 1)]
    c.start()
    return c


def test_migrate_all_moves_every_device_with_its_reservation(tmp_path: Path) -> None:
    c = _start(tmp_path)
    try:
        async def go() -> None:
            a = c.procs["hosta"]
            sessions = []
            for i in range(1, DEVICES + 1):
                s = await connect(f"iscsi://{a.host}:{a.port}/{_frontend(i)}/0", initiator_name=GUEST,
                                  isid=0x23D000000042, command_timeout=30, reconnect_timeout=30)
                sessions.append(s)
                await take_reservation(s, PrType.WRITE_EXCLUSIVE)
            writers = [Writer(s) for s in sessions]
            try:
                await asyncio.sleep(0.3)
                control = c.procs["hosta"].control
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "prmigrate.cli", "migrate", "--control", str(control),
                    "--all", "--to", c.procs["hostb"].migrate_addr,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env())
                out_b, _ = await asyncio.wait_for(proc.communicate(), 90)
                out = out_b.decode(errors="replace")
                assert proc.returncode == 0, out
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
                    rfs = await _full_status(c, i - 1)
                    isid = derive_isid(f"vm{i}", GUEST)
                    mine = [e for e in rfs.entries if e.transport_id.isid == isid]
                    assert [e.transport_id.name.lower() for e in mine] == [INITIATORS["hostb"]], (i, mine)
                    assert mine[0].holder and int(mine[0].rtype) == PrType.WRITE_EXCLUSIVE
                # each pause is printed; none is long
                pauses = [float(m) for m in re.findall(r"\(pause ([\d.]+) ms\)", out)]
                assert len(pauses) == DEVICES, out
                print(out)
            finally:
                for s in sessions:
                    await s.close()

        asyncio.run(asyncio.wait_for(go(), 180))
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()


async def _full_status(c: ProcCluster, lun: int):  # type: ignore[no-untyped-def]
    from prmigrate.scsi.constants import PrInAction
    from prmigrate.scsi.pr import ReadFullStatus

    t = c.procs["target"]
    s = await connect(f"iscsi://{t.host}:{t.port}/{SHARED}/{lun}", initiator_name="iqn.2026-11.org.prmigrate:observer",
                      isid=0x23D0000000FE, reconnect=False, command_timeout=10)
    try:
        r = await s.pr_in(PrInAction.READ_FULL_STATUS, 8192)
        assert r.good, r
        return ReadFullStatus.decode(bytes(r.data_in))
    finally:
        await s.close()


def test_a_move_refused_in_a_batch_rolls_back_alone(tmp_path: Path) -> None:
    """B already has a device named vm3: that move fails in setup and vm3
    stays on A with its guest and reservation; the other nine move."""
    c = _start(tmp_path)
    try:
        async def go() -> None:
            a = c.procs["hosta"]
            t = c.procs["target"]
            await c.call("hostb", "device-add", {
                "name": "vm3", "backend": f"iscsi://{t.host}:{t.port}/{SHARED}/2",
                "target": "iqn.2026-11.org.prmigrate:other-vm3"})
            sessions = []
            for i in range(1, DEVICES + 1):
                s = await connect(f"iscsi://{a.host}:{a.port}/{_frontend(i)}/0", initiator_name=GUEST,
                                  isid=0x23D000000042, command_timeout=30, reconnect_timeout=30)
                sessions.append(s)
                await take_reservation(s, PrType.EXCLUSIVE_ACCESS)
            writers = [Writer(s) for s in sessions]
            try:
                await asyncio.sleep(0.2)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "prmigrate.cli", "migrate", "--control", str(a.control),
                    *[x for i in range(1, DEVICES + 1) for x in ("--device", f"vm{i}")],
                    "--to", c.procs["hostb"].migrate_addr,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env())
                out_b, _ = await asyncio.wait_for(proc.communicate(), 90)
                out = out_b.decode(errors="replace")
                assert proc.returncode == 1, out  # the worst of the moves: one failed, stayed
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
                    rfs = await _full_status(c, i - 1)
                    isid = derive_isid(f"vm{i}", GUEST)
                    mine = [e for e in rfs.entries if e.transport_id.isid == isid]
                    host = "hosta" if i == 3 else "hostb"
                    assert [e.transport_id.name.lower() for e in mine] == [INITIATORS[host]], (i, mine)
                    assert mine[0].holder
            finally:
                for s in sessions:
                    await s.close()

        asyncio.run(asyncio.wait_for(go(), 180))
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()
