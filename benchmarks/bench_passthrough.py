#!/usr/bin/env python3
"""Overhead of the passthrough device: iscsi-perf through a host daemon vs
directly against the same target, in the same run.

    python benchmarks/bench_passthrough.py                  # prmigrate target backend
    python benchmarks/bench_passthrough.py --backend tgt    # tgtd backend
    python benchmarks/bench_passthrough.py --backend both --seconds 10 --uvloop
    python benchmarks/bench_passthrough.py --poll-us 50     # target and daemon busy-poll
    python benchmarks/bench_passthrough.py --qemu-rounds 30 # the write/read CPU gate, with an interval
    python benchmarks/bench_passthrough.py --loop-rounds 10 # CPU per request against loop iterations (perf)

For each backend it starts the target and a ``prmigrate host`` daemon with
one device in front of it (all on 127.0.0.x), then runs ``iscsi-perf -r``
(4 KiB random reads) at QD1 and QD32, alternating direct and through the
daemon, ``--rounds`` times, and prints the median IOPS of each and the
ratio (goal: >= 70 % of direct at QD32); then ``qemu-img bench`` (another
client, QEMU's libiscsi driver) for 4 KiB reads and writes at QD32, the
same way, through the relay too, with the daemon's and the relay's CPU per
read and per write (and the target's, in the direct runs) and the ratios of
writes to reads (daemon CPU, share of direct); each round runs a process's
reads and writes back to back, and the write/read CPU ratio of every round
is printed too. Every process is stopped at the end.

It also prints the CPU time each process spent per I/O at QD32 (from
/proc and getrusage): the daemon's figure is the device's overhead in a
form that does not depend on the core count, and with every process busy
the IOPS through the daemon cannot exceed cores / (sum of the per-I/O CPU
of guest, daemon and target), which is printed as the ceiling.

As a yardstick it runs the same reads through ``tcp_relay.py``, a process
that copies bytes between the guest's and the target's sockets and does
nothing else: what any forwarder costs by being in the data path on this
machine (its socket reads and writes, its share of the cores). The daemon
does that socket work and all of the device's on top.
``--baseline-src DIR``: the qemu-img runs also go through a second daemon
run from another source tree (the code before a change), in front of the
same target, and its CPU per read and per write is printed next to this
tree's.
``--qemu-rounds N``: only the qemu-img part, N rounds (reads first in even
rounds, writes first in odd ones), for the CPU per write / per read figure
with a 95 % bootstrap interval over the rounds; no iscsi-perf runs.
``--loop-rounds N``: only the daemon, reads at QD16, 24 and 32 and writes
at QD32 and 64 (``qemu-img bench``), its CPU per request against its event
loop iterations per request (``epoll_wait`` and ``epoll_pwait`` calls,
counted by ``perf stat``), and the least-squares line through the reads' points: whether a
write costs more than a read at the same iterations per request.
``--pin one``: every process on one CPU; ``--pin split``: the daemons and
the relay on one CPU, the target and the clients on another (the default,
``none``, leaves them where the scheduler puts them; the write/read ratio
moves with how many wake-ups cross CPUs).
``--metrics``: instead, two host daemons in front of the same ``prmigrate
target``, one with ``--metrics`` (scraped every ``--scrape-interval`` s
while iscsi-perf runs through it), alternating rounds; prints the IOPS of
the one with metrics over the other's.
Not a test: numbers depend on the machine (CPU count matters: the guest,
the daemon and the target share it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (  # noqa: E402
    Scraper,
    children_cpu,
    env,
    free_port,
    iscsi_perf,
    process_cpu,
    qemu_img_bench,
    stop,
    wait_port,
)

SHARED = "iqn.2026-11.org.prmigrate:bench-shared"
FRONTEND = "iqn.2026-11.org.prmigrate:bench-vm1"
HOST_IQN = "iqn.2026-11.org.prmigrate:bench-host"
PERF_IQN = "iqn.2026-11.org.prmigrate:bench-guest"


@contextlib.contextmanager
def prm_target(work: Path, uvloop: bool, poll_us: int = 0) -> Iterator[tuple[str, int]]:
    host = f"127.0.0.{random.randint(2, 250)}"
    port = free_port(host)
    args = [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{host}:{port}",
            "--iqn", SHARED, "--lun", f"0={work / 'lun0.img'}", "--size", "1G"]
    if uvloop:
        args.append("--uvloop")
    if poll_us:
        args += ["--poll-us", str(poll_us)]
    with open(work / "target.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env())
    try:
        wait_port(host, port, proc)
        yield f"iscsi://{host}:{port}/{SHARED}/0", proc.pid
    finally:
        stop(proc)


@contextlib.contextmanager
def tgt_target(work: Path) -> Iterator[tuple[str, int]]:
    port = free_port("127.0.0.1")
    control = random.randint(2000, 32000)
    img = work / "tgt-lun1.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    with open(work / "tgtd.log", "wb") as log:
        proc = subprocess.Popen(["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)

    def adm(*a: str) -> None:
        subprocess.run(["tgtadm", "-C", str(control), "--lld", "iscsi", *a], check=True,
                       capture_output=True, timeout=10)

    try:
        wait_port("127.0.0.1", port, proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                adm("--mode", "target", "--op", "new", "--tid", "1", "-T", SHARED)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", str(img))
        adm("--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL")
        yield f"iscsi://127.0.0.1:{port}/{SHARED}/1", proc.pid
    finally:
        subprocess.run(["tgtadm", "-C", str(control), "--mode", "system", "--op", "delete"],
                       capture_output=True, timeout=10)
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def host_daemon(work: Path, backend: str, uvloop: bool, poll_us: int = 0, tag: str = "",
                metrics: str | None = None, src: str | None = None) -> Iterator[tuple[str, int]]:
    """A host daemon in front of ``backend``, run from this checkout or from ``src``."""
    host = f"127.0.0.{random.randint(2, 250)}"
    port = free_port(host)
    args = [sys.executable, "-m", "prmigrate.cli", "host", "--name", "bench" + tag,
            "--initiator", HOST_IQN + tag,
            "--listen", f"{host}:{port}", "--control", str(work / f"host{tag}.sock"),
            "--state-dir", str(work / f"host{tag}-state"),
            "--device", f"name=vm1,backend={backend},target={FRONTEND},machine=pc-q35-11.0"]
    if uvloop:
        args.append("--uvloop")
    if poll_us:
        args += ["--poll-us", str(poll_us)]
    if metrics:
        args += ["--metrics", metrics]
    e = env()
    if src is not None:
        e["PYTHONPATH"] = src
    with open(work / f"host{tag}.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=e)
    try:
        wait_port(host, port, proc)
        yield f"iscsi://{host}:{port}/{FRONTEND}/0", proc.pid
    finally:
        stop(proc)


@contextlib.contextmanager
def tcp_relay(direct: str, uvloop: bool, poll_us: int = 0) -> Iterator[tuple[str, int]]:
    """benchmarks/tcp_relay.py in front of the backend: the same target
    reached through a process that only copies bytes."""
    hostport, _, path = direct[len("iscsi://"):].partition("/")
    to_host, _, to_port = hostport.rpartition(":")
    host = f"127.0.0.{random.randint(2, 250)}"
    port = free_port(host)
    args = [sys.executable, str(Path(__file__).with_name("tcp_relay.py")), host, str(port), to_host, to_port]
    if uvloop:
        args.append("--uvloop")
    if poll_us:
        args += ["--poll-us", str(poll_us)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        wait_port(host, port, proc)
        yield f"iscsi://{host}:{port}/{path}", proc.pid
    finally:
        stop(proc)


class Measured:
    """IOPS of one iscsi-perf run and the CPU seconds per I/O of each process."""

    def __init__(self, url: str, qd: int, seconds: int, pids: dict[str, int]) -> None:
        before = {name: process_cpu(pid) for name, pid in pids.items()}
        guest = children_cpu()
        self.iops = iscsi_perf(url, qd, seconds, PERF_IQN)
        ios = max(1, self.iops * seconds)
        self.cpu = {name: (process_cpu(pid) - before[name]) / ios for name, pid in pids.items()}
        self.cpu["guest"] = (children_cpu() - guest) / ios


def ratio_interval(pairs: list[tuple[float, float]], resamples: int = 4000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of median(second) / median(first)
    over ``pairs`` (one per round, resampled whole so that a round's read and
    write stay together); seeded, so the same rounds give the same interval."""
    rng = random.Random(15)
    n = len(pairs)
    got = sorted(
        statistics.median(pairs[i][1] for i in pick) / statistics.median(pairs[i][0] for i in pick)
        for pick in ([rng.randrange(n) for _ in range(n)] for _ in range(resamples)))
    return got[int(0.025 * resamples)], got[int(0.975 * resamples) - 1]


