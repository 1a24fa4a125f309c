"""Transparency: libiscsi's conformance suite through the host daemon.

``iscsi-test-cu -d -i IQN1 -I IQN2 -t ALL`` is run twice in the same test:
directly against the backend LUN, then through a ``prmigrate host`` guest
frontend whose device forwards to that same LUN; then the SANITIZE tests
the conformance test runs with -S. The per-test outcomes (pass / fail /
skipped) must be the same. Each run gives its own URL a second time as the
multipath URL (the backend's directly, the frontend's through the host), so
MultipathIO runs (libiscsi 1.19 logs its second path in with the -I name).
Sessions of one initiator name share that guest's backend nexus through the
host; the device keeps unit attentions and SCSI-2 reservations per frontend
nexus (``device/frontends.py``). Sanitize.Reservations (a RESERVE(6) from a
second session of the -i name, which then logs out) checks the latter. The one difference the device is
allowed is the REPORT CAPABILITIES mask with migrate-pr on (SIP_C and ATP_C
cleared); it is checked on its own, and a test whose outcome changes because
of it is listed in ``MASK_DEPENDENT`` (none is, with these backends).

Backends: ``prmigrate target`` (migrate-pr on) and tgt (tgtd; migrate-pr on
and off). Every process is started on 127.0.0.x, bounded in time, and
stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prmigrate.host.control import control_call

from .conftest import (
    INITIATOR1,
    INITIATOR2,
    free_loopback_port,
    need,
    start_target,
    stop,
    wait_listening,
)
from .test_conformance import SANITIZE_RUN, Outcome, parse_cunit, run_suite

pytestmark = pytest.mark.interop

HOST_INITIATOR = "iqn.2026-11.org.prmigrate:hosta"
FRONTEND = "iqn.2026-11.org.prmigrate:vm1"
TGT_IQN = "iqn.2026-11.org.prmigrate:tgt-shared"
# Tests whose outcome may change because SIP_C/ATP_C are masked (none so far).
MASK_DEPENDENT: frozenset[str] = frozenset()
# The guest's iSCSI transport is the host daemon's frontend target, not the
# backend's (as a QEMU guest's transport is virtio-scsi): the iSCSI-level
# families test the frontend. They must pass through the host; equality
# with the backend is not asked (tgt fails iSCSIDataSnInvalid itself).
TRANSPORT = re.compile(r"^ALL\.iSCSI")
# Target resets: the device takes a guest's TARGET WARM/COLD RESET (as a
# LOGICAL UNIT RESET of its backend LUN) only when the backend's REPORT
# SUPPORTED TASK MANAGEMENT FUNCTIONS lists target resets, so Reserve6's
# TargetWarmReset/TargetColdReset pass or skip as they do on the backend.


@dataclass
class HostProcess:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    control: Path
    log_path: Path

    def url(self, node: str = FRONTEND, lun: int = 0) -> str:
        return f"iscsi://{self.host}:{self.port}/{node}/{lun}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, command: str, arguments: dict | None = None):  # type: ignore[no-untyped-def]
        return asyncio.run(control_call(self.control, command, arguments, timeout=10))


def start_host(workdir: Path, *devices: str, extra: list[str] | None = None, name: str = "hosta",
               initiator: str = HOST_INITIATOR) -> HostProcess:
    """``prmigrate host`` on a free loopback portal; waits for the frontend
    and the control socket."""
    host, port = free_loopback_port()
    control = workdir / f"{name}.sock"
    args = [sys.executable, "-m", "prmigrate.cli", "host", "--name", name, "--initiator", initiator,
            "--listen", f"{host}:{port}", "--control", str(control),
            "--state-dir", str(workdir / f"{name}-state")]
    for d in devices:
        args += ["--device", d]
    args += extra or []
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    log_path = workdir / f"host-{name}-{port}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env)
    try:
        wait_listening(host, port, proc)
        deadline = time.monotonic() + 10
        while not control.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host daemon did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
    except Exception:
        stop(proc)
        raise
    return HostProcess(proc, host, port, control, log_path)


def device_spec(backend_url: str, *, migrate_pr: str | None = None, node: str = FRONTEND,
                extra: str = "") -> str:
    spec = f"name=vm1,backend={backend_url},target={node},machine=pc-q35-11.0"
    if migrate_pr is not None:
        spec += f",migrate-pr={migrate_pr}"
    return spec + extra


def outcome(o: Outcome) -> str:
    if o.failed or not o.passed:
        return "FAIL"
    return "SKIP" if o.skipped else "PASS"


def result_map(text: str) -> dict[str, str]:
    return {name: outcome(o) for name, o in parse_cunit(text).items()}


def allowed(name: str, direct: str, via: str) -> bool:
    if direct == via or name in MASK_DEPENDENT:
        return True
    if TRANSPORT.search(name):
        return via == "PASS" or (via == "SKIP" and direct == "SKIP")
    return False


def differences(direct: dict[str, str], via: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Per-test outcome changes other than the allowed ones."""
    return {
        n: (direct.get(n, "-"), via.get(n, "-"))
        for n in sorted(set(direct) | set(via))
        if not allowed(n, direct.get(n, "-"), via.get(n, "-"))
    }


