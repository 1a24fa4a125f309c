"""The demo's processes: one shared target and the host daemons, as real
``prmigrate`` subprocesses on loopback addresses, and how to drive them.

Every process is started by ``Cluster`` and stopped by ``Cluster.close()``
(SIGTERM, then SIGKILL after a grace period), which the demo runs in a
``finally``: on success, on error and on Ctrl-C. As a last resort each child
asks the kernel for SIGTERM when the demo process dies
(``PR_SET_PDEATHSIG``), so not even ``kill -9`` of the demo leaves daemons
behind. Each process writes its log to ``<workdir>/<name>.log``.

Ports are picked free on the address they will be bound to; a process that
exits before it is ready is reported with the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..host.control import CommandError, control_call

TARGET_IQN = "iqn.2026-11.org.prmigrate:shared"
HOST_PREFIX = "iqn.2026-11.org.prmigrate"
READY_TIMEOUT = 15.0
STOP_GRACE = 5.0
_PR_SET_PDEATHSIG = 1


class ClusterError(Exception):
    """A process of the demo failed to start or to answer."""


def free_port(address: str) -> int:
    """A TCP port nobody listens on at ``address`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no last resort, close() still runs
        return None


# Resolved here, in the parent: the child only makes the call (no dlopen
# between fork and exec, where another thread may hold the loader's lock).
_PRCTL = _load_prctl()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _child_env() -> dict[str, str]:
    """The children import the same ``prmigrate`` as this process."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent.parent)
    pp = env.get("PYTHONPATH", "")
    if src not in pp.split(os.pathsep):
        env["PYTHONPATH"] = src + (os.pathsep + pp if pp else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass(slots=True)
class Managed:
    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class TargetInfo:
    address: str
    port: int
    iqn: str
    luns: int

    def url(self, lun: int) -> str:
        return f"iscsi://{self.address}:{self.port}/{self.iqn}/{lun}"


@dataclass(frozen=True, slots=True)
class HostInfo:
    name: str
    address: str
    port: int  # guest frontend
    control: Path
    initiator: str
    migrate_port: int

    @property
    def portal(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def migrate_address(self) -> str:
        return f"{self.address}:{self.migrate_port}"


@dataclass(slots=True)
class Cluster:
    workdir: Path
    secret_file: Path | None = None
    python: str = sys.executable
    processes: dict[str, Managed] = field(default_factory=dict)  # the latest of each name
    started: list[Managed] = field(default_factory=list)  # every process ever started

    # -------------------------------------------------------------- secret
    def make_secret(self) -> Path:
        """The cluster's shared migration secret, readable by us only."""
        path = self.workdir / "cluster.secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        self.secret_file = path
        return path

    # ----------------------------------------------------------- processes
    async def _spawn(self, name: str, args: list[str], log_name: str | None = None) -> Managed:
        if name in self.processes and self.processes[name].running:
            raise ClusterError(f"{name} is already running")
        log_path = self.workdir / f"{log_name or name}.log"
        m = Managed(name, [self.python, "-m", "prmigrate.cli", *args], log_path)
        logf = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            m.proc = await asyncio.create_subprocess_exec(
                *m.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=_child_env(),
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
                preexec_fn=_die_with_parent,
            )
        finally:
            logf.close()
        m.started = time.monotonic()
        self.processes[name] = m
        self.started.append(m)
        return m

    def _died(self, m: Managed) -> ClusterError:
        rc = None if m.proc is None else m.proc.returncode
        return ClusterError(f"{m.name} exited (status {rc}) before it was ready; "
                            f"its log ({m.log_path}):\n{m.tail()}")

    async def _wait_tcp(self, m: Managed, address: str, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not m.running:
                raise self._died(m)
            try:
                _, w = await asyncio.open_connection(address, port)
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{m.name}: nothing listens on {address}:{port}") from None
                await asyncio.sleep(0.05)
                continue
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
            return

    async def _wait_control(self, m: Managed, path: Path) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not m.running:
                raise self._died(m)
            try:
                return dict(await control_call(path, "query-host", timeout=2.0))
            except (OSError, CommandError, TimeoutError, ValueError):
                if time.monotonic() > deadline:
                    raise ClusterError(f"{m.name}: control socket {path} does not answer") from None
                await asyncio.sleep(0.05)

    async def start_target(self, luns: int, size: str, address: str = "127.0.0.1") -> TargetInfo:
        """``prmigrate target`` with ``luns`` file-backed LUNs of ``size``."""
        state = self.workdir / "target-state"
        shutil.rmtree(state, ignore_errors=True)  # a reused --workdir starts clean
        for attempt in range(3):
            port = free_port(address)
            args = ["target", "--listen", f"{address}:{port}", "--iqn", TARGET_IQN,
                    "--size", size, "--state-dir", str(state)]
            for n in range(luns):
                args += ["--lun", f"{n}={self.workdir / f'lun{n}.img'}"]
            m = await self._spawn("target", args)
            try:
                await self._wait_tcp(m, address, port)
            except ClusterError:
                if attempt == 2 or m.running:
                    raise
                continue  # the port was taken in between: try another one
            return TargetInfo(address, port, TARGET_IQN, luns)
        raise AssertionError("unreachable")

    async def start_host(self, name: str, address: str, devices: list[str] = (),  # type: ignore[assignment]
                         *, migrate: bool = True, tag: str = "") -> HostInfo:
        """``prmigrate host`` named ``name`` on ``address`` (guest frontend,
        migration listener), initiator ``iqn.2026-11.org.prmigrate:<name>``.
        ``tag`` keeps the state directory and log of each start apart."""
        suffix = f"-{tag}" if tag else ""
        state = self.workdir / f"{name}{suffix}-state"
        shutil.rmtree(state, ignore_errors=True)  # no journal from an earlier demo
        initiator = f"{HOST_PREFIX}:{name}"
        control = self.workdir / f"{name}.sock"
        for attempt in range(3):
            port = free_port(address)
            mport = free_port(address)
            args = ["host", "--name", name, "--initiator", initiator,
                    "--listen", f"{address}:{port}", "--control", str(control),
                    "--state-dir", str(state)]
            if migrate:
                if self.secret_file is None:
                    self.make_secret()
                args += ["--migrate-listen", f"{address}:{mport}",
                         "--secret-file", str(self.secret_file)]
            for spec in devices:
                args += ["--device", spec]
            m = await self._spawn(name, args, f"{name}{suffix}")
            try:
                await self._wait_control(m, control)
                await self._wait_tcp(m, address, port)
            except ClusterError:
                if attempt == 2 or m.running:
                    raise
                continue
            return HostInfo(name, address, port, control, initiator, mport)
        raise AssertionError("unreachable")

    async def stop(self, name: str) -> int | None:
        """SIGTERM, wait, SIGKILL: the process's exit status."""
        m = self.processes.get(name)
        return None if m is None else await self._stop(m)

    @staticmethod
    async def _stop(m: Managed) -> int | None:
        if m.proc is None:
            return None
        if m.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                m.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(m.proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.kill()
                await m.proc.wait()
        return m.proc.returncode

    async def close(self) -> None:
        """Stop every process, hosts before the target (they log out first)."""
        hosts = [m for m in self.started if m.name != "target"]
        await asyncio.gather(*(self._stop(m) for m in hosts), return_exceptions=True)
        for m in self.started:
            if m.name == "target":
                await self._stop(m)

    # -------------------------------------------------------------- control
    async def call(self, host: HostInfo, command: str, arguments: dict[str, Any] | None = None,
                   timeout: float = 30.0) -> Any:
        return await control_call(host.control, command, arguments, timeout=timeout)
