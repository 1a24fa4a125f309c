"""A host's state directory full or read-only (a small tmpfs mounted by the
test, root only) during a guest's PR OUT and during a move, with real
processes.

PR OUT: its intent cannot be journaled, so it is not forwarded: the guest
gets CHECK CONDITION (ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES),
the log says why, and READ FULL STATUS (a separate ``prmigrate pr``
process) shows the LUN untouched; once the directory works again the same
command goes through.

Move, the directory failing before it: the commit point's record cannot be
written, so the migration rolls back (``prmigrate migrate`` exits 1), the
guest stays on the source. Failing after the commit point: the source
cannot write its ``moved`` record. The move itself completes (the
destination serves and holds the reservation), ``prmigrate migrate`` exits 3
saying so, ``query-host`` and ``host --status`` show the unrecorded move;
restarted before the directory works, the source redirects (its
``resume-sent`` marker stands for the record) and does not serve the
device; it writes the record as soon as the directory works again."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from prmigrate.scsi.constants import PrType, SenseKey, Status
from prmigrate.scsi.pr import pr_out_params
from prmigrate.scsi.sense import decode_sense

from ..interop.migration_cluster import FrameProxy
from .faultkit import (
    KEY,
    RetryingWriter,
    aside_cluster,
    assert_holds,
    fill,
    guest_session,
    image_blocks,
    register_and_reserve,
    registrations,
    remount,
    status_text,
    tmpfs,
)

pytestmark = pytest.mark.interop

WE = int(PrType.WRITE_EXCLUSIVE)


def _refused_55_04(r: object) -> None:
    assert r.status == Status.CHECK_CONDITION, r  # type: ignore[attr-defined]
    d = decode_sense(bytes(r.sense))  # type: ignore[attr-defined]
    assert (d.key, d.asc, d.ascq) == (SenseKey.ILLEGAL_REQUEST, 0x55, 0x04), d


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_pr_out_not_forwarded_when_not_journaled(tmp_path: Path, fault: str) -> None:
    with tmpfs(tmp_path / "hosta-state") as state, aside_cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                r = await s.pr_out(0x00, 0, pr_out_params(0, KEY))
                assert r.good, r
                filler = fill(state) if fault == "full" else None
                if fault == "read-only":
                    remount(state, "ro")
                try:
                    r = await s.pr_out(0x01, WE, pr_out_params(KEY, 0))  # RESERVE
                    _refused_55_04(r)
                    assert not any(x["holder"] for x in registrations(c)), registrations(c)
                    r = await s.pr_out(0x00, 0, pr_out_params(KEY, 0))  # unregister
                    _refused_55_04(r)
                    (reg,) = registrations(c)
                    assert int(reg["key"], 16) == KEY
                    assert "not forwarded" in c.procs["hosta"].log
                finally:
                    if filler is not None:
                        filler.unlink()
                    if fault == "read-only":
                        remount(state, "rw")
                r = await s.pr_out(0x01, WE, pr_out_params(KEY, 0))
                assert r.good, r
                assert_holds(c, "hosta", WE)
                (d,) = await c.call("hosta", "query-devices")
                (g,) = d["pr-state"]["guests"].values()
                assert g["holder"] and g["type"] == "Write Exclusive", g
            finally:
                await s.close()
            log = c.procs["hosta"].log
            assert "Traceback" not in log, log[-3000:]
            assert await c.call("hostb", "query-devices") == []  # only A serves the device

        asyncio.run(asyncio.wait_for(go(), 120))


def _fault(state: Path, fault: str) -> Path | None:
    """Make the state directory fail: a filler (full) or read-only."""
    if fault == "full":
        return fill(state)
    remount(state, "ro")
    return None


def _heal(state: Path, fault: str, filler: Path | None) -> None:
    if filler is not None:
        filler.unlink()
    if fault == "read-only":
        remount(state, "rw")


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_move_not_recorded_at_the_commit_point_rolls_back(tmp_path: Path, fault: str) -> None:
    """The state directory fails before the move: the commit point's record
    cannot be written, so RESUME is not sent: the migration rolls back, the
    guest stays on A with its reservation, B serves nothing."""
    with tmpfs(tmp_path / "hosta-state") as state, aside_cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            filler = None
            try:
                await register_and_reserve(s, WE, aptpl=False)
                w = RetryingWriter(s)
                await asyncio.sleep(0.3)
                filler = _fault(state, fault)
                code, out = await c.migrate("hosta", "hostb")
                assert code == 1, out
                assert "commit point cannot be recorded" in out, out
                await c.wait_device("hostb", False, timeout=45)
                host = await c.call("hosta", "query-host")
                assert host["devices"] == ["vm1"] and host["moved"] == {}, host
                await asyncio.sleep(0.5)
                await w.stop()
                assert not w.bad, w.bad
            finally:
                _heal(state, fault, filler)
                await s.close()
            image_blocks(c, w.acked)
            assert_holds(c, "hosta", WE)
            assert [d["name"] for d in await c.call("hosta", "query-devices")] == ["vm1"]
            assert "Traceback" not in c.procs["hosta"].log, c.procs["hosta"].log[-3000:]

        asyncio.run(asyncio.wait_for(go(), 150))


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_move_whose_record_fails(tmp_path: Path, fault: str) -> None:
    """The state directory fails after the commit point (when B's ACK of
    RESUME comes back): the move completes, its record cannot be written.
    Restarted then, A redirects (the resume-sent marker stands for the
    record) and does not serve the device; once the directory works, the
    record is written and the marker removed: restarted again, A still
    redirects."""
    with tmpfs(tmp_path / "hosta-state") as state, aside_cluster(tmp_path) as c:
        filler: list[Path | None] = [None]

        def rule(direction: str, frame: str) -> str | None:
            # B's ACK of RESUME: the commit point's marker is written
            marker = state / "vm1.migration.json"
            if frame == "ACK" and direction == "to_src" and marker.exists() \
                    and json.loads(marker.read_text())["phase"] == "resume-sent":
                filler[0] = _fault(state, fault)
            return None

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            proxy = FrameProxy(("127.0.0.3", c.procs["hostb"].migrate_port), rule)
            to = await proxy.start()
            try:
                await register_and_reserve(s, WE, aptpl=False)
                w = RetryingWriter(s)
                await asyncio.sleep(0.3)
                try:
                    code, out = await c.migrate("hosta", "hostb", to=to)
                finally:
                    await proxy.close()
                assert code == 3, out
                assert "could not record the move" in out, out
                await c.wait_device("hostb", True)
                host = await c.call("hosta", "query-host")
                assert "vm1" in host["moved"] and "vm1" in host["moved-unrecorded"], host
                assert "MOVE NOT RECORDED" in status_text(c, "hosta")
                # asked to move it again, the source says where it went
                code2, out2 = await c.migrate("hosta", "hostb")
                assert code2 != 0 and "moved to 127.0.0.3" in out2, out2
                assert (state / "vm1.migration.json").exists() or (state / "vm1.moved.json").exists()
                if fault == "read-only":
                    assert not (state / "vm1.moved.json").exists()
                # (full: removing the device's journal freed space, the record may be in)
                # restarted before the directory works again: A redirects
                c.kill("hosta")
                c.restart_host("hosta")
                host = await c.call("hosta", "query-host")
                assert host["devices"] == [] and "vm1" in host["moved"], host
                if fault == "read-only":
                    assert "vm1" in host["moved-unrecorded"], host
                # a guest login at A lands on B (B serves, A has no device)
                s2 = await guest_session(c.frontend_url("hosta"))
                try:
                    r = await s2.read(0, 1)
                    assert len(r) == 512
                finally:
                    await s2.close()
                assert await c.call("hosta", "query-devices") == []
                # the directory works again: the record is written, the marker goes
                _heal(state, fault, filler[0])
                filler[0] = None
                deadline = time.monotonic() + 15
                while not (state / "vm1.moved.json").exists() or (state / "vm1.migration.json").exists():
                    assert time.monotonic() < deadline, c.procs["hosta"].log[-3000:]
                    await asyncio.sleep(0.2)
                host = await c.call("hosta", "query-host")
                assert host["moved-unrecorded"] == {}, host
                # restarted again, A redirects from the record
                c.kill("hosta")
                c.restart_host("hosta")
                host = await c.call("hosta", "query-host")
                assert host["devices"] == [] and "vm1" in host["moved"], host
                await asyncio.sleep(0.5)
                await w.stop()
                assert not w.bad, w.bad
            finally:
                _heal(state, fault, filler[0])
                await s.close()
            image_blocks(c, w.acked)
            assert_holds(c, "hostb", WE)
            assert await c.call("hosta", "query-devices") == []
            assert [d["name"] for d in await c.call("hostb", "query-devices")] == ["vm1"]
            for h in ("hosta", "hostb"):
                assert "Traceback" not in c.procs[h].log, c.procs[h].log[-3000:]

        asyncio.run(asyncio.wait_for(go(), 150))
