"""Machine types and their compat property tables, as QEMU keeps them.

A machine type pins the guest-visible behaviour of a release. QEMU keeps one
table per release, ``hw_compat_X_Y``, listing ``(driver, property, value)``
triples that restore the behaviour of release X.Y; a versioned machine type
V applies every table of a release >= V (the older the machine, the more
compat properties). Device defaults are those of the newest release.

Precedence when a device is created (lowest first):

1. the driver's default (``DEVICE_DEFAULTS``),
2. the machine type's compat properties,
3. properties given explicitly on the device (``migrate-pr=on``).

Machine types: ``pc-q35-X.Y`` and ``pc-i440fx-X.Y`` for every release in
``RELEASES``; unversioned aliases ``q35``/``pc-q35`` and ``pc``/``pc-i440fx``
name the newest. QEMU documents the one property this project cares about
(docs/design.md, "QEMU's `migrate-pr`"): ``scsi-block.migrate-pr`` defaults on since 11.0 and is off for
machine types <= 10.2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SCSI_BLOCK = "scsi-block"
MIGRATE_PR = "migrate-pr"


class MachineError(ValueError):
    """An unknown machine type or an invalid device property value."""


@dataclass(frozen=True, slots=True)
class CompatProp:
    driver: str
    prop: str
    value: str


# Releases with versioned machine types, oldest first.
RELEASES: tuple[tuple[int, int], ...] = (
    (9, 0),
    (9, 1),
    (9, 2),
    (10, 0),
    (10, 1),
    (10, 2),
    (11, 0),
)
NEWEST = RELEASES[-1]

# hw_compat_X_Y: properties that restore release X.Y's behaviour on machine
# types <= X.Y. Only the properties of the devices this project models.
HW_COMPAT: dict[tuple[int, int], tuple[CompatProp, ...]] = {
    # Seed doc: "Migration is enabled by default in versioned machine types
    # since QEMU 11.0. It is disabled by default on older machine types".
    (10, 2): (CompatProp(SCSI_BLOCK, MIGRATE_PR, "off"),),
}

# Property defaults of each driver in the newest release.
DEVICE_DEFAULTS: dict[str, dict[str, str]] = {
    SCSI_BLOCK: {MIGRATE_PR: "on"},
}

# Boolean properties and the spellings QEMU's option parser accepts for them.
BOOL_PROPS: dict[str, frozenset[str]] = {SCSI_BLOCK: frozenset({MIGRATE_PR})}
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})

FAMILIES: tuple[str, ...] = ("pc-q35", "pc-i440fx")
# alias -> family prefix; the alias names the newest machine of that family.
ALIASES: dict[str, str] = {
    "q35": "pc-q35",
    "pc-q35": "pc-q35",
    "pc": "pc-i440fx",
    "pc-i440fx": "pc-i440fx",
}
DEFAULT_MACHINE = "q35"


@dataclass(frozen=True, slots=True)
class MachineType:
    name: str  # canonical, versioned: pc-q35-11.0
    family: str  # pc-q35 | pc-i440fx
    version: tuple[int, int]

    @property
    def compat_props(self) -> tuple[CompatProp, ...]:
        """Every compat property of the releases >= this machine's version."""
        props: list[CompatProp] = []
        for release in RELEASES:
            if release >= self.version:
                props.extend(HW_COMPAT.get(release, ()))
        return tuple(props)

    def default_props(self, driver: str) -> dict[str, str]:
        props = dict(DEVICE_DEFAULTS.get(driver, {}))
        for c in self.compat_props:
            if c.driver == driver:
                props[c.prop] = c.value
        return props

    @property
    def default_migrate_pr(self) -> bool:
        return parse_bool(self.default_props(SCSI_BLOCK).get(MIGRATE_PR, "off"), MIGRATE_PR)


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """One line of ``prmigrate host --list-machines``."""

    name: str
    alias_of: str | None
    default_migrate_pr: bool


def _versioned_name(family: str, version: tuple[int, int]) -> str:
    return f"{family}-{version[0]}.{version[1]}"


MACHINES: dict[str, MachineType] = {
    _versioned_name(family, v): MachineType(_versioned_name(family, v), family, v)
    for family in FAMILIES
    for v in RELEASES
}


def resolve_machine(name: str | None) -> MachineType:
    """The machine type named ``name`` (an alias resolves to the newest);
    ``None`` or ``""`` is the default machine."""
    key = (name or DEFAULT_MACHINE).strip().lower()
    if key in ALIASES:
        return MACHINES[_versioned_name(ALIASES[key], NEWEST)]
    machine = MACHINES.get(key)
    if machine is None:
        known = ", ".join([*ALIASES, *MACHINES])
        raise MachineError(f"unknown machine type {name!r} (known: {known})")
    return machine


def parse_bool(value: str | bool, prop: str = "property") -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise MachineError(f"{prop}: {value!r} is not on/off")


def resolve_device_props(
    machine: str | None,
    explicit_props: Mapping[str, str | bool] | None = None,
    driver: str = SCSI_BLOCK,
) -> dict[str, str]:
    """The driver's properties on ``machine``: defaults, then the machine's
    compat properties, then ``explicit_props`` (which win). Boolean values are
    normalised to ``on``/``off``."""
    props = resolve_machine(machine).default_props(driver)
    bools = BOOL_PROPS.get(driver, frozenset())
    for prop, value in (explicit_props or {}).items():
        if prop in bools:
            props[prop] = "on" if parse_bool(value, prop) else "off"
        elif isinstance(value, bool):
            props[prop] = "on" if value else "off"
        else:
            props[prop] = value
    return props


def effective_migrate_pr(machine: str | None, explicit: bool | None = None) -> bool:
    """Whether ``scsi-block`` migrates PR state on ``machine``; an explicit
    setting wins over the machine type."""
    explicit_props: dict[str, str | bool] = {} if explicit is None else {MIGRATE_PR: explicit}
    return parse_bool(resolve_device_props(machine, explicit_props)[MIGRATE_PR], MIGRATE_PR)


def list_machines() -> list[MachineInfo]:
    """Aliases first, then versioned machine types newest first, per family."""
    out: list[MachineInfo] = []
    for alias, family in ALIASES.items():
        target = MACHINES[_versioned_name(family, NEWEST)]
        out.append(MachineInfo(alias, target.name, target.default_migrate_pr))
    for family in FAMILIES:
        for v in reversed(RELEASES):
            m = MACHINES[_versioned_name(family, v)]
            out.append(MachineInfo(m.name, None, m.default_migrate_pr))
    return out


def format_machine_list() -> str:
    """Text for ``prmigrate host --list-machines``."""
    lines = [f"{'machine':<18} {'alias of':<18} migrate-pr default"]
    for m in list_machines():
        lines.append(
            f"{m.name:<18} {m.alias_of or '':<18} {'on' if m.default_migrate_pr else 'off'}"
        )
    return "\n".join(lines)
