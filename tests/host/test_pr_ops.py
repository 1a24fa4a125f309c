"""Reconciliation and operations in-process (issue 5): reservations made on
a device's nexus outside the guest adopted at start, reconciliation on a
PRgeneration change and on demand (``reconcile-pr``), every change
journaled, the JSON lines event log and ``prmigrate host --status``."""

from __future__ import annotations

import asyncio
import functools
import json
import random
from pathlib import Path

from prmigrate.commands.host import format_status
from prmigrate.device.config import parse_device_spec
from prmigrate.device.identity import derive_isid
from prmigrate.device.journal import PrJournal
from prmigrate.device.passthrough import FULL_STATUS_METHOD, KEYS_METHOD
from prmigrate.host.config import HostConfig
from prmigrate.host.control import control_call
from prmigrate.host.daemon import HostDaemon
from prmigrate.host.eventlog import EventLog, read_events
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.types import Nexus, Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import pr_in_cdb, pr_out_cdb, pr_out_params, register_and_move_params
from prmigrate.scsi.transport_id import TransportId
from tests.device.test_passthrough import G1, OTHER, Rig, _is_ua

SHARED = "iqn.2026-11.org.prmigrate:shared"
HOST = "iqn.2026-11.org.prmigrate:hosta"
WE = PrType.WRITE_EXCLUSIVE
K1, K2 = 0x1111, 0x2222


def run(fn):  # type: ignore[no-untyped-def]
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


def lu_out(lu: LogicalUnit, nexus: Nexus, action: int, rk: int = 0, sark: int = 0,
           rtype: int = 0, params: bytes | None = None) -> Result:
    data = params if params is not None else pr_out_params(rk, sark)
    cdb = pr_out_cdb(action, rtype, 0, len(data))
    r = lu.execute(nexus, cdb, data)
    while _is_ua(r):
        r = lu.execute(nexus, cdb, data)
    assert isinstance(r, Result)
    return r


@run
async def test_adopted_at_start_dropped_on_demand_journaled_and_logged(tmp_path: Path) -> None:
    lu = LogicalUnit(tmp_path / "shared.img", 4 << 20)
    backend = IscsiTarget([TargetNode(SHARED, {0: lu})])
    ip = f"127.0.0.{random.randint(2, 250)}"
    (_, port), *_ = await backend.start(ip, 0)
    # the guest's backend nexus, used outside the guest (prmigrate pr would do this)
    g1_port = Nexus.make(HOST, derive_isid("vm1", G1), SHARED)
    other = Nexus.make(OTHER, 0x23D000000009, SHARED)
    lu.attach(g1_port)
    lu.attach(other)
    assert lu_out(lu, g1_port, PrOutAction.REGISTER, 0, K1).status == Status.GOOD
    assert lu_out(lu, g1_port, PrOutAction.RESERVE, K1, 0, WE).status == Status.GOOD
    spec = (f"name=vm1,backend=iscsi://{ip}:{port}/{SHARED}/0,"
            f"target=iqn.2026-11.org.prmigrate:vm1,machine=pc-q35-11.0,guests={G1}")
    cfg = HostConfig(name="hosta", initiator=HOST, listen=[(ip, 0)], control=tmp_path / "ctl.sock",
                     state_dir=tmp_path / "state", devices=[parse_device_spec(spec)]).validate()
    log_path = tmp_path / "events.jsonl"
    daemon = HostDaemon(cfg, event_log=log_path)
    await daemon.start()
    try:
        ctl = cfg.control
        (d,) = await control_call(ctl, "query-devices")
        pr = d["pr-state"]
        g = pr["guests"][G1]
        assert g["holder"] and g["type"] == "Write Exclusive" and g["key"] == f"0x{K1:x}", pr
        assert g["verified"] and g["backend-nexus"].startswith(HOST)
        assert pr["method"] == FULL_STATUS_METHOD and pr["method-cannot-tell"] == []
        assert pr["last-verified"] is not None and pr["last-verified-age-s"] < 30
        # the adoption is journaled
        rec = PrJournal(tmp_path / "state" / "vm1.pr.json").load()
        assert rec is not None and rec.state.get(G1).holder and rec.state.get(G1).key == K1
        text = format_status([d])
        assert f"guest {G1}: key 0x{K1:x}, holds Write Exclusive, backend nexus" not in text
        assert f"guest {G1}: key 0x{K1:x}, holds Write Exclusive; backend nexus" in text, text
        assert "by READ FULL STATUS" in text and "backend nexus " + HOST in text, text

        # another initiator preempts the guest; reconcile-pr drops it
        assert lu_out(lu, other, PrOutAction.REGISTER, 0, K2).status == Status.GOOD
        assert lu_out(lu, other, PrOutAction.PREEMPT, K2, K1, WE).status == Status.GOOD
        (res,) = await control_call(ctl, "reconcile-pr", {})
        assert res["device"] == "vm1" and res["method"] == FULL_STATUS_METHOD
        assert len(res["changes"]) == 1 and "registration gone" in res["changes"][0], res
        (d,) = await control_call(ctl, "query-devices")
        assert d["pr-state"]["guests"] == {}
        rec = PrJournal(tmp_path / "state" / "vm1.pr.json").load()
        assert rec is not None and not rec.state.get(G1).registered
        assert (await control_call(ctl, "reconcile-pr", {"device": "vm1"}))[0]["changes"] == []
    finally:
        await daemon.close()
        await backend.close()
    events = read_events(log_path)
    names = [e["event"] for e in events]
    assert names[:3] == ["PR_STATE_CHANGED", "PR_RECONCILED", "DEVICE_ADDED"], names
    assert names[-1] == "SHUTDOWN", names
    rec_events = [e["data"] for e in events if e["event"] == "PR_RECONCILED"]
    assert [r["reason"] for r in rec_events] == ["start", "reconcile-pr", "reconcile-pr"]
    assert rec_events[0]["method"] == FULL_STATUS_METHOD and rec_events[0]["changes"]
    changed = [e["data"] for e in events if e["event"] == "PR_STATE_CHANGED"]
    assert [c["changes"][0]["after"]["holder"] for c in changed] == [True, False]
    assert "DEVICE_ADDED" in names