def bench(name: str, direct: str, via: str, relay: str, pids: dict[str, int], seconds: int,
          rounds: int, base: str | None = None, qemu_rounds: int | None = None) -> None:
    """The iscsi-perf reads, then the qemu-img reads and writes (only the
    latter, ``qemu_rounds`` rounds of them, when that is given)."""
    print(f"\n{name}\n  direct:   {direct}\n  via host: {via}\n  relay:    {relay}")
    if qemu_rounds is None:
        bench_reads(direct, via, relay, pids, seconds, rounds)
    bench_qemu_img(direct, via, relay, pids, rounds if qemu_rounds is None else qemu_rounds, base)


def bench_reads(direct: str, via: str, relay: str, pids: dict[str, int], seconds: int, rounds: int) -> None:
    """iscsi-perf reads at QD1 and QD32: IOPS, and at QD32 each process's CPU per I/O."""
    print(f"  {'queue depth':<12} {'direct IOPS':>12} {'via host IOPS':>14} {'ratio':>7}"
          f" {'relay IOPS':>11} {'ratio':>7}")
    cores = os.cpu_count() or 1
    for qd in (1, 32):
        d: list[Measured] = []
        v: list[Measured] = []
        r: list[Measured] = []
        for _ in range(rounds):
            d.append(Measured(direct, qd, seconds, {"target": pids["target"]}))
            v.append(Measured(via, qd, seconds, {"target": pids["target"], "daemon": pids["daemon"]}))
            r.append(Measured(relay, qd, seconds, {"target": pids["target"], "relay": pids["relay"]}))
        md, mv = statistics.median(m.iops for m in d), statistics.median(m.iops for m in v)
        mr = statistics.median(m.iops for m in r)
        goal = "  (goal >= 70%)" if qd == 32 else ""
        print(f"  QD{qd:<10} {md:>12.0f} {mv:>14.0f} {100 * mv / md:>6.1f}% {mr:>11.0f}"
              f" {100 * mr / md:>6.1f}%{goal}", flush=True)
        if qd != 32:
            continue

        def us(ms: list[Measured], who: str) -> float:
            return 1e6 * statistics.median(m.cpu[who] for m in ms)

        direct_sum = us(d, "target") + us(d, "guest")
        via_sum = us(v, "target") + us(v, "daemon") + us(v, "guest")
        print(f"  CPU per I/O at QD32 (us): direct: target {us(d, 'target'):.1f} + guest {us(d, 'guest'):.1f}"
              f" = {direct_sum:.1f}; via host: target {us(v, 'target'):.1f} + daemon {us(v, 'daemon'):.1f}"
              f" + guest {us(v, 'guest'):.1f} = {via_sum:.1f}")
        print(f"  CPU-bound ceiling on {cores} cores: direct {cores * 1e6 / direct_sum:.0f} IOPS,"
              f" via host {cores * 1e6 / via_sum:.0f} IOPS"
              f" ({100 * direct_sum / via_sum:.0f}% of direct)", flush=True)
        relay_sum = us(r, "target") + us(r, "relay") + us(r, "guest")
        print(f"  byte relay (tcp_relay.py, no iSCSI work): relay {us(r, 'relay'):.1f} us per I/O,"
              f" ceiling {cores * 1e6 / relay_sum:.0f} IOPS ({100 * direct_sum / relay_sum:.0f}% of direct);"
              f" the daemon moved {100 * mv / mr:.0f}% of the relay's IOPS", flush=True)


