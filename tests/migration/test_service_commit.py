"""The commit point (RESUME sent) and a source restarted after it, in one
process: the ``resume-sent`` marker carries the destination's frontend
portal; a restarted source that finds it (killed right after RESUME, or its
``moved`` record could not be written) redirects the guest's logins there
and never opens the device; the marker goes once the ``moved`` record is
written. A marker that cannot be written at the commit point rolls the
migration back: the guest stays on the source."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from prmigrate.host.daemon import HostDaemon, frontend_iqn
from prmigrate.host.migration_control import attach_migration
from prmigrate.iscsi.initiator import connect
from prmigrate.lun import persist
from prmigrate.migration.marker import MigrationMarker
from prmigrate.scsi.constants import PrInAction, PrType
from prmigrate.scsi.pr import ReadReservation

from .service_rig import GUEST, HOST_A, SECRET, Cluster, run
from .test_service import KEY, _setup_pr
from .test_service_faults import _check_on_a

WE = PrType.WRITE_EXCLUSIVE


async def _restart_a(c: Cluster) -> HostDaemon:
    """A stopped and started again: same configuration, state directory and portal."""
    old = c.daemons["hosta"]
    await c.services["hosta"].close()
    await old.close()
    a = HostDaemon(dataclasses.replace(old.config, listen=[old.listening[0][:2]]))
    await a.start()
    c.daemons["hosta"] = a
    c.services["hosta"] = await attach_migration(a, ("127.0.0.2", 0), SECRET)
    return a


async def _redirects_to_b(c: Cluster, a: HostDaemon, data: bytes) -> None:
    """A serves nothing for vm1, lists it as moved to B's frontend, and a
    guest login at A lands on B with its data and reservation."""
    b_port = c.daemons["hostb"].listening[0][1]
    assert "vm1" not in a.devices
    assert a._cmd_query_host({})["moved"] == {"vm1": f"127.0.0.3:{b_port}"}
    node = a.target.node(frontend_iqn(c.config))
    assert node is not None and node.luns == {} and node.redirect is not None
    assert node.redirect[:2] == ("127.0.0.3", b_port)
    assert c.entries_of(HOST_A) == []  # no backend nexus opened for the guest
    late = await connect(c.frontend_url("hosta"), initiator_name=GUEST, isid=0x23D000000043,
                         command_timeout=20, reconnect=False)
    try:
        assert await late.read(0, 8) == data
        rr = ReadReservation.decode(bytes((await late.pr_in(PrInAction.READ_RESERVATION)).data_in))
        assert rr.key == KEY
    finally:
        await late.close()


def _keep_resume_marker(monkeypatch: pytest.MonkeyPatch, into: Path) -> None:
    """Copy the resume-sent marker to ``into`` as it is written."""
    write = MigrationMarker.write

    def spy(self: MigrationMarker, record: dict[str, Any], fsync: bool = False) -> None:
        write(self, record, fsync)
        if record.get("phase") == "resume-sent" and self.path is not None:
            shutil.copy(self.path, into)

    monkeypatch.setattr(MigrationMarker, "write", spy)


@run(60)
async def test_source_killed_after_resume_redirects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state A's directory holds when A is killed right after RESUME
    (the marker at resume-sent, no moved record): restarted, A redirects."""
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        data = b"committed" * 455 + b"!"
        await guest.write(0, data)
        saved = tmp_path / "resume-sent.json"
        _keep_resume_marker(monkeypatch, saved)
        assert (await c.migrate())["success"] is True
        marker = json.loads(saved.read_text())
        b_port = c.daemons["hostb"].listening[0][1]
        assert marker["phase"] == "resume-sent" and marker["frontend"] == ["127.0.0.3", b_port], marker
        state = tmp_path / "hosta"
        (state / "vm1.moved.json").unlink()  # killed before the handover wrote it
        shutil.copy(saved, state / "vm1.migration.json")
        a = await _restart_a(c)
        await _redirects_to_b(c, a, data)
        # the move record is written at start; then the marker goes
        assert (state / "vm1.moved.json").exists() and not (state / "vm1.migration.json").exists()
        assert a._cmd_query_host({})["moved-unrecorded"] == {}
    finally:
        await c.close()


