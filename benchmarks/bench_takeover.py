#!/usr/bin/env python3
"""PR takeover inside the guest pause: prmigrate (one PREEMPT) vs QEMU 11
(REGISTER + PREEMPT), same run, over a link with added latency.

Not a test. Starts ``prmigrate target`` on 127.0.0.1, a delaying TCP proxy
in this process (``--delay-ms`` each way, default 5: the kernel here has no
netem), and host daemons A (127.0.0.2) and B (127.0.0.3) whose backend URL
goes through the proxy. A guest (our initiator, on A's frontend) registers
a key and holds a WRITE EXCLUSIVE reservation. The device then moves
A -> B -> A ... ``--rounds`` times per strategy, the strategies alternating
move by move (``prmigrate``: the key is registered on B during setup and
the pause holds one PREEMPT; ``qemu``: QEMU 11's REGISTER + PREEMPT, both
inside the pause). A second device, vm2, on LUN 1 of the same target
reaches it on two paths (the target listens on a second portal, behind its
own delaying proxy; ``backend=`` twice, one backend nexus per path) and
moves with ``prmigrate`` after each move of vm1 (``prmigrate-2-paths``): its
pause also holds one PREEMPT, the other path registering again after it.
Per strategy: medians of the guest pause, the PR
takeover (source view: from the guest held to TAKEOVER_DONE) and the
destination's own PR time, the backend PR round trips inside the pause, and
the ratio qemu / prmigrate. Everything started is stopped at the end.

    python benchmarks/bench_takeover.py [--delay-ms 5] [--rounds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)

from _common import free_port, stop  # noqa: E402

from prmigrate.host.control import control_call  # noqa: E402
from prmigrate.iscsi.initiator import connect  # noqa: E402
from prmigrate.scsi.constants import PrOutAction, PrType  # noqa: E402
from prmigrate.scsi.pr import pr_out_params  # noqa: E402

SHARED = "iqn.2026-11.org.prmigrate:bench-shared"
FRONTEND = "iqn.2026-11.org.prmigrate:bench-vm1"
FRONTEND2 = "iqn.2026-11.org.prmigrate:bench-vm2"
GUEST = "iqn.2026-11.org.prmigrate:bench-guest"
GUEST2 = "iqn.2026-11.org.prmigrate:bench-guest2"
KEY = 0x5EED000000000001
KEY2 = 0x5EED000000000002
TWO_PATHS = "prmigrate-2-paths"
SECRET = "bench-cluster-secret-0123456789"


async def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {host}:{port}")
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port}") from None
            await asyncio.sleep(0.05)


class DelayProxy:
    """Forwards TCP to ``target``, every chunk ``delay`` seconds late in each
    direction (order kept: constant delay, writes scheduled in arrival order)."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, host: str = "127.0.0.1") -> int:
        self.server = await asyncio.start_server(self._client, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        self._writers += [w, w2]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(r, w2), self._pipe(r2, w), return_exceptions=True)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await r.read(1 << 16)
                if not data:
                    break
                loop.call_at(loop.time() + self.delay, _write, w, data)
        except (ConnectionError, OSError):
            pass
        finally:
            loop.call_at(loop.time() + self.delay, w.close)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.transport.abort()


def _write(w: asyncio.StreamWriter, data: bytes) -> None:
    if not w.is_closing():
        w.write(data)


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "prmigrate.cli", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env)


async def migrate(control: Path, to: str, strategy: str, device: str = "vm1") -> dict[str, Any]:
    started = await control_call(control, "migrate", {"device": device, "to": to, "strategy": strategy})
    deadline = time.monotonic() + 60
    while True:
        (rec,) = await control_call(control, "query-migrate", {"device": device})
        if rec["id"] == started["id"] and rec["finished"]:
            if not rec["success"]:
                raise RuntimeError(f"migration failed: {rec['reason']}")
            return rec
        if time.monotonic() > deadline:
            raise TimeoutError("migration did not finish")
        await asyncio.sleep(0.01)


