"""``prmigrate target --control`` at run time, with real processes.

The target runs as its own process with ``--control`` and ``--config``. The
QMP client is ``qemu.qmp`` (a client this project did not write); the
``prmigrate target lun ...`` CLI is checked on the same socket. A guest
(our initiator) registers and reserves LUN 0 and keeps its session while
LUN 1 is added and deleted: a new ``iscsi-ls`` sees LUN 1 come and go, the
guest's writes go on after its REPORTED LUNS DATA HAS CHANGED unit
attention, READ RESERVATION from an independent ``prmigrate pr`` process
shows the guest's reservation unchanged, and another initiator's write is
still refused with RESERVATION CONFLICT. The configuration file follows
every change and a restarted target serves what it says. With the file on
a tmpfs remounted read-only, lun-add fails with GenericError and changes
nothing (fail closed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu.qmp as qmp

from prmigrate.iscsi.initiator import ScsiError, connect
from prmigrate.scsi.constants import PrOutAction, PrType, Status
from prmigrate.scsi.pr import pr_out_params

from .conftest import TargetProcess, free_loopback_port, need, stop, wait_listening

pytestmark = pytest.mark.interop

IQN = "iqn.2026-11.org.prmigrate:runtime"
GUEST = "iqn.2026-11.org.prmigrate:runtime-guest"
OTHER = "iqn.2026-11.org.prmigrate:runtime-other"
OBSERVER = "iqn.2026-11.org.prmigrate:runtime-observer"
KEY = 0x5EED


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(workdir: Path, *extra: str) -> tuple[TargetProcess, Path]:
    host, port = free_loopback_port()
    sock = workdir / f"target-{port}.sock"
    args = [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"{host}:{port}",
            "--state-dir", str(workdir / "prstate"), "--control", str(sock), *extra]
    log_path = workdir / f"target-{port}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=_env())
    try:
        wait_listening(host, port, proc)
        for _ in range(100):
            if sock.exists():
                break
            asyncio.run(asyncio.sleep(0.05))
    except Exception:
        stop(proc)
        raise
    return TargetProcess(host, port, IQN, proc, log_path), sock


def iscsi_ls(t: TargetProcess) -> list[int]:
    p = subprocess.run(["iscsi-ls", "-s", "-i", OBSERVER, f"iscsi://{t.host}:{t.port}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    return [int(n) for n in re.findall(r"Lun:(\d+)", p.stdout)]


def cli(sock: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prmigrate.cli", "target", *words, "--control", str(sock)],
                          capture_output=True, text=True, timeout=30, env=_env())


def read_reservation(t: TargetProcess) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "prmigrate.cli", "pr", t.url(0), "--initiator", OBSERVER,
                        "--json", "--read-reservation"], capture_output=True, text=True, timeout=30, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


async def qmp_client(sock: Path) -> Any:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    return client


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    need("iscsi-ls")
    return tmp_path


def test_lun_added_and_deleted_while_a_guest_keeps_its_reservation(workdir: Path) -> None:
    config = workdir / "target.toml"
    t, sock = start(workdir, "--iqn", IQN, "--lun", f"0={workdir / 'lun0.img'}", "--size", "16M",
                    "--config", str(config))
    try:
        async def go() -> None:
            guest = await connect(t.url(0), initiator_name=GUEST, isid=0x23D000000042)
            seen_ua: list[tuple[int, int, int]] = []
            guest.on_unit_attention = lambda lun, s: seen_ua.append((lun, s.asc, s.ascq))
            client = await qmp_client(sock)
            try:
                assert client.greeting.QMP.version["package"].startswith("prmigrate ")
                await guest.read_capacity16()
                r = await guest.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
                assert r.status == Status.GOOD
                r = await guest.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))
                assert r.status == Status.GOOD
                await guest.write(0, b"\x11" * 512)
                before = await asyncio.to_thread(read_reservation, t)
                assert before["reservation"]["type_name"] == "Write Exclusive", before

                with client.listener("LUN_ADDED") as added:
                    info = await client.execute("lun-add", {"lun": 1, "path": "lun1.img", "size": "8M"})
                    event = await asyncio.wait_for(added.get(), 10)
                assert info["lun"] == 1 and info["size"] == 8 << 20 and Path(info["path"]).exists()
                assert event["data"]["lun"] == 1 and "seconds" in event["timestamp"]
                assert await asyncio.to_thread(iscsi_ls, t) == [0, 1]

                # the guest goes on: its next command reports 3F/0E (retried), writes pass
                await guest.write(1, b"\x22" * 512)
                assert (0, 0x3F, 0x0E) in seen_ua, seen_ua
                assert await guest.read(1, 1) == b"\x22" * 512
                await guest.write(0, b"\x33" * 512, lun=1)  # the new LUN is usable at once
                assert await asyncio.to_thread(read_reservation, t) == before
                sessions = await client.execute("query-sessions")
                mine = [s for s in sessions if s["initiator"] == GUEST]
                assert mine and mine[0]["registered"] == {"0": {"key": f"0x{KEY:x}", "holder": True,
                                                                "all-tg-pt": False}}, sessions

                # the reservation still works against another initiator
                other = await connect(t.url(0), initiator_name=OTHER, isid=0x23D000000077)
                try:
                    with pytest.raises(ScsiError) as e:
                        await other.write(0, b"\x44" * 512)
                    assert e.value.result.status == Status.RESERVATION_CONFLICT
                finally:
                    await other.close()

                with client.listener("LUN_DELETED") as deleted:
                    assert await client.execute("lun-del", {"lun": 1}) == {}
                    await asyncio.wait_for(deleted.get(), 10)
                assert await asyncio.to_thread(iscsi_ls, t) == [0]
                seen_ua.clear()
                await guest.write(2, b"\x55" * 512)
                assert (0, 0x3F, 0x0E) in seen_ua, seen_ua
                assert await asyncio.to_thread(read_reservation, t) == before

                # typed errors, as QEMU words them
                for command, arguments, cls, words in [
                    ("lun-del", {"lun": 1}, "DeviceNotFound", "LUN 1 does not exist"),
                    ("lun-add", {"lun": "2", "path": "x"}, "GenericError", "'lun'"),
                    ("lun-add", {"lun": 2, "path": "x", "colour": 1}, "GenericError", "'colour'"),
                    ("lun-add", {"lun": 2, "path": "missing.img"}, "GenericError", "'size'"),
                    ("lun-add", {"lun": 0, "path": "lun0.img"}, "GenericError", "LUN 0 exists"),
                    ("acl-add", {"initiator": "not a name"}, "GenericError", "'initiator'"),
                    ("no-such-command", None, "CommandNotFound", "no-such-command"),
                ]:
                    with pytest.raises(qmp.ExecuteError) as err:
                        await client.execute(command, arguments)
                    assert err.value.error_class == cls and words in str(err.value), (command, str(err.value))
                assert not (workdir / "missing.img").exists()
            finally:
                await client.disconnect()
                await guest.close()

        asyncio.run(asyncio.wait_for(go(), 90))

        # the CLI over the same socket
        p = cli(sock, "lun", "add", "3", str(workdir / "lun3.img"), "--size", "4M")
        assert p.returncode == 0, p.stderr
        p = cli(sock, "lun", "list")
        assert p.returncode == 0 and "lun3.img" in p.stdout and "lun0.img" in p.stdout, p.stdout
        p = cli(sock, "acl", "add", GUEST)
        assert p.returncode == 0, p.stderr
        p = cli(sock, "lun", "del", "7")
        assert p.returncode == 1 and "DeviceNotFound" in p.stderr, p.stderr
        saved = tomllib.loads(config.read_text())
        assert saved["iqn"] == IQN and saved["acl"] == [GUEST]
        assert {e["lun"]: Path(e["path"]).name for e in saved["lun"]} == {0: "lun0.img", 3: "lun3.img"}
    finally:
        stop(t.proc)
    assert "Traceback" not in t.log, t.log

    # restarted from the configuration file alone
    t, sock = start(workdir, "--config", str(config))
    try:
        p = subprocess.run(["iscsi-ls", "-s", "-i", GUEST, f"iscsi://{t.host}:{t.port}"],
                           capture_output=True, text=True, timeout=30)
        assert [int(n) for n in re.findall(r"Lun:(\d+)", p.stdout)] == [0, 3], p.stdout + p.stderr
        # the ACL is enforced: the observer may not log in
        p = subprocess.run(["iscsi-inq", "-i", OBSERVER, t.url(0)], capture_output=True, text=True, timeout=30)
        assert p.returncode != 0
    finally:
        stop(t.proc)


@pytest.fixture
def small_config_dir(workdir: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = workdir / "etc"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_change_that_cannot_be_saved_is_not_made(workdir: Path, small_config_dir: Path) -> None:
    config = small_config_dir / "target.toml"
    t, sock = start(workdir, "--iqn", IQN, "--lun", f"0={workdir / 'lun0.img'}", "--size", "16M",
                    "--config", str(config))
    try:
        saved = config.read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(small_config_dir)], check=True, timeout=30)

        async def go() -> None:
            client = await qmp_client(sock)
            try:
                for command, arguments in [("lun-add", {"lun": 1, "path": str(workdir / "lun1.img"), "size": "8M"}),
                                           ("acl-add", {"initiator": GUEST}),
                                           ("lun-del", {"lun": 0})]:
                    with pytest.raises(qmp.ExecuteError) as err:
                        await client.execute(command, arguments)
                    assert err.value.error_class == "GenericError" and "cannot save" in str(err.value)
                luns = await client.execute("query-luns")
                assert [x["lun"] for x in luns] == [0]
                assert await client.execute("query-acl") == {"open": True, "initiators": []}
            finally:
                await client.disconnect()

        asyncio.run(asyncio.wait_for(go(), 60))
        assert not (workdir / "lun1.img").exists()  # the image it created went again
        assert iscsi_ls(t) == [0]
        assert config.read_bytes() == saved
        subprocess.run(["mount", "-o", "remount,rw", str(small_config_dir)], check=True, timeout=30)
        p = cli(sock, "lun", "add", "1", str(workdir / "lun1.img"), "--size", "8M")
        assert p.returncode == 0, p.stderr
        assert iscsi_ls(t) == [0, 1]
    finally:
        stop(t.proc)
    errors = [line for line in t.log.splitlines() if "configuration not saved" in line]
    assert len(errors) == 3, t.log


def test_sighup_applies_the_changed_configuration_file(workdir: Path) -> None:
    """SIGHUP reads target.toml again: a LUN added to the file is served
    (visible to a new iscsi-ls), one removed from it is gone, the ACL
    becomes the file's, a LUN whose path changed is refused with a log
    line, and the guest's reservation on LUN 0 stays as it was."""
    import signal

    config = workdir / "target.toml"
    t, sock = start(workdir, "--iqn", IQN, "--lun", f"0={workdir / 'lun0.img'}", "--size", "16M",
                    "--config", str(config))
    (workdir / "lun1.img").write_bytes(b"\0" * (4 << 20))
    try:
        async def go() -> None:
            guest = await connect(t.url(0), initiator_name=GUEST, isid=0x23D000000043)
            client = await qmp_client(sock)
            try:
                r = await guest.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
                assert r.status == Status.GOOD
                r = await guest.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))
                assert r.status == Status.GOOD
                before = await asyncio.to_thread(read_reservation, t)

                async def hup_and_wait(line: str) -> None:
                    t.proc.send_signal(signal.SIGHUP)
                    for _ in range(200):
                        if line in t.log:
                            return
                        await asyncio.sleep(0.05)
                    raise AssertionError(f"{line!r} not logged:\n{t.log}")

                text = config.read_text()
                # top-level keys before the [[lun]] tables (TOML)
                config.write_text(f'acl = ["{GUEST}", "{OBSERVER}"]\n' + text
                                  + '\n[[lun]]\nlun = 1\npath = "lun1.img"\n')
                await hup_and_wait("LUN 1 added")
                luns = await client.execute("query-luns")
                assert [x["lun"] for x in luns] == [0, 1], luns
                assert await asyncio.to_thread(iscsi_ls, t) == [0, 1]
                acl = await client.execute("query-acl")
                assert acl == {"open": False, "initiators": sorted([GUEST.lower(), OBSERVER.lower()])}, acl

                # LUN 1 taken out of the file, LUN 0's path changed: one applied, one refused
                saved = tomllib.loads(config.read_text())
                lines = [f'acl = ["{GUEST}", "{OBSERVER}"]', "", "[[lun]]", "lun = 0",
                         f'path = "{workdir / "elsewhere.img"}"']
                config.write_text("\n".join(lines) + "\n")
                assert saved["lun"][0]["lun"] == 0
                await hup_and_wait("LUN 1 removed")
                assert "LUN 0: path changed" in t.log
                assert [x["lun"] for x in await client.execute("query-luns")] == [0]
                assert await asyncio.to_thread(read_reservation, t) == before
                await guest.write(0, b"\x33" * 512)  # the holder still writes
            finally:
                await client.disconnect()
                await guest.close()

        asyncio.run(asyncio.wait_for(go(), 90))
    finally:
        stop(t.proc)
