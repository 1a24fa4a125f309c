from __future__ import annotations

import os
from pathlib import Path

import pytest

from prmigrate.lun.store import BlockStore

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    s = BlockStore(tmp_path / "img", 4 * MiB)
    yield s
    s.close()


def test_created_with_size_and_sparse(tmp_path: Path, store: BlockStore) -> None:
    assert store.size == 4 * MiB
    assert os.path.getsize(tmp_path / "img") == 4 * MiB
    assert store.read(0, 4096) == bytes(4096)
    assert store.is_mapped(0, 4 * MiB) == (False, 4 * MiB)


def test_missing_image_without_size(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        BlockStore(tmp_path / "nope")


def test_existing_image_keeps_content(tmp_path: Path) -> None:
    s = BlockStore(tmp_path / "img", MiB)
    s.write(512, b"abc")
    s.close()
    s = BlockStore(tmp_path / "img", None)
    assert s.size == MiB and s.read(512, 3) == b"abc"
    s.close()


def test_write_read_flush(store: BlockStore) -> None:
    store.write(8192, memoryview(b"x" * 1000))
    store.flush(8192, 1000)
    assert store.read(8192, 1000) == b"x" * 1000
    mapped, run = store.is_mapped(8192, MiB)
    assert mapped and run >= 1000


def test_unmap_punches_and_reads_zero(store: BlockStore) -> None:
    store.write(0, b"\xff" * 65536)
    store.unmap(4096, 8192)
    assert store.read(4096, 8192) == bytes(8192)
    assert store.read(0, 4096) == b"\xff" * 4096
    assert store.read(12288, 4096) == b"\xff" * 4096
    if store.punch_supported:
        assert store.is_mapped(4096, 8192) == (False, 8192)
        assert store.is_mapped(0, 65536) == (True, 4096)


def test_unmap_unaligned_zeroes_partial(store: BlockStore) -> None:
    store.write(0, b"\xaa" * 8192)
    store.unmap(512, 1024)
    assert store.read(0, 2048) == b"\xaa" * 512 + bytes(1024) + b"\xaa" * 512
    assert store.size == 4 * MiB  # KEEP_SIZE


def test_unmap_fallback_writes_zeros(store: BlockStore) -> None:
    store.punch_supported = False
    store.write(0, b"\x11" * 4096)
    store.unmap(0, 4096)
    assert store.read(0, 4096) == bytes(4096)


def test_write_same(store: BlockStore) -> None:
    block = bytes(range(256)) * 2
    store.write_same(512, block, 3000)
    assert store.read(512, 512 * 3000) == block * 3000
    assert store.read(0, 512) == bytes(512)
    assert store.read(512 * 3001, 512) == bytes(512)


def test_write_atomic_is_one_pwrite(store: BlockStore, monkeypatch) -> None:
    import prmigrate.lun.store as store_mod

    calls = []
    real = os.pwrite

    def spy(fd, buf, off):
        calls.append((off, len(buf)))
        return real(fd, buf, off)

    monkeypatch.setattr(store_mod.os, "pwrite", spy)
    store.write_atomic(4096, memoryview(b"w" * 8192))
    assert calls == [(4096, 8192)]
    assert store.read(4096, 8192) == b"w" * 8192


def test_write_atomic_short_write_raises(store: BlockStore, monkeypatch) -> None:
    import prmigrate.lun.store as store_mod

    monkeypatch.setattr(store_mod.os, "pwrite", lambda fd, buf, off: len(buf) // 2)
    with pytest.raises(OSError):
        store.write_atomic(0, b"x" * 1024)
