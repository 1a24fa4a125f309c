"""The demonstration itself: start everything, run the guest, move its device
A -> B -> A, look at the target after each move, check, report.

Two runs on one shared target (one LUN each, so the second starts clean):

``migrate-pr=on``   device on machine ``pc-q35-11.0`` (QEMU 11 default on): the
                    reservation must follow the device; the old host's nexus
                    must be fenced after each move.
``migrate-pr=off``  machine ``pc-q35-10.2`` (compat: off): the device moves,
                    the reservation stays on A's nexus, so the guest's writes
                    through B get RESERVATION CONFLICT under WE/EA-type
                    reservations (the documented consequence of QEMU's
                    ``migrate-pr=off``, docs/design.md); back on A they work again.

Each run starts its own host daemons A (127.0.0.2) and B (127.0.0.3); the
guest logs in to A's frontend only, ever: after each move the source asks
it to log out and redirects its re-login to wherever the device now runs.

The outcome is a plain dict (``report.py`` prints it; ``--json`` dumps it)
whose ``checks`` say what was verified; ``ok`` is their conjunction.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..device.identity import derive_isid
from ..host.control import CommandError
from ..iscsi.initiator import IscsiError, LoginError
from ..scsi.constants import PrType
from ..scsi.vocabulary import format_key, words
from .cluster import Cluster, ClusterError, HostInfo, TargetInfo
from .guest import Guest, GuestError
from .observer import Observer, PrSnapshot, probe_write
from .report import summary_rows

log = logging.getLogger(__name__)

DEVICE = "vm1"
FRONTEND_IQN = "iqn.2026-11.org.prmigrate:vm1"
GUEST_IQN = "iqn.2026-11.org.prmigrate:guest1"
GUEST_KEY = 0x6775657374310001  # "guest1" 0x0001
HOST_ADDRESSES = {"hosta": "127.0.0.2", "hostb": "127.0.0.3"}
MIGRATION_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Pace:
    """How long the guest writes between the steps (seconds) and where."""

    warmup: float
    settle: float  # after each move, before looking at the window's counters
    blocks: int  # size of the guest's write region
    depth: int
    size: str  # of each LUN image

    @staticmethod
    def of(quick: bool) -> Pace:
        if quick:
            return Pace(warmup=0.4, settle=0.6, blocks=1024, depth=4, size="32M")
        return Pace(warmup=1.5, settle=1.5, blocks=4096, depth=4, size="64M")


@dataclass(frozen=True, slots=True)
class RunSpec:
    name: str
    machine: str
    migrate_pr: bool  # what the machine type implies
    lun: int
    moves: tuple[tuple[str, str], ...] = (("hosta", "hostb"), ("hostb", "hosta"))

    @property
    def tag(self) -> str:
        """Names this run's host state directories and logs."""
        return "pr-on" if self.migrate_pr else "pr-off"


RUNS = (
    RunSpec("migrate-pr=on", "pc-q35-11.0", True, 0),
    RunSpec("migrate-pr=off", "pc-q35-10.2", False, 1),
)


@dataclass(slots=True)
class Checks:
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "", *, expected_consequence: bool = False) -> bool:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail,
                           "expected_consequence": expected_consequence})
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.items)


class DemoError(Exception):
    pass


# ------------------------------------------------------------------ moves


async def migrate(cluster: Cluster, src: HostInfo, dst: HostInfo, device: str) -> dict[str, Any]:
    """Ask ``src`` to migrate ``device`` to ``dst`` and wait for the end;
    returns the source's final ``query-migrate`` entry."""
    started = await cluster.call(src, "migrate", {"device": device, "to": dst.migrate_address})
    mig_id = started.get("id") if isinstance(started, dict) else None
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while True:
        entries = await cluster.call(src, "query-migrate", {"device": device})
        entry = next((e for e in entries if mig_id is None or e.get("id") == mig_id), None)
        if entry is not None and entry.get("finished"):
            return dict(entry)
        if time.monotonic() > deadline:
            await cluster.call(src, "migrate-cancel", {"device": device})
            raise DemoError(f"migration of {device} {src.name} -> {dst.name} did not finish "
                            f"within {MIGRATION_TIMEOUT:.0f} s")
        await asyncio.sleep(0.02)


