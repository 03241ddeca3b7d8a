"""What every transport shares: the `Link` and the `Endpoint`.

A transport moves bytes between sockets and `Connection`s: the WebSocket
listener (`lean.py`) and Server-Sent Events (`sse.py`); an ASGI WebSocket is
next, and must reuse `Connection` unchanged too. What does not depend on the
transport lives here: the `Endpoint` (admission, bookkeeping, the server-wide
heartbeat, the shutdown) and the `Link` (one connection's socket side, as the
connection sees it: where its output goes and how it is closed).

Everything a server sends on a connection goes through the connection's
`Outbox`, in the connection's wire format (`protocol/wire.py`), so that no
frame overtakes queued ones and output stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import orjson

from plexus.auth import Authenticator, Credentials
from plexus.connection import Connection
from plexus.decisions.calls import Handshake
from plexus.exceptions import AuthError
from plexus.node import Node
from plexus.outbox import Flusher
from plexus.protocol.codes import CloseCode
from plexus.protocol.wire import WireFormat
from plexus.transports.origin import origin_allowed

log = logging.getLogger("plexus.ws")

# How long a closing connection may take to answer our close frame before the
# socket is dropped (a peer that stopped reading never will).
CLOSE_TIMEOUT = 5.0


def write_high_water(max_queue_bytes: int) -> int:
    """Unsent bytes above which a connection's socket is not read until they drain.

    Half the output limit rather than asyncio's 64 KiB: a client that reads
    slowly but keeps up still has its pongs and commands read, while one that
    does not read at all stops being read well before it holds the limit.
    """
    return max(max_queue_bytes // 2, 4096)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upgrade request answered with an HTTP error instead of a WebSocket."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        """The JSON error body, shaped like the HTTP API's errors."""
        return orjson.dumps({"error": {"code": self.code, "message": self.message}})


class Link:
    """One connection's socket side, whatever the transport.

    The transport makes it when a connection is accepted, `Endpoint.open`
    binds it to its `Connection` (whose `closer` is `send_close`), and once
    the socket is gone the transport awaits `Endpoint.finish`.

    Attributes:
        conn: the connection, once opened.
        transport: where the connection's output is written.
        remote: the peer's address.
        echo: a connection that only echoes what it is sent (`/echo`, for
            conformance suites): it joins no node and gets no `welcome`.
    """

    __slots__ = ("_abort", "conn", "echo", "endpoint", "remote", "transport")

    conn: Connection
    transport: asyncio.Transport
    # `transport` is the socket's own, so a frame may be written to it
    # directly rather than through the outbox's queue (`Outbox.send`);
    # wrappers (event streams, ASGI) queue every frame.
    direct_writes: ClassVar[bool] = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.remote = ""
        self.echo = False
        self._abort: asyncio.TimerHandle | None = None

    def send_close(self, code: int, reason: str = "") -> None:
        """Close the connection with `code` after what is queued; accept no more output.

        The transport's own way: a WebSocket close frame, the end of a
        response. Called through `Connection.close` (idempotent there).
        """
        raise NotImplementedError

    def drop_later(self, delay: float = CLOSE_TIMEOUT) -> None:
        """Drop the socket in `delay` seconds unless `stop_abort_timer` is called first."""
        if self._abort is None:
            loop = asyncio.get_running_loop()
            self._abort = loop.call_later(delay, self.transport.abort)

    def stop_abort_timer(self) -> None:
        """The socket is gone: the timer that would drop it is not needed any more."""
        if self._abort is not None:
            self._abort.cancel()
            self._abort = None

    def crashed(self) -> None:
        """Log the exception being handled and close with 1011."""
        log.exception("connection %s failed", self.conn.client_id)
        self.conn.close(CloseCode.INTERNAL_ERROR, "internal error")


