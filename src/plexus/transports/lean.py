"""The listening socket (both engines), and the lean WebSocket engine: an asyncio
protocol around websockets' sans-I/O core.

An idle connection served by aiohttp holds a request, its handler coroutine, a
`WebSocketResponse` and its reader: most of 16 KB. Here it holds the transport,
one `LeanProtocol` and websockets' `ServerProtocol` (the frame parser), and
nothing runs for it until bytes arrive.

`LeanListener` is the protocol factory of the listening socket. Each new socket
gets a `LeanProtocol`, which counts it against its address's
`max_connections_per_ip` and buffers the request head (within
`http_request_timeout`): with the lean engine a `GET /ws` (or `/echo`) upgrade
stays with it; any other request is handed to aiohttp untouched, with the bytes
read so far, so the web app, `/health` and `/api/*` are served exactly as with
the aiohttp engine (and so is an upgrade this engine does not take, such as one
whose head is over HEAD_LIMIT). With the aiohttp engine every request is handed
over; the socket stays counted until it closes.

websockets only parses. Everything sent after the handshake — replies, pushes,
pongs, close frames — goes through the connection's `Outbox`, as with the
aiohttp engine, so ordering and the 4008 bound hold; the frames websockets
queues itself (automatic pongs and close answers) are dropped unsent.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from http import HTTPStatus
from typing import Any, Final, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Event, Protocol, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from yarl import URL

from plexus.protocol.codec import SUBPROTOCOLS
from plexus.transports.websocket import Link, Refusal, WebSocketEndpoint, write_high_water

try:  # websockets' C unmasking, as websockets.frames picks it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - built wheels carry the C extension
    from websockets.utils import apply_mask

log = logging.getLogger("plexus.ws")
# websockets logs every open and close at INFO, and every frame at DEBUG:
# Plexus logs connections itself, so only its warnings and errors are kept.
_frames_log = logging.getLogger("plexus.ws.frames")
_frames_log.setLevel(logging.WARNING)

# The request head is buffered up to this size; a longer one goes to aiohttp,
# which applies its own header limits (and its keep-alive timeout).
HEAD_LIMIT: Final = 16 * 1024
# Messages read but not yet handled; beyond this the socket is not read until
# half of them are, so a client that floods commands is back-pressured.
MAX_PENDING: Final = 32
RESUME_AT: Final = MAX_PENDING // 2

NO_STATUS: Final = 1005  # websockets' code for a close frame without one
INVALID_DATA: Final = 1007
MESSAGE_TOO_BIG: Final = 1009

_SUBPROTOCOLS: Final = [Subprotocol(name) for name in SUBPROTOCOLS]
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class _Failure(Exception):
    """Input that fails the connection with `code` (the message is the close reason)."""

    code = INVALID_DATA


class _InvalidUtf8(_Failure):
    """A text message that is not UTF-8: the connection fails with 1007."""


class _TooManyFragments(_Failure):
    """A message in more frames than `max_fragments(max_message_size)`: 1009."""

    code = MESSAGE_TOO_BIG


def max_fragments(max_message_size: int) -> int:
    """Frames one message may come in: one per 64 bytes of the size limit, at least 64.

    websockets counts payload bytes only, and an empty continuation frame
    adds none: a message of endless empty fragments cost CPU and a list entry
    per frame, forever. A message of the largest size in fragments of 64
    bytes or more always fits.
    """
    return max(64, max_message_size // 64)


class _ServerProtocol(ServerProtocol):
    """websockets' sans-I/O server: negotiates like aiohttp, holds nothing after the handshake."""

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        """The client's first choice among ours; none (JSON) when nothing matches, like aiohttp.

        A method rather than websockets' `select_subprotocol` argument, which it
        binds to the instance: a reference cycle per connection.
        """
        for name in subprotocols:
            if name in SUBPROTOCOLS:
                return name
        return None

    def drop_handshake(self) -> None:
        """Parse frames with a new parser, which does not hold the request.

        The handshake's parser keeps the request (2 KB with its headers) in its
        frame for as long as the connection lives. Only call this when no byte
        followed the request head: a partly parsed frame would be lost.
        """
        self.parser = Protocol.parse(self)
        next(self.parser)