def _nexus_isid(devices: list[dict[str, Any]], device: str) -> int | None:
    """The ISID of the guest's backend nexus as the host reports it."""
    for d in devices:
        if d.get("name") != device:
            continue
        for key, nx in (d.get("backend-nexus") or {}).items():
            if key.lower() == GUEST_IQN.lower() or GUEST_IQN.lower() in str(nx.get("frontends")):
                return int(str(nx["isid"]), 16)
    return None


def _snapshot_dict(snap: PrSnapshot, hosts: dict[str, HostInfo]) -> dict[str, Any]:
    labels = {h.initiator.lower(): h.name for h in hosts.values()}
    return snap.to_dict(labels)


# ------------------------------------------------------------------- run


async def run_one(cluster: Cluster, target: TargetInfo, spec: RunSpec, pace: Pace,
                  rtype: PrType) -> dict[str, Any]:
    """One run (hosts started and stopped here); errors end up in the result."""
    checks = Checks()
    out: dict[str, Any] = {
        "name": spec.name,
        "machine": spec.machine,
        "device": DEVICE,
        "backend": target.url(spec.lun),
        "reservation_type": words(rtype),
        "key": format_key(GUEST_KEY),
        "moves": [],
        "checks": checks.items,
    }
    t_run = time.monotonic()
    try:
        await _run_body(cluster, target, spec, pace, rtype, out, checks)
    except (DemoError, GuestError, ClusterError, CommandError, IscsiError, LoginError,
            OSError, TimeoutError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        checks.add("run completed", False, out["error"])
        out["logs"] = {n: cluster.processes[n].tail(8) for n in ("hosta", "hostb")
                       if n in cluster.processes}
    finally:
        await asyncio.gather(cluster.stop("hosta"), cluster.stop("hostb"))
    out["elapsed_s"] = round(time.monotonic() - t_run, 3)
    out["ok"] = checks.ok
    return out


async def _run_body(cluster: Cluster, target: TargetInfo, spec: RunSpec, pace: Pace,
                    rtype: PrType, out: dict[str, Any], checks: Checks) -> None:
    spec_str = (f"name={DEVICE},backend={target.url(spec.lun)},target={FRONTEND_IQN},"
                f"machine={spec.machine}")
    hosta, hostb = await asyncio.gather(
        cluster.start_host("hosta", HOST_ADDRESSES["hosta"], [spec_str], tag=spec.tag),
        cluster.start_host("hostb", HOST_ADDRESSES["hostb"], tag=spec.tag),
    )
    hosts = {"hosta": hosta, "hostb": hostb}
    out["hosts"] = {h.name: {"initiator": h.initiator, "frontend": h.portal,
                             "migrate": h.migrate_address, "control": str(h.control)}
                    for h in hosts.values()}
    dev = (await cluster.call(hosta, "query-devices", {"device": DEVICE}))[0]
    out["migrate_pr"] = dev.get("migrate-pr")
    checks.add(f"device on {spec.machine} has migrate-pr {'on' if spec.migrate_pr else 'off'}",
               dev.get("migrate-pr") == spec.migrate_pr, f"host reports {dev.get('migrate-pr')}")

    url = f"iscsi://{hosta.portal}/{FRONTEND_IQN}/0"
    out["guest_url"] = url
    observer = Observer(target.url(spec.lun))
    guest = Guest(url, GUEST_IQN, key=GUEST_KEY, rtype=rtype, blocks=pace.blocks, depth=pace.depth)
    try:
        await observer.open()
        await guest.login()
        await guest.register_and_reserve()
        devs = await cluster.call(hosta, "query-devices", {"device": DEVICE})
        isid = _nexus_isid(devs, DEVICE) or derive_isid(DEVICE, GUEST_IQN)
        out["backend_isid"] = f"0x{isid:012x}"
        initial = await observer.full_status()
        out["initial"] = _snapshot_dict(initial, hosts)
        holder = initial.holders
        checks.add("guest's reservation is held by hosta's nexus",
                   bool(holder) and holder[0].is_port(hosta.initiator, isid)
                   and holder[0].key == GUEST_KEY and holder[0].rtype == rtype,
                   holder[0].port if holder else "no holder")

        guest.start_writing()
        await asyncio.sleep(pace.warmup)
        guest.window()
        for n, (sname, dname) in enumerate(spec.moves, 1):
            move: dict[str, Any] = {"n": n, "from": sname, "to": dname}
            out["moves"].append(move)  # filled as far as the move gets
            await _move(cluster, target, spec, pace, guest, observer, hosts[sname],
                        hosts[dname], hosts, isid, rtype, move, checks)
        await guest.stop_writing()
        out["sweep"] = await guest.verify_all()
        out["final"] = _snapshot_dict(await observer.full_status(), hosts)
        out["cleanup"] = await guest.release_and_unregister()
    finally:
        await guest.close()
        await observer.close()
        out["guest"] = guest.summary()
    w = guest.counters
    checks.add("no acknowledged write lost", w.lost == 0,
               f"{w.acknowledged} acknowledged, {w.verified} verified, {w.lost} lost")
    checks.add("every acknowledged write read back intact", w.verified == w.acknowledged,
               f"{w.verified}/{w.acknowledged}")
    checks.add("the guest kept writing", w.acknowledged > 0, f"{w.acknowledged} acknowledged")
    if spec.migrate_pr:
        checks.add("the guest never saw RESERVATION CONFLICT", w.conflicts == 0,
                   f"{w.conflicts} conflicts")
    else:
        checks.add("guest's writes through hostb got RESERVATION CONFLICT", w.conflicts > 0,
                   f"{w.conflicts} conflicts", expected_consequence=True)


async def _move(cluster: Cluster, target: TargetInfo, spec: RunSpec, pace: Pace, guest: Guest,
                observer: Observer, src: HostInfo, dst: HostInfo, hosts: dict[str, HostInfo],
                isid: int, rtype: PrType, move: dict[str, Any], checks: Checks) -> None:
    tag = f"move {move['n']} ({src.name} -> {dst.name})"
    before = await observer.full_status()
    move["before"] = _snapshot_dict(before, hosts)
    c0, _ = guest.window()
    first_event = len(guest.events)
    t0 = time.monotonic()
    result = await migrate(cluster, src, dst, DEVICE)
    move["wall_s"] = round(time.monotonic() - t0, 4)
    c1, stall = guest.window()  # the move: from the request to the source's "completed"
    move["migration"] = {k: result.get(k) for k in ("id", "status", "success", "reason",
                                                      "strategy", "timings", "errors")}
    after = await observer.full_status()
    move["after"] = _snapshot_dict(after, hosts)
    ok = checks.add(f"{tag}: migration succeeded", bool(result.get("success")),
                    str(result.get("reason") or result.get("status")))
    if not ok:
        raise DemoError(f"{tag} failed: {result.get('reason')}")
    await asyncio.sleep(pace.settle)
    c2, stall_after = guest.window()  # the guest on the destination
    d = c2.minus(c1)
    move["guest"] = {
        "during_move": c1.minus(c0).to_dict(),
        "writes": d.to_dict(),
        "longest_stall_s": round(stall, 4),
        "longest_stall_after_s": round(stall_after, 4),
        "connected_to": guest.connected_portal(),
        "logout_requests": guest.logout_requests,
        "reconnects": guest.reconnects,
        "redirects": guest.redirects,
        "events": [{"t": e.at, "what": e.what} for e in guest.events[first_event:]],
    }
    # the fencing probe: the source's nexus for this guest writes a scratch block
    probe = await probe_write(target.url(spec.lun), src.initiator, isid,
                              lba=guest.capacity - 1, block_size=guest.block_size)
    move["source_probe"] = probe.to_dict()

    src_port = f"{src.initiator},i,0x{isid:012x}"
    dst_port = f"{dst.initiator},i,0x{isid:012x}"
    holders = after.holders
    h = holders[0] if len(holders) == 1 else None
    checks.add(f"{tag}: guest now connected to {dst.name}'s frontend",
               move["guest"]["connected_to"] == dst.portal, str(move["guest"]["connected_to"]))
    if spec.migrate_pr:
        checks.add(f"{tag}: holder is {dst.name}'s nexus", h is not None
                   and h.is_port(dst.initiator, isid), h.port if h else f"{len(holders)} holders")
        checks.add(f"{tag}: same key and type", h is not None and h.key == GUEST_KEY
                   and h.rtype == rtype,
                   f"key 0x{h.key:x} {words(h.rtype)}" if h else "-")
        left = after.of_port(src.initiator, isid)
        checks.add(f"{tag}: nothing left on {src.name}'s nexus", not left,
                   ", ".join(f"0x{r.key:x}" for r in left) or src_port)
        checks.add(f"{tag}: {src.name} is fenced (WRITE from its nexus conflicts)", probe.fenced,
                   probe.status)
        checks.add(f"{tag}: guest wrote on {dst.name}", d.acknowledged > 0,
                   f"{d.acknowledged} acknowledged")
    else:
        a = hosts["hosta"]
        checks.add(f"{tag}: reservation stayed on hosta's nexus", h is not None
                   and h.is_port(a.initiator, isid) and h.key == GUEST_KEY,
                   h.port if h else f"{len(holders)} holders", expected_consequence=True)
        if dst.name != "hosta":
            checks.add(f"{tag}: nothing registered for the guest on {dst.name}'s nexus",
                       not after.of_port(dst.initiator, isid), dst_port,
                       expected_consequence=True)
            checks.add(f"{tag}: guest's writes through {dst.name} conflict", d.conflicts > 0
                       and d.acknowledged == 0,
                       f"{d.conflicts} conflicts, {d.acknowledged} acknowledged",
                       expected_consequence=True)
        else:
            checks.add(f"{tag}: back on hosta the guest's writes succeed again",
                       d.acknowledged > 0, f"{d.acknowledged} acknowledged",
                       expected_consequence=True)


async def run_demo(*, workdir: Path | None = None, keep: bool = False, quick: bool = False,
                   rtype: PrType = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                   runs: tuple[RunSpec, ...] = RUNS) -> dict[str, Any]:
    """Everything; the processes it starts are stopped before it returns."""
    t0 = time.monotonic()
    pace = Pace.of(quick)
    made = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="prmigrate-demo-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(wd)
    report: dict[str, Any] = {"workdir": str(wd), "quick": quick, "runs": [],
                              "reservation_type": words(rtype)}
    try:
        cluster.make_secret()
        target = await cluster.start_target(len(runs), pace.size)
        report["target"] = {"portal": f"{target.address}:{target.port}", "iqn": target.iqn,
                            "luns": target.luns}
        for spec in runs:
            report["runs"].append(await run_one(cluster, target, spec, pace, rtype))
    except (ClusterError, OSError) as e:
        report["error"] = str(e)
    finally:
        await cluster.close()
        report["processes"] = [
            {"name": m.name, "pid": m.pid, "exit": None if m.proc is None else m.proc.returncode,
             "log": str(m.log_path)}
            for m in cluster.started
        ]
        report["left_running"] = [f"{m.name} (pid {m.pid})" for m in cluster.started if m.running]
        if made and not keep:
            shutil.rmtree(wd, ignore_errors=True)
            report["workdir_removed"] = True
    report["summary"] = summary_rows(report)
    report["elapsed_s"] = round(time.monotonic() - t0, 3)
    report["ok"] = ("error" not in report and not report["left_running"]
                    and len(report["runs"]) == len(runs) and all(r["ok"] for r in report["runs"]))
    return report
