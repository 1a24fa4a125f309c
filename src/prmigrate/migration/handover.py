"""What a migration needs of the host it runs in: the ``Handover`` contract.

The migration runners and the service (``runner.py``, ``source_runner.py``,
``destination_runner.py``, ``service.py``) reach the host daemon only
through this ``Protocol``; ``host/daemon.py`` implements it. Nothing in
``migration/`` imports ``host/``: the host is above the migration, which
sees the devices (``device/``) and the frontend node names, never the
target's node table.

Source side: redirect the logins to the device's frontend node and ask its
guest sessions to log out (RFC 7143 11.9.1, Async Message event 1), drop
those left, record that the device moved away, drop the device. Destination
side: create the migrated device without publishing it, publish it (in place
of a redirect an earlier move away left), drop an aborted copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..device.config import DeviceConfig
    from ..device.identity import DeviceIdentity
    from ..device.passthrough import PassthroughDevice


class Handover(Protocol):
    """The host daemon as a migration sees it."""

    name: str  # the host's name (carried by the channel handshake)
    initiator: str  # the host's iSCSI initiator name (its backend nexuses)
    devices: dict[str, PassthroughDevice]
    listening: list[tuple[str, int]]  # the guest frontend portals

    @property
    def state_dir(self) -> Path | None:
        """Where journals and migration markers live (None: nowhere)."""
        ...

    def configured_devices(self) -> set[str]:
        """The names of the devices of the host's configuration."""
        ...

    def emit(self, event: dict[str, Any]) -> None:
        """Publish an event (``{"event": NAME, ...}``)."""
        ...

    def add_listener(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        ...

    def frontend_node(self, config: DeviceConfig) -> str:
        """The guest-facing target node name of a device."""
        ...

    # -- destination
    def node_redirects(self, node: str) -> bool | None:
        """None: no such node here; True: a redirect an earlier move away
        left; False: a node serving a device."""
        ...

    async def add_incoming_device(self, config: DeviceConfig, identity: DeviceIdentity) -> PassthroughDevice:
        """Create and start a migrated device without publishing it; a
        redirect node of the same name stays in place."""
        ...

    def adopt_incoming(self, config: DeviceConfig) -> PassthroughDevice | None:
        """The incoming device (``incoming-from=``, ``pull.py``) a migration
        of ``config`` arrives into, marked as taken; None when there is none."""
        ...

    def release_incoming(self, dev: PassthroughDevice) -> None:
        """The migration into an adopted incoming device was aborted: it
        stays incoming, with no PR state of the guest."""
        ...

    def serve(self, name: str) -> None:
        """Publish the device's frontend node, replacing a redirect."""
        ...

    async def drop_device(self, dev: PassthroughDevice) -> None:
        """Remove a device that moved away (or an aborted incoming copy):
        backend sessions closed, journal removed, the frontend node left as
        it is (a redirect stays)."""
        ...

    # -- source
    def redirect_logins(self, node: str, host: str, port: int, logout_wait: int,
                        reconnect_wait: int | None = None) -> int | None:
        """Answer every login to ``node`` with a redirect to ``host:port``
        (same TPGT) and ask its sessions to log out within ``logout_wait``
        seconds, then (``reconnect_wait`` given) to log in again after that
        many seconds rather than after DefaultTime2Wait (Async event 3,
        RFC 7143 11.9.1); the number of sessions asked, None when there is
        no node."""
        ...

    def guest_sessions(self, node: str) -> int:
        """How many sessions ``node`` still has."""
        ...

    def drop_guest_sessions(self, node: str) -> int:
        """Drop ``node``'s sessions; how many there were."""
        ...

    def record_moved_away(self, name: str, node: str, host: str, port: int) -> None:
        """The device moved to ``host:port``: its node keeps redirecting
        (serving no LU), after a restart too."""
        ...

    def remove_node(self, node: str) -> bool:
        """Withdraw ``node``; False when there was none."""
        ...
