"""Crash-safe journal of one device's tracked PR state.

QEMU forgets its snooped state on restart (docs/limitations.md, 1). The
journal keeps it: one small JSON file per device, replaced atomically on
every change (as a LU keeps APTPL state, SPC-5 5.14.5: temp file, fsync,
rename, fsync dir), so a reader sees either the old or the new record,
never a mix.

Record (one JSON object)::

    {"format": "prmigrate-pr-journal", "version": 1, "seq": N,
     "state": DevicePrState.to_dict(), "intents": [Intent.to_dict(), ...],
     "crc32": crc of the canonical JSON of everything else}

Intents close the window between the backend's GOOD and the journal write.
Before a PR OUT is forwarded, ``begin(intent)`` records it; after the answer
is snooped, ``commit(token, state)`` writes the new state and drops the
intent in one atomic replace. A record still holding intents after a restart
means a PR OUT was in flight at the crash: its outcome is unknown and the
state must be reconciled from the backend (``reconcile.py``) before use.

``seq`` increases by one on every write; the migration stream can carry it to
tell a stale journal from a fresh one.

A missing file is "no state" (``load() -> None``); an unreadable, truncated or
tampered file raises ``JournalCorrupt``; a newer version ``JournalVersionError``.
Never a crash with a stray exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..lun.persist import atomic_write, fsync_dir
from .state import DevicePrState

FORMAT = "prmigrate-pr-journal"
VERSION = 1
MAX_RECORD = 16 * 1024 * 1024  # a record is a few KiB; refuse to parse garbage that big


class JournalError(Exception):
    """The journal cannot be read or written."""


class JournalCorrupt(JournalError):  # noqa: N818 - reads as the condition it reports
    """The journal file exists but is truncated, not JSON, or fails its checksum."""


class JournalVersionError(JournalCorrupt):
    """The journal was written by a newer format version."""


@dataclass(frozen=True, slots=True)
class Intent:
    """A PR OUT about to be forwarded: enough to explain an unknown outcome."""

    id: int
    guest: str
    cdb: bytes
    data_out: bytes = b""

    @property
    def service_action(self) -> int | None:
        return self.cdb[1] & 0x1F if len(self.cdb) > 1 else None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "guest": self.guest,
            "cdb": self.cdb.hex(),
            "data_out": self.data_out.hex(),
        }

    @staticmethod
    def from_dict(d: object) -> Intent:
        if not isinstance(d, dict):
            raise JournalCorrupt("intent record is not an object")
        try:
            return Intent(
                int(d["id"]),
                str(d["guest"]),
                bytes.fromhex(d["cdb"]),
                bytes.fromhex(d.get("data_out", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise JournalCorrupt(f"bad intent record: {e}") from e


@dataclass(slots=True)
class JournalRecord:
    seq: int
    state: DevicePrState
    intents: tuple[Intent, ...] = ()

    @property
    def needs_reconcile(self) -> bool:
        """A PR OUT was in flight when the record was written last."""
        return bool(self.intents)

    def recovered_state(self) -> DevicePrState:
        """The state to start from after a restart: the journalled one, with
        every guest that had a PR OUT in flight marked unverified (its
        outcome is unknown until reconciled from the backend)."""
        state = self.state.copy()
        for intent in self.intents:
            state.mark_unverified(intent.guest)
        return state


@dataclass(slots=True)
class _Cache:
    seq: int = 0
    state: DevicePrState = field(default_factory=DevicePrState)
    intents: dict[int, Intent] = field(default_factory=dict)
    next_intent: int = 1


def _payload(seq: int, state: DevicePrState, intents: list[Intent]) -> dict[str, object]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "seq": seq,
        "state": state.to_dict(),
        "intents": [i.to_dict() for i in intents],
    }


def _canonical(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


class PrJournal:
    """The journal of one device, at ``path``. One writer per file."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync  # tests may switch it off; production never does
        self._c = _Cache()
        self._loaded = False

    # -- reading
    def load(self) -> JournalRecord | None:
        """The last record written, or None when there is no journal yet."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_RECORD + 1)
        except FileNotFoundError:
            self._loaded = True
            return None
        except OSError as e:
            raise JournalError(f"{self.path}: {e}") from e
        record = self.decode(raw, str(self.path))
        self._c = _Cache(
            record.seq,
            record.state.copy(),
            {i.id: i for i in record.intents},
            max((i.id for i in record.intents), default=0) + 1,
        )
        self._loaded = True
        return record

    @staticmethod
    def decode(raw: bytes, where: str = "journal") -> JournalRecord:
        """Parse and verify one record; ``JournalCorrupt`` on any defect."""
        if len(raw) > MAX_RECORD:
            raise JournalCorrupt(f"{where}: larger than {MAX_RECORD} bytes")
        if not raw.strip():
            raise JournalCorrupt(f"{where}: empty")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise JournalCorrupt(f"{where}: not a JSON record ({e})") from e
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise JournalCorrupt(f"{where}: not a prmigrate PR journal")
        version = obj.get("version")
        if not isinstance(version, int):
            raise JournalCorrupt(f"{where}: no version")
        if version > VERSION:
            raise JournalVersionError(f"{where}: journal version {version} is newer than {VERSION}")
        crc = obj.pop("crc32", None)
        if crc != zlib.crc32(_canonical(obj)):
            raise JournalCorrupt(f"{where}: checksum mismatch")
        try:
            seq = obj["seq"]
            if not isinstance(seq, int) or seq < 0:
                raise ValueError("bad seq")
            state = DevicePrState.from_dict(obj["state"])
            intents_raw = obj.get("intents", [])
            if not isinstance(intents_raw, list):
                raise ValueError("intents is not a list")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise JournalCorrupt(f"{where}: bad record ({e})") from e
        return JournalRecord(seq, state, tuple(Intent.from_dict(i) for i in intents_raw))

    # -- writing
    @property
    def seq(self) -> int:
        return self._c.seq

    @property
    def pending_intents(self) -> tuple[Intent, ...]:
        return tuple(self._c.intents.values())

    def save(self, state: DevicePrState) -> int:
        """Write ``state`` (keeping pending intents); returns the new seq."""
        self._c.state = state.copy()
        return self._write()

    def begin(self, guest: str, cdb: bytes, data_out: bytes = b"") -> Intent:
        """Record a PR OUT about to be forwarded, durably, before forwarding it.
        JournalError: nothing recorded, in memory either (the caller must not
        forward it: a later write would otherwise carry an intent that was
        never acted on)."""
        intent = Intent(self._c.next_intent, guest.lower(), bytes(cdb), bytes(data_out))
        self._c.next_intent += 1
        self._c.intents[intent.id] = intent
        try:
            self._write()
        except JournalError:
            del self._c.intents[intent.id]
            raise
        return intent

    def commit(self, intent: Intent, state: DevicePrState | None = None) -> int:
        """The PR OUT of ``intent`` was answered and snooped: write ``state``
        (None: unchanged) and drop the intent, atomically."""
        self._c.intents.pop(intent.id, None)
        if state is not None:
            self._c.state = state.copy()
        return self._write()

    def clear_intents(self, state: DevicePrState) -> int:
        """After reconciling from the backend: the new state, no intents."""
        self._c.intents.clear()
        self._c.state = state.copy()
        return self._write()

    def _write(self) -> int:
        if not self._loaded:
            # Written without load(): keep seq increasing across the restart
            # anyway; the caller chose to overwrite whatever state was there.
            self._loaded = True
            try:
                with open(self.path, "rb") as f:
                    self._c.seq = max(self._c.seq, self.decode(f.read(MAX_RECORD + 1)).seq)
            except (OSError, JournalError):
                pass
        self._c.seq += 1
        obj = _payload(self._c.seq, self._c.state, list(self._c.intents.values()))
        obj["crc32"] = zlib.crc32(_canonical(obj))
        data = json.dumps(obj, sort_keys=True, indent=1).encode("utf-8") + b"\n"
        try:
            atomic_write(self.path, data, fsync=self.fsync)
        except OSError as e:
            self._c.seq -= 1
            # a temp file cut short by a full disk: gone, so it holds no space
            with contextlib.suppress(OSError):
                self.path.with_name(f".{self.path.name}.tmp").unlink()
            raise JournalError(f"{self.path}: {e}") from e
        return self._c.seq

    def remove(self) -> None:
        """Forget the device (it was deleted or migrated away for good)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self.fsync:
            fsync_dir(self.path.parent)
        self._c = _Cache()
