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
The file holds reservation keys: it is created with mode 0600 and an
existing one is tightened to 0600 when opened. A write that fails (a full
or read-only disk) loses that event and is logged once, until one works
again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

DEFAULT_NAME = "events.jsonl"
MODE = 0o600  # reservation keys: the owner only


class EventLog:
    """A daemon listener appending each event as one JSON line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = self._open()
        self._failing: str | None = None  # the error while writes fail

    def _open(self) -> IO[bytes]:
        """The path for appending, mode 0600 (created so, or tightened)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, MODE)
        try:
            if os.stat(fd).st_mode & 0o777 != MODE:
                os.fchmod(fd, MODE)  # an older file, created 0644
        except OSError as exc:
            log.warning("event log %s: cannot set mode %o: %s", self.path, MODE, exc)
        # unbuffered bytes: a failed write leaves nothing behind to retry
        return os.fdopen(fd, "ab", buffering=0)

    def __call__(self, message: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            line = (json.dumps(message, default=str, separators=(",", ":")) + "\n").encode("utf-8")
            self._file.write(line)
        except (OSError, ValueError) as exc:
            if self._failing is None:
                log.error("event log %s: %s (events are lost until a write works again)", self.path, exc)
            self._failing = str(exc)
            return
        if self._failing is not None:
            log.info("event log %s: writing again", self.path)
            self._failing = None

    def reopen(self) -> None:
        """Open the path again (SIGHUP, after logrotate moved the file)."""
        try:
            new = self._open()
        except OSError as exc:
            log.error("event log %s: cannot reopen: %s", self.path, exc)
            return
        self.close()
        self._file = new

    def close(self) -> None:
        if self._file is not None:
            try:
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
