"""The asyncio shell of the migration channel (migration/transport.py), on
real loopback sockets: handshake identities, a message each way, refusal of
a wrong secret, who is told when the link ends; and its small codecs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from prmigrate.migration.channel import Ack, Authenticated, MsgType, Resume, Role
from prmigrate.migration.errors import AuthenticationFailed
from prmigrate.migration.transport import (
    ChannelLink,
    decode_peer_id,
    encode_peer_id,
    new_channel,
    parse_address,
)

from .service_rig import run

SECRET = b"cluster-secret-0123456789"


def test_peer_id_round_trip_and_bound() -> None:
    assert decode_peer_id(encode_peer_id("hosta", "iqn.x:hosta")) == ("hosta", "iqn.x:hosta")
    assert decode_peer_id(encode_peer_id("hostb", "127.0.0.3:3260")) == ("hostb", "127.0.0.3:3260")
    assert decode_peer_id(encode_peer_id("h", "a|b")) == ("h", "a|b")  # the first | splits
    assert decode_peer_id(None) == ("", "")
    assert decode_peer_id("bare") == ("bare", "")
    assert len(encode_peer_id("h" * 300, "d")) == 255


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.3:4444", ("127.0.0.3", 4444)), (" host:1 ", ("host", 1)), ("[::1]:3260", ("::1", 3260))],
)
def test_parse_address(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["host", ":3260", "host:", "host:0", "host:65536", "host:x1"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(text)


class Side:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.lost: list[tuple[str, Exception | None]] = []
        self.changed = asyncio.Event()

    def on_event(self, ev: Any) -> None:
        self.events.append(ev)
        self.changed.set()

    def on_lost(self, detail: str, error: Exception | None) -> None:
        self.lost.append((detail, error))
        self.changed.set()

    async def until(self, cond: Callable[[], bool]) -> None:
        async def wait() -> None:
            while not cond():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), 5)


async def _pair(client_secret: bytes = SECRET) -> tuple[ChannelLink, Side, list[ChannelLink], Side, Any]:
    server_side = Side()
    server_links: list[ChannelLink] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chan = new_channel(Role.SERVER, SECRET, encode_peer_id("hostb", "127.0.0.3:3260"))
        link = ChannelLink(reader, writer, chan, server_side.on_event, server_side.on_lost)
        server_links.append(link)
        link.start()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    reader, writer = await asyncio.open_connection(host, port)
    chan = new_channel(Role.CLIENT, client_secret, encode_peer_id("hosta", "iqn.x:hosta"))
    chan.start()
    client_side = Side()
    client = ChannelLink(reader, writer, chan, client_side.on_event, client_side.on_lost)
    client.start()
    return client, client_side, server_links, server_side, server


async def _stop(server: Any, *links: ChannelLink) -> None:
    for link in links:
        link.close()
    server.close()
    await server.wait_closed()


@run(20)
async def test_handshake_then_a_message_each_way() -> None:
    client, cs, links, ss, server = await _pair()
    try:
        await cs.until(lambda: bool(cs.events))
        await ss.until(lambda: bool(ss.events))
        assert isinstance(cs.events[0], Authenticated)
        assert decode_peer_id(cs.events[0].peer_id) == ("hostb", "127.0.0.3:3260")
        assert isinstance(ss.events[0], Authenticated)
        assert decode_peer_id(ss.events[0].peer_id) == ("hosta", "iqn.x:hosta")
        assert client.is_open and links[0].is_open
        assert client.send(Resume())
        await ss.until(lambda: len(ss.events) == 2)
        assert ss.events[1] == Resume()
        assert links[0].send(Ack(MsgType.RESUME, preempted=True))
        await cs.until(lambda: len(cs.events) == 2)
        assert cs.events[1] == Ack(MsgType.RESUME, preempted=True)
        # our own close(): no on_lost here, the peer is told the link ended
        client.close()
        assert not client.is_open and not client.send(Resume())
        await ss.until(lambda: bool(ss.lost))
        assert cs.lost == []
        assert ss.lost[0][1] is None and "closed the connection" in ss.lost[0][0]
    finally:
        await _stop(server, client, *links)


@run(20)
async def test_a_wrong_secret_is_refused_on_both_sides() -> None:
    client, cs, links, ss, server = await _pair(client_secret=b"another-secret-0123456789")
    try:
        await cs.until(lambda: bool(cs.lost))
        await ss.until(lambda: bool(ss.lost))
        assert cs.events == [] and ss.events == []
        errors = [e for _, e in cs.lost + ss.lost]
        assert any(isinstance(e, AuthenticationFailed) for e in errors)
        assert len(cs.lost) == 1 and len(ss.lost) == 1  # exactly once each
        assert not client.is_open
    finally:
        await _stop(server, client, *links)


@run(20)
async def test_a_cut_connection_is_reported_once() -> None:
    client, cs, links, ss, server = await _pair()
    try:
        await cs.until(lambda: bool(cs.events))
        await ss.until(lambda: bool(ss.events))
        links[0].abort()
        await cs.until(lambda: bool(cs.lost))
        await asyncio.sleep(0.05)
        assert len(cs.lost) == 1 and cs.lost[0][1] is None
        assert ss.lost == []  # abort() is the server's own doing
    finally:
        await _stop(server, client, *links)
