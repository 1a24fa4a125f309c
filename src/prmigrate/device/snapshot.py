"""What the migration stream carries about one device.

One ``DeviceSnapshot`` for the device and the stream (``migration/stream.py``
encodes it as its ``device``, ``device/identity``, ``device/pr`` and
``device/ua`` sections). ``config`` and ``identity`` are the dicts of
``DeviceConfig`` and ``DeviceIdentity``, validated by their owners'
``from_dict`` when read back (``device_config()`` / ``device_identity()``);
``ua`` maps a guest to the unit attentions the device owes it as (ASC, ASCQ),
oldest first (all of sense key UNIT ATTENTION, SPC-5 5.14).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import DeviceConfig
from .identity import DeviceIdentity
from .state import DevicePrState


class SnapshotError(ValueError):
    """A snapshot's config or identity does not describe a valid device."""


@dataclass(frozen=True, slots=True, eq=True)
class DeviceSnapshot:
    """Everything the stream carries about one device. ``error``: the
    exception a bad config or identity raises (the stream's decoder gives
    its own, so the refusal speaks of the stream's section)."""

    name: str
    config: Mapping[str, Any]
    identity: Mapping[str, Any]
    pr: DevicePrState = field(default_factory=DevicePrState)
    ua: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    error: type[Exception] = field(default=SnapshotError, compare=False, repr=False)

    __hash__ = None  # type: ignore[assignment]  # holds dicts

    @staticmethod
    def build(
        config: Any,
        identity: Any,
        pr: DevicePrState | None = None,
        ua: Mapping[str, Sequence[Any]] | None = None,
    ) -> DeviceSnapshot:
        """From a ``DeviceConfig``, a ``DeviceIdentity`` (anything with
        ``to_dict()``), the tracked PR state, and per-guest pending unit
        attentions given as ``scsi.sense.Sense`` members, (key, ASC, ASCQ)
        or (ASC, ASCQ)."""
        cfg = config.to_dict()
        pairs: dict[str, tuple[tuple[int, int], ...]] = {}
        for guest, items in (ua or {}).items():
            out = []
            for item in items:
                value = getattr(item, "value", item)  # Sense -> (key, asc, ascq)
                out.append((int(value[-2]), int(value[-1])))
            if out:
                pairs[guest.lower()] = tuple(out)
        return DeviceSnapshot(
            str(cfg["name"]), cfg, identity.to_dict(), pr.copy() if pr is not None else DevicePrState(), pairs
        )

    def device_config(self) -> DeviceConfig:
        try:
            return DeviceConfig.from_dict(dict(self.config))
        except ValueError as e:
            raise self.error(f"device[{self.name}]: {e}") from e

    def device_identity(self) -> DeviceIdentity:
        try:
            return DeviceIdentity.from_dict(dict(self.identity))
        except ValueError as e:
            raise self.error(f"device/identity[{self.name}]: {e}") from e


__all__ = ["DeviceSnapshot", "SnapshotError"]
