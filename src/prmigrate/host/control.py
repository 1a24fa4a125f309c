"""The host daemon's control API: QMP-like JSON lines on a Unix socket.

Each line from a client is one request; each answer one line::

    -> {"execute": "query-devices", "id": 7}
    <- {"return": [...], "id": 7}
    -> {"execute": "nope"}
    <- {"error": {"class": "CommandNotFound", "desc": "..."}}

On connecting, the server sends a greeting ``{"prmigrate": {"host": NAME,
"version": ...}}``. ``{"execute": "subscribe"}`` turns the connection into
an event stream as well: every ``daemon.emit(event)`` is sent as
``{"event": NAME, "data": {...}, "timestamp": {...}}`` lines.

Commands are registered by name with ``register_command(name, handler)``;
a handler is ``async def handler(arguments: dict) -> object`` (or a plain
function) and raises ``CommandError(class, desc)`` to answer an error. The
migration service adds its own commands this way.

Error classes (as QMP): ``GenericError``, ``CommandNotFound``,
``DeviceNotFound``, ``InvalidParameter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]
MAX_LINE = 1 << 20


class CommandError(Exception):
    """An error answer: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class ControlServer:
    """JSON-lines command server on a Unix socket."""

    def __init__(self, path: str | Path, greeting: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.greeting = greeting or {}
        self._commands: dict[str, Handler] = {}
        self._server: asyncio.base_events.Server | None = None
        self._subscribers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self.register_command("query-commands", self._query_commands)
        self.register_command("subscribe", lambda args: {})

    def register_command(self, name: str, handler: Handler) -> None:
        """Add (or replace) the command ``name``."""
        self._commands[name] = handler

    def unregister_command(self, name: str) -> None:
        self._commands.pop(name, None)

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in self.commands]

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                       limit=MAX_LINE)
        os.chmod(self.path, 0o600)
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._clients):
            w.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def broadcast(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message, default=str) + "\n").encode()
        for w in list(self._subscribers):
            if w.is_closing():
                self._subscribers.discard(w)
                continue
            w.write(line)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            writer.write((json.dumps({"prmigrate": self.greeting}) + "\n").encode())
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, _error("GenericError", "request line too long"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                answer = await self.handle_line(line, writer)
                await self._send(writer, answer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # client gone, or the server is closing
        finally:
            self._clients.discard(writer)
            self._subscribers.discard(writer)
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write((json.dumps(obj, default=str) + "\n").encode())
        await writer.drain()

    async def handle_line(self, line: bytes, writer: asyncio.StreamWriter | None = None) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return _error("GenericError", f"invalid JSON: {e}")
        if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
            return _error("GenericError", 'expected {"execute": COMMAND, "arguments": {...}}')
        answer = await self.execute(req["execute"], req.get("arguments") or {})
        if "id" in req:
            answer["id"] = req["id"]
        if req["execute"] == "subscribe" and writer is not None and "return" in answer:
            self._subscribers.add(writer)
        return answer

    async def execute(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        handler = self._commands.get(name)
        if handler is None:
            return _error("CommandNotFound", f"the command {name} has not been found")
        if not isinstance(arguments, dict):
            return _error("InvalidParameter", "arguments must be an object")
        try:
            result = handler(arguments)
            if inspect.isawaitable(result):
                result = await result
        except CommandError as e:
            return _error(e.cls, e.desc)
        except Exception as e:
            log.exception("control command %s failed", name)
            return _error("GenericError", f"{type(e).__name__}: {e}")
        return {"return": {} if result is None else result}


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def event_message(event: dict[str, Any]) -> dict[str, Any]:
    """``emit({"event": NAME, ...})`` as sent to subscribers."""
    now = time.time()
    data = {k: v for k, v in event.items() if k != "event"}
    return {
        "event": event.get("event", "UNKNOWN"),
        "data": data,
        "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)},
    }


async def control_call(
    path: str | Path,
    command: str,
    arguments: dict[str, Any] | None = None,
    *,
    timeout: float = 30.0,
) -> Any:
    """Run one command on a daemon's control socket; returns ``return`` or
    raises ``CommandError`` with the daemon's error class."""

    async def call() -> Any:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
        try:
            await reader.readline()  # greeting
            req: dict[str, Any] = {"execute": command}
            if arguments:
                req["arguments"] = arguments
            writer.write((json.dumps(req) + "\n").encode())
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise CommandError("GenericError", "control connection closed")
            answer = json.loads(line)
        finally:
            writer.close()
        if "error" in answer:
            raise CommandError(answer["error"].get("class", "GenericError"),
                               answer["error"].get("desc", ""))
        return answer.get("return")

    return await asyncio.wait_for(call(), timeout)


async def control_events(path: str | Path) -> Any:
    """Async iterator over the daemon's events (subscribes first)."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    try:
        await reader.readline()
        writer.write(b'{"execute": "subscribe"}\n')
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            msg = json.loads(line)
            if "event" in msg:
                yield msg
    finally:
        writer.close()
