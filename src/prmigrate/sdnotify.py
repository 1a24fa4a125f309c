"""systemd's notify protocol (sd_notify(3)), with no dependency.

A service of ``Type=notify`` is given ``$NOTIFY_SOCKET``: a Unix datagram
socket path, or an abstract socket name written with a leading ``@``. Each
datagram is newline-separated ``KEY=VALUE`` assignments: ``READY=1`` (start-up
finished), ``STOPPING=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=``,
``STATUS=text``, ``MAINPID=``, ``WATCHDOG=1`` (keep-alive). With
``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``:
only that process is meant) and expects ``WATCHDOG=1`` at least that often;
sd_watchdog_enabled(3) advises half the interval.

``message`` is the pure part; ``Notifier`` sends. Without ``$NOTIFY_SOCKET``
everything is a no-op; a send that fails is logged once and otherwise
ignored (the daemon's work does not depend on its supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def message(**fields: object) -> bytes:
    """``message(ready=1, status="x")`` -> ``b"READY=1\\nSTATUS=x"``."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{key}: a notify value cannot hold a newline")
        lines.append(f"{key.upper()}={text}")
    return "\n".join(lines).encode()


def socket_address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: ``@name`` is the
    abstract name ``\\0name``; only absolute paths and abstract names count."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None when
    the watchdog is off or meant for another process."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid and (not wpid.isdigit() or int(wpid) != pid):
        return None
    return int(usec) / 2e6


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog = watchdog_interval(env, os.getpid()) if self.address else None
        self._failed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message(**fields), self.address)
        except OSError as e:
            if not self._failed:
                log.warning("sd_notify to %r failed: %s", self.address, e)
                self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> None:
        fields: dict[str, object] = {"ready": 1, "mainpid": os.getpid()}
        if status:
            fields["status"] = status
        self.send(**fields)
        if self.watchdog is not None and self._task is None:
            self._task = asyncio.ensure_future(self._keepalive(self.watchdog))

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def status(self, text: str) -> None:
        self.send(status=text)

    async def stopping(self) -> None:
        self.send(stopping=1)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _keepalive(self, interval: float) -> None:
        while True:
            self.send(watchdog=1)
            await asyncio.sleep(interval)
