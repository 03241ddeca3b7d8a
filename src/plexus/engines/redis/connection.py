"""A raw connection to one Redis server: asyncio's `Protocol` and hiredis's C parser.

The two connections on a node's hot paths use it instead of redis-py: the
pub/sub link (every message of every subscribed channel passes there) and the
publish pipe (every publish of a channel with Redis history). redis-py's
per-command work in Python (packing, a timeout per read, its retry wrapper)
measured about a fifth of a node's CPU per publish; here a command is packed
by hiredis in C and replies are matched to requests in order, with nothing
else. Everything else (reads, presence, the registry) uses redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url

from plexus.exceptions import Unavailable

Command = Sequence[bytes | str | int]


class RawConnection(asyncio.Protocol):
    """One socket to Redis. Replies answer requests in order; once `on_push` is set,
    replies nobody waits for (pub/sub messages) go there."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.on_push: Callable[[Any], None] | None = None
        self.broken = ""  # why the connection was given up, if it was

    # ----- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                # Not Redis speaking (a wrong port, a proxy's error page): give up
                # on this connection; whoever waits hears why.
                self.broken = f"not a Redis reply: {exc}"
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
            elif self.on_push is not None:
                self.on_push(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(Unavailable(self.broken or "redis connection lost"))

    # ----- use

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing() or self.lost.done()

    def send(self, *args: bytes | str | int) -> None:
        """Write one command whose reply nobody waits for (pub/sub commands)."""
        if not self.closed:
            assert self.transport is not None
            self.transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]

    def request_many(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Write `commands` in one write; one future per reply, in order.

        Raises:
            Unavailable: the connection is closed.
        """
        if self.closed:
            raise Unavailable("redis connection lost")
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self.waiters.extend(futures)
        self.transport.write(b"".join(hiredis.pack_command(tuple(c)) for c in commands))  # type: ignore[arg-type]
        return futures

    async def request(self, *args: bytes | str | int) -> Any:
        """One command and its reply (a `hiredis.ReplyError` is returned, not raised)."""
        (future,) = self.request_many([args])
        return await future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_connection(url: str, name: str, timeout: float) -> RawConnection:
    """Connect to the server of `url` (TCP, TLS with `rediss://`, or a Unix socket),
    authenticate and select its database if the URL says so, and name the connection.

    Raises:
        OSError, TimeoutError: it cannot be reached.
        Unavailable: it refused (a wrong password, or it is not Redis).
    """
    options: dict[str, Any] = dict(parse_url(url))
    loop = asyncio.get_running_loop()
    conn = RawConnection()
    async with asyncio.timeout(timeout):
        if options.get("path"):
            await loop.create_unix_connection(lambda: conn, options["path"])
        else:
            context = ssl.create_default_context() if url.startswith("rediss://") else None
            host = options.get("host", "localhost")
            port = int(options.get("port", 6379))
            await loop.create_connection(lambda: conn, host, port, ssl=context)
        try:
            commands: list[Command] = []
            password = options.get("password")
            if password:
                username = options.get("username")
                commands.append(("AUTH", username, password) if username else ("AUTH", password))
            if int(options.get("db", 0) or 0):
                commands.append(("SELECT", int(options["db"])))
            commands.append(("CLIENT", "SETNAME", name))
            for reply in await asyncio.gather(*conn.request_many(commands)):
                if isinstance(reply, hiredis.ReplyError):
                    raise Unavailable(f"redis refused the connection: {reply}")
        except BaseException:
            conn.close()
            raise
    return conn


class CommandPipe:
    """One connection for pipelined commands, opened when first needed and again
    after a failure. One batch at a time: the caller awaits `run` before the next.

    Args:
        url: the server.
        name: the connection's name in `CLIENT LIST`.
        timeout: seconds to connect, and to get a batch's replies.
    """

    def __init__(self, url: str, name: str, timeout: float) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout
        self._conn: RawConnection | None = None

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and return their replies, in order
        (a command's error is its reply, a `hiredis.ReplyError`).

        Raises:
            Unavailable: the server cannot be reached or did not answer in time
                (the connection is then dropped: some commands may have run).
        """
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = await open_connection(self.url, self.name, self.timeout)
            futures = conn.request_many(commands)
            async with asyncio.timeout(self.timeout):
                return list(await asyncio.gather(*futures))
        except (OSError, TimeoutError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
