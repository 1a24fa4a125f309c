"""aio.PollingSelector and run_loop: busy polling before the loop sleeps;
the answer helpers and run_plan."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from prmigrate.aio import (
    PollingSelector,
    chain,
    map_answer,
    on_answer,
    on_outcome,
    run_loop,
    run_plan,
    settle,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_ready_socket_is_returned_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with PollingSelector(0.5) as sel:
        sel.register(a, selectors.EVENT_READ, "a")
        b.send(b"x")
        t0 = time.monotonic()
        ready = sel.select(None)
        assert [(k.data, ev) for k, ev in ready] == [("a", selectors.EVENT_READ)]
        assert time.monotonic() - t0 < 0.25  # not after the 0.5 s poll window


def test_data_arriving_during_the_poll_is_seen(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with PollingSelector(2.0) as sel:
        sel.register(a, selectors.EVENT_READ, "a")
        timer = threading.Timer(0.05, b.send, (b"x",))
        timer.start()
        t0 = time.monotonic()
        ready = sel.select(5.0)
        timer.join()
        assert [k.data for k, _ in ready] == ["a"]
        assert 0.04 <= time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("poll_s,timeout", [(0.05, 0.2), (0.5, 0.05), (0.0, 0.05)])
def test_timeout_is_kept(pair: tuple[socket.socket, socket.socket], poll_s: float, timeout: float) -> None:
    """Nothing ready: returns empty after about ``timeout``, whether the poll
    window is shorter than it (then blocks for the rest) or longer."""
    a, _ = pair
    with PollingSelector(poll_s) as sel:
        sel.register(a, selectors.EVENT_READ)
        t0 = time.monotonic()
        assert sel.select(timeout) == []
        took = time.monotonic() - t0
        assert timeout * 0.9 <= took < timeout + 0.2


def test_zero_timeout_does_not_poll(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    with PollingSelector(1.0) as sel:
        sel.register(a, selectors.EVENT_READ)
        t0 = time.monotonic()
        assert sel.select(0) == []
        assert time.monotonic() - t0 < 0.5


def test_after_the_window_it_sleeps() -> None:
    """With nothing to do the loop spins for the window, then blocks: an idle
    polling loop uses about one window of CPU per wake-up, not a core."""
    async def idle() -> float:
        start = time.process_time()
        await asyncio.sleep(0.5)
        return time.process_time() - start

    cpu = run_loop(idle(), poll_us=20_000)
    assert cpu < 0.25


def test_negative_poll_refused() -> None:
    with pytest.raises(ValueError):
        PollingSelector(-1.0)


def test_run_loop_variants() -> None:
    async def loop_selector() -> object:
        loop = asyncio.get_running_loop()
        return getattr(loop, "_selector", None)

    assert isinstance(run_loop(loop_selector(), poll_us=50), PollingSelector)
    assert not isinstance(run_loop(loop_selector()), PollingSelector)
    coro = loop_selector()
    with pytest.raises(ValueError, match="uvloop"):
        run_loop(coro, use_uvloop=True, poll_us=50)
    coro.close()


def test_loop_serves_a_connection_while_polling() -> None:
    """A TCP echo on a polling loop answers many round trips."""
    async def main() -> int:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(100):
                w.write(data)
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        n = 0
        for i in range(200):
            w.write(b"%d" % i)
            assert await r.readexactly(len(b"%d" % i)) == b"%d" % i
            n += 1
        w.close()
        server.close()
        await server.wait_closed()
        return n

    assert run_loop(main(), poll_us=100) == 200


def test_answers_known_at_once_or_later() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[Any] = []
        on_outcome(1, seen.append)  # a value: at once
        on_answer(2, seen.append)
        assert seen == [1, 2]
        f: asyncio.Future[int] = loop.create_future()
        g: asyncio.Future[int] = loop.create_future()
        on_outcome(f, seen.append)
        on_answer(f, seen.append)
        chain(f, g)
        h = map_answer(f, loop.create_future(), lambda x: x * 10)
        f.set_result(3)
        await asyncio.sleep(0)
        assert seen == [1, 2, 3, 3] and g.result() == 3 and h.result() == 30
        e: asyncio.Future[int] = loop.create_future()
        on_answer(e, seen.append)  # errors and cancellation skip it
        on_outcome(e, seen.append)
        e.cancel()
        await asyncio.sleep(0)
        assert seen[-1] is None and len(seen) == 5
        dst: asyncio.Future[int] = loop.create_future()
        settle(dst, ValueError("x"))
        settle(dst, 4)  # settled already: kept
        assert isinstance(dst.exception(), ValueError)

    asyncio.run(main())


def test_run_plan_sends_answers_and_throws_errors_in() -> None:
    def plan() -> Generator[str, Any, list[Any]]:
        got = [(yield "a")]
        try:
            yield "boom"
        except KeyError as exc:
            got.append(f"caught {exc.args[0]}")
        got.append((yield "b"))
        return got

    async def step(s: str) -> str:
        if s == "boom":
            raise KeyError("k")
        return s.upper()

    assert asyncio.run(run_plan(plan(), step, KeyError)) == ["A", "caught k", "B"]
    with pytest.raises(KeyError):  # not one of ``errors``: out of the plan
        asyncio.run(run_plan(plan(), step, ValueError))
