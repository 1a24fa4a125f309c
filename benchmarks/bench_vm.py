#!/usr/bin/env python3
"""A real guest's I/O across pushed moves: the longest stall per move and the
added latency of its first command after the move.

Not a test. Boots the guest of ``scripts/build-guest.sh`` (built when
missing) under TCG, twice:

- ``libiscsi``: a QEMU VM whose disk is host A's frontend LUN through
  virtio-scsi + ``scsi-block`` over ``iscsi://`` (QEMU's libiscsi is the
  initiator; everything on loopback);
- ``open-iscsi``: the kernel initiator inside the VM (iscsid + iscsiadm),
  its network a tap on a bridge in a network namespace made for the run.

In each, the guest registers a key and reserves (fence_scsi's unfence), then
writes 4 KiB blocks with O_DIRECT and reads each back, while ``prmigrate
migrate`` moves the device A -> B -> A ... ``--moves`` times. Per move: the
longest interval between two I/O completions in the guest that began while
``prmigrate migrate`` ran (the stall; the guest's clock is mapped to ours
through its console), and the latency of the command that followed it
minus the guest's median latency (the added latency of its first command
after the move). The yardstick, same run, same guest: the same measure over
an interval as long as the move, with no move (what TCG on this machine
costs anyway), and the median latency. The open-iscsi guest's QEMU runs
ahead of the host's other processes (``--guest-nice``, default -10; 0 runs
it as they run), and for it also the longest time it sat on a new,
established TCP connection before sending its Login Request (seen on its
tap): iscsid polls a connect for 1 ms and, when the handshake took longer
(under TCG on a busy host it now and then does), looks again only at its
next 1 s alarm; such a move is marked, and the summary gives the stall
less those waits (what is left of it once the guest's own connect polling
is taken out) next to the stall.

``--pull`` adds the libiscsi VM migrated by QEMU itself (QMP ``migrate`` to
a QEMU started with ``-incoming`` on the destination host's URL of an
incoming device, ``prmigrate device add ... incoming-from=``; the source
QEMU quits after it, tests/interop/vm_migration.py): per move the longest
I/O stall the guest saw (its clock does not run while QEMU pauses it for
the switchover, so this is the wait of its commands on the destination:
the pull), the added latency of its first command there, and QEMU's own
downtime figure of the switchover (query-migrate), next to the pushed
moves of the same guest.

``--tap-only`` counts just those waits over many moves: the open-iscsi
guest alone, its moves back to back, no I/O stall measured.

    python benchmarks/bench_vm.py [--moves 4] [--guest both|libiscsi|open-iscsi] [--pull]
                                  [--guest-nice -10] [--tap-only] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.interop.migration_cluster import ProcCluster  # noqa: E402
from tests.interop.vm import (  # noqa: E402
    BOOT_TIMEOUT,
    GUEST_IQN,
    GUEST_KEY,
    ISCSID_ALARM_S,
    OPEN_ISCSI_NICE,
    Guest,
    guest_image,
    open_iscsi_guest,
)
from tests.interop.vm_migration import VmRun, start_cluster  # noqa: E402

ALARM_MS = ISCSID_ALARM_S * 1000
SETTLE_S = 1.5  # each window: the move (or nothing) and this long after it
TAP_ONLY_GAP_S = 0.4  # --tap-only: between one move's end and the next


@contextlib.contextmanager
def libiscsi_guest(image: Path, workdir: Path) -> Iterator[tuple[ProcCluster, Guest]]:
    c = ProcCluster(workdir)
    c.start()
    g = Guest(image, workdir, "libiscsi-vm", {"mode": "libiscsi", "key": hex(GUEST_KEY)},
              ["-device", "virtio-scsi-pci",
               "-drive", f"file={c.frontend_url('hosta')},if=none,id=d0,format=raw,cache=none",
               "-device", "scsi-block,drive=d0", "-iscsi", f"initiator-name={GUEST_IQN}", "-nic", "none"])
    try:
        yield c, g.start()
    finally:
        g.stop()
        c.stop()


def push(c: ProcCluster, i: int) -> str:
    """Move ``i`` of a run with ``prmigrate migrate``: A -> B when ``i`` is
    even, B -> A when it is odd; its label."""
    src, dst = ("hosta", "hostb")[i % 2], ("hostb", "hosta")[i % 2]
    rc, text = asyncio.run(c.migrate(src, dst))
    if rc != 0:
        raise RuntimeError(f"migrate {src} -> {dst} failed:\n{text}")
    return f"{src} -> {dst}"


def measure_move(g: Guest, go: Any) -> dict[str, Any]:
    """One move: the longest gap in the guest's I/O that began while
    ``prmigrate migrate`` ran, and the latency of the command after it."""
    g.mark()
    t0 = time.monotonic()
    label = go()
    t1 = time.monotonic()
    time.sleep(SETTLE_S)
    w: dict[str, Any] = dict(g.mark())
    stall, after = g.stall_during(t0, t1)
    t2 = time.monotonic()
    conns = [] if g.connects is None else g.connects.between(t0, t2)
    answers = [c.answered - c.syn for c in conns if c.answered is not None]
    waits = None if g.connects is None else g.connects.login_waits(t0, t2)
    w.update(move=label, cli_s=t1 - t0, stall_s=stall, after_s=after,
             login_wait_s=None if waits is None else max(waits, default=None),
             waits_s=None if waits is None else sum(waits),
             syn_ack_s=max(answers, default=None))
    return w


def measure_quiet(g: Guest, length: float) -> dict[str, Any]:
    """The yardstick: the same measure over an interval as long as a move,
    with no move."""
    g.mark()
    t0 = time.monotonic()
    time.sleep(length)
    t1 = time.monotonic()
    time.sleep(SETTLE_S)
    w: dict[str, Any] = dict(g.mark())
    stall, after = g.stall_during(t0, t1)
    w.update(stall_s=stall, after_s=after)
    return w


def run_guest(kind: str, image: Path, moves: int, nice: int = OPEN_ISCSI_NICE) -> dict[str, Any]:
    """``nice``: the open-iscsi guest's QEMU (the libiscsi VM's runs at 0)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-vm-{kind}-") as d:
        started = (libiscsi_guest(image, Path(d)) if kind == "libiscsi"
                   else open_iscsi_guest(image, Path(d), nice))
        with started as (c, g):
            g.wait("ready", BOOT_TIMEOUT)
            g.wait("io")
            for _ in range(3):
                g.mark()
            moved, quiet = [], []
            for i in range(moves):
                moved.append(measure_move(g, lambda i=i: push(c, i)))
                quiet.append(measure_quiet(g, moved[-1]["cli_s"]))
            bad = [w for w in moved + quiet if w["errors"] or w["mismatches"] or not w["ops"]]
            if bad:
                raise RuntimeError(f"{kind}: I/O errors, mismatches or no I/O: {bad}\n{g.console_tail()}")
    median = statistics.median(w["median_us"] for w in quiet) / 1e6
    return {
        "guest": kind,
        "qemu_nice": nice if kind == "open-iscsi" else 0,
        # stall_ms 0.0: no gap of 20 ms or more began during the move
        "moves": [{"move": w["move"], "stall_ms": w["stall_s"] * 1000,
                   "first_after_ms": None if w["after_s"] is None else w["after_s"] * 1000,
                   "added_first_ms": None if w["after_s"] is None else max(0.0, w["after_s"] - median) * 1000,
                   "login_wait_ms": None if w["login_wait_s"] is None else w["login_wait_s"] * 1000,
                   # the stall less the guest's own waits on its established
                   # connections before it sent a Login Request
                   "stall_less_waits_ms": None if w["waits_s"] is None or not w["stall_s"]
                   else max(0.0, w["stall_s"] - w["waits_s"]) * 1000,
                   "syn_ack_ms": None if w["syn_ack_s"] is None else w["syn_ack_s"] * 1000}
                  for w in moved],
        "quiet_longest_gap_ms": [w["stall_s"] * 1000 for w in quiet],
        "median_latency_ms": median * 1000,
        "ops_per_s_quiet": round(statistics.median(w["ops"] / (w["window_us"] / 1e6) for w in quiet)),
    }


