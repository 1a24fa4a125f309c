"""Configuration of one passthrough device.

A device is given on the command line as one ``key=value`` list, in QEMU's
``-device`` syntax::

    name=vm1,backend=iscsi://10.0.0.5:3260/iqn.2026-01.org.example:lun/0,
    machine=pc-q35-11.0,migrate-pr=on,guests=iqn.a:g1+iqn.a:g2,identity=guest

Rules of the syntax:

* items are separated by ``,``; a literal comma inside a value is written
  ``,,`` (QEMU's escape). iSCSI URLs and IQNs normally have no comma;
* keys are case-insensitive; each key at most once; an unknown key is an error;
* ``backend`` is an ``iscsi://`` URL. It may carry ``/target/lun``; then
  ``backend-target=``/``lun=`` are optional and, if given, must agree with it.
  ``backend`` is the one key that may be given more than once: one URL per
  path to the LUN (multipath, ``device/paths.py``; different portals of one
  target), all naming the same target and LUN; the first is the device's
  ``backend_url`` as with one path, the others are ``more_backends``;
  A portal-only URL (``iscsi://host[:port]``) needs ``backend-target=``
  (``target=`` is its old spelling, still accepted, see ``frontend``);
* ``guests`` lists the guest initiator names allowed to use the device,
  separated by ``+`` (an IQN never holds ``+``); absent = any initiator;
* ``migrate-pr`` takes on/off/yes/no/true/false; absent = the machine
  type's default (``effective_migrate_pr``);
* ``identity`` is ``guest`` (one backend nexus per guest, default) or
  ``host`` (one shared nexus, QEMU's behaviour);
* ``frontend`` names the iSCSI target node the guest logs in to. When the
  backend URL already names its target, a ``target=`` that differs from it
  is read as the frontend node name (the host daemon's documented form
  ``backend=iscsi://h/iqn.x:shared/0,target=iqn.x:vm1``); ``target`` and
  ``frontend`` together are then an error. Absent: the host daemon's default
  (``prmigrate.host.daemon.default_frontend_iqn``);
* ``incoming-from`` (``HOST:PORT``, the migration listener of the host
  daemon serving the device now) makes the device *incoming*: its
  config and identity come from that host, and it moves here on the
  first command that needs the guest's nexus (``migration/pull.py``).
  It is a property of this host's device only: the migration stream
  never carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..iscsi.url import UrlError, parse_url
from .identity import IdentityMode
from .machine import (
    DEFAULT_MACHINE,
    MachineError,
    effective_migrate_pr,
    parse_bool,
    resolve_machine,
)

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A device specification or serialised configuration is invalid."""


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    backend_url: str  # iscsi://host[:port][/target/lun]
    target_iqn: str
    machine: str = DEFAULT_MACHINE
    migrate_pr: bool | None = None  # None: not given explicitly, the machine decides
    guests: frozenset[str] | None = None  # allowed guest initiators (lower-case); None = any
    identity: IdentityMode = IdentityMode.GUEST
    lun: int = 0
    frontend_iqn: str | None = None  # guest-facing target node; None = the daemon's default
    incoming_from: str | None = None  # HOST:PORT of the source's migration listener (not in the stream)
    more_backends: tuple[str, ...] = ()  # paths 1.. to the same target and LUN (multipath)

    def __post_init__(self) -> None:
        if (
            not self.name
            or any(c in self.name for c in ",=/\x00")
            or self.name != self.name.strip()
        ):
            raise ConfigError(f"invalid device name {self.name!r}")
        try:
            url = parse_url(self.backend_url, require_lun=False)
        except UrlError as e:
            raise ConfigError(f"backend: {e}") from e
        if not self.target_iqn:
            raise ConfigError("no backend target: give target= or an iscsi://host/target/lun URL")
        if url.target and url.target.lower() != self.target_iqn.lower():
            raise ConfigError(f"target {self.target_iqn!r} disagrees with the URL's {url.target!r}")
        if url.target and url.lun != self.lun:
            raise ConfigError(f"lun {self.lun} disagrees with the URL's {url.lun}")
        if not 0 <= self.lun <= 0x3FFF:
            raise ConfigError(f"lun {self.lun} out of range")
        object.__setattr__(self, "more_backends", tuple(self.more_backends))
        for extra in self.more_backends:
            try:
                u = parse_url(extra, require_lun=False)
            except UrlError as e:
                raise ConfigError(f"backend {extra!r}: {e}") from e
            if u.target and (u.target.lower() != self.target_iqn.lower() or u.lun != self.lun):
                raise ConfigError(f"backend {extra!r}: every path must name target {self.target_iqn} "
                                  f"LUN {self.lun}, not {u.target} LUN {u.lun}")
        if len({b.lower() for b in self.backend_urls}) != len(self.backend_urls):
            raise ConfigError("the same backend URL is given twice")
        try:
            # Aliases resolve now: ``machine`` always holds the versioned
            # name, so the migration stream carries the machine type the
            # source really used (QEMU likewise needs the same versioned
            # machine on both ends; a newer destination's "q35" may differ).
            object.__setattr__(self, "machine", resolve_machine(self.machine).name)
        except MachineError as e:
            raise ConfigError(str(e)) from e
        object.__setattr__(self, "identity", IdentityMode(self.identity))
        if self.frontend_iqn is not None and (
            not self.frontend_iqn or any(c in self.frontend_iqn for c in ", /\x00")
        ):
            raise ConfigError(f"invalid frontend node name {self.frontend_iqn!r}")
        if self.guests is not None:
            guests = frozenset(g.lower() for g in self.guests)
            if not guests or any(not g or "+" in g or "," in g for g in guests):
                raise ConfigError(f"invalid guest list {sorted(self.guests)!r}")
            object.__setattr__(self, "guests", guests)
        if self.incoming_from is not None:
            host, sep, port = self.incoming_from.rpartition(":")
            if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"incoming-from {self.incoming_from!r} is not HOST:PORT")

    @property
    def backend_urls(self) -> tuple[str, ...]:
        """Every path's URL, path 0 (``backend_url``) first."""
        return (self.backend_url, *self.more_backends)

    @property
    def effective_migrate_pr(self) -> bool:
        return effective_migrate_pr(self.machine, self.migrate_pr)

    def allows(self, guest: str) -> bool:
        return self.guests is None or guest.lower() in self.guests

    def with_machine(self, machine: str) -> DeviceConfig:
        return replace(self, machine=machine)

    # -- the command-line form
    def to_spec(self) -> str:
        items = [
            ("name", self.name),
            ("backend", self.backend_url),
            *(("backend", u) for u in self.more_backends),
            ("target", self.target_iqn),
            ("lun", str(self.lun)),
            ("machine", self.machine),
        ]
        if self.migrate_pr is not None:
            items.append(("migrate-pr", "on" if self.migrate_pr else "off"))
        if self.guests is not None:
            items.append(("guests", "+".join(sorted(self.guests))))
        items.append(("identity", str(self.identity)))
        if self.frontend_iqn is not None:
            items.append(("frontend", self.frontend_iqn))
        if self.incoming_from is not None:
            items.append(("incoming-from", self.incoming_from))
        return ",".join(f"{k}={v.replace(',', ',,')}" for k, v in items)

    # -- the migration stream
    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "version": CONFIG_VERSION,
            "name": self.name,
            "backend_url": self.backend_url,
            "target_iqn": self.target_iqn,
            "machine": self.machine,
            "migrate_pr": self.migrate_pr,
            "guests": None if self.guests is None else sorted(self.guests),
            "identity": str(self.identity),
            "lun": self.lun,
            "frontend_iqn": self.frontend_iqn,
        }
        if self.more_backends:  # absent with one path: the single-path dict is unchanged
            d["more_backends"] = list(self.more_backends)
        return d

    @staticmethod
    def from_dict(d: dict[str, object]) -> DeviceConfig:
        """Inverse of ``to_dict``. Unknown keys are ignored (a newer sender may
        add optional ones); a newer ``version`` is refused."""
        if not isinstance(d, dict):
            raise ConfigError("device config: expected a mapping")
        version = d.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(f"device config version {version!r} is not supported")
        try:
            guests = d.get("guests")
            migrate_pr = d.get("migrate_pr")
            if migrate_pr is not None and not isinstance(migrate_pr, bool):
                raise ConfigError("migrate_pr must be true, false or null")
            if guests is not None and not isinstance(guests, list | tuple):
                raise ConfigError("guests must be a list or null")
            more = d.get("more_backends", [])
            if not isinstance(more, list | tuple) or not all(isinstance(u, str) for u in more):
                raise ConfigError("more_backends must be a list of URLs")
            lun = d.get("lun", 0)
            if not isinstance(lun, int) or isinstance(lun, bool):
                raise ConfigError("lun must be an integer")
            return DeviceConfig(
                name=_str(d, "name"),
                backend_url=_str(d, "backend_url"),
                target_iqn=_str(d, "target_iqn"),
                machine=_str(d, "machine", DEFAULT_MACHINE),
                migrate_pr=migrate_pr,
                guests=None if guests is None else frozenset(str(g) for g in guests),
                identity=IdentityMode(_str(d, "identity", IdentityMode.GUEST.value)),
                lun=lun,
                frontend_iqn=None if d.get("frontend_iqn") is None else str(d["frontend_iqn"]),
                more_backends=tuple(more),
            )
        except ValueError as e:  # IdentityMode(...) and friends
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"device config: {e}") from e


