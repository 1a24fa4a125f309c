"""QEMU's libiscsi block driver (qemu-io, qemu-img) against ``prmigrate target``,
and a tshark decode of our traffic showing no malformed PDU."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import need, start_target, stop
from .test_conformance import run_suite

pytestmark = pytest.mark.interop


def run(args: list[str], timeout: float = 120) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, f"{args}: {p.stdout}\n{p.stderr}"
    assert "Pattern verification failed" not in p.stdout, p.stdout
    return p.stdout


def test_qemu_io_pattern_write_and_verify(target):
    need("qemu-io")
    url = target.url()
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "write -P 0x5a 1M 64k",
         "-c", "write -P 0x11 100M 4k", url])
    out = run(["qemu-io", "-f", "raw", "-c", "read -P 0xa5 0 1M", "-c", "read -P 0x5a 1M 64k",
               "-c", "read -P 0x11 100M 4k", "-c", "read -P 0 2M 512k", url])
    assert out.count("read ") >= 4


def test_qemu_img_convert_round_trip(target, tmp_path: Path):
    need("qemu-img")
    src = tmp_path / "src.raw"
    data = os.urandom(4 << 20) + bytes(4 << 20)
    src.write_bytes(data + bytes((256 << 20) - len(data)))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.url()], timeout=300)
    back = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", target.url(), str(back)], timeout=300)
    assert back.stat().st_size == 256 << 20
    with open(back, "rb") as f:
        assert f.read(len(data)) == data
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.url()], timeout=300)
    info = run(["qemu-img", "info", target.url()])
    assert "256 MiB" in info


def test_tshark_sees_no_malformed_pdu(tmp_path: Path):
    need("tshark", "iscsi-test-cu")
    t = start_target(tmp_path)
    pcap = tmp_path / "conformance.pcap"
    cap = subprocess.Popen(
        ["tshark", "-q", "-i", "lo", "-f", f"tcp port {t.port}", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(2.0)  # let the capture start
        # the reservation and iSCSI-level families plus the basic data path;
        # the whole ALL family would capture ~1.5 GB
        for i, family in enumerate(("ALL.Pr*", "ALL.Reserve6", "ALL.iSCSI*", "ALL.Read10", "ALL.Write10")):
            run_suite(t.url(), family, tmp_path / f"suite{i}.txt", timeout=120)
        time.sleep(1.0)
    finally:
        cap.terminate()
        try:
            cap.wait(10)
        except subprocess.TimeoutExpired:
            cap.kill()
        stop(t.proc)
    def tshark(*extra: str) -> str:
        return subprocess.run(
            ["tshark", "-r", str(pcap), "-d", f"tcp.port=={t.port},iscsi", *extra],
            capture_output=True, text=True, timeout=300, check=False,
        ).stdout

    decoded = tshark("-Y", "iscsi")
    lines = decoded.splitlines()
    assert len(lines) > 500, decoded[-2000:]
    assert "Login Command" in decoded and "Data In" in decoded and "SCSI: " in decoded
    # No iSCSI PDU is malformed. The only complaint allowed comes from the SCSI
    # payload dissector on a PERSISTENT RESERVE IN reply truncated to a short
    # allocation length (SPC-5 6.16: ADDITIONAL LENGTH still gives the full
    # size, and the dissector reads past the end of the data).
    malformed = [line for line in lines if "Malformed" in line]
    assert all("Persistent Reserve In Response Data" in line for line in malformed), malformed[:10]
    assert len(malformed) <= 4, malformed
    detail = tshark("-Y", "_ws.malformed", "-V")
    layers = set(re.findall(r"\[Malformed Packet: ([\w.-]+)\]", detail))
    assert layers <= {"SCSI"}, layers


def test_qemu_io_follows_logout_request_and_redirect(tmp_path: Path):
    """A running qemu-io is asked to log out (Async Message event 1) while
    its node redirects to a second portal: it logs out, is answered 0x0101 on
    re-login, follows TargetAddress and finishes every verified I/O there."""
    need("qemu-io")
    import asyncio

    from prmigrate.iscsi.target import IscsiTarget, TargetNode
    from prmigrate.lun.unit import LogicalUnit

    iqn = "iqn.2026-11.org.prmigrate:moving"

    async def go() -> tuple[int, str, int]:
        lu = LogicalUnit(tmp_path / "lun.img", 64 << 20, lun=0, name="moving")
        node_a = TargetNode(iqn, {0: lu})
        a = IscsiTarget([node_a])
        b = IscsiTarget([TargetNode(iqn, {0: lu})])
        (ha, pa), *_ = await a.start("127.0.0.1", 0)
        (hb, pb), *_ = await b.start("127.0.0.3", 0)
        cmds: list[str] = []
        for i in range(3000):
            cmds += ["-c", f"write -P {i % 200 + 1} {i * 4096} 4k", "-c", f"read -P {i % 200 + 1} {i * 4096} 4k"]
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", *cmds, f"iscsi://{ha}:{pa}/{iqn}/0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await asyncio.sleep(0.3)
            node_a.redirect = (hb, pb, 1)
            asked = a.request_logout(iqn, wait=2)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode or 0, out.decode(errors="replace"), asked
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await a.close()
            await b.close()
            lu.close()

    rc, out, asked = asyncio.run(go())
    assert rc == 0, out[-2000:]
    assert out.count("wrote 4096/4096") == 3000 and out.count("read 4096/4096") == 3000
    assert "Pattern verification failed" not in out
    assert asked in (0, 1)  # 0 when qemu-io was faster than the request
