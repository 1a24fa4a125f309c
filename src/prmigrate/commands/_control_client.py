"""A blocking client of a daemon's QMP control socket.

The command-line tools that only ask a daemon something (``prmigrate
migrate``, ``prmigrate host --status``) use this instead of the asyncio
server code in ``prmigrate.host.control``: it needs nothing but ``socket``
and ``json``, so the tool reaches its work quickly (``prmigrate migrate``
may run inside a VM migration's switchover pause).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

MAX_LINE = 1 << 20


class ControlError(Exception):
    """The daemon answered with an error (``cls`` is its QMP-like class),
    or the socket failed (``cls`` is ``"Unreachable"``)."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class ControlConnection:
    """One negotiated QMP connection: ``call(command, arguments)`` and
    ``next_event(timeout)`` (every event after the negotiation)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            greeting = self._line(timeout)
        except OSError as e:
            self.sock.close()
            raise ControlError("Unreachable", f"cannot reach {path}: {e.strerror or e}") from None
        if greeting is None or "QMP" not in greeting:
            self.sock.close()
            raise ControlError("Unreachable", f"{path}: no QMP greeting")
        # QMP: every command but qmp_capabilities is refused before it, and
        # events flow once it is answered.
        try:
            self.call("qmp_capabilities", timeout=timeout)
        except ControlError:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, timeout: float | None) -> dict[str, Any] | None:
        """The next JSON line, or None when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise ControlError("GenericError", f"{self.path}: answer line too long")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as e:
                raise ControlError("Unreachable", f"{self.path}: {e.strerror or e}") from None
            if not data:
                raise ControlError("Unreachable", f"{self.path}: the daemon closed the connection")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise ControlError("GenericError", f"{self.path}: not a JSON answer") from None
        if not isinstance(msg, dict):
            raise ControlError("GenericError", f"{self.path}: not a JSON object")
        return msg

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = 30.0) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self.sock.sendall((json.dumps(req) + "\n").encode())
        except OSError as e:
            raise ControlError("Unreachable", f"{self.path}: {e.strerror or e}") from None
        deadline = time.monotonic() + timeout
        while True:
            msg = self._line(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise ControlError("Timeout", f"{self.path}: no answer to {command} in {timeout:g} s")
            if "event" in msg:  # a subscribed connection: keep events for next_event
                self._events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise ControlError(str(err.get("class", "GenericError")), str(err.get("desc", "")))
            return msg.get("return")

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        if self._events:
            return self._events.pop(0)
        while True:
            msg = self._line(timeout)
            if msg is None or "event" in msg:
                return msg


def control_call(path: str, command: str, arguments: dict[str, Any] | None = None,
                 timeout: float = 30.0) -> Any:
    """One command on its own connection."""
    with ControlConnection(path, timeout) as c:
        return c.call(command, arguments, timeout)