def bench_qemu_img(direct: str, via: str, relay: str, pids: dict[str, int], rounds: int,
                   base: str | None) -> None:
    """qemu-img bench reads and writes at QD32, ``rounds`` rounds: IOPS as
    a share of direct, and the daemon's and the relay's CPU per request."""
    if shutil.which("qemu-img") is None:
        print("  (qemu-img not found: no write figures; apt-get install qemu-utils qemu-block-extra)")
        return
    # a second client, and writes: qemu-img bench (QEMU's libiscsi driver);
    # the daemon's and the relay's CPU per request from the same runs. Each
    # round runs every process's reads and its writes back to back (reads
    # first in even rounds, writes first in odd ones, so that neither half
    # always follows the other), so a change of the machine's load falls on
    # both halves of a round's write/read ratio, printed per round as well
    # as from the medians, with a bootstrap interval over the rounds.
    count = 100000
    runs: dict[str, dict[bool, list[tuple[float, float]]]] = {}  # who -> write -> [(IOPS, CPU s per request)]
    targets: dict[bool, list[float]] = {False: [], True: []}
    who_urls = [("direct", direct, "target"), ("via", via, "daemon"), ("relay", relay, "relay")]
    if base is not None:
        who_urls.append(("base", base, "baseline"))
    for n in range(rounds):
        for who, url, proc in who_urls:
            for write in (False, True) if n % 2 == 0 else (True, False):
                before = process_cpu(pids[proc])
                iops = qemu_img_bench(url, write, count, initiator=PERF_IQN)
                cpu_s = (process_cpu(pids[proc]) - before) / count
                runs.setdefault(who, {False: [], True: []})[write].append((iops, cpu_s))
                if who == "direct":
                    targets[write].append(cpu_s)

    def med_iops(who: str, write: bool) -> float:
        return statistics.median(r[0] for r in runs[who][write])

    def med_cpu(who: str, write: bool) -> float:
        return 1e6 * statistics.median(r[1] for r in runs[who][write])

    def per_round(who: str) -> str:
        pairs = [(r[1], w[1]) for r, w in zip(runs[who][False], runs[who][True], strict=True)]
        ratios = [w / r for r, w in pairs]
        text = f"{min(ratios):.2f}-{max(ratios):.2f}x per round"
        if len(pairs) >= 5:
            lo, hi = ratio_interval(pairs)
            text += f", median of rounds {statistics.median(ratios):.2f}x, 95 % interval {lo:.2f}-{hi:.2f}x"
        return text

    share: dict[bool, float] = {}
    for write in (False, True):
        md2, mv2, mr2 = med_iops("direct", write), med_iops("via", write), med_iops("relay", write)
        share[write] = 100 * mv2 / md2
        what = "writes" if write else "reads "
        print(f"  qemu-img bench QD32 4 KiB {what}: direct {md2:>8.0f}  via host {mv2:>8.0f}"
              f"  {share[write]:>6.1f}%  relay {mr2:>8.0f} {100 * mr2 / md2:>6.1f}%;"
              f" CPU per request: daemon {med_cpu('via', write):.1f} us, relay {med_cpu('relay', write):.1f} us,"
              f" target (direct) {1e6 * statistics.median(targets[write]):.1f} us", flush=True)
    dr, dw, rr, rw = med_cpu("via", False), med_cpu("via", True), med_cpu("relay", False), med_cpu("relay", True)
    print(f"  daemon CPU per write / per read: {dw / dr:.2f}x ({per_round('via')}; gate <= 1.2x);"
          f" relay's {rw / rr:.2f}x ({per_round('relay')}); per write - per read: daemon"
          f" {dw - dr:+.1f} us, relay {rw - rr:+.1f} us; daemon / relay: reads {dr / rr:.2f}x,"
          f" writes {dw / rw:.2f}x; qemu-img writes - reads via host: {share[True] - share[False]:+.1f}"
          f" points of direct (gate >= -5)", flush=True)
    if base is not None:
        br, bw = med_cpu("base", False), med_cpu("base", True)
        bs = {w: 100 * med_iops("base", w) / med_iops("direct", w) for w in (False, True)}
        print(f"  baseline tree's daemon, same runs: CPU per read {br:.1f} us, per write"
              f" {bw:.1f} us ({bw / br:.2f}x, {per_round('base')}); qemu-img reads"
              f" {bs[False]:.1f}%, writes {bs[True]:.1f}% of direct"
              f" ({bs[True] - bs[False]:+.1f} points)", flush=True)


