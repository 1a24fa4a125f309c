"""The moved-device record of an outgoing migration in progress.

``<state-dir>/<device>.migration.json`` lets a source daemon killed in the
middle of a migration settle it when it starts again
(``MigrationService.recover_interrupted``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MigrationMarker:
    """``<state-dir>/<device>.migration.json``: an outgoing migration in
    progress, so that a source daemon killed in the middle can settle it
    when it starts again. Phases: ``setup`` (SETUP sent: the destination
    may register), ``held`` (the guest is held: the destination may
    preempt), ``resume-sent`` (the commit point is passed: the destination
    may serve the guest; the record carries ``frontend``, the destination's
    frontend portal, where a restarted source redirects the guest's logins
    instead of serving the device: ``HostDaemon._publish_committed``). A
    ``resume-sent`` marker is removed only once the ``moved`` record is
    written; one that cannot be written rolls the migration back before
    RESUME. Written atomically (temp file, rename); fsync only for the
    first write, outside the pause."""

    def __init__(self, state_dir: Path | None, device: str) -> None:
        self.path = None if state_dir is None else Path(state_dir) / f"{device}.migration.json"

    def write(self, record: dict[str, Any], fsync: bool = False) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # a read-only or failing state directory: one line, no crash
                log.warning("cannot remove %s: %s", self.path, e)

    @staticmethod
    def load(path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None
