#!/usr/bin/env python3
"""A byte-for-byte TCP relay: the cheapest forwarder a Python process can be.

    python benchmarks/tcp_relay.py LISTEN_HOST LISTEN_PORT TO_HOST TO_PORT [--uvloop | --poll-us US]

Each accepted connection gets its own connection to TO_HOST:TO_PORT and
every chunk read on one side is written as is to the other (TCP_NODELAY on
both). It parses nothing, so an iSCSI initiator logs in through it to the
target behind it. ``bench_passthrough.py`` runs it next to the host daemon
to show what merely sitting in the data path costs on the machine: the
daemon does the same socket work plus all of its iSCSI and device work.
Not part of prmigrate.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Front(_Side):
    def __init__(self, to: tuple[str, int]) -> None:
        super().__init__()
        self.to = to

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._link())

    async def _link(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, back = await loop.create_connection(_Side, *self.to)
        except OSError:
            self.transport.close()
            return
        back.peer, self.peer = self, back
        for chunk in self.early:
            back.transport.write(chunk)
        self.early.clear()


async def _serve(listen: tuple[str, int], to: tuple[str, int]) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Front(to), *listen)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("listen_host")
    ap.add_argument("listen_port", type=int)
    ap.add_argument("to_host")
    ap.add_argument("to_port", type=int)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--poll-us", type=int, default=0, help="busy-poll like prmigrate's --poll-us")
    args = ap.parse_args()
    from prmigrate.aio import run_loop

    run_loop(_serve((args.listen_host, args.listen_port), (args.to_host, args.to_port)),
             use_uvloop=args.uvloop, poll_us=args.poll_us)


if __name__ == "__main__":
    main()
