"""aio.PollingSelector and run_loop: busy polling before the loop sleeps."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from prmigrate.aio import PollingSelector, run_loop


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
