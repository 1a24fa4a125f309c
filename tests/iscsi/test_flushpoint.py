"""flushpoint: what is deferred during a read event runs when it ends."""

from __future__ import annotations

import logging

import pytest

from prmigrate.iscsi import flushpoint


def test_outside_a_read_event_defer_is_call_soon() -> None:
    soon: list[object] = []
    flushpoint.defer(lambda: None, soon.append)
    assert len(soon) == 1


def test_deferred_during_an_event_runs_at_its_end_in_order() -> None:
    ran: list[str] = []
    soon: list[object] = []
    flushpoint.begin()
    flushpoint.defer(lambda: ran.append("a"), soon.append)
    flushpoint.begin()  # nested: the same event
    flushpoint.defer(lambda: ran.append("b"), soon.append)
    flushpoint.end()
    assert ran == []
    flushpoint.end()
    assert ran == ["a", "b"] and soon == []


def test_what_a_deferred_call_defers_runs_too() -> None:
    ran: list[str] = []
    flushpoint.begin()
    flushpoint.defer(lambda: flushpoint.defer(lambda: ran.append("later"), pytest.fail), pytest.fail)
    flushpoint.end()
    assert ran == ["later"]


def test_a_failing_call_is_logged_and_the_others_run(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []
    flushpoint.begin()
    flushpoint.defer(lambda: 1 / 0, pytest.fail)
    flushpoint.defer(lambda: ran.append("next"), pytest.fail)
    with caplog.at_level(logging.ERROR):
        flushpoint.end()
    assert ran == ["next"] and "deferred flush" in caplog.text
    soon: list[object] = []
    flushpoint.defer(lambda: None, soon.append)  # the event is over
    assert len(soon) == 1
