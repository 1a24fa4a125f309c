"""One daemon per state directory and control socket: ``flock`` on a lock file.

``DaemonLock(path).acquire()`` opens (creating, mode 0600) the lock file and
takes an exclusive, non-blocking ``fcntl.flock`` on it, then writes the
holder's pid into it. A second daemon is refused with ``LockError`` naming
the pid the file holds. The kernel drops the lock when its holder dies, even
by SIGKILL, so a daemon that died leaves nothing that blocks the next one:
its socket file is then taken over (unlinked and bound again) by whoever
holds the lock. Lock files are never unlinked: removing one while another
process waits on it would let two daemons believe they hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class LockError(Exception):
    """Another live process holds the lock."""


class DaemonLock:
    def __init__(self, path: str | Path, what: str = "") -> None:
        self.path = Path(path)
        self.what = what or str(self.path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The descriptor that holds the lock is read-only (flock needs no
        # write access): a daemon whose state directory is remounted
        # read-only under it must not make the remount fail as busy. The pid
        # is written through a second, short-lived descriptor.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"pid {pid}" if pid else "another process"
            raise LockError(f"{self.what} is in use by a running daemon ({holder}; lock {self.path})") from None
        except OSError:
            os.close(fd)
            raise
        _write_pid(self.path, f"{os.getpid()}\n")
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        _write_pid(self.path, "")
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None


def _write_pid(path: Path, text: str) -> None:
    """The lock file's content: the holder's pid, or nothing once released.
    The lock is what matters; the pid is only for the refusal's message, so
    a file that cannot be written (read-only, full) is left as it is."""
    with contextlib.suppress(OSError):
        wfd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(wfd, 0)
            os.pwrite(wfd, text.encode(), 0)
        finally:
            os.close(wfd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def socket_lock_path(socket_path: str | Path) -> Path:
    """The lock file guarding a Unix socket path: ``PATH.lock`` beside it."""
    p = Path(socket_path)
    return p.with_name(p.name + ".lock")


def state_lock_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "daemon.lock"


class DaemonLocks:
    """The locks of one daemon, taken together and released together."""

    def __init__(self, state_dir: str | Path | None = None, control: str | Path | None = None) -> None:
        self.locks: list[DaemonLock] = []
        if state_dir is not None:
            self.locks.append(DaemonLock(state_lock_path(state_dir), f"state directory {state_dir}"))
        if control is not None:
            self.locks.append(DaemonLock(socket_lock_path(control), f"control socket {control}"))

    def acquire(self) -> None:
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
