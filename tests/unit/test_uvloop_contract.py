"""What `Outbox.send` relies on in uvloop's socket transports, beyond the asyncio API.

`send` writes a frame straight to the socket with `os.write` while the
transport holds nothing (see `outbox.py`). That is safe only while three
things hold, which asyncio documents loosely and uvloop implements as
checked here, over a real loopback connection on uvloop's own loop:

- `get_extra_info("socket")` gives the socket the transport writes to;
- `get_write_buffer_size()` counts every byte the transport has not handed
  to the kernel yet (else a direct write could overtake them);
- `is_closing()` is true as soon as the transport lets go of its socket,
  whoever closed it (else a direct write could reach a closed descriptor,
  or one the next accepted connection got).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

uvloop = pytest.importorskip("uvloop")

TIMEOUT = 10.0


class Server(asyncio.Protocol):
    def __init__(self) -> None:
        self.made: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set_result(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # What a direct write would check at this point.
        self.lost.set_result(self.transport.is_closing())


def on_uvloop(test: Callable[[Server, socket.socket], Awaitable[None]]) -> None:
    """Run `test` on uvloop with one accepted connection and its peer's socket."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        protocol = Server()
        server = await loop.create_server(lambda: protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = socket.create_connection(("127.0.0.1", port))
        try:
            await asyncio.wait_for(protocol.made, TIMEOUT)
            await test(protocol, peer)
        finally:
            peer.close()
            server.close()

    uvloop.run(main())


def test_the_socket_is_the_one_the_transport_writes_to() -> None:
    async def check(server: Server, peer: socket.socket) -> None:
        fd = server.transport.get_extra_info("socket").fileno()
        server.transport.write(b"one")
        os.write(fd, b"two")
        peer.settimeout(TIMEOUT)
        data = b""
        while len(data) < 6:
            data += peer.recv(16)
        assert data == b"onetwo"

    on_uvloop(check)


def test_bytes_not_handed_to_the_kernel_are_counted() -> None:
    async def check(server: Server, peer: socket.socket) -> None:
        transport = server.transport
        assert transport.get_write_buffer_size() == 0
        transport.write(b"x" * (64 << 20))  # more than the kernel takes while the peer sleeps
        assert transport.get_write_buffer_size() > 0

    on_uvloop(check)


@pytest.mark.parametrize("how", ["close", "abort", "peer reset"])
def test_closing_shows_before_the_socket_is_let_go(how: str) -> None:
    async def check(server: Server, peer: socket.socket) -> None:
        transport = server.transport
        if how == "close":
            transport.close()
            assert transport.is_closing()
        elif how == "abort":
            transport.abort()
            assert transport.is_closing()
        else:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # RST: uvloop finds out by itself
        assert await asyncio.wait_for(server.lost, TIMEOUT)

    on_uvloop(check)
