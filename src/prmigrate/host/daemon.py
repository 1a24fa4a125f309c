"""The host daemon: passthrough devices, their guest frontend, the control API.

One process per host. It owns:

* ``devices``: one ``PassthroughDevice`` per configured device, each
  fronting the shared LUN through its own backend sessions;
* ``target``: one ``IscsiTarget`` listening on ``--listen`` (the guest
  frontend) with one target node per device: node name
  ``config.frontend_iqn`` (default ``default_frontend_iqn(device)``), the
  device as its LUN 0, an ACL of the ``guests=`` names when given;
* ``control``: the QMP control server on ``--control`` (``control.py``);
* ``state_dir``: the devices' PR journals (``<device>.pr.json``) and, for a
  device that moved away, where its guest is redirected
  (``<device>.moved.json``, see ``record_moved``): a restarted daemon
  keeps redirecting that guest instead of serving the device again; so it
  does for a migration's ``<device>.migration.json`` at phase
  ``resume-sent`` (past its commit point: killed then, or its ``moved``
  record not written yet), which carries the destination's frontend portal.

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
``device-add`` {the ``--device`` keys} and ``device-del`` {device, force?}
(devices at run time, recorded in ``<state-dir>/devices.json``; with
``incoming-from=`` an incoming device, ``incoming.py``), ``quit``
(and QMP's ``qmp_capabilities``; events go to every negotiated client).
Events: ``DEVICE_ADDED``, ``DEVICE_REMOVED``, ``PR_STATE_CHANGED``,
``PR_RECONCILED`` (reason, method, changes, unknown, error),
``CONFIG_RELOADED`` (added, removed, refused, restart-needed), ``SHUTDOWN``.

Life cycle: ``start`` takes the locks of the state directory and control
socket (``prmigrate.lock``); ``reload(config)`` applies a changed
configuration through ``device_add``/``device_del``; ``reopen_logs``.

``event_log``: a path; every event is also appended there as one JSON line
(``eventlog.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from ..iscsi.initiator import IscsiError, LoginError
from ..iscsi.target import IscsiTarget, TargetNode
from ..lock import DaemonLocks
from ..logfiles import reopen_log_files
from ..lun import persist
from . import incoming
from .config import HostConfig, HostConfigError, device_from_table
from .control import CommandError, ControlServer, event_message
from .eventlog import EventLog

log = logging.getLogger(__name__)

RUNTIME_DEVICES = "devices.json"  # devices added with device-add, by name
RUNTIME_VERSION = 1
# Host settings a reload does not change (a restart does).
_RESTART_FIELDS = ("name", "initiator", "listen", "control", "state_dir", "log_format", "keepalive", "uvloop",
                   "poll_us", "metrics", "migrate_tls_dir")
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
        self._event_log_path = event_log
        self.locks = DaemonLocks(config.state_dir, config.control)
        # device -> its configuration as added with device-add (the record
        # in <state-dir>/devices.json); configured devices are not in it
        self.runtime: dict[str, dict[str, Any]] = {}
        self._devices_lock = asyncio.Lock()
        # devices added with incoming-from= that have not arrived (incoming.py)
        self.incoming_devices: dict[str, incoming.Incoming] = {}
        self._reload_lock = asyncio.Lock()

    # ------------------------------------------------------------- life
    async def start(self) -> None:
        """Lock the state directory and control socket (``LockError`` when
        another daemon holds them), then start every configured device and
        every device added at run time, then serve."""
        if self.config.state_dir is not None:
            Path(self.config.state_dir).mkdir(parents=True, exist_ok=True)
        self.locks.acquire()
        if self._event_log_path is not None and self.event_log is None:
            self.event_log = EventLog(self._event_log_path)
            self.add_listener(self.event_log)
        self.runtime = self._load_runtime()
        configured = {dc.name for dc in self.config.devices}
        runtime_devices = []
        for name, table in self.runtime.items():
            # a configured device that moved away may be incoming again (incoming.py)
            if name in configured and not ("incoming-from" in table and self._moved(name) is not None):
                self.log.warning("device %s is configured and was added at run time: the configuration wins", name)
                continue
            try:
                runtime_devices.append(device_from_table(table))
            except HostConfigError as e:
                self.log.error("device %s added at run time cannot be started: %s", name, e)
        incoming_now = {dc.name for dc in runtime_devices}
        for dc in [d for d in self.config.devices if d.name not in incoming_now] + runtime_devices:
            moved = self._moved(dc.name)
            if moved is not None and dc.incoming_from is None:
                self._publish_redirect(dc, moved)
                continue
            committed = self._commit_marker(dc.name) if dc.incoming_from is None else None
            if committed is not None:
                self._publish_committed(dc, committed)
                continue
            if dc.incoming_from is not None:
                try:
                    await incoming.add_incoming(self, dc)
                except CommandError as e:
                    self.log.error("incoming device %s cannot be started: %s", dc.name, e.desc)
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
            self.event_log = None
        self.locks.release()
        self.log.info("host %s stopped", self.name)

    def reopen_logs(self) -> None:
        """Reopen the event log and every log file (after logrotate moved them)."""
        if self.event_log is not None:
            self.event_log.reopen()
        reopen_log_files()

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
            if state is not None or pending_uas:
                dev.restore(dev.snooper.state, identity, pending_uas)
        except BaseException:
            await dev.close()  # no backend session left behind
            raise
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
        and ``host --status``) for the migration to report, and the record
        written again every ``MOVED_RETRY_S``. Until it is, the migration's
        ``resume-sent`` marker stands for it (``_publish_committed``: a
        restart redirects too); it is removed once the record is written."""
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
            marker = self._marker_path(name) if self._commit_marker(name) is not None else None
            self.log.error(
                "device %s moved to %s:%d but the move is not recorded (%s): %s; written again "
                "every %.0f s until it works",
                name, host, port, why,
                f"until then {marker} stands for it (a restart redirects)" if marker is not None else
                "a restart with this state directory would serve the device here again (keep this "
                "process running)", MOVED_RETRY_S,
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
            self._drop_commit_marker(name)
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

    # A source killed (or whose move record failed) after RESUME, the commit
    # point: the migration's resume-sent marker (migration/marker.py) stands
    # for the move record until that is written.
    def _marker_path(self, name: str) -> Path | None:
        sd = self.config.state_dir
        return None if sd is None else Path(sd) / f"{name}.migration.json"

    def _commit_marker(self, name: str) -> dict[str, Any] | None:
        """The marker of a migration of ``name`` past its commit point, or None."""
        path = self._marker_path(name)
        if path is None or not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            self.log.error("ignoring %s: %s", path, e)
            return None
        return rec if isinstance(rec, dict) and rec.get("phase") == "resume-sent" else None

    def _drop_commit_marker(self, name: str) -> None:
        path = self._marker_path(name)
        if path is not None and self._commit_marker(name) is not None:
            try:
                path.unlink()
            except OSError as e:
                self.log.warning("cannot remove %s: %s", path, e)

    def _publish_committed(self, config: DeviceConfig, marker: dict[str, Any]) -> None:
        """Not served here: the guest may run on the destination. Logins are
        redirected to the destination's frontend portal the marker names; the
        move record is written (then the marker removed), or retried."""
        path = self._marker_path(config.name)
        frontend = marker.get("frontend")
        if not (isinstance(frontend, list) and len(frontend) == 2 and isinstance(frontend[0], str)
                and isinstance(frontend[1], int)):
            self.log.error("device %s: migration %s passed its commit point (%s) with no destination "
                           "portal known: not served here, its guest is not redirected (delete the "
                           "marker to serve it here again)", config.name, marker.get("id", "?"), path)
            return
        rec: dict[str, Any] = {"device": config.name, "node": frontend_iqn(config), "host": frontend[0],
                               "port": frontend[1], "tpgt": None, "at": marker.get("at", "?")}
        self.log.warning("device %s: migration %s to %s passed its commit point before this daemon "
                         "stopped (%s): the guest is on the destination", config.name,
                         marker.get("id", "?"), marker.get("to", "?"), path)
        self._publish_redirect(config, rec)
        mpath = self._moved_path(config.name)
        assert mpath is not None  # a marker implies a state directory
        try:
            persist.save(mpath, rec)
        except (OSError, persist.PersistError) as e:
            rec["unrecorded"] = f"cannot write {mpath}: {e}"
            self.log.error("device %s: %s; %s stands for it, written again every %.0f s",
                           config.name, rec["unrecorded"], path, MOVED_RETRY_S)
            self._arm_moved_retry()
            return
        self._drop_commit_marker(config.name)

    def _publish_redirect(self, config: DeviceConfig, moved: dict[str, Any]) -> None:
        node_name = frontend_iqn(config)
        acl = set(config.guests) if config.guests is not None else None
        node = TargetNode(node_name, {}, acl, alias=f"{self.name}/{config.name}")
        self.target.add_node(node)  # the node's portal group tag, when a record has none
        if moved.get("tpgt") is None:
            moved["tpgt"] = node.tpgt
        node.redirect = (moved["host"], moved["port"], moved["tpgt"])
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
        self._drop_commit_marker(name)

    def expose(self, name: str) -> TargetNode:
        """Publish the device's target node on the frontend (idempotent).
        A device served here again is no longer recorded as moved away."""
        dev = self.get_device(name)
        self._forget_moved(name)
        node_name = frontend_iqn(dev.config)
        node = self.target.node(node_name)
        if node is None:
            acl = set(dev.config.guests) if dev.config.guests is not None else None
            inc = self.incoming_devices.get(name)
            lu = dev if inc is None else inc.gate
            node = TargetNode(node_name, {0: lu}, acl, alias=f"{self.name}/{name}")
            self.target.add_node(node)
            dev.log.info(
                "guest frontend %s (LUN 0) -> backend %s lun %d, migrate-pr %s, identity %s",
                node_name,
                " + ".join(dev.config.backend_urls),
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
        incoming.close(self, name)
        self.target.remove_node(frontend_iqn(dev.config))
        del self.devices[name]
        await dev.close()
        if forget_state and dev.journal is not None:
            dev.journal.remove()
        self.emit({"event": "DEVICE_REMOVED", "device": name})

    # ----------------------------------------- devices at run time
    def _runtime_path(self) -> Path | None:
        sd = self.config.state_dir
        return None if sd is None else Path(sd) / RUNTIME_DEVICES

    def _load_runtime(self) -> dict[str, dict[str, Any]]:
        path = self._runtime_path()
        if path is None:
            return {}
        try:
            doc = persist.load(path)
        except persist.PersistError as e:
            self.log.error("devices added at run time not restored: %s", e)
            return {}
        devices = (doc or {}).get("devices", {})
        if not isinstance(devices, dict) or not all(isinstance(t, dict) for t in devices.values()):
            self.log.error("devices added at run time not restored: %s is not {devices: {NAME: {...}}}", path)
            return {}
        return dict(devices)

    def _save_runtime(self, records: dict[str, dict[str, Any]]) -> None:
        """Write the run-time devices atomically; ``CommandError`` when that
        fails (the caller then changes nothing)."""
        path = self._runtime_path()
        if path is None:
            return
        try:
            if records:
                persist.save(path, {"version": RUNTIME_VERSION, "devices": records})
            else:
                persist.remove(path)
        except OSError as e:
            raise CommandError("GenericError", f"cannot record the device in {path}: {e}") from e

    def _device_busy(self, name: str) -> str | None:
        """Why ``name`` cannot be deleted without force, or None."""
        dev = self.get_device(name)
        node = frontend_iqn(dev.config)
        sessions = self.target.sessions(node) if self.target.node(node) is not None else []
        if sessions:
            who = ", ".join(sorted({s.initiator for s in sessions}))
            return f"{len(sessions)} guest session(s) logged in ({who})"
        service = getattr(self, "migration", None)
        runner = None if service is None else service.runners.get(name)
        if dev.held or (runner is not None and runner.finished is None):
            return "a migration of it is running"
        if service is not None and any(getattr(r, "device_name", None) == name for r in service.incoming):
            return "an incoming migration of it is running"
        return None

    async def device_add(self, table: dict[str, Any] | DeviceConfig, *, record: bool = True) -> PassthroughDevice:
        """Add a device given as ``--device`` keys (a ``[[device]]`` table) or
        a ``DeviceConfig`` (from the configuration file, not recorded).
        With ``record`` it is first written to the state directory, so it
        survives a restart; if that fails nothing is added."""
        if isinstance(table, DeviceConfig):
            dc, record = table, False
        else:
            try:
                dc = device_from_table(table)
            except HostConfigError as e:
                raise CommandError("GenericError", str(e)) from e
        async with self._devices_lock:
            # an incoming device may replace the redirect of a device that moved away
            moved = dc.name in self.moved and dc.incoming_from is None
            if dc.name in self.devices or moved:
                raise CommandError("GenericError", f"device {dc.name!r} exists")
            moved_away = dc.name not in self.devices and (
                dc.name in self.moved or self._moved(dc.name) is not None or bool(self.node_redirects(frontend_iqn(dc))))
            if any(d.name == dc.name for d in self.config.devices) and record and not (
                    dc.incoming_from and moved_away):  # coming back to where it is configured
                raise CommandError("GenericError", f"device {dc.name!r} is in the configuration")
            if self.node_redirects(frontend_iqn(dc)) is False or (
                    dc.incoming_from is None and self.target.node(frontend_iqn(dc)) is not None):
                raise CommandError("GenericError", f"target node {frontend_iqn(dc)} is in use")
            if record:
                assert isinstance(table, dict)
                self._save_runtime({**self.runtime, dc.name: dict(table)})
            try:
                dev = await (incoming.add_incoming(self, dc) if dc.incoming_from else self.add_device(dc))
            except BaseException as e:
                if record:
                    try:
                        self._save_runtime(self.runtime)
                    except CommandError as undo:
                        self.log.error("device %s: not added, and its record stays: %s", dc.name, undo)
                if isinstance(e, DeviceError | IscsiError | LoginError | OSError):
                    raise CommandError("GenericError", f"device {dc.name}: {e}") from e
                raise
            if record:
                assert isinstance(table, dict)
                self.runtime[dc.name] = dict(table)
            dev.log.info("device %s added%s", dc.name, " at run time" if record else "")
            return dev

    async def device_del(self, name: str, *, force: bool = False, record: bool = True) -> None:
        """Remove a device and forget its PR journal; refused while guests
        are logged in or a migration runs, unless ``force``."""
        async with self._devices_lock:
            self.get_device(name)
            busy = self._device_busy(name)
            if busy is not None and not force:
                raise CommandError("GenericError",
                                   f"device {name} is in use: {busy} (force: true deletes it anyway)")
            if record and name in self.runtime:
                rest = {k: v for k, v in self.runtime.items() if k != name}
                self._save_runtime(rest)
                self.runtime = rest
            await self.remove_device(name, forget_state=True)
            if record:
                # a configured device is gone until the configuration is
                # applied again (a reload or a restart brings it back)
                self.config.devices = [d for d in self.config.devices if d.name != name]
            self.log.info("device %s deleted%s", name, f" ({busy})" if busy else "")

    async def reload(self, new: HostConfig) -> dict[str, Any]:
        """Apply a changed configuration (SIGHUP): devices added to it are
        added, devices gone from it are deleted (as ``device-del``, so not
        while guests use them), a changed device is refused; the other
        devices and their guests are not touched. Host settings that need a
        restart are reported, not applied."""
        async with self._reload_lock:
            old = {d.name: d for d in self.config.devices}
            want = {d.name: d for d in new.devices}
            added: list[str] = []
            removed: list[str] = []
            refused: dict[str, str] = {}
            for name, dc in want.items():
                if name in old:
                    if old[name] != dc:
                        refused[name] = ("changed in the configuration; a running device is not "
                                         "changed (delete it and add it again, or restart)")
                    continue
                try:
                    await self.device_add(dc)
                except CommandError as e:
                    refused[name] = e.desc
                    continue
                added.append(name)
            for name in old:
                if name in want:
                    continue
                if name not in self.devices:
                    refused[name] = "removed from the configuration, but not served here (moved away)"
                    continue
                try:
                    await self.device_del(name, record=False)
                except CommandError as e:
                    refused[name] = e.desc
                    continue
                removed.append(name)
            # what runs now: the old entry of a device kept as it was
            kept = [old.get(n, d) for n, d in want.items() if n in added or n in old]
            kept += [old[n] for n in old if n not in want and n not in removed]
            self.config.devices = kept
            restart = [f for f in _RESTART_FIELDS if getattr(new, f) != getattr(self.config, f)]
            result = {"added": added, "removed": removed, "refused": refused, "restart-needed": restart}
            level = logging.WARNING if refused or restart else logging.INFO
            self.log.log(level, "configuration reloaded: %d device(s) added %s, %d removed %s, %d refused%s%s",
                          len(added), added, len(removed), removed, len(refused),
                          "".join(f"; {n}: {why}" for n, why in sorted(refused.items())),
                          f"; needs a restart to change: {', '.join(restart)}" if restart else "")
            self.emit({"event": "CONFIG_RELOADED", **result})
            return result

    def get_device(self, name: str) -> PassthroughDevice:
        dev = self.devices.get(name)
        if dev is None:
            raise CommandError("DeviceNotFound", self.not_here(name))
        return dev

    # ------------------------------------- the migration's Handover contract
    # (``migration/handover.py``): all a migration touches of this daemon.
    @property
    def state_dir(self) -> Path | None:
        return None if self.config.state_dir is None else Path(self.config.state_dir)

    def configured_devices(self) -> set[str]:
        return {d.name for d in self.config.devices}

    def frontend_node(self, config: DeviceConfig) -> str:
        return frontend_iqn(config)

    def node_redirects(self, node: str) -> bool | None:
        n = self.target.node(node)
        return None if n is None else n.redirect is not None

    async def add_incoming_device(self, config: DeviceConfig, identity: DeviceIdentity) -> PassthroughDevice:
        """A migrated device, not exposed; a redirect node of the same name
        (left by an earlier move away) stays in place."""
        node_name = frontend_iqn(config)
        redirect = self.target.node(node_name)
        if redirect is not None and redirect.redirect is not None:
            self.target.nodes.pop(node_name.lower())  # its sessions stay: none, logins are redirected
        else:
            redirect = None
        try:
            return await self.add_device(config, identity=identity, expose=False)
        finally:
            if redirect is not None:
                self.target.add_node(redirect)

    def adopt_incoming(self, config: DeviceConfig) -> PassthroughDevice | None:
        return incoming.adopt(self, config)

    def release_incoming(self, dev: PassthroughDevice) -> None:
        incoming.release(self, dev)

    def serve_incoming(self, name: str) -> None:
        """Publish an incoming device's node (its gate as LUN 0), replacing a redirect."""
        node_name = frontend_iqn(self.get_device(name).config)
        if self.node_redirects(node_name):
            self.target.remove_node(node_name)
        self.expose(name)

    def serve(self, name: str) -> None:
        if incoming.arrive(self, name):
            return
        node_name = frontend_iqn(self.get_device(name).config)
        if self.node_redirects(node_name):
            self.target.remove_node(node_name)
        self.expose(name)

    async def drop_device(self, dev: PassthroughDevice) -> None:
        if self.devices.get(dev.name) is dev:
            del self.devices[dev.name]
        await dev.close()
        if dev.journal is not None:
            with contextlib.suppress(OSError):
                dev.journal.remove()
        self.emit({"event": "DEVICE_REMOVED", "device": dev.name})

    def redirect_logins(self, node: str, host: str, port: int, logout_wait: int,
                        reconnect_wait: int | None = None) -> int | None:
        n = self.target.node(node)
        if n is None:
            return None
        n.redirect = (host, port, n.tpgt)
        return self.target.request_logout(node, wait=logout_wait, time2wait=reconnect_wait)

    def guest_sessions(self, node: str) -> int:
        return len(self.target.sessions(node))

    def drop_guest_sessions(self, node: str) -> int:
        return self.target.drop_sessions(node)

    def record_moved_away(self, name: str, node: str, host: str, port: int) -> str | None:
        n = self.target.node(node)
        if n is None:
            return None
        n.luns = {}
        return self.record_moved(name, node, host, port, n.tpgt)

    def remove_node(self, node: str) -> bool:
        return self.target.remove_node(node) is not None

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
                    {"guest": c.guest, "reason": c.reason, "after": c.after.printed()}
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
        control.register_command("device-add", self._cmd_device_add)
        control.register_command("device-del", self._cmd_device_del)
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
            d["added-at-run-time"] = name in self.runtime
            if name in self.incoming_devices:  # not arrived yet (incoming.py)
                d["incoming-from"] = dev.config.incoming_from
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

    async def _cmd_device_add(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            dev = await self.device_add(args)
        except CommandError as e:
            self.log.warning("device-add %s refused: %s", args.get("name"), e.desc)
            raise
        node = frontend_iqn(dev.config)
        return {"device": dev.name, "node": node, "persistent": self._runtime_path() is not None,
                "urls": [f"iscsi://{h}:{p}/{node}/0" for h, p in self.listening]}

    async def _cmd_device_del(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["device"]
        configured = any(d.name == name for d in self.config.devices)
        try:
            await self.device_del(name, force=bool(args.get("force", False)))
        except CommandError as e:
            self.log.warning("device-del %s refused: %s", name, e.desc)
            raise
        # a configured device comes back at the next start unless the
        # configuration loses it too
        return {"device": name, "configured": configured}

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


def setup_logging(fmt: str, level: int, path: str | Path | None = None) -> None:
    """Log to stderr, or appended to ``path`` (reopened by ``reopen_logs``)."""
    handler: logging.Handler = logging.StreamHandler() if path is None else logging.FileHandler(path)
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
