#!/usr/bin/env python3
"""Pulled moves: the added latency of the first command on the destination.

Not a test. Real processes (``prmigrate target``, host daemons A and B,
``tests/interop/migration_cluster.py``). A guest (our initiator) holds a
WRITE EXCLUSIVE reservation on A. Each round adds the device on the other
host with ``incoming-from=`` (the host serving it now), logs a second
session of the guest's initiator in there (the destination QEMU), and
times its first WRITE: that one pulls the device (A -> B, then B -> A, ...).
The yardstick, in the same run: the median of the next ``--writes`` WRITEs
of that session, once the device is there. Printed per round and as
medians: first command, yardstick, added latency (their difference); the
reservation is checked on the new host's nexus after each move.

    python benchmarks/bench_pull.py [--rounds 6] [--writes 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from prmigrate.iscsi.initiator import connect  # noqa: E402
from prmigrate.scsi.constants import PrOutAction, PrType, Status  # noqa: E402
from prmigrate.scsi.pr import pr_out_params  # noqa: E402
from tests.interop.migration_cluster import GUEST, ProcCluster  # noqa: E402

KEY = 0x5EED00000000F00D


def write10(lba: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0\0\x01\0"


async def run(rounds: int, writes: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        c = ProcCluster(Path(tmp))
        c.start()
        try:
            holder = await connect(c.frontend_url("hosta"), initiator_name=GUEST, isid=0x23D000000042,
                                   command_timeout=30, reconnect_timeout=30)
            assert (await holder.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))).good
            assert (await holder.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))).good
            out = []
            for i in range(rounds):
                src, dst = ("hosta", "hostb") if i % 2 == 0 else ("hostb", "hosta")
                if i:
                    await c.wait_device(src, True)
                    await c.wait_device(dst, False, timeout=15)
                await c.call(dst, "device-add", {"name": "vm1", "backend": c.backend_url,
                                                 "incoming-from": c.procs[src].migrate_addr})
                s = await connect(c.frontend_url(dst), initiator_name=GUEST, isid=0x23D000000100 + i,
                                  command_timeout=30)
                try:
                    r = await s.submit(0, bytes(6), b"", 0)  # TUR: a new nexus's unit attention
                    t0 = time.perf_counter()
                    r = await s.submit(0, write10(10 + i), b"p" * 512)
                    first = time.perf_counter() - t0
                    if r.status == Status.CHECK_CONDITION:  # a unit attention owed after the move
                        t0 = time.perf_counter()
                        r = await s.submit(0, write10(10 + i), b"p" * 512)
                        first += time.perf_counter() - t0
                    assert r.good, r
                    lat = []
                    for k in range(writes):
                        t0 = time.perf_counter()
                        assert (await s.submit(0, write10(100 + k), b"w" * 512)).good
                        lat.append(time.perf_counter() - t0)
                    (e,) = await c.entries_of(dst)
                    assert e.holder and e.key == KEY and not await c.entries_of(src)
                finally:
                    await s.close()
                yard = statistics.median(lat)
                out.append({"move": f"{src} -> {dst}", "first_ms": first * 1e3, "yardstick_ms": yard * 1e3,
                            "added_ms": (first - yard) * 1e3})
            await holder.close()
            return out
        except BaseException:
            print(c.dump_logs(), file=sys.stderr)
            raise
        finally:
            c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--writes", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = asyncio.run(asyncio.wait_for(run(a.rounds, a.writes), 60 + 30 * a.rounds))
    summary = {k: statistics.median(r[k] for r in rows) for k in ("first_ms", "yardstick_ms", "added_ms")}
    if a.json:
        print(json.dumps({"rounds": rows, "median": summary}, indent=2))
        return 0
    for r in rows:
        print(f"{r['move']}: first command {r['first_ms']:.1f} ms, yardstick {r['yardstick_ms']:.2f} ms, "
              f"added {r['added_ms']:.1f} ms")
    print(f"median over {len(rows)} pulled moves: first command {summary['first_ms']:.1f} ms, "
          f"yardstick {summary['yardstick_ms']:.2f} ms, added {summary['added_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
