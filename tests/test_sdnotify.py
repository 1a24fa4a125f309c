"""sd_notify(3) without libsystemd: message format, socket addresses
(paths and '@' abstract names), the watchdog interval, sending."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from prmigrate.sdnotify import Notifier, message, socket_address, watchdog_interval


def test_message_is_newline_separated_assignments() -> None:
    assert message(ready=1, status="serving 2 device(s)") == b"READY=1\nSTATUS=serving 2 device(s)"
    with pytest.raises(ValueError):
        message(status="two\nlines")


@pytest.mark.parametrize(("value", "address"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract-name", "\0abstract-name"),
    ("", None), ("@", None), ("relative/path", None),
])
def test_socket_address(value: str, address: str | None) -> None:
    assert socket_address(value) == address


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None), ({}, None),
])
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(env, 42) == interval


def test_notifier_sends_to_a_path_and_does_nothing_without_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.enabled and n.send(status="x")
        assert s.recv(100) == b"STATUS=x"

        async def life() -> None:
            n.ready("up")
            await n.stopping()

        asyncio.run(life())
        assert s.recv(100) == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=up".encode()
        assert s.recv(100) == b"STOPPING=1"
    off = Notifier({})
    assert not off.enabled and not off.send(ready=1)
    # a socket that went away: logged once, never raised
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not gone.send(ready=1) and not gone.send(ready=1)


def test_watchdog_keepalives_on_an_abstract_socket() -> None:
    name = f"prmigrate-sdnotify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.setblocking(False)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "40000"})
        assert n.watchdog == 0.02

        async def life() -> list[bytes]:
            loop = asyncio.get_running_loop()
            n.ready()
            got = [await asyncio.wait_for(loop.sock_recv(s, 100), 5) for _ in range(4)]
            await n.stopping()
            got.append(await asyncio.wait_for(loop.sock_recv(s, 100), 5))
            return got

        got = asyncio.run(life())
    assert got[0].startswith(b"READY=1")
    assert got[1:4] == [b"WATCHDOG=1"] * 3
    assert got[4] == b"STOPPING=1"
