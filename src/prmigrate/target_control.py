"""``prmigrate target`` at run time: LUNs and ACL entries over QMP, kept in
``--config target.toml``.

Commands (QMP, ``prmigrate.qmp``; arguments typed and checked there):

| command | arguments | does |
|---|---|---|
| ``lun-add`` | ``lun`` int, ``path`` str, ``size`` str/int (when the image is missing) | opens (creates) the image, presents it |
| ``lun-del`` | ``lun`` int | stops presenting it, closes the image (the file and its APTPL state stay) |
| ``acl-add`` | ``initiator`` str | allows that initiator to log in (an open node becomes a list of one) |
| ``acl-del`` | ``initiator`` str | forbids it and ends its sessions (LIO does the same on a node ACL's removal) |
| ``query-luns`` | | each LUN: path, size, block size, registrations, reservation |
| ``query-sessions`` | | each session: initiator port, nexus (its portal group tag and relative target port), TSIH, and per LUN what it registered |
| ``query-acl`` | | ``{"open": true}`` (every initiator may log in) or the ``initiators`` allowed |

Adding or removing a LUN touches no other LUN: sessions, registrations and
reservations stay; every session gets REPORTED LUNS DATA HAS CHANGED (SPC-5
6.33) through ``IscsiTarget.add_lun`` / ``remove_lun``. Events ``LUN_ADDED``,
``LUN_DELETED``, ``ACL_CHANGED`` follow each change.

Fail closed, as targetcli's saveconfig would want it: with ``--config`` the
new configuration is written (atomically: temporary file, fsync, rename,
directory fsync) *before* the change is applied; when that write fails the
command answers GenericError naming the file and nothing changes (an image
the command created is removed again). The file is TOML::

    # prmigrate target configuration, rewritten by lun-add/lun-del/acl-add/acl-del
    iqn = "iqn.2026-11.org.prmigrate:shared"
    acl = ["iqn.2026-11.org.example:host1"]   # absent: open to every initiator

    [[lun]]
    lun = 0
    path = "/srv/lun0.img"
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .lun.persist import atomic_write
from .qmp import ArgType, CommandSpec, ErrorClass, QmpError, QmpServer, arg
from .scsi.vocabulary import format_key, words

log = logging.getLogger("prmigrate.target.control")

MAX_LUN = 16383  # peripheral and flat space addressing (lun/unit.py _lun_entry)
# iSCSI names (RFC 7143 4.2.7.2): iqn., eui. or naa. and no blanks or controls
_NAME = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s\x00-\x1f]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(Exception):
    """The configuration file cannot be read, or says something invalid."""


def parse_size(value: object, name: str = "size") -> int:
    """``64M``, ``1G``, ``512`` (bytes) or an integer; GenericError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise QmpError(ErrorClass.GENERIC, f"Invalid parameter type for '{name}', expected: string")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(value)
        if m is None:
            raise QmpError(ErrorClass.GENERIC, f"Parameter '{name}' expects a size such as 64M, not {value!r}")
        size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if size <= 0:
        raise QmpError(ErrorClass.GENERIC, f"Parameter '{name}' must be a positive size")
    return size


def check_initiator(name: str) -> str:
    if not _NAME.match(name) or len(name) > 223:
        raise QmpError(ErrorClass.GENERIC, f"Parameter 'initiator' is not an iSCSI name: {name!r}")
    return name.lower()


# ------------------------------------------------------------------ the file