def _str(d: dict[str, object], key: str, default: str | None = None) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise ConfigError(f"device config: {key!r} must be a string")
    return v


_KEYS = frozenset(
    {"name", "backend", "backend-target", "target", "lun", "machine", "migrate-pr", "guests",
     "identity", "frontend", "incoming-from"}
)


def split_spec(spec: str) -> list[tuple[str, str]]:
    """Split ``k=v,k=v`` honouring ``,,`` as a literal comma."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == ",":
            if spec.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    out: list[tuple[str, str]] = []
    for item in items:
        if not item.strip():
            raise ConfigError(f"empty item in device spec {spec!r}")
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"device spec item {item!r} is not key=value")
        out.append((key.strip().lower(), value.strip()))
    return out


def parse_device_spec(spec: str) -> DeviceConfig:
    """Parse the command-line form (see the module docstring)."""
    seen: dict[str, str] = {}
    more: list[str] = []
    for key, value in split_spec(spec):
        if key not in _KEYS:
            raise ConfigError(
                f"unknown device property {key!r} (known: {', '.join(sorted(_KEYS))})"
            )
        if key == "backend" and key in seen:  # one more path (multipath)
            more.append(value)
            continue
        if key in seen:
            raise ConfigError(f"device property {key!r} given twice")
        seen[key] = value
    for required in ("name", "backend"):
        if required not in seen:
            raise ConfigError(f"device spec needs {required}=")
    try:
        url = parse_url(seen["backend"], require_lun=False)
    except UrlError as e:
        raise ConfigError(f"backend: {e}") from e
    if "backend-target" in seen:
        if "target" in seen:
            raise ConfigError("give backend-target= or its old spelling target=, not both")
        if url.target and seen["backend-target"].lower() != url.target.lower():
            raise ConfigError(
                f"backend-target {seen['backend-target']!r} disagrees with the URL's {url.target!r}")
        seen["target"] = seen.pop("backend-target")
    target = seen.get("target", url.target)
    frontend = seen.get("frontend")
    if url.target and "target" in seen and target.lower() != url.target.lower():
        if frontend is not None:
            raise ConfigError(f"target {target!r} disagrees with the URL's {url.target!r}")
        frontend, target = target, url.target  # target= names the guest-facing node
    if "lun" in seen:
        if not seen["lun"].isdigit():
            raise ConfigError(f"lun {seen['lun']!r} is not a number")
        lun = int(seen["lun"])
    else:
        lun = url.lun
    migrate_pr = None
    if "migrate-pr" in seen:
        try:
            migrate_pr = parse_bool(seen["migrate-pr"], "migrate-pr")
        except MachineError as e:
            raise ConfigError(str(e)) from e
    guests = None
    if "guests" in seen:
        guests = frozenset(g.strip() for g in seen["guests"].split("+"))
    identity = seen.get("identity", IdentityMode.GUEST.value).lower()
    if identity not in IdentityMode._value2member_map_:
        raise ConfigError(f"identity must be guest or host, not {identity!r}")
    return DeviceConfig(
        name=seen["name"],
        backend_url=seen["backend"],
        target_iqn=target,
        machine=seen.get("machine", DEFAULT_MACHINE) or DEFAULT_MACHINE,
        migrate_pr=migrate_pr,
        guests=guests,
        identity=IdentityMode(identity),
        lun=lun,
        frontend_iqn=frontend,
        incoming_from=seen.get("incoming-from") or None,
        more_backends=tuple(more),
    )
