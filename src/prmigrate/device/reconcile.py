"""Bring the tracked PR state in line with what the backend says.

Snooping only sees the guest's own PR OUTs (docs/limitations.md, 2): another
initiator may preempt the guest, clear the LUN, or someone may take a
reservation on the device's own nexus outside the guest. Reconciling reads
the backend's view and rewrites the tracked state from it. Pure functions:
the shell issues the PR INs and passes the decoded answers in.

READ FULL STATUS (SPC-5 6.16.5) lists every registration with its
TransportID, so filtered by the device's own backend initiator ports it says
exactly which registration and which reservation belong to which guest:

* a guest whose port has no entry lost its registration (preempted, cleared);
* an entry on a guest's port is that guest's registration, whatever the
  snooper thought: its key is adopted, and so is an R_HOLDER bit (a
  reservation taken on the device's nexus outside the guest now migrates);
* a format 00b (name only) entry names every port of that initiator, so it
  applies to each of the device's ports with that name.

READ KEYS + READ RESERVATION (for targets without READ FULL STATUS, like tgt)
list keys without nexuses. What can be told:

* a tracked key absent from READ KEYS is not registered on any nexus: dropped;
* no reservation: nobody holds one;
* an all-registrants reservation is held by every registered nexus;
* a non-AR reservation whose key differs from a guest's key is not that
  guest's.

What cannot (returned as ``Unknown``, state kept as tracked):

* whether a key present in READ KEYS is registered on the guest's nexus or on
  another initiator's with the same key (``KEY_OWNER``). During a migration
  source and destination register the same key, so this is real;
* whether a non-AR reservation carrying the guest's key is held by the
  guest's nexus (``RESERVATION_OWNER``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from ..scsi.constants import PrType
from ..scsi.pr import FullStatusEntry, ReadFullStatus, ReadKeys, ReadReservation
from ..scsi.transport_id import TransportId
from ..scsi.vocabulary import words
from .state import DevicePrState, GuestPrState, StateChange


class ReconcileError(ValueError):
    """The backend's answer cannot be reconciled against (e.g. truncated)."""


class UnknownKind(Enum):
    KEY_OWNER = "cannot tell on which nexus the key is registered"
    RESERVATION_OWNER = "cannot tell which nexus holds the reservation carrying this key"


@dataclass(frozen=True, slots=True)
class Unknown:
    guest: str
    kind: UnknownKind
    detail: str = ""

    def describe(self) -> str:
        return f"{self.guest}: {self.kind.value}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, slots=True)
class KeysReconcile:
    state: DevicePrState
    changes: tuple[StateChange, ...]
    unknown: tuple[Unknown, ...]

    def undetermined(self, kinds: frozenset[UnknownKind] | None = None) -> frozenset[str]:
        """Guests with an unknown of ``kinds`` (default: every kind)."""
        return frozenset(u.guest for u in self.unknown if kinds is None or u.kind in kinds)


def _rtype(value: PrType | int) -> PrType:
    try:
        return PrType(int(value))
    except ValueError:
        return PrType.NONE


def _changes(
    before: DevicePrState, after: DevicePrState, reasons: Mapping[str, str]
) -> tuple[StateChange, ...]:
    out = []
    for guest in sorted(set(before.guests) | set(after.guests)):
        b, a = before.get(guest), after.get(guest)
        if a != b:
            out.append(StateChange(guest, b, a, reasons.get(guest) or _why(b, a)))
    return tuple(out)


def _why(b: GuestPrState, a: GuestPrState) -> str:
    if b.registered and not a.registered:
        return "registration gone from the backend (preempted or cleared by another initiator)"
    if not b.registered and a.registered:
        return "registration found on the device's nexus (made outside the guest)"
    if a.holder and not b.holder:
        return "reservation found on the device's nexus (adopted)"
    if b.holder and not a.holder:
        return "reservation no longer held (preempted or released by another initiator)"
    if a.key != b.key:
        return "key differs on the backend"
    return "reservation type or scope differs on the backend"


def _entries(
    entries: ReadFullStatus | Iterable[FullStatusEntry],
) -> tuple[tuple[FullStatusEntry, ...], int | None]:
    if isinstance(entries, ReadFullStatus):
        if entries.truncated:
            raise ReconcileError(
                "READ FULL STATUS answer truncated: re-issue with a larger allocation length"
            )
        return entries.entries, entries.generation
    return tuple(entries), None


