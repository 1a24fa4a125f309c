#!/usr/bin/env python3
"""The host daemon's own CPU per relayed 4 KiB read and per relayed 4 KiB write, without sockets.

Not a test. ``bench_passthrough.py`` measures the daemon process, whose CPU
per command also holds the kernel's socket work and the wake-ups, which
depend on the machine's load and on how the guest and the backend send;
this one measures only the Python work of the relayed data path, in
process (``process_time``): a logged-in guest-facing ``Connection`` (the
frontend) over a logical unit whose ``relay_read`` / ``relay_write`` hand
each command to a logged-in ``InitiatorCore`` (the backend session) as
``PassthroughDevice`` does (``submit_relay``, the frontend as the sink),
fed batches of 32 READ(10) or 32 WRITE(10) of 4 KiB with immediate data;
the core's commands are taken (``data_to_send``) and the backend's answers
(a Data-In with status per read, a SCSI Response GOOD per write, packed
before the clock runs) fed back, ending in the frontend's answers to the
guest, sent with one write as the daemon's ``flushpoint`` sends them. A
read batch and a write batch in turn, ``--rounds`` times; medians, each
round's write / read ratio. The device's eligibility check (``LinkTable.relay_session``)
and the asyncio shells are not in it.

    python benchmarks/bench_relay_path.py [--rounds 7] [--batches 2000]
    python benchmarks/bench_relay_path.py --baseline-src /work/other/src   # both trees, alternating
    python benchmarks/bench_relay_path.py --split-writes   # a write batch in three reads

``--baseline-src``: each round also runs the same measurement on another
source tree (a subprocess per tree and round, alternating), and prints
both trees' figures. ``--split-writes``: each write batch reaches the
frontend in three reads, the last write's BHS alone in the second, as
libiscsi's writes (BHS and data in two system calls) often arrive in the
daemon (in a ``qemu-img bench`` write run a quarter of its frontend reads
bring a lone BHS, about one per 40-55 writes); the read batches still
come in one read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.initiator_core import InitiatorCore, LoginDone, SessionConfig
from prmigrate.iscsi.login import encode_text
from prmigrate.iscsi.session import Connection, TargetNode, TargetSettings
from prmigrate.iscsi.target import IscsiTarget
from prmigrate.lun.unit import LogicalUnit

FRONTEND = "iqn.2026-11.org.prmigrate:bench-frontend"
BACKEND = "iqn.2026-11.org.prmigrate:bench-backend"
GUEST = "iqn.2026-11.org.prmigrate:bench-guest"
HOST = "iqn.2026-11.org.prmigrate:bench-host"
BATCH = 32


class RelayingUnit:
    """An LU that relays every read and write to ``core`` (the backend session)."""

    block_size = 512

    def __init__(self, core: InitiatorCore) -> None:
        self.core = core

    def execute(self, nexus: Any, cdb: bytes, data_out: Any = b"") -> Any:
        raise AssertionError(f"not relayed: {bytes(cdb[:1]).hex()}")

    def relay_read(self, nexus: Any, cdb: bytes, edtl: int, sink: Any, token: Any) -> bool:
        self.core.submit_relay(0, cdb, edtl, sink, token)
        return True

    def relay_write(self, nexus: Any, cdb: bytes, data: Any, sink: Any, token: Any) -> bool:
        self.core.submit_relay(0, cdb, 0, sink, token, 0.0, data)
        return True

    def attach(self, nexus: Any) -> None:
        pass

    def nexus_lost(self, nexus: Any) -> None:
        pass

    def reset(self, nexus: Any, cold: bool = False, target_reset: bool = False) -> None:
        pass

    def clear_task_set(self, nexus: Any) -> None:
        pass


def logged_in_core(tmp: Path) -> InitiatorCore:
    """An InitiatorCore logged in to an in-process ``prmigrate target`` connection."""
    lu = LogicalUnit(tmp / "backend.img", 1 << 20, name="bench-backend")
    backend = IscsiTarget([TargetNode(BACKEND, {0: lu})], TargetSettings())
    replies: list[bytes] = []
    conn = Connection(backend, "peer", ("127.0.0.1", 3260), lambda parts: replies.append(b"".join(parts)),
                      lambda: None)
    core = InitiatorCore(SessionConfig(HOST, 0x23D000000042, BACKEND, queue_depth=2 * BATCH))
    core.start_login(0.0)
    for _ in range(16):
        conn.data_received(core.data_to_send())
        events = core.receive_data(b"".join(replies), 0.0)
        replies.clear()
        if any(isinstance(e, LoginDone) for e in events):
            return core
    raise RuntimeError("the backend session did not log in")


def frontend(lu: RelayingUnit, deferred: list[Any]) -> tuple[Connection, list[int]]:
    """The guest's connection; its answers outside its own read event are
    sent when ``deferred`` is run (the daemon's ``flushpoint``: one write
    for what one backend read event answered)."""
    target = IscsiTarget([TargetNode(FRONTEND, {0: lu})], TargetSettings())
    sent: list[int] = []
    # joined as the transport's writelines joins them (the core's data_to_send joins its own)
    conn = Connection(target, "peer", ("127.0.0.1", 3260), lambda parts: sent.append(len(b"".join(parts))),
                      lambda: None, deferred.append)
    keys = [("InitiatorName", GUEST), ("TargetName", FRONTEND), ("SessionType", "Normal"),
            ("HeaderDigest", "None"), ("DataDigest", "None"), ("ImmediateData", "Yes"),
            ("MaxRecvDataSegmentLength", "262144")]
    conn.data_received(P.LoginRequest(isid=0x400000000001, tsih=0, itt=1, cid=0, cmdsn=1, exp_statsn=0,
                                      csg=1, nsg=3, transit=True, data=encode_text(keys)).encode())
    if conn.state != Connection.FULL_FEATURE:
        raise RuntimeError("the guest did not log in")
    return conn, sent


def measure_rounds(rounds: int, batches: int, split: bool = False) -> tuple[list[float], list[float]]:
    """CPU ns per relayed read and per relayed write, one pair per round."""
    with tempfile.TemporaryDirectory(prefix="prm-bench-relay-") as tmp:
        core = logged_in_core(Path(tmp))
        deferred: list[Any] = []
        conn, sent = frontend(RelayingUnit(core), deferred)
        cmdsn, itt, statsn = 1, 100, 1000
        data = bytes(4096)

        def guest_batch(write: bool) -> bytes:
            nonlocal cmdsn, itt
            out = []
            for i in range(BATCH):
                itt += 1
                cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, i * 8, 0, 8, 0)
                out.append(P.ScsiCommand(itt=itt, lun=0, cdb=cdb, cmdsn=cmdsn, expected_length=4096,
                                         read=not write, write=write, data=data if write else b"").encode())
                cmdsn += 1
            return b"".join(out)

        def backend_answers(write: bool) -> bytes:
            nonlocal statsn
            out = []
            exp = core.cmdsn
            for i in core._active:  # the ITTs the core gave the batch
                statsn += 1
                if write:
                    out.append(P._HDR_U32.pack(0x21, 0x80, 0, 0, 0, i, 0, statsn, exp, exp + 127, 0, 0, 0))
                else:
                    out.append(P._HDR_U32.pack(0x25, 0x81, 0, 4096, 0, i, P.RESERVED_TAG, statsn, exp, exp + 127,
                                               0, 0, 0) + data)
            return b"".join(out)

        def one(batch: bytes, write: bool) -> int:
            """CPU ns the daemon's side spends on one batch, guest to guest."""
            t0 = time.process_time_ns()
            if write and split:
                cut = len(batch) - 4096  # after the last write's BHS
                conn.data_received(batch[: cut - 48])
                conn.data_received(batch[cut - 48 : cut])
                conn.data_received(batch[cut:])
            else:
                conn.data_received(batch)
            core.data_to_send()
            t1 = time.process_time_ns()
            answers = backend_answers(write)
            t2 = time.process_time_ns()
            if core.receive_data(answers, 0.0):
                raise RuntimeError("a relayed command ended in an event")
            for fn in deferred:
                fn()
            deferred.clear()
            spent = t1 - t0 + time.process_time_ns() - t2
            if core._active or conn.pending:
                raise RuntimeError("a relayed command was not answered")
            sent.clear()
            return spent

        def measure() -> tuple[float, float]:
            """Reads and writes a batch each in turn (the machine's load
            drifts alike for both): CPU ns per read, per write."""
            spent = {False: 0, True: 0}
            for _ in range(batches):
                for write in (False, True):
                    spent[write] += one(guest_batch(write), write)
            n = batches * BATCH
            return spent[False] / n, spent[True] / n

        measure()  # warm up
        reads: list[float] = []
        writes: list[float] = []
        for _ in range(rounds):
            r, w = measure()
            reads.append(r)
            writes.append(w)
    return reads, writes


