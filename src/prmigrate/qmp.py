"""QMP, the QEMU Machine Protocol, as a server: a sans-IO core and a thin
asyncio Unix-socket shell, plus a small client for the CLI.

The wire (QEMU's docs/interop/qmp-spec.rst):

- on connecting the server sends a greeting
  ``{"QMP": {"version": {"qemu": {"major": M, "minor": N, "micro": U},
  "package": "prmigrate X"}, "capabilities": []}}``;
- the client sends requests ``{"execute": NAME, "arguments": {...}, "id": ID}``
  as a JSON *stream*: objects need no newline between or after them (QEMU's
  json-streamer; ``qemu.qmp`` sends a command with no newline);
- the server answers ``{"return": VALUE, "id": ID}`` or ``{"error":
  {"class": CLASS, "desc": TEXT}, "id": ID}``, in request order, ``id``
  echoed as sent, each message ending with CRLF as QEMU's monitor does;
- until ``qmp_capabilities`` every other command is refused with
  CommandNotFound "Expecting capabilities negotiation with
  'qmp_capabilities'" (qmp-spec 4.1, QEMU's monitor/qmp-cmds-control.c);
- after negotiation the server pushes events ``{"event": NAME, "data":
  {...}, "timestamp": {"seconds": S, "microseconds": US}}``.

The core (``QmpSession``) is fed bytes and returns what to do: answers to
send and calls the shell must run. The command table (``CommandTable``)
declares each command's typed arguments; unknown, missing or ill-typed
arguments are answered with GenericError naming the argument, in QEMU's
words (qapi/qobject-input-visitor.c). A request nested deeper than
``max_depth`` or longer than ``max_size`` is answered with a GenericError
and skipped without being buffered: the connection stays usable and no
parser recursion is ever reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_DEPTH = 64
MAX_REQUEST = 1 << 20
# A client that does not read its events is dropped once this much waits.
MAX_OUTPUT_BACKLOG = 4 << 20
CRLF = b"\r\n"


class ErrorClass(enum.StrEnum):
    """QMP error classes (qapi/error.json: QapiErrorClass)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"


class QmpError(Exception):
    """An error answer ``{"error": {"class": cls, "desc": desc}}``; the one
    exception of this layer, turned into bytes in ``QmpSession.fail``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = str(cls)
        self.desc = desc


# -- argument schemas -------------------------------------------------------


class ArgType(enum.StrEnum):
    """JSON types of arguments, named as QEMU's input visitor names them in
    "Invalid parameter type for 'X', expected: TYPE"."""

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    OBJECT = "object"
    ARRAY = "array"
    ANY = "any"


def _is_type(value: Any, kind: ArgType) -> bool:
    if kind is ArgType.ANY:
        return True
    if kind is ArgType.BOOLEAN:
        return isinstance(value, bool)
    if kind is ArgType.INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is ArgType.NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is ArgType.STRING:
        return isinstance(value, str)
    if kind is ArgType.OBJECT:
        return isinstance(value, dict)
    return isinstance(value, list)


@dataclass(frozen=True, slots=True)
class Arg:
    """One declared argument: name, JSON type, whether it may be left out."""

    name: str
    kind: ArgType
    optional: bool = False


def arg(name: str, kind: ArgType | str, optional: bool = False) -> Arg:
    return Arg(name, ArgType(kind), optional)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A command's name and its arguments. ``extra`` (an ArgType) accepts
    arguments not listed, each of that type: for commands whose arguments
    are an open set of keys, such as a device specification."""

    name: str
    args: tuple[Arg, ...] = ()
    extra: ArgType | None = None

    def check(self, arguments: Mapping[str, Any]) -> None:
        """Raise ``QmpError(GenericError)`` naming the first bad argument."""
        declared = {a.name: a for a in self.args}
        for key, value in arguments.items():
            a = declared.get(key)
            if a is None:
                if self.extra is None:
                    raise QmpError(ErrorClass.GENERIC, f"Parameter '{key}' is unexpected")
                if not _is_type(value, self.extra):
                    raise QmpError(ErrorClass.GENERIC,
                                   f"Invalid parameter type for '{key}', expected: {self.extra}")
                continue
            if not _is_type(value, a.kind):
                raise QmpError(ErrorClass.GENERIC,
                               f"Invalid parameter type for '{key}', expected: {a.kind}")
        for a in self.args:
            if not a.optional and a.name not in arguments:
                raise QmpError(ErrorClass.GENERIC, f"Parameter '{a.name}' is missing")


class CommandTable:
    """Commands by name, each with its argument schema."""

    def __init__(self, specs: Iterable[CommandSpec] = ()) -> None:
        self._specs: dict[str, CommandSpec] = {}
        for s in specs:
            self.add(s)

    def add(self, spec: CommandSpec) -> None:
        self._specs[spec.name] = spec

    def remove(self, name: str) -> None:
        self._specs.pop(name, None)

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs


