"""Helpers for interop tests: run ``prmigrate target`` on a free loopback port.

Every process started here is bounded in time and stopped at the end of the
test (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IQN = "iqn.2026-11.org.prmigrate:shared"
INITIATOR1 = "iqn.2026-11.org.prmigrate:test-i1"
INITIATOR2 = "iqn.2026-11.org.prmigrate:test-i2"


def free_loopback_port() -> tuple[str, int]:
    """A host in 127.0.0.2-254 and a port free on it right now."""
    host = f"127.0.0.{random.randint(2, 254)}"
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class TargetProcess:
    host: str
    port: int
    iqn: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def url(self, lun: int = 0, user: str | None = None, secret: str | None = None) -> str:
        cred = f"{user}%{secret}@" if user else ""
        return f"iscsi://{cred}{self.host}:{self.port}/{self.iqn}/{lun}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_target(
    workdir: Path, *, size: str = "256M", luns: int = 1, extra: list[str] | None = None, iqn: str = IQN,
    uvloop: bool = False,
) -> TargetProcess:
    host, port = free_loopback_port()
    args = [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{host}:{port}", "--iqn", iqn,
            "--size", size, "--state-dir", str(workdir / "prstate")]
    for n in range(luns):
        args += ["--lun", f"{n}={workdir / f'lun{n}.img'}"]
    if uvloop:
        args.append("--uvloop")
    args += extra or []
    log_path = workdir / f"target-{port}.log"
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env)
    try:
        wait_listening(host, port, proc)
    except Exception:
        stop(proc)
        raise
    return TargetProcess(host, port, iqn, proc, log_path)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[TargetProcess]:
    t = start_target(tmp_path)
    try:
        yield t
    finally:
        stop(t.proc)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