async def wait_device(control: Path, present: bool, device: str = "vm1") -> None:
    deadline = time.monotonic() + 20
    while True:
        names = [d["name"] for d in await control_call(control, "query-devices")]
        if (device in names) == present:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("device did not move")
        await asyncio.sleep(0.02)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    proxy: DelayProxy | None = None
    proxy2: DelayProxy | None = None
    guest = guest2 = None
    try:
        tport, tport2 = free_port("127.0.0.1"), free_port("127.0.0.4")
        target = spawn(["target", "--listen", f"127.0.0.1:{tport}", "--listen", f"127.0.0.4:{tport2}",
                        "--iqn", SHARED, "--size", "64M",
                        "--lun", f"0={work / 'lun0.img'}", "--lun", f"1={work / 'lun1.img'}"], work / "target.log")
        procs.append(target)
        await wait_port("127.0.0.1", tport, target)
        await wait_port("127.0.0.4", tport2, target)
        proxy = DelayProxy(("127.0.0.1", tport), args.delay_ms / 1000)
        pport = await proxy.start()
        proxy2 = DelayProxy(("127.0.0.4", tport2), args.delay_ms / 1000)
        pport2 = await proxy2.start()
        backend = f"iscsi://127.0.0.1:{pport}/{SHARED}/0"
        two_paths = f"backend=iscsi://127.0.0.1:{pport}/{SHARED}/1,backend=iscsi://127.0.0.1:{pport2}/{SHARED}/1"
        (work / "secret").write_text(SECRET)
        hosts: dict[str, dict[str, Any]] = {}
        for name, addr in (("hosta", "127.0.0.2"), ("hostb", "127.0.0.3")):
            port, mport = free_port(addr), free_port(addr)
            control = work / f"{name}.sock"
            cmd = ["host", "--name", name, "--initiator", f"iqn.2026-11.org.prmigrate:bench-{name}",
                   "--listen", f"{addr}:{port}", "--control", str(control),
                   "--state-dir", str(work / f"{name}-state"),
                   "--migrate-listen", f"{addr}:{mport}", "--secret-file", str(work / "secret")]
            if name == "hosta":
                cmd += ["--device", f"name=vm1,backend={backend},target={FRONTEND},machine=pc-q35-11.0",
                        "--device", f"name=vm2,{two_paths},frontend={FRONTEND2},machine=pc-q35-11.0"]
            p = spawn(cmd, work / f"{name}.log")
            procs.append(p)
            await wait_port(addr, port, p)
            await wait_port(addr, mport, p)
            hosts[name] = {"control": control, "migrate": f"{addr}:{mport}", "url": f"iscsi://{addr}:{port}/{FRONTEND}/0",
                           "url2": f"iscsi://{addr}:{port}/{FRONTEND2}/0"}
        guest = await connect(hosts["hosta"]["url"], initiator_name=GUEST, isid=0x23D000000077,
                              command_timeout=30, reconnect_timeout=60)
        guest2 = await connect(hosts["hosta"]["url2"], initiator_name=GUEST2, isid=0x23D000000078,
                               command_timeout=30, reconnect_timeout=60)
        for g, key in ((guest, KEY), (guest2, KEY2)):
            for action, rtype, rk, sark in ((PrOutAction.REGISTER, 0, 0, key),
                                            (PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, key, 0)):
                r = await g.pr_out(action, rtype, pr_out_params(rk, sark))
                if not r.good:
                    raise RuntimeError(f"guest PR setup: {r}")
        results: dict[str, list[dict[str, Any]]] = {"prmigrate": [], "qemu": [], TWO_PATHS: []}
        where = "hosta"
        order = ["prmigrate", "qemu"]
        for i in range(args.rounds * 2):
            strategy = order[i % 2] if (i // 2) % 2 == 0 else order[1 - i % 2]
            dst = "hostb" if where == "hosta" else "hosta"
            rec = await migrate(hosts[where]["control"], hosts[dst]["migrate"], strategy)
            await wait_device(hosts[where]["control"], False)
            results[strategy].append(rec["timings"])
            # the guest follows (redirect) and keeps writing through its reservation
            await guest.write(i, os.urandom(512))
            rec2 = await migrate(hosts[where]["control"], hosts[dst]["migrate"], "prmigrate", "vm2")
            await wait_device(hosts[where]["control"], False, "vm2")
            results[TWO_PATHS].append(rec2["timings"])
            await guest2.write(i, os.urandom(512))
            where = dst
            if not args.json:
                for name, t in ((strategy, rec["timings"]), (TWO_PATHS, rec2["timings"])):
                    print(f"  {i + 1:3d} {name:17s} {'A->B' if dst == 'hostb' else 'B->A'}  "
                          f"pause {t['pause_s'] * 1000:7.2f} ms  takeover {t['takeover_s'] * 1000:7.2f} ms  "
                          f"dest PR {t['peer_takeover_us'] / 1000:7.2f} ms  round trips {t['round_trips_in_pause']}",
                          flush=True)
        summary: dict[str, Any] = {"delay_ms_each_way": args.delay_ms, "rounds": args.rounds}
        for s, runs in results.items():
            summary[s] = {
                "pause_ms": med([r["pause_s"] * 1000 for r in runs]),
                "takeover_ms": med([r["takeover_s"] * 1000 for r in runs]),
                "dest_pr_ms": med([r["peer_takeover_us"] / 1000 for r in runs]),
                "round_trips_in_pause": med([r["round_trips_in_pause"] for r in runs]),
            }
        summary["ratio_pause_qemu_over_prmigrate"] = summary["qemu"]["pause_ms"] / summary["prmigrate"]["pause_ms"]
        summary["ratio_takeover_qemu_over_prmigrate"] = summary["qemu"]["takeover_ms"] / summary["prmigrate"]["takeover_ms"]
        summary["ratio_dest_pr_qemu_over_prmigrate"] = summary["qemu"]["dest_pr_ms"] / summary["prmigrate"]["dest_pr_ms"]
        return summary
    finally:
        for g in (guest, guest2):
            if g is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(g.close(), 5)
        for p in reversed(procs):
            stop(p)
        for px in (proxy, proxy2):
            if px is not None:
                await px.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, default=5.0, help="added latency each way, hosts <-> target")
    ap.add_argument("--rounds", type=int, default=10, help="migrations per strategy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # The guest's own initiator logs each hand-over at WARNING: expected here.
    logging.getLogger("prmigrate").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp:
        if not args.json:
            print(f"PR takeover benchmark: {args.rounds} moves per strategy, +{args.delay_ms:g} ms each way "
                  f"between the hosts and the target")
        s = asyncio.run(bench(args, Path(tmp)))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print()
    print(f"{'strategy':17s} {'pause':>10s} {'takeover':>10s} {'dest PR':>10s} {'round trips':>12s}   (medians)")
    for name in ("prmigrate", "qemu", TWO_PATHS):
        r = s[name]
        print(f"{name:17s} {r['pause_ms']:8.2f} ms {r['takeover_ms']:8.2f} ms {r['dest_pr_ms']:8.2f} ms "
              f"{r['round_trips_in_pause']:12g}")
    print(f"qemu / prmigrate: pause x{s['ratio_pause_qemu_over_prmigrate']:.2f}, "
          f"takeover x{s['ratio_takeover_qemu_over_prmigrate']:.2f}, "
          f"destination PR time x{s['ratio_dest_pr_qemu_over_prmigrate']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