# -- the JSON stream --------------------------------------------------------


class _Overflow(enum.Enum):
    NONE = ""
    DEPTH = "JSON nesting depth exceeds maximum ({})"
    SIZE = "JSON request exceeds maximum size ({} bytes)"


_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One top-level JSON value cut from the stream (``text``), or the
    reason one could not be taken (``error``)."""

    text: bytes = b""
    error: str = ""


class JsonSplitter:
    """Cuts a byte stream into top-level JSON values without parsing them.

    It follows strings and brackets only; a value deeper than ``max_depth``
    or longer than ``max_size`` is skipped to its end with nothing kept, and
    reported once as an error chunk. Bytes >= 0x80 (UTF-8) never look like
    JSON punctuation, so the stream can be cut as bytes."""

    def __init__(self, max_depth: int = MAX_DEPTH, max_size: int = MAX_REQUEST) -> None:
        self.max_depth = max_depth
        self.max_size = max_size
        self._buf = bytearray()
        self._size = 0
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False  # a top-level value that is not an object/array
        self._overflow = _Overflow.NONE

    def _keep(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        if self._overflow is _Overflow.NONE and self._size > self.max_size:
            self._overflow = _Overflow.SIZE
            self._buf.clear()
        if self._overflow is _Overflow.NONE:
            self._buf += data

    def _cut(self) -> Chunk:
        if self._overflow is _Overflow.DEPTH:
            chunk = Chunk(error=self._overflow.value.format(self.max_depth))
        elif self._overflow is _Overflow.SIZE:
            chunk = Chunk(error=self._overflow.value.format(self.max_size))
        else:
            chunk = Chunk(text=bytes(self._buf))
        self._buf.clear()
        self._size = 0
        self._scalar = False
        self._overflow = _Overflow.NONE
        return chunk

    def feed(self, data: bytes) -> list[Chunk]:
        out: list[Chunk] = []
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    self._keep(view[i:i + 1])
                    i += 1
                    continue
                m = _IN_STRING.search(data, i)
                if m is None:
                    self._keep(view[i:])
                    break
                j = m.start()
                self._keep(view[i:j + 1])
                if data[j] == 0x5C:  # backslash
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 0:
                        out.append(self._cut())
                i = j + 1
                continue
            if self._depth > 0:
                m = _STRUCTURAL.search(data, i)
                if m is None:
                    self._keep(view[i:])
                    break
                j = m.start()
                self._keep(view[i:j + 1])
                c = data[j]
                i = j + 1
                if c == 0x22:  # quote
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth and self._overflow is _Overflow.NONE:
                        self._overflow = _Overflow.DEPTH
                        self._buf.clear()
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(self._cut())
                continue
            # depth 0: between values, or inside a bare scalar
            c = data[i]
            if c in _WHITESPACE:
                if self._scalar:
                    out.append(self._cut())
                i += 1
            elif c in b"{[":
                if self._scalar:
                    out.append(self._cut())
                self._depth = 1
                self._keep(view[i:i + 1])
                i += 1
            elif c in b"}]":
                if self._scalar:
                    out.append(self._cut())
                self._keep(view[i:i + 1])
                out.append(self._cut())  # unbalanced: json.loads reports it
                i += 1
            elif c == 0x22 and not self._scalar:
                self._in_string = True
                self._keep(view[i:i + 1])
                i += 1
            else:
                self._scalar = True
                self._keep(view[i:i + 1])
                i += 1
        return out


# -- the session core -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """A request that passed every check: the shell runs it and gives the
    outcome back with ``QmpSession.answer`` or ``QmpSession.fail``."""

    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client."""

    data: bytes


Action = Call | Send

# Members of a request (qmp-spec 2.3; QEMU's qmp_dispatch).
_REQUEST_MEMBERS = frozenset({"execute", "exec-oob", "arguments", "id"})

QMP_CAPABILITIES = CommandSpec("qmp_capabilities", (arg("enable", ArgType.ARRAY, optional=True),))


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, default=str, separators=(",", ": ")).encode() + CRLF


def greeting(version: str, package: str = "", capabilities: Iterable[str] = ()) -> dict[str, Any]:
    """The greeting for a ``MAJOR.MINOR.MICRO`` version string."""
    parts = [int(p) if p.isdigit() else 0 for p in (version.split(".") + ["0", "0"])[:3]]
    return {"QMP": {
        "version": {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
                    "package": package or f"prmigrate {version}"},
        "capabilities": list(capabilities),
    }}


def event_message(name: str, data: Mapping[str, Any], now: float) -> dict[str, Any]:
    """An event as QMP sends it, stamped with ``now`` (seconds since the epoch)."""
    seconds = int(now)
    return {"event": name, "data": dict(data),
            "timestamp": {"seconds": seconds, "microseconds": min(int((now - seconds) * 1e6), 999999)}}


