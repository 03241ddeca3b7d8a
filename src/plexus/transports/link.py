"""WebSocket connections: the part both engines share, and the aiohttp engine.

Two engines move frames between a socket and a `Connection` (setting
`ws_engine`): this module's, where aiohttp's `WebSocketResponse` does the
handshake and parses frames, and `lean.py`'s, an asyncio protocol around
websockets' sans-I/O core that costs far less memory per idle connection. What
does not depend on the engine lives here: `WebSocketEndpoint` (admission,
bookkeeping, heartbeat, shutdown) and `Link` (one connection's socket side:
close handshake, pongs, echo, the end of the connection).

Everything the server sends after the handshake goes through the connection's
`Outbox`, including pongs and the close frame, so that no frame can overtake
queued ones and output stays bounded. aiohttp's own auto-ping and auto-close
are off: its auto-close answers every close with 1000, even for invalid codes
(RFC 6455 7.4 wants 1002), and a server-wide heartbeat costs one timer per
interval instead of one per connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol

from plexus.auth import Authenticator, Credentials
from plexus.connection import Connection
from plexus.exceptions import AuthError
from plexus.node import Node
from plexus.outbox import Flusher, Outbox, Transport
from plexus.protocol.codec import (
    OP_BINARY,
    OP_TEXT,
    PING_FRAME,
    SUBPROTOCOLS,
    build_frame,
    close_frame,
    codec_for,
)
from plexus.protocol.codes import CloseCode
from plexus.protocol.wire import websocket_format
from plexus.transports.origin import origin_allowed

log = logging.getLogger("plexus.ws")

OP_PONG: Final = 0xA
PROTOCOL_ERROR: Final = 1002
# How long a closing connection may take to answer our close frame before the
# socket is dropped (a peer that stopped reading never will).
CLOSE_TIMEOUT: Final = 5.0


def write_high_water(max_queue_bytes: int) -> int:
    """Unsent bytes above which a connection's socket is not read until they drain.

    Half the output limit rather than asyncio's 64 KiB: a client that reads
    slowly but keeps up still has its pongs and commands read, while one that
    does not read at all stops being read well before it holds the limit.
    """
    return max(max_queue_bytes // 2, 4096)


def valid_close_code(code: int) -> bool:
    """Whether a peer may send `code` in a close frame (RFC 6455 7.4.1, IANA registry)."""
    return code == 0 or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


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
    """The socket side of one connection, whatever engine reads its frames.

    `endpoint.open` binds it to its `Connection`; the engine reports what the
    peer sent (`ping`, `pong`, `peer_closed`, `echo_message`, or `fail` for a
    protocol error) and, once the socket is gone, awaits `endpoint.finish`.
    """

    __slots__ = ("_abort", "conn", "echo", "endpoint", "remote", "transport")

    conn: Connection
    transport: asyncio.Transport

    def __init__(self, endpoint: WebSocketEndpoint) -> None:
        self.endpoint = endpoint
        self.remote = ""
        self.echo = False
        self._abort: asyncio.TimerHandle | None = None

    def send_close(self, code: int, reason: str = "") -> None:
        """Write a close frame after everything queued, then accept no more output.

        A slow consumer's queue was already dropped by its outbox; for every
        other close the replies queued so far go out first. The socket is
        dropped if the peer does not end it within CLOSE_TIMEOUT.
        """
        outbox = self.conn.outbox
        outbox.write_now(close_frame(code, reason))
        outbox.overflowed = True  # nothing may follow a close frame
        if self._abort is None:
            loop = asyncio.get_running_loop()
            self._abort = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)

    def fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol (or its message was too big): close with `code`."""
        if self.conn.close_code is None:
            self.conn.close_code = code
            self.send_close(code, reason)

    def ping(self, payload: bytes) -> None:
        """A ping frame arrived: answer it behind the frames already queued.

        The pong counts against `max_queue_bytes` like any frame (a client
        that sends pings and never reads is a slow consumer); past a run of
        them in the queue, it replaces the last (`Outbox.push_pong`).
        """
        conn = self.conn
        conn.last_seen = time.monotonic()
        if conn.close_code is None:
            conn.outbox.push_pong(build_frame(payload, OP_PONG))

    def pong(self) -> None:
        """A pong frame arrived: the peer is alive."""
        self.conn.last_seen = time.monotonic()

    def peer_closed(self, code: int) -> None:
        """A close frame with `code` (0: none) arrived: answer it and end the TCP connection.

        The answer echoes the code, or is 1002 for a code no endpoint may send.
        When we started the close, this is the peer's answer and needs none.
        """
        conn = self.conn
        if conn.close_code is None:
            reply = (code or CloseCode.NORMAL) if valid_close_code(code) else PROTOCOL_ERROR
            conn.close_code = reply
            conn.outbox.write_now(close_frame(reply))
            conn.outbox.overflowed = True
        self.transport.close()

    def echo_message(self, data: bytes, text: bool) -> None:
        """`/echo`: send a message back through the same outbox as every other frame."""
        conn = self.conn
        conn.last_seen = time.monotonic()
        conn.push_frame(build_frame(data, OP_TEXT if text else OP_BINARY))

    def stop_abort_timer(self) -> None:
        """The socket is gone: the timer that would drop it is not needed any more."""
        if self._abort is not None:
            self._abort.cancel()
            self._abort = None

    def crashed(self) -> None:
        """Log the exception being handled and close with 1011."""
        log.exception("connection %s failed", self.conn.client_id)
        self.conn.close(CloseCode.INTERNAL_ERROR, "internal error")