class Endpoint:
    """The connections of every transport: admission, bookkeeping, heartbeat and shutdown.

    Owns the open connections and the open sockets per address (HTTP and
    WebSocket alike), decides whether an upgrade may become a connection,
    and pings every connection whose wire format has a ping.
    """

    def __init__(self, node: Node, auth: Authenticator) -> None:
        self.node = node
        self.auth = auth
        self.settings = node.settings
        self.flusher = Flusher(asyncio.get_running_loop())
        node.hub.ticker = self.flusher
        self.connections: set[Connection] = set()
        self._drained = asyncio.Event()
        # Open sockets per client address, HTTP and WebSocket alike (the
        # listener counts them from accept to close).
        self._sockets: dict[str, int] = {}

    # ----- lifecycle

    def start(self) -> None:
        """Start the server-wide heartbeat (supervised: a crash is logged and it restarts)."""
        self.node.supervisor.spawn("heartbeat", self._heartbeat_loop)

    async def stop(self) -> None:
        """Stop the heartbeat and close every connection with 1001."""
        await self.node.supervisor.cancel("heartbeat")
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")

    async def wait_drained(self) -> None:
        """Wait until no connection is open."""
        if self.connections:
            await self._drained.wait()

    async def _heartbeat_loop(self) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(settings.ping_interval - settings.pong_timeout)
            sent_at = time.monotonic()
            for conn in self.connections:
                if conn.close_code is None and conn.wire.ping is not None:
                    conn.outbox.push(conn.wire.ping)
            await asyncio.sleep(settings.pong_timeout)
            for conn in list(self.connections):
                # Only a transport with pings can answer them (not an event stream).
                silent = conn.last_seen < sent_at and conn.wire.checks_pong
                if conn.close_code is None and silent:
                    log.info("client %s did not answer ping: closing", conn.client_id)
                    conn.close(CloseCode.POLICY_VIOLATION, "no pong")

    # ----- the steps of a connection, for every transport

    def socket_opened(self, remote: str) -> int:
        """Count a socket accepted from `remote`; return how many it holds, this one included."""
        held = self._sockets.get(remote, 0) + 1
        self._sockets[remote] = held
        return held

    def socket_closed(self, remote: str) -> None:
        """Forget one socket of `remote` (it was closed)."""
        left = self._sockets.get(remote, 1) - 1
        if left:
            self._sockets[remote] = left
        else:
            self._sockets.pop(remote, None)

    def sockets_from(self, remote: str) -> int:
        """How many open sockets `remote` holds: WebSocket connections and HTTP ones."""
        return self._sockets.get(remote, 0)

    def admit(
        self, origin: str | None, scheme: str, host: str | None, remote: str
    ) -> Refusal | None:
        """Check an upgrade request's origin and the node's connection limit.

        `max_connections_per_ip` is checked when the socket is accepted (see
        `transports/lean.py`): an upgrade only turns a counted socket into a
        connection.
        """
        settings = self.settings
        if not origin_allowed(
            origin, scheme, host, settings.allowed_origins, settings.allowed_hosts
        ):
            log.info("refused origin %r (Host %r) from %s", origin, host, remote)
            return Refusal(403, "permission_denied", "origin not allowed")
        if settings.max_connections and len(self.connections) >= settings.max_connections:
            return Refusal(503, "unavailable", "connection limit of this node reached")
        return None

    def verify_token(
        self, token: str, *, echo: bool
    ) -> tuple[Credentials | None, AuthError | None]:
        """The credentials of a connection token, or why it is refused (no token: anonymous)."""
        if token and not echo:
            try:
                return self.auth.verify_connection(token), None
            except AuthError as exc:
                return None, exc
        return None, None

    def handshake(self, headers: Iterable[tuple[str, str]], data: str | None) -> Handshake | None:
        """What of the upgrade request the application's calls pass on (None: nothing asks)."""
        return self.node.decider.handshake(headers, data)

    def open(
        self,
        link: Link,
        wire: WireFormat,
        credentials: Credentials | None,
        handshake: Handshake | None = None,
        *,
        session: str | None = None,
    ) -> Connection:
        """Make the connection of an accepted link, count it and greet it.

        When `conn.starting` (and not `link.echo`) the transport then awaits
        `conn.start()` before the peer's first message: the application's
        connect decision, which `welcome` waits for, and the server-side
        subscriptions. `session`: the id `welcome` gives a transport whose
        commands come apart from its stream (SSE).
        """
        conn = Connection(
            self.node,
            link.transport,
            wire,
            self.flusher,
            closer=link.send_close,
            auth=self.auth,
            credentials=credentials,
            remote=link.remote,
            handshake=handshake,
            session=session,
            direct=link.direct_writes,
        )
        link.conn = conn
        self.connections.add(conn)
        self._drained.clear()
        if not link.echo:
            conn.begin()
        log.info("open %s from %s user=%s", conn.client_id, link.remote, conn.user)
        return conn

    async def finish(self, link: Link) -> None:
        """Forget a connection whose socket is gone: cleanup, metrics and the close log."""
        conn, remote = link.conn, link.remote
        link.stop_abort_timer()
        try:
            if not link.echo:
                await conn.cleanup()
        finally:
            # Counted as gone only once its subscriptions ended: the shutdown
            # waits for this before it closes the engine under them.
            self.connections.discard(conn)
            if not self.connections:
                self._drained.set()
            code = conn.close_code
            self.node.counters.closes[int(code or 1006)] += 1
            log.info(
                "close %s from %s after %.3fs code=%s",
                conn.client_id,
                remote,
                time.time() - conn.opened_at,
                code,
            )