def run_pulled(image: Path, moves: int) -> dict[str, Any]:
    """The libiscsi VM migrated by QEMU ``moves`` times, A -> B -> A ...,
    each destination's device pulled on the VM's first command there."""
    with tempfile.TemporaryDirectory(prefix="bench-vm-pull-") as d:
        c = start_cluster(ProcCluster(Path(d)))
        run = VmRun(c, image, Path(d))
        try:
            run.boot()
            moved, quiet = [], []
            for i in range(moves):
                dst = ("hostb", "hosta")[i % 2]
                src = run.host
                run.vm.guest.mark()  # the move's window starts here (it goes on in the destination QEMU)
                t0 = time.monotonic()
                vm = run.move(dst)
                t1 = time.monotonic()
                time.sleep(SETTLE_S)
                w: dict[str, Any] = dict(vm.guest.mark())
                w.update(move=f"{src} -> {dst}", cli_s=t1 - t0, stall_s=w["max_gap_us"] / 1e6,
                         after_s=w["after_gap_us"] / 1e6 if w["max_gap_us"] >= 20_000 else None,
                         downtime_ms=run.downtimes_ms[-1])
                moved.append(w)
                for _ in range(2):
                    vm.guest.mark()  # the clock mapping of this QEMU's console
                quiet.append(measure_quiet(vm.guest, 1.0))
            bad = [w for w in moved + quiet if w["errors"] or w["mismatches"] or not w["ops"]]
            if bad:
                raise RuntimeError(f"pulled: I/O errors, mismatches or no I/O: {bad}\n{run.dump()}")
        finally:
            run.stop()
            c.stop()
    median = statistics.median(w["median_us"] for w in quiet) / 1e6
    return {
        "guest": "libiscsi",
        "kind": "pulled",
        "moves": [{"move": w["move"], "stall_ms": w["stall_s"] * 1000 if w["stall_s"] >= 0.02 else 0.0,
                   "first_after_ms": None if w["after_s"] is None else w["after_s"] * 1000,
                   "added_first_ms": None if w["after_s"] is None else max(0.0, w["after_s"] - median) * 1000,
                   "qemu_downtime_ms": w["downtime_ms"], "login_wait_ms": None, "syn_ack_ms": None}
                  for w in moved],
        "quiet_longest_gap_ms": [w["stall_s"] * 1000 for w in quiet],
        "median_latency_ms": median * 1000,
        "ops_per_s_quiet": round(statistics.median(w["ops"] / (w["window_us"] / 1e6) for w in quiet)),
    }


