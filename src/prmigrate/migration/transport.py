"""asyncio TCP shell around the sans-IO ``Channel`` (channel.py).

Only moves bytes: every chunk read is fed to ``Channel.receive_data``, what
``Channel.data_to_send`` returns is written at once (also after an error, so
a peer is told nothing more than the channel decided), and the channel's
events go to the owner's callbacks, in order:

    link = ChannelLink(reader, writer, channel, on_event, on_lost)
    link.start()          # reads until EOF or a channel error
    link.send(message)    # seal and write
    link.close()

``on_event(ev)`` receives ``Authenticated`` and protocol ``Message`` objects;
``on_lost(detail, error)`` is called exactly once when the link ends for any
reason other than our own ``close()`` (``error`` is the ``ChannelError`` when
the channel refused the peer's bytes, e.g. ``AuthenticationFailed``).

The handshake's identities carry a little routing data (they are covered by
both proofs, so they are as authentic as the messages): the client sends
``host-name|initiator-name`` (the destination uses the source's initiator name
to find the source's registrations in READ FULL STATUS) and the server
``host-name|frontend-host:port`` (the portal the source redirects the guest to).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from .channel import Authenticated, Channel, Message, Role
from .errors import ChannelError

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16


def encode_peer_id(name: str, detail: str) -> str:
    return f"{name}|{detail}"[:255]


def decode_peer_id(peer_id: str | None) -> tuple[str, str]:
    name, _, detail = (peer_id or "").partition("|")
    return name, detail


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) -> (host, port); ValueError otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def new_channel(role: Role, secret: bytes, local_id: str) -> Channel:
    return Channel(role, secret, os.urandom(32), local_id)


class ChannelLink:
    """One TCP connection carrying one ``Channel``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: Channel,
        on_event: Callable[[Authenticated | Message], Any],
        on_lost: Callable[[str, Exception | None], Any],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.channel = channel
        self.on_event = on_event
        self.on_lost = on_lost
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self.flush()
        self._task = asyncio.ensure_future(self._read_loop())

    @property
    def is_open(self) -> bool:
        return not self._closed and self.channel.is_open

    def flush(self) -> None:
        out = self.channel.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    def send(self, msg: Message) -> bool:
        """Seal and write ``msg``; False when the channel is no longer open."""
        if self._closed or not self.channel.is_open:
            return False
        try:
            self.channel.send(msg)
        except ChannelError as e:
            log.warning("cannot send %s to %s: %s", msg.TYPE.name, self.peer, e)
            return False
        self.flush()
        return True

    def close(self) -> None:
        """End the link (buffered bytes are still written); ``on_lost`` is not called."""
        if self._closed:
            return
        self._closed = True
        self.channel.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()

    def abort(self) -> None:
        """Drop the connection at once (tests: a cut link)."""
        transport = self.writer.transport
        self.close()
        transport.abort()

    def _lost(self, detail: str, error: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.channel.close()
        with contextlib.suppress(Exception):
            self.writer.close()
        self.on_lost(detail, error)

    async def _read_loop(self) -> None:
        try:
            while not self._closed:
                try:
                    data = await self.reader.read(READ_CHUNK)
                except (ConnectionError, OSError) as e:
                    self._lost(f"connection to {self.peer} failed: {e}", None)
                    return
                if not data:
                    self._lost(f"{self.peer} closed the connection", None)
                    return
                try:
                    events = self.channel.receive_data(data)
                except ChannelError as e:
                    self.flush()
                    self._lost(f"{type(e).__name__}: {e}", e)
                    return
                self.flush()
                for ev in events:
                    if self._closed:
                        return
                    self.on_event(ev)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # an owner's bug must not leave the peer hanging
            log.exception("channel link to %s failed", self.peer)
            self._lost(f"internal error: {e}", None)
