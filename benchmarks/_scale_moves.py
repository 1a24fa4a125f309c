"""``bench_scale.py --part moves``: device migrations at scale (see bench_scale's docstring)."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import env, free_port, stop, wait_port

from prmigrate.host.control import control_call
from prmigrate.iscsi.initiator import Session, connect
from prmigrate.scsi.constants import PrOutAction, PrType, Status
from prmigrate.scsi.pr import pr_out_params

SHARED = "iqn.2026-11.org.prmigrate:bench-moves"
GUEST = "iqn.2026-11.org.prmigrate:bench-moves-guest"
HOSTS = {"hosta": "127.0.0.2", "hostb": "127.0.0.3"}
SECRET = "bench-moves-cluster-secret-0123456789"
GROUP = 20
WRITE_EVERY = 0.1  # seconds between a guest's writes
PAUSE_FACTOR, PAUSE_MAX, ALL_TOTAL = 2.0, 0.100, 10.0  # the gate


def _frontend(i: int) -> str:
    return f"iqn.2026-11.org.prmigrate:bench-moves-vm{i}"


def _write10(lba: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0\0\x01\0"


class Guest:
    """One guest: a session on its device's frontend holding a WRITE
    EXCLUSIVE reservation, writing one block every WRITE_EVERY seconds."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.writes = 0
        self.bad = 0
        self._stop = False
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        i = 0
        while not self._stop:
            r = await self.s.submit(0, _write10(100 + i % 1000), os.urandom(512))
            if r.status == Status.GOOD:
                self.writes += 1
            else:
                self.bad += 1
            i += 1
            await asyncio.sleep(WRITE_EVERY)

    async def stop(self) -> None:
        self._stop = True
        if self.task is not None:
            await self.task


class Cluster:
    def __init__(self, work: Path, count: int) -> None:
        self.work, self.count = work, count
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.control: dict[str, Path] = {}
        self.migrate_addr: dict[str, str] = {}
        self.portal: dict[str, tuple[str, int]] = {}

    def start(self) -> None:
        tport = free_port("127.0.0.1")
        luns = [a for i in range(self.count + 1) for a in ("--lun", f"{i}={self.work / f'lun{i}.img'}")]
        self._spawn("target", ["target", "--listen", f"127.0.0.1:{tport}", "--iqn", SHARED,
                               "--size", "1M", *luns])
        wait_port("127.0.0.1", tport, self.procs["target"], 60)
        backend = f"iscsi://127.0.0.1:{tport}/{SHARED}"
        secret = self.work / "secret"
        secret.write_text(SECRET + "\n")
        for name, addr in HOSTS.items():
            port, mport = free_port(addr), free_port(addr)
            control = self.work / f"{name}.sock"
            args = ["host", "--name", name, "--initiator", f"iqn.2026-11.org.prmigrate:{name}",
                    "--listen", f"{addr}:{port}", "--control", str(control),
                    "--state-dir", str(self.work / f"{name}-state"),
                    "--migrate-listen", f"{addr}:{mport}", "--secret-file", str(secret)]
            if name == "hosta":
                for i in range(self.count + 1):  # the last one: the lone yardstick
                    args += ["--device", f"name=vm{i},backend={backend}/{i},target={_frontend(i)}"]
            self._spawn(name, args)
            wait_port(addr, port, self.procs[name], 60)
            wait_port(addr, mport, self.procs[name], 60)
            deadline = time.monotonic() + 30
            while not control.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.control[name], self.migrate_addr[name] = control, f"{addr}:{mport}"
            self.portal[name] = (addr, port)

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.work / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "prmigrate.cli", *args],
                                                stdout=log, stderr=subprocess.STDOUT, env=env())

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            stop(p)


async def _records(c: Cluster, host: str, devices: list[str]) -> list[dict[str, Any]]:
    recs = await control_call(c.control[host], "query-migrate", {}, timeout=30)
    return [r for r in recs if r["device"] in devices and r["role"] == "source"]


async def _lone(c: Cluster, src: str, dst: str, device: str) -> dict[str, Any]:
    await control_call(c.control[src], "migrate", {"device": device, "to": c.migrate_addr[dst]})
    while True:
        (rec,) = await control_call(c.control[src], "query-migrate", {"device": device})
        if rec["finished"]:
            return rec  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)


PAUSE_PARALLEL: list[str] = []  # --pause-parallel N of the batches, when given


async def _cli(c: Cluster, src: str, dst: str, *select: str) -> tuple[int, float, str]:
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prmigrate.cli", "migrate", "--control", str(c.control[src]), *select,
        *PAUSE_PARALLEL,
        "--to", c.migrate_addr[dst], "--quiet", "--timeout", "120",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env())
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode or 0, time.monotonic() - start, out.decode(errors="replace")


def _row(label: str, recs: list[dict[str, Any]], total: float) -> dict[str, Any]:
    pauses = [r["timings"]["pause_s"] for r in recs if r["success"] and r["timings"]["pause_s"] is not None]
    row = {"label": label, "ok": sum(1 for r in recs if r["success"]), "n": len(recs), "total": total,
           "median": statistics.median(pauses) if pauses else float("nan"),
           "max": max(pauses) if pauses else float("nan")}
    print(f"| {label} | {row['ok']}/{row['n']} | {total:.2f} s | {row['median'] * 1000:.1f} ms | "
          f"{row['max'] * 1000:.1f} ms |", flush=True)
    return row


