"""File-backed block store: the only backend operations a logical unit needs.

read / write / flush / unmap / write_same / is_mapped over one image file.
Offsets and lengths are in bytes; the logical unit converts LBAs. Reads use
``os.pread`` (one copy, into the returned bytes). Unmap punches a hole
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``) so unmapped blocks read back as zeros
(LBPRZ), falling back to writing zeros where the filesystem cannot punch.
Mapping status comes from ``SEEK_DATA`` / ``SEEK_HOLE``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = None
_fallocate: Any = None
try:  # pragma: no branch
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _fallocate = None

_ZERO_CHUNK = bytes(1 << 20)


class BlockStore:
    """A fixed-size image file. Not thread-safe; the LU serialises access."""

    def __init__(self, path: Path | str, size_bytes: int | None = None) -> None:
        self.path = Path(path)
        exists = self.path.exists()
        if not exists and size_bytes is None:
            raise FileNotFoundError(f"{self.path}: no image and no size given")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if not exists or (size_bytes is not None and os.fstat(self.fd).st_size < size_bytes):
            os.ftruncate(self.fd, size_bytes or 0)
        self.size = os.fstat(self.fd).st_size
        self.punch_supported = _fallocate is not None
        self.seek_supported = hasattr(os, "SEEK_DATA")

    # -- data path ---------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # never past EOF for in-range I/O, but be exact
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def write_atomic(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """One ``pwrite`` of the whole range, never a loop of partial writes
        (WRITE ATOMIC, SBC-4 4.29). The LU runs on one thread, so no other
        command reads or writes between its first and last byte. A short
        write (the file system out of space mid-range) is an error, never
        retried: the caller sees it fail. Crash atomicity is the file
        system's: a host crash mid-write may leave part of the range new."""
        n = os.pwrite(self.fd, data, offset)
        if n != memoryview(data).nbytes:
            raise OSError(errno.EIO, f"short atomic write: {n} of {memoryview(data).nbytes} bytes at {offset}")

    def flush(self, offset: int = 0, length: int = 0) -> None:
        """Make the range (or everything) durable. The range is advisory."""
        os.fdatasync(self.fd)

    def write_zeros(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZERO_CHUNK))
            self.write(offset, memoryview(_ZERO_CHUNK)[:n])
            offset += n
            length -= n

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeros afterwards."""
        if length <= 0:
            return
        if self.punch_supported and _fallocate is not None:
            rc = _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if rc == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err))
            self.punch_supported = False
        self.write_zeros(offset, length)

    def write_same(self, offset: int, block: bytes | memoryview, count: int) -> None:
        """Write ``block`` ``count`` times from ``offset``, in large chunks."""
        bs = len(block)
        if count <= 0 or bs == 0:
            return
        per = max(1, min(count, (1 << 20) // bs))
        chunk = bytes(block) * per
        while count > 0:
            n = min(count, per)
            self.write(offset, memoryview(chunk)[: n * bs])
            offset += n * bs
            count -= n

    def is_mapped(self, offset: int, length: int) -> tuple[bool, int]:
        """Return (mapped, run): whether ``offset`` is in data, and how many
        bytes from ``offset`` (at most ``length``) share that state."""
        end = min(offset + length, self.size)
        if offset >= end:
            return True, 0
        if not self.seek_supported:
            return True, end - offset
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: hole to the end
                return False, end - offset
            raise
        if data > offset:
            return False, min(data, end) - offset
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return True, min(hole, end) - offset

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
