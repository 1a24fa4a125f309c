"""The command line as a user runs it: subprocesses, exit codes, output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import prmigrate


def run(*args: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prmigrate", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------- top level


def test_help_names_the_commands_not_the_modules() -> None:
    r = run("--help")
    assert r.returncode == 0
    for name in ("target", "host", "migrate", "pr", "demo"):
        assert f"    {name} " in r.stdout
    assert "prmigrate.commands" not in r.stdout and "module" not in r.stdout
    assert "Exit status" in r.stdout


def test_version() -> None:
    r = run("--version")
    assert (r.returncode, r.stdout) == (0, f"prmigrate {prmigrate.__version__}\n")


def test_python_dash_m_prmigrate_and_prmigrate_cli_agree() -> None:
    a = run("--help")
    b = subprocess.run([sys.executable, "-m", "prmigrate.cli", "--help"], capture_output=True,
                       text=True, timeout=30)
    assert a.stdout == b.stdout and b.returncode == 0


def test_no_command_is_a_usage_error() -> None:
    r = run()
    assert r.returncode == 2 and "required: COMMAND" in r.stderr and "Traceback" not in r.stderr


def test_unknown_command() -> None:
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr


def test_verbose_before_and_after_the_command() -> None:
    for args in (("-v", "host", "--list-machines"), ("host", "--list-machines", "-v"),
                 ("host", "-vv", "--list-machines")):
        r = run(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert "pc-q35-11.0" in r.stdout


def test_only_the_chosen_command_is_imported() -> None:
    code = ("import sys; from prmigrate import cli\n"
            "try:\n    cli.main(['migrate', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.startswith('prmigrate.') and m.split('.')[1]"
            " not in ('cli', 'commands')]\n"
            "other = [m for m in sys.modules if m.startswith('prmigrate.commands.')"
            " and m.split('.')[2] not in ('migrate', '_args', '_control_client')]\n"
            "print(bad, other, 'asyncio' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[] [] False"


def test_broken_pipe_is_quiet() -> None:
    """``prmigrate ... | head -1``: the reader goes away, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "prmigrate", "host", "--list-machines"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # nobody reads: the first write gets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=30) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_broken_pipe_through_head(tmp_path: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m prmigrate pr --help | head -1", shell=True,
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("usage: prmigrate pr")
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


# ---------------------------------------------------------------- target

IQN = "iqn.2026-11.org.prmigrate:shared"


