"""Fixtures: real servers on ephemeral loopback ports, and clients connected to them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.app import Server
from plexus.client import Client
from plexus.config import Settings
from tests.helpers import TIMEOUT, RedisServer

ServerFactory = Callable[..., Awaitable[Server]]
ClientFactory = Callable[..., Awaitable[Client]]

# The WebSocket engine under test: `PLEXUS_WS_ENGINE=aiohttp pytest` runs the
# whole suite against the aiohttp engine (the default is the setting's). It is
# also the setting's own variable, so servers started as processes match.
WS_ENGINE = os.environ.get("PLEXUS_WS_ENGINE", Settings().ws_engine)


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start in-process servers (real sockets, port 0) with settings overrides."""
    servers: list[Server] = []

    async def factory(**overrides: Any) -> Server:
        values: dict[str, Any] = {
            "port": 0,
            "history_backend": "memory",
            "data_dir": str(tmp_path / "data"),
            "publish_rate": 0.0,
            "ws_engine": WS_ENGINE,
        }
        values.update(overrides)
        server = Server(Settings(**values))
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    """A default in-process server with memory history and no publish rate limit."""
    return await make_server()


@pytest.fixture
async def connect(server: Server) -> AsyncIterator[ClientFactory]:
    """Open clients to `server` (or to `url=`); all are closed at the end."""
    clients: list[Client] = []

    async def factory(url: str | None = None, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", TIMEOUT)
        client = Client(url or server.ws_url, **kwargs)
        await client.connect()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix (`redis_prefix`)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses."""
    return f"t{abs(hash(request.node.nodeid)) % 10**10}-{os.getpid()}"
