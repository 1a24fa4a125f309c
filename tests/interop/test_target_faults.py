"""``prmigrate target`` with its APTPL state directory full, then read-only.

A small tmpfs mounted by the test is the target's ``--state-dir``. While it is
full (a filler file takes the rest of it) or remounted read-only, REGISTER
with APTPL and RESERVE end with CHECK CONDITION, NOT READY, LOGICAL UNIT
COMMUNICATION FAILURE, and an independent client (``prmigrate pr`` in its own
process, its own session) sees READ KEYS, READ RESERVATION and READ FULL
STATUS unchanged, PRgeneration included; once the space (or write access)
is back the same commands succeed. Needs root (mount); CI runs as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import TargetProcess, start_target, stop

INIT_A = "iqn.2026-11.org.prmigrate:faults-a"
INIT_B = "iqn.2026-11.org.prmigrate:faults-b"
OBSERVER = "iqn.2026-11.org.prmigrate:faults-observer"
KEY_A, KEY_B = 0xA1A1, 0xB2B2
pytestmark = pytest.mark.interop
EXIT_NOT_READY = 2


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pr(t: TargetProcess, initiator: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prmigrate.cli", "pr", t.url(0), "--initiator", initiator, "--json", *args],
        capture_output=True, text=True, timeout=60, env=_env(),
    )


def observe(t: TargetProcess) -> dict[str, Any]:
    """READ KEYS, READ RESERVATION and READ FULL STATUS from a third initiator."""
    seen = {}
    for flag in ("--read-keys", "--read-reservation", "--read-full-status"):
        p = pr(t, OBSERVER, flag)
        assert p.returncode == 0, p.stdout + p.stderr
        seen[flag] = json.loads(p.stdout)
    return seen


def fails_not_ready(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == EXIT_NOT_READY, p.stdout + p.stderr
    info = json.loads(p.stdout)
    assert (info["sense_key"], info["asc"], info["ascq"]) == (2, 0x08, 0x00), info


def ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "prstate"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)], check=True,
                   timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def fill(directory: Path) -> Path:
    """Take every free block of the file system of ``directory``."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_then_read_only_state_dir_changes_nothing(tmp_path: Path, small_state_dir: Path) -> None:
    # the images live outside the small tmpfs; only the PR state is on it
    t = start_target(tmp_path, size="16M", extra=["--state-dir", str(small_state_dir)])
    try:
        ok(pr(t, INIT_A, "--register", "--sa-key", f"{KEY_A:x}", "--aptpl"))
        state_file = small_state_dir / "lun0-pr.json"
        assert state_file.exists()
        before = observe(t)
        saved = state_file.read_bytes()

        # 1. the file system is full
        filler = fill(small_state_dir)
        fails_not_ready(pr(t, INIT_B, "--register", "--sa-key", f"{KEY_B:x}", "--aptpl"))
        fails_not_ready(pr(t, INIT_A, "--reserve", "--key", f"{KEY_A:x}", "--type", "WE"))
        assert observe(t) == before
        assert state_file.read_bytes() == saved
        assert sorted(p.name for p in small_state_dir.iterdir()) == ["daemon.lock", "filler", "lun0-pr.json"]

        # space is back: the same commands work
        filler.unlink()
        ok(pr(t, INIT_B, "--register", "--sa-key", f"{KEY_B:x}", "--aptpl"))
        ok(pr(t, INIT_A, "--reserve", "--key", f"{KEY_A:x}", "--type", "WE"))
        after = observe(t)
        assert after["--read-keys"]["keys"] == [f"0x{KEY_A:x}", f"0x{KEY_B:x}"], after
        assert after["--read-reservation"]["reservation"]["type_name"] == "Write Exclusive", after
        assert after["--read-keys"]["generation"] == before["--read-keys"]["generation"] + 1

        # 2. the file system is read-only
        subprocess.run(["mount", "-o", "remount,ro", str(small_state_dir)], check=True, timeout=30)
        before = after
        fails_not_ready(pr(t, INIT_A, "--release", "--key", f"{KEY_A:x}", "--type", "WE"))
        fails_not_ready(pr(t, INIT_B, "--register", "--key", f"{KEY_B:x}", "--sa-key", "0", "--aptpl"))
        fails_not_ready(pr(t, INIT_B, "--preempt", "--key", f"{KEY_B:x}", "--sa-key", f"{KEY_A:x}",
                           "--type", "EA"))
        assert observe(t) == before

        subprocess.run(["mount", "-o", "remount,rw", str(small_state_dir)], check=True, timeout=30)
        ok(pr(t, INIT_A, "--release", "--key", f"{KEY_A:x}", "--type", "WE"))
        ok(pr(t, INIT_A, "--reserve", "--key", f"{KEY_A:x}", "--type", "EA"))
        assert observe(t)["--read-reservation"]["reservation"]["type_name"] == "Exclusive Access"
    finally:
        stop(t.proc)
    log = t.log
    failures = [line for line in log.splitlines() if "not applied" in line]
    assert len(failures) == 5, log  # one line per refused command
    assert "Traceback" not in log, log
