#!/usr/bin/env python3
"""4 KiB random-read IOPS of ``prmigrate target`` versus tgtd, same run.

Not a test. Starts ``prmigrate target`` and ``tgtd`` on two free loopback
ports, each serving a file of the same size, runs ``iscsi-perf -r -b 8``
(4 KiB random reads) at QD1 and QD32 against both (alternating, several
rounds, medians), prints IOPS and the ratio ours/tgt. Everything started is
stopped at the end (tgtd via ``tgtadm --op delete`` on its control port,
then SIGKILL if needed).

    python benchmarks/bench_target.py [--seconds 5] [--rounds 3] [--uvloop] [--size 256M]
    python benchmarks/bench_target.py --poll-us 50    # our target busy-polling (tgt sleeps)

With ``--poll-us`` both runs of ours are printed, sleeping and polling, so the
CPU the polling costs is shown next to what it buys (CPU seconds per I/O of
each target process, from /proc).

    python benchmarks/bench_target.py --metrics [--scrape-interval 1]
    python benchmarks/bench_target.py --metrics --baseline-src /tmp/old/src

``--metrics`` adds a second target of ours with ``--metrics`` on, scraped
every ``--scrape-interval`` seconds while iscsi-perf runs against it, and
prints its IOPS over the first one's (metrics off), same rounds. The
counters behind the metrics are kept whether metrics are on or off;
``--baseline-src DIR`` adds a target run from another source tree (e.g. a
``git archive`` of a commit without them) to measure what they cost.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Scraper, free_port, iscsi_perf, process_cpu, wait_port  # noqa: E402

IQN = "iqn.2026-11.org.prmigrate:bench"
TGT_IQN = "iqn.2026-11.org.prmigrate:bench-tgt"


class Ours:
    def __init__(self, workdir: Path, size: str, uvloop: bool, poll_us: int = 0, metrics: bool = False,
                 src: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        args = [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{self.host}:{self.port}",
                "--iqn", IQN, "--lun", f"0={workdir / f'ours-{self.port}.img'}", "--size", size]
        if uvloop:
            args.append("--uvloop")
        if poll_us:
            args += ["--poll-us", str(poll_us)]
        self.metrics: str | None = None
        if metrics:
            self.metrics = f"{self.host}:{free_port(self.host)}"
            args += ["--metrics", self.metrics]
        env = dict(os.environ)
        src = src or str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.log = open(workdir / f"ours-{self.port}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_port(self.host, self.port)
        self.url = f"iscsi://{self.host}:{self.port}/{IQN}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Tgt:
    def __init__(self, workdir: Path, size_bytes: int) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.control = random.randint(20000, 29999)
        backing = workdir / "tgt.img"
        with open(backing, "wb") as f:
            f.truncate(size_bytes)
        self.log = open(workdir / "tgt.log", "wb")
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal={self.host}:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_port(self.host, self.port)
        adm = ["tgtadm", "-C", str(self.control), "--lld", "iscsi"]
        subprocess.run(adm + ["--mode", "target", "--op", "new", "--tid", "1", "--targetname", TGT_IQN],
                       check=True, timeout=10)
        subprocess.run(adm + ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                              "--backing-store", str(backing)], check=True, timeout=10)
        subprocess.run(adm + ["--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL"],
                       check=True, timeout=10)
        self.url = f"iscsi://{self.host}:{self.port}/{TGT_IQN}/1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["tgtadm", "-C", str(self.control), "--mode", "system", "--op", "delete"],
                           capture_output=True, timeout=10)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--qd", type=int, action="append", default=None)
    ap.add_argument("--poll-us", type=int, default=0,
                    help="also run our target busy-polling this long before it sleeps")
    ap.add_argument("--metrics", action="store_true",
                    help="also run our target with --metrics, scraped during the runs")
    ap.add_argument("--scrape-interval", type=float, default=1.0, metavar="S")
    ap.add_argument("--baseline-src", default=None, metavar="DIR",
                    help="also run our target from this source tree (a yardstick for the counters)")
    args = ap.parse_args()
    if args.poll_us and args.uvloop:
        print("--poll-us needs the asyncio loop, not --uvloop", file=sys.stderr)
        return 2
    for tool in ("iscsi-perf", "tgtd", "tgtadm"):
        if shutil.which(tool) is None:
            print(f"missing {tool}", file=sys.stderr)
            return 2
    qds = args.qd or [1, 32]
    with tempfile.TemporaryDirectory(prefix="prmigrate-bench-") as tmp:
        work = Path(tmp)
        servers: dict[str, Ours | Tgt] = {}
        try:
            servers["ours"] = Ours(work, args.size, args.uvloop)
            if args.poll_us:
                servers["polling"] = Ours(work, args.size, False, args.poll_us)
            if args.metrics:
                servers["metrics"] = Ours(work, args.size, args.uvloop, metrics=True)
            if args.baseline_src:
                servers["baseline"] = Ours(work, args.size, args.uvloop, src=args.baseline_src)
            servers["tgt"] = Tgt(work, parse_size(args.size))
            # warm the page cache of every image
            for srv in servers.values():
                iscsi_perf(srv.url, 32, 1)
            results: dict[tuple[str, int], list[float]] = {}
            cpu: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.rounds):
                for qd in qds:
                    for name, srv in servers.items():
                        before = process_cpu(srv.proc.pid)
                        metrics_addr = getattr(srv, "metrics", None)
                        scraper = Scraper(metrics_addr, args.scrape_interval) if metrics_addr else None
                        try:
                            iops = iscsi_perf(srv.url, qd, args.seconds)
                        finally:
                            if scraper is not None and not scraper.stop():
                                raise RuntimeError("the metrics endpoint was never scraped")
                        results.setdefault((name, qd), []).append(iops)
                        cpu.setdefault((name, qd), []).append(
                            (process_cpu(srv.proc.pid) - before) / max(1, iops * args.seconds))
            print(f"4 KiB random reads, iscsi-perf, {args.rounds} rounds x {args.seconds}s, medians"
                  f"{' (uvloop)' if args.uvloop else ''}")
            head = f"{'QD':>4} {'prmigrate IOPS':>15} {'tgt IOPS':>10} {'ours/tgt':>9}"
            if args.poll_us:
                head += f" {'polling ' + str(args.poll_us) + ' us':>16} {'polling/tgt':>12}"
            print(head + "   target CPU per I/O (us)")
            for qd in qds:
                o = statistics.median(results[("ours", qd)])
                t = statistics.median(results[("tgt", qd)])
                line = f"{qd:>4} {o:>15.0f} {t:>10.0f} {o / t:>9.2f}"
                if args.poll_us:
                    p = statistics.median(results[("polling", qd)])
                    line += f" {p:>16.0f} {p / t:>12.2f}"
                line += "   " + ", ".join(f"{name} {1e6 * statistics.median(cpu[(name, qd)]):.1f}"
                                          for name in servers)
                print(line, flush=True)
            for other, what in (("metrics", "metrics on / off"), ("baseline", "counters / baseline tree")):
                if other not in servers:
                    continue
                ratios = []
                for qd in qds:
                    mine = results[("ours", qd)]
                    theirs = results[(other, qd)]
                    pairs = [a / b for a, b in zip(theirs if other == "metrics" else mine,
                                                    mine if other == "metrics" else theirs, strict=True)]
                    a, b = (other, "ours") if other == "metrics" else ("ours", other)
                    cpu_ratio = statistics.median(cpu[(a, qd)]) / statistics.median(cpu[(b, qd)])
                    ratios.append(f"QD{qd} IOPS {statistics.median(pairs):.3f} (rounds "
                                  f"{', '.join(f'{r:.3f}' for r in pairs)}), CPU per I/O {cpu_ratio:.3f}")
                print(f"{what}: " + "; ".join(ratios), flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
