"""Prometheus metrics of ``prmigrate target`` and ``prmigrate host`` (``--metrics ADDR:PORT``).

Off by default; imported only when asked for (prometheus-client costs
about 40 ms to import). Nothing is counted through the library on the data
path: the iSCSI connections add plain integers to the ``LuCounters`` of
each (node, LUN) (``counters.py``, ``IscsiTarget.lu_counters``), the host
daemon's events feed ``DaemonStats`` (migrations, refusals, PR changes,
reconciliations), and a custom collector turns both into metric families
when Prometheus scrapes.

The HTTP server is the library's (``start_http_server``, a thread). Every
scrape takes its snapshot on the event loop's thread
(``call_soon_threadsafe``), so the collector never reads an object the loop
is changing; a loop too busy to answer within ``SNAPSHOT_TIMEOUT`` gives a
scrape without the prmigrate families (and one log line per minute).

Metrics (all names start with ``prmigrate_``; ``node``/``lun`` name the
logical unit, on a host also ``device``)::

    scsi_commands_total{kind}            commands received, kind read|write|other
    scsi_bytes_total{kind}               bytes they asked to move (EDTL)
    scsi_command_latency_seconds{kind}   histogram: arrival of the PDU that completes
                                         the command -> its answer queued for writing
    scsi_status_total{status}            answers by SCSI status
    reservation_conflicts_total          RESERVATION CONFLICT answers
    unit_attentions_total                CHECK CONDITION / UNIT ATTENTION answers
    pr_out_total{service_action,status}  PERSISTENT RESERVE OUT answers
    iscsi_sessions{node}                 logged-in sessions (gauge)
  host only:
    backend_session_up{device,guest}     1 while the guest's backend nexus is logged in
    device_held{device}                  1 while a migration holds the guest's commands
    device_pr_guests{device}             guests with tracked PR state
    migrations_total{role,outcome}       finished migrations (outcome: the final state)
    migration_pause_seconds{role}        histogram: guest pause of finished migrations
    migration_takeover_seconds{role}     histogram: PR takeover of finished migrations
    migrations_refused_total             migration peers refused (secret, TLS)
    pr_state_changes_total{device}       tracked PR state changes
    reconciliations_total{device,result} verifications against the LUN (ok|error)
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .counters import KINDS, LATENCY_BOUNDS_US, LuCounters
from .scsi.constants import PrOutAction, Status

if TYPE_CHECKING:
    from .host.daemon import HostDaemon
    from .iscsi.target import IscsiTarget

log = logging.getLogger("prmigrate.metrics")

SNAPSHOT_TIMEOUT = 5.0
_LATENCY_LE = tuple(f"{b / 1e6:g}" for b in LATENCY_BOUNDS_US)
# guest pause and PR takeover of a migration (seconds)
MIGRATION_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class MetricsError(ValueError):
    """A ``--metrics`` address that cannot be served."""


def parse_metrics_address(text: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise MetricsError(f"metrics address {text!r} is not ADDR:PORT")
    return host.strip("[]"), int(port)


def _name(enum: Any, value: int) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{value:02x}"


class Histogram:
    """Fixed buckets (``bounds``, then +Inf), for values that come rarely
    (migrations): ``observe`` runs on the loop thread."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        return _cumulative([f"{b:g}" for b in self.bounds], self.counts)


