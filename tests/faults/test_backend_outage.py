"""Backend outages with real processes: the shared target is killed (-9)
while a guest on host A writes and holds a reservation (APTPL), and started
again on the same portal 10 s, 65 s (or, with PRMIGRATE_LONG_FAULTS=1, 300 s)
later. Shipped reconnect policy and hold time, nothing shortened.

Checked: while the backend is down query-devices shows the backend sessions
down or retrying (since when, commands held) and the guest's commands get
BUSY (which it retries, as Linux and QEMU do), never an error; after the
target is back the guest's writes are acknowledged again without a new
login; the device verified its PR state after the re-login; every
acknowledged write is in the LUN's image file; READ FULL STATUS (a separate
``prmigrate pr`` process) shows the guest's key and reservation on A's nexus
only; only A serves the device; A's log stays small (one line per change of
a session's state, none per command)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from prmigrate.scsi.constants import PrType

from ..interop.migration_cluster import cluster
from .faultkit import (
    RetryingWriter,
    assert_holds,
    guest_session,
    image_blocks,
    kill_target,
    register_and_reserve,
    registrations,
    restart_target,
    status_text,
)

pytestmark = pytest.mark.interop

WE = int(PrType.WRITE_EXCLUSIVE)
LONG = os.environ.get("PRMIGRATE_LONG_FAULTS") == "1"
# (the 300 s case outlives the suite's default pytest-timeout: its own bound)
OUTAGES = [10, 65] + ([pytest.param(300, marks=pytest.mark.timeout(600))] if LONG else [])


@pytest.mark.parametrize("outage", OUTAGES, ids=lambda s: f"{s}s")
def test_backend_outage(tmp_path: Path, outage: int) -> None:
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await register_and_reserve(s, WE)
                w = RetryingWriter(s, streams=4)
                await asyncio.sleep(1.0)
                before = len(w.acked)
                assert before > 10 and not w.bad, (before, w.bad)
                log_before = c.procs["hosta"].log_path.stat().st_size
                kill_target(c)
                down_at = time.monotonic()
                # the daemon's view while the backend is down
                await asyncio.sleep(min(outage / 2, 20))
                (d,) = await c.call("hosta", "query-devices")
                links = [nx["session"] for nx in d["backend-nexus"].values()] + [d["monitor-session"]]
                assert all(link["state"] in ("down", "retrying") for link in links), links
                assert all(link["since"].endswith("Z") for link in links), links
                text = status_text(c, "hosta")
                assert "backend session (monitor): " in text and "RETRYING since" in text, text
                await asyncio.sleep(max(0.0, outage - (time.monotonic() - down_at)))
                restart_target(c)
                back_at = time.monotonic()
                await w.wait_acks(back_at, 40)
                await asyncio.sleep(1.0)
                await w.stop()
                assert not w.bad, w.bad  # only BUSY / unit attentions, retried
                if outage > 10:
                    assert w.retried.get("busy", 0) > 0, w.retried
                assert s.reconnects == 0  # the guest never logged in again
                (d,) = await c.call("hosta", "query-devices")
                links = [nx["session"] for nx in d["backend-nexus"].values()] + [d["monitor-session"]]
                assert all(link["state"] == "up" for link in links), links
                log = c.procs["hosta"].log
                assert "logged in again" in log, log[-3000:]  # the verification after the re-login
                grown = c.procs["hosta"].log_path.stat().st_size - log_before
                assert grown < 200_000, f"host log grew {grown} bytes in a {outage} s outage"
            finally:
                await s.close()
            image_blocks(c, w.acked)
            assert_holds(c, "hosta", WE)
            assert "vm1" in [x["name"] for x in await c.call("hosta", "query-devices")]
            assert await c.call("hostb", "query-devices") == []

        asyncio.run(asyncio.wait_for(go(), outage + 150))


def test_target_killed_during_write_burst(tmp_path: Path) -> None:
    """kill -9 of the target under 16 concurrent writers, restarted at
    once: every write the guest saw acknowledged is on the LUN, the
    reservation is where it was, the guest never logged in again."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await register_and_reserve(s, int(PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY))
                w = RetryingWriter(s, streams=16, span=4000)
                await asyncio.sleep(1.5)
                kill_target(c)
                restart_target(c)
                back = time.monotonic()
                await w.wait_acks(back, 40)
                await asyncio.sleep(1.0)
                await w.stop()
                assert not w.bad, w.bad
                assert len(w.acked) > 50
                assert s.reconnects == 0
            finally:
                await s.close()
            image_blocks(c, w.acked)
            assert_holds(c, "hosta", int(PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY))

        asyncio.run(asyncio.wait_for(go(), 150))


def test_target_restarted_without_the_state_is_noticed_before_resuming(tmp_path: Path) -> None:
    """The guest's registration and reservation were not APTPL: the
    restarted target has none. The device's verification after the
    re-login finds that before the guest's next command is forwarded, so
    query-devices no longer claims a reservation the LUN does not have."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await register_and_reserve(s, WE, aptpl=False)
                (d,) = await c.call("hosta", "query-devices")
                (g,) = d["pr-state"]["guests"].values()
                assert g["holder"], g
                kill_target(c)
                restart_target(c)
                w = RetryingWriter(s)
                await w.wait_acks(time.monotonic(), 40)
                await w.stop()
                assert not w.bad, w.bad
                (d,) = await c.call("hosta", "query-devices")
                assert d["pr-state"]["guests"] == {}, d["pr-state"]
                assert "logged in again: PR state verified before resuming" in c.procs["hosta"].log
            finally:
                await s.close()
            image_blocks(c, w.acked)
            assert registrations(c) == []

        asyncio.run(asyncio.wait_for(go(), 120))


def test_guest_logging_in_while_the_backend_is_down(tmp_path: Path) -> None:
    """A guest whose backend session is not open yet (it logs in during the
    outage): its commands wait while the device tries to open the session,
    then get BUSY, and go through once the target is back; a bounded number
    of log lines however many commands the guest retries."""
    with cluster(tmp_path) as c:

        async def go() -> None:
            kill_target(c)
            s = await guest_session(c.frontend_url("hosta"))
            try:
                w = RetryingWriter(s, streams=4)
                await asyncio.sleep(15)
                assert w.retried.get("busy", 0) >= 4 and not w.acked, (w.retried, len(w.acked))
                restart_target(c)
                await w.wait_acks(time.monotonic(), 40)
                await asyncio.sleep(0.5)
                await w.stop()
                assert not w.bad, w.bad
            finally:
                await s.close()
            log = c.procs["hosta"].log
            assert log.count("cannot open backend nexus") <= 4, log[-3000:]
            image_blocks(c, w.acked)
            assert registrations(c) == []
            assert await c.call("hostb", "query-devices") == []

        asyncio.run(asyncio.wait_for(go(), 120))
