"""The event log reopened on SIGHUP: after logrotate renamed it, the next
events go to a new file at the same path; the old file keeps what it had."""

from __future__ import annotations

from pathlib import Path

from prmigrate.host.eventlog import EventLog, read_events


def test_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log({"event": "A"})
    path.rename(tmp_path / "events.jsonl.1")
    log({"event": "B"})  # still the renamed file
    log.reopen()
    log({"event": "C"})
    log.close()
    assert [e["event"] for e in read_events(tmp_path / "events.jsonl.1")] == ["A", "B"]
    assert [e["event"] for e in read_events(path)] == ["C"]


def test_reopen_that_fails_keeps_the_open_file(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    log = EventLog(path)
    path.rename(tmp_path / "moved.jsonl")
    path.parent.rmdir()
    path.parent.write_text("not a directory")  # the path cannot be opened again
    log.reopen()
    log({"event": "D"})
    log.close()
    assert [e["event"] for e in read_events(tmp_path / "moved.jsonl")] == ["D"]