async def _measure(c: Cluster, count: int) -> int:
    devices = [f"vm{i}" for i in range(count)]
    lone_dev = f"vm{count}"  # moved alone, there and back, between the groups: the yardstick
    guests = []
    for i in range(count + 1):
        h, p = c.portal["hosta"]
        s = await connect(f"iscsi://{h}:{p}/{_frontend(i)}/0", initiator_name=GUEST, isid=0x23D000000042,
                          command_timeout=60, reconnect_timeout=60)
        for action, rtype, params in ((PrOutAction.REGISTER, 0, pr_out_params(0, 0x1000 + i)),
                                      (PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(0x1000 + i, 0))):
            r = await s.pr_out(action, rtype, params)
            if r.status != Status.GOOD:
                raise RuntimeError(f"vm{i}: PR OUT {action.name} failed: {r}")
        g = Guest(s)
        g.task = asyncio.ensure_future(g.run())
        guests.append(g)
    await asyncio.sleep(1.0)
    print(f"{count} devices (and one more moved alone between the groups, the yardstick), each guest "
          f"holding WRITE EXCLUSIVE and writing every {WRITE_EVERY * 1000:.0f} ms; pause = the source's "
          f"hold to the destination's ACK of RESUME (query-migrate pause_s)\n")
    print("| moves | moved | total | pause median | pause max |\n|---|---|---|---|---|")
    lone: list[dict[str, Any]] = []

    async def lone_moves() -> None:  # there and back: the yardstick device stays on A
        for src, dst in (("hosta", "hostb"), ("hostb", "hosta")):
            await asyncio.sleep(0.3)
            lone.append(await _lone(c, src, dst, lone_dev))
        await asyncio.sleep(0.3)

    try:
        await lone_moves()
        # one by one, A -> B, one control command per move
        t0 = time.monotonic()
        recs = [await _lone(c, "hosta", "hostb", d) for d in devices]
        one_row = _row("one by one, `migrate --device` per move (control API)", recs, time.monotonic() - t0)
        # 20 at a time, B -> A: one `prmigrate migrate` with 20 --device per group
        group_time = 0.0
        for g in range(0, count, GROUP):
            await lone_moves()
            sel = [a for d in devices[g:g + GROUP] for a in ("--device", d)]
            _, took, _ = await _cli(c, "hostb", "hosta", *sel)
            group_time += took
        group_row = _row(f"{GROUP} at a time, `migrate --device` x{GROUP} (time of the groups)",
                         await _records(c, "hostb", devices), group_time)
        await lone_moves()
        # all at once, A -> B: one `prmigrate migrate --all`
        code, total, out = await _cli(c, "hosta", "hostb", "--all")
        all_row = _row(f"all at once, one `migrate --all` ({count + 1} devices)",
                       await _records(c, "hosta", [*devices, lone_dev]), total)
        lone_row = _row(f"lone move, {len(lone)} of them between the groups (yardstick)", lone,
                        sum(r["timings"]["total_s"] for r in lone))
    finally:
        for g in guests:
            await g.stop()
    bad = sum(g.bad for g in guests)
    print(f"\nguest writes: {sum(g.writes for g in guests)} GOOD, {bad} not GOOD")
    for g in guests:
        await g.s.close()
    ratio = group_row["median"] / lone_row["median"]
    ok = (group_row["ok"] == count and ratio <= PAUSE_FACTOR and group_row["max"] < PAUSE_MAX
          and all_row["ok"] == count + 1 and all_row["total"] < ALL_TOTAL and all_row["max"] < PAUSE_MAX
          and one_row["ok"] == count and lone_row["ok"] == len(lone) and bad == 0)
    print(f"{GROUP} at a time: median pause {ratio:.2f}x a lone move's (gate {PAUSE_FACTOR}x), max "
          f"{group_row['max'] * 1000:.1f} ms (gate < {PAUSE_MAX * 1000:.0f} ms); all at once: "
          f"{all_row['total']:.2f} s (gate < {ALL_TOTAL:.0f} s), median pause "
          f"{all_row['median'] / lone_row['median']:.2f}x a lone move's, max {all_row['max'] * 1000:.1f} ms: "
          f"{'PASS' if ok else 'FAIL'}")
    if code != 0:
        print(out)
    return 0 if ok else 1


def run_moves(count: int, pause_parallel: int | None = None) -> int:
    if pause_parallel is not None:
        PAUSE_PARALLEL[:] = ["--pause-parallel", str(pause_parallel)]
        print(f"batches with --pause-parallel {pause_parallel}")
    logging.getLogger("prmigrate").setLevel(logging.ERROR)  # the guests' reconnect lines
    with tempfile.TemporaryDirectory(prefix="bench-moves-") as tmp:
        c = Cluster(Path(tmp), count)
        try:
            c.start()
            return asyncio.run(asyncio.wait_for(_measure(c, count), 900))
        except BaseException:
            for name in c.procs:
                log = Path(tmp) / f"{name}.log"
                if log.exists():
                    print(f"===== {name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        finally:
            c.stop()