# (write, queue depth) of the loop-count runs: reads at three depths span the
# loop iterations per request that writes at QD32 and QD64 give
LOOP_POINTS = ((False, 16), (False, 24), (False, 32), (True, 32), (True, 64))
EPOLL_CALLS = ("epoll_wait", "epoll_pwait")


def counted_bench(url: str, pid: int, write: bool, qd: int, count: int = 100000) -> tuple[float, float, float]:
    """``qemu-img bench`` on ``url`` with ``perf stat`` counting the
    daemon's (``pid``) ``epoll_wait`` and ``epoll_pwait`` calls (asyncio's
    loop makes the first, uvloop's the second): (IOPS, CPU seconds per
    request, those calls, that is, event loop iterations, per request)."""
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(f"syscalls:sys_enter_{c}" for c in EPOLL_CALLS),
                             "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # perf attached before the first request
        before = process_cpu(pid)
        iops = qemu_img_bench(url, write, count, qd=qd, initiator=PERF_IQN)
        cpu_s = (process_cpu(pid) - before) / count
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=30)
    calls = [int(f[0]) for f in (line.split(",") for line in err.splitlines())
             if len(f) > 2 and f[2].rpartition("sys_enter_")[2] in EPOLL_CALLS and f[0].isdigit()]
    if len(calls) != len(EPOLL_CALLS):
        raise RuntimeError(f"perf stat gave no epoll counts: {err[-300:]}")
    return iops, cpu_s, sum(calls) / count


