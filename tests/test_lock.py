"""The daemon lock: one holder, a refusal naming its pid, released on
close and when the holder dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prmigrate.lock import DaemonLock, DaemonLocks, LockError, socket_lock_path


def test_second_holder_is_refused_with_the_pid(tmp_path: Path) -> None:
    a = DaemonLock(tmp_path / "x.lock", "state directory X")
    a.acquire()
    assert (tmp_path / "x.lock").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "x.lock").stat().st_mode & 0o777 == 0o600
    with pytest.raises(LockError) as e:
        DaemonLock(tmp_path / "x.lock", "state directory X").acquire()
    assert str(e.value).startswith(f"state directory X is in use by a running daemon (pid {os.getpid()};")
    a.release()
    b = DaemonLock(tmp_path / "x.lock")
    b.acquire()
    b.release()


def test_locks_taken_together_are_released_together_on_a_refusal(tmp_path: Path) -> None:
    held = DaemonLock(socket_lock_path(tmp_path / "ctl.sock"))
    held.acquire()
    both = DaemonLocks(tmp_path / "state", tmp_path / "ctl.sock")
    with pytest.raises(LockError):
        both.acquire()
    # the state directory's lock was given back
    alone = DaemonLocks(tmp_path / "state")
    alone.acquire()
    alone.release()
    held.release()


def test_the_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    path = tmp_path / "daemon.lock"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from prmigrate.lock import DaemonLock; "
            "DaemonLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    src = str(Path(__file__).resolve().parent.parent / "src")
    p = subprocess.Popen([sys.executable, "-c", code, str(path), src], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"held\n"
        with pytest.raises(LockError) as e:
            DaemonLock(path).acquire()
        assert f"pid {p.pid}" in str(e.value)
    finally:
        p.kill()
        p.wait(10)
    deadline = time.monotonic() + 5
    lock = DaemonLock(path)
    while True:
        try:
            lock.acquire()
            break
        except LockError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    lock.release()
