"""The host daemon's life cycle as real processes: the lock on its state
directory and control socket, a dead daemon's socket taken over, systemd's
notify protocol on a NOTIFY_SOCKET the test listens on (READY, WATCHDOG,
RELOADING, STOPPING), SIGHUP applying a changed host.toml and reopening the
log file while a guest's I/O and reservation go on, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

from prmigrate.host.control import control_call
from prmigrate.iscsi.initiator import connect
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType
from prmigrate.scsi.pr import ReadReservation, pr_out_params

from ..interop.conftest import stop, wait_listening
from ..interop.migration_cluster import Proc, free_port, spawn

SHARED = "iqn.2026-11.org.prmigrate:shared"
GUEST = "iqn.2026-11.org.prmigrate:g1"
HOST_IP = "127.0.0.2"
KEY = 0x5EED


class Notify:
    """A NOTIFY_SOCKET: an abstract name (``@...``) or a path."""

    def __init__(self, tmp: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"prmigrate-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = tmp / "notify.sock"
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def wait_for(self, key: str, value: str = "1", timeout: float = 20.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for m in self.messages:
                if m.get(key) == value and not m.get("_seen_" + key):
                    m["_seen_" + key] = "1"
                    return m
            left = deadline - loop.time()
            assert left > 0, f"no {key}={value} in {self.messages}"
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), left)
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()


def start_target(tmp: Path) -> Proc:
    port = free_port("127.0.0.1")
    p = spawn("target", [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"127.0.0.1:{port}",
                         "--iqn", SHARED, "--size", "16M", "--lun", f"0={tmp / 'lun0.img'}",
                         "--lun", f"1={tmp / 'lun1.img'}"], tmp)
    p.host, p.port = "127.0.0.1", port
    wait_listening(p.host, p.port, p.proc)
    return p


def device_table(target: Proc, name: str, lun: int, machine: str = "pc-q35-11.0") -> str:
    return (f'[[device]]\nname = "{name}"\nbackend = "iscsi://{target.host}:{target.port}/{SHARED}/{lun}"\n'
            f'target = "iqn.2026-11.org.prmigrate:{name}"\nmachine = "{machine}"\n')


def write_config(path: Path, tmp: Path, port: int, *devices: str) -> None:
    text = (f'[host]\nname = "hosta"\nlisten = "{HOST_IP}:{port}"\ncontrol = "{tmp / "ctl.sock"}"\n'
            f'state-dir = "{tmp / "state"}"\n\n' + "\n".join(devices))
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(text)
    tmp_path.replace(path)


def host(tmp: Path, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    return spawn(name, [sys.executable, "-m", "prmigrate.cli", "host", *args], tmp, env)


def wait_socket(path: Path, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.alive(), proc.log
        assert time.monotonic() < deadline, proc.log
        time.sleep(0.05)


def test_a_second_daemon_is_refused_and_a_dead_ones_socket_is_taken_over(tmp_path: Path) -> None:
    target = start_target(tmp_path)
    procs = [target]
    try:
        ctl, state = tmp_path / "ctl.sock", tmp_path / "state"
        dev = f"name=vm1,backend=iscsi://{target.host}:{target.port}/{SHARED}/0"
        base = ["--control", str(ctl), "--state-dir", str(state), "--device", dev]
        first = host(tmp_path, "first", "--listen", f"{HOST_IP}:{free_port(HOST_IP)}", *base)
        procs.append(first)
        wait_socket(ctl, first)
        # the same control socket and state directory: refused, naming the pid
        second = host(tmp_path, "second", "--listen", f"{HOST_IP}:{free_port(HOST_IP)}", *base)
        procs.append(second)
        assert second.proc.wait(30) == 1
        assert f"pid {first.proc.pid}" in second.log and "in use by a running daemon" in second.log
        # only the state directory shared: refused too
        third = host(tmp_path, "third", "--listen", f"{HOST_IP}:{free_port(HOST_IP)}",
                     "--control", str(tmp_path / "other.sock"), "--state-dir", str(state), "--device", dev)
        procs.append(third)
        assert third.proc.wait(30) == 1
        assert f"state directory {state}" in third.log and f"pid {first.proc.pid}" in third.log
        # the first one still serves its socket
        assert first.alive()
        assert asyncio.run(control_call(ctl, "query-host", timeout=10))["name"] == "host"
        # killed: its socket file stays behind, and the next daemon takes it over
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert ctl.exists()
        fourth = host(tmp_path, "fourth", "--listen", f"{HOST_IP}:{free_port(HOST_IP)}", *base)
        procs.append(fourth)
        deadline = time.monotonic() + 20
        while True:
            try:
                devices = asyncio.run(control_call(ctl, "query-devices", timeout=5))
                break
            except (OSError, TimeoutError):
                assert fourth.alive() and time.monotonic() < deadline, fourth.log
                time.sleep(0.1)
        assert [d["name"] for d in devices] == ["vm1"]
        assert stop(fourth.proc) == 0
        assert not ctl.exists()
    finally:
        for p in reversed(procs):
            if p.alive():
                stop(p.proc)


def test_notify_protocol_and_sighup_reload_with_a_guest_running(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_notify_and_reload(tmp_path), 150))


async def _notify_and_reload(tmp: Path) -> None:
    target = start_target(tmp)
    notify = Notify(tmp, abstract=True)
    config = tmp / "host.toml"
    port = free_port(HOST_IP)
    vm1, vm2 = device_table(target, "vm1", 0), device_table(target, "vm2", 1)
    write_config(config, tmp, port, vm1)
    log_file = tmp / "hosta.log"
    daemon = host(tmp, "hosta", "--config", str(config), "--log-file", str(log_file),
                  env={"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "200000"})
    ctl = tmp / "ctl.sock"
    guest = None
    try:
        ready = await notify.wait_for("READY")
        assert ready["MAINPID"] == str(daemon.proc.pid)
        assert ctl.exists()  # READY comes once everything is served
        # WATCHDOG=1 every WATCHDOG_USEC/2
        t0 = time.monotonic()
        for _ in range(3):
            await notify.wait_for("WATCHDOG", timeout=5)
        assert time.monotonic() - t0 < 2.0
        guest = await connect(f"iscsi://{HOST_IP}:{port}/iqn.2026-11.org.prmigrate:vm1/0",
                              initiator_name=GUEST, isid=0x23D000000001, reconnect=False)
        assert (await guest.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))).good
        assert (await guest.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))).good
        stop_io = asyncio.Event()

        async def io() -> int:
            n = 0
            while not stop_io.is_set():
                blob = os.urandom(512)
                await guest.write(100 + n % 16, blob)
                assert await guest.read(100 + n % 16, 1) == blob
                n += 1
                await asyncio.sleep(0.005)
            return n

        io_task = asyncio.ensure_future(io())
        await asyncio.sleep(0.2)

        # 1. vm2 added to the file; the log file rotated away
        write_config(config, tmp, port, vm1, vm2)
        log_file.rename(tmp / "hosta.log.1")
        daemon.proc.send_signal(signal.SIGHUP)
        await notify.wait_for("RELOADING")
        await notify.wait_for("READY")
        devices = {d["name"]: d for d in await control_call(ctl, "query-devices", timeout=10)}
        assert set(devices) == {"vm1", "vm2"}
        assert devices["vm1"]["frontend"]["sessions"] == [f"{GUEST},i,0x23d000000001"]
        assert "configuration reloaded: 1 device(s) added ['vm2']" in log_file.read_text()

        # 2. vm2 removed, vm1 changed: vm2 goes, the change is refused with a message
        write_config(config, tmp, port, device_table(target, "vm1", 0, machine="pc-q35-10.2"))
        daemon.proc.send_signal(signal.SIGHUP)
        await notify.wait_for("RELOADING")
        await notify.wait_for("READY")
        devices = {d["name"]: d for d in await control_call(ctl, "query-devices", timeout=10)}
        assert set(devices) == {"vm1"} and devices["vm1"]["properties"]["machine"] == "pc-q35-11.0"
        text = log_file.read_text()
        assert "1 removed ['vm2'], 1 refused; vm1: changed in the configuration" in text

        # 3. a broken file: nothing applied, the daemon goes on
        config.write_text("[host\n")
        daemon.proc.send_signal(signal.SIGHUP)
        await notify.wait_for("READY")
        assert "not applied" in log_file.read_text() and daemon.alive()

        stop_io.set()
        assert await io_task > 10
        rr = ReadReservation.decode(bytes((await guest.pr_in(PrInAction.READ_RESERVATION)).data_in))
        assert rr.key == KEY and rr.rtype == PrType.WRITE_EXCLUSIVE
        await guest.close()
        guest = None

        daemon.proc.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING")
        assert await asyncio.get_running_loop().run_in_executor(None, daemon.proc.wait, 20) == 0
        assert not ctl.exists()
    finally:
        if guest is not None:
            await guest.close()
        notify.close()
        for p in (daemon, target):
            if p.alive():
                stop(p.proc)
