"""Verification decisions (``device/verify.py``): the schedule, without I/O."""

from __future__ import annotations

from prmigrate.device.verify import (
    VERIFY_RETRY_FIRST,
    VERIFY_RETRY_MAX,
    Verification,
    VerifySchedule,
)


def test_wishes_while_one_runs_coalesce_into_one_more() -> None:
    s = VerifySchedule(Verification())
    assert s.want("a") is True  # the shell starts running them
    assert s.next() == "a"
    assert s.want("b") is False and s.want("c") is False  # running: coalesced
    assert s.next() == "c"  # one more, with the last reason
    assert s.next() is None and not s.running  # none wanted: stop
    assert s.want("d") is True


def test_a_failure_arms_one_backing_off_retry() -> None:
    s = VerifySchedule(Verification())
    assert s.failed() == VERIFY_RETRY_FIRST
    assert s.failed() is None  # armed already
    s.due()
    assert s.failed() == VERIFY_RETRY_FIRST * 2
    assert s.succeeded() is True  # a retry was armed: its timer now does nothing
    assert s.succeeded() is False
    delays = []
    for _ in range(10):
        delays.append(s.failed())
        s.due()
    assert max(d for d in delays if d is not None) == VERIFY_RETRY_MAX


def test_no_retry_timer_when_another_verification_is_wanted() -> None:
    s = VerifySchedule(Verification())
    s.want("a")
    s.next()
    s.want("b")  # wanted while "a" ran and failed
    assert s.failed(coalescing=True) is None
    assert s.next() == "b"
    assert s.failed(coalescing=True) == VERIFY_RETRY_FIRST


def test_a_timer_for_a_retry_no_longer_armed_does_nothing() -> None:
    """The shell never cancels a retry timer: ``due`` tells a stale one."""
    s = VerifySchedule(Verification())
    assert s.failed(now=10.0) == VERIFY_RETRY_FIRST
    first = s.retry_at
    assert first == 10.0 + VERIFY_RETRY_FIRST
    assert s.succeeded() is True and s.retry_at is None
    assert s.due(first) is False  # a verification succeeded meanwhile
    s.failed(now=20.0)
    second = s.retry_at
    assert second is not None and second != first
    assert s.due(first) is False and s.retry_at == second  # another retry is armed
    assert s.due(second) is True and s.retry_at is None
    s.failed(now=30.0)
    s.stop()  # the device closed
    assert s.retry_at is None and s.due(30.0 + VERIFY_RETRY_FIRST) is False
