"""The host daemon's structured event log: one JSON object per line.

``prmigrate host`` writes it to ``--event-log PATH`` or, with a state
directory, ``<state-dir>/events.jsonl``. Every event the daemon emits is one
line (the same message control subscribers get: ``event``, ``timestamp``,
``data``): ``PR_STATE_CHANGED`` (guest, reason, state after),
``PR_RECONCILED`` (reason, method, changes, what the method could not tell),
``MIGRATION`` (every phase; the last one carries the phase timings),
``DEVICE_ADDED``/``DEVICE_REMOVED``, ``SHUTDOWN``.

Lines are appended and flushed one by one, so a crashed daemon leaves every
event it emitted before the crash (up to the OS); a line is never split.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

DEFAULT_NAME = "events.jsonl"


class EventLog:
    """A daemon listener appending each event as one JSON line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, message: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(message, default=str, separators=(",", ":")) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.error("event log %s: %s", self.path, exc)

    def reopen(self) -> None:
        """Open the path again (SIGHUP, after logrotate moved the file)."""
        try:
            new = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            log.error("event log %s: cannot reopen: %s", self.path, exc)
            return
        self.close()
        self._file = new

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of an event log (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
