"""WebSocket glue: moves frames between aiohttp and a `Connection`, nothing more.

aiohttp parses frames (size limit, UTF-8, fragmentation) and the handshake.
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
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, web

from plexus.auth import Authenticator, Credentials
from plexus.connection import Connection
from plexus.exceptions import AuthError
from plexus.node import Node
from plexus.outbox import Flusher, Outbox
from plexus.protocol.codec import (
    PING_FRAME,
    SUBPROTOCOLS,
    build_frame,
    close_frame,
    codec_for,
)
from plexus.protocol.codes import CloseCode
from plexus.transports.origin import origin_allowed

log = logging.getLogger("plexus.ws")

OP_PONG: Final = 0xA
# How long a closing connection may take to answer our close frame before the
# socket is dropped (a peer that stopped reading never will).
CLOSE_TIMEOUT: Final = 5.0


def valid_close_code(code: int) -> bool:
    """Whether a peer may send `code` in a close frame (RFC 6455 7.4.1, IANA registry)."""
    return code == 0 or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


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


class WebSocketEndpoint:
    """Serves `/ws` (and `/echo` for the conformance suite when enabled)."""

    def __init__(self, node: Node, auth: Authenticator) -> None:
        self.node = node
        self.auth = auth
        self.settings = node.settings
        self.flusher = Flusher(asyncio.get_running_loop())
        self.connections: set[Connection] = set()
        self._drained = asyncio.Event()
        self._per_ip: dict[str, int] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    # ----- lifecycle

    def start(self) -> None:
        """Start the server-wide heartbeat."""
        self._heartbeat = asyncio.get_running_loop().create_task(
            self._heartbeat_loop(), name="plexus-heartbeat"
        )

    async def stop(self) -> None:
        """Stop the heartbeat and close every connection with 1001."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
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

    # ----- handler

    def _refuse(self, status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for `GET /ws`."""
        return await self._serve(request, echo=False)

    async def handle_echo(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler for `GET /echo`: echoes messages through the same send path."""
        return await self._serve(request, echo=True)

    async def _serve(self, request: web.Request, *, echo: bool) -> web.StreamResponse:
        settings = self.settings
        if not origin_allowed(request, settings.allowed_origins):
            return self._refuse(403, "permission_denied", "origin not allowed")
        remote = request.remote or ""
        if settings.max_connections and len(self.connections) >= settings.max_connections:
            return self._refuse(503, "unavailable", "connection limit of this node reached")
        per_ip = self._per_ip.get(remote, 0)
        if settings.max_connections_per_ip and per_ip >= settings.max_connections_per_ip:
            return self._refuse(429, "rate_limited", "too many connections from this address")

        credentials: Credentials | None = None
        refused: AuthError | None = None
        token = request.query.get("token", "")
        if token and not echo:
            try:
                credentials = self.auth.verify_connection(token)
            except AuthError as exc:
                refused = exc

        ws = _Response(
            protocols=SUBPROTOCOLS,
            compress=False,
            autoping=False,
            autoclose=False,
            # aiohttp refuses a message whose size *equals* its limit; the
            # protocol promises that only a larger one is refused.
            max_msg_size=settings.max_message_size + 1,
            timeout=CLOSE_TIMEOUT,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:  # the peer vanished during the handshake
            return ws
        if refused is not None:
            # Accept, then close at once: a browser can read the code of a
            # close frame, never the status of a refused upgrade.
            transport.write(close_frame(refused.close_code, str(refused)[:100]))
            transport.close()
            log.info("refused token from %s: %s", remote, refused)
            return ws

        abort_timer: list[asyncio.TimerHandle] = []

        def closer(code: CloseCode, reason: str) -> None:
            # A slow consumer's queue was already dropped by its outbox; for
            # every other close the replies queued so far go out first.
            conn.outbox.write_now(close_frame(code, reason))
            conn.outbox.overflowed = True  # nothing may follow a close frame
            loop = asyncio.get_running_loop()
            abort_timer.append(loop.call_later(CLOSE_TIMEOUT, transport.abort))

        conn = Connection(
            self.node,
            _WsTransport(transport, ws),
            codec_for(ws.ws_protocol),
            self.flusher,
            closer=closer,
            auth=self.auth,
            credentials=credentials,
            remote=remote,
        )
        ws.outbox = conn.outbox
        self.connections.add(conn)
        self._drained.clear()
        self._per_ip[remote] = per_ip + 1
        if not echo:
            self.node.add_peer(conn)
            conn.send(conn.welcome())
            conn.watch_expiry()
            await conn.subscribe_granted()
        log.info("open %s from %s user=%s", conn.client_id, remote, conn.user)
        peer_code: int | None = None
        try:
            peer_code = await self._read(ws, conn, transport, echo=echo)
        except Exception:
            log.exception("connection %s failed", conn.client_id)
            conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            for timer in abort_timer:
                timer.cancel()
            self.connections.discard(conn)
            if not self.connections:
                self._drained.set()
            left = self._per_ip.get(remote, 1) - 1
            if left:
                self._per_ip[remote] = left
            else:
                self._per_ip.pop(remote, None)
            if not echo:
                await conn.cleanup()
            code = conn.close_code or peer_code or ws.close_code
            self.node.counters.closes[int(code or 1006)] += 1
            log.info(
                "close %s from %s after %.3fs code=%s",
                conn.client_id,
                remote,
                time.time() - conn.opened_at,
                code,
            )
        if not transport.is_closing():
            transport.close()
        return ws

    async def _read(
        self,
        ws: _Response,
        conn: Connection,
        transport: asyncio.Transport,
        *,
        echo: bool,
    ) -> int | None:
        """Read until the connection ends; return the peer's close code if it sent one."""
        while True:
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                if conn.close_code is not None:
                    continue  # draining after our close frame
                if echo:
                    conn.last_seen = time.monotonic()
                    op = 0x1 if kind is WSMsgType.TEXT else 0x2
                    data = msg.data.encode("utf-8") if isinstance(msg.data, str) else msg.data
                    conn.push_frame(build_frame(data, op))
                else:
                    await conn.receive(msg.data)
            elif kind is WSMsgType.PING:
                conn.last_seen = time.monotonic()
                if conn.close_code is None:
                    conn.outbox.write_now(build_frame(msg.data, OP_PONG))
            elif kind is WSMsgType.PONG:
                conn.last_seen = time.monotonic()
            elif kind is WSMsgType.CLOSE:
                code = int(msg.data or 0)
                if conn.close_code is None:
                    # The peer started the close: answer it (1002 for a code
                    # no endpoint may send), then end the TCP connection.
                    reply = code or CloseCode.NORMAL if valid_close_code(code) else 1002
                    conn.close_code = reply
                    conn.outbox.write_now(close_frame(reply))
                    conn.outbox.overflowed = True
                transport.close()
                return code
            else:
                # CLOSED, CLOSING or ERROR: aiohttp already answered (e.g. 1009
                # for an oversized message) or the socket is gone.
                if kind is WSMsgType.ERROR and conn.close_code is None:
                    conn.close_code = ws.close_code or CloseCode.INTERNAL_ERROR
                return None