@run
async def test_a_prgeneration_change_in_a_guest_pr_in_reconciles(tmp_path: Path) -> None:
    """Another initiator's REGISTER AND MOVE onto the guest's nexus sends no
    unit attention; the guest's next READ KEYS shows a new PRgeneration and
    the device reconciles: the moved reservation is adopted."""
    rig = Rig(tmp_path)
    await rig.start()
    seen: list[dict[str, object]] = []
    rig.dev.on_reconcile = lambda dev, info: seen.append(info)
    r = await rig.cmd(G1, bytes(6))  # TEST UNIT READY: the guest's backend nexus exists
    assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
    await rig.dev.verify()
    assert rig.dev.snooper.state.generation is not None
    assert rig.other_out(PrOutAction.REGISTER, 0, K2).good
    assert rig.other_out(PrOutAction.RESERVE, K2, 0, WE).good
    tid = TransportId(HOST, derive_isid("vm1", G1))
    moved = lu_out(rig.lu, rig.other, PrOutAction.REGISTER_AND_MOVE, rtype=WE,
                   params=register_and_move_params(K2, K1, tid, unreg=True))
    assert moved.status == Status.GOOD, moved
    r = await rig.cmd(G1, pr_in_cdb(PrInAction.READ_KEYS, 8192))
    while _is_ua(r):
        r = await rig.cmd(G1, pr_in_cdb(PrInAction.READ_KEYS, 8192))
    assert r.status == Status.GOOD
    for _ in range(100):
        await rig.dev.drain()
        if any(i["reason"] == "PRgeneration changed" for i in seen):
            break
        await asyncio.sleep(0.01)
    assert any(i["reason"] == "PRgeneration changed" and i["changes"] for i in seen), seen
    g = rig.dev.snooper.state.get(G1)
    assert g.key == K1 and g.holder and g.rtype == WE
    await rig.assert_tracks()
    await rig.close()


@run
async def test_the_keys_fallback_says_what_it_cannot_tell(tmp_path: Path) -> None:
    rig = Rig(tmp_path, no_full_status=True)
    await rig.start()
    await rig.pr_out_ok(G1, PrOutAction.REGISTER, 0, K1)
    await rig.pr_out_ok(G1, PrOutAction.RESERVE, K1, 0, WE)
    await rig.dev.verify("test")
    pr = rig.dev.describe()["pr-state"]
    assert pr["method"] == KEYS_METHOD
    assert any("which nexus" in x for x in pr["method-cannot-tell"])  # type: ignore[union-attr]
    assert any("cannot tell" in x for x in pr["open-questions"])  # type: ignore[union-attr]
    text = format_status([{"name": "vm1", "properties": {"backend": "b"}, "migrate-pr": True,
                           "pr-state": pr, "backend-nexus": {}}])
    assert "by READ KEYS + READ RESERVATION" in text and "cannot tell:" in text, text
    await rig.close()


def test_event_log_lines(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "events.jsonl"
    log = EventLog(p)
    log({"event": "A", "data": {"x": 1}})
    log({"event": "B", "data": {"path": tmp_path}})  # not JSON-native: as text
    log.close()
    log({"event": "C"})  # after close: ignored
    with open(p, "a") as f:
        f.write('{"event": "torn"')
    assert [e["event"] for e in read_events(p)] == ["A", "B"]
    assert json.loads(p.read_text().splitlines()[1])["data"]["path"] == str(tmp_path)
