"""The host daemon's control API: QMP on a Unix socket (``prmigrate.qmp``).

A session, as QEMU's monitor speaks it::

    <- {"QMP": {"version": {"qemu": {...}, "package": "prmigrate 0.1.0"}, "capabilities": []}}
    -> {"execute": "qmp_capabilities"}
    <- {"return": {}}
    -> {"execute": "query-devices", "id": 7}
    <- {"return": [...], "id": 7}
    -> {"execute": "nope"}
    <- {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}
    <- {"event": "MIGRATION", "data": {...}, "timestamp": {"seconds": ..., "microseconds": ...}}

Every negotiated connection receives the daemon's events
(``daemon.emit(event)``); ``subscribe`` is still accepted and does nothing.
Any QMP client works (``qemu.qmp``, ``qmp-shell``); ``control_call`` and
``control_events`` are this package's.

Commands are registered with ``register_command(name, handler, args)``: a
handler is ``async def handler(arguments: dict) -> object`` (or a plain
function) and raises ``CommandError(class, desc)`` to answer an error. The
arguments of a command are declared (``args``, or the table
``COMMAND_ARGS`` below for the commands of the daemon and the migration
service); an unknown, missing or ill-typed argument is answered with a
GenericError naming it before the handler runs. A command registered with
no declaration takes any arguments.

Error classes (as QMP): ``GenericError``, ``CommandNotFound``,
``DeviceNotFound``; ``InvalidParameter`` for a value of the right type
that is not acceptable.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..qmp import (
    ArgType,
    CommandSpec,
    Handler,
    QmpClient,
    QmpError,
    QmpServer,
    arg,
    encode,
    qmp_call,
)
from ..qmp import event_message as _qmp_event

CommandError = QmpError

S, INT, B, A = ArgType.STRING, ArgType.INTEGER, ArgType.BOOLEAN, ArgType.ARRAY

# The JSON type of each ``--device`` key in ``device-add``; a key of
# ``device.config`` not listed here is a string (the command-line form).
DEVICE_KEY_TYPES: dict[str, ArgType] = {"lun": INT, "migrate-pr": B, "guests": A,
                                        "backend": ArgType.ANY}  # a URL, or one per path


def device_add_spec() -> CommandSpec:
    """``device-add``: the keys of ``--device`` (device/config.py), required
    ``name`` and ``backend``."""
    from ..device.config import _KEYS

    required = ("name", "backend")
    args = [arg(k, DEVICE_KEY_TYPES.get(k, S)) for k in required]
    args += [arg(k, DEVICE_KEY_TYPES.get(k, S), optional=True) for k in sorted(_KEYS - set(required))]
    return CommandSpec("device-add", tuple(args))


# Argument declarations of the commands registered by name only.
COMMAND_ARGS: dict[str, tuple[Any, ...]] = {
    "query-devices": (arg("device", S, optional=True),),
    "query-machines": (),
    "query-host": (),
    "device-verify": (arg("device", S),),
    "reconcile-pr": (arg("device", S, optional=True),),
    "device-del": (arg("device", S), arg("force", B, optional=True)),
    "quit": (),
    "subscribe": (),
    "migrate": (arg("device", S, optional=True), arg("to", S, optional=True), arg("destination", S, optional=True),
                arg("strategy", S, optional=True), arg("frontend", S, optional=True),
                arg("devices", A, optional=True), arg("all", B, optional=True),
                arg("setup-parallel", INT, optional=True), arg("pause-parallel", INT, optional=True)),
    "query-migrate": (arg("device", S, optional=True),),
    "migrate-cancel": (arg("device", S),),
}


class ControlServer(QmpServer):
    """QMP server of a daemon, with the registration API its extensions use."""

    def __init__(self, path: str | Path, greeting: dict[str, Any] | None = None) -> None:
        super().__init__(path, __version__)
        self.info = dict(greeting or {})
        self.register_command("subscribe", lambda args: {})

    def register_command(self, name: str, handler: Handler,
                         args: tuple[Any, ...] | CommandSpec | None = None) -> None:
        """Add (or replace) the command ``name``; ``args`` declares its
        arguments (default: ``COMMAND_ARGS``, else any)."""
        if isinstance(args, CommandSpec):
            spec = args
        elif args is not None:
            spec = CommandSpec(name, tuple(args))
        elif name == "device-add":
            spec = device_add_spec()
        elif name in COMMAND_ARGS:
            spec = CommandSpec(name, COMMAND_ARGS[name])
        else:
            spec = CommandSpec(name, extra=ArgType.ANY)
        self.register(spec, handler)

    def unregister_command(self, name: str) -> None:
        self.unregister(name)

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send an event message (``event_message``) to every negotiated client."""
        data = encode(message)
        for writer, session in list(self._clients.items()):
            if session.negotiated:
                self._write(writer, data)


def event_message(event: dict[str, Any]) -> dict[str, Any]:
    """``emit({"event": NAME, ...})`` as QMP sends it (and the event log keeps it)."""
    data = {k: v for k, v in event.items() if k != "event"}
    return _qmp_event(str(event.get("event", "UNKNOWN")), data, time.time())


async def control_call(
    path: str | Path,
    command: str,
    arguments: dict[str, Any] | None = None,
    *,
    timeout: float = 30.0,
) -> Any:
    """Run one command on a daemon's control socket; returns ``return`` or
    raises ``CommandError`` with the daemon's error class."""
    return await qmp_call(path, command, arguments, timeout=timeout)


async def control_events(path: str | Path) -> AsyncIterator[dict[str, Any]]:
    """Async iterator over the daemon's events, from the moment it is
    connected and negotiated."""
    client = await QmpClient.connect(path)
    try:
        async for ev in client.events():
            yield ev
    finally:
        await client.close()
