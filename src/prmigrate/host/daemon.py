"""The host daemon: passthrough devices, their guest frontend, the control API.

One process per host. It owns:

* ``devices``: one ``PassthroughDevice`` per configured device, each
  fronting the shared LUN through its own backend sessions;
* ``target``: one ``IscsiTarget`` listening on ``--listen`` (the guest
  frontend) with one target node per device: node name
  ``config.frontend_iqn`` (default ``default_frontend_iqn(device)``), the
  device as its LUN 0, an ACL of the ``guests=`` names when given;
* ``control``: the JSON control server on ``--control`` (``control.py``);
* ``state_dir``: the devices' PR journals (``<device>.pr.json``) and, for a
  device that moved away, where its guest is redirected
  (``<device>.moved.json``, see ``record_moved``): a restarted daemon
  keeps redirecting that guest instead of serving the device again.

Extending it (the migration service does, from its own module)::

    daemon.control.register_command("migrate", handler)   # async handler(args) -> obj
    dev = await daemon.add_device(config, identity=ident, state=state)
    await daemon.remove_device("vm1")                     # node gone, sessions closed
    daemon.get_device("vm1")                              # KeyError -> DeviceNotFound
    daemon.emit({"event": "MIGRATION", "device": "vm1", "status": "active"})
    daemon.add_listener(fn)                               # fn(event) for in-process users

Built-in commands: ``query-devices``, ``query-machines``, ``query-host``,
``query-commands``, ``device-verify`` {device}, ``reconcile-pr`` {device?}
(reconcile one device, or every one, with the backend LUN now),
``subscribe``, ``quit``.
Events: ``DEVICE_ADDED``, ``DEVICE_REMOVED``, ``PR_STATE_CHANGED``,
``PR_RECONCILED`` (reason, method, changes, unknown, error), ``SHUTDOWN``.

``event_log``: a path; every event is also appended there as one JSON line
(``eventlog.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__ as _version
from ..device.config import DeviceConfig
from ..device.identity import DeviceIdentity
from ..device.machine import list_machines, resolve_machine
from ..device.passthrough import DeviceError, PassthroughDevice
from ..device.state import DevicePrState, StateChange
from ..iscsi.target import IscsiTarget, TargetNode
from ..lun import persist
from .config import HostConfig
from .control import CommandError, ControlServer, event_message
from .eventlog import EventLog

log = logging.getLogger(__name__)

MOVED_RETRY_S = 5.0  # a move record that could not be written is tried again this often

FRONTEND_PREFIX = "iqn.2026-11.org.prmigrate"


def default_frontend_iqn(device: str) -> str:
    """The guest-facing node name of a device configured without one."""
    return f"{FRONTEND_PREFIX}:{device.lower()}"


def frontend_iqn(config: DeviceConfig) -> str:
    return config.frontend_iqn or default_frontend_iqn(config.name)


class HostDaemon:
    def __init__(
        self,
        config: HostConfig,
        *,
        connect: Callable[..., Any] | None = None,
        event_log: str | Path | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.initiator = config.initiator
        self.devices: dict[str, PassthroughDevice] = {}
        self.moved: dict[str, dict[str, Any]] = {}  # device -> where it moved (record_moved)
        self._moved_retry: asyncio.TimerHandle | None = None  # rewrites failed move records
        self.target = IscsiTarget(keepalive=config.keepalive)
        self.control: ControlServer | None = None
        if config.control is not None:
            self.control = ControlServer(
                config.control, {"host": config.name, "version": _version}
            )
            self._register_builtin(self.control)
        self.listening: list[tuple[str, int]] = []
        self._listeners: list[Callable[[dict[str, Any]], Any]] = []
        self._connect = connect
        self._stop = asyncio.Event()
        self.log = logging.LoggerAdapter(log, {"host": config.name})
        self.event_log: EventLog | None = None
        if event_log is not None:
            self.event_log = EventLog(event_log)
            self.add_listener(self.event_log)

    # ------------------------------------------------------------- life
    async def start(self) -> None:
        if self.config.state_dir is not None:
            Path(self.config.state_dir).mkdir(parents=True, exist_ok=True)
        for dc in self.config.devices:
            moved = self._moved(dc.name)
            if moved is not None:
                self._publish_redirect(dc, moved)
                continue
            await self.add_device(dc)
        for host, port in self.config.listen:
            self.listening += await self.target.start(host, port)
        if self.control is not None:
            await self.control.start()
        self.log.info(
            "host %s (initiator %s) serving %d device(s) on %s",
            self.name,
            self.initiator,
            len(self.devices),
            ", ".join(f"{h}:{p}" for h, p in self.listening),
        )

    async def serve_forever(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        if self._moved_retry is not None:
            self._moved_retry.cancel()
            self._moved_retry = None
        self.emit({"event": "SHUTDOWN", "host": self.name})
        await self.target.close()
        for dev in list(self.devices.values()):
            await dev.close()
        if self.control is not None:
            await self.control.close()
        if self.event_log is not None:
            self.remove_listener(self.event_log)
            self.event_log.close()
        self.log.info("host %s stopped", self.name)

    # ---------------------------------------------------------- devices
    async def add_device(
        self,
        config: DeviceConfig,
        identity: DeviceIdentity | None = None,
        state: DevicePrState | None = None,
        *,
        pending_uas: dict[str, list[Any]] | None = None,
        expose: bool = True,
    ) -> PassthroughDevice:
        """Create, start and (``expose``) publish a device on the frontend.
        ``identity``/``state``/``pending_uas``: what an incoming migration
        carries (the state is journaled at once)."""
        if config.name in self.devices:
            raise CommandError("GenericError", f"device {config.name!r} exists")
        node_name = frontend_iqn(config)
        if self.target.node(node_name) is not None:
            raise CommandError("GenericError", f"target node {node_name} is in use")
        dev = PassthroughDevice(
            config,
            self.initiator,
            state_dir=self.config.state_dir,
            identity=identity,
            connect=self._connect,
        )
        dev.on_state_change = self._state_changed
        dev.on_reconcile = self._reconciled
        if state is not None:
            dev.snooper.state = state.copy()
        try:
            await dev.start(reconcile=state is None)
        except BaseException:
            await dev.close()  # its monitor session, opened before the failure
            raise
        if state is not None or pending_uas:
            dev.restore(dev.snooper.state, identity, pending_uas)
        self.devices[config.name] = dev
        if expose:
            self.expose(config.name)
        self.emit({"event": "DEVICE_ADDED", "device": config.name, "node": node_name})
        return dev

    # --------------------------------------------------- moved devices
    def _moved_path(self, name: str) -> Path | None:
        sd = self.config.state_dir
        return None if sd is None else Path(sd) / f"{name}.moved.json"

    def record_moved(self, name: str, node: str, host: str, port: int, tpgt: int) -> str | None:
        """The device ``name`` moved to ``host:port``: listed as moved at once
        (``query-host``, ``host --status``; asked to move it again, the
        daemon says where it went) and remembered in the state directory,
        so that after a restart this daemon still redirects its guest there
        (instead of serving the configured device again, with a backend
        nexus that no longer holds the guest's registration).

        Returns None, or why the record could not be written: the failure is
        then kept (``moved[name]["unrecorded"]``, shown by ``query-host``
        and ``host --status``) for the migration to report; this process
        still redirects, a restart with this state directory would not."""
        rec: dict[str, Any] = {"device": name, "node": node, "host": host, "port": port, "tpgt": tpgt,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.moved[name] = rec
        path = self._moved_path(name)
        if path is None:
            self.log.warning("device %s moved, but without --state-dir its redirect ends with this process", name)
            return None
        try:
            persist.save(path, rec)
        except (OSError, persist.PersistError) as e:
            why = f"cannot write {path}: {e}"
            rec["unrecorded"] = why
            self.log.error(
                "device %s moved to %s:%d but the move is not recorded (%s): a restart with this "
                "state directory would serve the device here again; written again every %.0f s "
                "until it works (keep this process running until then)",
                name, host, port, why, MOVED_RETRY_S,
            )
            self._arm_moved_retry()
            return why
        return None

    def _arm_moved_retry(self) -> None:
        if self._moved_retry is None and not self._stop.is_set():
            self._moved_retry = asyncio.get_running_loop().call_later(MOVED_RETRY_S, self._retry_moved)

    def _retry_moved(self) -> None:
        """Write the move records that failed; one log line when one works."""
        self._moved_retry = None
        for name, rec in list(self.moved.items()):
            path = self._moved_path(name)
            if not rec.get("unrecorded") or path is None:
                continue
            try:
                persist.save(path, {k: v for k, v in rec.items() if k != "unrecorded"})
            except (OSError, persist.PersistError):
                continue
            del rec["unrecorded"]
            self.log.info("device %s: move to %s:%d recorded in %s", name, rec["host"], rec["port"], path)
        if any(r.get("unrecorded") for r in self.moved.values()):
            self._arm_moved_retry()

    def not_here(self, name: str) -> str:
        """Why ``name`` is not a device of this daemon, for an error reply."""
        m = self.moved.get(name)
        if m is None:
            return f"device {name!r} not found"
        return (f"device {name!r} moved to {m['host']}:{m['port']} at {m.get('at', '?')}: "
                f"it runs there now")

    def _moved(self, name: str) -> dict[str, Any] | None:
        path = self._moved_path(name)
        if path is None:
            return None
        try:
            rec = persist.load(path)
        except persist.PersistError as e:
            self.log.error("ignoring %s: %s", path, e)
            return None
        if rec is None:
            return None
        try:
            rec["port"], rec["tpgt"] = int(rec["port"]), int(rec["tpgt"])
            if not isinstance(rec["host"], str):
                raise TypeError("host is not a string")
        except (KeyError, TypeError, ValueError) as e:
            self.log.error("ignoring %s: %s", path, e)
            return None
        return rec

    def _publish_redirect(self, config: DeviceConfig, moved: dict[str, Any]) -> None:
        node_name = frontend_iqn(config)
        acl = set(config.guests) if config.guests is not None else None
        node = TargetNode(node_name, {}, acl, alias=f"{self.name}/{config.name}",
                          redirect=(moved["host"], moved["port"], moved["tpgt"]))
        self.target.add_node(node)
        self.moved[config.name] = moved
        self.log.info(
            "device %s moved to %s:%d at %s: not started here; logins to %s are redirected there "
            "(delete %s to serve it here again)",
            config.name, moved["host"], moved["port"], moved.get("at", "?"), node_name,
            self._moved_path(config.name),
        )

    def _forget_moved(self, name: str) -> None:
        self.moved.pop(name, None)
        path = self._moved_path(name)
        if path is not None:
            persist.remove(path)

    def expose(self, name: str) -> TargetNode:
        """Publish the device's target node on the frontend (idempotent).
        A device served here again is no longer recorded as moved away."""
        dev = self.get_device(name)
        self._forget_moved(name)
        node_name = frontend_iqn(dev.config)
        node = self.target.node(node_name)
        if node is None:
            acl = set(dev.config.guests) if dev.config.guests is not None else None
            node = TargetNode(node_name, {0: dev}, acl, alias=f"{self.name}/{name}")
            self.target.add_node(node)
            dev.log.info(
                "guest frontend %s (LUN 0) -> backend %s lun %d, migrate-pr %s, identity %s",
                node_name,
                dev.config.backend_url,
                dev.lun,
                "on" if dev.migrate_pr else "off",
                dev.config.identity,
            )
        return node

    def unexpose(self, name: str) -> None:
        """Withdraw the node (its sessions are dropped, nexus loss to the device)."""
        dev = self.get_device(name)
        self.target.remove_node(frontend_iqn(dev.config))

    async def remove_device(self, name: str, *, forget_state: bool = False) -> None:
        """Withdraw the frontend node, close the backend sessions; with
        ``forget_state`` also delete the journal (the device moved away)."""
        dev = self.get_device(name)
        self.target.remove_node(frontend_iqn(dev.config))
        del self.devices[name]
        await dev.close()
        if forget_state and dev.journal is not None:
            dev.journal.remove()
        self.emit({"event": "DEVICE_REMOVED", "device": name})

    def get_device(self, name: str) -> PassthroughDevice:
        dev = self.devices.get(name)
        if dev is None:
            raise CommandError("DeviceNotFound", self.not_here(name))
        return dev

    # ------------------------------------------------------------ events
    def add_listener(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def emit(self, event: dict[str, Any]) -> None:
        """Send ``event`` (``{"event": NAME, ...}``) to control subscribers
        and in-process listeners."""
        msg = event_message(event)
        if self.control is not None:
            self.control.broadcast(msg)
        for fn in list(self._listeners):
            try:
                fn(msg)
            except Exception:
                self.log.exception("event listener failed")

    def _state_changed(self, dev: PassthroughDevice, changes: tuple[StateChange, ...]) -> None:
        self.emit(
            {
                "event": "PR_STATE_CHANGED",
                "device": dev.name,
                "changes": [
                    {"guest": c.guest, "reason": c.reason, "after": c.after.to_dict()}
                    for c in changes
                ],
            }
        )

    def _reconciled(self, dev: PassthroughDevice, info: dict[str, Any]) -> None:
        self.emit({"event": "PR_RECONCILED", "device": dev.name, **info})

    # ------------------------------------------------------------ control
    def _register_builtin(self, control: ControlServer) -> None:
        control.register_command("query-devices", self._cmd_query_devices)
        control.register_command("query-machines", self._cmd_query_machines)
        control.register_command("query-host", self._cmd_query_host)
        control.register_command("device-verify", self._cmd_device_verify)
        control.register_command("reconcile-pr", self._cmd_reconcile_pr)
        control.register_command("quit", self._cmd_quit)

    def _cmd_query_devices(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for name, dev in sorted(self.devices.items()):
            if "device" in args and args["device"] != name:
                continue
            d = dev.describe()
            node = frontend_iqn(dev.config)
            sessions = self.target.sessions(node) if self.target.node(node) else []
            d["frontend"] = {
                "node": node,
                "exposed": self.target.node(node) is not None,
                "urls": [f"iscsi://{h}:{p}/{node}/0" for h, p in self.listening],
                "sessions": sorted(f"{s.initiator},i,0x{s.isid:012x}" for s in sessions),
            }
            d["machine-info"] = {
                "resolved": resolve_machine(dev.config.machine).name,
            }
            out.append(d)
        if "device" in args and not out:
            raise CommandError("DeviceNotFound", f"device {args['device']!r} not found")
        return out

    def _cmd_query_machines(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": m.name,
                "alias-of": m.alias_of,
                "migrate-pr-default": m.default_migrate_pr,
            }
            for m in list_machines()
        ]

    def _cmd_query_host(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.name,
            "initiator": self.initiator,
            "listen": [f"{h}:{p}" for h, p in self.listening],
            "state-dir": None if self.config.state_dir is None else str(self.config.state_dir),
            "devices": sorted(self.devices),
            "moved": {n: f"{m['host']}:{m['port']}" for n, m in sorted(self.moved.items())},
            # moves whose record could not be written: lost by a restart
            "moved-unrecorded": {n: m["unrecorded"] for n, m in sorted(self.moved.items())
                                 if m.get("unrecorded")},
        }

    async def _cmd_device_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("device")
        if not isinstance(name, str):
            raise CommandError("InvalidParameter", "device: expected a device name")
        dev = self.get_device(name)
        try:
            changes = await dev.verify("device-verify")
        except DeviceError as e:
            raise CommandError("GenericError", str(e)) from e
        return {"changes": [c.describe() for c in changes]}

    async def _cmd_reconcile_pr(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Reconcile with the backend now: ``device`` or every device."""
        name = args.get("device")
        if name is not None and not isinstance(name, str):
            raise CommandError("InvalidParameter", "device: expected a device name")
        devs = [self.get_device(name)] if name is not None else list(self.devices.values())
        out: list[dict[str, Any]] = []
        for dev in devs:
            try:
                changes = await dev.verify("reconcile-pr")
            except DeviceError as e:
                if name is not None:
                    raise CommandError("GenericError", str(e)) from e
                out.append({"device": dev.name, "error": str(e)})
                continue
            out.append(
                {
                    "device": dev.name,
                    "method": dev.verify_method,
                    "changes": [c.describe() for c in changes],
                    "unknown": list(dev.verify_unknown),
                }
            )
        return out

    def _cmd_quit(self, args: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self.request_stop)
        return {}


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message and the
    adapter's context (device, host, session...)."""

    _STD = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._STD and k not in obj and not k.startswith("_"):
                obj[k] = v if isinstance(v, str | int | float | bool | None) else str(v)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


class ContextFormatter(logging.Formatter):
    """Text lines with the adapter's context: ``[device=vm1] message``."""

    _STD = JsonFormatter._STD

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in self._STD and not k.startswith("_") and k not in ("message", "asctime")
        )
        text = super().format(record)
        if ctx:
            head, sep, msg = text.partition(": ")
            return f"{head}: [{ctx}] {msg}" if sep else f"[{ctx}] {text}"
        return text


def setup_logging(fmt: str, level: int) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
