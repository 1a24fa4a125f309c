"""Atomic JSON state files for APTPL persistent reservations (SPC-5 5.14.5).

``save`` writes a temporary file in the same directory, fsyncs it, renames it
over the target and fsyncs the directory, so a power loss leaves either the old
or the new state, never a torn one. ``remove`` unlinks and fsyncs the directory.

A failure before the rename (or the unlink) leaves the old file as it was and
no temporary file behind; a failure of the directory's fsync after it raises
``NotDurable``: the new name is in place but may not survive a power loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class PersistError(Exception):
    """A state file exists but cannot be read or parsed."""


class NotDurable(OSError):
    """The file was replaced or removed, but the directory's fsync failed."""


def _fsync_dir_after_change(directory: Path) -> None:
    try:
        fsync_dir(directory)
    except OSError as e:
        raise NotDurable(e.errno, f"fsync of {directory} failed: {e.strerror}") from e


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` by ``data``: temp file in the same directory, fsync,
    rename over, fsync the directory (so the rename itself is durable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        # A full or failing file system: leave no partial temporary file
        # taking the space the next attempt needs.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir_after_change(path.parent)


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``state`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state, sort_keys=True, indent=1).encode("utf-8") + b"\n")


def load(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is no file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PersistError(f"cannot read {path}: {e}") from e
    try:
        state = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PersistError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(state, dict):
        raise PersistError(f"{path}: top level is not an object")
    return state


def remove(path: Path) -> None:
    """Delete the state file (if any) durably."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir_after_change(path.parent)
