"""The device's one exception."""

from __future__ import annotations


class DeviceError(Exception):
    """A device operation failed (backend unreachable or refusing, closed
    device, a LUN that is not the device's...)."""


__all__ = ["DeviceError"]