def run_tree(src: str, batches: int, split: bool) -> tuple[float, float]:
    """One round on another source tree, in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = src
    args = [sys.executable, __file__, "--worker", "--batches", str(batches)] + (["--split-writes"] if split else [])
    p = subprocess.run(args, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"worker on {src} failed: {p.stderr[-2000:]}")
    r, w = json.loads(p.stdout)
    return float(r), float(w)


def report(name: str, reads: list[float], writes: list[float]) -> None:
    ratios = [w / r for w, r in zip(writes, reads, strict=True)]
    print(f"  {name}READ(10) 4 KiB {statistics.median(reads):.0f} ns, WRITE(10) 4 KiB immediate data"
          f" {statistics.median(writes):.0f} ns, write / read {statistics.median(ratios):.2f}x"
          f" (rounds {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, default=2000, help=f"batches of {BATCH} per measurement")
    ap.add_argument("--baseline-src", metavar="DIR", help="another source tree, measured in the same run")
    ap.add_argument("--split-writes", action="store_true",
                    help="feed each write batch in three reads, the last write's BHS alone in the second")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        (r,), (w,) = measure_rounds(1, args.batches, args.split_writes)
        print(json.dumps([r, w]))
        return 0
    print(f"CPU ns per relayed command, frontend + backend session, in process, {BATCH} a batch,"
          f" {args.rounds} rounds (median; each round's write / read)"
          + ("; each write batch in three reads, its last BHS alone" if args.split_writes else ""))
    if not args.baseline_src:
        report("", *measure_rounds(args.rounds, args.batches, args.split_writes))
        return 0
    mine = str(Path(__file__).resolve().parents[1] / "src")
    got: dict[str, tuple[list[float], list[float]]] = {"this tree": ([], []), "baseline": ([], [])}
    for _ in range(args.rounds):
        for name, src in (("this tree", mine), ("baseline", args.baseline_src)):
            r, w = run_tree(src, args.batches, args.split_writes)
            got[name][0].append(r)
            got[name][1].append(w)
    for name, (reads, writes) in got.items():
        report(f"{name}: ", reads, writes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