@dataclass
class QmpSession:
    """One client connection's protocol state, with no I/O.

    ``feed(bytes)`` returns actions in request order: ``Send`` (an answer
    the core gave itself: errors, negotiation) or ``Call`` (for the shell to
    run, then ``answer``/``fail`` give the bytes). ``event(...)`` gives an
    event's bytes once the client has negotiated, else None."""

    commands: CommandTable
    greeting: dict[str, Any] = field(default_factory=lambda: greeting("0.0.0"))
    max_depth: int = MAX_DEPTH
    max_size: int = MAX_REQUEST
    negotiated: bool = False
    _splitter: JsonSplitter = field(init=False)

    def __post_init__(self) -> None:
        self._splitter = JsonSplitter(self.max_depth, self.max_size)

    def hello(self) -> bytes:
        return encode(self.greeting)

    def feed(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        for chunk in self._splitter.feed(data):
            actions.append(self._request(chunk))
        return actions

    def answer(self, call: Call, result: Any) -> bytes:
        msg: dict[str, Any] = {"return": {} if result is None else result}
        if call.has_id:
            msg["id"] = call.id
        return encode(msg)

    def fail(self, call: Call, error: QmpError) -> bytes:
        return _error_bytes(error, call.has_id, call.id)

    def event(self, name: str, data: Mapping[str, Any], now: float) -> bytes | None:
        if not self.negotiated:
            return None
        return encode(event_message(name, data, now))

    def _request(self, chunk: Chunk) -> Action:
        if chunk.error:
            return Send(_error_bytes(QmpError(ErrorClass.GENERIC, chunk.error)))
        try:
            req = json.loads(chunk.text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return Send(_error_bytes(QmpError(ErrorClass.GENERIC, f"JSON parse error, {e}")))
        if not isinstance(req, dict):
            return Send(_error_bytes(QmpError(ErrorClass.GENERIC, "QMP input must be a JSON object")))
        has_id, rid = "id" in req, req.get("id")
        try:
            call = self._check(req, has_id, rid)
        except QmpError as e:
            return Send(_error_bytes(e, has_id, rid))
        if call.command == QMP_CAPABILITIES.name:
            return Send(self._capabilities(call))
        return call

    def _check(self, req: dict[str, Any], has_id: bool, rid: Any) -> Call:
        for key in req:
            if key not in _REQUEST_MEMBERS:
                raise QmpError(ErrorClass.GENERIC, f"QMP input member '{key}' is unexpected")
        if "exec-oob" in req:
            raise QmpError(ErrorClass.GENERIC, "Out-of-band execution is not supported")
        if "execute" not in req:
            raise QmpError(ErrorClass.GENERIC, "QMP input lacks member 'execute'")
        name = req["execute"]
        if not isinstance(name, str):
            raise QmpError(ErrorClass.GENERIC, "QMP input member 'execute' must be a string")
        arguments = req.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError(ErrorClass.GENERIC, "QMP input member 'arguments' must be an object")
        if name == QMP_CAPABILITIES.name:
            if self.negotiated:
                raise QmpError(ErrorClass.COMMAND_NOT_FOUND,
                               "Capabilities negotiation is already complete, command ignored")
            QMP_CAPABILITIES.check(arguments)
        elif not self.negotiated:
            raise QmpError(ErrorClass.COMMAND_NOT_FOUND,
                           "Expecting capabilities negotiation with 'qmp_capabilities'")
        else:
            spec = self.commands.get(name)
            if spec is None:
                raise QmpError(ErrorClass.COMMAND_NOT_FOUND, f"The command {name} has not been found")
            spec.check(arguments)
        return Call(name, arguments, rid, has_id)

    def _capabilities(self, call: Call) -> bytes:
        offered = set(self.greeting.get("QMP", {}).get("capabilities", []))
        for cap in call.arguments.get("enable", []):
            if not isinstance(cap, str) or cap not in offered:
                return self.fail(call, QmpError(ErrorClass.GENERIC, f"Capability '{cap}' not available"))
        self.negotiated = True
        return self.answer(call, {})


def _error_bytes(error: QmpError, has_id: bool = False, rid: Any = None) -> bytes:
    msg: dict[str, Any] = {"error": {"class": error.cls, "desc": error.desc}}
    if has_id:
        msg["id"] = rid
    return encode(msg)


# -- the asyncio shell ------------------------------------------------------

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


class QmpServer:
    """QMP on a Unix socket: moves bytes between clients and their
    ``QmpSession``, runs handlers, broadcasts events."""

    def __init__(self, path: str | Path, version: str, package: str = "",
                 *, max_depth: int = MAX_DEPTH, max_size: int = MAX_REQUEST) -> None:
        self.path = Path(path)
        self.greeting = greeting(version, package)
        self.max_depth = max_depth
        self.max_size = max_size
        self.table = CommandTable()
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.base_events.Server | None = None
        self._clients: dict[asyncio.StreamWriter, QmpSession] = {}
        self.register(CommandSpec("query-commands"), self._query_commands)

    def register(self, spec: CommandSpec | str, handler: Handler) -> None:
        """Add (or replace) a command; a bare name takes no arguments."""
        if isinstance(spec, str):
            spec = CommandSpec(spec)
        self.table.add(spec)
        self._handlers[spec.name] = handler

    def unregister(self, name: str) -> None:
        self.table.remove(name)
        self._handlers.pop(name, None)

    @property
    def commands(self) -> list[str]:
        return sorted(self.table.names() + [QMP_CAPABILITIES.name])

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in self.commands]

    async def start(self) -> None:
        """Listen on ``path``. A file already there is replaced: the caller
        holds the lock that says no live server owns it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        os.chmod(self.path, 0o600)
        log.info("QMP socket %s", self.path)

    async def close(self) -> None:
        """Stop serving; the socket file is removed only if this server
        bound it (a server that never started leaves another's alone)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._clients):
            w.close()
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def event(self, name: str, data: Mapping[str, Any], now: float | None = None) -> None:
        """Send an event to every negotiated client."""
        stamp = time.time() if now is None else now
        for writer, session in list(self._clients.items()):
            out = session.event(name, data, stamp)
            if out is not None:
                self._write(writer, out)

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > MAX_OUTPUT_BACKLOG:
            log.warning("QMP client not reading its output; disconnected")
            writer.close()
            return
        writer.write(data)

    async def _run(self, session: QmpSession, call: Call) -> bytes:
        handler = self._handlers.get(call.command)
        if handler is None:  # unregistered between the check and now
            return session.fail(call, QmpError(ErrorClass.COMMAND_NOT_FOUND,
                                               f"The command {call.command} has not been found"))
        try:
            result = handler(call.arguments)
            if inspect.isawaitable(result):
                result = await result
        except QmpError as e:
            return session.fail(call, e)
        except Exception as e:  # a handler's bug: one log line, an error answer
            log.exception("QMP command %s failed", call.command)
            return session.fail(call, QmpError(ErrorClass.GENERIC, f"{type(e).__name__}: {e}"))
        return session.answer(call, result)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QmpSession(self.table, self.greeting, self.max_depth, self.max_size)
        self._clients[writer] = session
        try:
            self._write(writer, session.hello())
            while not writer.is_closing():
                data = await reader.read(65536)
                if not data:
                    break
                for action in session.feed(data):
                    out = action.data if isinstance(action, Send) else await self._run(session, action)
                    self._write(writer, out)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # client gone, or the server is closing
        finally:
            self._clients.pop(writer, None)
            writer.close()


# -- a small client ---------------------------------------------------------


class QmpClient:
    """A QMP client for one connection: greeting, negotiation, then
    ``execute`` and ``events``. Answers and events are told apart as QMP
    says: answers carry ``return``/``error``, events ``event``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.greeting: dict[str, Any] = {}
        self._pending: list[dict[str, Any]] = []  # events read while waiting for an answer

    @classmethod
    async def connect(cls, path: str | Path) -> QmpClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REQUEST * 4)
        client = cls(reader, writer)
        try:
            client.greeting = await client._read()
            if "QMP" not in client.greeting:
                raise QmpError(ErrorClass.GENERIC, f"not a QMP server: {client.greeting!r:.200}")
            await client.execute("qmp_capabilities")
        except BaseException:
            writer.close()
            raise
        return client

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError(ErrorClass.GENERIC, "QMP connection closed")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError(ErrorClass.GENERIC, "QMP server sent something that is not an object")
        return msg

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = dict(arguments)
        self._writer.write(encode(req))
        await self._writer.drain()
        while True:
            msg = await self._read()
            if "event" in msg:
                self._pending.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(err.get("class", ErrorClass.GENERIC), err.get("desc", ""))
            return msg.get("return")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while self._pending:
            yield self._pending.pop(0)
        while True:
            try:
                msg = await self._read()
            except QmpError:
                return
            if "event" in msg:
                yield msg

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def qmp_call(path: str | Path, command: str, arguments: Mapping[str, Any] | None = None,
                   *, timeout: float = 30.0) -> Any:
    """Run one command on a QMP socket; returns its ``return`` or raises
    ``QmpError`` with the server's class and text."""

    async def call() -> Any:
        client = await QmpClient.connect(path)
        try:
            return await client.execute(command, arguments)
        finally:
            await client.close()

    return await asyncio.wait_for(call(), timeout)
