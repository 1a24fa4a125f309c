"""The SPC-5 persistent reservation engine of one logical unit (SPC-5 5.14, 6.16, 6.17).

State: registrations keyed by initiator port (TransportID: name + ISID) and
target port (relative target port identifier), at most one persistent
reservation, an optional SCSI-2 reservation, PRgeneration and the APTPL flag.

Rules, by service action (SPC-5 5.14.11 / 6.17):

- REGISTER / REGISTER AND IGNORE EXISTING KEY: register, change key, or
  unregister (SARK = 0). Unregistering the holder of a non-all-registrants
  reservation releases it (registrants-only types: 2A/04 to the others);
  an all-registrants reservation lives until its last registrant leaves.
- RESERVE / RELEASE: no PRgeneration change; releasing an RO/AR type sends
  2A/04 to the other registrants.
- CLEAR: everything goes; 2A/03 to the other registrants.
- PREEMPT (AND ABORT): see ``_preempt``; 2A/05 to every nexus that lost its
  registration, 2A/04 to the remaining ones when type/scope changed.
- REGISTER AND MOVE: the holder hands the reservation to another initiator port.
- REPLACE LOST RESERVATION: this engine never loses reservation information
  (RLR_C = 0 in REPORT CAPABILITIES), so the service action is not supported:
  ILLEGAL REQUEST / INVALID FIELD IN CDB, nothing changes (SPC-5 6.17.1).

A unit attention goes to the affected nexuses, never to the one whose command
caused it. Pure: no I/O except the APTPL state file (``persist``).

Cost (``_Registry``): registrations are indexed by initiator port (name,
ISID) and by key, the nexuses seen by initiator port, so finding the
registration of a nexus (every conflict check, REGISTER, RESERVE, READ
RESERVATION) and the registrations a PREEMPT removes takes time independent
of how many others exist; an initiator port holds at most one registration
per target port. What reports or notifies every registrant is linear in
that output: READ KEYS, READ FULL STATUS, CLEAR, a PREEMPT or RELEASE that
sends 2A/04 to all of them, and the APTPL save (the whole state is written).
A format-00b TransportID (any ISID of a name, SPEC_I_PT or REGISTER AND
MOVE) is checked against the registrations of that name.

Fail closed (SPC-5 5.14.5): a PR OUT that changes state is applied only once
that state is persisted. Its unit attentions and task aborts are held back
until the save succeeded; when the save fails, the table returns to exactly
the state before the command (registrations and their order, reservation,
PRgeneration, APTPL), nothing is queued, and the command ends with CHECK
CONDITION, NOT READY, LOGICAL UNIT COMMUNICATION FAILURE (02/08/00), what
LIO answers when it cannot write its APTPL file (a condition of the logical
unit the initiator may retry, not an invalid command: ILLEGAL REQUEST
INSUFFICIENT REGISTRATION RESOURCES would tell it the request itself cannot
be honoured). A snapshot for that rollback is taken only when the command
may write the state file (APTPL on before or requested by it, or a file
left to remove), so registrations without APTPL stay free of it.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from ..scsi.constants import VALID_PR_TYPES, Opcode, PrInAction, PrOutAction, PrType
from ..scsi.pr import (
    BASIC_PARAMS_LEN,
    FullStatusEntry,
    PrDecodeError,
    PrInCdb,
    PrLengthError,
    PrOutCdb,
    PrOutParams,
    ReadReservation,
    RegisterAndMoveParams,
    ReportCapabilities,
)
from ..scsi.sense import CheckCondition, Sense, SenseField
from ..scsi.transport_id import TransportId
from ..scsi.vocabulary import words
from . import persist
from .conflicts import Access, Relation, classify, pr_conflicts, scsi2_allowed
from .types import Nexus, ReservationConflict

__all__ = ["ReservationTable", "Registration", "Reservation", "UnitAttentionSink"]

_GEN_MASK = 0xFFFFFFFF
STATE_VERSION = 1
SPEC_I_PT_BYTE = 20  # byte of SPEC_I_PT / ALL_TG_PT / APTPL in the parameter list
MOVE_APTPL_BYTE = 17  # byte of UNREG / APTPL in the REGISTER AND MOVE parameter list
# Service actions whose parameter list may set APTPL (SPC-5 6.17.3, 6.17.4).
_APTPL_BYTE: dict[int, int] = {
    PrOutAction.REGISTER: SPEC_I_PT_BYTE,
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: SPEC_I_PT_BYTE,
    PrOutAction.REGISTER_AND_MOVE: MOVE_APTPL_BYTE,
}

PortKey = tuple[str, int, int]  # (initiator name, ISID, relative target port)
RegId = tuple[str, int | None, int]  # (initiator name, ISID or None = any, rel port)


# Opcodes whose conflict check still matters when no reservation exists.
_CHECKED_WITHOUT_RESERVATION = frozenset(
    {
        Opcode.PERSISTENT_RESERVE_OUT,
        Opcode.RESERVE_6,
        Opcode.RESERVE_10,
        Opcode.RELEASE_6,
        Opcode.RELEASE_10,
    }
)


class UnitAttentionSink(Protocol):
    def establish(self, nexus: Nexus, sense: Sense) -> None: ...


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered I_T nexus (or, with ``all_tg_pt``, initiator port on every target port)."""

    key: int
    tid: TransportId  # initiator port; isid None = every ISID (format 00b)
    rel_port: int
    all_tg_pt: bool = False
    target: str = ""
    tpgt: int = 1

    @property
    def ident(self) -> RegId:
        return (self.tid.name.lower(), self.tid.isid, self.rel_port)

    def matches(self, nexus: Nexus) -> bool:
        return self.tid.matches(nexus) and (self.all_tg_pt or self.rel_port == nexus.rel_port)

    def overlaps(self, other: Registration) -> bool:
        """Both would register at least one common I_T nexus."""
        if self.tid.name.lower() != other.tid.name.lower():
            return False
        if self.tid.isid is not None and other.tid.isid is not None:
            if self.tid.isid != other.tid.isid:
                return False
        return self.all_tg_pt or other.all_tg_pt or self.rel_port == other.rel_port

    def home_nexus(self) -> Nexus | None:
        """The nexus this registration was made for (None for a format 00b TransportID)."""
        if self.tid.isid is None:
            return None
        return Nexus(self.tid.name.lower(), self.tid.isid, self.target, self.tpgt, self.rel_port)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.tid.name,
            "isid": self.tid.isid,
            "rel_port": self.rel_port,
            "all_tg_pt": self.all_tg_pt,
            "target": self.target,
            "tpgt": self.tpgt,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Registration:
        isid = d.get("isid")
        return Registration(
            key=int(d["key"]),
            tid=TransportId(str(d["name"]), None if isid is None else int(isid)),
            rel_port=int(d["rel_port"]),
            all_tg_pt=bool(d.get("all_tg_pt", False)),
            target=str(d.get("target", "")),
            tpgt=int(d.get("tpgt", 1)),
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """The persistent reservation. ``holder`` is None for all-registrants types."""

    rtype: PrType
    scope: int = 0
    holder: RegId | None = None


def _port_key(nexus: Nexus) -> PortKey:
    return (nexus.initiator.lower(), nexus.isid, nexus.rel_port)


def _cdb_field(byte: int, bit: int | None = None) -> SenseField:
    return SenseField(cdb=True, field=byte, bit=bit)


def _param_field(byte: int, bit: int | None = None) -> SenseField:
    return SenseField(cdb=False, field=byte, bit=bit)


# REPORT CAPABILITIES (SPC-5 6.16.4): CRH, SIP_C, ATP_C, PTPL_C, TMV; ALLOW
# COMMANDS 001b (TEST UNIT READY allowed through WE and EA); all six types.
CAPABILITIES = ReportCapabilities(
    rlr_c=False,
    crh=True,
    sip_c=True,
    atp_c=True,
    ptpl_c=True,
    tmv=True,
    allow_commands=0b001,
    type_mask=ReportCapabilities.mask_of(VALID_PR_TYPES),
)


_Ids = dict[RegId, None]  # an ordered set of registration identifiers
_PR_IN_HEADER = struct.Struct(">II")  # PRGENERATION, ADDITIONAL LENGTH (SPC-5 6.16.2, 6.16.5)
_FULL_STATUS_FIXED = 24  # a READ FULL STATUS descriptor before its TransportID (SPC-5 6.16.5)


def _entries_within(alloc: int, size: int) -> int:
    """How many ``size``-byte entries after the 8-byte header reach into ``alloc`` bytes."""
    return max(0, -(-(alloc - _PR_IN_HEADER.size) // size))


def _full_status_size(reg: Registration) -> int:
    return _FULL_STATUS_FIXED + len(reg.tid.encode())


class _Registry:
    """Registrations in the order they were made (READ KEYS / READ FULL STATUS
    order; a key change keeps the place), indexed by initiator port
    ``(name, ISID or None)``, by name and by key. Every lookup picks, among
    the matching registrations, the one made first, as a scan in order would."""

    __slots__ = ("_regs", "_seq", "_next", "_by_port", "_by_name", "_by_key", "full_status_length")

    def __init__(self, regs: Iterable[Registration] = ()) -> None:
        self._regs: dict[RegId, Registration] = {}
        self._seq: dict[RegId, int] = {}
        self._next = 0
        self._by_port: dict[tuple[str, int | None], _Ids] = {}
        self._by_name: dict[str, _Ids] = {}
        self._by_key: dict[int, _Ids] = {}
        self.full_status_length = 0  # READ FULL STATUS ADDITIONAL LENGTH, kept up to date
        for r in regs:
            self.put(r)

    # -- the mapping
    def __len__(self) -> int:
        return len(self._regs)

    def __bool__(self) -> bool:
        return bool(self._regs)

    def __getitem__(self, ident: RegId) -> Registration:
        return self._regs[ident]

    def values(self) -> Iterable[Registration]:
        return self._regs.values()

    def copy(self) -> _Registry:
        return _Registry(self._regs.values())

    # -- changes
    def put(self, reg: Registration) -> None:
        """Add ``reg``, or replace the registration of its identifier in place."""
        ident = reg.ident
        old = self._regs.get(ident)
        if old is None:
            self._seq[ident] = self._next
            self._next += 1
            self._by_port.setdefault((ident[0], ident[1]), {})[ident] = None
            self._by_name.setdefault(ident[0], {})[ident] = None
            self.full_status_length += _full_status_size(reg)
        else:
            self.full_status_length += _full_status_size(reg) - _full_status_size(old)
            if old.key != reg.key:
                self._unindex_key(old)
        if old is None or old.key != reg.key:
            self._by_key.setdefault(reg.key, {})[ident] = None
        self._regs[ident] = reg

    def drop(self, ident: RegId) -> None:
        reg = self._regs.pop(ident)
        del self._seq[ident]
        self.full_status_length -= _full_status_size(reg)
        _discard(self._by_port, (ident[0], ident[1]), ident)
        _discard(self._by_name, ident[0], ident)
        self._unindex_key(reg)

    def clear(self) -> None:
        for index in (self._regs, self._seq, self._by_port, self._by_name, self._by_key):
            index.clear()
        self.full_status_length = 0

    def _unindex_key(self, reg: Registration) -> None:
        _discard(self._by_key, reg.key, reg.ident)

    # -- lookups
    def _first(self, ids: Iterable[RegId], pred: Callable[[Registration], bool]) -> Registration | None:
        best: Registration | None = None
        best_seq = -1
        seq = self._seq
        for ident in ids:
            reg = self._regs[ident]
            if pred(reg) and (best is None or seq[ident] < best_seq):
                best, best_seq = reg, seq[ident]
        return best

    def of_nexus(self, nexus: Nexus) -> Registration | None:
        """The registration ``nexus`` acts under: exact ISID first, then format 00b."""
        name = nexus.initiator.lower()
        port = nexus.rel_port
        for isid in (nexus.isid, None):
            ids = self._by_port.get((name, isid))
            if ids:
                reg = self._first(ids, lambda r: r.all_tg_pt or r.rel_port == port)
                if reg is not None:
                    return reg
        return None

    def first_overlap(self, reg: Registration) -> Registration | None:
        """The first registration sharing an I_T nexus with ``reg``."""
        name = reg.tid.name.lower()
        if reg.tid.isid is None:
            ids: Iterable[RegId] = self._by_name.get(name, {})
        else:
            ids = [*self._by_port.get((name, reg.tid.isid), ()), *self._by_port.get((name, None), ())]
        return self._first(ids, reg.overlaps)

    def with_key(self, key: int) -> list[Registration]:
        """The registrations holding ``key``, in order."""
        ids = sorted(self._by_key.get(key, ()), key=self._seq.__getitem__)
        return [self._regs[i] for i in ids]


def _discard(index: dict[Any, dict[Any, Any]], where: Any, item: Any) -> None:
    """Remove ``item`` from the group ``index[where]``, and the group once empty."""
    group = index.get(where)
    if group is not None:
        group.pop(item, None)
        if not group:
            del index[where]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The persistent state before a PR OUT, restored when its save fails."""

    regs: _Registry
    resv: Reservation | None
    generation: int
    aptpl: bool
    on_disk: bool


class ReservationTable:
    """Persistent (and SCSI-2) reservation state of one logical unit."""

    def __init__(
        self,
        ua: UnitAttentionSink,
        state_path: Path | None,
        abort_tasks: Callable[[set[Nexus]], None] | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self._ua = ua
        self._state_path = Path(state_path) if state_path is not None else None
        self._abort_tasks = abort_tasks
        self._log = log if log is not None else logging.getLogger(__name__)
        self._regs = _Registry()
        self._resv: Reservation | None = None
        self._generation = 0
        self._aptpl = False
        self._scsi2: Nexus | None = None
        self._nexuses: dict[PortKey, Nexus] = {}  # every nexus seen, for unit attentions
        # the same, by initiator port and by name (for format 00b registrations)
        self._nexus_by_port: dict[tuple[str, int], dict[PortKey, Nexus]] = {}
        self._nexus_by_name: dict[str, dict[PortKey, Nexus]] = {}
        self._last_seen: Nexus | None = None  # the nexus _seen recorded last
        self._on_disk = False  # a state file exists at _state_path
        # Held back while a PR OUT runs, delivered once its state is saved.
        self._held_uas: list[tuple[Nexus, Sense]] = []
        self._held_aborts: set[Nexus] = set()
        # The SCSI target device's target ports: relative target port
        # identifier -> portal group tag (set by the logical unit; None: not
        # known, any non-zero identifier is taken).
        self.target_ports: Callable[[], Mapping[int, int]] | None = None
        if self._state_path is not None:
            self._load(self._state_path)

    # ------------------------------------------------------------ views

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def registrations(self) -> tuple[Registration, ...]:
        return tuple(self._regs.values())

    @property
    def reservation(self) -> Reservation | None:
        return self._resv

    @property
    def aptpl(self) -> bool:
        return self._aptpl

    @property
    def scsi2_holder(self) -> Nexus | None:
        return self._scsi2

    def registration_of(self, nexus: Nexus) -> Registration | None:
        """The registration ``nexus`` acts under (exact ISID first, then format 00b)."""
        return self._regs.of_nexus(nexus)

    def is_holder(self, nexus: Nexus) -> bool:
        return self._relation(nexus, self.registration_of(nexus)) is Relation.HOLDER

    # ------------------------------------------------------------ nexus events

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss: the SCSI-2 reservation it holds goes; registrations stay."""
        if self._scsi2 is not None and _port_key(self._scsi2) == _port_key(nexus):
            self._log.info("SCSI-2 reservation of %s released: I_T nexus loss", nexus)
            self._scsi2 = None
        pk = _port_key(nexus)
        if self._nexuses.pop(pk, None) is not None:
            _discard(self._nexus_by_port, (pk[0], pk[1]), pk)
            _discard(self._nexus_by_name, pk[0], pk)
        self._last_seen = None

    def reset(self) -> None:
        """LU / target reset: drops the SCSI-2 reservation, keeps persistent ones."""
        if self._scsi2 is not None:
            self._log.info("SCSI-2 reservation of %s released: reset", self._scsi2)
            self._scsi2 = None

    # ------------------------------------------------------------ conflict check

    def conflicts(self, nexus: Nexus, cdb: bytes | bytearray | memoryview) -> bool:
        """Would ``cdb`` from ``nexus`` end with RESERVATION CONFLICT? (SPC-5 5.14.2)"""
        self._seen(nexus)
        if len(cdb) == 0:
            return False
        op = cdb[0]
        if self._resv is None and self._scsi2 is None and op not in _CHECKED_WITHOUT_RESERVATION:
            # Fast path: with no reservation of either kind only PR OUT and the
            # SCSI-2 RESERVE/RELEASE commands can conflict (NO_RESERVATION table).
            return False
        if self._scsi2 is not None:
            # SPC-5 5.14.3: PR IN/OUT conflict while a SCSI-2 reservation exists.
            if op in (Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT):
                return True
            if _port_key(self._scsi2) != _port_key(nexus) and not scsi2_allowed(cdb):
                return True
        access = classify(cdb)
        if access is Access.SCSI2:
            return self._scsi2_conflict(nexus, op)
        reg = self.registration_of(nexus)
        rtype = self._resv.rtype if self._resv is not None else None
        return pr_conflicts(access, rtype, self._relation(nexus, reg))

    def _relation(self, nexus: Nexus, reg: Registration | None) -> Relation:
        if reg is None:
            return Relation.UNREGISTERED
        resv = self._resv
        if resv is not None and (resv.rtype.all_registrants or resv.holder == reg.ident):
            return Relation.HOLDER
        return Relation.REGISTERED

    # ------------------------------------------------------------ SCSI-2

    def _scsi2_conflict(self, nexus: Nexus, op: int) -> bool:
        """RESERVE/RELEASE (6/10) with compatible reservation handling (CRH=1, SPC-5 5.14.3)."""
        reserve = op in (Opcode.RESERVE_6, Opcode.RESERVE_10)
        if self._regs:
            reg = self.registration_of(nexus)
            rel = self._relation(nexus, reg)
            if reserve:
                # GOOD without effect for a PR holder, or a registrant under RO/AR;
                # RESERVATION CONFLICT otherwise.
                if rel is Relation.HOLDER:
                    return False
                resv = self._resv
                shared = resv is not None and (
                    resv.rtype.registrants_only or resv.rtype.all_registrants
                )
                return not (rel is Relation.REGISTERED and shared)
            # RELEASE: GOOD without effect from a registered nexus, else conflict.
            return rel is Relation.UNREGISTERED
        if reserve:
            # SPC-2 7.21: RESERVE while another nexus holds the reservation conflicts.
            return self._scsi2 is not None and _port_key(self._scsi2) != _port_key(nexus)
        return False  # RELEASE by a non-holder is a GOOD no-op (SPC-2 7.19)

    def reserve(self, nexus: Nexus, cdb: bytes | bytearray | memoryview) -> None:
        """RESERVE(6) / RESERVE(10)."""
        self._seen(nexus)
        if len(cdb) > 1 and cdb[0] == Opcode.RESERVE_10 and cdb[1] & 0x12:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(1))  # 3RDPTY/LONGID
        if self._scsi2_conflict(nexus, Opcode.RESERVE_6):
            raise ReservationConflict()
        if self._regs:
            return  # CRH: GOOD, but no SCSI-2 reservation next to persistent state
        if self._scsi2 is None:
            self._log.info("SCSI-2 reservation taken by %s", nexus)
        self._scsi2 = nexus

    def release(self, nexus: Nexus, cdb: bytes | bytearray | memoryview) -> None:
        """RELEASE(6) / RELEASE(10)."""
        self._seen(nexus)
        if self._scsi2_conflict(nexus, Opcode.RELEASE_6):
            raise ReservationConflict()
        if self._scsi2 is not None and _port_key(self._scsi2) == _port_key(nexus):
            self._log.info("SCSI-2 reservation released by %s", nexus)
            self._scsi2 = None

    # ------------------------------------------------------------ PR IN

    def persistent_reserve_in(self, nexus: Nexus, cdb: bytes | bytearray | memoryview) -> bytes:
        """PERSISTENT RESERVE IN: the full reply truncated to the allocation length."""
        self._seen(nexus)
        if self._scsi2 is not None:
            raise ReservationConflict()
        try:
            req = PrInCdb.decode(cdb)
        except PrDecodeError as e:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(0)) from e
        builder = self._PR_IN.get(req.action)
        if builder is None:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(1, 4))
        return builder(self, req.alloc_len)[: req.alloc_len]

    # Each builder returns at least the first ``alloc`` bytes of the full
    # reply; READ KEYS and READ FULL STATUS encode only the entries that fit
    # (their ADDITIONAL LENGTH still counts all of them, SPC-5 6.16.1), so
    # their cost follows what is returned, not how many are registered.

    def _read_keys(self, alloc: int) -> bytes:
        fit = islice(self._regs.values(), _entries_within(alloc, 8))
        body = b"".join(r.key.to_bytes(8, "big") for r in fit)
        return _PR_IN_HEADER.pack(self._generation, 8 * len(self._regs)) + body

    def _read_reservation(self, alloc: int) -> bytes:
        resv = self._resv
        if resv is None:
            return ReadReservation(self._generation).encode()
        key = 0  # all-registrants: RESERVATION KEY is zero (SPC-5 6.16.3.2)
        if resv.holder is not None:
            key = self._regs[resv.holder].key
        return ReadReservation(self._generation, key, resv.scope, resv.rtype).encode()

    def _report_capabilities(self, alloc: int) -> bytes:
        return replace(CAPABILITIES, ptpl_a=self._aptpl).encode()

    def _read_full_status(self, alloc: int) -> bytes:
        resv = self._resv
        body: list[bytes] = []
        size = _PR_IN_HEADER.size
        for reg in self._regs.values():
            if size >= alloc:
                break
            holder = resv is not None and (resv.rtype.all_registrants or resv.holder == reg.ident)
            entry = FullStatusEntry(
                key=reg.key,
                all_tg_pt=reg.all_tg_pt,
                holder=holder,
                scope=resv.scope if holder and resv is not None else 0,
                rtype=resv.rtype if holder and resv is not None else PrType.NONE,
                rel_tgt_port=reg.rel_port,
                transport_id=reg.tid,
            ).encode()
            body.append(entry)
            size += len(entry)
        header = _PR_IN_HEADER.pack(self._generation, self._regs.full_status_length)
        return header + b"".join(body)

    _PR_IN: dict[int, Callable[[ReservationTable, int], bytes]] = {
        PrInAction.READ_KEYS: _read_keys,
        PrInAction.READ_RESERVATION: _read_reservation,
        PrInAction.REPORT_CAPABILITIES: _report_capabilities,
        PrInAction.READ_FULL_STATUS: _read_full_status,
    }

    # ------------------------------------------------------------ PR OUT

    def persistent_reserve_out(
        self, nexus: Nexus, cdb: bytes | bytearray | memoryview, data: bytes | memoryview
    ) -> None:
        """PERSISTENT RESERVE OUT. Raises CheckCondition or ReservationConflict."""
        self._seen(nexus)
        if self._scsi2 is not None:
            raise ReservationConflict()  # SPC-5 5.14.3
        try:
            req = PrOutCdb.decode(cdb)
        except PrDecodeError as e:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(0)) from e
        handler = self._PR_OUT.get(req.action)
        if handler is None:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(1, 4))
        params = memoryview(bytes(data))[: req.param_len]
        if len(params) < req.param_len:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        snap = self._snapshot() if self._may_save(req.action, params) else None
        self._held_uas.clear()
        self._held_aborts.clear()
        try:
            handler(self, nexus, req, params)
        except OSError as e:
            if snap is None:
                raise
            self._restore(snap, rewrite=isinstance(e, persist.NotDurable))
            self._log.error(
                "PR OUT %s from %s not applied: cannot save the APTPL state: %s",
                PrOutAction(req.action).name,
                nexus,
                e,
            )
            raise CheckCondition(Sense.LOGICAL_UNIT_COMMUNICATION_FAILURE) from e
        except BaseException:
            if snap is not None:
                self._restore(snap)
            raise
        finally:
            uas, aborts = self._held_uas[:], set(self._held_aborts)
            self._held_uas.clear()
            self._held_aborts.clear()
        for n, sense in uas:
            self._ua.establish(n, sense)
        if aborts and self._abort_tasks is not None:
            self._abort_tasks(aborts)

    # -- fail closed: snapshot and restore around a save (SPC-5 5.14.5)

    def _may_save(self, action: int, params: memoryview) -> bool:
        """Could this PR OUT write or remove the state file?"""
        if self._state_path is None:
            return False
        if self._aptpl or self._on_disk:
            return True
        byte = _APTPL_BYTE.get(action)
        return byte is not None and len(params) > byte and bool(params[byte] & 0x01)

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(self._regs.copy(), self._resv, self._generation, self._aptpl, self._on_disk)

    def _restore(self, snap: _Snapshot, rewrite: bool = False) -> None:
        self._regs = snap.regs
        self._resv = snap.resv
        self._generation = snap.generation
        self._aptpl = snap.aptpl
        self._on_disk = snap.on_disk
        self._held_uas.clear()
        self._held_aborts.clear()
        if rewrite:
            # The new file was renamed into place (or the old one unlinked)
            # but not made durable: put the previous state back, best effort.
            self._on_disk = True
            try:
                self._write_state()
            except OSError as e:
                self._log.warning("could not restore the APTPL state file: %s", e)

    # -- parameter list parsing

    def _basic_params(self, req: PrOutCdb, mv: memoryview) -> PrOutParams:
        """Decode the basic list; SPC-5 6.17.3 length and flag rules."""
        if len(mv) < BASIC_PARAMS_LEN:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        flags = mv[SPEC_I_PT_BYTE]
        register = req.action in (
            PrOutAction.REGISTER,
            PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
        )
        if flags & 0x08 and req.action != PrOutAction.REGISTER:
            # SPEC_I_PT is only valid for REGISTER.
            raise CheckCondition(
                Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(SPEC_I_PT_BYTE, 3)
            )
        if flags & 0x04 and not register:
            # ALL_TG_PT is only valid for REGISTER and REGISTER AND IGNORE EXISTING KEY.
            raise CheckCondition(
                Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(SPEC_I_PT_BYTE, 2)
            )
        try:
            return PrOutParams.decode(mv)
        except PrLengthError as e:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR) from e
        except PrDecodeError as e:
            raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST) from e

    def _require_key(self, nexus: Nexus, rk: int) -> Registration:
        """The caller's registration; RESERVATION CONFLICT if none or RK differs."""
        reg = self.registration_of(nexus)
        if reg is None or reg.key != rk:
            raise ReservationConflict()
        return reg

    @staticmethod
    def _check_scope_type(req: PrOutCdb) -> PrType:
        if req.scope != 0:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(2, 7))
        if req.rtype not in VALID_PR_TYPES:
            raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(2, 3))
        return PrType(req.rtype)

    # -- REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-5 5.14.7)

    def _register(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        p = self._basic_params(req, mv)
        ignore = req.action == PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY
        reg = self.registration_of(nexus)
        if reg is None:
            if not ignore and p.rk != 0:
                raise ReservationConflict()
            if p.sark == 0:
                return  # GOOD, nothing registered, PRgeneration unchanged
            new = [
                Registration(
                    p.sark,
                    TransportId.of(nexus),
                    nexus.rel_port,
                    p.all_tg_pt,
                    nexus.target,
                    nexus.tpgt,
                )
            ]
            if p.spec_i_pt:
                new += self._spec_i_pt(nexus, p)
            for r in new:
                self._regs.put(r)
                self._log.info("registered %s key 0x%x", self._describe(r), r.key)
        else:
            if not ignore and p.rk != reg.key:
                raise ReservationConflict()
            if p.spec_i_pt:
                raise CheckCondition(
                    Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(SPEC_I_PT_BYTE, 3)
                )
            if p.sark == 0:
                self._unregister(nexus, reg)
            else:
                self._regs.put(replace(reg, key=p.sark))
                self._log.info("%s key 0x%x -> 0x%x", self._describe(reg), reg.key, p.sark)
        self._aptpl = p.aptpl
        self._bump()
        self._save()

    def _spec_i_pt(self, nexus: Nexus, p: PrOutParams) -> list[Registration]:
        """Registrations for the SPEC_I_PT TransportIDs: all or nothing (SPC-5 5.14.7.3)."""
        caller = Registration(p.sark, TransportId.of(nexus), nexus.rel_port, p.all_tg_pt)
        made = _Registry([caller])
        for tid in p.transport_ids:
            r = Registration(p.sark, tid, nexus.rel_port, p.all_tg_pt, nexus.target, nexus.tpgt)
            # A duplicate in the list, the caller itself, or an already registered
            # I_T nexus makes the whole list invalid.
            if self._overlap(r, made) is not None or self._overlap(r, self._regs) is not None:
                raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST)
            made.put(r)
        return list(made.values())[1:]

    def _unregister(self, nexus: Nexus, reg: Registration) -> None:
        """Remove ``reg`` at its own request (SPC-5 5.14.11.2.x)."""
        self._regs.drop(reg.ident)
        self._log.info("unregistered %s", self._describe(reg))
        resv = self._resv
        if resv is None:
            return
        if resv.rtype.all_registrants:
            if not self._regs:  # the last registrant left
                self._resv = None
                self._log.info("%s reservation ended: no registrants left", words(resv.rtype))
            return
        if resv.holder == reg.ident:
            self._resv = None
            self._log.info("%s reservation released: holder unregistered", words(resv.rtype))
            if resv.rtype.registrants_only:
                self._notify(self._regs.values(), Sense.RESERVATIONS_RELEASED, nexus)

    # -- RESERVE (SPC-5 5.14.9)

    def _reserve(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        rtype = self._check_scope_type(req)
        p = self._basic_params(req, mv)
        reg = self._require_key(nexus, p.rk)
        resv = self._resv
        if resv is not None:
            if self._relation(nexus, reg) is Relation.HOLDER:
                if resv.rtype == rtype and resv.scope == req.scope:
                    return  # same reservation again: GOOD, nothing changes
            raise ReservationConflict()
        holder = None if rtype.all_registrants else reg.ident
        self._resv = Reservation(rtype, req.scope, holder)
        self._log.info("%s reserved %s", self._describe(reg), words(rtype))
        self._save()

    # -- RELEASE (SPC-5 5.14.11.2)

    def _release(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        p = self._basic_params(req, mv)
        reg = self._require_key(nexus, p.rk)
        resv = self._resv
        if resv is None or self._relation(nexus, reg) is not Relation.HOLDER:
            return  # no reservation, or not the holder: GOOD without effect
        if int(req.rtype) != resv.rtype or req.scope != resv.scope:
            raise CheckCondition(Sense.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        self._resv = None
        self._log.info("%s released %s", self._describe(reg), words(resv.rtype))
        if resv.rtype.registrants_only or resv.rtype.all_registrants:
            self._notify(self._regs.values(), Sense.RESERVATIONS_RELEASED, nexus)
        self._save()

    # -- CLEAR (SPC-5 5.14.11.6)

    def _clear(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        p = self._basic_params(req, mv)
        self._require_key(nexus, p.rk)
        others = list(self._regs.values())
        self._regs.clear()
        self._resv = None
        self._log.info("cleared by %s: %d registrations", nexus, len(others))
        self._notify(others, Sense.RESERVATIONS_PREEMPTED, nexus)
        self._bump()
        self._save()

    # -- PREEMPT / PREEMPT AND ABORT (SPC-5 5.14.11.4, 5.14.11.5)

    def _preempt(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        """Three cases, by what SARK names:

        1. A reservation of a non-all-registrants type exists and SARK is the
           holder's key: remove every registration with that key except the
           caller's, give the caller the reservation with the CDB's type and
           scope; if they changed, the remaining registrants get 2A/04.
           (Also the migration takeover: RK = SARK = holder's key from a second
           nexus registered with that key.)
        2. An all-registrants reservation exists and SARK is 0: remove every
           registration but the caller's; the caller gets a new reservation.
        3. An all-registrants reservation exists and SARK != 0: remove every
           registration with key SARK except the caller's (every registrant
           is a holder, SPC-5 5.14.10, and a preempting holder keeps its
           registration); the reservation and its type are untouched. This
           is the takeover for all-registrants types.
        4. Otherwise (no reservation, or SARK not the holder's key): remove
           every registration with key SARK, the caller's included if it
           matches (SPC-5 5.14.11.4.4 excepts the caller only from the unit
           attention); the reservation is untouched.
        In 3 and 4, SARK = 0 -> INVALID FIELD IN PARAMETER LIST and no
        matching registration -> RESERVATION CONFLICT.
        Every nexus that lost its registration, except the caller, gets 2A/05.
        """
        p = self._basic_params(req, mv)
        reg = self._require_key(nexus, p.rk)
        resv = self._resv
        new_resv: Reservation | None = resv
        if resv is not None and not resv.rtype.all_registrants and resv.holder is not None:
            holder_key = self._regs[resv.holder].key
        else:
            holder_key = None
        if holder_key is not None and p.sark == holder_key:
            rtype = self._check_scope_type(req)
            victims = [r for r in self._with_key(p.sark) if r.ident != reg.ident]
            new_resv = Reservation(rtype, req.scope, None if rtype.all_registrants else reg.ident)
        elif resv is not None and resv.rtype.all_registrants and p.sark == 0:
            rtype = self._check_scope_type(req)
            victims = [r for r in self._regs.values() if r.ident != reg.ident]
            new_resv = Reservation(rtype, req.scope, None if rtype.all_registrants else reg.ident)
        else:
            if p.sark == 0:
                raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(8))
            keep = reg.ident if resv is not None and resv.rtype.all_registrants else None
            victims = [r for r in self._with_key(p.sark) if r.ident != keep]
            if not victims:
                raise ReservationConflict()
        for r in victims:
            self._regs.drop(r.ident)
            self._log.info("preempted %s (key 0x%x) by %s", self._describe(r), r.key, nexus)
        if new_resv is not None and new_resv is not resv:
            changed = resv is None or (resv.rtype, resv.scope) != (new_resv.rtype, new_resv.scope)
            self._resv = new_resv
            self._log.info("%s now holds %s", nexus, words(new_resv.rtype))
            if changed:
                self._notify(self._regs.values(), Sense.RESERVATIONS_RELEASED, nexus)
        elif resv is not None and resv.rtype.all_registrants and not self._regs:
            self._resv = None  # the last registrant of an all-registrants type was removed
        preempted = self._notify(victims, Sense.REGISTRATIONS_PREEMPTED, nexus)
        if req.action == PrOutAction.PREEMPT_AND_ABORT:
            self._held_aborts |= preempted  # aborted once the change is saved
        self._bump()
        self._save()

    # -- REGISTER AND MOVE (SPC-5 5.14.8)

    def _register_and_move(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        try:
            p = RegisterAndMoveParams.decode(mv)
        except PrLengthError as e:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR) from e
        except PrDecodeError as e:
            raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(24)) from e
        reg = self._require_key(nexus, p.rk)
        resv = self._resv
        if resv is None or resv.rtype.all_registrants or resv.holder != reg.ident:
            raise ReservationConflict()  # only the holder of a single-holder type moves
        if p.sark == 0:
            raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(8))
        tpgt = self._port_tpgt(nexus, p.rel_tgt_port)
        if tpgt is None:
            # SPC-5 5.14.8: the destination I_T nexus is the TransportID's
            # initiator port with the target port RELATIVE TARGET PORT
            # IDENTIFIER names; one that names no target port is invalid.
            raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(18))
        dest = Registration(p.sark, p.transport_id, p.rel_tgt_port, False, nexus.target, tpgt)
        if dest.overlaps(reg):
            # The destination must be another I_T nexus than the caller's.
            raise CheckCondition(Sense.INVALID_FIELD_IN_PARAMETER_LIST, _param_field(24))
        existing = self._overlap(dest, self._regs)
        if existing is not None:
            dest = replace(existing, key=p.sark)
        self._regs.put(dest)
        self._resv = Reservation(resv.rtype, resv.scope, dest.ident)
        if p.unreg:
            self._regs.drop(reg.ident)
        self._log.info(
            "%s moved %s to %s%s",
            self._describe(reg),
            words(resv.rtype),
            self._describe(dest),
            " and unregistered" if p.unreg else "",
        )
        self._aptpl = p.aptpl
        self._bump()
        self._save()

    def _port_tpgt(self, nexus: Nexus, rel_port: int) -> int | None:
        """The portal group tag of target port ``rel_port``; None if there is no such port."""
        if rel_port == 0:
            return None
        if rel_port == nexus.rel_port:
            return nexus.tpgt
        if self.target_ports is None:
            return nexus.tpgt
        return self.target_ports().get(rel_port)

    # -- REPLACE LOST RESERVATION (SPC-5 5.14.12)

    def _replace_lost(self, nexus: Nexus, req: PrOutCdb, mv: memoryview) -> None:
        # Persistent reservation information is never lost here (RLR_C = 0): the
        # service action is not supported in this state; no state changes.
        raise CheckCondition(Sense.INVALID_FIELD_IN_CDB, _cdb_field(1, 4))

    _PR_OUT: dict[int, Callable[[ReservationTable, Nexus, PrOutCdb, memoryview], None]] = {
        PrOutAction.REGISTER: _register,
        PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: _register,
        PrOutAction.RESERVE: _reserve,
        PrOutAction.RELEASE: _release,
        PrOutAction.CLEAR: _clear,
        PrOutAction.PREEMPT: _preempt,
        PrOutAction.PREEMPT_AND_ABORT: _preempt,
        PrOutAction.REGISTER_AND_MOVE: _register_and_move,
        PrOutAction.REPLACE_LOST_RESERVATION: _replace_lost,
    }

    # ------------------------------------------------------------ helpers

    def _seen(self, nexus: Nexus) -> None:
        # Every command passes here: the nexus recorded last is not looked
        # up again (only _seen writes an entry; nexus_lost forgets the cache).
        if nexus is not self._last_seen:
            pk = _port_key(nexus)
            self._nexuses[pk] = nexus
            self._nexus_by_port.setdefault((pk[0], pk[1]), {})[pk] = nexus
            self._nexus_by_name.setdefault(pk[0], {})[pk] = nexus
            self._last_seen = nexus

    # -- lookups through the indexes (tests/lun/test_pr_index.py checks them
    #    against scans of everything)

    def _with_key(self, key: int) -> list[Registration]:
        return self._regs.with_key(key)

    def _overlap(self, reg: Registration, among: _Registry) -> Registration | None:
        return among.first_overlap(reg)

    def _nexuses_of(self, reg: Registration) -> set[Nexus]:
        name = reg.tid.name.lower()
        if reg.tid.isid is None:
            pool = self._nexus_by_name.get(name, {})
        else:
            pool = self._nexus_by_port.get((name, reg.tid.isid), {})
        found = {n for n in pool.values() if reg.matches(n)}
        home = reg.home_nexus()
        if home is not None and not any(_port_key(n) == _port_key(home) for n in found):
            found.add(home)
        return found

    def _notify(self, regs: Iterable[Registration], sense: Sense, cause: Nexus) -> set[Nexus]:
        """Queue ``sense`` for every nexus of ``regs`` except the one that caused it."""
        targets: dict[PortKey, Nexus] = {}
        for reg in regs:
            for n in self._nexuses_of(reg):
                targets.setdefault(_port_key(n), n)
        targets.pop(_port_key(cause), None)
        # Queued once the change is saved (persistent_reserve_out).
        self._held_uas.extend((n, sense) for n in targets.values())
        return set(targets.values())

    def _bump(self) -> None:
        self._generation = (self._generation + 1) & _GEN_MASK

    @staticmethod
    def _describe(reg: Registration) -> str:
        where = "all target ports" if reg.all_tg_pt else f"port {reg.rel_port}"
        return f"{reg.tid} on {where}"

    # ------------------------------------------------------------ APTPL state

    def _state(self) -> dict[str, Any]:
        regs = list(self._regs.values())
        resv = self._resv
        resv_d: dict[str, Any] | None = None
        if resv is not None:
            holder = None
            if resv.holder is not None:
                holder = [r.ident for r in regs].index(resv.holder)
            resv_d = {"type": int(resv.rtype), "scope": resv.scope, "holder": holder}
        return {
            "version": STATE_VERSION,
            "generation": self._generation,
            "aptpl": True,
            "registrations": [r.to_dict() for r in regs],
            "reservation": resv_d,
        }

    def _save(self) -> None:
        """Persist registrations + reservation when APTPL is on; forget otherwise.

        Raises OSError when the state cannot be written (persistent_reserve_out
        then restores the state before the command)."""
        self._write_state()

    def _write_state(self) -> None:
        if self._state_path is None:
            return
        if self._aptpl:
            persist.save(self._state_path, self._state())
            self._on_disk = True
        elif self._on_disk:
            persist.remove(self._state_path)
            self._on_disk = False

    def _load(self, path: Path) -> None:
        state = persist.load(path)
        if state is None:
            return
        self._on_disk = True
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {state.get('version')!r}")
            regs = [Registration.from_dict(d) for d in state.get("registrations", [])]
            resv_d = state.get("reservation")
            resv = None
            if resv_d is not None:
                rtype = PrType(int(resv_d["type"]))
                if rtype not in VALID_PR_TYPES:
                    raise ValueError("reservation type 0")
                holder_ix = resv_d.get("holder")
                holder = None if holder_ix is None else regs[int(holder_ix)].ident
                if holder is None and not rtype.all_registrants:
                    raise ValueError("reservation without a holder")
                resv = Reservation(rtype, int(resv_d.get("scope", 0)), holder)
            generation = int(state.get("generation", 0)) & _GEN_MASK
        except (KeyError, ValueError, TypeError, IndexError, PrDecodeError) as e:
            raise persist.PersistError(f"{path}: bad PR state: {e}") from e
        self._regs = _Registry(regs)
        self._resv = resv
        self._generation = generation
        self._aptpl = True
        self._log.info(
            "restored %d registrations%s from %s (APTPL)",
            len(regs),
            f", {words(resv.rtype)} reservation" if resv else "",
            path,
        )