@pytest.mark.parametrize("args,words", [
    (("--size", "12Q"), "argument --size: not a size: '12Q'"),
    (("--size", "0"), "argument --size: not a size: '0'"),
    (("--listen", "localhost"), "argument --listen: not an address: 'localhost'"),
    (("--listen", "127.0.0.1:99999"), "argument --listen: not an address"),
    (("--iqn", "notaniqn"), "argument --iqn: not an iSCSI name: 'notaniqn'"),
    (("--iqn", "iqn.2026-13.org.x:y"), "argument --iqn: not an iSCSI name"),
    (("--iqn", "eui.12345"), "argument --iqn: not an iSCSI name"),
    (("--acl", "bob"), "argument --acl: not an iSCSI name: 'bob'"),
])
def test_target_argument_errors_read_well(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    base = {"--iqn": IQN, "--lun": f"0={tmp_path / 'a.img'}", "--size": "1M"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    r = run("target", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert "parse_" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a.img").exists()


@pytest.mark.parametrize("name", [
    "iqn.2026-11.org.prmigrate:shared", "iqn.2001-04.com.example", "IQN.2001-04.COM.EXAMPLE:X",
    "eui.02004567A425678D", "naa.52004567BA64678D", "naa.62004567BA64678D0123456789ABCDEF",
])
def test_valid_iscsi_names(name: str) -> None:
    from prmigrate.commands._args import iscsi_name

    assert iscsi_name(name) == name


def test_target_port_in_use_is_refused_before_the_image_exists(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    img = tmp_path / "shared.img"
    try:
        r = run("target", "--listen", f"127.0.0.1:{port}", "--iqn", IQN, "--lun", f"0={img}",
                "--size", "1M")
    finally:
        busy.close()
    assert r.returncode == 1
    assert r.stderr.strip() == f"prmigrate target: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not img.exists()


@pytest.mark.parametrize("address", ["9464", "127.0.0.1:0", ":9464", "127.0.0.1:70000"])
def test_target_bad_metrics_address_is_a_usage_error(tmp_path: Path, address: str) -> None:
    img = tmp_path / "a.img"
    r = run("target", "--listen", "127.0.0.1:0", "--iqn", IQN, "--lun", f"0={img}", "--size", "1M",
            "--metrics", address)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"prmigrate target: --metrics: metrics address {address!r} is not ADDR:PORT"
    assert not img.exists()


def test_target_metrics_port_in_use_is_refused_before_the_image_exists(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    img = tmp_path / "shared.img"
    try:
        r = run("target", "--listen", "127.0.0.1:0", "--iqn", IQN, "--lun", f"0={img}",
                "--size", "1M", "--metrics", f"127.0.0.1:{port}")
    finally:
        busy.close()
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"prmigrate target: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not img.exists()


def test_target_missing_image_without_size(tmp_path: Path) -> None:
    r = run("target", "--listen", "127.0.0.1:0", "--iqn", IQN, "--lun", f"0={tmp_path / 'no.img'}")
    assert r.returncode == 1
    assert r.stderr.strip() == f"prmigrate target: {tmp_path / 'no.img'} does not exist: give --size to create it"


def test_target_unusable_image_path(tmp_path: Path) -> None:
    r = run("target", "--listen", "127.0.0.1:0", "--iqn", IQN, "--lun",
            f"0={tmp_path / 'missing-dir' / 'a.img'}", "--size", "1M")
    assert r.returncode == 1 and r.stderr.startswith("prmigrate target: LUN 0 (")
    assert "Traceback" not in r.stderr


def test_target_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    img = tmp_path / "a.img"
    p = subprocess.Popen([sys.executable, "-m", "prmigrate", "target", "--listen", "127.0.0.1:0",
                          "--iqn", IQN, "--lun", f"0={img}", "--size", "1M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not img.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "serving iqn.2026-11.org.prmigrate:shared on 127.0.0.1:" in err
    assert img.stat().st_size == 1 << 20  # a served image stays


def test_env_has_no_effect_on_help() -> None:
    env = dict(os.environ, COLUMNS="200")
    assert run("--help", env=env).returncode == 0


# ------------------------------------------------------------ device keys


def test_device_key_backend_target_and_its_old_spelling() -> None:
    from prmigrate.device.config import ConfigError, parse_device_spec

    new = parse_device_spec("name=vm1,backend=iscsi://127.0.0.1:3260,backend-target=iqn.2026-11.org.x:s,lun=2")
    old = parse_device_spec("name=vm1,backend=iscsi://127.0.0.1:3260,target=iqn.2026-11.org.x:s,lun=2")
    assert new == old and new.target_iqn == "iqn.2026-11.org.x:s" and new.lun == 2
    # target= that differs from the URL's still names the frontend node (old form)
    d = parse_device_spec("name=vm1,backend=iscsi://h/iqn.2026-11.org.x:s/0,target=iqn.2026-11.org.x:vm1")
    assert (d.target_iqn, d.frontend_iqn) == ("iqn.2026-11.org.x:s", "iqn.2026-11.org.x:vm1")
    with pytest.raises(ConfigError, match="disagrees"):
        parse_device_spec("name=vm1,backend=iscsi://h/iqn.2026-11.org.x:s/0,backend-target=iqn.2026-11.org.x:t")
    with pytest.raises(ConfigError, match="not both"):
        parse_device_spec("name=vm1,backend=iscsi://h,backend-target=iqn.a:b,target=iqn.a:b")


def test_host_device_spec_error_reads_well(tmp_path: Path) -> None:
    r = run("host", "--name", "h", "--initiator", "iqn.2026-11.org.x:h", "--control",
            str(tmp_path / "c.sock"), "--listen", "127.0.0.1:3999",
            "--device", "name=vm1,backend=iscsi://127.0.0.1:1/iqn.2026-11.org.x:s/0,colour=red")
    assert r.returncode == 1 and "unknown device property 'colour'" in r.stderr
    assert "backend-target" in r.stderr and "Traceback" not in r.stderr


def test_host_initiator_is_checked() -> None:
    r = run("host", "--initiator", "hosta", "--list-machines")
    assert r.returncode == 2 and "argument --initiator: not an iSCSI name: 'hosta'" in r.stderr


def test_demo_type_takes_every_spelling() -> None:
    from prmigrate.commands.demo import parse_type
    from prmigrate.scsi.constants import PrType

    for text in ("7", "WE_AR", "we-ar", "Write Exclusive, all registrants", "WRITE_EXCLUSIVE_ALL_REGISTRANTS"):
        assert parse_type(text) is PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS
    r = run("demo", "--type", "2")
    assert r.returncode == 2 and "argument --type: not a reservation type: '2'" in r.stderr


def test_demo_runs_with_an_all_registrants_type(tmp_path: Path) -> None:
    r = run("demo", "--quick", "--type", "WE_AR", "--workdir", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "type Write Exclusive, all registrants;" in r.stdout
    assert "result: OK" in r.stdout and "Traceback" not in r.stderr
