"""QEMU's own live migration of the test VM between host daemons, the
device pulled by an incoming device on the destination (the test of
test_vm_migration.py and ``benchmarks/bench_vm.py --pull``).

``VmRun.move(to)`` does what an orchestrator does: ``prmigrate device add
... incoming-from=`` on the destination, a QEMU there started with
``-incoming`` on that host's URL, plain QMP ``migrate`` on the source QEMU,
which quits once it completed. Every QEMU is bounded in time (``Guest``)
and killed by ``VmRun.stop()``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from .migration_cluster import ProcCluster, env
from .vm import BOOT_TIMEOUT, GUEST_IQN, GUEST_KEY, Guest, Qmp

MIGRATION_TIMEOUT = 120.0  # one QMP migrate of a 256 MB TCG guest: 0.3-1 s here


def prmigrate(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "prmigrate.cli", *args], capture_output=True, text=True,
                       timeout=60, env=env(), check=False)
    assert p.returncode == 0, (args, p.stdout + p.stderr)
    return p.stdout


def start_cluster(c: ProcCluster) -> ProcCluster:
    """Target and both host daemons, the device added to A at run time
    (``prmigrate device add``), as an orchestrator adds the devices of the
    VMs it starts."""
    try:
        c.start_target()
        c.start_host("hosta", False)
        c.start_host("hostb", False)
        prmigrate("device", "add", "--host", str(c.procs["hosta"].control), c.device_spec())
    except BaseException:
        c.stop()
        raise
    return c


def add_incoming_device(c: ProcCluster, on: str, source: str) -> None:
    """The incoming device on ``on`` for the device ``source`` serves now,
    in exactly the form an operator types."""
    prmigrate("device", "add", "--host", str(c.procs[on].control),
              f"{c.device_spec()},incoming-from={c.procs[source].migrate_addr}")


def delete_device(c: ProcCluster, on: str) -> None:
    prmigrate("device", "del", "--host", str(c.procs[on].control), "vm1")
    asyncio.run(asyncio.wait_for(c.wait_device(on, present=False), 30))


class Vm:
    """One QEMU of the VM: a Guest (its console) with a QMP socket."""

    def __init__(self, image: Path, workdir: Path, name: str, url: str, incoming: Path | None = None) -> None:
        self.qmp_path = workdir / f"{name}.qmp"
        extra = ["-incoming", f"unix:{incoming}"] if incoming is not None else []
        self.guest = Guest(image, workdir, name, {"mode": "libiscsi", "key": hex(GUEST_KEY)},
                           ["-device", "virtio-scsi-pci",
                            "-drive", f"file={url},if=none,id=d0,format=raw,cache=none",
                            "-device", "scsi-block,drive=d0", "-iscsi", f"initiator-name={GUEST_IQN}",
                            "-nic", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra])
        self._qmp: Qmp | None = None

    def start(self) -> Vm:
        self.guest.start()
        return self

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path)
        return self._qmp

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])  # type: ignore[index]

    def migration_status(self) -> str:
        return str(self.qmp.execute("query-migrate").get("status", "none"))  # type: ignore[union-attr]

    def wait_migration(self, wanted: set[str], timeout: float = MIGRATION_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (st := self.migration_status()) not in wanted:
            assert st in ("setup", "active", "device", "pre-switchover", "cancelling"), st
            assert time.monotonic() < deadline, f"migration still {st} after {timeout} s"
            time.sleep(0.05)
        return st

    def exited(self, timeout: float) -> bool:
        assert self.guest.proc is not None
        try:
            self.guest.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        self.guest.kill()

    def stop(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        self.guest.stop()


class VmRun:
    """The VM, its QEMUs and the moves between hosts."""

    def __init__(self, c: ProcCluster, image: Path, workdir: Path) -> None:
        self.c, self.image, self.workdir = c, image, workdir
        self.host = "hosta"
        self.vm = Vm(image, workdir, "vm-hosta-0", c.frontend_url("hosta"))
        self.qemus = [self.vm]
        self.downtimes_ms: list[int] = []  # QEMU's own figure per move (query-migrate)

    def boot(self) -> None:
        self.vm.start()
        self.vm.guest.wait("ready", BOOT_TIMEOUT)
        self.vm.guest.wait("io")
        for _ in range(3):
            self.vm.guest.mark()

    def destination(self, to: str) -> tuple[Vm, Path]:
        """The incoming device on ``to`` and a QEMU there waiting with ``-incoming``."""
        add_incoming_device(self.c, to, self.host)
        n = len(self.qemus)
        sock = self.workdir / f"migration-{n}.sock"
        dst = Vm(self.image, self.workdir, f"vm-{to}-{n}", self.c.frontend_url(to), incoming=sock).start()
        self.qemus.append(dst)
        assert dst.status() == "inmigrate"  # its drive opened on the incoming device
        return dst, sock

    def move(self, to: str) -> Vm:
        """QMP ``migrate`` to a QEMU on ``to``; the source QEMU quits after
        it; the QEMU the VM now runs in."""
        dst, sock = self.destination(to)
        self.vm.qmp.execute("migrate", {"uri": f"unix:{sock}"})
        assert self.vm.wait_migration({"completed", "failed", "cancelled"}) == "completed"
        assert dst.status() == "running"
        self.downtimes_ms.append(int(self.vm.qmp.execute("query-migrate").get("downtime", -1)))  # type: ignore[union-attr]
        self.vm.kill()  # the source QEMU (paused after its migration) quits, as libvirt's does
        self.vm, self.host = dst, to
        return dst

    def stop(self) -> None:
        for q in self.qemus:
            q.kill()

    def assert_clean(self) -> None:
        for q in self.qemus:
            assert not q.guest.lines_of("error"), (q.guest.name, q.guest.lines_of("error"))
            assert not q.guest.lines_of("mismatch"), q.guest.lines_of("mismatch")

    def dump(self) -> str:
        return self.c.dump_logs() + "".join(f"\n===== {q.guest.name}\n{q.guest.console_tail(40)}"
                                            for q in self.qemus)