def bench_loops(via: str, pid: int, rounds: int) -> None:
    """The daemon's CPU per request against its event loop iterations per
    request, for reads and writes at several queue depths (``LOOP_POINTS``),
    and the least-squares line through the reads': if a write cost more than
    a read at the same iterations per request, the writes would sit above
    it."""
    got: dict[tuple[bool, int], list[tuple[float, float, float]]] = {pt: [] for pt in LOOP_POINTS}
    rng = random.Random(15)
    for _ in range(rounds):
        for pt in rng.sample(LOOP_POINTS, len(LOOP_POINTS)):
            got[pt].append(counted_bench(via, pid, *pt))
    print(f"\n  daemon CPU per request against its event loop iterations (epoll_wait, epoll_pwait) per request,"
          f" qemu-img bench 4 KiB through the host, {rounds} rounds (medians):")
    med = {pt: tuple(statistics.median(r[k] for r in rs) for k in range(3)) for pt, rs in got.items()}
    reads = [m for (write, _), m in med.items() if not write]
    xs = [m[2] for m in reads]
    ys = [1e6 * m[1] for m in reads]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    base = my - slope * mx
    for (write, qd), (iops, cpu_s, loops) in med.items():
        fit = base + slope * loops
        print(f"    {'writes' if write else 'reads '} QD{qd:<3} {iops:>8.0f} IOPS  {loops:.3f} iterations per request"
              f" ({1 / loops:.1f} requests each)  {1e6 * cpu_s:5.1f} us per request"
              f" (reads' line {fit:5.1f} us, {1e6 * cpu_s - fit:+.1f})", flush=True)
    print(f"    the reads' line: {base:.1f} us per request + {slope:.0f} us per iteration", flush=True)


