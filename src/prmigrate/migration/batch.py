"""Many devices of one host moved as one batch: when each move may set up
and when its guest may pause (sans-IO; the service's ``migrate_batch`` is
the shell).

Each device still moves over its own channel with its own source machine
(``source.py``, started ``gated``): a channel carries one migration, and
the moves stay independent (one failing rolls back alone). What the batch
adds is an order, so that the work of many moves stays out of every
guest's pause:

1. Setup: up to ``setup_parallel`` moves connect, authenticate and set up
   at once (the destination creates the device, logs in to the backend,
   registers the guests' keys); each waits in READY, its guest running.
2. Pauses: only once no move of the batch is still setting up (nothing
   else of the batch runs on either host's loop), the READY moves pause,
   ``pause_parallel`` at a time; the next one starts when a pause ends
   (the guest served by the destination, or back on the source).

A move that ends early (refused, rolled back in setup) frees its slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

SETUP_PARALLEL = 16  # moves setting up at once
PAUSE_PARALLEL = 1  # guests paused at once


class Stage(Enum):
    WAITING = "waiting"  # not started
    SETTING_UP = "setting-up"  # connecting, setting up
    READY = "ready"  # set up, guest running, waiting for its pause
    PAUSING = "pausing"  # guest held, state moving
    DONE = "done"  # pause over, or the move ended


# stage -> the stages a move may go to from it
MOVES: dict[Stage, frozenset[Stage]] = {
    Stage.WAITING: frozenset({Stage.SETTING_UP, Stage.DONE}),
    Stage.SETTING_UP: frozenset({Stage.READY, Stage.DONE}),
    Stage.READY: frozenset({Stage.PAUSING, Stage.DONE}),
    Stage.PAUSING: frozenset({Stage.DONE}),
    Stage.DONE: frozenset(),
}


class BatchGate:
    """The order of one batch's moves, named by device."""

    def __init__(self, names: Iterable[str], setup_parallel: int = SETUP_PARALLEL,
                 pause_parallel: int = PAUSE_PARALLEL) -> None:
        if setup_parallel < 1 or pause_parallel < 1:
            raise ValueError("setup_parallel and pause_parallel must be at least 1")
        self.stages: dict[str, Stage] = dict.fromkeys(names, Stage.WAITING)
        self.setup_parallel = setup_parallel
        self.pause_parallel = pause_parallel

    def _count(self, stage: Stage) -> int:
        return sum(1 for s in self.stages.values() if s is stage)

    def _set(self, name: str, stage: Stage) -> None:
        old = self.stages[name]
        if stage is old:
            return
        if stage not in MOVES[old]:
            raise ValueError(f"move of {name}: {old.value} -> {stage.value} is not allowed")
        self.stages[name] = stage

    # -- what the shell reports
    def ready(self, name: str) -> None:
        """The move is set up and waits for its pause."""
        self._set(name, Stage.READY)

    def paused(self, name: str) -> None:
        """The move's pause has begun (it left READY)."""
        self._set(name, Stage.PAUSING)

    def done(self, name: str) -> None:
        """The move's pause is over, or the move ended (whatever the outcome)."""
        self._set(name, Stage.DONE)

    # -- what the shell does next
    def to_start(self) -> list[str]:
        """Moves to start setting up now (marked SETTING_UP)."""
        room = self.setup_parallel - self._count(Stage.SETTING_UP)
        out = [n for n, s in self.stages.items() if s is Stage.WAITING][:max(room, 0)]
        for n in out:
            self._set(n, Stage.SETTING_UP)
        return out

    def to_go(self) -> list[str]:
        """Moves whose pause may begin now (marked PAUSING): none while any
        move of the batch still has setup work to do."""
        if self._count(Stage.WAITING) or self._count(Stage.SETTING_UP):
            return []
        room = self.pause_parallel - self._count(Stage.PAUSING)
        out = [n for n, s in self.stages.items() if s is Stage.READY][:max(room, 0)]
        for n in out:
            self._set(n, Stage.PAUSING)
        return out

    @property
    def finished(self) -> bool:
        return all(s is Stage.DONE for s in self.stages.values())