class WebSocketEndpoint:
    """Serves `/ws` (and `/echo` for the conformance suite when enabled).

    Owns what every engine shares: the open connections and their count per
    address, admission, the server-wide heartbeat and the shutdown.
    """

    def __init__(self, node: Node, auth: Authenticator) -> None:
        self.node = node
        self.auth = auth
        self.settings = node.settings
        self.flusher = Flusher(asyncio.get_running_loop())
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
                if conn.close_code is None:
                    conn.outbox.push(PING_FRAME)
            await asyncio.sleep(settings.pong_timeout)
            for conn in list(self.connections):
                if conn.close_code is None and conn.last_seen < sent_at:
                    log.info("client %s did not answer ping: closing", conn.client_id)
                    conn.close(CloseCode.POLICY_VIOLATION, "no pong")

    # ----- the steps of a connection, for every engine

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
        WebSocket.
        """
        settings = self.settings
        if not origin_allowed(
            origin, scheme, host, settings.allowed_origins, settings.allowed_hosts
        ):
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

    def refuse_token(self, transport: asyncio.Transport, refused: AuthError, remote: str) -> None:
        """Close a just-accepted WebSocket with 4001/4002 and no `welcome`.

        Accept, then close at once: a browser can read the code of a close
        frame, never the status of a refused upgrade.
        """
        transport.write(close_frame(refused.close_code, str(refused)[:100]))
        transport.close()
        log.info("refused token from %s: %s", remote, refused)

    def open(
        self,
        link: Link,
        transport: Transport,
        subprotocol: str | None,
        credentials: Credentials | None,
    ) -> Connection:
        """Make the connection of an accepted WebSocket, count it and greet it.

        The engine then awaits `conn.subscribe_granted()` (unless `link.echo`)
        before the peer's first message.
        """
        conn = Connection(
            self.node,
            transport,
            websocket_format(codec_for(subprotocol)),
            self.flusher,
            closer=link.send_close,
            auth=self.auth,
            credentials=credentials,
            remote=link.remote,
        )
        link.conn = conn
        self.connections.add(conn)
        self._drained.clear()
        if not link.echo:
            self.node.add_peer(conn)
            conn.send(conn.welcome())
            conn.watch_expiry()
        log.info("open %s from %s user=%s", conn.client_id, link.remote, conn.user)
        return conn

    async def finish(self, link: Link, fallback_code: int | None = None) -> None:
        """Forget a connection whose socket is gone: cleanup, metrics and the close log."""
        conn, remote = link.conn, link.remote
        link.stop_abort_timer()
        self.connections.discard(conn)
        if not self.connections:
            self._drained.set()
        try:
            if not link.echo:
                await conn.cleanup()
        finally:
            code = conn.close_code or fallback_code
            self.node.counters.closes[int(code or 1006)] += 1
            log.info(
                "close %s from %s after %.3fs code=%s",
                conn.client_id,
                remote,
                time.time() - conn.opened_at,
                code,
            )

    # ----- the aiohttp engine

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for `GET /ws`."""
        return await _serve(self, request, echo=False)

    async def handle_echo(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for `GET /echo`: echoes messages through the same send path."""
        return await _serve(self, request, echo=True)


class _WsTransport:
    """The asyncio transport, seen as closing as soon as aiohttp began a close handshake."""

    __slots__ = ("_transport", "_ws")

    def __init__(self, transport: asyncio.Transport, ws: web.WebSocketResponse) -> None:
        self._transport = transport
        self._ws = ws

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._ws.closed


class _Response(web.WebSocketResponse):
    """aiohttp's response, flushing our outbox before any close aiohttp starts itself.

    aiohttp writes its own close frame when a peer breaks the protocol or sends
    an oversized message; replies to the commands before that are still in the
    outbox and must go out first.
    """

    outbox: Outbox | None = None

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if self.outbox is not None and not self.closed:
            self.outbox.flush()
        return await super().close(code=code, message=message, drain=drain)


async def _serve(
    endpoint: WebSocketEndpoint, request: web.Request, *, echo: bool
) -> web.StreamResponse:
    remote = request.remote or ""
    headers = request.headers
    refusal = endpoint.admit(
        headers.get(hdrs.ORIGIN), request.scheme, headers.get(hdrs.HOST), remote
    )
    if refusal is not None:
        return web.Response(
            body=refusal.body(),
            status=refusal.status,
            content_type="application/json",
            charset="utf-8",
        )
    credentials, refused = endpoint.verify_token(request.query.get("token", ""), echo=echo)
    ws = _Response(
        protocols=SUBPROTOCOLS,
        compress=False,
        autoping=False,
        autoclose=False,
        # aiohttp refuses a message whose size *equals* its limit; the
        # protocol promises that only a larger one is refused.
        max_msg_size=endpoint.settings.max_message_size + 1,
        timeout=CLOSE_TIMEOUT,
    )
    writer = await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer vanished during the handshake
        return ws
    if refused is not None:
        endpoint.refuse_token(transport, refused, remote)
        return ws

    link = Link(endpoint)
    link.remote, link.echo, link.transport = remote, echo, transport
    transport.set_write_buffer_limits(high=write_high_water(endpoint.settings.max_queue_bytes))
    conn = endpoint.open(link, _WsTransport(transport, ws), ws.ws_protocol, credentials)
    ws.outbox = conn.outbox
    try:
        if not echo:
            await conn.subscribe_granted()
        await _read(ws, link, request.protocol, writer)
    except Exception:
        link.crashed()
    finally:
        await endpoint.finish(link, ws.close_code)
    if not transport.is_closing():
        transport.close()
    return ws


async def _read(
    ws: _Response, link: Link, protocol: BaseProtocol, writer: AbstractStreamWriter
) -> None:
    """Read until the connection ends.

    While the socket holds more unsent output than its high-water mark, no
    message is taken: aiohttp's queue fills and it stops reading the socket,
    so a client that does not read cannot make the server answer more.
    """
    conn = link.conn
    while True:
        if protocol.writing_paused:
            try:
                await writer.drain()
            except ConnectionError:
                return  # dropped while it did not read (the close timer, a reset)
        msg = await ws.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if conn.close_code is not None:
                continue  # draining after our close frame
            if link.echo:
                text = kind is WSMsgType.TEXT
                link.echo_message(msg.data.encode("utf-8") if text else msg.data, text)
            else:
                await conn.receive(msg.data)
        elif kind is WSMsgType.PING:
            link.ping(msg.data)
        elif kind is WSMsgType.PONG:
            link.pong()
        elif kind is WSMsgType.CLOSE:
            link.peer_closed(int(msg.data or 0))
            return
        else:
            # CLOSED, CLOSING or ERROR: aiohttp already answered (e.g. 1009
            # for an oversized message) or the socket is gone.
            if kind is WSMsgType.ERROR and conn.close_code is None:
                conn.close_code = ws.close_code or CloseCode.INTERNAL_ERROR
            return
