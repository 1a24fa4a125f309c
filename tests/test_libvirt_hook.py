"""contrib/libvirt/hooks/qemu run as libvirt runs it (``qemu GUEST migrate
begin -``, the domain XML on stdin), with a fake ``prmigrate`` first on PATH
that records its arguments and answers ``device list --json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from prmigrate.device.config import parse_device_spec, split_spec

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "contrib" / "libvirt" / "hooks" / "qemu"
SAMPLE_CONFIG = ROOT / "contrib" / "libvirt" / "libvirt-hook.toml"

DOMAIN = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <devices>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <disk type='network' device='lun'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='iscsi' name='iqn.2026-11.org.prmigrate:vm1/0'>
        <host name='10.0.0.2' port='3260'/>
        <initiator>
          <iqn name='iqn.2026-11.org.example:vm1-guest'/>
        </initiator>
      </source>
      <target dev='sda' bus='scsi'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='iscsi' name='iqn.2026-11.org.example:boot/0'>
        <host name='10.0.0.9'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-no-user-config'/>
  </qemu:commandline>
</domain>
"""

FAKE_PRMIGRATE = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["device", "list"]:
    print(os.environ.get("FAKE_DEVICES", "[]"))
    sys.exit(0)
if sys.argv[1:3] == ["device", "add"] and os.environ.get("FAKE_ADD_FAILS"):
    print("prmigrate device add: backend unreachable", file=sys.stderr)
    sys.exit(1)