def _cumulative(les: Iterable[str], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    acc = 0
    for le, n in zip([*les, "+Inf"], counts, strict=True):
        acc += n
        out.append((le, float(acc)))
    return out


class DaemonStats:
    """A host daemon listener (``daemon.add_listener``) counting what its
    events report: finished migrations, refused peers, PR changes,
    reconciliations."""

    def __init__(self) -> None:
        self.migrations: dict[tuple[str, str], int] = {}  # (role, outcome) -> count
        self.pause: dict[str, Histogram] = {}  # role -> guest pause
        self.takeover: dict[str, Histogram] = {}  # role -> PR takeover
        self.refused = 0
        self.pr_changes: dict[str, int] = {}
        self.reconciliations: dict[tuple[str, str], int] = {}
        # frontend node -> device, kept after the device left (moved away):
        # its counters are still exported under its name
        self.node_device: dict[str, str] = {}

    def __call__(self, msg: dict[str, Any]) -> None:
        name = msg.get("event")
        data = msg.get("data", {})
        if not isinstance(data, dict):
            return
        if name == "MIGRATION" and data.get("finished"):
            role = str(data.get("role", ""))
            key = (role, str(data.get("status", "")))
            self.migrations[key] = self.migrations.get(key, 0) + 1
            timings = data.get("timings") or {}
            for field, hists in (("pause_s", self.pause), ("takeover_s", self.takeover)):
                value = timings.get(field)
                if isinstance(value, int | float) and value >= 0:
                    hists.setdefault(role, Histogram(MIGRATION_BOUNDS)).observe(float(value))
        elif name == "MIGRATION_REFUSED":
            self.refused += 1
        elif name == "PR_STATE_CHANGED":
            dev = str(data.get("device", ""))
            self.pr_changes[dev] = self.pr_changes.get(dev, 0) + len(data.get("changes") or ())
        elif name == "PR_RECONCILED":
            key = (str(data.get("device", "")), "error" if data.get("error") else "ok")
            self.reconciliations[key] = self.reconciliations.get(key, 0) + 1


# ------------------------------------------------------------ families


def lu_families(
    target: IscsiTarget, device_of: Callable[[str], str | None] | None = None
) -> list[Metric]:
    """The counters of every (node, LUN) of ``target``; ``device_of(node)``
    adds a ``device`` label (the host: the device a frontend node serves)."""
    base = ["node", "lun"] + (["device"] if device_of is not None else [])
    commands = CounterMetricFamily("prmigrate_scsi_commands", "SCSI commands received", labels=[*base, "kind"])
    nbytes = CounterMetricFamily("prmigrate_scsi_bytes", "bytes the SCSI commands asked to move (EDTL)",
                                 labels=[*base, "kind"])
    latency = HistogramMetricFamily(
        "prmigrate_scsi_command_latency_seconds",
        "arrival of the PDU that completes a command to its answer queued for writing",
        labels=[*base, "kind"])
    statuses = CounterMetricFamily("prmigrate_scsi_status", "SCSI answers by status", labels=[*base, "status"])
    conflicts = CounterMetricFamily("prmigrate_reservation_conflicts", "RESERVATION CONFLICT answers",
                                    labels=base)
    uas = CounterMetricFamily("prmigrate_unit_attentions", "CHECK CONDITION answers reporting UNIT ATTENTION",
                              labels=base)
    pr_out = CounterMetricFamily("prmigrate_pr_out", "PERSISTENT RESERVE OUT answers",
                                 labels=[*base, "service_action", "status"])
    counters: list[tuple[tuple[str, int], LuCounters]] = list(target.lu_counters.items())
    for (node, lun), c in sorted(counters, key=lambda kv: kv[0]):
        labels = [node, str(lun)]
        if device_of is not None:
            labels.append(device_of(node) or "")
        for i, kind in enumerate(KINDS):
            commands.add_metric([*labels, kind], c.commands[i])
            nbytes.add_metric([*labels, kind], c.bytes[i])
            latency.add_metric([*labels, kind], _cumulative(_LATENCY_LE, c.latency[i]), c.latency_ns[i] / 1e9)
        statuses.add_metric([*labels, "GOOD"], c.good())
        for status, n in sorted(c.statuses.items()):
            statuses.add_metric([*labels, _name(Status, status)], n)
        conflicts.add_metric(labels, c.conflicts)
        uas.add_metric(labels, c.unit_attentions)
        for (sa, status), n in sorted(c.pr_out.items()):
            pr_out.add_metric([*labels, _name(PrOutAction, sa), _name(Status, status)], n)
    sessions = GaugeMetricFamily("prmigrate_iscsi_sessions", "logged-in iSCSI sessions", labels=["node"])
    per_node: dict[str, int] = {name: 0 for name in (n.name for n in target.nodes.values())}
    for s in target.sessions():
        if s.node is not None:
            per_node[s.node.name] = per_node.get(s.node.name, 0) + 1
    for node, n in sorted(per_node.items()):
        sessions.add_metric([node], n)
    return [commands, nbytes, latency, statuses, conflicts, uas, pr_out, sessions]


def host_families(daemon: HostDaemon, stats: DaemonStats) -> list[Metric]:
    from .host.daemon import frontend_iqn

    for name, d in daemon.devices.items():
        stats.node_device[frontend_iqn(d.config)] = name
    families = lu_families(daemon.target, stats.node_device.get)
    up = GaugeMetricFamily("prmigrate_backend_session_up",
                           "1 while the guest's backend I_T nexus is logged in", labels=["device", "guest"])
    held = GaugeMetricFamily("prmigrate_device_held", "1 while a migration holds the guest's commands",
                             labels=["device"])
    guests = GaugeMetricFamily("prmigrate_device_pr_guests", "guests with tracked PR state", labels=["device"])
    for name, dev in sorted(daemon.devices.items()):
        info = dev.describe()
        for key, nexus in sorted(dict(info.get("backend-nexus") or {}).items()):  # type: ignore[call-overload]
            up.add_metric([name, key], 1 if nexus.get("connected") else 0)
        held.add_metric([name], 1 if dev.held else 0)
        guests.add_metric([name], len(dev.snooper.state.guests))
    migrations = CounterMetricFamily("prmigrate_migrations", "finished migrations by role and final state",
                                     labels=["role", "outcome"])
    for (role, outcome), n in sorted(stats.migrations.items()):
        migrations.add_metric([role, outcome], n)
    pause = HistogramMetricFamily("prmigrate_migration_pause_seconds", "guest pause of finished migrations",
                                  labels=["role"])
    for role, h in sorted(stats.pause.items()):
        pause.add_metric([role], h.buckets(), h.total)
    takeover = HistogramMetricFamily("prmigrate_migration_takeover_seconds",
                                     "PR takeover of finished migrations", labels=["role"])
    for role, h in sorted(stats.takeover.items()):
        takeover.add_metric([role], h.buckets(), h.total)
    refused = CounterMetricFamily("prmigrate_migrations_refused",
                                  "migration peers refused (cluster secret, TLS certificate)")
    refused.add_metric([], stats.refused)
    changes = CounterMetricFamily("prmigrate_pr_state_changes", "tracked PR state changes", labels=["device"])
    for dev_name, n in sorted(stats.pr_changes.items()):
        changes.add_metric([dev_name], n)
    recon = CounterMetricFamily("prmigrate_reconciliations", "verifications of the tracked PR state",
                                labels=["device", "result"])
    for (dev_name, result), n in sorted(stats.reconciliations.items()):
        recon.add_metric([dev_name, result], n)
    return families + [up, held, guests, migrations, pause, takeover, refused, changes, recon]


# ------------------------------------------------------------ export


class LoopCollector(Collector):
    """Collects by running ``snapshot()`` on ``loop``'s thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], list[Metric]]) -> None:
        self.loop = loop
        self.snapshot = snapshot
        self._last_warning = 0.0

    def collect(self) -> Iterator[Metric]:
        result: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(self.snapshot())
            except BaseException as e:  # noqa: BLE001 - reported to the scraping thread
                result.set_exception(e)

        try:
            self.loop.call_soon_threadsafe(run)
            families = result.result(SNAPSHOT_TIMEOUT)
        except concurrent.futures.TimeoutError:
            result.cancel()
            self._warn("the event loop did not answer the scrape within %.0f s", SNAPSHOT_TIMEOUT)
            return iter(())
        except RuntimeError:  # loop closed: the process is stopping
            return iter(())
        except Exception as e:
            self._warn("metrics snapshot failed: %s", e)
            return iter(())
        return iter(families)

    def _warn(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning(fmt, *args)


class MetricsServer:
    """The HTTP endpoint (``/metrics``, any path in fact) of one process."""

    def __init__(self, snapshot: Callable[[], list[Metric]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = snapshot
        self._server: Any = None
        self._thread: Any = None
        self.address: tuple[str, int] | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (raises ``MetricsError`` when the address cannot be bound)."""
        loop = asyncio.get_running_loop()
        self.registry.register(LoopCollector(loop, self._snapshot))
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        bound = self._server.server_address
        self.address = (str(bound[0]), int(bound[1]))
        log.info("metrics on http://%s:%d/metrics", *self.address)
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def serve_target(target: IscsiTarget, host: str, port: int) -> MetricsServer:
    server = MetricsServer(lambda: lu_families(target))
    server.start(host, port)
    return server


def serve_host(daemon: HostDaemon, host: str, port: int) -> MetricsServer:
    stats = DaemonStats()
    daemon.add_listener(stats)
    server = MetricsServer(lambda: host_families(daemon, stats))
    try:
        server.start(host, port)
    except MetricsError:
        daemon.remove_listener(stats)
        raise
    return server
