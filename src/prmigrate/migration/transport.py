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

TLS (optional, ``load_tls_dir``): mutual x509 under the channel, from a
directory laid out like QEMU's ``tls-creds-x509`` (``ca-cert.pem``,
``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``,
optionally ``ca-crl.pem``: a peer certificate the CA revoked is refused).
The destination listens on plain TCP and starts TLS on each connection
(``accept_tls``), so a peer refused during the handshake is reported (the
service's ``MIGRATION_REFUSED`` event), not only dropped by the library; the
source connects with TLS (``open_connection``). Both sides require the
other's certificate to chain to the CA; host names are not checked (the
peers are named by address; the per-cluster secret still authenticates
every frame on top). TLS 1.2 or newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .channel import Authenticated, Channel, ChannelState, Message, Role
from .errors import AuthenticationFailed, ChannelError

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16
TLS_HANDSHAKE_TIMEOUT = 10.0

# QEMU's tls-creds-x509 file names (docs/system/tls.rst)
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"  # optional: certificates the CA revoked
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"


class TlsError(ValueError):
    """A TLS directory that cannot be used (missing or unreadable PEM files)."""


class TlsRefused(ConnectionError):
    """The TLS handshake with a migration peer failed (its message says why)."""


@dataclass(frozen=True)
class ChannelTls:
    """The two contexts of a host: ``server`` (incoming migrations) and
    ``client`` (outgoing), both requiring the peer's certificate."""

    directory: Path
    server: ssl.SSLContext
    client: ssl.SSLContext


def load_tls_dir(directory: str | Path) -> ChannelTls:
    d = Path(directory)
    missing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY) if not (d / n).is_file()]
    if missing:
        raise TlsError(f"{d}: missing {', '.join(missing)} (a host needs the CA certificate and both "
                       "its server and client certificates and keys)")

    def context(purpose: ssl._SSLMethod, cert: str, key: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(d / CA_CERT))
            ctx.load_cert_chain(str(d / cert), str(d / key))
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"{d}: cannot load {cert}/{key} with {CA_CERT}: {e}") from e
        if (d / CA_CRL).is_file():
            try:
                ctx.load_verify_locations(cafile=str(d / CA_CRL))
            except (OSError, ssl.SSLError) as e:
                raise TlsError(f"{d}: cannot load {CA_CRL}: {e}") from e
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF  # a peer's revoked certificate is refused
        return ctx

    return ChannelTls(d, context(ssl.PROTOCOL_TLS_SERVER, SERVER_CERT, SERVER_KEY),
                      context(ssl.PROTOCOL_TLS_CLIENT, CLIENT_CERT, CLIENT_KEY))


_PEER_REFUSED_US = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "CERTIFICATE_UNKNOWN",
                    "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED")


def describe_tls_error(e: BaseException) -> str:
    """One line naming why a TLS handshake with a peer failed."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: the peer's certificate is not trusted ({e.verify_message})"
    if isinstance(e, ssl.SSLError):
        reason = e.reason or str(e)
        if "ALERT" in reason and any(w in reason for w in _PEER_REFUSED_US):
            return f"TLS: the peer refused our certificate ({reason.lower()})"
        if reason == "WRONG_VERSION_NUMBER" or reason == "HTTP_REQUEST":
            return "TLS: the peer does not speak TLS"
        return f"TLS handshake failed ({reason.lower()})"
    if isinstance(e, TimeoutError):
        return "TLS: no handshake from the peer in time"
    if isinstance(e, ConnectionError | OSError):
        # a client that does not trust our certificate closes without an alert
        return ("TLS: the peer closed the connection during the handshake "
                f"(it may not trust our certificate; {str(e) or type(e).__name__})")
    return f"TLS handshake failed ({e})"


async def open_connection(
    host: str, port: int, tls: ChannelTls | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The source's connection to a destination; a failed TLS handshake is ``TlsRefused``."""
    if tls is None:
        return await asyncio.open_connection(host, port)
    try:
        return await asyncio.open_connection(host, port, ssl=tls.client, server_hostname=host,
                                             ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
    except ssl.SSLError as e:
        raise TlsRefused(describe_tls_error(e)) from e


async def accept_tls(writer: asyncio.StreamWriter, tls: ChannelTls | None) -> str | None:
    """Start TLS on an accepted connection; None when done (or no TLS),
    else why the peer is refused."""
    if tls is None:
        return None
    try:
        await writer.start_tls(tls.server, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
    except (ssl.SSLError, OSError, TimeoutError) as e:
        with contextlib.suppress(Exception):
            writer.transport.abort()
        return describe_tls_error(e)
    return None


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
                except ssl.SSLError as e:
                    # TLS 1.3: a server refusing our certificate says so after
                    # the client's handshake is done, on the first read
                    detail = describe_tls_error(e)
                    self._lost(detail, AuthenticationFailed(detail))
                    return
                except (ConnectionError, OSError) as e:
                    self._lost(f"connection to {self.peer} failed: {e}", None)
                    return
                if not data:
                    if self.channel.state is ChannelState.HELLO_SENT and self.writer.get_extra_info("ssl_object"):
                        # TLS 1.3: a server that refuses our certificate may
                        # close without an alert, before any answer
                        detail = (f"TLS: {self.peer} closed the connection before answering (it may "
                                  "not trust our certificate)")
                        self._lost(detail, AuthenticationFailed(detail))
                        return
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
