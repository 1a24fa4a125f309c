"""``prmigrate demo --vm``: a QEMU VM live-migrated by QEMU itself, its
reservation pulled along by the destination host.

A shared target (127.0.0.1), host daemons A (127.0.0.2, with the device)
and B (127.0.0.3), and a VM (``vm.py``: Debian's QEMU under TCG, the guest
of scripts/build-guest.sh) whose disk is A's frontend LUN through
``scsi-block`` over ``iscsi://``. The guest runs fence_scsi's unfence and
then writes O_DIRECT blocks, each read back and compared. Then:

1. A -> B and B -> A, each as an orchestrator or the libvirt hook does it:
   ``device-add ... incoming-from=`` on the destination, a QEMU there with
   ``-incoming`` on the destination's URL, plain QMP ``migrate`` on the
   source QEMU, which quits after it;
2. a migration cancelled in ``pre-switchover`` (QMP ``migrate_cancel``):
   the VM goes on on A, the reservation stays there, the incoming device is
   deleted;
3. A -> B again, then another node's PREEMPT AND ABORT of the guest's key
   fences the VM on B (its next write: RESERVATION CONFLICT).

After each step READ FULL STATUS from an observer nexus must show the
guest's key and type on the nexus of the host the VM runs on and nothing
on the other; the guest must have seen no I/O error, no RESERVATION
CONFLICT and no mismatch. The outcome is a dict (``render`` prints it;
``--json`` dumps it) whose ``checks`` say what was verified; ``ok`` is
their conjunction.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..device.config import ConfigError
from ..device.identity import derive_isid
from ..host.control import CommandError
from ..iscsi.initiator import IscsiError, LoginError, connect
from ..scsi.constants import PrOutAction, PrType, Status
from ..scsi.pr import PrOutParams
from .cluster import Cluster, ClusterError, HostInfo, TargetInfo
from .observer import Observer, PrSnapshot
from .report import type_name
from .scenario import DEVICE, FRONTEND_IQN, HOST_ADDRESSES, Checks
from .vm import BOOT_TIMEOUT, Qemu, VmError, guest_image

GUEST_IQN = "iqn.2026-11.org.prmigrate:vmguest1"
GUEST_KEY = 0x6775657374310001
OTHER_NODE = "iqn.2026-11.org.prmigrate:node2"
OTHER_KEY = 0x6775657374320002
RTYPE = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
SETTLE_S = 1.5


class VmDemo:
    def __init__(self, cluster: Cluster, target: TargetInfo, hosts: dict[str, HostInfo], image: Path,
                 workdir: Path, checks: Checks) -> None:
        self.cluster, self.target, self.hosts, self.image = cluster, target, hosts, image
        self.workdir, self.checks = workdir, checks
        self.spec = f"name={DEVICE},backend={target.url(0)},target={FRONTEND_IQN},machine=pc-q35-11.0"
        self.observer = Observer(target.url(0))
        self.qemus: list[Qemu] = []
        self.vm: Qemu | None = None
        self.on = "hosta"
        self.steps: list[dict[str, Any]] = []

    def url(self, host: str) -> str:
        return f"iscsi://{self.hosts[host].portal}/{FRONTEND_IQN}/0"

    def qemu(self, host: str, incoming: Path | None = None) -> Qemu:
        q = Qemu(self.image, self.workdir, f"vm-{host}-{len(self.qemus)}", self.url(host),
                 initiator=GUEST_IQN, key=GUEST_KEY, incoming=incoming)
        self.qemus.append(q)
        return q

    async def boot(self) -> None:
        self.vm = await self.qemu("hosta").start()
        await self.vm.wait("ready", BOOT_TIMEOUT)
        await self.vm.wait("io", 60)
        await self.vm.mark()
        await self.check_holder("boot on hosta")

    async def add_device(self) -> None:
        """The device on A, added at run time (``device-add``), as an
        orchestrator adds the devices of the VMs it starts."""
        from ..commands.device import spec_arguments

        await self.cluster.call(self.hosts["hosta"], "device-add", spec_arguments(self.spec), timeout=60)

    async def add_incoming(self, host: str) -> None:
        from ..commands.device import spec_arguments

        spec = f"{self.spec},incoming-from={self.hosts[self.on].migrate_address}"
        await self.cluster.call(self.hosts[host], "device-add", spec_arguments(spec), timeout=60)

    async def destination(self, host: str) -> tuple[Qemu, Path]:
        await self.add_incoming(host)
        sock = self.workdir / f"migration-{len(self.qemus)}.sock"
        dst = await self.qemu(host, incoming=sock).start()
        status = await dst.status()
        if status != "inmigrate":
            raise VmError(f"the destination QEMU on {host} is {status!r}, not waiting for the VM")
        return dst, sock

    async def move(self, to: str) -> dict[str, Any]:
        assert self.vm is not None
        src, frm = self.vm, self.on
        dst, sock = await self.destination(to)
        await src.mark()
        t0 = time.monotonic()
        await (await src.qmp()).execute("migrate", {"uri": f"unix:{sock}"})
        m = await src.wait_migration({"completed"})
        t1 = time.monotonic()
        await src.kill()  # the source QEMU (paused after its migration) quits, as libvirt's does
        self.vm, self.on = dst, to
        await asyncio.sleep(SETTLE_S)
        w = await dst.mark()
        step = {"step": f"VM migrated {frm} -> {to}", "qmp_migrate_s": round(t1 - t0, 3),
                "qemu_downtime_ms": m.get("downtime"), "guest_window": w,
                "guest_longest_stall_ms": round(w["max_gap_us"] / 1000, 1)}
        self.checks.add(f"{frm} -> {to}: guest writes go on, no error, no mismatch",
                        w["ops"] > 0 and w["errors"] == 0 and w["mismatches"] == 0,
                        f"{w['ops']} writes+reads, {w['errors']} errors, {w['mismatches']} mismatches")
        step["pr"] = await self.check_holder(f"after {frm} -> {to}")
        self.steps.append(step)
        return step

    async def cancelled(self) -> None:
        assert self.vm is not None
        src = self.vm
        dst, sock = await self.destination("hostb")
        qmp = await src.qmp()
        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
        await qmp.execute("migrate", {"uri": f"unix:{sock}"})
        await src.wait_migration({"pre-switchover"})
        await qmp.execute("migrate_cancel")
        await src.wait_migration({"cancelled"})
        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "pause-before-switchover", "state": False}]})
        if not await dst.exited(30):
            await dst.kill()
        status = await src.status()
        await asyncio.sleep(SETTLE_S)
        w = await src.mark()
        self.checks.add("cancelled in pre-switchover: the VM runs on hosta, writing without error",
                        status == "running" and w["ops"] > 0 and w["errors"] == 0 and w["mismatches"] == 0,
                        f"QEMU {status}, {w['ops']} writes+reads, {w['errors']} errors")
        pr = await self.check_holder("after the cancelled migration")
        try:
            await self.cluster.call(self.hosts["hostb"], "device-del", {"device": DEVICE})
            deleted, why = True, ""
        except CommandError as e:
            deleted, why = False, e.desc
        self.checks.add("the incoming device on hostb is deleted", deleted, why)
        self.steps.append({"step": "VM migration hosta -> hostb cancelled in pre-switchover",
                           "guest_window": w, "pr": pr})

    async def check_holder(self, when: str) -> dict[str, Any]:
        snap: PrSnapshot = await self.observer.full_status()
        isid = derive_isid(DEVICE, GUEST_IQN)
        here, other = self.hosts[self.on], self.hosts["hostb" if self.on == "hosta" else "hosta"]
        mine = snap.of_port(here.initiator, isid)
        ok = (len(mine) == 1 and mine[0].key == GUEST_KEY and mine[0].holder and mine[0].rtype == RTYPE)
        self.checks.add(f"{when}: the guest's key and type on {self.on}'s nexus", ok,
                        ", ".join(f"key {r.key:#x} {type_name(RTYPE.name) if r.holder else 'registered'}"
                                  for r in mine) or "nothing")
        stale = [r for r in snap.registrations if r.initiator.lower() == other.initiator.lower()]
        self.checks.add(f"{when}: nothing on {other.name}'s nexus", not stale,
                        ", ".join(r.port for r in stale))
        labels = {h.initiator.lower(): h.name for h in self.hosts.values()}
        return snap.to_dict(labels)

    async def fence(self) -> None:
        """fence_scsi's fence from another node: register, PREEMPT AND ABORT
        type 5 of the guest's key; the guest's next write is refused."""
        assert self.vm is not None
        self.vm.send("pause")
        await self.vm.wait("paused", 60)
        s = await connect(self.target.url(0), initiator_name=OTHER_NODE, isid=0x23D000000077,
                          reconnect=False, command_timeout=10)
        try:
            r1 = await s.pr_out(PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0,
                                PrOutParams(sark=OTHER_KEY).encode())
            r2 = await s.pr_out(PrOutAction.PREEMPT_AND_ABORT, RTYPE,
                                PrOutParams(rk=OTHER_KEY, sark=GUEST_KEY).encode())
        finally:
            await s.close()
        self.checks.add("another node's PREEMPT AND ABORT of the guest's key succeeds",
                        r1.status == Status.GOOD and r2.status == Status.GOOD, f"{r1.status!r}, {r2.status!r}")
        self.vm.send("fence")
        kv = await self.vm.wait("fence", 60)
        self.checks.add(f"the VM on {self.on} is fenced: its next write gets RESERVATION CONFLICT",
                        kv.get("sg_status") == "0x18", f"sg_status {kv.get('sg_status')}")
        self.steps.append({"step": f"fenced on {self.on} by {OTHER_NODE}", "guest": kv})

    def final_checks(self) -> None:
        errors = [e for q in self.qemus for e in q.lines_of("error")]
        mismatches = [e for q in self.qemus for e in q.lines_of("mismatch")]
        self.checks.add("the guest saw no I/O error and no RESERVATION CONFLICT before the fence",
                        not errors, f"{len(errors)} errors" if errors else "")
        self.checks.add("no block read back differed from what was written", not mismatches,
                        f"{len(mismatches)} mismatches" if mismatches else "")


async def run_vm_demo(*, workdir: Path | None = None, keep: bool = False) -> dict[str, Any]:
    """Everything; every process it starts is stopped before it returns."""
    t0 = time.monotonic()
    made = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="prmigrate-demo-vm-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    report: dict[str, Any] = {"scenario": "vm", "workdir": str(wd), "checks": checks.items, "steps": []}
    cluster = Cluster(wd)
    demo: VmDemo | None = None
    try:
        image = await guest_image()
        cluster.make_secret()
        target = await cluster.start_target(1, "64M")
        hosta, hostb = await asyncio.gather(
            cluster.start_host("hosta", HOST_ADDRESSES["hosta"]),
            cluster.start_host("hostb", HOST_ADDRESSES["hostb"]))
        demo = VmDemo(cluster, target, {"hosta": hosta, "hostb": hostb}, image, wd, checks)
        report["steps"] = demo.steps
        await demo.add_device()
        await demo.observer.open()
        await demo.boot()
        await demo.move("hostb")
        await demo.move("hosta")
        await demo.cancelled()
        await demo.move("hostb")
        demo.final_checks()
        await demo.fence()
    except (VmError, ClusterError, CommandError, ConfigError, IscsiError, LoginError, OSError,
            TimeoutError) as e:
        report["error"] = f"{type(e).__name__}: {e}"
        checks.add("run completed", False, report["error"])
        report["logs"] = {n: cluster.processes[n].tail(8) for n in ("hosta", "hostb") if n in cluster.processes}
        if demo is not None:
            report["consoles"] = {q.name: q.lines[-8:] for q in demo.qemus}
    finally:
        if demo is not None:
            await asyncio.gather(*(q.kill() for q in demo.qemus), return_exceptions=True)
            await demo.observer.close()
        await cluster.close()
        report["left_running"] = [f"{m.name} (pid {m.pid})" for m in cluster.started if m.running]
        if made and not keep:
            shutil.rmtree(wd, ignore_errors=True)
            report["workdir_removed"] = True
    report["elapsed_s"] = round(time.monotonic() - t0, 3)
    report["ok"] = "error" not in report and not report["left_running"] and checks.ok
    return report


def render(report: dict[str, Any]) -> str:
    """The report as text: a pure function of the result dict."""
    lines = ["prmigrate demo --vm: a QEMU VM live-migrated by QEMU (QMP migrate), "
             "its reservation pulled by the destination host", ""]
    for s in report.get("steps", []):
        head = f"* {s['step']}"
        if "qmp_migrate_s" in s:
            head += (f": QMP migrate {s['qmp_migrate_s'] * 1000:.0f} ms, QEMU downtime "
                     f"{s.get('qemu_downtime_ms')} ms, guest's longest I/O stall {s['guest_longest_stall_ms']} ms")
        lines.append(head)
        holder = (s.get("pr") or {}).get("holder")
        if holder:
            lines.append(f"    holder: {holder['host'] or '?'} {holder['port']}  key {holder['key']}  "
                         f"{type_name(holder['type'])}")
    lines += ["", "checks:"]
    for c in report.get("checks", []):
        detail = f" ({c['detail']})" if c.get("detail") else ""
        lines.append(f"  [{'ok' if c['ok'] else 'FAILED':>6}] {c['name']}{detail}")
    if report.get("error"):
        lines += ["", f"error: {report['error']}"]
        for name, tail in (report.get("logs") or {}).items():
            lines += [f"--- {name} log:", tail]
        for name, tail in (report.get("consoles") or {}).items():
            lines += [f"--- {name} console:", *tail]
    lines += ["", f"{'all checks passed' if report.get('ok') else 'FAILED'} in {report.get('elapsed_s')} s"
              + ("" if report.get("workdir_removed") else f"; files in {report.get('workdir')}")]
    return "\n".join(lines)
