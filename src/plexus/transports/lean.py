"""The listening socket and the WebSocket transport: socket <-> connection glue.

`LeanListener` is the protocol factory of the listening socket. Each new socket
gets a `LeanProtocol`, which counts it against its address's
`max_connections_per_ip` and buffers the request head (within
`http_request_timeout`). A `GET /ws` (or `/echo`) upgrade stays here, and so
does a `GET /sse`, whose socket becomes an event stream (`transports/sse.py`);
any other request is handed to aiohttp untouched, with the bytes read so far, so the web
app, `/health` and `/api/*` are served by aiohttp; the socket stays counted
until it closes.

The opening handshake, and the negotiation of permessage-deflate (RFC 7692),
are websockets' (`ServerProtocol.accept`, sans-I/O); after it nothing of
websockets is kept but its C `apply_mask`. `frames.FrameReader` splits what the
client sends into messages, and everything the server sends — replies,
pushes, pongs, close frames — goes through the connection's `Outbox`, in the
connection's wire format (`protocol/wire.py`), so ordering and the 4008 bound
hold. An idle connection holds the transport, one `LeanProtocol`, its
`FrameReader` and its `Connection`: nothing runs for it until bytes arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast

from aiohttp import web
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from yarl import URL

from plexus.exceptions import AuthError
from plexus.protocol.codec import (
    OP_BINARY,
    OP_TEXT,
    SUBPROTOCOLS,
    build_frame,
    close_frame,
    codec_for,
)
from plexus.protocol.codes import CloseCode
from plexus.protocol.wire import DeflateFormat, websocket_format
from plexus.transports.frames import Failure, FrameReader, Inflater, max_fragments
from plexus.transports.link import Endpoint, Link, Refusal, write_high_water

if TYPE_CHECKING:
    from plexus.transports.sse import SseTransport

log = logging.getLogger("plexus.ws")
# websockets logs every handshake at INFO: Plexus logs connections itself, so
# only its warnings and errors are kept.
_handshake_log = logging.getLogger("plexus.ws.handshake")
_handshake_log.setLevel(logging.WARNING)

# The request head is buffered up to this size; a longer one goes to aiohttp,
# which applies its own header limits (and its keep-alive timeout)...
HEAD_LIMIT: Final = 16 * 1024
# ...unless it is a request to a WebSocket path: those are buffered up to this
# size (big cookies), and refused with 431 beyond.
UPGRADE_HEAD_LIMIT: Final = 64 * 1024
# Messages read but not yet handled; beyond this the socket is not read until
# half of them are, so a client that floods commands is back-pressured.
MAX_PENDING: Final = 32
RESUME_AT: Final = MAX_PENDING // 2

OP_PONG: Final = 0xA
_SUBPROTOCOLS: Final = [Subprotocol(name) for name in SUBPROTOCOLS]


class _Handshake(ServerProtocol):
    """websockets' sans-I/O server, used for the opening handshake only."""

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        """The client's first choice among ours; none (JSON) when nothing matches.

        A method rather than websockets' `select_subprotocol` argument, which it
        binds to the instance: a reference cycle per handshake.
        """
        for name in subprotocols:
            if name in SUBPROTOCOLS:
                return name
        return None


def _reading(transport: asyncio.Transport) -> bool:
    return not transport.is_closing() and transport.is_reading()


def _paused(transport: asyncio.Transport) -> bool:
    return not transport.is_closing() and not transport.is_reading()


