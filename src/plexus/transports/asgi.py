"""The WebSocket transport of an ASGI server (`plexus.asgi` mounted in another app).

The ASGI server (uvicorn, hypercorn, daphne) owns the socket, the opening
handshake, the frames, permessage-deflate and the pings. This transport moves
whole messages between its `receive`/`send` and the same `Connection` the
native server uses, through the same `Endpoint` (Origin and connection limits,
the token, the application's connect call, bookkeeping, shutdown) and the same
bounded `Outbox`: one connection code path for both.

Message boundaries. An outbox coalesces what one loop iteration queued into
one write, a byte stream; ASGI sends one message per `send`. A connection here
therefore uses its WebSocket format's own frames (`AsgiFormat`: the same bytes
under the same index, so fan-out still builds a frame once for every
subscriber), and `AsgiOutput.write` splits what it is given back into frames
by their 2 to 10 byte headers: one ASGI event per frame. The format has no
ping: the ASGI server pings by itself, and the server-wide heartbeat leaves
connections without one alone.

One task per connection sends, in order (`AsgiLink._send_loop`). uvicorn's
`send` waits while the socket's buffer is full, so output a client does not
read piles up in `AsgiOutput`, which the outbox counts as the transport's
unsent bytes: such a client is closed with 4008, as on the native server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from yarl import URL

from plexus.protocol.codec import MSGPACK, OP_TEXT, SUBPROTOCOLS, codec_for
from plexus.protocol.codes import CloseCode
from plexus.protocol.wire import JSON_WS, MSGPACK_WS, WireFormat
from plexus.transports.link import CLOSE_TIMEOUT, Endpoint, Link, Refusal

log = logging.getLogger("plexus.ws")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MESSAGE_TOO_BIG: Final = 1009
_TOO_MANY: Final = Refusal(429, "rate_limited", "too many connections from this address")


class AsgiFormat(WireFormat):
    """A WebSocket format's frames, for a connection whose server frames and pings itself.

    Not registered: it takes the index of the format it wraps, so fan-out
    reuses that format's frame (one build for every subscriber of the codec).
    """

    __slots__ = ("base",)

    def __init__(self, base: WireFormat) -> None:
        super().__init__(f"asgi-{base.name}", base.codec, ping=None)
        self.index = base.index
        self.base = base

    def frame(self, payload: bytes) -> bytes:
        return self.base.frame(payload)

    def message(self, message: dict[str, Any]) -> bytes:
        return self.base.message(message)


ASGI_JSON: Final = AsgiFormat(JSON_WS)
ASGI_MSGPACK: Final = AsgiFormat(MSGPACK_WS)


def frames_to_events(data: bytes) -> list[Message]:
    """The ASGI `websocket.send` events of the unmasked, whole frames in `data`."""
    events: list[Message] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        opcode = data[pos] & 0x0F
        length = data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length = int.from_bytes(view[pos : pos + 2], "big")
            pos += 2
        elif length == 127:
            length = int.from_bytes(view[pos : pos + 8], "big")
            pos += 8
        stop = pos + length
        if opcode == OP_TEXT:
            events.append({"type": "websocket.send", "text": str(view[pos:stop], "utf-8")})
        else:
            events.append({"type": "websocket.send", "bytes": bytes(view[pos:stop])})
        pos = stop
    return events


class AsgiOutput(asyncio.Transport):
    """Where a connection's outbox writes: frames waiting for the send task.

    Attributes:
        chunks: what the outbox wrote and the send task has not sent yet.
        unsent: their size in bytes (the outbox's `get_write_buffer_size`).
        closing: no more output is accepted.
        close_event: the `websocket.close` event to send after the chunks, if any.
    """

    __slots__ = ("_waiter", "chunks", "close_event", "closing", "unsent")

    def __init__(self) -> None:
        super().__init__()
        self.chunks: deque[bytes] = deque()
        self.unsent = 0
        self.closing = False
        self.close_event: Message | None = None
        self._waiter: asyncio.Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return
        self.chunks.append(bytes(data))
        self.unsent += len(data)
        self.wake()

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        """Accept no more output (what is queued is still sent)."""
        self.closing = True
        self.wake()

    def abort(self) -> None:
        """Drop what is queued and accept no more."""
        self.closing = True
        self.chunks.clear()
        self.unsent = 0
        self.wake()

    def wake(self) -> None:
        """Let the send task run if it waits."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is written or the output closes."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class AsgiLink(Link):
    """One ASGI WebSocket: the connection's output through `send`, its input from `receive`."""

    __slots__ = ("_main", "_receiving", "_send", "_sender", "ended", "output", "peer_gone")

    def __init__(self, endpoint: Endpoint, remote: str, send: Send) -> None:
        super().__init__(endpoint)
        self.remote = remote
        self.output = AsgiOutput()
        self.transport = self.output
        self._send = send
        self._sender: asyncio.Task[None] | None = None
        self._main: asyncio.Task[Any] | None = None
        self._receiving = False
        self.ended = False  # nothing more is sent: the close went out, or sending failed
        self.peer_gone = False  # the server said the peer disconnected

    def start_sending(self) -> None:
        """Start the task that sends the connection's output (before anything is queued)."""
        self._main = asyncio.current_task()
        self._sender = asyncio.get_running_loop().create_task(
            self._send_loop(), name="plexus-asgi-send"
        )

    def send_close(self, code: int, reason: str = "") -> None:
        """Send `websocket.close` after what is queued (a slow consumer's queue is dropped)."""
        outbox = self.conn.outbox
        output = self.output
        if code == CloseCode.SLOW_CONSUMER:
            output.abort()  # the outbox dropped its queue; what it wrote before goes too
        else:
            outbox.flush()
        outbox.overflowed = True  # nothing may follow the close
        output.close_event = {"type": "websocket.close", "code": int(code), "reason": reason}
        output.close()
        # A peer that does not read never lets the close out (`send` waits
        # for its socket's buffer): give up on it in time.
        self.drop_later()

    def drop_later(self, delay: float = CLOSE_TIMEOUT) -> None:
        """Stop sending and reading in `delay` seconds unless `stop_abort_timer` is called first.

        The socket is the ASGI server's: what this drops is our side of it
        (the connection ends and is cleaned up; the server keeps its socket
        until its own timeouts).
        """
        if self._abort is None:
            self._abort = asyncio.get_running_loop().call_later(delay, self._drop)

    def _drop(self) -> None:
        self._abort = None
        sender = self._sender
        if sender is not None and not sender.done():
            sender.cancel()
        self._stop_reading()

    async def _send_loop(self) -> None:
        output = self.output
        send = self._send
        try:
            while True:
                chunks = output.chunks
                if not chunks:
                    if output.closing:
                        break
                    await output.wait()
                    continue
                data = chunks.popleft()
                for event in frames_to_events(data):
                    await send(event)
                output.unsent -= len(data)
            close = output.close_event
            if close is not None:
                # A peer that stopped reading never lets the close out: give up.
                await asyncio.wait_for(send(close), CLOSE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away (the server raises OSError), or worse
            log.debug("send to %s ended: %r", self.conn.client_id, exc)
        finally:
            output.abort()
        self._stop_reading()

    def _stop_reading(self) -> None:
        """Nothing more can be sent: end the receive loop if it is waiting for the peer."""
        self.ended = True
        main = self._main
        if self._receiving and main is not None and not main.done():
            main.cancel()

    async def read(self, receive: Receive) -> None:
        """Hand the peer's messages to the connection until it disconnects or output ends."""
        conn = self.conn
        limit = self.endpoint.settings.max_message_size
        while not self.ended:
            self._receiving = True
            try:
                event = await receive()
            finally:
                self._receiving = False
            kind = event["type"]
            if kind == "websocket.receive":
                payload = event.get("text")
                if payload is None:
                    payload = event.get("bytes")
                    if payload is None:
                        continue
                if conn.close_code is not None:
                    continue  # draining after our close
                if _too_big(payload, limit):
                    conn.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                    continue
                waiting = conn.handle(payload)
                if waiting is not None:
                    await waiting
            elif kind == "websocket.disconnect":
                self.peer_gone = True
                if conn.close_code is None:
                    code = int(event.get("code") or 1005)
                    # The peer closed first. 1005 (no code, or a lost socket
                    # after the handshake in uvicorn) counts as 1000, as a close
                    # frame without a code does on the native server.
                    conn.close_code = CloseCode.NORMAL if code == 1005 else code
                return

    async def end(self) -> None:
        """The WebSocket is over: let a close we started go out, then clean the connection up."""
        sender = self._sender
        if sender is not None and not sender.done():
            if self.output.close_event is not None and not self.peer_gone:
                # What was queued before the close, then the close (e.g. 1011
                # after a crash), within the closing handshake's time.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(sender), CLOSE_TIMEOUT)
            self.output.abort()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        self.output.abort()
        await self.endpoint.finish(self)


def _too_big(payload: str | bytes, limit: int) -> bool:
    """Whether a message is over `limit` bytes (text counted as UTF-8, as on the wire)."""
    if isinstance(payload, bytes):
        return len(payload) > limit
    # A character is 1 to 4 bytes: encode only when the length cannot tell.
    return len(payload) > limit or (len(payload) * 4 > limit and len(payload.encode()) > limit)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def refuse(scope: Scope, send: Send, refusal: Refusal) -> None:
    """Answer an upgrade with an HTTP error, as the native server does.

    With the `websocket.http.response` extension the status and JSON body
    are ours; without it the server answers 403 to a close before accept.
    """
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": refusal.status,
                "headers": [(b"content-type", b"application/json; charset=utf-8")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": refusal.body()})
    else:
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})


async def serve_websocket(endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one ASGI WebSocket (`scope["type"] == "websocket"`) as a Plexus connection."""
    if (await receive())["type"] != "websocket.connect":
        return  # gone before it began
    client = scope.get("client")
    remote = str(client[0]) if client else ""
    settings = endpoint.settings
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    refusal = endpoint.admit(_header(scope, b"origin"), scheme, _header(scope, b"host"), remote)
    # Counted here are this node's WebSockets per address (the ASGI server
    # keeps the HTTP sockets, and its own limits on them).
    held = endpoint.socket_opened(remote)
    try:
        if (
            refusal is None
            and settings.max_connections_per_ip
            and held > (settings.max_connections_per_ip)
        ):
            refusal = _TOO_MANY
        if refusal is not None:
            await refuse(scope, send, refusal)
            return
        await _open(endpoint, scope, receive, send, remote)
    finally:
        endpoint.socket_closed(remote)


async def _open(
    endpoint: Endpoint, scope: Scope, receive: Receive, send: Send, remote: str
) -> None:
    subprotocol = next((p for p in scope.get("subprotocols", ()) if p in SUBPROTOCOLS), None)
    try:
        query = URL("/?" + bytes(scope.get("query_string", b"")).decode("latin-1")).query
        token, data = query.get("token", ""), query.get("data")
    except ValueError:
        token, data = "", None
    credentials, refused = endpoint.verify_token(token, echo=False)
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    if refused is not None:
        # Accept, then close at once: a browser can read a close code, never
        # the status of a refused upgrade.
        await send(
            {"type": "websocket.close", "code": refused.close_code, "reason": str(refused)[:100]}
        )
        log.info("refused token from %s: %s", remote, refused)
        return
    link = AsgiLink(endpoint, remote, send)
    wire = ASGI_MSGPACK if codec_for(subprotocol) is MSGPACK else ASGI_JSON
    headers = [
        (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
        for k, v in scope.get("headers", ())
    ]
    link.start_sending()
    conn = endpoint.open(link, wire, credentials, endpoint.handshake(headers, data))
    try:
        if conn.starting:  # the connect decision, server-side subscriptions
            await conn.start()
        await link.read(receive)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not link.ended or task is None:
            raise  # the server cancelled us, not our send task
        task.uncancel()
    except Exception:
        link.crashed()
    finally:
        await link.end()
