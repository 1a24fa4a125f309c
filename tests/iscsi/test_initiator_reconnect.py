"""Reconnect policy, link state, held commands and the re-login check of
the initiator (``ReconnectPolicy``, ``Link``, ``InitiatorCore.expire_held``
/ ``gate``, ``Session.on_reconnect``), and names with ``%`` in its logs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from prmigrate.iscsi.initiator import connect
from prmigrate.iscsi.initiator_core import (
    HOLD_TIMEOUT,
    PERSISTENT,
    CommandDone,
    InitiatorCore,
    Link,
    LinkState,
    ReconnectPolicy,
    SessionConfig,
)
from prmigrate.iscsi.session import TargetNode
from prmigrate.iscsi.target import IscsiTarget
from prmigrate.scsi.constants import Status

from ._target_helpers import INITIATOR, TARGET, MemoryLU

FAST = ReconnectPolicy(first=0.05, cap=0.2, jitter=0.0)


def _write10(lba: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0, 0, 1, 0])


def test_policy_doubles_to_the_cap_and_jitters_within_bounds() -> None:
    p = ReconnectPolicy(first=0.5, factor=2.0, cap=15.0, jitter=0.0)
    assert [p.delay(n, 0.5) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 15, 15, 15]
    j = ReconnectPolicy(first=1.0, cap=10.0, jitter=0.2)
    assert j.delay(1, 0.0) == pytest.approx(0.8) and j.delay(1, 0.999999) == pytest.approx(1.2, abs=1e-5)
    assert PERSISTENT.give_up_after is None and 10 <= PERSISTENT.cap <= 30
    assert HOLD_TIMEOUT < 30  # under the guests' command timeouts


def test_link_logs_a_bounded_number_of_lines_for_any_outage() -> None:
    link = Link(PERSISTENT)
    assert link.state is LinkState.UP
    assert "down" in link.lost(100.0, "connection lost")
    assert link.state is LinkState.DOWN and link.down_since == 100.0
    lines = []
    now = 100.0
    for _ in range(1000):  # about 4 hours at the cap
        delay, line = link.attempt_failed(now, "connection refused", 0.5)
        now += delay
        if line is not None:
            lines.append(line)
    assert link.state is LinkState.RETRYING and link.failed == 1000
    assert len(lines) == 6, lines  # 0.5, 1, 2, 4, 8, 15 s: then silent at the cap
    assert "next in 15.0 s" in lines[-1]
    _, line = link.attempt_failed(now, "login refused", 0.5)  # another error: said once
    assert line is not None and "login refused" in line
    assert not link.exhausted(now)
    back = link.up(now)
    assert "back up" in back and link.state is LinkState.UP and link.failed == 0
    assert Link(ReconnectPolicy(give_up_after=30)).exhausted(0.0) is False
    gives_up = Link(ReconnectPolicy(give_up_after=30))
    gives_up.lost(0.0, "x")
    assert gives_up.exhausted(30.0)


def test_core_holds_commands_while_down_then_answers_busy() -> None:
    core = InitiatorCore(SessionConfig(INITIATOR, 0x23D000000001, TARGET, hold_timeout=10.0))
    h = core.submit(0, _write10(1), b"\0" * 512, now=0.0)  # never logged in: held
    h2 = core.submit(0, bytes(6), now=5.0)
    assert core.held == 2
    assert core.expire_held(9.9) == []
    (ev,) = core.expire_held(10.0)
    assert isinstance(ev, CommandDone) and ev.handle == h and ev.result.status == Status.BUSY
    assert core.outstanding == 1
    (ev,) = core.expire_held(15.0)
    assert ev.handle == h2 and core.outstanding == 0
    unbounded = InitiatorCore(SessionConfig(INITIATOR, 0x23D000000001, TARGET))
    unbounded.submit(0, bytes(6), now=0.0)
    assert unbounded.expire_held(1e9) == []


async def _target_on(port: int, lu: MemoryLU) -> IscsiTarget:
    t = IscsiTarget([TargetNode(TARGET, {0: lu})])
    await t.start("127.0.0.1", port)
    return t


def test_session_reconnects_holds_then_busy_checks_before_resuming() -> None:
    async def body() -> None:
        lu = MemoryLU()
        t = IscsiTarget([TargetNode(TARGET, {0: lu})])
        (_, port), *_ = await t.start("127.0.0.1", 0)
        order: list[str] = []

        async def check() -> None:
            order.append(f"check ({len(lu.seen)} commands seen)")
            await asyncio.sleep(0.2)
            order.append("check done")

        s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, reconnect_policy=FAST,
                          hold_timeout=1.0, on_reconnect=check)
        try:
            assert (await s.submit(0, bytes(6))).status == Status.GOOD
            assert s.link_state()["state"] == "up"
            await t.close()
            await asyncio.sleep(0.3)
            info = s.link_state()
            assert info["state"] in ("down", "retrying") and info["since"].endswith("Z"), info
            r = await asyncio.wait_for(s.submit(0, _write10(3), b"\1" * 512), 5)
            assert r.status == Status.BUSY  # held 1 s, then BUSY: the guest retries
            pending = s.submit(0, _write10(4), b"\2" * 512)  # held until the target is back
            seen = len(lu.seen)
            t = await _target_on(port, lu)
            r = await asyncio.wait_for(pending, 5)
            assert r.status == Status.GOOD
            assert order == [f"check ({seen} commands seen)", "check done"]
            assert lu.data[4 * 512:5 * 512] == b"\2" * 512 and lu.data[3 * 512:4 * 512] == bytes(512)
            assert s.link_state()["state"] == "up" and s.reconnects == 1
        finally:
            await s.close()
            await t.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_persistent_session_does_not_give_up() -> None:
    """With a policy that never gives up, a session down far longer than
    the default 30 s still logs in again (the clock is the core's: here
    the delays are short and the attempts many)."""

    async def body() -> None:
        lu = MemoryLU()
        t = IscsiTarget([TargetNode(TARGET, {0: lu})])
        (_, port), *_ = await t.start("127.0.0.1", 0)
        policy = ReconnectPolicy(first=0.01, cap=0.02, jitter=0.0)
        s = await connect(f"127.0.0.1:{port}", TARGET, INITIATOR, reconnect_policy=policy,
                          reconnect_timeout=0.1)  # ignored: the policy decides
        try:
            await t.close()
            await asyncio.sleep(1.0)  # 10x reconnect_timeout, ~50 attempts
            assert s.link.failed > 20 and s.link_state()["state"] == "retrying"
            t = await _target_on(port, lu)
            assert (await asyncio.wait_for(s.submit(0, bytes(6)), 5)).status == Status.GOOD
        finally:
            await s.close()
            await t.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_initiator_name_with_percent_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    name = "iqn.2026-11.org.prmigrate:50%s-100%d-%(x)s"

    async def body() -> None:
        lu = MemoryLU()
        t = IscsiTarget([TargetNode(TARGET, {0: lu})])
        (_, port), *_ = await t.start("127.0.0.1", 0)
        s = await connect(f"127.0.0.1:{port}", TARGET, name, reconnect=False)
        try:
            assert (await s.submit(0, bytes(6))).status == Status.GOOD
        finally:
            await s.close()
            await t.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(asyncio.wait_for(body(), 20))
    messages = [r.getMessage() for r in caplog.records]  # raises if a name broke the format
    initiator_side = [m for m in messages if m.startswith(f"[{name},i,") and "logged in" in m]
    target_side = [m for m in messages if name in m and "login to" in m]
    assert initiator_side and target_side, messages
