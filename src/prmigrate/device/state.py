"""Tracked persistent-reservation state of one guest on one device.

This is what snooping maintains, what the journal persists and what the
migration stream carries. Pure data; the device package owns the rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..scsi.constants import PrType
from ..scsi.vocabulary import format_key, words


@dataclass(frozen=True, slots=True)
class GuestPrState:
    """PR state of one guest initiator, as seen through its backend nexus."""

    key: int = 0  # registered reservation key, 0 = not registered
    aptpl: bool = False
    holder: bool = False  # this guest's nexus holds the reservation
    rtype: PrType = PrType.NONE  # type of the reservation it holds
    scope: int = 0

    @property
    def registered(self) -> bool:
        return self.key != 0

    @property
    def empty(self) -> bool:
        return self.key == 0 and not self.holder

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["rtype"] = int(self.rtype)
        return d

    def printed(self) -> dict[str, object]:
        """``to_dict`` in the vocabulary's printed forms (events, outputs):
        the key as ``0x123abc``, the type in sg_persist's words (None when
        not a holder). The stored layout stays ``to_dict``'s."""
        d = asdict(self)
        d["key"] = format_key(self.key)
        d["rtype"] = words(self.rtype) if self.holder else None
        return d

    @staticmethod
    def from_dict(d: dict[str, object]) -> GuestPrState:
        """Inverse of ``to_dict``; anything malformed is a ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError("PR state of a guest must be a mapping")
        key, scope = _int_field(d, "key", 1 << 64), _int_field(d, "scope", 16)
        return GuestPrState(
            key=key,
            aptpl=bool(d.get("aptpl", False)),
            holder=bool(d.get("holder", False)),
            rtype=PrType(_int_field(d, "rtype", 16)),
            scope=scope,
        )


def _int_field(d: dict[str, object], name: str, limit: int) -> int:
    v = d.get(name, 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < limit:
        raise ValueError(f"PR state: {name} must be an integer in [0, {limit}), not {v!r}")
    return v


@dataclass(slots=True)
class DevicePrState:
    """All guests' PR state on one device, keyed by guest initiator name."""

    guests: dict[str, GuestPrState] = field(default_factory=dict)
    generation: int | None = None  # backend PRgeneration when last verified
    # Guests whose tracked state may be stale (a unit attention, a PREEMPT
    # whose outcome depends on others...) until a READ FULL STATUS or READ
    # RESERVATION confirms it. Carried by the migration stream so that the
    # destination verifies before it acts on the state.
    unverified: set[str] = field(default_factory=set)

    def get(self, guest: str) -> GuestPrState:
        return self.guests.get(guest.lower(), GuestPrState())

    def set(self, guest: str, state: GuestPrState) -> None:
        if state.empty:
            self.guests.pop(guest.lower(), None)
        else:
            self.guests[guest.lower()] = state

    @property
    def has_state(self) -> bool:
        return any(not g.empty for g in self.guests.values())

    @property
    def verified(self) -> bool:
        return not self.unverified

    def mark_unverified(self, guest: str) -> None:
        self.unverified.add(guest.lower())

    def mark_verified(self, guest: str) -> None:
        self.unverified.discard(guest.lower())

    def copy(self) -> DevicePrState:
        """An independent copy (``GuestPrState`` values are immutable)."""
        return DevicePrState(dict(self.guests), self.generation, set(self.unverified))

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "guests": {k: v.to_dict() for k, v in sorted(self.guests.items())},
            "generation": self.generation,
        }
        if self.unverified:  # omitted when empty: readers of the first layout still agree
            d["unverified"] = sorted(self.unverified)
        return d

    @staticmethod
    def from_dict(d: dict[str, object]) -> DevicePrState:
        guests = d.get("guests", {})
        if not isinstance(guests, dict):
            raise ValueError("PR state: 'guests' must be a mapping")
        gen = d.get("generation")
        unverified = d.get("unverified", [])
        if not isinstance(unverified, list | tuple | set | frozenset):
            raise ValueError("PR state: 'unverified' must be a list of guest names")
        return DevicePrState(
            {str(k).lower(): GuestPrState.from_dict(v) for k, v in guests.items()},
            None if gen is None else int(gen),  # type: ignore[call-overload]
            {str(g).lower() for g in unverified},
        )


@dataclass(frozen=True, slots=True)
class StateChange:
    """One guest's tracked state changed, and why (one log line each)."""

    guest: str
    before: GuestPrState
    after: GuestPrState
    reason: str

    def describe(self) -> str:
        return f"{self.guest}: {describe_guest(self.before)} -> {describe_guest(self.after)} ({self.reason})"


def describe_guest(s: GuestPrState) -> str:
    if s.empty:
        return "unregistered"
    text = f"key 0x{s.key:x}" + (" aptpl" if s.aptpl else "")
    if s.holder:
        text += f", holds {words(s.rtype)}" + (f" scope {s.scope}" if s.scope else "")
    return text
