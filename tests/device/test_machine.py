import pytest

from prmigrate.device.machine import (
    HW_COMPAT,
    MACHINES,
    RELEASES,
    CompatProp,
    MachineError,
    effective_migrate_pr,
    format_machine_list,
    list_machines,
    resolve_device_props,
    resolve_machine,
)

OFF = {(9, 0), (9, 1), (9, 2), (10, 0), (10, 1), (10, 2)}


@pytest.mark.parametrize("family", ["pc-q35", "pc-i440fx"])
@pytest.mark.parametrize("version", RELEASES)
def test_migrate_pr_default_per_version(family, version):
    name = f"{family}-{version[0]}.{version[1]}"
    expected = "off" if version in OFF else "on"
    assert resolve_device_props(name, {})["migrate-pr"] == expected
    assert effective_migrate_pr(name) is (expected == "on")


def test_compat_props_accumulate_from_newer_releases():
    m = resolve_machine("pc-q35-9.0")
    assert CompatProp("scsi-block", "migrate-pr", "off") in m.compat_props
    assert resolve_machine("pc-q35-11.0").compat_props == ()
    assert (10, 2) in HW_COMPAT


@pytest.mark.parametrize(
    "alias,target",
    [
        ("q35", "pc-q35-11.0"),
        ("pc-q35", "pc-q35-11.0"),
        ("pc", "pc-i440fx-11.0"),
        ("PC", "pc-i440fx-11.0"),
        (None, "pc-q35-11.0"),
    ],
)
def test_aliases_name_newest(alias, target):
    assert resolve_machine(alias).name == target


@pytest.mark.parametrize(
    "explicit,machine,expected",
    [
        ("on", "pc-q35-10.2", "on"),
        ("off", "pc-q35-11.0", "off"),
        ("yes", "pc-i440fx-9.0", "on"),
        ("false", "q35", "off"),
        (True, "pc-q35-9.1", "on"),
    ],
)
def test_explicit_wins(explicit, machine, expected):
    assert resolve_device_props(machine, {"migrate-pr": explicit})["migrate-pr"] == expected


def test_explicit_bool_override():
    assert effective_migrate_pr("pc-q35-10.2", True) is True
    assert effective_migrate_pr("pc-q35-11.0", False) is False
    assert effective_migrate_pr("pc-q35-11.0", None) is True


@pytest.mark.parametrize("bad", ["pc-q35-8.2", "pc-q35-11.1", "virt", "pc-q35-", ""])
def test_unknown_machine(bad):
    if bad == "":
        assert resolve_machine(bad).name == "pc-q35-11.0"  # empty = default
        return
    with pytest.raises(MachineError, match="unknown machine type"):
        resolve_machine(bad)


def test_bad_bool_value():
    with pytest.raises(MachineError):
        resolve_device_props("q35", {"migrate-pr": "maybe"})


def test_list_machines():
    rows = list_machines()
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) == 4 + len(MACHINES)
    by = {r.name: r for r in rows}
    assert by["pc"].alias_of == "pc-i440fx-11.0" and by["pc"].default_migrate_pr
    assert by["pc-q35-10.2"].alias_of is None and not by["pc-q35-10.2"].default_migrate_pr
    text = format_machine_list()
    assert "pc-i440fx-9.0" in text and "q35" in text
