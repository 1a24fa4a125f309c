"""A batch of moves: the gate's order (batch.py) and the gated source
machine's READY state (source.py)."""

from __future__ import annotations

import pytest

from prmigrate.migration.batch import BatchGate
from prmigrate.migration.channel import Abort, SetupOk
from prmigrate.migration.machine import (
    AwaitGo,
    Cancel,
    ChannelLost,
    ChannelUp,
    Finished,
    Go,
    HoldGuest,
    ResumeGuest,
    SendMessage,
    Start,
    Timeouts,
)
from prmigrate.migration.source import SOURCE_TABLE, SourceMigration, SourceState

from .test_machines import holder_state, snap

SS = SourceState


def test_setups_are_bounded_and_pauses_wait_for_every_setup() -> None:
    gate = BatchGate([f"d{i}" for i in range(5)], setup_parallel=2, pause_parallel=1)
    assert gate.to_start() == ["d0", "d1"]
    assert gate.to_start() == []  # two setting up already
    gate.ready("d0")
    assert gate.to_go() == []  # d1 still sets up, d2..d4 not started
    assert gate.to_start() == ["d2"]
    for name in ("d1", "d2"):
        gate.ready(name)
    assert gate.to_start() == ["d3", "d4"]
    gate.done("d3")  # refused in setup: frees its slot, never pauses
    assert gate.to_go() == []
    gate.ready("d4")
    assert gate.to_go() == ["d0"]
    assert gate.to_go() == []  # one pause at a time
    gate.done("d0")
    assert gate.to_go() == ["d1"]
    gate.done("d1")
    assert gate.to_go() == ["d2"]
    gate.done("d2")
    assert gate.to_go() == ["d4"]
    assert not gate.finished
    gate.done("d4")
    assert gate.finished and gate.to_go() == [] and gate.to_start() == []


def test_pauses_in_parallel_when_asked() -> None:
    gate = BatchGate(["a", "b", "c"], setup_parallel=3, pause_parallel=2)
    gate.to_start()
    for name in "abc":
        gate.ready(name)
    assert gate.to_go() == ["a", "b"]
    gate.done("b")
    assert gate.to_go() == ["c"]


def test_a_move_cancelled_before_it_started_is_done() -> None:
    gate = BatchGate(["a", "b"], setup_parallel=1)
    assert gate.to_start() == ["a"]
    gate.done("b")
    gate.ready("a")
    assert gate.to_go() == ["a"]


def test_stage_order_is_enforced() -> None:
    gate = BatchGate(["a"])
    with pytest.raises(ValueError):
        gate.paused("a")  # WAITING -> PAUSING skips setup
    gate.to_start()
    gate.done("a")
    with pytest.raises(ValueError):
        gate.ready("a")  # nothing after DONE
    with pytest.raises(ValueError):
        BatchGate(["a"], pause_parallel=0)


def _ready(timeouts: Timeouts | None = None) -> tuple[SourceMigration, list[object]]:
    src = SourceMigration("m", snap(holder_state()), timeouts, gated=True)
    src.handle(Start(), 1.0)
    src.handle(ChannelUp(), 1.1)
    acts = src.handle(SetupOk({"g1": 0x1111}, True), 1.2)
    return src, acts


def test_a_gated_move_waits_in_ready_with_the_guest_running() -> None:
    src, acts = _ready()
    assert src.state is SS.READY and src.serving
    assert any(isinstance(a, AwaitGo) for a in acts)
    assert not any(isinstance(a, HoldGuest) for a in acts)
    assert src.timings.paused is None
    acts = src.handle(Go(), 5.0)
    assert src.state is SS.STOPPING and not src.serving
    assert any(isinstance(a, HoldGuest) for a in acts)
    assert src.timings.paused == 5.0  # the pause starts at Go, not at SETUP_OK


@pytest.mark.parametrize("event", [ChannelLost("cut"), Cancel()], ids=["lost", "cancel"])
def test_a_failure_in_ready_rolls_back_without_a_pause(event: object) -> None:
    src, _ = _ready()
    acts = src.handle(event, 2.0)  # type: ignore[arg-type]
    assert src.state is SS.ROLLED_BACK
    assert not any(isinstance(a, ResumeGuest) for a in acts)  # never held
    assert any(isinstance(a, Finished) for a in acts)
    sent = [a.message for a in acts if isinstance(a, SendMessage)]
    assert all(isinstance(m, Abort) for m in sent)
    assert (len(sent) == 1) is isinstance(event, Cancel)  # told the destination unless it is gone


def test_ready_times_out() -> None:
    src, _ = _ready(Timeouts(ready=7))
    assert src.get_timer() == pytest.approx(8.2)
    src.handle_timer(8.2)
    assert src.state is SS.ROLLED_BACK


def test_an_ungated_move_never_enters_ready() -> None:
    src = SourceMigration("m", snap(holder_state()))
    src.handle(Start(), 1.0)
    src.handle(ChannelUp(), 1.1)
    acts = src.handle(SetupOk({"g1": 0x1111}, True), 1.2)
    assert src.state is SS.STOPPING and any(isinstance(a, HoldGuest) for a in acts)
    assert (SS.READY, Go) in SOURCE_TABLE