print("added")
"""


def run_hook(tmp_path: Path, args: list[str], stdin: str = DOMAIN, config: Path | None = SAMPLE_CONFIG,
             **fake_env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "prmigrate"
    fake.write_text(FAKE_PRMIGRATE.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "PRMIGRATE_LIBVIRT_HOOK_CONFIG": str(config if config is not None else tmp_path / "absent.toml"),
           **fake_env}
    p = subprocess.run([str(HOOK), *args], input=stdin, capture_output=True, text=True, timeout=30, env=env,
                       check=False)
    calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return p, calls


def lun_hosts(xml_text: str) -> list[tuple[str, str | None]]:
    root = ET.fromstring(xml_text)
    return [(h.get("name", ""), h.get("port")) for h in root.iterfind("./devices/disk/source/host")]


def test_incoming_migration_adds_the_incoming_device_and_points_the_disk_here(tmp_path: Path) -> None:
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"])
    assert p.returncode == 0, p.stderr
    assert calls[0] == ["device", "list", "--host", "/run/prmigrate/host.sock", "--json"]
    assert calls[1][:4] == ["device", "add", "--host", "/run/prmigrate/host.sock"] and len(calls) == 2
    spec = dict(split_spec(calls[1][4]))
    assert spec == {"name": "vm1", "backend": "iscsi://10.0.0.1:3260/iqn.2026-11.org.example:shared/0",
                    "machine": "pc-q35-11.0", "frontend": "iqn.2026-11.org.prmigrate:vm1",
                    "incoming-from": "10.0.0.2:7000"}
    # the rest of the spec is a device prmigrate accepts
    cfg = parse_device_spec(",".join(f"{k}={v}" for k, v in spec.items() if k != "incoming-from"))
    assert cfg.name == "vm1" and cfg.frontend_iqn == "iqn.2026-11.org.prmigrate:vm1"
    # the LUN disk now opens this host's frontend; the other disk is as it was
    assert lun_hosts(p.stdout) == [("10.0.0.3", "3260"), ("10.0.0.9", None)]
    assert "xmlns:qemu=" in p.stdout and "<qemu:arg value=\"-no-user-config\"" in p.stdout
    root = ET.fromstring(p.stdout)
    assert root.find("./devices/disk/source/initiator/iqn").get("name") == "iqn.2026-11.org.example:vm1-guest"


def test_a_device_already_here_is_reused(tmp_path: Path) -> None:
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"],
                        FAKE_DEVICES=json.dumps([{"name": "vm1"}, {"name": "other"}]))
    assert p.returncode == 0, p.stderr
    assert [c[:2] for c in calls] == [["device", "list"]]
    assert "already on this host" in p.stderr
    assert lun_hosts(p.stdout)[0] == ("10.0.0.3", "3260")


@pytest.mark.parametrize("op", [["vm1", "prepare", "begin", "-"], ["vm1", "start", "begin", "-"],
                                ["vm1", "release", "end", "-"], ["vm1", "restore", "begin", "-"],
                                ["vm1", "migrate"]])
def test_other_operations_do_nothing(tmp_path: Path, op: list[str]) -> None:
    p, calls = run_hook(tmp_path, op)
    assert (p.returncode, p.stdout, calls) == (0, "", [])


def test_a_domain_without_prmigrate_disks_is_left_as_it_is(tmp_path: Path) -> None:
    other = DOMAIN.replace("iqn.2026-11.org.prmigrate:vm1/0", "iqn.2026-11.org.example:elsewhere/0")
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], other)
    assert (p.returncode, p.stdout, calls) == (0, "", [])


def test_a_disk_already_on_this_hosts_frontend_moves_nothing(tmp_path: Path) -> None:
    here = DOMAIN.replace("<host name='10.0.0.2' port='3260'/>", "<host name='10.0.0.3'/>")
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], here)
    assert (p.returncode, p.stdout, calls) == (0, "", [])


def test_a_source_portal_not_in_peers_cancels_the_migration(tmp_path: Path) -> None:
    unknown = DOMAIN.replace("host name='10.0.0.2'", "host name='10.0.0.7'")
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], unknown)
    assert p.returncode == 1 and p.stdout == "" and calls == []
    assert "10.0.0.7:3260" in p.stderr and "[peers]" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_refused_device_add_cancels_the_migration(tmp_path: Path) -> None:
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], FAKE_ADD_FAILS="1")
    assert p.returncode == 1 and p.stdout == ""
    assert "backend unreachable" in p.stderr and "Traceback" not in p.stderr
    assert [c[:2] for c in calls] == [["device", "list"], ["device", "add"]]


def test_bad_input_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], "<domain><devices>")
    assert p.returncode == 1 and "domain XML" in p.stderr and "Traceback" not in p.stderr and calls == []
    bad = tmp_path / "bad.toml"
    bad.write_text('control = "/run/x.sock"\n[devices."iqn.x:y"]\nname = "y"\n')
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], config=bad)
    assert p.returncode == 1 and "bad.toml" in p.stderr and "Traceback" not in p.stderr and calls == []


def test_no_configuration_file_prepares_nothing(tmp_path: Path) -> None:
    p, calls = run_hook(tmp_path, ["vm1", "migrate", "begin", "-"], config=None)
    assert (p.returncode, p.stdout, calls) == (0, "", [])
    assert "not prepared" in p.stderr


@pytest.mark.interop
def test_against_real_host_daemons_the_incoming_device_is_added(tmp_path: Path) -> None:
    """The hook with the real ``prmigrate`` on PATH and two host daemons:
    B gets the incoming device from A, nothing moves until a command needs
    the guest's nexus, and the disk now names B's frontend."""
    import asyncio

    from tests.interop.migration_cluster import FRONTEND, ProcCluster, env

    c = ProcCluster(tmp_path)
    c.start()
    try:
        a, b = c.procs["hosta"], c.procs["hostb"]
        config = tmp_path / "hook.toml"
        config.write_text(
            f'control = "{b.control}"\nfrontend = "{b.host}:{b.port}"\nprmigrate = "{tmp_path / "prm"}"\n'
            f'[peers]\n"{a.host}:{a.port}" = "{a.migrate_addr}"\n'
            f'[devices."{FRONTEND}"]\nname = "vm1"\nbackend = "{c.backend_url}"\nmachine = "{c.machine}"\n')
        wrapper = tmp_path / "prm"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m prmigrate.cli "$@"\n')
        wrapper.chmod(0o755)
        domain = DOMAIN.replace("iqn.2026-11.org.prmigrate:vm1/0", f"{FRONTEND}/0").replace(
            "<host name='10.0.0.2' port='3260'/>", f"<host name='{a.host}' port='{a.port}'/>")
        p = subprocess.run([str(HOOK), "vm1", "migrate", "begin", "-"], input=domain, capture_output=True,
                           text=True, timeout=60, check=False,
                           env=env() | {"PRMIGRATE_LIBVIRT_HOOK_CONFIG": str(config)})
        assert p.returncode == 0, p.stderr
        assert lun_hosts(p.stdout)[0] == (b.host, str(b.port))
        devices = asyncio.run(c.call("hostb", "query-devices"))
        assert [d["name"] for d in devices] == ["vm1"] and devices[0].get("incoming-from"), devices
        assert "vm1" in [d["name"] for d in asyncio.run(c.call("hosta", "query-devices"))]
        # run again (a retried migration): the device is reused, not added twice
        p = subprocess.run([str(HOOK), "vm1", "migrate", "begin", "-"], input=domain, capture_output=True,
                           text=True, timeout=60, check=False,
                           env=env() | {"PRMIGRATE_LIBVIRT_HOOK_CONFIG": str(config)})
        assert p.returncode == 0 and "reused" in p.stderr, p.stderr
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()
