"""Tracked persistent-reservation state of one guest on one device.

This is what snooping maintains, what the journal persists and what the
migration stream carries. Pure data; the device package owns the rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..scsi.constants import PrType


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

    @staticmethod
    def from_dict(d: dict[str, object]) -> GuestPrState:
        return GuestPrState(
            key=int(d.get("key", 0)),  # type: ignore[call-overload]
            aptpl=bool(d.get("aptpl", False)),
            holder=bool(d.get("holder", False)),
            rtype=PrType(int(d.get("rtype", 0))),  # type: ignore[call-overload]
            scope=int(d.get("scope", 0)),  # type: ignore[call-overload]
        )


@dataclass(slots=True)
class DevicePrState:
    """All guests' PR state on one device, keyed by guest initiator name."""

    guests: dict[str, GuestPrState] = field(default_factory=dict)
    generation: int | None = None  # backend PRgeneration when last verified

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

    def to_dict(self) -> dict[str, object]:
        return {
            "guests": {k: v.to_dict() for k, v in sorted(self.guests.items())},
            "generation": self.generation,
        }

    @staticmethod
    def from_dict(d: dict[str, object]) -> DevicePrState:
        guests = d.get("guests", {})
        if not isinstance(guests, dict):
            raise ValueError("PR state: 'guests' must be a mapping")
        gen = d.get("generation")
        return DevicePrState(
            {str(k).lower(): GuestPrState.from_dict(v) for k, v in guests.items()},
            None if gen is None else int(gen),  # type: ignore[call-overload]
        )