def bench_metrics(off: str, on: str, metrics: str, pids: dict[str, int], seconds: int, rounds: int,
                  interval: float) -> None:
    """The same reads through a daemon without and one with --metrics (scraped)."""
    print(f"\nmetrics: through a daemon with --metrics {metrics} (scraped every {interval:g} s) / without")
    for qd in (1, 32):
        ratios: list[float] = []
        got: dict[str, list[Any]] = {"off": [], "on": []}
        for _ in range(rounds):
            m_off = Measured(off, qd, seconds, {"daemon": pids["off"]})
            scraper = Scraper(metrics, interval)
            try:
                m_on = Measured(on, qd, seconds, {"daemon": pids["on"]})
            finally:
                if not scraper.stop():
                    raise RuntimeError("the metrics endpoint was never scraped")
            got["off"].append(m_off)
            got["on"].append(m_on)
            ratios.append(m_on.iops / m_off.iops)
        off_iops = statistics.median(m.iops for m in got["off"])
        on_iops = statistics.median(m.iops for m in got["on"])
        cpu_off = 1e6 * statistics.median(m.cpu["daemon"] for m in got["off"])
        cpu_on = 1e6 * statistics.median(m.cpu["daemon"] for m in got["on"])
        print(f"  QD{qd:<3} off {off_iops:>8.0f} IOPS  on {on_iops:>8.0f} IOPS  on/off {statistics.median(ratios):.3f}"
              f" (rounds {', '.join(f'{r:.3f}' for r in ratios)}); daemon CPU per I/O {cpu_off:.1f} / {cpu_on:.1f} us",
              flush=True)


@contextlib.contextmanager
def baseline(work: Path, direct: str, args: argparse.Namespace) -> Iterator[tuple[str | None, int]]:
    """The ``--baseline-src`` daemon in front of ``direct``, or (None, -1)."""
    if not args.baseline_src:
        yield None, -1
        return
    with host_daemon(work, direct, args.uvloop, args.poll_us, tag="-baseline", src=args.baseline_src) as got:
        yield got