@dataclass(frozen=True)
class TargetConfig:
    """What ``--config`` holds: the node name, its ACL, its LUNs."""

    iqn: str | None = None
    acl: frozenset[str] | None = None  # None: open to every initiator
    luns: dict[int, Path] = field(default_factory=dict)

    @staticmethod
    def load(path: Path) -> TargetConfig:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return TargetConfig()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        unknown = set(data) - {"iqn", "acl", "lun"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
        iqn = data.get("iqn")
        if iqn is not None and not isinstance(iqn, str):
            raise ConfigError(f"{path}: iqn must be a string")
        acl = data.get("acl")
        if acl is not None and not (isinstance(acl, list) and all(isinstance(a, str) for a in acl)):
            raise ConfigError(f"{path}: acl must be a list of initiator names")
        luns: dict[int, Path] = {}
        entries = data.get("lun", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: lun must be an array of tables ([[lun]])")
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"lun", "path"}:
                raise ConfigError(f"{path}: each [[lun]] has exactly lun and path")
            num, where = entry["lun"], entry["path"]
            if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= MAX_LUN \
                    or not isinstance(where, str):
                raise ConfigError(f"{path}: bad [[lun]] entry {entry!r}")
            if num in luns:
                raise ConfigError(f"{path}: LUN {num} given twice")
            luns[num] = (path.parent / where).resolve()
        return TargetConfig(iqn, None if acl is None else frozenset(a.lower() for a in acl), luns)

    def dump(self) -> bytes:
        # JSON strings are TOML basic strings (same escapes).
        lines = ["# prmigrate target configuration, rewritten by lun-add/lun-del/acl-add/acl-del"]
        if self.iqn is not None:
            lines.append(f"iqn = {json.dumps(self.iqn)}")
        if self.acl is not None:
            lines.append(f"acl = [{', '.join(json.dumps(a) for a in sorted(self.acl))}]")
        for num in sorted(self.luns):
            lines += ["", "[[lun]]", f"lun = {num}", f"path = {json.dumps(str(self.luns[num]))}"]
        return ("\n".join(lines) + "\n").encode("utf-8")

    def save(self, path: Path) -> None:
        atomic_write(path, self.dump())


# ------------------------------------------------------------------ commands


COMMANDS = (
    CommandSpec("lun-add", (arg("lun", ArgType.INTEGER), arg("path", ArgType.STRING),
                            arg("size", ArgType.ANY, optional=True))),
    CommandSpec("lun-del", (arg("lun", ArgType.INTEGER),)),
    CommandSpec("acl-add", (arg("initiator", ArgType.STRING),)),
    CommandSpec("acl-del", (arg("initiator", ArgType.STRING),)),
    CommandSpec("query-luns"),
    CommandSpec("query-sessions"),
    CommandSpec("query-acl"),
)

MakeLu = Callable[[int, Path, "int | None"], Any]  # (lun, path, size to create) -> LogicalUnit


class TargetControl:
    """The command handlers over a running ``IscsiTarget`` and its one node."""

    def __init__(self, target: Any, node_name: str, luns: dict[int, Any], paths: dict[int, Path],
                 make_lu: MakeLu, config_path: Path | None = None, base_dir: Path | None = None,
                 emit: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.target = target
        self.node = target.node(node_name)
        if self.node is None:
            raise KeyError(node_name)
        self.luns = luns  # the same dict the node serves (TargetNode.luns)
        self.paths = dict(paths)
        self.make_lu = make_lu
        self.config_path = config_path
        self.base_dir = base_dir or (config_path.parent if config_path is not None else Path.cwd())
        self.emit = emit or (lambda name, data: None)

    # -- the file
    def config(self, *, luns: dict[int, Path] | None = None,
               acl: Iterable[str] | None | bool = False) -> TargetConfig:
        """The configuration now, or with ``luns`` / ``acl`` replaced."""
        current = None if self.node.acl is None else frozenset(self.node.acl)
        new_acl = current if acl is False else (None if acl is None else frozenset(acl))  # type: ignore[arg-type]
        return TargetConfig(self.node.name, new_acl, dict(self.paths if luns is None else luns))

    def save(self, config: TargetConfig) -> None:
        """Write ``config`` before a change is applied; GenericError when it cannot be."""
        if self.config_path is None:
            return
        try:
            config.save(self.config_path)
        except OSError as e:
            log.error("configuration not saved to %s: %s", self.config_path, e)
            raise QmpError(ErrorClass.GENERIC, f"cannot save the configuration to {self.config_path}: {e}") from e

    # -- handlers
    def lun_add(self, a: dict[str, Any]) -> dict[str, Any]:
        num = a["lun"]
        if not 0 <= num <= MAX_LUN:
            raise QmpError(ErrorClass.GENERIC, f"Parameter 'lun' must be 0..{MAX_LUN}")
        if num in self.luns:
            raise QmpError(ErrorClass.GENERIC, f"LUN {num} exists")
        path = (self.base_dir / a["path"]).resolve()
        if any(p == path for p in self.paths.values()):
            raise QmpError(ErrorClass.GENERIC, f"{path} is already served")
        size = parse_size(a["size"]) if "size" in a else None
        created = not path.exists()
        if created and size is None:
            raise QmpError(ErrorClass.GENERIC, f"Parameter 'size' is missing: {path} does not exist")
        try:
            lu = self.make_lu(num, path, size if created else None)
        except (OSError, ValueError) as e:
            raise QmpError(ErrorClass.GENERIC, f"LUN {num}: cannot open {path}: {e}") from e
        try:
            self.save(self.config(luns={**self.paths, num: path}))
            self.target.add_lun(self.node.name, num, lu)
        except BaseException:
            lu.close()
            if created:
                path.unlink(missing_ok=True)
            raise
        self.paths[num] = path
        log.info("LUN %d added: %s (%d bytes)%s", num, path, lu.store.size, " created" if created else "")
        self.emit("LUN_ADDED", {"lun": num, "path": str(path)})
        return self._lun_info(num)

    def lun_del(self, a: dict[str, Any]) -> dict[str, Any]:
        num = a["lun"]
        if num not in self.luns:
            raise QmpError(ErrorClass.DEVICE_NOT_FOUND, f"LUN {num} does not exist")
        self.save(self.config(luns={n: p for n, p in self.paths.items() if n != num}))
        lu = self.target.remove_lun(self.node.name, num)
        path = self.paths.pop(num, None)
        close = getattr(lu, "close", None)
        if close is not None:
            close()
        log.info("LUN %d removed (%s)", num, path)
        self.emit("LUN_DELETED", {"lun": num})
        return {}

    def acl_add(self, a: dict[str, Any]) -> dict[str, Any]:
        name = check_initiator(a["initiator"])
        acl = set(self.node.acl or ())
        if self.node.acl is not None and name in acl:
            raise QmpError(ErrorClass.GENERIC, f"{name} is already in the ACL")
        acl.add(name)
        self.save(self.config(acl=acl))
        self.node.acl = acl
        log.info("ACL: %s may log in (%d initiator%s allowed)", name, len(acl), "" if len(acl) == 1 else "s")
        self.emit("ACL_CHANGED", {"acl": sorted(acl)})
        return {}

    def acl_del(self, a: dict[str, Any]) -> dict[str, Any]:
        name = check_initiator(a["initiator"])
        if self.node.acl is None or name not in self.node.acl:
            raise QmpError(ErrorClass.GENERIC, f"{name} is not in the ACL")
        acl = set(self.node.acl) - {name}
        self.save(self.config(acl=acl))
        self.node.acl = acl
        dropped = self.target.drop_sessions(self.node.name, name)
        log.info("ACL: %s removed, %d session%s ended", name, dropped, "" if dropped == 1 else "s")
        self.emit("ACL_CHANGED", {"acl": sorted(acl)})
        return {"sessions-ended": dropped}

    def query_acl(self, a: dict[str, Any]) -> dict[str, Any]:
        acl = self.node.acl
        return {"open": acl is None, "initiators": sorted(acl or ())}

    def _lun_info(self, num: int) -> dict[str, Any]:
        lu = self.luns[num]
        info: dict[str, Any] = {"lun": num, "path": str(self.paths.get(num, ""))}
        store = getattr(lu, "store", None)
        if store is not None:
            info["size"] = store.size
        info["block-size"] = getattr(lu, "block_size", 512)
        pr = getattr(lu, "pr", None)
        if pr is not None:
            resv = pr.reservation
            info["pr"] = {
                "generation": pr.generation,
                "aptpl": pr.aptpl,
                "registrations": len(pr.registrations),
                "reservation": None if resv is None else {"type": words(resv.rtype)},
            }
        return info

    def query_luns(self, a: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._lun_info(n) for n in sorted(self.luns)]

    def query_sessions(self, a: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for s in self.target.sessions(self.node.name):
            nexus = s.nexus
            regs: dict[str, Any] = {}
            if nexus is not None:
                for num in sorted(self.luns):
                    pr = getattr(self.luns[num], "pr", None)
                    if pr is None:
                        continue
                    reg = pr.registration_of(nexus)
                    if reg is not None:
                        regs[str(num)] = {"key": format_key(reg.key), "holder": pr.is_holder(nexus),
                                          "all-tg-pt": reg.all_tg_pt}
            out.append({
                "initiator": s.initiator,
                "isid": f"0x{s.isid:012x}",
                "tsih": s.tsih,
                "nexus": None if nexus is None else str(nexus),
                "tpgt": None if nexus is None else nexus.tpgt,
                "relative-target-port": None if nexus is None else nexus.rel_port,
                "registered": regs,
            })
        return out

    # -- SIGHUP
    def reload(self, path: Path) -> list[str]:
        """Apply ``path`` again (SIGHUP): LUNs added to or removed from the
        file are added or removed, and the ACL becomes the file's, through
        the same handlers as the QMP commands (so every other LUN's sessions,
        registrations and reservations stay). A LUN whose path changed, a new
        image that does not exist and a changed node name are refused, each
        with a line in the answer; nothing else stops the rest."""
        try:
            want = TargetConfig.load(path)
        except ConfigError as e:
            return [f"not reloaded: {e}"]
        said: list[str] = []
        if want.iqn is not None and want.iqn.lower() != self.node.name.lower():
            said.append(f"iqn {want.iqn}: the node name needs a restart")
        for num in sorted(set(self.paths) - set(want.luns)):
            self._apply(said, f"LUN {num} removed", self.lun_del, {"lun": num})
        for num, where in sorted(want.luns.items()):
            if num not in self.paths:
                if not where.exists():
                    said.append(f"LUN {num}: {where} does not exist (lun-add with a size creates it)")
                    continue
                self._apply(said, f"LUN {num} added", self.lun_add, {"lun": num, "path": str(where)})
            elif self.paths[num] != where:
                said.append(f"LUN {num}: path changed to {where}: refused (delete it, then add it)")
        current = None if self.node.acl is None else frozenset(self.node.acl)
        if want.acl != current:
            if want.acl is None:  # open again: every initiator may log in
                self.save(self.config(acl=None))
                self.node.acl = None
                self.emit("ACL_CHANGED", {"acl": None})
                said.append("ACL removed: open to every initiator")
            else:
                for name in sorted(want.acl - (current or frozenset())):
                    self._apply(said, f"ACL: {name} added", self.acl_add, {"initiator": name})
                if current is not None:
                    for name in sorted(current - want.acl):
                        self._apply(said, f"ACL: {name} removed", self.acl_del, {"initiator": name})
                if current is None and not want.acl:  # acl = []: closed
                    self.save(self.config(acl=()))
                    self.node.acl = set()
                    self.emit("ACL_CHANGED", {"acl": []})
                    said.append("ACL: empty, no initiator may log in")
        return said

    @staticmethod
    def _apply(said: list[str], done: str, handler: Callable[[dict[str, Any]], Any], a: dict[str, Any]) -> None:
        try:
            handler(a)
        except QmpError as e:
            said.append(f"{done.split(':')[0]}: refused: {e.desc}")
        else:
            said.append(done)

    _HANDLERS: dict[str, Callable[[TargetControl, dict[str, Any]], Any]] = {
        "lun-add": lun_add, "lun-del": lun_del, "acl-add": acl_add, "acl-del": acl_del,
        "query-luns": query_luns, "query-sessions": query_sessions, "query-acl": query_acl,
    }

    def register(self, server: QmpServer) -> None:
        for spec in COMMANDS:
            server.register(spec, self._bound(self._HANDLERS[spec.name]))

    def _bound(self, handler: Callable[[TargetControl, dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        return lambda a: handler(self, a)


def merge(config: TargetConfig, iqn: str | None, luns: Iterable[tuple[int, Path]],
          acl: Iterable[str] | None) -> TargetConfig:
    """The configuration to start with: the file's, plus what the flags add.
    ConfigError when they disagree (another node name, or a LUN number on
    another image)."""
    if iqn is not None and config.iqn is not None and iqn.lower() != config.iqn.lower():
        raise ConfigError(f"--iqn {iqn} but the configuration file serves {config.iqn}")
    merged = dict(config.luns)
    for num, path in luns:
        where = path.resolve()
        if merged.get(num, where) != where:
            raise ConfigError(f"LUN {num}: --lun says {where}, the configuration file {merged[num]}")
        merged[num] = where
    new_acl = config.acl
    if acl is not None:
        new_acl = frozenset({*(config.acl or ()), *(a.lower() for a in acl)})
    return replace(config, iqn=iqn or config.iqn, acl=new_acl, luns=merged)


# ------------------------------------------------------------------ the CLI


def _usage() -> str:
    return ("prmigrate target lun add N PATH [--size SIZE] | lun del N | lun list | "
            "acl add IQN | acl del IQN | acl list | sessions   (with --control PATH)")


def cli_request(words: list[str], size: int | None) -> tuple[str, dict[str, Any]]:
    """``lun add 1 lun1.img`` -> ("lun-add", {...}); ValueError with the usage."""
    try:
        return _cli_request(words, size)
    except ValueError:
        raise ValueError(_usage()) from None


def _cli_request(words: list[str], size: int | None) -> tuple[str, dict[str, Any]]:
    match words:
        case ["lun", "add", num, path]:
            req: dict[str, Any] = {"lun": int(num), "path": os.path.abspath(path)}
            if size is not None:
                req["size"] = size
            return "lun-add", req
        case ["lun", "del", num]:
            return "lun-del", {"lun": int(num)}
        case ["lun", "list"]:
            return "query-luns", {}
        case ["acl", "add", name]:
            return "acl-add", {"initiator": name}
        case ["acl", "del", name]:
            return "acl-del", {"initiator": name}
        case ["acl", "list"]:
            return "query-acl", {}
        case ["sessions"]:
            return "query-sessions", {}
    raise ValueError(_usage())


def format_answer(command: str, result: Any) -> str:
    """What the CLI prints: a table for the queries, nothing for changes."""
    if command == "query-luns":
        rows = [f"{'LUN':>4}  {'size':>12}  {'regs':>5}  {'reservation':<34} path"]
        for r in result:
            pr = r.get("pr") or {}
            resv = (pr.get("reservation") or {}).get("type", "-")
            rows.append(f"{r['lun']:>4}  {r.get('size', 0):>12}  {pr.get('registrations', 0):>5}  {resv:<34} "
                        f"{r['path']}")
        return "\n".join(rows)
    if command == "query-acl":
        if result["open"]:
            return "open to every initiator"
        return "\n".join(result["initiators"]) or "empty: no initiator may log in"
    if command == "query-sessions":
        rows = []
        for s in result:
            regs = ", ".join(f"LUN {n}: key {v['key']}{' (holder)' if v['holder'] else ''}"
                             for n, v in s["registered"].items())
            rows.append(f"{s['nexus'] or s['initiator']}  tsih {s['tsih']}  {regs or 'nothing registered'}")
        return "\n".join(rows) or "no sessions"
    if isinstance(result, dict) and "sessions-ended" in result:
        return f"{result['sessions-ended']} session(s) ended"
    return ""
