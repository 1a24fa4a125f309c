"""The shipped systemd units (systemd/): ``systemd-analyze verify`` accepts
them, and they declare what the daemons implement (Type=notify, reload by
SIGHUP, a watchdog). The notify protocol itself is tested against the
running daemon in tests/host/test_lifecycle.py."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
NAMES = ("prmigrate-target.service", "prmigrate-host@.service")


def systemd_analyze() -> str:
    """The tool, installed from Debian's systemd package when missing
    (as scripts/bootstrap.sh does)."""
    tool = shutil.which("systemd-analyze")
    if tool is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
                       env=env, timeout=600, check=False, stdout=subprocess.DEVNULL)
        tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing and cannot be installed here "
                    "(needs root and apt-get: run scripts/bootstrap.sh)")
    return tool


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


@pytest.mark.parametrize("name", NAMES)
def test_units_declare_notify_reload_and_watchdog(name: str) -> None:
    svc = unit(name)["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["KillSignal"] == "SIGTERM"
    command = "target" if "target" in name else "host"
    assert svc["ExecStart"].startswith(f"/usr/bin/prmigrate {command} ")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified as shipped except for the program's path: verify requires
    ExecStart's binary to exist, and where ``prmigrate`` is installed is
    the machine's business (/usr/bin for a package)."""
    tool = systemd_analyze()
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/usr/bin/prmigrate ", "/bin/true ")
        (tmp_path / name).write_text(text)
    r = subprocess.run([tool, "verify", *(str(tmp_path / n) for n in NAMES)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "prmigrate" in line]
    assert problems == [], problems


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit with a bad Type= is refused."""
    tool = systemd_analyze()
    text = (UNITS / "prmigrate-target.service").read_text().replace("/usr/bin/prmigrate ", "/bin/true ")
    (tmp_path / "prmigrate-target.service").write_text(text.replace("Type=notify", "Type=notifyy"))
    r = subprocess.run([tool, "verify", str(tmp_path / "prmigrate-target.service")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "notifyy" in r.stdout + r.stderr