def run_connects(image: Path, moves: int, nice: int) -> dict[str, Any]:
    """``--tap-only``: the open-iscsi guest's moves back to back (each
    TAP_ONLY_GAP_S after the last), counting from its tap only: per TCP
    connection it opened, the end of its handshake after the host's SYN-ACK
    and iscsid's wait before its Login Request, ALARM_MS or more being its
    1 s alarm."""
    with tempfile.TemporaryDirectory(prefix="bench-vm-tap-") as d, \
            open_iscsi_guest(image, Path(d), nice) as (c, g):
        assert g.connects is not None
        g.wait("ready", BOOT_TIMEOUT)
        g.wait("io")
        t0 = time.monotonic()
        for i in range(moves):
            push(c, i)
            time.sleep(TAP_ONLY_GAP_S)
        time.sleep(SETTLE_S)
        seen = [((x.established - x.answered) * 1000, w * 1000) for x in g.connects.between(t0, time.monotonic())
                if x.answered is not None and x.established is not None and (w := x.login_wait) is not None]
    if not seen:
        raise RuntimeError("no connection of the guest's was seen on its tap")
    hs = sorted(h for h, _ in seen)
    waits = [w for _, w in seen]
    return {"guest": "open-iscsi", "kind": "tap-only", "qemu_nice": nice, "moves": moves,
            "connections": len(seen), "alarms": sum(1 for w in waits if w >= ALARM_MS),
            "handshake_ms": {"median": statistics.median(hs), "p99": hs[min(len(hs) - 1, int(len(hs) * 0.99))],
                             "max": hs[-1], "over_1ms": sum(1 for h in hs if h > 1.0)},
            "login_wait_ms": {"median": statistics.median(waits),
                              "max_without_alarm": max((w for w in waits if w < ALARM_MS), default=None)}}


def report_connects(r: dict[str, Any]) -> str:
    h, w = r["handshake_ms"], r["login_wait_ms"]
    return (f"== open-iscsi guest, its tap only (moves back to back; its QEMU at nice {r['qemu_nice']})\n"
            f"  {r['moves']} moves; connections that met iscsid's 1 s alarm: "
            f"{r['alarms']} of {r['connections']}\n"
            f"  the guest's handshake after the host's SYN-ACK: median {h['median']:.2f} ms, "
            f"99th percentile {h['p99']:.2f} ms, max {h['max']:.2f} ms ({h['over_1ms']} over 1 ms)\n"
            f"  iscsid's wait before its Login Request: median {w['median']:.2f} ms, "
            f"max {_ms(w['max_without_alarm'], '.2f')} ms without the alarm")


