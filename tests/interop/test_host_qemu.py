"""QEMU's libiscsi driver (qemu-io, qemu-img) as the guest of a host daemon.

The CLI form of the issue, verbatim apart from loopback ports, a temporary
directory and a prmigrate target as the shared LUN: qemu-io writes patterns
through the guest frontend URL and reads them back verified, and the data is
on the backend LUN (read back directly). Also: two devices on one daemon, a
TOML configuration, SIGINT stopping the daemon cleanly; target and daemon busy-polling.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import need, start_target, stop
from .test_transparency import FRONTEND, HOST_INITIATOR, device_spec, start_host

pytestmark = pytest.mark.interop


def qemu_io(url: str, *cmds: str, timeout: float = 120) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, f"{args}: {p.stdout}\n{p.stderr}"
    assert "Pattern verification failed" not in p.stdout, p.stdout
    assert "failed" not in p.stdout.lower(), p.stdout
    return p.stdout


@pytest.mark.parametrize("poll", [False, True], ids=["sleeping", "busy-polling"])
def test_qemu_io_through_the_host_daemon(tmp_path: Path, poll: bool) -> None:
    """Also with target and daemon busy-polling (``--poll-us``): same data."""
    need("qemu-io")
    extra = ["--poll-us", "50"] if poll else []
    t = start_target(tmp_path, extra=extra)
    try:
        host = start_host(tmp_path, device_spec(t.url()), extra=extra)
        try:
            url = host.url()
            qemu_io(url, "write -P 0xa5 0 1M", "write -P 0x5a 1M 64k", "write -P 0x11 100M 4k")
            out = qemu_io(url, "read -P 0xa5 0 1M", "read -P 0x5a 1M 64k", "read -P 0x11 100M 4k",
                          "read -P 0 2M 512k")
            assert out.count("read ") >= 4
            # the bytes are on the shared LUN itself
            qemu_io(t.url(), "read -P 0xa5 0 1M", "read -P 0x11 100M 4k")
            dev = host.call("query-devices")[0]
            assert dev["frontend"]["node"] == FRONTEND
            nexus = next(iter(dev["backend-nexus"].values()))
            assert nexus["initiator"] == HOST_INITIATOR
        finally:
            host.proc.send_signal(signal.SIGINT)
            assert host.proc.wait(15) == 0, host.log[-2000:]
        assert not host.control.exists()
        assert "Traceback" not in host.log
    finally:
        stop(t.proc)


def test_qemu_img_info_two_devices_and_toml(tmp_path: Path) -> None:
    need("qemu-img")
    t = start_target(tmp_path, luns=2)
    toml = tmp_path / "host.toml"
    toml.write_text(
        "[host]\n"
        'name = "hostt"\n'
        f'initiator = "{HOST_INITIATOR}"\n'
        "[[device]]\n"
        'name = "vm2"\n'
        f'backend = "{t.url(1)}"\n'
        'target = "iqn.2026-11.org.prmigrate:vm2"\n'
        'machine = "pc-q35-10.2"\n'
        'guests = ["iqn.2008-11.org.linux-kvm"]\n'
    )
    try:
        host = start_host(tmp_path, device_spec(t.url(0)),
                          extra=["--config", str(toml), "--log-format", "json"])
        try:
            info = subprocess.run(["qemu-img", "info", host.url("iqn.2026-11.org.prmigrate:vm2")],
                                  capture_output=True, text=True, timeout=60)
            assert info.returncode == 0 and "256 MiB" in info.stdout, info.stdout + info.stderr
            devs = {d["name"]: d for d in host.call("query-devices")}
            assert set(devs) == {"vm1", "vm2"}
            assert devs["vm2"]["migrate-pr"] is False and devs["vm1"]["migrate-pr"] is True
            assert devs["vm2"]["properties"]["guests"] == ["iqn.2008-11.org.linux-kvm"]
            # the ACL keeps other initiators out
            denied = subprocess.run(["iscsi-inq", "-i", "iqn.2026-11.org.prmigrate:intruder",
                                     host.url("iqn.2026-11.org.prmigrate:vm2")],
                                    capture_output=True, text=True, timeout=30)
            assert denied.returncode != 0
        finally:
            stop(host.proc)
        # structured logs: one JSON object a line, naming the device
        records = [json.loads(line) for line in host.log.splitlines() if line.startswith("{")]
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
        assert {r.get("device") for r in records} >= {"vm1", "vm2"}
    finally:
        stop(t.proc)


def test_qemu_img_bench_writes_through_the_host_daemon_land_on_the_lun(tmp_path: Path) -> None:
    """32 writes in flight at once (qemu-img bench, QEMU's libiscsi driver)
    through the daemon's write relay, then a large write qemu-io splits into
    R2T-solicited bursts: every byte is on the backend LUN, read back directly."""
    need("qemu-io")
    need("qemu-img")
    t = start_target(tmp_path)
    try:
        host = start_host(tmp_path, device_spec(t.url()))
        try:
            m = re.match(r"iscsi://([^/]+)/([^/]+)/(\d+)$", host.url())
            assert m is not None
            opts = f"driver=iscsi,transport=tcp,portal={m.group(1)},target={m.group(2)},lun={m.group(3)}"
            p = subprocess.run(["qemu-img", "bench", "-w", "-c", "4096", "-d", "32", "-s", "4k",
                                "--pattern=0x3c", "--image-opts", opts],
                               capture_output=True, text=True, timeout=120, check=False)
            assert p.returncode == 0, p.stdout + p.stderr
            qemu_io(host.url(), "write -P 0xc3 32M 4M")
            qemu_io(t.url(), "read -P 0x3c 0 16M", "read -P 0xc3 32M 4M", "read -P 0 16M 4k")
        finally:
            host.proc.send_signal(signal.SIGINT)
            assert host.proc.wait(15) == 0, host.log[-2000:]
        assert "Traceback" not in host.log
    finally:
        stop(t.proc)
