"""``prmigrate demo --vm`` as a user runs it: one command, its JSON report,
every process it started gone at the end (the guest is built by
scripts/build-guest.sh when its cache is missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .migration_cluster import env

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]


def test_demo_vm_migrates_the_vm_and_its_reservation(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "prmigrate.cli", "demo", "--vm", "--json",
                        "--workdir", str(workdir)],
                       capture_output=True, text=True, timeout=800, env=env(), check=False)
    assert p.stdout, p.stderr
    report = json.loads(p.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert p.returncode == 0 and report["ok"] and not failed, (failed, report.get("error"), report.get("logs"))
    names = [c["name"] for c in report["checks"]]
    for wanted in ("hosta -> hostb: guest writes go on, no error, no mismatch",
                   "after hosta -> hostb: the guest's key and type on hostb's nexus",
                   "after hosta -> hostb: nothing on hosta's nexus",
                   "after hostb -> hosta: the guest's key and type on hosta's nexus",
                   "after the cancelled migration: the guest's key and type on hosta's nexus",
                   "the incoming device on hostb is deleted",
                   "the VM on hostb is fenced: its next write gets RESERVATION CONFLICT",
                   "the guest saw no I/O error and no RESERVATION CONFLICT before the fence"):
        assert wanted in names, (wanted, names)
    assert report["left_running"] == []
    steps = [s["step"] for s in report["steps"]]
    assert steps[:3] == ["VM migrated hosta -> hostb", "VM migrated hostb -> hosta",
                         "VM migration hosta -> hostb cancelled in pre-switchover"], steps
    # no QEMU of the demo is left (their command lines name the work directory)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10, check=True)
    assert str(workdir) not in ps.stdout
    # the text report says the same
    from prmigrate.demo.vm_scenario import render
    text = render(report)
    assert "all checks passed" in text and "FAILED" not in text