def _check_utf8(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> None:
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError as exc:
        raise _InvalidUtf8(f"invalid UTF-8: {exc.reason}") from None


def _reading(transport: asyncio.Transport) -> bool:
    return not transport.is_closing() and transport.is_reading()


def _paused(transport: asyncio.Transport) -> bool:
    return not transport.is_closing() and not transport.is_reading()


def http_error(refusal: Refusal) -> bytes:
    """A complete HTTP/1.1 error response that ends the connection."""
    body = refusal.body()
    head = (
        f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_TOO_MANY: Final = Refusal(429, "rate_limited", "too many connections from this address")


class _Handed(asyncio.Protocol):
    """A socket handed to aiohttp: its protocol, and the end of the socket's count."""

    __slots__ = ("_endpoint", "_inner", "_remote")

    def __init__(self, inner: asyncio.Protocol, endpoint: WebSocketEndpoint, remote: str) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._remote = remote

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._endpoint.socket_closed(self._remote)


class LeanListener:
    """The listening socket's protocol factory: counts sockets, buffers heads, takes upgrades.

    Args:
        endpoint: the engine-neutral WebSocket endpoint.
        http: aiohttp's protocol factory (`AppRunner.server`).
        tls: whether the socket serves TLS (the scheme the Origin check compares).

    With `ws_engine` aiohttp it takes no upgrade itself: every request goes to
    aiohttp once its head is in.
    """

    def __init__(
        self,
        endpoint: WebSocketEndpoint,
        http: Callable[[], asyncio.Protocol],
        *,
        tls: bool,
    ) -> None:
        settings = endpoint.settings
        self.endpoint = endpoint
        self.http = http
        self.scheme = "https" if tls else "http"
        # path -> whether it is the echo endpoint
        self.paths: dict[bytes, bool] = {}
        if settings.ws_engine == "lean":
            self.paths[b"/ws"] = False
            if settings.echo_endpoint:
                self.paths[b"/echo"] = True
        self.max_message_size = settings.max_message_size
        self.max_fragments = max_fragments(settings.max_message_size)
        self.head_timeout = settings.http_request_timeout
        self.write_high_water = write_high_water(settings.max_queue_bytes)
        self.max_per_ip = settings.max_connections_per_ip
        # Every socket not (yet) handed to aiohttp, for the shutdown.
        self.protocols: set[LeanProtocol] = set()
        self._endings: set[asyncio.Task[None]] = set()

    def __call__(self) -> LeanProtocol:
        return LeanProtocol(self)

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
        "_input",
        "_need",
        "_over_limit",
        "_parts",
        "_pending",
        "_task",
        "_utf8",
        "_write_paused",
        "listener",
        "max_size",
        "ws",
    )

    def __init__(self, listener: LeanListener) -> None:
        super().__init__(listener.endpoint)
        self.listener = listener
        self._head: bytearray | None = bytearray()
        self.ws: ServerProtocol | None = None  # set once the connection is open
        # Fragments of the message being assembled, and its UTF-8 decoder if text.
        self._parts: list[bytes] | None = None
        self._utf8: codecs.IncrementalDecoder | None = None
        # Messages (and the connection's end) waiting for the task that handles them.
        self._pending: deque[str | bytes | Callable[[], None]] | None = None
        self._task: asyncio.Task[None] | None = None
        # Input after the last whole frame, kept until `_need` bytes are there.
        self._input: bytearray | None = None
        self._need = 0
        self._over_limit = False  # over max_connections_per_ip: answer 429 to the request
        self._write_paused = False  # the socket holds more unsent output than it should
        self.max_size = listener.max_message_size

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
        self._abort = asyncio.get_running_loop().call_later(
            listener.head_timeout, self.transport.close
        )

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
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
                self._hand_off()
            return
        if self._over_limit:
            self._head = None
            self._answer(http_error(_TOO_MANY))
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
        if self.ws is not None:
            self.listener.track(asyncio.get_running_loop().create_task(self._end()))

    # ----- the request head

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

    def _hand_off(self, data: bytes | None = None) -> None:
        """Give the socket, and the bytes read from it (`data`, or the head buffer), to aiohttp."""
        if data is None:
            assert self._head is not None
            data = bytes(self._head)
        if self._over_limit:  # a head over HEAD_LIMIT: still refused
            self._head = None
            self._answer(http_error(_TOO_MANY))
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

    def _answer(self, response: bytes) -> None:
        """End the socket with an HTTP response instead of a WebSocket."""
        self.transport.write(response)
        self.transport.close()

    def _upgrade(self, echo: bool, head_size: int) -> None:
        """Do the opening handshake and open the connection, or refuse it.

        A request that websockets cannot parse, or that is not a valid opening
        handshake, goes to aiohttp, which answers it as the aiohttp engine does.
        `head_size`: the length of the request head; any bytes after it are
        frames the client sent without waiting for the handshake's answer.
        """
        assert self._head is not None
        head, self._head = bytes(self._head), None
        self.stop_abort_timer()
        listener, transport = self.listener, self.transport
        ws = _ServerProtocol(
            subprotocols=_SUBPROTOCOLS, max_size=listener.max_message_size, logger=_frames_log
        )
        ws.receive_data(head[:head_size])
        events = ws.events_received()
        if not events or not isinstance(events[0], Request):
            self._hand_off(head)
            return
        request = events[0]
        response = ws.accept(request)
        if response.status_code != 101:
            self._hand_off(head)
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
            self._answer(http_error(refusal))
            return
        try:
            query = URL(request.path).query
            token, data = query.get("token", ""), query.get("data")
        except ValueError:
            token, data = "", None
        credentials, refused = endpoint.verify_token(token, echo=echo)
        ws.send_response(response)
        transport.write(b"".join(ws.data_to_send()))
        if refused is not None:
            endpoint.refuse_token(transport, refused, remote)
            return
        # websockets was given the head alone: no frame is half parsed.
        ws.drop_handshake()
        transport.set_write_buffer_limits(high=listener.write_high_water)
        self.echo, self.ws = echo, ws
        handshake = endpoint.handshake(headers.raw_items(), data)
        conn = endpoint.open(self, transport, ws.subprotocol, credentials, handshake)
        if not echo and conn.starting:  # connect decision, server-side subscriptions
            self._task = asyncio.get_running_loop().create_task(self._run(start=True))
        if len(head) > head_size:  # frames sent right behind the request
            self._receive(head[head_size:])

    # ----- frames

    def _receive(self, data: bytes) -> None:
        """Split input into frames: whole messages in one frame are handled here, the rest
        by websockets.

        websockets' parser (a generator stepping through each frame) cost about
        a quarter of the server's CPU in the round-trip benchmark. The common
        frame — a whole, masked text or binary message within the size limit —
        is unmasked here with websockets' own C `apply_mask`. Every other frame
        (control frames, fragments) is given to websockets whole, so its parser
        always starts at a frame boundary and keeps every check it makes; a
        frame that is invalid or too big is given to it with all that follows,
        and it fails the connection as it would have.
        """
        ws = self.ws
        assert ws is not None
        if ws.eof_sent:
            return  # after a close frame or a failure, the rest is ignored
        pending = self._input
        if pending is not None:
            pending += data
            if len(pending) < self._need:
                return
            data, self._input = bytes(pending), None
        try:
            self._split(ws, data)
        except _Failure as exc:
            if ws.state is State.OPEN:
                ws.fail(exc.code)  # so that websockets ignores the rest
            self._then(partial(self._fail_and_end, exc.code, str(exc)))
        except Exception:
            self.crashed()

    def _split(self, ws: ServerProtocol, data: bytes) -> None:
        end = len(data)
        pos = 0
        max_size = self.max_size
        while pos < end:
            if end - pos < 2:
                self._keep(data, pos, 2)
                return
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            start = pos + 6  # the payload's, after a 2-byte head and the mask
            if length >= 126:
                start += 2 if length == 126 else 8
                if end < start:
                    self._keep(data, pos, start - pos)
                    return
                length = int.from_bytes(data[pos + 2 : start - 4])
            if length > max_size or not second & 0x80:
                # Too big or unmasked: websockets fails the connection.
                ws.receive_data(data[pos:])
                self._events(ws, ws.events_received())
                return
            stop = start + length
            if end < stop:
                self._keep(data, pos, stop - pos)
                return
            if (first == 0x81 or first == 0x82) and ws.current_size is None:
                # FIN, no extension bits, text or binary, not inside a fragmented message.
                payload = apply_mask(data[start:stop], data[start - 4 : start])
                self._message(payload, first == 0x81)
            else:
                ws.receive_data(data[pos:stop])
                self._events(ws, ws.events_received())
                if ws.eof_sent:
                    return
            pos = stop

    def _keep(self, data: bytes, pos: int, need: int) -> None:
        """Keep the incomplete frame at `pos` until `need` bytes of it arrived."""
        self._input = bytearray(data[pos:])
        self._need = need

    def _events(self, ws: ServerProtocol, events: list[Event]) -> None:
        """Handle what websockets parsed (`_receive` catches what this raises)."""
        ws.data_to_send()  # websockets' own pongs and close answers: ours go via the outbox
        for event in events:
            # Only the first event is a request, and the handshake took it.
            frame = cast(Frame, event)
            opcode = frame.opcode
            # A server unmasks every payload into a new bytes object.
            data = cast(bytes, frame.data)
            if opcode is Opcode.PING:
                self.ping(data)
            elif opcode is Opcode.PONG:
                self.pong()
            elif opcode is not Opcode.CLOSE:
                self._data(opcode, data, frame.fin)
        if ws.eof_sent:
            # A close frame came (maybe inside a fragmented message, which
            # websockets calls a protocol error and RFC 6455 5.4 allows),
            # or websockets failed the connection and stopped parsing.
            received = ws.close_rcvd
            if received is not None:
                code = 0 if received.code == NO_STATUS else received.code
                self._then(partial(self.peer_closed, code))
            else:
                sent = ws.close_sent
                assert sent is not None  # we never feed an EOF, which fails without one
                self._then(partial(self._fail_and_end, sent.code, sent.reason))

    def _data(self, opcode: Opcode, data: bytes, fin: bool) -> None:
        """A data frame: deliver it, or add it to the fragmented message it belongs to."""
        utf8 = self._utf8
        if opcode is Opcode.CONT:
            # websockets refused a continuation without a message to continue.
            parts = self._parts
            assert parts is not None
            if len(parts) >= self.listener.max_fragments:
                raise _TooManyFragments("message in too many fragments")
            if utf8 is not None:
                _check_utf8(utf8, data, fin)  # fail fast, before the message is whole
            parts.append(data)
            if not fin:
                return
            self._parts = self._utf8 = None
            self._message(b"".join(parts), utf8 is not None)
        elif fin:
            self._message(data, opcode is Opcode.TEXT)
        else:
            self._parts = [data]
            if opcode is Opcode.TEXT:
                self._utf8 = utf8 = _Utf8Decoder()
                _check_utf8(utf8, data, False)

    def _message(self, data: bytes, text: bool) -> None:
        """A whole message (at most `max_message_size` bytes: websockets counted)."""
        conn = self.conn
        if conn.close_code is not None:
            return  # draining after our close frame
        payload: str | bytes = data
        if text:
            try:
                payload = data.decode()
            except UnicodeDecodeError as exc:
                raise _InvalidUtf8(f"invalid UTF-8: {exc.reason}") from None
        if self.echo:
            self.echo_message(data, text)
        elif self._task is not None:
            self._queue(payload)  # after the messages before it
        else:
            waiting = conn.handle(payload)
            if waiting is not None:
                self._task = asyncio.get_running_loop().create_task(self._run(waiting))

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

    def _fail_and_end(self, code: int, reason: str) -> None:
        """The peer broke the protocol or sent too big a message: close with `code`, then end."""
        if self.transport.is_closing():
            return
        self.fail(code, reason)
        # Half-close and keep reading (websockets discards it all) until the
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
