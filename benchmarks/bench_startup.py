"""Start-up time of the command line, against ``python3 -c pass`` in the same run.

``prmigrate migrate`` runs inside a VM migration's switchover pause when an
orchestrator calls it, so the time until it reaches its work is guest
downtime. Measured here, each N times (median and best):

- ``python3 -c pass``: the interpreter's own start-up, the yardstick;
- ``python3 -m prmigrate --help``: until the process exits;
- ``python3 -m prmigrate migrate --control SOCK --device vm1 --query``:
  until it connects to SOCK (a stand-in control socket served by this
  script, which answers like a daemon), i.e. until it reaches its work;
  and until it exits.

The goal is 0.25 s from process start to the work; the "over pass" column
is what prmigrate's own imports and argument parsing add.

    python3 benchmarks/bench_startup.py [-n 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env  # noqa: E402


class FakeControl:
    """A control socket that records when each client connects and answers
    query-migrate with a finished record."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.accepted: list[float] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.perf_counter())
            with conn:
                conn.sendall(b'{"prmigrate": {"host": "bench", "version": "0"}}\n')
                f = conn.makefile("rb")
                for line in f:
                    req = json.loads(line)
                    rec = [{"id": "m1", "device": "vm1", "finished": True, "success": True}]
                    answer = {"return": rec if req.get("execute") == "query-migrate" else {}}
                    conn.sendall((json.dumps(answer) + "\n").encode())

    def close(self) -> None:
        self.sock.close()


def timed(cmd: list[str], control: FakeControl | None = None) -> tuple[float, float | None]:
    """(seconds until exit, seconds until the control socket was reached)."""
    before = len(control.accepted) if control else 0
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    t1 = time.perf_counter()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode()}")
    reached = None
    if control is not None and len(control.accepted) > before:
        reached = control.accepted[before] - t0
    return t1 - t0, reached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="runs of each command (default 20)")
    opts = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "control.sock")
        control = FakeControl(path)
        rows: dict[str, list[float]] = {"python3 -c pass": [], "prmigrate --help": [],
                                        "prmigrate migrate: reaches the socket": [],
                                        "prmigrate migrate --query: exits": []}
        try:
            for _ in range(opts.n):  # interleaved, so that load affects all alike
                rows["python3 -c pass"].append(timed([py, "-c", "pass"])[0])
                rows["prmigrate --help"].append(timed([py, "-m", "prmigrate", "--help"])[0])
                done, reached = timed([py, "-m", "prmigrate", "migrate", "--control", path,
                                       "--device", "vm1", "--query"], control)
                assert reached is not None
                rows["prmigrate migrate: reaches the socket"].append(reached)
                rows["prmigrate migrate --query: exits"].append(done)
        finally:
            control.close()
    base = statistics.median(rows["python3 -c pass"])
    print(f"{'command':40} {'median':>9} {'best':>9} {'over pass':>10}")
    for name, xs in rows.items():
        med = statistics.median(xs)
        print(f"{name:40} {med * 1000:7.1f} ms {min(xs) * 1000:7.1f} ms "
              f"{(med - base) * 1000:+8.1f} ms")
    worst = max(statistics.median(rows[k]) for k in rows if k != "python3 -c pass")
    print(f"goal: within 250 ms of process start: {'met' if worst <= 0.25 else 'NOT met'} "
          f"(slowest median {worst * 1000:.1f} ms; python3 -c pass {base * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
