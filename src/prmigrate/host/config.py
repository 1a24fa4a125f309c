"""Configuration of a host daemon: TOML file and/or command line.

A host daemon is configured entirely from the command line::

    prmigrate host --name hosta --initiator iqn.2026-11.org.prmigrate:hosta \\
      --listen 127.0.0.2:3260 --control /tmp/hosta.sock --state-dir /tmp/hosta \\
      --device name=vm1,backend=iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0,target=iqn.2026-11.org.prmigrate:vm1

or from a TOML file (``--config host.toml``), the same settings::

    [host]
    name = "hosta"
    initiator = "iqn.2026-11.org.prmigrate:hosta"
    listen = "127.0.0.2:3260"          # or a list of them
    control = "/tmp/hosta.sock"
    state-dir = "/tmp/hosta"
    log-format = "text"                # or "json" (one JSON object a line)
    metrics = "127.0.0.2:9464"         # Prometheus endpoint (default: none)
    migrate-tls-dir = "/etc/prmigrate/tls"   # mutual TLS on the migration channel

    [[device]]
    name = "vm1"
    backend = "iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0"
    target = "iqn.2026-11.org.prmigrate:vm1"   # guest-facing node (see device/config.py)
    machine = "pc-q35-11.0"
    migrate-pr = true                  # or "on"/"off"
    guests = ["iqn.2026-11.org.prmigrate:g1"]
    identity = "guest"

Device tables are turned into the ``--device`` syntax and parsed by
``device.config.parse_device_spec``, so both forms accept exactly the same
keys and values. Command-line options override the file; ``--device`` adds
to the file's devices (same name: an error).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aio import loop_options_error
from ..device.config import ConfigError, DeviceConfig, parse_device_spec

DEFAULT_LISTEN = ("127.0.0.1", 3260)
_HOST_KEYS = frozenset(
    {"name", "initiator", "listen", "control", "state-dir", "log-format", "keepalive", "uvloop", "poll-us",
     "metrics", "migrate-tls-dir"}
)


class HostConfigError(ValueError):
    """The host configuration is invalid."""


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise HostConfigError(f"listen address {text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(slots=True)
class HostConfig:
    name: str = "host"
    initiator: str = ""
    listen: list[tuple[str, int]] = field(default_factory=list)
    control: Path | None = None
    state_dir: Path | None = None
    devices: list[DeviceConfig] = field(default_factory=list)
    log_format: str = "text"
    keepalive: float | None = None
    uvloop: bool = False
    poll_us: int = 0  # busy-poll before the loop sleeps (aio.PollingSelector)
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint (metrics.py)
    migrate_tls_dir: Path | None = None  # PEM files of the migration channel's TLS

    def validate(self) -> HostConfig:
        if not self.initiator:
            self.initiator = f"iqn.2026-11.org.prmigrate:{self.name}"
        if not self.initiator.lower().startswith(("iqn.", "eui.", "naa.")):
            raise HostConfigError(f"initiator name {self.initiator!r} is not an iSCSI name")
        if not self.listen:
            self.listen = [DEFAULT_LISTEN]
        if self.log_format not in ("text", "json"):
            raise HostConfigError(f"log-format must be text or json, not {self.log_format!r}")
        if self.metrics is not None:
            try:
                parse_listen(self.metrics)
            except HostConfigError:
                raise HostConfigError(f"metrics address {self.metrics!r} is not ADDR:PORT") from None
        loop_error = loop_options_error(self.uvloop, self.poll_us)
        if loop_error is not None:
            raise HostConfigError(f"poll-us: {loop_error}")
        seen: set[str] = set()
        for d in self.devices:
            if d.name in seen:
                raise HostConfigError(f"device {d.name!r} given twice")
            seen.add(d.name)
        return self


def _spec_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        if key == "backend":  # one URL per path: ``backend`` repeated
            if not value or not all(isinstance(v, str) for v in value):
                raise HostConfigError("device key 'backend': a URL or a list of URLs")
            return ",backend=".join(v.replace(",", ",,") for v in value)
        if key != "guests":
            raise HostConfigError(f"device key {key!r} does not take a list")
        return "+".join(str(v) for v in value)
    if isinstance(value, int | str):
        return str(value)
    raise HostConfigError(f"device key {key!r}: unsupported value {value!r}")


def device_from_table(table: dict[str, Any]) -> DeviceConfig:
    """A ``[[device]]`` table, validated exactly like ``--device``."""
    if not isinstance(table, dict):
        raise HostConfigError("each [[device]] must be a table")
    spec = ",".join(
        f"{k}={_spec_value(k, v) if k == 'backend' and isinstance(v, list | tuple) else _spec_value(k, v).replace(',', ',,')}"
        for k, v in table.items()
    )
    try:
        return parse_device_spec(spec)
    except ConfigError as e:
        raise HostConfigError(f"device {table.get('name', '?')!r}: {e}") from e


def load_toml(path: str | Path) -> HostConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise HostConfigError(f"{path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise HostConfigError(f"{path}: {e}") from e
    return from_mapping(doc, str(path))


def from_mapping(doc: dict[str, Any], where: str = "config") -> HostConfig:
    unknown = set(doc) - {"host", "device"}
    if unknown:
        raise HostConfigError(f"{where}: unknown section(s) {sorted(unknown)}")
    host = doc.get("host", {})
    if not isinstance(host, dict):
        raise HostConfigError(f"{where}: [host] must be a table")
    bad = set(host) - _HOST_KEYS
    if bad:
        raise HostConfigError(f"{where}: unknown [host] key(s) {sorted(bad)}")
    cfg = HostConfig()
    if "name" in host:
        cfg.name = str(host["name"])
    if "initiator" in host:
        cfg.initiator = str(host["initiator"])
    listen = host.get("listen", [])
    for item in [listen] if isinstance(listen, str) else listen:
        cfg.listen.append(parse_listen(str(item)))
    if "control" in host:
        cfg.control = Path(host["control"])
    if "state-dir" in host:
        cfg.state_dir = Path(host["state-dir"])
    cfg.log_format = str(host.get("log-format", "text"))
    if "keepalive" in host:
        cfg.keepalive = float(host["keepalive"])
    cfg.uvloop = bool(host.get("uvloop", False))
    poll = host.get("poll-us", 0)
    if not isinstance(poll, int) or isinstance(poll, bool):
        raise HostConfigError(f"{where}: poll-us must be an integer (microseconds)")
    cfg.poll_us = poll
    if "metrics" in host:
        cfg.metrics = str(host["metrics"])
    if "migrate-tls-dir" in host:
        cfg.migrate_tls_dir = Path(host["migrate-tls-dir"])
    devices = doc.get("device", [])
    if not isinstance(devices, list):
        raise HostConfigError(f"{where}: use [[device]] tables")
    cfg.devices = [device_from_table(t) for t in devices]
    return cfg


def merge_cli(base: HostConfig, args: Any) -> HostConfig:
    """Command-line options (argparse namespace of ``prmigrate host``) over ``base``."""
    if args.name is not None:
        base.name = args.name
    if args.initiator is not None:
        base.initiator = args.initiator
    if args.listen:
        base.listen = [parse_listen(x) for x in args.listen]
    if args.control is not None:
        base.control = Path(args.control)
    if args.state_dir is not None:
        base.state_dir = Path(args.state_dir)
    if getattr(args, "log_format", None):
        base.log_format = args.log_format
    if getattr(args, "keepalive", None) is not None:
        base.keepalive = args.keepalive
    if getattr(args, "uvloop", False):
        base.uvloop = True
    if getattr(args, "poll_us", None) is not None:
        base.poll_us = args.poll_us
    if getattr(args, "metrics", None):
        base.metrics = args.metrics
    if getattr(args, "migrate_tls_dir", None):
        base.migrate_tls_dir = Path(args.migrate_tls_dir)
    for spec in args.device or []:
        try:
            base.devices.append(parse_device_spec(spec))
        except ConfigError as e:
            raise HostConfigError(f"--device {spec!r}: {e}") from e
    return base.validate()
