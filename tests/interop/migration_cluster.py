"""Real processes for the migration interop tests.

``prmigrate target`` on 127.0.0.1, host daemons ``prmigrate host`` on
127.0.0.2 (A, with the device) and 127.0.0.3 (B, empty), each accepting
migrations with the same secret file; ``prmigrate migrate`` drives them.
Every process is bounded in time and stopped at the end (SIGTERM, then
SIGKILL), also when a test fails. The guest is our initiator or a real
client (qemu-io, iscsi-test-cu) on A's frontend URL; the judge is READ FULL
STATUS on the target, read from a separate observer nexus.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmigrate.device.identity import derive_isid
from prmigrate.host.control import control_call
from prmigrate.iscsi.initiator import connect
from prmigrate.scsi.constants import PrInAction
from prmigrate.scsi.pr import ReadFullStatus

from .conftest import stop, wait_listening

SHARED = "iqn.2026-11.org.prmigrate:shared"
FRONTEND = "iqn.2026-11.org.prmigrate:vm1"
GUEST = "iqn.2026-11.org.prmigrate:guest1"
OBSERVER = "iqn.2026-11.org.prmigrate:observer"
HOSTS = {"hosta": "127.0.0.2", "hostb": "127.0.0.3"}
INITIATORS = {h: f"iqn.2026-11.org.prmigrate:{h}" for h in HOSTS}
SECRET = "interop-cluster-secret-0123456789"
SRC = str(Path(__file__).resolve().parents[2] / "src")


ROOT = str(Path(__file__).resolve().parents[2])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([SRC, ROOT, e.get("PYTHONPATH", "")])
    return e


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    host: str = ""
    port: int = 0
    control: Path | None = None
    migrate_port: int = 0
    args: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def migrate_addr(self) -> str:
        return f"{self.host}:{self.migrate_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn(name: str, args: list[str], workdir: Path, extra_env: dict[str, str] | None = None) -> Proc:
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                env=env() | (extra_env or {}))
    return Proc(name, proc, log_path)


@dataclass
class ProcCluster:
    workdir: Path
    machine: str = "pc-q35-11.0"
    migrate_pr: str | None = None
    target_host: str = "127.0.0.1"
    backend_via: tuple[str, int] | None = None  # hosts reach the target here (a proxy)
    secrets: dict[str, str] = field(default_factory=dict)
    refuse_preempt_from: str | None = None  # a target that answers its PREEMPT with CONFLICT
    without_register_and_move: bool = False  # a target that lacks PR OUT REGISTER AND MOVE
    procs: dict[str, Proc] = field(default_factory=dict)
    backend: str | None = None  # another target's URL (e.g. tgt): no prmigrate target started
    extra_devices: list[str] = field(default_factory=list)  # more --device specs on hosta
    host_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per host, at each launch
    host_args: dict[str, list[str]] = field(default_factory=dict)  # more options per host
    target_args: list[str] = field(default_factory=list)  # more options of prmigrate target
    more_backends: list[str] = field(default_factory=list)  # more backend= of the device: its other paths

    # ------------------------------------------------------------ life
    def start_target(self) -> Proc:
        port = free_port(self.target_host)
        if self.refuse_preempt_from is not None or self.without_register_and_move:  # tests/interop/refusing_target.py
            args = [sys.executable, "-m", "tests.interop.refusing_target",
                    "--listen", f"{self.target_host}:{port}", "--iqn", SHARED, "--size", "64M",
                    "--lun", str(self.workdir / "lun0.img"),
                    "--refuse-preempt-from", self.refuse_preempt_from or ""]
            if self.without_register_and_move:
                args.append("--without-register-and-move")
        else:
            args = [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{self.target_host}:{port}",
                    "--iqn", SHARED, "--size", "64M", "--lun", f"0={self.workdir / 'lun0.img'}",
                    "--state-dir", str(self.workdir / "target-state"), *self.target_args]
        p = spawn("target", args, self.workdir)
        p.host, p.port = self.target_host, port
        self.procs["target"] = p
        wait_listening(p.host, p.port, p.proc)
        return p

    @property
    def target_url(self) -> str:
        t = self.procs["target"]
        return f"iscsi://{t.host}:{t.port}/{SHARED}/0"

    @property
    def backend_url(self) -> str:
        if self.backend is not None:
            return self.backend
        if self.backend_via is not None:
            h, p = self.backend_via
            return f"iscsi://{h}:{p}/{SHARED}/0"
        return self.target_url

    def device_spec(self) -> str:
        spec = f"name=vm1,backend={self.backend_url},target={FRONTEND},machine={self.machine}"
        spec += "".join(f",backend={u}" for u in self.more_backends)
        if self.migrate_pr is not None:
            spec += f",migrate-pr={self.migrate_pr}"
        return spec

    def start_host(self, name: str, with_device: bool) -> Proc:
        for attempt in range(3):
            try:
                return self._start_host(name, with_device)
            except RuntimeError:
                p = self.procs.get(name)
                # a free port taken by another process before the daemon bound it
                if p is None or p.alive() or "in use" not in p.log or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_host(self, name: str, with_device: bool) -> Proc:
        addr = HOSTS[name]
        port, mport = free_port(addr), free_port(addr)
        control = self.workdir / f"{name}.sock"
        secret = self.workdir / f"{name}.secret"
        secret.write_text(self.secrets.get(name, SECRET) + "\n")
        verbose = ["-v", "-v"] if os.environ.get("PRMIGRATE_TEST_DEBUG") else []
        args = [sys.executable, "-m", "prmigrate.cli", *verbose, "host", "--name", name,
                "--initiator", INITIATORS[name], "--listen", f"{addr}:{port}",
                "--control", str(control), "--state-dir", str(self.workdir / f"{name}-state"),
                "--migrate-listen", f"{addr}:{mport}", "--secret-file", str(secret)]
        args += self.host_args.get(name, [])
        if with_device:
            args += ["--device", self.device_spec()]
            for spec in self.extra_devices:
                args += ["--device", spec]
        return self._launch_host(name, args, addr, port, control, mport)

    def _launch_host(self, name: str, args: list[str], addr: str, port: int, control: Path,
                     mport: int) -> Proc:
        p = spawn(name, args, self.workdir, self.host_env.get(name))
        p.host, p.port, p.control, p.migrate_port, p.args = addr, port, control, mport, args
        self.procs[name] = p
        wait_listening(addr, port, p.proc)
        wait_listening(addr, mport, p.proc)
        deadline = time.monotonic() + 10
        while not control.exists():
            if not p.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{p.log}")
            time.sleep(0.05)
        return p

    def start(self) -> ProcCluster:
        try:
            if "target" not in self.procs and self.backend is None:
                self.start_target()
            self.start_host("hosta", True)
            self.start_host("hostb", False)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.alive():
                stop(p.proc, timeout=10)

    def restart_host(self, name: str) -> Proc:
        """Start a stopped host again with the same addresses and state dir."""
        old = self.procs[name]
        assert not old.alive() and old.control is not None
        with contextlib.suppress(FileNotFoundError):
            old.control.unlink()
        return self._launch_host(name, old.args, old.host, old.port, old.control, old.migrate_port)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.alive():
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait(10)

    def dump_logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log[-6000:]}" for p in self.procs.values())

    # ------------------------------------------------------------ use
    def frontend_url(self, name: str = "hosta") -> str:
        p = self.procs[name]
        return f"iscsi://{p.host}:{p.port}/{FRONTEND}/0"

    async def call(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        control = self.procs[name].control
        assert control is not None
        return await control_call(control, command, arguments, timeout=10)

    async def migrate(self, src: str = "hosta", dst: str = "hostb", *extra: str,
                      timeout: float = 60, to: str | None = None,
                      device: str = "vm1") -> tuple[int, str]:
        """``prmigrate migrate`` as a subprocess: (exit status, output)."""
        control = self.procs[src].control
        args = [sys.executable, "-m", "prmigrate.cli", "migrate", "--host", str(control),
                "--device", device, "--to", to or self.procs[dst].migrate_addr, *extra]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env())
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode or 0, out.decode(errors="replace")

    async def full_status(self, lun: int = 0) -> ReadFullStatus:
        """READ FULL STATUS of the target's LUN ``lun``, read from the observer's nexus."""
        t = self.procs["target"]
        s = await connect(f"iscsi://{t.host}:{t.port}/{SHARED}/{lun}", initiator_name=OBSERVER, isid=0x23D0000000FE,
                          reconnect=False, command_timeout=10)
        try:
            r = await s.pr_in(PrInAction.READ_FULL_STATUS, 8192)
            assert r.good, r
            return ReadFullStatus.decode(bytes(r.data_in))
        finally:
            await s.close()

    async def entries_of(self, host: str, guest: str = GUEST, device: str = "vm1") -> list[Any]:
        isid = derive_isid(device, guest)
        rfs = await self.full_status()
        return [e for e in rfs.entries
                if e.transport_id.name.lower() == INITIATORS[host] and e.transport_id.isid == isid]

    async def wait_device(self, name: str, present: bool = True, timeout: float = 10,
                          device: str = "vm1") -> None:
        deadline = time.monotonic() + timeout
        while True:
            devs = [d["name"] for d in await self.call(name, "query-devices")]
            if (device in devs) == present:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{device} {'not ' if present else ''}on {name}: {devs}")
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def cluster(workdir: Path, **kw: Any):  # type: ignore[no-untyped-def]
    c = ProcCluster(workdir, **kw)
    c.start()
    try:
        yield c
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()


# ------------------------------------------------------------ channel proxy

FRAME_TYPES = {0x10: "SETUP", 0x11: "SETUP_OK", 0x12: "STATE", 0x13: "TAKEOVER_DONE",
               0x14: "RESUME", 0x15: "ROLLBACK", 0x16: "ABORT", 0x17: "ACK",
               0x20: "WATCH", 0x21: "DESCRIBED", 0x22: "PULL", 0x23: "PULLED"}


class FrameProxy:
    """A TCP proxy for the migration channel that sees frame boundaries.

    The channel authenticates frames but does not hide their type byte
    (``length u32 | type u8 | ...``), so the proxy can act at an exact phase:
    ``rule(direction, frame_name)`` returns None (forward), "drop" (forget
    the frame and everything after it in that direction), "cut" (close both
    connections before forwarding), or a number of seconds to hold the
    frame. ``direction`` is "to_dst" or "to_src". A rule may also kill a
    process as a side effect; the frame is then dropped if it returns "drop".
    """

    def __init__(self, target: tuple[str, int], rule: Any) -> None:
        self.target = target
        self.rule = rule
        self.seen: list[tuple[str, str]] = []
        self.server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.address = self.server.sockets[0].getsockname()[:2]
        return f"{self.address[0]}:{self.address[1]}"

    async def _client(self, r_src: asyncio.StreamReader, w_src: asyncio.StreamWriter) -> None:
        try:
            r_dst, w_dst = await asyncio.open_connection(*self.target)
        except OSError:
            w_src.close()
            return
        self._writers += [w_src, w_dst]
        await asyncio.gather(self._pipe("to_dst", r_src, w_dst), self._pipe("to_src", r_dst, w_src),
                             return_exceptions=True)

    def cut(self) -> None:
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pipe(self, direction: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dropping = False
        try:
            while True:
                head = await r.readexactly(5)
                length = int.from_bytes(head[:4], "big")
                body = await r.readexactly(length - 1)
                name = FRAME_TYPES.get(head[4], f"0x{head[4]:02x}")
                self.seen.append((direction, name))
                action = None if dropping else self.rule(direction, name)
                if action == "cut":
                    self.cut()
                    return
                if action == "drop" or dropping:
                    dropping = True
                    continue
                if isinstance(action, int | float):
                    await asyncio.sleep(action)
                w.write(head + body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
