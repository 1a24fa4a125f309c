"""TLS under the migration channel (transport.py), in process over loopback.

Certificates from the ``openssl`` command line (tests/interop/test_migration_tls.py's
helpers). The channel's own handshake runs inside TLS and authenticates;
a certificate from another CA, a peer without TLS and an incomplete
directory are refused with the reasons an operator reads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from prmigrate.migration.channel import Ack, Authenticated, MsgType, Role
from prmigrate.migration.transport import (
    ChannelLink,
    TlsError,
    TlsRefused,
    accept_tls,
    load_tls_dir,
    new_channel,
    open_connection,
)

from ..interop.test_migration_tls import _need_openssl, make_ca, tls_dir

SECRET = b"cluster-secret-0123456789"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    _need_openssl()
    root = tmp_path_factory.mktemp("tls")
    ca = make_ca(root / "ca", "unit-ca")
    rogue = make_ca(root / "rogue", "other-ca")
    return {"a": tls_dir(root / "a", ca, "a"), "b": tls_dir(root / "b", ca, "b"),
            "rogue": tls_dir(root / "r", ca, "r", server_ca=rogue, client_ca=rogue)}


async def _serve(server_dir: Path | None) -> tuple[asyncio.base_events.Server, int, asyncio.Queue[Any]]:
    tls = load_tls_dir(server_dir) if server_dir is not None else None
    events: asyncio.Queue[Any] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refused = await accept_tls(writer, tls)
        if refused is not None:
            await events.put(("refused", refused))
            return
        chan = new_channel(Role.SERVER, SECRET, "server")
        link = ChannelLink(reader, writer, chan, lambda ev: events.put_nowait(("event", ev)),
                           lambda detail, error: events.put_nowait(("lost", detail)))
        link.start()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], events


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_channel_authenticates_inside_tls(dirs: dict[str, Path]) -> None:
    async def go() -> None:
        server, port, events = await _serve(dirs["b"])
        try:
            reader, writer = await open_connection("127.0.0.1", port, load_tls_dir(dirs["a"]))
            assert writer.get_extra_info("ssl_object") is not None
            assert writer.get_extra_info("peercert") is not None  # the server's, verified
            got: asyncio.Queue[Any] = asyncio.Queue()
            chan = new_channel(Role.CLIENT, SECRET, "client")
            chan.start()
            link = ChannelLink(reader, writer, chan, got.put_nowait, lambda d, e: got.put_nowait(("lost", d)))
            link.start()
            ev = await got.get()
            assert isinstance(ev, Authenticated) and ev.peer_id == "server"
            kind, ev = await events.get()
            assert kind == "event" and isinstance(ev, Authenticated) and ev.peer_id == "client"
            assert link.send(Ack(MsgType.RESUME))
            kind, ev = await events.get()
            assert kind == "event" and ev == Ack(MsgType.RESUME)
            link.close()
        finally:
            server.close()
            await server.wait_closed()

    _run(go())


def test_server_certificate_from_another_ca_is_refused(dirs: dict[str, Path]) -> None:
    async def go() -> None:
        server, port, events = await _serve(dirs["rogue"])
        try:
            with pytest.raises(TlsRefused, match=r"TLS: the peer's certificate is not trusted \(unable to get"):
                await open_connection("127.0.0.1", port, load_tls_dir(dirs["a"]))
            kind, reason = await events.get()
            assert kind == "refused" and reason.startswith("TLS: the peer closed the connection during the "
                                                           "handshake (it may not trust our certificate")
        finally:
            server.close()
            await server.wait_closed()

    _run(go())


def test_client_certificate_from_another_ca_is_refused(dirs: dict[str, Path]) -> None:
    async def go() -> None:
        server, port, events = await _serve(dirs["b"])
        try:
            # the rogue directory trusts our CA, so its client sees a good
            # server; the server refuses the client's certificate
            reader, writer = await open_connection("127.0.0.1", port, load_tls_dir(dirs["rogue"]))
            got: asyncio.Queue[Any] = asyncio.Queue()
            chan = new_channel(Role.CLIENT, SECRET, "client")
            chan.start()
            link = ChannelLink(reader, writer, chan, got.put_nowait,
                               lambda d, e: got.put_nowait(("lost", d, type(e).__name__)))
            link.start()
            kind, reason = await events.get()
            assert kind == "refused" and reason.startswith("TLS: the peer's certificate is not trusted"), reason
            lost = await got.get()
            assert lost[0] == "lost" and lost[2] == "AuthenticationFailed", lost
            assert lost[1].startswith("TLS: "), lost
        finally:
            server.close()
            await server.wait_closed()

    _run(go())


def test_peer_without_tls_is_refused(dirs: dict[str, Path]) -> None:
    async def go() -> None:
        server, port, events = await _serve(dirs["b"])
        try:
            reader, writer = await open_connection("127.0.0.1", port, None)  # a source without TLS
            chan = new_channel(Role.CLIENT, SECRET, "client")
            chan.start()
            writer.write(chan.data_to_send())
            kind, reason = await events.get()
            assert (kind, reason) == ("refused", "TLS: the peer does not speak TLS")
            assert await reader.read() == b""  # closed
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    _run(go())


def test_incomplete_or_bad_directory(tmp_path: Path, dirs: dict[str, Path]) -> None:
    with pytest.raises(TlsError, match="missing ca-cert.pem, server-cert.pem"):
        load_tls_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"):
        (bad / name).write_bytes((dirs["a"] / name).read_bytes())
    (bad / "server-key.pem").write_text("not a key\n")
    with pytest.raises(TlsError, match="cannot load server-cert.pem/server-key.pem"):
        load_tls_dir(bad)