def _moved_record_fails(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``<device>.moved.json`` cannot be written while the flag is set."""
    failing = [True]
    save = persist.save

    def faulty(path: Any, obj: Any, *a: Any, **kw: Any) -> Any:
        if failing[0] and str(path).endswith(".moved.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(path, obj, *a, **kw)

    monkeypatch.setattr(persist, "save", faulty)
    return failing


@run(60)
async def test_unrecorded_move_then_restart_redirects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moved record fails: the migration reports it, the resume-sent
    marker stays; restarted before the record could be written, A
    redirects (it still cannot write the record: the marker stays, the move
    is shown as unrecorded); once it can, the record is written and the
    marker removed."""
    c = Cluster(tmp_path)
    await c.start()
    try:
        guest = await c.connect_guest()
        await _setup_pr(guest, WE)
        data = b"unrecord" * 512
        await guest.write(0, data)
        failing = _moved_record_fails(monkeypatch)
        q = await c.migrate()
        assert q["success"] is True and q["unrecorded"], q
        state = tmp_path / "hosta"
        assert not (state / "vm1.moved.json").exists()
        marker = json.loads((state / "vm1.migration.json").read_text())
        assert marker["phase"] == "resume-sent" and marker["frontend"][0] == "127.0.0.3", marker
        a = await _restart_a(c)
        await _redirects_to_b(c, a, data)
        assert "vm1" in a._cmd_query_host({})["moved-unrecorded"]
        assert (state / "vm1.migration.json").exists()
        failing[0] = False  # the directory works again: the retry writes it
        a._retry_moved()
        assert (state / "vm1.moved.json").exists() and not (state / "vm1.migration.json").exists()
        assert a._cmd_query_host({})["moved-unrecorded"] == {}
        a = await _restart_a(c)  # and from the record alone
        await _redirects_to_b(c, a, data)
    finally:
        await c.close()


@run(60)
async def test_unrecorded_move_kept_live_keeps_the_marker_until_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, without a restart: the running source's retry writes the
    record and then removes the marker."""
    c = Cluster(tmp_path)
    await c.start()
    try:
        await _setup_pr(await c.connect_guest(), WE)
        failing = _moved_record_fails(monkeypatch)
        assert (await c.migrate())["success"] is True
        state = tmp_path / "hosta"
        a = c.daemons["hosta"]
        assert (state / "vm1.migration.json").exists() and "vm1" in a._cmd_query_host({})["moved-unrecorded"]
        failing[0] = False
        a._retry_moved()
        assert (state / "vm1.moved.json").exists() and not (state / "vm1.migration.json").exists()
    finally:
        await c.close()


@run(60)
async def test_commit_point_not_recorded_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume-sent marker cannot be written: RESUME is not sent, the
    migration rolls back (the destination's PREEMPT undone) and the guest
    runs on A with its reservation; no marker is left."""
    write = MigrationMarker.write

    def faulty(self: MigrationMarker, record: dict[str, Any], fsync: bool = False) -> None:
        if record.get("phase") == "resume-sent":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, record, fsync)

    monkeypatch.setattr(MigrationMarker, "write", faulty)
    c = Cluster(tmp_path)
    await c.start()
    try:
        await _setup_pr(await c.connect_guest(), WE)
        q = await c.migrate()
        assert q["status"] == "rolled_back" and q["success"] is False, q
        assert "commit point cannot be recorded" in json.dumps(q), q
        await _check_on_a(c)
        assert not (tmp_path / "hosta" / "vm1.migration.json").exists()
        assert not (tmp_path / "hosta" / "vm1.moved.json").exists()
    finally:
        await c.close()


@run(60)
async def test_commit_marker_without_a_portal_is_not_served(tmp_path: Path) -> None:
    """A resume-sent marker that names no destination portal: restarted,
    A neither serves the device nor redirects it (no node), and keeps the
    marker for the operator; the log says so."""
    c = Cluster(tmp_path)
    await c.start()
    try:
        state = tmp_path / "hosta"
        (state / "vm1.migration.json").write_text(json.dumps(
            {"version": 1, "id": "0123456789ab", "device": "vm1", "to": "hostb@127.0.0.3:1",
             "phase": "resume-sent", "pr": {}, "frontend": None}))
        a = await _restart_a(c)
        assert "vm1" not in a.devices and a.target.node(frontend_iqn(c.config)) is None
        assert c.entries_of(HOST_A) == []
        assert (state / "vm1.migration.json").exists()
    finally:
        await c.close()


@run(60)
async def test_an_interrupted_register_and_move_is_settled_without_a_preempt(tmp_path: Path) -> None:
    """A killed with the guest held in a REGISTER AND MOVE plan (marker
    phase ``held`` naming the moved guest; the observer host shares the
    key). Restarted, A settles it by registering again and RESERVE, never
    by PREEMPT: the observer's registration is still there and A holds."""
    from prmigrate.migration.service import MigrationService

    from .test_service import OBSERVER, observer_register

    c = Cluster(tmp_path)
    await c.start()
    try:
        await _setup_pr(await c.connect_guest(), WE)
        observer_register(c, 0, KEY)
        pr = c.services["hosta"].snapshot(c.daemons["hosta"].devices["vm1"]).pr.to_dict()
        state = tmp_path / "hosta"
        old = c.daemons["hosta"]
        await c.services["hosta"].close()
        await old.close()
        (state / "vm1.migration.json").write_text(json.dumps(
            {"version": 1, "id": "0123456789ab", "device": "vm1", "to": "hostb@127.0.0.3:1",
             "phase": "held", "pr": pr, "move": [GUEST]}))
        a = HostDaemon(dataclasses.replace(old.config, listen=[old.listening[0][:2]]))
        service = MigrationService(a, SECRET)
        assert service.recover_interrupted() == ["vm1"]
        await a.start()
        c.daemons["hosta"] = a
        for _ in range(200):
            if not (state / "vm1.migration.json").exists():
                break
            await asyncio.sleep(0.05)
        assert not (state / "vm1.migration.json").exists()
        (e,) = c.entries_of(HOST_A)
        assert e.key == KEY and e.holder and int(e.rtype) == WE
        assert [x.key for x in c.full_status().entries if x.transport_id.name.lower() == OBSERVER.initiator] == [KEY]
        await service.close()
    finally:
        await c.close()
