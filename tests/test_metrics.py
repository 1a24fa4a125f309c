"""The counters of the data path and their Prometheus export (counters.py, metrics.py).

An in-process target with a file-backed LU and our initiator: reads on the
read fast path, writes through Data-Out, PR OUT, a reservation conflict and
a unit attention; the families are rendered in Prometheus's text format by
the library, parsed back with its parser and checked against what was sent.
The HTTP endpoint is scraped over loopback; the daemon listener counts
migrations from their events.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from prmigrate.counters import (
    KIND_OF,
    LATENCY_BOUNDS_US,
    OTHER,
    READ,
    WRITE,
    LuCounters,
    latency_bucket,
)
from prmigrate.iscsi.initiator import connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.unit import LogicalUnit
from prmigrate.metrics import (
    DaemonStats,
    Histogram,
    MetricsServer,
    lu_families,
    parse_metrics_address,
)
from prmigrate.scsi.constants import PrOutAction, PrType, Status
from prmigrate.scsi.pr import pr_out_params

IQN = "iqn.2026-11.org.prmigrate:metrics"
I1 = "iqn.2026-11.org.prmigrate:m1"
I2 = "iqn.2026-11.org.prmigrate:m2"


class _Families(Collector):
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


def render(families: list[Any]) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(families))
    return generate_latest(reg).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          missing: float | None = None, **labels: str) -> float:
    hits = [v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls]
    if not hits and missing is not None:
        return missing
    assert hits, f"no sample {name} {labels}"
    return sum(hits)


def test_latency_buckets_are_powers_of_two_microseconds() -> None:
    assert latency_bucket(0) == 0
    assert latency_bucket(999) == 0  # < 1 us
    assert latency_bucket(1_000) == 1  # [1, 2) us
    assert latency_bucket(3_999) == 2
    assert latency_bucket(4_000) == 3
    assert latency_bucket(10**12) == len(LATENCY_BOUNDS_US)  # +Inf
    for i, bound in enumerate(LATENCY_BOUNDS_US):
        assert latency_bucket(bound * 1000 - 1) <= i
        assert latency_bucket(bound * 1000) == i + 1


def test_kinds() -> None:
    assert [KIND_OF[op] for op in (0x08, 0x28, 0xA8, 0x88)] == [READ] * 4
    assert [KIND_OF[op] for op in (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0x9C)] == [WRITE] * 6
    assert [KIND_OF[op] for op in (0x00, 0x12, 0x5E, 0x5F, 0x35, 0x42, 0x93)] == [OTHER] * 7


def test_answers_are_classified() -> None:
    c = LuCounters()
    ua = bytes([0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2A, 0x05, 0, 0, 0, 0])
    not_ready = bytes([0x70, 0, 0x02, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x04, 0x00, 0, 0, 0, 0])
    c.answered(Status.RESERVATION_CONFLICT, None, -1)
    c.answered(Status.CHECK_CONDITION, ua, -1)
    c.answered(Status.CHECK_CONDITION, not_ready, -1)
    c.answered(Status.GOOD, None, PrOutAction.REGISTER)
    c.answered(Status.RESERVATION_CONFLICT, None, PrOutAction.RESERVE)
    assert (c.conflicts, c.unit_attentions) == (2, 1)
    assert c.statuses == {0x18: 2, 0x02: 2}  # GOOD: every answer in the histograms but these
    c.latencies(READ, 10, 5_000)
    c.latencies(OTHER, 5, 5_000)
    assert c.answers() == 15 and c.good() == 11
    assert c.pr_out == {(0, 0): 1, (1, 0x18): 1}


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 2.0):
        h.observe(v)
    assert h.buckets() == [("0.001", 2.0), ("0.01", 3.0), ("+Inf", 4.0)]
    assert abs(h.total - 2.0065) < 1e-9


def test_daemon_stats_count_finished_migrations() -> None:
    stats = DaemonStats()
    stats({"event": "MIGRATION", "data": {"role": "source", "status": "setup"}})
    stats({"event": "MIGRATION", "data": {"role": "source", "status": "completed", "finished": True,
                                          "timings": {"pause_s": 0.004, "takeover_s": 0.0007}}})
    stats({"event": "MIGRATION", "data": {"role": "source", "status": "rolled_back", "finished": True,
                                          "timings": {"pause_s": None, "takeover_s": None}}})
    stats({"event": "MIGRATION_REFUSED", "data": {"peer": "x", "reason": "TLS"}})
    stats({"event": "PR_STATE_CHANGED", "data": {"device": "vm1", "changes": [{}, {}]}})
    stats({"event": "PR_RECONCILED", "data": {"device": "vm1", "error": None}})
    stats({"event": "PR_RECONCILED", "data": {"device": "vm1", "error": "backend down"}})
    assert stats.migrations == {("source", "completed"): 1, ("source", "rolled_back"): 1}
    assert stats.pause["source"].counts[3] == 1 and sum(stats.pause["source"].counts) == 1
    assert sum(stats.takeover["source"].counts) == 1
    assert stats.refused == 1 and stats.pr_changes == {"vm1": 2}
    assert stats.reconciliations == {("vm1", "ok"): 1, ("vm1", "error"): 1}


def test_metrics_address() -> None:
    assert parse_metrics_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_metrics_address("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:0", "host:70000", ":9464"):
        try:
            parse_metrics_address(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


async def _traffic(tmp: Path) -> tuple[IscsiTarget, dict[str, Any]]:
    lu = LogicalUnit(tmp / "lu.img", 8 << 20, lun=0, name=f"{IQN}/0")
    target = IscsiTarget([TargetNode(IQN, {0: lu})])
    (host, port), *_ = await target.start("127.0.0.1", 0)
    url = f"iscsi://{host}:{port}/{IQN}/0"
    s1 = await connect(url, initiator_name=I1, isid=0x23D000000001, reconnect=False, command_timeout=10)
    s2 = await connect(url, initiator_name=I2, isid=0x23D000000002, reconnect=False, command_timeout=10)
    try:
        before = samples(render(lu_families(target)))
        for i in range(40):
            await s1.write(i * 8, bytes([i]) * 4096)  # 8 blocks each
        reads = await asyncio.gather(*(s1.read(i * 8, 8) for i in range(100)))
        assert all(len(r) == 4096 for r in reads)
        assert (await s1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 0x11))).good
        assert (await s2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 0x22))).good
        assert (await s1.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(0x11, 0))).good
        # I2 writes under I1's WRITE EXCLUSIVE: RESERVATION CONFLICT (SPC-5 5.14.6)
        r = await s2.submit(0, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), bytes(512))
        assert r.status == Status.RESERVATION_CONFLICT
        # I1 preempts I2: I2's next command gets a unit attention (2A/05)
        r = await s1.pr_out(PrOutAction.PREEMPT, PrType.WRITE_EXCLUSIVE, pr_out_params(0x11, 0x22))
        assert r.good, r
        r = await s2.submit(0, bytes(6), b"")  # TEST UNIT READY
        assert r.status == Status.CHECK_CONDITION
        return target, before
    finally:
        await s1.close()
        await s2.close()


def test_counters_follow_the_traffic(tmp_path: Path) -> None:
    async def go() -> None:
        target, before = await _traffic(tmp_path)
        try:
            after = samples(render(lu_families(target)))
        finally:
            await target.close()
        labels = {"node": IQN, "lun": "0"}

        def moved(name: str, **extra: str) -> float:
            return value(after, name, **labels, **extra) - value(before, name, 0.0, **labels, **extra)

        assert moved("prmigrate_scsi_commands_total", kind="read") == 100
        assert moved("prmigrate_scsi_bytes_total", kind="read") == 100 * 4096
        assert moved("prmigrate_scsi_commands_total", kind="write") == 41  # 40 + the refused one
        assert moved("prmigrate_scsi_bytes_total", kind="write") == 40 * 4096 + 512
        assert moved("prmigrate_scsi_commands_total", kind="other") >= 5  # PR OUTs, TEST UNIT READY
        assert moved("prmigrate_scsi_command_latency_seconds_count", kind="read") == 100
        assert moved("prmigrate_scsi_command_latency_seconds_count", kind="write") == 41
        assert 0 < moved("prmigrate_scsi_command_latency_seconds_sum", kind="read") < 100
        inf = value(after, "prmigrate_scsi_command_latency_seconds_bucket", **labels, kind="read", le="+Inf")
        assert inf == value(after, "prmigrate_scsi_command_latency_seconds_count", **labels, kind="read")
        assert moved("prmigrate_reservation_conflicts_total") == 1
        assert moved("prmigrate_unit_attentions_total") == 1
        assert moved("prmigrate_scsi_status_total", status="RESERVATION_CONFLICT") == 1
        assert moved("prmigrate_pr_out_total", service_action="REGISTER", status="GOOD") == 2
        assert moved("prmigrate_pr_out_total", service_action="RESERVE", status="GOOD") == 1
        assert moved("prmigrate_pr_out_total", service_action="PREEMPT", status="GOOD") == 1

    asyncio.run(asyncio.wait_for(go(), 60))


def test_endpoint_serves_the_families_over_http(tmp_path: Path) -> None:
    async def go() -> None:
        target, _ = await _traffic(tmp_path)
        server = MetricsServer(lambda: lu_families(target))
        try:
            host, port = server.start("127.0.0.1", 0)

            def scrape() -> tuple[str, str]:
                with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
                    return resp.headers["Content-Type"], resp.read().decode()

            ctype, text = await asyncio.to_thread(scrape)
            assert ctype.startswith("text/plain")
            parsed = samples(text)
            assert value(parsed, "prmigrate_scsi_commands_total", node=IQN, kind="read") >= 100
            assert value(parsed, "prmigrate_iscsi_sessions", node=IQN) == 0  # both logged out
        finally:
            server.close()
            await target.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_endpoint_address_in_use_is_a_clear_error() -> None:
    async def go() -> None:
        first = MetricsServer(lambda: [])
        host, port = first.start("127.0.0.1", 0)
        try:
            second = MetricsServer(lambda: [])
            try:
                second.start(host, port)
            except ValueError as e:
                assert f"cannot serve metrics on {host}:{port}" in str(e)
            else:
                second.close()
                raise AssertionError("a second endpoint on the same port")
        finally:
            first.close()

    asyncio.run(asyncio.wait_for(go(), 30))


def test_host_toml_keys() -> None:
    from prmigrate.host.config import HostConfigError, from_mapping

    cfg = from_mapping({"host": {"name": "h", "metrics": "127.0.0.2:9464",
                                 "migrate-tls-dir": "/etc/prmigrate/tls"}}).validate()
    assert cfg.metrics == "127.0.0.2:9464"
    assert str(cfg.migrate_tls_dir) == "/etc/prmigrate/tls"
    assert from_mapping({"host": {"name": "h"}}).validate().metrics is None
    try:
        from_mapping({"host": {"name": "h", "metrics": "9464"}}).validate()
    except HostConfigError as e:
        assert "metrics address '9464' is not ADDR:PORT" in str(e)
    else:
        raise AssertionError("a metrics address without a port accepted")