def http_error(refusal: Refusal, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 error response that ends the connection."""
    body = refusal.body()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (
        f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_TOO_MANY: Final = Refusal(429, "rate_limited", "too many connections from this address")
_HEAD_TOO_LARGE: Final = Refusal(
    431, "too_large", f"request head over {UPGRADE_HEAD_LIMIT // 1024} KiB"
)


class _Handed(asyncio.Protocol):
    """A socket handed to aiohttp: its protocol, and the end of the socket's count.

    A client may send a WebSocket upgrade on a keep-alive socket aiohttp
    already served (an aiohttp `ClientSession` does); aiohttp's route then
    gives the socket back (`take_back`), and what it reads goes to a
    `LeanProtocol` from there on. aiohttp still hears of the socket's end, so
    that it forgets its side of the connection.
    """

    __slots__ = ("_endpoint", "_inner", "_lean", "remote")

    def __init__(self, inner: asyncio.Protocol, endpoint: Endpoint, remote: str) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._lean: asyncio.Protocol | None = None
        self.remote = remote

    def take_back(self, lean: asyncio.Protocol) -> None:
        """Read for `lean` from now on (it takes over the socket's count too)."""
        self._lean = lean

    def data_received(self, data: bytes) -> None:
        if self._lean is not None:
            self._lean.data_received(data)
        else:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._lean is not None:
            return self._lean.eof_received()
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        (self._lean or self._inner).pause_writing()

    def resume_writing(self) -> None:
        (self._lean or self._inner).resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            if self._lean is not None:
                self._lean.connection_lost(exc)
            else:
                self._endpoint.socket_closed(self.remote)


class LeanListener:
    """The listening socket's protocol factory: counts sockets, buffers heads, takes upgrades.

    Args:
        endpoint: the transport-neutral endpoint (admission, bookkeeping).
        http: aiohttp's protocol factory (`AppRunner.server`).
        tls: whether the socket serves TLS (the scheme the Origin check compares).
        sse: the event streams' transport, which takes `GET /sse` (None: aiohttp's 404).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        http: Callable[[], asyncio.Protocol],
        *,
        tls: bool,
        sse: SseTransport | None = None,
    ) -> None:
        settings = endpoint.settings
        self.endpoint = endpoint
        self.http = http
        self.sse = sse
        self.scheme = "https" if tls else "http"
        # path -> whether it is the echo endpoint
        self.paths: dict[bytes, bool] = {b"/ws": False}
        if settings.echo_endpoint:
            self.paths[b"/echo"] = True
        self.max_message_size = settings.max_message_size
        self.max_fragments = max_fragments(settings.max_message_size)
        self.head_timeout = settings.http_request_timeout
        self.write_high_water = write_high_water(settings.max_queue_bytes)
        self.max_per_ip = settings.max_connections_per_ip
        # permessage-deflate: the server never keeps its context (so that a
        # push is compressed once for every client), and the client keeps its
        # own only where `compression_client_takeover` allows it.
        self.extensions = (
            [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    client_no_context_takeover=not settings.compression_client_takeover,
                )
            ]
            if settings.compression == "on"
            else None
        )
        # Every socket not (yet) handed to aiohttp, for the shutdown.
        self.protocols: set[Link] = set()
        self._endings: set[asyncio.Task[None]] = set()

    def __call__(self) -> LeanProtocol:
        return LeanProtocol(self)

    def upgrade(self, request: web.Request) -> web.StreamResponse:
        """aiohttp's handler of `GET /ws` (and `/echo`, `/sse`): a request aiohttp was given.

        An upgrade (or a `GET /sse`) reaches aiohttp only on a keep-alive
        socket it already served a request on: the socket is taken back and
        the upgrade done here, as on a new socket (frames a client sent
        before the answer to its upgrade would stay with aiohttp; clients
        wait for the answer). Anything else is answered 426.
        """
        transport = request.transport
        handed = transport.get_protocol() if transport is not None else None
        echo = self.paths.get(request.path.encode())
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower() and echo is not None
        stream = request.path == "/sse" and self.sse is not None
        if not (upgrade or stream) or not isinstance(handed, _Handed) or transport is None:
            return web.json_response(
                {"error": {"code": "bad_request", "message": "a WebSocket endpoint: upgrade"}},
                status=426,
                headers={"Upgrade": "websocket", "Connection": "Upgrade"},
            )
        version = request.version
        lines = [f"GET {request.raw_path} HTTP/{version.major}.{version.minor}"]
        lines += [
            f"{name.decode('latin-1')}: {value.decode('latin-1')}"
            for name, value in request.raw_headers
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        lean = LeanProtocol(self)
        lean.adopt(transport, handed.remote)
        handed.take_back(lean)
        # aiohttp writes nothing more on this socket: its response below fails
        # as if the peer had gone, and its handler ends.
        request.protocol.transport = None
        lean.data_received(head)
        return web.Response()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a connection's final task referenced until it is done."""
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    def abort_all(self) -> None:
        """Drop every socket still open (after the shutdown's 1001 had its time)."""
        for protocol in list(self.protocols):
            protocol.transport.abort()


class LeanProtocol(Link, asyncio.Protocol):
    """One socket: its request head, then (if it upgraded) its WebSocket connection.

    Messages are handled as they are read; one that must wait for I/O gets a
    task, and those read behind it wait in `_pending` for that task, so an
    idle connection runs nothing.
    """

    __slots__ = (
        "_head",
        "_over_limit",
        "_pending",
        "_task",
        "_write_paused",
        "listener",
        "reader",
    )

    direct_writes = True

    def __init__(self, listener: LeanListener) -> None:
        super().__init__(listener.endpoint)
        self.listener = listener
        self._head: bytearray | None = bytearray()
        self.reader: FrameReader | None = None  # set once the connection is open
        # Messages (and the connection's end) waiting for the task that handles them.
        self._pending: deque[str | bytes | Callable[[], None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._over_limit = False  # over max_connections_per_ip: answer 429 to the request
        self._write_paused = False  # the socket holds more unsent output than it should

    # ----- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not registered as asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        listener = self.listener
        listener.protocols.add(self)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        held = listener.endpoint.socket_opened(self.remote)
        limit = listener.max_per_ip
        if limit and held > limit:
            if held > 2 * limit:
                # Far over: not worth a buffer and a timer to refuse it politely.
                self.transport.abort()
                return
            self._over_limit = True
        # The close timer of a WebSocket doubles as the head timeout before it.
        self.drop_later(listener.head_timeout)

    def adopt(self, transport: asyncio.Transport, remote: str) -> None:
        """Serve a socket that was counted and handed to aiohttp before (see `upgrade`)."""
        self.transport = transport
        self.remote = remote
        self.listener.protocols.add(self)
        self.drop_later(self.listener.head_timeout)

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self._receive(data)
            return
        head = self._head
        if head is None:  # answered with an HTTP error: ignore the rest
            return
        start = max(0, len(head) - 3)
        head += data
        end = head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(head) > HEAD_LIMIT:
                if self._path(head) is None:
                    self._hand_off()
                elif len(head) > UPGRADE_HEAD_LIMIT:
                    self._refuse(_HEAD_TOO_LARGE)
            return
        if self._over_limit:
            self._refuse(_TOO_MANY)
            return
        if self.listener.sse is not None and _target(head) == b"/sse":
            self._stream(bytes(head[:end]))
            return
        echo = self._route(bytes(head[:end]))
        if echo is None:
            self._hand_off()
        else:
            self._upgrade(echo, end + 4)

    def eof_received(self) -> bool | None:
        return None  # close: a WebSocket peer that half-closes is gone

    def pause_writing(self) -> None:
        # The peer does not read what it is sent: stop reading what it sends
        # (commands, pings) until it does, so that it cannot make us answer more.
        self._write_paused = True
        if _reading(self.transport):
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        pending = self._pending
        if _paused(self.transport) and (pending is None or len(pending) < MAX_PENDING):
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        listener.protocols.discard(self)
        listener.endpoint.socket_closed(self.remote)
        self.stop_abort_timer()
        if self.reader is not None:
            self.listener.track(asyncio.get_running_loop().create_task(self._end()))

    # ----- the request head

    def _path(self, head: bytearray) -> bool | None:
        """For a `GET` of one of our paths: whether it is `/echo`; else None."""
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        parts = bytes(line).split(b" ")
        if len(parts) != 3 or parts[0] != b"GET":
            return None
        return self.listener.paths.get(parts[1].split(b"?", 1)[0])

    def _route(self, head: bytes) -> bool | None:
        """For a WebSocket upgrade to one of our paths: whether it is `/echo`; else None."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"GET":
            return None
        echo = self.listener.paths.get(parts[1].split(b"?", 1)[0])
        if echo is None:
            return None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"upgrade":
                return echo if b"websocket" in value.lower() else None
        return None

    def _hand_off(self) -> None:
        """Give the socket, and the bytes read from it, to aiohttp."""
        assert self._head is not None
        data = bytes(self._head)
        if self._over_limit:  # a head over HEAD_LIMIT: still refused
            self._refuse(_TOO_MANY)
            return
        self._head = None
        self.stop_abort_timer()
        listener = self.listener
        listener.protocols.discard(self)
        handler = listener.http()
        transport = self.transport
        handler.connection_made(transport)
        transport.set_protocol(_Handed(handler, listener.endpoint, self.remote))
        handler.data_received(data)

    def _stream(self, head: bytes) -> None:
        """`GET /sse`: the socket becomes an event stream, or is answered with a refusal."""
        sse = self.listener.sse
        assert sse is not None
        self._head = None
        self.stop_abort_timer()
        transport = self.transport
        stream = sse.open(self.listener, transport, self.remote, head)
        if stream is None:
            return  # refused: this protocol sees the socket to its end
        self.listener.protocols.discard(self)
        handed = transport.get_protocol()
        if isinstance(handed, _Handed):  # taken back from aiohttp (`upgrade`)
            handed.take_back(stream)
        else:
            transport.set_protocol(stream)

    def _refuse(self, refusal: Refusal, headers: Sequence[tuple[str, str]] = ()) -> None:
        """End the socket with an HTTP error instead of a WebSocket."""
        self._head = None
        self.transport.write(http_error(refusal, headers))
        self.transport.close()

    def _upgrade(self, echo: bool, head_size: int) -> None:
        """Do the opening handshake and open the connection, or refuse it.

        `head_size`: the length of the request head; any bytes after it are
        frames the client sent without waiting for the handshake's answer.
        """
        assert self._head is not None
        head = bytes(self._head)
        self.stop_abort_timer()
        listener, transport = self.listener, self.transport
        ws = _Handshake(
            subprotocols=_SUBPROTOCOLS, extensions=listener.extensions, logger=_handshake_log
        )
        ws.receive_data(head[:head_size])
        events = ws.events_received()
        if not events or not isinstance(events[0], Request):
            self._refuse_handshake(ws)
            return
        request = events[0]
        response = ws.accept(request)
        if response.status_code != 101:
            self._refuse_handshake(ws, response.status_code, list(response.headers.raw_items()))
            return
        headers = request.headers
        origins = headers.get_all("Origin")
        hosts = headers.get_all("Host")
        remote = self.remote
        endpoint = listener.endpoint
        refusal = endpoint.admit(
            origins[0] if origins else None, listener.scheme, hosts[0] if hosts else None, remote
        )
        if refusal is not None:
            self._refuse(refusal)
            return
        try:
            query = URL(request.path).query
            token, data = query.get("token", ""), query.get("data")
        except ValueError:
            token, data = "", None
        credentials, refused = endpoint.verify_token(token, echo=echo)
        ws.send_response(response)
        transport.write(b"".join(ws.data_to_send()))
        self._head = None
        if refused is not None:
            _refuse_token(transport, refused, remote)
            return
        deflate = next((e for e in ws.extensions if isinstance(e, PerMessageDeflate)), None)
        inflater = None
        if deflate is not None:
            inflater = Inflater(
                deflate.remote_max_window_bits, takeover=not deflate.remote_no_context_takeover
            )
        self.reader = FrameReader(
            self,
            max_size=listener.max_message_size,
            max_fragments=listener.max_fragments,
            inflater=inflater,
        )
        transport.set_write_buffer_limits(high=listener.write_high_water)
        self.echo = echo
        wire = websocket_format(
            codec_for(ws.subprotocol), None if deflate is None else deflate.local_max_window_bits
        )
        handshake = endpoint.handshake(headers.raw_items(), data)
        conn = endpoint.open(self, wire, credentials, handshake)
        if not echo and conn.starting:  # connect decision, server-side subscriptions
            self._task = asyncio.get_running_loop().create_task(self._run(start=True))
        if len(head) > head_size:  # frames sent right behind the request
            self._receive(head[head_size:])

    def _refuse_handshake(
        self, ws: ServerProtocol, status: int = 0, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer an upgrade that is not a valid opening handshake, as websockets would.

        Its status (400 for an unparsable request), with a JSON body like
        every refusal, and its `Upgrade`/`Allow` headers where it gives them.
        """
        if not status:
            written = b"".join(ws.data_to_send())  # an answer to a head it could not parse
            status = int(written.split(b" ", 2)[1]) if written.startswith(b"HTTP/") else 400
        reason = str(ws.handshake_exc or "not a valid WebSocket upgrade")
        kept = [(name, value) for name, value in headers if name in ("Upgrade", "Allow")]
        self._refuse(Refusal(status, "bad_request", f"invalid WebSocket upgrade: {reason}"), kept)

    # ----- frames: the FrameReader's receiver

    def _receive(self, data: bytes) -> None:
        reader = self.reader
        assert reader is not None
        try:
            reader.feed(data)
        except Failure as exc:
            self._then(partial(self._fail_and_end, exc.code, exc.reason))
        except Exception:
            self.crashed()

    def on_message(self, payload: str | bytes) -> None:
        """A whole message (at most `max_message_size` bytes: the reader counted)."""
        conn = self.conn
        if conn.close_code is not None:
            return  # draining after our close frame
        if self.echo:
            self._echo(payload)
        elif self._task is not None:
            self._queue(payload)  # after the messages before it
        else:
            waiting = conn.handle(payload)
            if waiting is not None:
                self._task = asyncio.get_running_loop().create_task(self._run(waiting))

    def on_ping(self, payload: bytes) -> None:
        """Answer behind the frames already queued.

        The pong counts against `max_queue_bytes` like any frame (a client
        that sends pings and never reads is a slow consumer); past a run of
        them in the queue, it replaces the last (`Outbox.push_pong`).
        """
        conn = self.conn
        conn.last_seen = time.monotonic()
        if conn.close_code is None:
            conn.outbox.push_pong(build_frame(payload, OP_PONG))

    def on_pong(self, payload: bytes) -> None:
        """The peer is alive."""
        self.conn.last_seen = time.monotonic()

    def on_close(self, code: int, reason: str) -> None:
        """The peer's close frame: answered after the messages read before it."""
        self._then(partial(self._peer_closed, code))

    def _echo(self, payload: str | bytes) -> None:
        """`/echo`: send a message back through the same outbox as every other frame."""
        conn = self.conn
        conn.last_seen = time.monotonic()
        text = isinstance(payload, str)
        data = payload.encode() if isinstance(payload, str) else payload
        opcode = OP_TEXT if text else OP_BINARY
        wire = conn.wire
        if isinstance(wire, DeflateFormat):
            conn.push_frame(wire.deflater.frame(data, opcode))
        else:
            conn.push_frame(build_frame(data, opcode))

    def _queue(self, item: str | bytes | Callable[[], None]) -> None:
        """Queue a message, or what to do, behind the running task's work."""
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        pending.append(item)
        if len(pending) >= MAX_PENDING and _reading(self.transport):
            self.transport.pause_reading()

    def _then(self, action: Callable[[], None]) -> None:
        """Run `action` (the end of the connection) after the messages read before it."""
        if self._task is None:
            action()
        else:
            self._queue(action)

    async def _run(
        self, waiting: Coroutine[Any, Any, None] | None = None, *, start: bool = False
    ) -> None:
        """Finish a message that had to wait, then handle those queued behind it, in order.

        Exists only while some message waits for I/O: most are handled in
        `data_received` itself, and idle connections run nothing.
        """
        conn = self.conn
        transport = self.transport
        try:
            if start:
                await conn.start()
            if waiting is not None:
                await waiting
            while pending := self._pending:
                item = pending.popleft()
                if len(pending) == RESUME_AT and _paused(transport) and not self._write_paused:
                    transport.resume_reading()
                if isinstance(item, str | bytes):
                    waiting = conn.handle(item)
                    if waiting is not None:
                        await waiting
                else:
                    item()
        except Exception:
            self.crashed()
        finally:
            self._task = self._pending = None
            if _paused(transport) and not self._write_paused:
                transport.resume_reading()

    # ----- the end

    def send_close(self, code: int, reason: str = "") -> None:
        """Write a close frame after everything queued, then accept no more output.

        A slow consumer's queue was already dropped by its outbox; for every
        other close the replies queued so far go out first. The socket is
        dropped if the peer does not end it within CLOSE_TIMEOUT.
        """
        outbox = self.conn.outbox
        outbox.write_now(close_frame(code, reason))
        outbox.overflowed = True  # nothing may follow a close frame
        self.drop_later()

    def _peer_closed(self, code: int) -> None:
        """A close frame with `code` (0: none) arrived: answer it and end the TCP connection.

        The answer echoes the code (the reader refused invalid ones). When we
        started the close, this is the peer's answer and needs none.
        """
        conn = self.conn
        if conn.close_code is None:
            conn.close_code = code or CloseCode.NORMAL
            conn.outbox.write_now(close_frame(conn.close_code))
            conn.outbox.overflowed = True
        self.transport.close()

    def _fail_and_end(self, code: int, reason: str) -> None:
        """The peer broke the protocol or sent too big a message: close with `code`, then end."""
        if self.transport.is_closing():
            return
        conn = self.conn
        if conn.close_code is None:
            conn.close_code = code
            self.send_close(code, reason)
        # Half-close and keep reading (the reader ignores it all) until the
        # peer closes too: closing with its unread input in our socket would
        # make the kernel reset the connection, and the peer might lose the
        # close frame. The close timer drops a peer that never closes.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    async def _end(self) -> None:
        """The socket is gone: let the waiting messages finish, then clean up."""
        try:
            if self._task is not None:
                await asyncio.wait([self._task])
            await self.endpoint.finish(self)
        except Exception:  # nobody awaits this task: log here
            log.exception("cleanup of %s failed", self.conn.client_id)


def _target(head: bytearray) -> bytes | None:
    """The path (without query) of a `GET` request head; None for another method."""
    line = head[: head.find(b"\r\n")]
    parts = bytes(line).split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    return parts[1].split(b"?", 1)[0]


def _refuse_token(transport: asyncio.Transport, refused: AuthError, remote: str) -> None:
    """Close a just-accepted WebSocket with 4001/4002 and no `welcome`.

    Accept, then close at once: a browser can read the code of a close
    frame, never the status of a refused upgrade.
    """
    transport.write(close_frame(refused.close_code, str(refused)[:100]))
    transport.close()
    log.info("refused token from %s: %s", remote, refused)
