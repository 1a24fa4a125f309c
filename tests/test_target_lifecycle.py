"""``prmigrate target``'s life cycle as a process: its state directory is
locked, READY/RELOADING/STOPPING on a NOTIFY_SOCKET path, SIGHUP does not
stop it, SIGTERM does (status 0)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from .host.test_lifecycle import SHARED, Notify
from .interop.conftest import stop, wait_listening
from .interop.migration_cluster import free_port, spawn


def test_target_lock_notify_and_signals(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_main(tmp_path), 60))


async def _main(tmp: Path) -> None:
    notify = Notify(tmp, abstract=False)
    state = tmp / "target-state"

    def target(name: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        port = free_port("127.0.0.1")
        p = spawn(name, [sys.executable, "-m", "prmigrate.cli", "target", "--listen", f"127.0.0.1:{port}",
                         "--iqn", SHARED, "--size", "4M", "--lun", f"0={tmp / (name + '.img')}",
                         "--state-dir", str(state)], tmp, env)
        p.host, p.port = "127.0.0.1", port
        return p

    first = target("first", {"NOTIFY_SOCKET": notify.env})
    second = None
    try:
        ready = await notify.wait_for("READY")
        assert ready["MAINPID"] == str(first.proc.pid) and "serving" in ready["STATUS"]
        wait_listening(first.host, first.port, first.proc)
        second = target("second")
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, second.proc.wait, 30) == 1
        assert f"pid {first.proc.pid}" in second.log and str(state) in second.log
        first.proc.send_signal(signal.SIGHUP)
        await notify.wait_for("RELOADING")
        await notify.wait_for("READY")
        assert first.alive() and "SIGHUP: log files reopened" in first.log
        wait_listening(first.host, first.port, first.proc)
        first.proc.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING")
        assert await loop.run_in_executor(None, first.proc.wait, 20) == 0
    finally:
        notify.close()
        for p in (first, second):
            if p is not None and p.alive():
                stop(p.proc)
