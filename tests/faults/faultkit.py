"""Helpers of the fault tests: a target that can be killed and restarted on
the same portal, a guest that retries what real initiators retry, the
independent judges (``prmigrate pr`` processes, the LUN's image file) and a
small tmpfs for a host's state directory.

Built on ``tests/interop/migration_cluster.py`` (real processes, each
bounded and stopped at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prmigrate.device.identity import derive_isid
from prmigrate.iscsi.initiator import Session, connect, describe_result
from prmigrate.scsi.constants import SenseKey, Status
from prmigrate.scsi.pr import pr_out_params
from prmigrate.scsi.sense import SenseDecodeError, decode_sense

from ..interop.conftest import wait_listening
from ..interop.migration_cluster import GUEST, INITIATORS, SHARED, ProcCluster, env, spawn

KEY = 0x6775657374310001


def _write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big") + bytes([0])


# ------------------------------------------------------------------ target


def kill_target(c: ProcCluster) -> None:
    p = c.procs["target"]
    if p.alive():
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)


def restart_target(c: ProcCluster) -> None:
    """Start the target again on its portal, with its image and APTPL state."""
    old = c.procs["target"]
    assert not old.alive()
    args = [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{old.host}:{old.port}",
            "--iqn", SHARED, "--size", "64M", "--lun", f"0={c.workdir / 'lun0.img'}",
            "--state-dir", str(c.workdir / "target-state")]
    deadline = time.monotonic() + 20
    while True:  # the port may linger a moment after the kill
        p = spawn("target", args, c.workdir)
        p.host, p.port = old.host, old.port
        try:
            wait_listening(p.host, p.port, p.proc, timeout=10)
            break
        except Exception:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    c.procs["target"] = p


class EventLogAside(ProcCluster):
    """Hosts keep their event log beside, not in, the state directory: a
    file open for writing keeps ``mount -o remount,ro`` from working."""

    def _launch_host(self, name: str, args: list[str], addr: str, port: int, control: Path,
                     mport: int) -> Any:
        if "--event-log" not in args:
            args = [*args, "--event-log", str(self.workdir / f"{name}-events.jsonl")]
        return super()._launch_host(name, args, addr, port, control, mport)


@contextlib.contextmanager
def aside_cluster(workdir: Path):  # type: ignore[no-untyped-def]
    c = EventLogAside(workdir)
    c.start()
    try:
        yield c
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()


# ------------------------------------------------------------------ judges


def pr_tool(c: ProcCluster, *args: str) -> dict[str, Any]:
    """``prmigrate pr ... --json`` on the target, as a separate process."""
    out = subprocess.run(
        [sys.executable, "-m", "prmigrate.cli", "pr", "--initiator", "iqn.2026-11.org.prmigrate:judge",
         "--isid", "23d0000000fd", *args, "--json", c.target_url],
        capture_output=True, env=env(), timeout=30, check=False)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def status_text(c: ProcCluster, host: str) -> str:
    """``prmigrate host --status`` of ``host``, as a separate process."""
    out = subprocess.run([sys.executable, "-m", "prmigrate.cli", "host", "--status", "--control",
                          str(c.procs[host].control)],
                         capture_output=True, text=True, env=env(), timeout=30, check=False)
    return out.stdout + out.stderr


def registrations(c: ProcCluster) -> list[dict[str, Any]]:
    st = pr_tool(c, "-s")
    assert st["status"] == "GOOD", st
    return list(st["registrations"])


def nexus_of(host: str, guest: str = GUEST, device: str = "vm1") -> str:
    return f"{INITIATORS[host]},i,0x{derive_isid(device, guest):012x}"


def assert_holds(c: ProcCluster, host: str, rtype: int | None) -> None:
    """Exactly the guest's registration on ``host``'s nexus (holding
    ``rtype``; None: registered, no reservation), none elsewhere."""
    regs = registrations(c)
    mine = [r for r in regs if r["transport_id"].lower() == nexus_of(host).lower()]
    assert len(mine) == 1 and int(mine[0]["key"], 16) == KEY, regs
    if rtype is None:
        assert not any(r["holder"] for r in regs), regs
    else:
        assert mine[0]["holder"] and mine[0]["type"] == rtype, regs
    others = [r for r in regs if r is not mine[0]]
    assert others == [], regs


def image_blocks(c: ProcCluster, acked: dict[int, bytes]) -> None:
    """Every acknowledged write is in the LUN's image file (the target's
    backing store, read directly: no iSCSI layer of ours in between)."""
    with open(c.workdir / "lun0.img", "rb") as f:
        for lba, blob in acked.items():
            f.seek(lba * 512)
            assert f.read(512) == blob, f"acknowledged write to LBA {lba} lost"


# ------------------------------------------------------------------ guest


async def guest_session(url: str) -> Session:
    return await connect(url, initiator_name=GUEST, isid=0x23D000000042, command_timeout=30,
                         reconnect_timeout=60)


async def register_and_reserve(s: Session, rtype: int | None, aptpl: bool = True) -> None:
    r = await s.pr_out(0x00, 0, pr_out_params(0, KEY, aptpl=aptpl))
    assert r.good, r
    if rtype is not None:
        r = await s.pr_out(0x01, rtype, pr_out_params(KEY, 0))
        assert r.good, r


def _retryable(status: int, sense: bytes) -> str | None:
    """What a Linux guest retries (scsi_decide_disposition): BUSY, TASK
    SET FULL, a UNIT ATTENTION, NOT READY becoming ready."""
    if status == Status.BUSY:
        return "busy"
    if status == Status.TASK_SET_FULL:
        return "task-set-full"
    if status == Status.CHECK_CONDITION:
        try:
            d = decode_sense(sense)
        except SenseDecodeError:
            return None
        if d.key == SenseKey.UNIT_ATTENTION:
            return "ua"
        if d.key == SenseKey.NOT_READY and d.asc == 0x04 and d.ascq == 0x01:
            return "not-ready"
    return None


class RetryingWriter:
    """``streams`` concurrent writers of distinct blocks, each retrying what
    a real guest retries; records what was acknowledged and when."""

    def __init__(self, s: Session, base: int = 1000, streams: int = 1, span: int = 2000) -> None:
        self.s, self.base, self.span = s, base, span
        self.acked: dict[int, bytes] = {}
        self.retried: dict[str, int] = {}
        self.bad: list[str] = []
        self.last_ack = time.monotonic()
        self._stop = asyncio.Event()
        self.tasks = [asyncio.ensure_future(self._run(i, streams)) for i in range(streams)]

    async def _run(self, k: int, n: int) -> None:
        i = k
        while not self._stop.is_set():
            lba = self.base + i % self.span
            blob = os.urandom(512)
            while True:
                r = await self.s.submit(0, _write10(lba, 1), blob)
                why = _retryable(r.status, bytes(r.sense))
                if why is None:
                    break
                self.retried[why] = self.retried.get(why, 0) + 1
                await asyncio.sleep(0.05)
            if r.status == Status.GOOD:
                self.acked[lba] = blob
                self.last_ack = time.monotonic()
            else:
                self.bad.append(f"write {lba}: {describe_result(r)}")
            i += n
            await asyncio.sleep(0.002)

    async def wait_acks(self, after: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.last_ack <= after:
            assert time.monotonic() < deadline, f"no write acknowledged {timeout} s after {after}"
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self.tasks)


# ------------------------------------------------------------------ tmpfs


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k"):  # type: ignore[no-untyped-def]
    """A small tmpfs mounted at ``path`` (root only), unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the file system of ``path`` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)
