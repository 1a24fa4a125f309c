"""Process and port helpers shared by the benchmark scripts (not a benchmark)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    """Wait until something listens on host:port; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def env() -> dict[str, str]:
    """The environment for ``python -m prmigrate.cli``: this checkout's sources."""
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    return e


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


_IOPS = re.compile(r"iops average (\d+)")


def iscsi_perf(url: str, qd: int, seconds: int, initiator: str | None = None) -> int:
    """4 KiB random reads (``iscsi-perf -r -b 8``) at queue depth ``qd``: average IOPS."""
    args = ["iscsi-perf", "-m", str(qd), "-b", "8", "-t", str(seconds), "-r", url]
    if initiator is not None:
        args[1:1] = ["-i", initiator]
    p = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30, check=False)
    found = _IOPS.findall(p.stdout.replace("\r", "\n") + p.stderr)
    if not found:
        raise RuntimeError(f"iscsi-perf gave no result for {url}: {p.stdout[-500:]} {p.stderr[-500:]}")
    return int(found[-1])


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds used by this process's waited-for children (iscsi-perf)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_QEMU_RUN = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(url: str, write: bool, count: int = 100000, qd: int = 32,
                   initiator: str | None = None) -> float:
    """``qemu-img bench`` (QEMU's libiscsi block driver, a second client)
    on an ``iscsi://HOST:PORT/TARGET/LUN`` URL: 4 KiB requests at queue depth
    ``qd``, sequential offsets; IOPS."""
    m = re.match(r"iscsi://([^/]+)/([^/]+)/(\d+)$", url)
    if m is None:
        raise ValueError(f"not an iscsi:// URL: {url}")
    opts = f"driver=iscsi,transport=tcp,portal={m.group(1)},target={m.group(2)},lun={m.group(3)}"
    if initiator is not None:
        opts += f",initiator-name={initiator}"
    args = ["qemu-img", "bench", "-c", str(count), "-d", str(qd), "-s", "4k", "--image-opts", opts]
    if write:
        args.insert(2, "-w")
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    found = _QEMU_RUN.findall(p.stdout + p.stderr)
    if p.returncode != 0 or not found:
        raise RuntimeError(f"qemu-img bench failed on {url}: {p.stdout[-500:]} {p.stderr[-500:]}")
    return count / float(found[-1])


class Scraper:
    """Scrapes a metrics endpoint every ``interval`` seconds until stopped."""

    def __init__(self, addr: str, interval: float) -> None:
        self.addr, self.interval = addr, interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=10) as resp:
                resp.read()
            self.scrapes += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(15)
        return self.scrapes
