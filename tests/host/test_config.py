"""Host configuration: TOML file, command line, and both together."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from prmigrate.commands import host as host_cmd
from prmigrate.host.config import HostConfig, HostConfigError, load_toml, merge_cli, parse_listen

SHARED = "iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0"
ISSUE_ARGS = [
    "--name", "hosta", "--initiator", "iqn.2026-11.org.prmigrate:hosta",
    "--listen", "127.0.0.2:3260", "--control", "/tmp/hosta.sock", "--state-dir", "/tmp/hosta",
    "--device", f"name=vm1,backend={SHARED},target=iqn.2026-11.org.prmigrate:vm1,machine=pc-q35-11.0",
]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("-v", "--verbose", action="count", default=0)
    host_cmd.add_arguments(p)
    return p.parse_args(argv)


def test_the_issue_command_line() -> None:
    cfg = merge_cli(HostConfig(), parse(ISSUE_ARGS))
    assert cfg.name == "hosta" and cfg.initiator == "iqn.2026-11.org.prmigrate:hosta"
    assert cfg.listen == [("127.0.0.2", 3260)]
    assert cfg.control == Path("/tmp/hosta.sock") and cfg.state_dir == Path("/tmp/hosta")
    (d,) = cfg.devices
    assert d.name == "vm1" and d.frontend_iqn == "iqn.2026-11.org.prmigrate:vm1"
    assert d.target_iqn == "iqn.2026-11.org.prmigrate:shared" and d.lun == 0
    assert d.effective_migrate_pr


def test_toml_equivalent(tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text(f'''
[host]
name = "hosta"
initiator = "iqn.2026-11.org.prmigrate:hosta"
listen = "127.0.0.2:3260"
control = "/tmp/hosta.sock"
state-dir = "/tmp/hosta"

[[device]]
name = "vm1"
backend = "{SHARED}"
target = "iqn.2026-11.org.prmigrate:vm1"
machine = "pc-q35-11.0"

[[device]]
name = "vm2"
backend = "{SHARED.replace('/0', '/1')}"
machine = "pc-i440fx-10.2"
migrate-pr = true
guests = ["iqn.a:g1", "IQN.A:G2"]
identity = "host"
''')
    from_file = merge_cli(load_toml(f), parse([]))
    from_cli = merge_cli(HostConfig(), parse(ISSUE_ARGS))
    assert from_file.devices[0] == from_cli.devices[0]
    assert (from_file.name, from_file.initiator, from_file.listen, from_file.control) == (
        from_cli.name, from_cli.initiator, from_cli.listen, from_cli.control)
    vm2 = from_file.devices[1]
    assert vm2.migrate_pr is True and vm2.effective_migrate_pr and vm2.lun == 1
    assert vm2.guests == frozenset({"iqn.a:g1", "iqn.a:g2"}) and str(vm2.identity) == "host"


def test_command_line_overrides_and_adds(tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text(f'[host]\nname = "x"\nlisten = ["127.0.0.3:3260", "127.0.0.4:3261"]\n'
                 f'[[device]]\nname = "vm2"\nbackend = "{SHARED}"\n')
    cfg = merge_cli(load_toml(f), parse(ISSUE_ARGS))
    assert cfg.name == "hosta" and cfg.listen == [("127.0.0.2", 3260)]
    assert [d.name for d in cfg.devices] == ["vm2", "vm1"]


@pytest.mark.parametrize("text,match", [
    ("[hosts]\n", "unknown section"),
    ("[host]\nport = 1\n", "unknown \\[host\\] key"),
    ('[host]\nlisten = "nohost"\n', "HOST:PORT"),
    ("[[device]]\nname = \"d\"\n", "backend"),
    (f'[[device]]\nname = "d"\nbackend = "{SHARED}"\ncolour = "red"\n', "unknown device property"),
    (f'[[device]]\nname = "d"\nbackend = "{SHARED}"\nmigrate-pr = "maybe"\n', "on/off"),
    ("[host\n", "host.toml"),
    ('[host]\npoll-us = "50"\n', "poll-us must be an integer"),
    ("[host]\npoll-us = -1\n", "must not be negative"),
    ("[host]\npoll-us = 50\nuvloop = true\n", "not with uvloop"),
])
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "host.toml"
    f.write_text(text)
    with pytest.raises(HostConfigError, match=match):
        merge_cli(load_toml(f), parse([]))


def test_duplicate_device_and_defaults() -> None:
    args = parse(["--device", f"name=a,backend={SHARED}", "--device", f"name=a,backend={SHARED}"])
    with pytest.raises(HostConfigError, match="twice"):
        merge_cli(HostConfig(), args)
    cfg = merge_cli(HostConfig(), parse([]))
    assert cfg.listen == [("127.0.0.1", 3260)] and cfg.initiator.startswith("iqn.")
    assert parse_listen("[::1]:3260") == ("::1", 3260)


def test_list_machines(capsys: pytest.CaptureFixture[str]) -> None:
    assert host_cmd.run(parse(["--list-machines"])) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert lines["pc-q35-11.0"] == "on" and lines["pc-q35-10.2"] == "off"
    assert lines["q35"] == "on" and lines["pc-i440fx-9.0"] == "off"


def test_poll_us_from_file_and_command_line(tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text("[host]\npoll-us = 50\n")
    assert merge_cli(load_toml(f), parse([])).poll_us == 50
    assert merge_cli(load_toml(f), parse(["--poll-us", "0"])).poll_us == 0  # the command line wins
    assert merge_cli(HostConfig(), parse([])).poll_us == 0  # off by default
    with pytest.raises(HostConfigError, match="not with uvloop"):
        merge_cli(HostConfig(), parse(["--poll-us", "20", "--uvloop"]))


def test_backend_list_in_toml_and_device_add_arguments(tmp_path: Path) -> None:
    from prmigrate.commands.device import spec_arguments
    from prmigrate.host.config import device_from_table

    a, b = "iscsi://10.0.0.5:3260/iqn.x:shared/0", "iscsi://10.0.0.6:3260/iqn.x:shared/0"
    dc = device_from_table({"name": "vm1", "backend": [a, b]})
    assert dc.backend_urls == (a, b)
    args = spec_arguments(f"name=vm1,backend={a},backend={b}")
    assert args["backend"] == [a, b]
    assert device_from_table(args) == dc
    assert device_from_table({"name": "vm1", "backend": a}).backend_urls == (a,)
    with pytest.raises(HostConfigError, match="backend"):
        device_from_table({"name": "vm1", "backend": []})