def place(pids: tuple[int, ...], cpu: int) -> None:
    """Every thread of each of ``pids`` (-1: not running) on ``cpu``."""
    for pid in pids:
        if pid >= 0:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("prm", "tgt", "both"), default="prm")
    ap.add_argument("--seconds", type=int, default=5, help="per iscsi-perf run")
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs per queue depth (median)")
    ap.add_argument("--uvloop", action="store_true", help="run the host daemon on uvloop")
    ap.add_argument("--target-uvloop", action="store_true", help="run prmigrate target on uvloop")
    ap.add_argument("--poll-us", type=int, default=0,
                    help="host daemon and prmigrate target busy-poll this long before they sleep"
                         " (asyncio loop; not with --uvloop/--target-uvloop)")
    ap.add_argument("--metrics", action="store_true",
                    help="only compare a daemon with --metrics (scraped) against one without")
    ap.add_argument("--scrape-interval", type=float, default=1.0, metavar="S")
    ap.add_argument("--pin", choices=("none", "one", "split"), default="none",
                    help="where the processes run: none: where the scheduler puts them; one: all on one"
                         " CPU; split: the daemons and the relay on one CPU, the target and the clients"
                         " on another")
    ap.add_argument("--qemu-rounds", type=int, metavar="N",
                    help="only the qemu-img bench part (the CPU per write / per read gate), N rounds,"
                         " with a bootstrap interval of the ratios; no iscsi-perf runs")
    ap.add_argument("--loop-rounds", type=int, metavar="N",
                    help="only the daemon's CPU per request against its event loop iterations per request"
                         " (counted with perf stat), reads at QD16/24/32 and writes at QD32/64, N rounds")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="also run qemu-img bench through a second daemon from another source tree"
                         " (e.g. a checkout of the code before a change), in front of the same target")
    args = ap.parse_args()
    if args.qemu_rounds is not None and args.qemu_rounds < 1:
        print("--qemu-rounds needs at least one round", file=sys.stderr)
        return 2
    if args.loop_rounds is not None and (args.loop_rounds < 1 or shutil.which("perf") is None):
        print("--loop-rounds needs at least one round and perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    if args.poll_us and (args.uvloop or args.target_uvloop):
        print("--poll-us needs the asyncio loop, not uvloop", file=sys.stderr)
        return 2
    if shutil.which("iscsi-perf") is None:
        print("iscsi-perf not found (apt-get install libiscsi-bin)", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin == "split" and len(cpus) < 2:
        print("--pin split needs two CPUs", file=sys.stderr)
        return 2
    if args.pin != "none":  # the target and the clients inherit it
        os.sched_setaffinity(0, {cpus[0]})
    poll = f", busy-polling {args.poll_us} us before sleeping" if args.poll_us else ""
    where = {"none": "", "one": f"; every process on CPU {cpus[0]}",
             "split": f"; daemons and relay on CPU {cpus[-1]}, target and clients on CPU {cpus[0]}"}[args.pin]
    print(f"{os.cpu_count()} CPUs; 4 KiB random reads; daemon on {'uvloop' if args.uvloop else 'asyncio'}{poll}{where}")
    with tempfile.TemporaryDirectory(prefix="prm-bench-") as tmp:
        work = Path(tmp)
        if args.metrics:
            addr = f"127.0.0.1:{free_port('127.0.0.1')}"
            with prm_target(work, args.target_uvloop, args.poll_us) as (direct, tpid), \
                    host_daemon(work, direct, args.uvloop, args.poll_us, tag="-off") as (off, opid), \
                    host_daemon(work, direct, args.uvloop, args.poll_us, tag="-on", metrics=addr) as (on, npid):
                bench_metrics(off, on, addr, {"off": opid, "on": npid}, args.seconds, args.rounds,
                              args.scrape_interval)
            return 0
        if args.loop_rounds is not None:
            with prm_target(work, args.target_uvloop, args.poll_us) as (direct, tpid), \
                    host_daemon(work, direct, args.uvloop, args.poll_us) as (via, hpid):
                qemu_img_bench(via, False, 20000, initiator=PERF_IQN)  # warm
                bench_loops(via, hpid, args.loop_rounds)
            return 0
        if args.backend in ("prm", "both"):
            with prm_target(work, args.target_uvloop, args.poll_us) as (direct, tpid), \
                    host_daemon(work, direct, args.uvloop, args.poll_us) as (via, hpid), \
                    tcp_relay(direct, args.uvloop, args.poll_us) as (relay, rpid), \
                    baseline(work, direct, args) as (base, bpid):
                if args.pin == "split":
                    place((hpid, rpid, bpid), cpus[-1])
                bench("backend: prmigrate target", direct, via, relay,
                      {"target": tpid, "daemon": hpid, "relay": rpid, "baseline": bpid}, args.seconds,
                      args.rounds, base, args.qemu_rounds)
        if args.backend in ("tgt", "both"):
            if shutil.which("tgtd") is None:
                print("tgtd not found (apt-get install tgt)", file=sys.stderr)
                return 2
            with tgt_target(work) as (direct, tpid), \
                    host_daemon(work, direct, args.uvloop, args.poll_us) as (via, hpid), \
                    tcp_relay(direct, args.uvloop, args.poll_us) as (relay, rpid), \
                    baseline(work, direct, args) as (base, bpid):
                if args.pin == "split":
                    place((hpid, rpid, bpid), cpus[-1])
                bench("backend: tgt", direct, via, relay,
                      {"target": tpid, "daemon": hpid, "relay": rpid, "baseline": bpid}, args.seconds,
                      args.rounds, base, args.qemu_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