def all_differences(direct: dict[str, str], via: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {
        n: (direct.get(n, "-"), via.get(n, "-"))
        for n in sorted(set(direct) | set(via))
        if direct.get(n) != via.get(n)
    }


def summary(results: dict[str, str]) -> str:
    counts = {k: list(results.values()).count(k) for k in ("PASS", "SKIP", "FAIL")}
    return f"{len(results)} tests: {counts['PASS']} pass, {counts['SKIP']} skip, {counts['FAIL']} fail"


def report_capabilities(url: str) -> bytes:
    """REPORT CAPABILITIES byte 2 and 3 as seen at ``url`` (our initiator)."""
    from prmigrate.iscsi.initiator import connect
    from prmigrate.scsi.constants import PrInAction

    async def go() -> bytes:
        s = await connect(url, initiator_name=INITIATOR1, isid=0x23D0000000AA, reconnect=False)
        try:
            r = await s.pr_in(PrInAction.REPORT_CAPABILITIES, 8)
            assert r.good, r
            return bytes(r.data_in)
        finally:
            await s.close()

    return asyncio.run(asyncio.wait_for(go(), 20))


def run_all(url: str, out: Path) -> str:
    """ALL with ``url`` as its own second path, then the SANITIZE tests the
    conformance test runs with -S; a test of the second run replaces its
    skipped entry of the first in ``parse_cunit``."""
    text = run_suite(url, "ALL", out, timeout=400, multipath_url=url)
    return text + run_suite(url, ",".join(f"ALL.Sanitize.{n}" for n in SANITIZE_RUN),
                            out.with_suffix(".sanitize.txt"), timeout=200, sanitize=True)


def zero_block_256(url: str) -> None:
    """MultipathIO.CompareAndWrite (libiscsi 1.19) zeroes LBAs 0-255 and then
    compares LBAs 0-256 with zeros: it needs LBA 256 as a fresh image has it,
    and the direct run has just written it. Restored before the second run."""
    from prmigrate.iscsi.initiator import connect

    async def go() -> None:
        s = await connect(url, initiator_name=INITIATOR1, isid=0x23D0000000AB, reconnect=False)
        try:
            _, size = await s.read_capacity16()
            await s.write(256, bytes(size))
        finally:
            await s.close()

    asyncio.run(asyncio.wait_for(go(), 20))


def compare_through_host(workdir: Path, backend_url: str, migrate_pr: str | None) -> None:
    direct = run_all(backend_url, workdir / "direct.txt")
    zero_block_256(backend_url)
    host = start_host(workdir, device_spec(backend_url, migrate_pr=migrate_pr))
    try:
        devices = host.call("query-devices")
        via = run_all(host.url(), workdir / "via-host.txt")
        # after 27 reservation tests from two initiators, what the device
        # tracked is what the backend says (verification changes nothing)
        verify = host.call("device-verify", {"device": "vm1"})
        final = host.call("query-devices")[0]["pr-state"]
        caps_direct = report_capabilities(backend_url)
        caps_via = report_capabilities(host.url())
    finally:
        rc = stop(host.proc)
    a, b = result_map(direct), result_map(via)
    print(f"\ndirect:    {summary(a)}\nvia host:  {summary(b)}")
    print(f"outcome changes (all allowed unless asserted below): {all_differences(a, b)}")
    assert len(a) >= 200, direct[-2000:]
    diff = differences(a, b)
    assert not diff, f"per-test results differ (direct, via host): {diff}"
    # the PR tests really ran through the device
    assert len(re.findall(r"Send PROUT/", via)) >= 50
    assert verify == {"changes": []}, verify
    assert not final["unverified"], final
    on = devices[0]["migrate-pr"]
    assert on is (migrate_pr != "off")
    masked = bytearray(caps_direct)
    if on:
        masked[2] &= ~0x0C
    assert caps_via == bytes(masked), (caps_direct.hex(), caps_via.hex())
    log = host.log
    assert "Traceback" not in log, log[-4000:]
    assert rc == 0, log[-2000:]


def test_transparency_prmigrate_target(tmp_path: Path) -> None:
    need("iscsi-test-cu")
    t = start_target(tmp_path)
    try:
        compare_through_host(tmp_path, t.url(), None)
    finally:
        stop(t.proc)


@pytest.fixture
def tgt(tmp_path: Path) -> Iterator[str]:
    from tests.iscsi.test_initiator import TGTADM, TGTD, Tgt

    if not (TGTD and TGTADM):
        pytest.fail("tgt (tgtd/tgtadm) is not installed: apt-get install tgt")
    t = Tgt(tmp_path)
    t.start()
    try:
        t.add_target(1, TGT_IQN, 256 << 20)
        yield f"iscsi://127.0.0.1:{t.port}/{TGT_IQN}/1"
    finally:
        t.stop()


@pytest.mark.parametrize("migrate_pr", ["on", "off"])
def test_transparency_tgt(tmp_path: Path, tgt: str, migrate_pr: str) -> None:
    need("iscsi-test-cu")
    compare_through_host(tmp_path, tgt, migrate_pr)


def test_result_map_differences() -> None:
    a = {"ALL.X.A": "PASS", "ALL.X.B": "SKIP"}
    assert differences(a, dict(a)) == {}
    assert differences(a, {"ALL.X.A": "FAIL"}) == {"ALL.X.A": ("PASS", "FAIL"), "ALL.X.B": ("SKIP", "-")}
    t = {"ALL.iSCSIdatasn.iSCSIDataSnInvalid": "FAIL", "ALL.Reserve6.TargetWarmReset": "SKIP"}
    ok = {"ALL.iSCSIdatasn.iSCSIDataSnInvalid": "PASS", "ALL.Reserve6.TargetWarmReset": "PASS"}
    assert differences(t, ok) == {"ALL.Reserve6.TargetWarmReset": ("SKIP", "PASS")}
    assert differences(ok, t) == {
        "ALL.iSCSIdatasn.iSCSIDataSnInvalid": ("PASS", "FAIL"),
        "ALL.Reserve6.TargetWarmReset": ("PASS", "SKIP"),
    }
    assert INITIATOR2 != INITIATOR1
