"""Atomic JSON state files for APTPL persistent reservations (SPC-5 5.14.5).

``save`` writes a temporary file in the same directory, fsyncs it, renames it
over the target and fsyncs the directory, so a power loss leaves either the old
or the new state, never a torn one. ``remove`` unlinks and fsyncs the directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class PersistError(Exception):
    """A state file exists but cannot be read or parsed."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``state`` as JSON."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.tmp.{os.getpid()}"
    data = json.dumps(state, sort_keys=True, indent=1).encode("utf-8") + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(directory)


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
    _fsync_dir(path.parent)