def _ms(v: float | None, fmt: str = "6.2f") -> str:
    return "   n/a" if v is None else format(v, fmt)


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        stalls = [m["stall_ms"] for m in r["moves"]]
        added = [m["added_first_ms"] for m in r["moves"] if m["added_first_ms"] is not None]
        how = ("VM migrated by QEMU, device pulled" if r.get("kind") == "pulled" else "pushed moves")
        if r.get("qemu_nice"):
            how += f", its QEMU at nice {r['qemu_nice']}"
        lines.append(f"== {r['guest']} guest ({how}; median I/O latency {r['median_latency_ms']:.2f} ms, "
                     f"{r['ops_per_s_quiet']} completions/s)")
        for m in r["moves"]:
            stall = f"{m['stall_ms']:8.1f}" if m["stall_ms"] else "   < 20"
            lines.append(f"  {m['move']:<16} longest stall {stall} ms   first command after it "
                         f"{_ms(m['first_after_ms'])} ms (+{_ms(m['added_first_ms'], '.2f')} ms)"
                         + (f"   QEMU downtime {m['qemu_downtime_ms']} ms" if "qemu_downtime_ms" in m else "")
                         + (f"   SYN-ACK {_ms(m['syn_ack_ms'], '.2f')} ms, login {m['login_wait_ms']:.0f} ms after the handshake"
                            + (" [iscsid's 1 s alarm]" if m["login_wait_ms"] >= ALARM_MS else "")
                            if m["login_wait_ms"] is not None else ""))
        stalls = [st or 20.0 for st in stalls]  # "< 20" counted as 20
        lines.append(f"  stall per move (< 20 counted as 20): median {statistics.median(stalls):.1f} ms, "
                     f"max {max(stalls):.1f} ms; "
                     f"added latency of the first command: median "
                     f"{_ms(statistics.median(added) if added else None, '.2f')} ms")
        less = [m["stall_less_waits_ms"] or 20.0 for m in r["moves"] if m.get("login_wait_ms") is not None]
        if less:
            slow = sum(1 for m in r["moves"] if (m["login_wait_ms"] or 0) >= ALARM_MS)
            lines.append(f"  stall less iscsid's waits on its established connections (< 20 counted as 20): "
                         f"median {statistics.median(less):.1f} ms, max {max(less):.1f} ms; "
                         f"moves with iscsid's 1 s alarm: {slow} of {len(r['moves'])}")
        q = r["quiet_longest_gap_ms"]
        q = [x or 20.0 for x in q]
        lines.append(f"  yardstick, same run: longest gap in an interval as long as a move, without one: "
                     f"median {statistics.median(q):.1f} ms, max {max(q):.1f} ms")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moves", type=int, default=4)
    ap.add_argument("--guest", choices=["both", "libiscsi", "open-iscsi"], default="both")
    ap.add_argument("--pull", action="store_true",
                    help="also the libiscsi VM migrated by QEMU, its device pulled by an incoming device")
    ap.add_argument("--guest-nice", type=int, default=OPEN_ISCSI_NICE,
                    help="the open-iscsi guest's QEMU's nice value (default %(default)s: ahead of the "
                         "daemons, the target and the CLI; 0: as they are)")
    ap.add_argument("--tap-only", action="store_true",
                    help="only the open-iscsi guest, its moves back to back, counted from its tap: "
                         "its handshakes and iscsid's waits before its logins (no I/O stall measured)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.moves < 1:
        ap.error("--moves must be at least 1")
    image = guest_image()  # outside the network namespace: the build downloads packages
    if a.tap_only:
        r = run_connects(image, a.moves, a.guest_nice)
        print(json.dumps(r, indent=2) if a.json else report_connects(r))
        return 0
    kinds = ["libiscsi", "open-iscsi"] if a.guest == "both" else [a.guest]
    results = [run_guest(k, image, a.moves, a.guest_nice) for k in kinds]
    if a.pull:
        results.append(run_pulled(image, a.moves))
    print(json.dumps(results, indent=2) if a.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
