"""Fixtures: real servers on ephemeral loopback ports, and clients connected to them."""

from __future__ import annotations

import ast
import gc
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.app import Server
from plexus.client import Client
from plexus.config import Settings
from tests.helpers import TIMEOUT, RedisServer

# CPython 3.11 before 3.11.8 keeps the AST constructor's recursion counter in
# interpreter-wide state (python/cpython#106905, fixed in 3.11.8 by #113035).
# When a garbage collection runs during `ast.parse` and a finalizer parses too,
# the outer parse fails with "SystemError: AST constructor recursion depth
# mismatch". Finalizers that parse are common in this suite after a failure:
# any that logs an exception with its traceback (an abandoned asyncio task, an
# unclosed transport), because 3.11's traceback module parses each source line
# to place its `^^^` markers. pytest parses the failing test's module to show
# its source, expects only SyntaxError there, and the SystemError surfaced as
# an INTERNALERROR through the hypothesis plugin's report hook, which lost the
# whole failure list. Parsing with the collector paused leaves no way for
# Python code to run inside the constructor, so the counter stays balanced.
# (Not Hypothesis's explain phase nor a RecursionError: the counter is reset at
# every parse; only a parse nested inside another one breaks it.)
_ast_parse = ast.parse
# The collector switch is process-wide, hence a lock; a reentrant one, because
# the collection that runs as soon as the collector is back on (before the lock
# is released) may run a finalizer that parses again in the same thread.
_parse_lock = threading.RLock()


def _parse_with_collector_paused(*args: Any, **kwargs: Any) -> Any:
    with _parse_lock:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return _ast_parse(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()


if (3, 11) <= sys.version_info < (3, 11, 8):
    ast.parse = _parse_with_collector_paused

ServerFactory = Callable[..., Awaitable[Server]]
ClientFactory = Callable[..., Awaitable[Client]]


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
