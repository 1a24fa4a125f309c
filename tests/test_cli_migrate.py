"""``prmigrate migrate`` run as a user runs it, against two host daemons and
a shared target started as processes (tests/interop/migration_cluster.py)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.interop.migration_cluster import cluster, env


async def _migrate(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prmigrate", "migrate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env())
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def test_migrate_with_control_shows_timed_states_and_a_clean_record(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            control = str(c.procs["hosta"].control)
            code, out, err = await _migrate("--control", control, "--device", "vm1",
                                            "--to", c.procs["hostb"].migrate_addr)
            assert code == 0, out + err
            assert "vm1 now runs on" in out
            # progress: one line per state, each with the time since the start
            states = re.findall(r"^\s+([\d.]+) ms  (\w+)$", out, re.M)
            assert [s for _, s in states][-1] == "completed", out
            assert [float(t) for t, _ in states] == sorted(float(t) for t, _ in states)
            await asyncio.sleep(0.5)  # the destination hangs up after the end
            code, out, err = await _migrate("--host", control, "--device", "vm1", "--query")
            rec = json.loads(out)
            assert code == 0 and rec["success"] is True
            assert rec["errors"] == [], rec["errors"]
            # the stumble: the JSON record through `| head -1`
            piped = subprocess.run(f"{sys.executable} -m prmigrate migrate --control {control} "
                                   "--device vm1 --query | head -1", shell=True, env=env(),
                                   capture_output=True, text=True, timeout=60)
            assert piped.stdout == "{\n" and piped.stderr == "", piped.stderr

        asyncio.run(go())


def test_migrate_timeout_is_the_whole_wait(tmp_path: Path) -> None:
    """A destination that accepts TCP but never answers: the daemon gives up
    connecting after its own 10 s; --timeout 12 keeps trying until 12 s,
    then cancels. The device stays on the source, exit 1."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        with cluster(tmp_path) as c:

            async def go() -> None:
                control = str(c.procs["hosta"].control)
                t0 = time.monotonic()
                code, out, err = await _migrate("--control", control, "--device", "vm1",
                                                "--to", f"127.0.0.1:{port}", "--timeout", "12")
                took = time.monotonic() - t0
                assert code == 1, out + err
                assert took >= 12, took
                assert "no outcome after 12 s: migration cancelled, vm1 stays on the source" in err
                assert "in CONNECTING: in CONNECTING" not in out + err
                await c.wait_device("hosta", True)

            asyncio.run(go())
    finally:
        silent.close()


def test_migrate_usage_errors(tmp_path: Path) -> None:
    async def go() -> None:
        code, out, err = await _migrate("--control", str(tmp_path / "none.sock"), "--device", "vm1",
                                        "--to", "127.0.0.1:4444")
        assert code == 2 and err.startswith("prmigrate migrate: cannot reach "), err
        code, out, err = await _migrate("--control", str(tmp_path / "none.sock"), "--name", "vm1",
                                        "--to", "127.0.0.1:4444")
        assert code == 2 and err.startswith("prmigrate migrate: cannot reach "), err
        code, out, err = await _migrate("--control", "x", "--device", "vm1", "--to", "nowhere")
        assert code == 2 and "argument --to: not an address: 'nowhere'" in err
        code, out, err = await _migrate("--control", "x", "--device", "vm1", "--timeout", "soon")
        assert code == 2 and "argument --timeout: not a duration: 'soon'" in err
        assert "Traceback" not in err

    asyncio.run(go())


def test_migrate_batch_usage_errors(tmp_path: Path) -> None:
    async def go() -> None:
        for args, says in ((("--all", "--device", "vm1", "--to", "127.0.0.1:4444"), "exclude each other"),
                           (("--to", "127.0.0.1:4444"), "--name NAME or --all is required"),
                           (("--device", "vm1", "--device", "vm2", "--query"), "take one --name"),
                           (("--all", "--cancel"), "take one --name"),
                           # --name and its old spelling --device are one option
                           (("--name", "vm1", "--device", "vm2", "--query"), "take one --name"),
                           (("--all", "--name", "vm1", "--to", "127.0.0.1:4444"), "exclude each other")):
            code, out, err = await _migrate("--control", str(tmp_path / "none.sock"), *args)
            assert code == 2 and says in err, (args, err)
            assert "Traceback" not in err

    asyncio.run(go())


def test_migrate_batch_refuses_an_unknown_device_and_starts_nothing(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            control = str(c.procs["hosta"].control)
            code, out, err = await _migrate("--control", control, "--device", "vm1", "--device", "nope",
                                            "--to", c.procs["hostb"].migrate_addr)
            assert code == 2 and "nope" in err, out + err
            assert await c.call("hosta", "query-migrate") == []  # nothing started
            assert [d["name"] for d in await c.call("hosta", "query-devices")] == ["vm1"]

        asyncio.run(go())
