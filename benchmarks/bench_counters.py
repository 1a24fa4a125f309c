#!/usr/bin/env python3
"""CPU cost of the data path's counters (counters.py), against a source tree without them.

Not a test. The IOPS benchmarks swing by tens of percent when the shared
machine is loaded; this one measures the CPU time (``process_time``) the
sans-IO target connection spends per command, in-process, with no
socket: a real ``LogicalUnit`` on a file, a logged-in ``Connection``, fed
batches of 32 and of 1 READ(10) of 4 KiB (the read fast path) and batches
of 8 and of 1 WRITE(10) of 4 KiB with immediate data (the write fast path;
the general path in trees before it). Each source
tree runs in its own subprocess, alternating, ``--rounds`` times; medians
and the ratio this tree / the other are printed.

    git archive <commit-before-the-counters> src | tar -x -C /tmp/base
    python benchmarks/bench_counters.py --baseline-src /tmp/base/src [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = "iqn.2026-11.org.prmigrate:bench-counters"
INITIATOR = "iqn.2026-11.org.prmigrate:bench-client"
BLOCKS = 1 << 14  # 8 MiB LU


def worker(batches: int) -> dict[str, float]:
    import struct

    from prmigrate.iscsi import pdu as P
    from prmigrate.iscsi.login import encode_text
    from prmigrate.iscsi.session import Connection, TargetNode, TargetSettings
    from prmigrate.iscsi.target import IscsiTarget
    from prmigrate.lun.unit import LogicalUnit

    with tempfile.TemporaryDirectory(prefix="prm-bench-counters-") as tmp:
        lu = LogicalUnit(Path(tmp) / "lu.img", BLOCKS * 512, name="bench")
        target = IscsiTarget([TargetNode(TARGET, {0: lu})], TargetSettings())
        sent: list[int] = []
        conn = Connection(target, "peer", ("127.0.0.1", 3260), lambda parts: sent.append(len(parts)),
                          lambda: None)
        keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                ("HeaderDigest", "None"), ("DataDigest", "None"), ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "262144")]
        conn.data_received(P.LoginRequest(isid=0x400000000001, tsih=0, itt=1, cid=0, cmdsn=1, exp_statsn=0,
                                          csg=1, nsg=3, transit=True, data=encode_text(keys)).encode())
        assert conn.state == Connection.FULL_FEATURE
        cmdsn, itt = 1, 100

        def batch(n: int, write: bool) -> bytes:
            nonlocal cmdsn, itt
            out = []
            for _ in range(n):
                itt += 1
                lba = (itt * 8) % (BLOCKS - 8)
                cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, 8, 0)
                out.append(P.ScsiCommand(itt=itt, lun=0, cdb=cdb, cmdsn=cmdsn, expected_length=4096,
                                         read=not write, write=write,
                                         data=bytes(4096) if write else b"").encode())
                cmdsn += 1
            return b"".join(out)

        result = {}
        for name, n, write in (("read_ns", 32, False), ("read1_ns", 1, False), ("write_ns", 8, True),
                               ("write1_ns", 1, True)):
            data = [batch(n, write) for _ in range(batches)]
            for d in data[:20]:  # warm up
                conn.data_received(d)
            data = data[20:]
            t0 = time.process_time_ns()
            for d in data:
                conn.data_received(d)
            result[name] = (time.process_time_ns() - t0) / (len(data) * n)
        assert conn.state == Connection.FULL_FEATURE
        return result


def run_tree(src: str, batches: int) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = src
    p = subprocess.run([sys.executable, __file__, "--worker", "--batches", str(batches)], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"worker on {src} failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", required=False, metavar="DIR",
                    help="a source tree without the counters (the yardstick)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, default=3000, help="batches per measurement")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.batches)))
        return 0
    if not args.baseline_src:
        ap.error("--baseline-src DIR is needed (see the description)")
    mine = str(Path(__file__).resolve().parents[1] / "src")
    got: dict[str, list[dict[str, float]]] = {"this": [], "baseline": []}
    for _ in range(args.rounds):
        got["this"].append(run_tree(mine, args.batches))
        got["baseline"].append(run_tree(args.baseline_src, args.batches))
    print(f"CPU ns per command, sans-IO connection, {args.rounds} rounds (median; each round's ratio)")
    for key, what in (("read_ns", "READ(10) 4 KiB, fast path, 32 a batch"),
                      ("read1_ns", "READ(10) 4 KiB, fast path, 1 a batch (QD1)"),
                      ("write_ns", "WRITE(10) 4 KiB immediate data, 8 a batch"),
                      ("write1_ns", "WRITE(10) 4 KiB immediate data, 1 a batch (QD1)")):
        this = statistics.median(r[key] for r in got["this"])
        base = statistics.median(r[key] for r in got["baseline"])
        ratios = [a[key] / b[key] for a, b in zip(got["this"], got["baseline"], strict=True)]
        print(f"  {what}: this tree {this:.0f} ns, baseline {base:.0f} ns, this/baseline {this / base:.3f}"
              f" (rounds {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
