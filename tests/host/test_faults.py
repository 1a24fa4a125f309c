"""The host daemon's small fault cases, in-process: a backend LUN that does
not exist, a move record that cannot be written, the event log's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from prmigrate.device.passthrough import DeviceError
from prmigrate.host.control import CommandError
from prmigrate.host.eventlog import EventLog, read_events

from .test_daemon import VM1, World, run


@run
async def test_a_backend_lun_that_does_not_exist_is_refused(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    with pytest.raises(DeviceError, match="has no logical unit 7"):
        await w.start(VM1.replace("/0,", "/7,"))
    assert " x 512 bytes" not in caplog.text
    await w.daemon.close()
    await w.backend.close()


@run
async def test_a_move_listed_at_once_and_an_unwritable_record_kept(tmp_path: Path) -> None:
    w = World(tmp_path)
    d = await w.start(VM1)
    try:
        # (vm5: a device the migration service already forgot here)
        assert d.record_moved("vm5", "iqn.2026-11.org.prmigrate:vm5", "127.0.0.9", 3299, 1) is None
        host = d._cmd_query_host({})
        assert host["moved"] == {"vm5": "127.0.0.9:3299"} and host["moved-unrecorded"] == {}
        with pytest.raises(CommandError, match=r"moved to 127\.0\.0\.9:3299"):
            d.get_device("vm5")
        with pytest.raises(CommandError, match="not found"):
            d.get_device("vm9")
        # the state directory stops working (a directory where the record goes)
        (tmp_path / "state" / "vm2.moved.json").mkdir()
        why = d.record_moved("vm2", "iqn.2026-11.org.prmigrate:vm2", "127.0.0.9", 3300, 1)
        assert why is not None
        host = d._cmd_query_host({})
        assert "vm2" in host["moved"] and "vm2" in host["moved-unrecorded"], host
        from prmigrate.commands.host import format_status

        text = format_status([], host["moved"], host["moved-unrecorded"])
        assert "vm2: moved to 127.0.0.9:3300" in text and "MOVE NOT RECORDED" in text
        # it works again: the retry writes it
        (tmp_path / "state" / "vm2.moved.json").rmdir()
        d._retry_moved()
        assert (tmp_path / "state" / "vm2.moved.json").exists()
        assert d._cmd_query_host({})["moved-unrecorded"] == {}
    finally:
        await w.close()


def test_event_log_is_private(tmp_path: Path) -> None:
    new = tmp_path / "new.jsonl"
    log = EventLog(new)
    log({"event": "X", "data": {"key": "0x1"}})
    log.close()
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o600
    assert read_events(new) == [{"event": "X", "data": {"key": "0x1"}}]
    old = tmp_path / "old.jsonl"
    old.write_text('{"event": "OLD"}\n')
    os.chmod(old, 0o644)
    log = EventLog(old)
    log({"event": "NEW"})
    log.close()
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
    assert [e["event"] for e in read_events(old)] == ["OLD", "NEW"]


def test_migrate_exit_status_when_the_move_is_not_recorded() -> None:
    from prmigrate.commands.migrate import EXIT_DOUBT, EXIT_OK, exit_code

    assert exit_code({"success": True, "unrecorded": None}) == EXIT_OK
    assert exit_code({"success": True, "unrecorded": "cannot write x: read-only"}) == EXIT_DOUBT != EXIT_OK