def _port_matches(entry_tid: TransportId, ours: TransportId) -> bool:
    if entry_tid.name.lower() != ours.name.lower():
        return False
    # A format 00b TransportID names every initiator port of that initiator.
    return entry_tid.isid is None or ours.isid is None or entry_tid.isid == ours.isid


def guest_from_entries(old: GuestPrState, mine: list[FullStatusEntry]) -> GuestPrState:
    """A guest's state from the full-status entries on its port (several when
    registered through more than one target port, ALL_TG_PT)."""
    if not mine:
        return GuestPrState()
    holders = [e for e in mine if e.holder]
    e = holders[0] if holders else mine[0]
    aptpl = old.aptpl if old.key == e.key else False  # READ FULL STATUS does not report APTPL
    if e.holder:
        return GuestPrState(e.key, aptpl, True, _rtype(e.rtype), e.scope)
    return GuestPrState(e.key, aptpl)


def reconcile_full_status(
    state: DevicePrState,
    entries: ReadFullStatus | Iterable[FullStatusEntry],
    nexus_ids: Mapping[str, TransportId],
    path_ids: Mapping[str, tuple[TransportId, ...]] | None = None,
) -> tuple[DevicePrState, list[StateChange]]:
    """The state the backend's READ FULL STATUS implies for the guests in
    ``nexus_ids`` (state key -> the guest's backend initiator port; with
    ``path_ids``, a multipath device's, the guest's other paths' ports, whose
    entries are the guest's too). Guests
    of ``state`` not in ``nexus_ids`` are kept as they are. Those in it are
    verified afterwards; the generation is taken from a ``ReadFullStatus``."""
    ents, generation = _entries(entries)
    new = state.copy()
    for guest, tid in nexus_ids.items():
        key = guest.lower()
        ports = (tid, *(path_ids or {}).get(key, ()))
        mine = [e for e in ents if any(_port_matches(e.transport_id, p) for p in ports)]
        new.set(key, guest_from_entries(state.get(key), mine))
        new.mark_verified(key)
    if generation is not None:
        new.generation = generation
    return new, list(_changes(state, new, {}))


def reconcile_keys(
    state: DevicePrState,
    read_keys: ReadKeys,
    read_reservation: ReadReservation,
) -> KeysReconcile:
    """Best effort without READ FULL STATUS (see the module docstring). Only
    what READ KEYS / READ RESERVATION prove is changed; the rest is kept and
    listed in ``unknown``. Guests left without a ``RESERVATION_OWNER``
    unknown are marked verified (the ``KEY_OWNER`` doubt never goes away)."""
    if read_keys.truncated:
        raise ReconcileError("READ KEYS answer truncated: re-issue with a larger allocation length")
    keys = set(read_keys.keys)
    new = state.copy()
    unknown: list[Unknown] = []
    reasons: dict[str, str] = {}
    rr = read_reservation
    rtype = _rtype(rr.rtype)
    registered = {g: s for g, s in state.guests.items() if s.key in keys}
    for guest, cur in state.guests.items():
        if guest not in registered:
            new.set(guest, GuestPrState())
            reasons[guest] = f"key 0x{cur.key:x} no longer registered (READ KEYS)"
            new.mark_verified(guest)
            continue
        unknown.append(Unknown(guest, UnknownKind.KEY_OWNER, f"key 0x{cur.key:x}"))
        if rr.key is None:
            nxt = GuestPrState(cur.key, cur.aptpl)
        elif rtype.all_registrants:
            # SPC-5 5.14.10: every registered nexus holds an all-registrants reservation.
            nxt = GuestPrState(cur.key, cur.aptpl, True, rtype, rr.scope)
        elif rr.key != cur.key:
            nxt = GuestPrState(cur.key, cur.aptpl)
        else:
            same_key = [g for g, s in registered.items() if s.key == cur.key]
            if cur.holder and len(same_key) == 1:
                nxt = GuestPrState(cur.key, cur.aptpl, True, rtype, rr.scope)
            else:
                nxt = cur
                unknown.append(
                    Unknown(
                        guest,
                        UnknownKind.RESERVATION_OWNER,
                        f"{words(rtype)} reservation with key 0x{cur.key:x}",
                    )
                )
        new.set(guest, nxt)
    open_question = {u.guest for u in unknown if u.kind is UnknownKind.RESERVATION_OWNER}
    for guest in set(state.guests) | state.unverified:
        if guest not in open_question:
            new.mark_verified(guest)
    new.generation = read_keys.generation
    return KeysReconcile(new, _changes(state, new, reasons), tuple(unknown))
