"""Prometheus metrics of real processes, scraped over HTTP during real traffic.

``prmigrate target`` and two ``prmigrate host`` daemons with ``--metrics``
on loopback ports; qemu-io (libiscsi) writes and verifies a pattern through
host A's guest frontend and iscsi-perf reads for three seconds (scraped twice while it runs); ``prmigrate
pr`` registers the guest's key through the frontend; then the device moves
to B. Each endpoint is scraped with HTTP and parsed with prometheus-client's
parser: the command, byte and latency counters moved with the traffic on
the host (label device="vm1") and on the target (the host's backend
traffic), PR OUT REGISTER is counted by service action and status on both,
the backend session is up, and each side counts the migration by outcome
with the source's guest pause and the destination's takeover in their
histograms.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import need
from .migration_cluster import FRONTEND, GUEST, cluster, env, free_port

pytestmark = pytest.mark.interop

PERF = "iqn.2026-11.org.prmigrate:perf"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(addr: str) -> Samples:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with these labels (0 when none)."""
    return sum(v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls)


def test_metrics_move_with_real_traffic_and_a_migration(tmp_path: Path) -> None:
    need("qemu-io", "iscsi-perf")
    ports = {"target": ("127.0.0.1", free_port("127.0.0.1")), "hosta": ("127.0.0.2", free_port("127.0.0.2")),
             "hostb": ("127.0.0.3", free_port("127.0.0.3"))}
    addr = {k: f"{h}:{p}" for k, (h, p) in ports.items()}
    with cluster(tmp_path, target_args=["--metrics", addr["target"]],
                 host_args={"hosta": ["--metrics", addr["hosta"]], "hostb": ["--metrics", addr["hostb"]]}) as c:
        a = c.procs["hosta"]
        t0, a0 = scrape(addr["target"]), scrape(addr["hosta"])
        dev = {"device": "vm1"}

        # qemu-io: 1 MiB pattern written and read back through A's frontend
        p = subprocess.run(
            ["qemu-io", "--image-opts",
             f"driver=iscsi,transport=tcp,portal={a.host}:{a.port},target={FRONTEND},lun=0,"
             f"initiator-name={GUEST}",
             "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"],
            capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0 and "failed" not in p.stdout.lower(), p.stdout + p.stderr
        # iscsi-perf: 4 KiB random reads for 3 s, as another guest; scraped
        # twice while it runs
        perf = subprocess.Popen(["iscsi-perf", "-i", PERF, "-m", "8", "-b", "8", "-t", "3", "-r",
                                 c.frontend_url("hosta")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            time.sleep(1.0)
            during1 = scrape(addr["hosta"])
            time.sleep(0.5)
            during2 = scrape(addr["hosta"])
            perf_out = perf.communicate(timeout=30)[0].decode(errors="replace")
        finally:
            if perf.poll() is None:
                perf.kill()
                perf.wait(5)
        assert "iops average" in perf_out.replace("\r", "\n"), perf_out
        moving = [value(s, "prmigrate_scsi_commands_total", kind="read", **dev) for s in (during1, during2)]
        assert moving[1] - moving[0] > 100, moving  # half a second of reads between the scrapes
        assert value(during2, "prmigrate_backend_session_up", device="vm1", guest=PERF) == 1
        assert value(during2, "prmigrate_iscsi_sessions", node=FRONTEND) == 1
        # prmigrate pr: the guest registers its key through the frontend
        p = subprocess.run([sys.executable, "-m", "prmigrate.cli", "pr", "--initiator", GUEST, "-G",
                            "-S", "0x6d657472696373", c.frontend_url("hosta")],
                           capture_output=True, text=True, timeout=60, env=env(), check=False)
        assert p.returncode == 0, p.stdout + p.stderr

        t1, a1 = scrape(addr["target"]), scrape(addr["hosta"])
        # the host: per device, what the guests sent
        reads = value(a1, "prmigrate_scsi_commands_total", kind="read", **dev) - value(
            a0, "prmigrate_scsi_commands_total", kind="read", **dev)
        writes = value(a1, "prmigrate_scsi_commands_total", kind="write", **dev) - value(
            a0, "prmigrate_scsi_commands_total", kind="write", **dev)
        assert reads > 1000, reads  # two seconds of iscsi-perf, and qemu-io's read
        assert writes >= 1, writes
        assert value(a1, "prmigrate_scsi_bytes_total", kind="write", **dev) - value(
            a0, "prmigrate_scsi_bytes_total", kind="write", **dev) >= 1 << 20
        assert value(a1, "prmigrate_scsi_command_latency_seconds_count", kind="read", **dev) >= reads
        assert value(a1, "prmigrate_scsi_command_latency_seconds_sum", kind="read", **dev) > 0
        assert value(a1, "prmigrate_pr_out_total", service_action="REGISTER", status="GOOD", **dev) == 1
        # the guests logged out: their backend nexuses are closed
        assert value(a1, "prmigrate_backend_session_up", device="vm1", guest=PERF) == 0
        assert value(a1, "prmigrate_device_pr_guests", device="vm1") == 1
        # the target: the host's backend traffic, and the forwarded REGISTER
        t_reads = value(t1, "prmigrate_scsi_commands_total", kind="read") - value(
            t0, "prmigrate_scsi_commands_total", kind="read")
        assert t_reads >= reads - 10, (t_reads, reads)  # the device forwards every guest read
        assert value(t1, "prmigrate_scsi_bytes_total", kind="write") - value(
            t0, "prmigrate_scsi_bytes_total", kind="write") >= 1 << 20
        assert value(t1, "prmigrate_pr_out_total", service_action="REGISTER", status="GOOD") - value(
            t0, "prmigrate_pr_out_total", service_action="REGISTER", status="GOOD") == 1
        assert value(t1, "prmigrate_iscsi_sessions") >= 1  # A's monitor nexus (the guests left)

        async def move() -> tuple[int, str]:
            return await c.migrate("hosta", "hostb")

        code, out = asyncio.run(asyncio.wait_for(move(), 120))
        assert code == 0, out
        a2, b2 = _settled(addr["hosta"], "source"), _settled(addr["hostb"], "destination")
        assert value(a2, "prmigrate_migrations_total", role="source", outcome="completed") == 1
        assert value(a2, "prmigrate_migration_pause_seconds_count", role="source") == 1
        assert 0 < value(a2, "prmigrate_migration_pause_seconds_sum", role="source") < 10
        assert value(b2, "prmigrate_migrations_total", role="destination", outcome="resumed") == 1
        assert value(b2, "prmigrate_migration_takeover_seconds_count", role="destination") == 1
        assert value(b2, "prmigrate_device_pr_guests", device="vm1") == 1


def _settled(addr: str, role: str) -> Any:
    """Scrape until the finished migration is counted (its event comes last)."""
    for _ in range(100):
        s = scrape(addr)
        if value(s, "prmigrate_migrations_total", role=role):
            return s
        time.sleep(0.05)
    return scrape(addr)
