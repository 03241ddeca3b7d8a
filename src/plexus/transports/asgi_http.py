"""HTTP requests of an ASGI server, answered by the native server's aiohttp application.

Why an adapter rather than a second set of handlers: `/api/*`, `/health`,
`/ready`, `/metrics` and `/plexus.js` are aiohttp handlers, and most of what
they do is checks on the request (Origin and Host against CSRF and DNS
rebinding, the API key or the loopback rule, `Content-Type`, body size and
body timeout) that decide the status and error code. Made framework-neutral,
every check would have to read two kinds of request; run behind this adapter,
there is one implementation, and a mounted Plexus answers exactly what the
native server answers (tests compare the codes). The cost is writing the
request head again and parsing the response head, which the HTTP API affords:
it is not the fan-out path, and code in the same process publishes with
`PlexusApp.publish`, without HTTP.

How: the request is written as HTTP/1.1 bytes (`Connection: close`) into one
of aiohttp's protocol objects — the `web.Server` the native listener hands its
sockets to — through an in-memory transport; what it writes back is parsed
into `http.response.start` / `http.response.body` events as it comes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote

import orjson

from plexus.transports.asgi import Message, Receive, Scope, Send

# Request headers that belong to the hop between the client and the ASGI
# server (which already handled them), not to the request itself.
_HOP_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",  # the ASGI server answered 100-continue if needed
        b"proxy-connection",
        b"http2-settings",
    }
)
# Response headers the ASGI server writes itself (`date`, `server`) or that
# describe aiohttp's framing of the body, not the body.
_DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}
)
_SAFE_PATH: Final = "/:@!$&'()*+,;=-._~"
_tls: ssl.SSLContext | None = None


def _tls_marker() -> ssl.SSLContext:
    """What aiohttp's request reads to call its scheme `https` (it only tests it for truth)."""
    global _tls
    if _tls is None:
        _tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return _tls


class _Pipe(asyncio.Transport):
    """The in-memory transport between the adapter and one aiohttp protocol."""

    __slots__ = ("_resumed", "_written", "closed", "output", "paused")

    def __init__(self, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self.output = bytearray()
        self.closed = False
        self.paused = False  # aiohttp has enough of the body for now
        self._written: asyncio.Future[None] | None = None  # the response side waits
        self._resumed: asyncio.Future[None] | None = None  # the body feeder waits

    @staticmethod
    def _set(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        self._set(self._written)
        self._set(self._resumed)

    async def wait_output(self) -> None:
        """Until aiohttp writes or closes."""
        waiter = self._written = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._written = None

    async def wait_resumed(self) -> None:
        """Until aiohttp reads again (or closes)."""
        waiter = self._resumed = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._resumed = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.output += data
            self._set(self._written)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.closed = True
        self._wake()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self._set(self._resumed)

    def is_reading(self) -> bool:
        return not self.paused

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class _ResponseReader:
    """Parses the HTTP/1.1 response aiohttp writes into ASGI response events."""

    __slots__ = ("_buffer", "_chunk_left", "_chunked", "_head_only", "_left", "done", "started")

    def __init__(self, *, head_only: bool) -> None:
        self._buffer = bytearray()
        self._head_only = head_only
        self._left: int | None = None  # body bytes still due (Content-Length)
        self._chunked = False
        self._chunk_left = 0  # bytes of the current chunk still due, then its CRLF
        self.started = False
        self.done = False

    def feed(self, data: bytes | bytearray, *, eof: bool = False) -> list[Message]:
        """The events that `data` (and, at `eof`, the end of the response) complete."""
        buffer = self._buffer
        buffer += data
        events: list[Message] = []
        started_now = False
        if not self.started:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return events
            events.append(self._start(bytes(buffer[:end])))
            del buffer[: end + 4]
            started_now = True
        if self.done:  # a response without a body still ends with an (empty) body event
            if started_now:
                events.append({"type": "http.response.body", "body": b"", "more_body": False})
            return events
        body = self._body(eof=eof)
        if eof:
            self.done = True
        if body or self.done:
            events.append({"type": "http.response.body", "body": body, "more_body": not self.done})
        return events

    def _start(self, head: bytes) -> Message:
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            value = value.strip()
            if key == b"content-length":
                self._left = int(value)
            elif key == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            if key not in _DROPPED_RESPONSE_HEADERS:
                headers.append((key, value))
        self.started = True
        if self._head_only or status in (204, 304) or 100 <= status < 200:
            self._left = 0
            self._chunked = False
        if self._chunked:
            self._left = None
        self.done = self._left == 0
        return {"type": "http.response.start", "status": status, "headers": headers}

    def _body(self, *, eof: bool) -> bytes:
        buffer = self._buffer
        if self._chunked:
            return self._dechunk()
        if self._left is None:  # until the end of the stream
            body = bytes(buffer)
            buffer.clear()
            return body
        body = bytes(buffer[: self._left])
        del buffer[: self._left]
        self._left -= len(body)
        self.done = self._left == 0
        return body

    def _dechunk(self) -> bytes:
        buffer = self._buffer
        out = bytearray()
        while True:
            if self._chunk_left > 0:
                take = min(self._chunk_left, len(buffer))
                out += buffer[:take]
                del buffer[:take]
                self._chunk_left -= take
                if self._chunk_left:
                    break
                self._chunk_left = -2  # the chunk's CRLF is due
            if self._chunk_left == -2:
                if len(buffer) < 2:
                    break
                del buffer[:2]
                self._chunk_left = 0
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                break
            size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
            del buffer[: line_end + 2]
            if size == 0:  # the last chunk (trailers are not kept)
                self.done = True
                break
            self._chunk_left = size
        return bytes(out)


def _request_head(scope: Scope, path: str) -> tuple[bytes, str]:
    """The HTTP/1.1 head of an ASGI request, and its body framing: length, chunked or peek."""
    target = quote(path, safe=_SAFE_PATH)
    query = bytes(scope.get("query_string", b""))
    lines = [f"{scope['method']} {target}{'?' if query else ''}".encode("latin-1") + query]
    lines[0] += b" HTTP/1.1"
    framing = "peek"
    for name, value in scope.get("headers", ()):
        key = bytes(name).lower()
        if key == b"transfer-encoding":
            framing = "chunked" if framing == "peek" else framing
        if key in _HOP_HEADERS:
            continue
        if key == b"content-length":
            framing = "length"
        lines.append(bytes(name) + b": " + bytes(value))
    if framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n", framing


async def serve_http(
    factory: Callable[[], asyncio.Protocol],
    scope: Scope,
    receive: Receive,
    send: Send,
    path: str,
) -> None:
    """Answer one ASGI HTTP request (`path`: below the mount) with the aiohttp application."""
    head, framing = _request_head(scope, path)
    first: Message | None = None
    if framing == "peek":
        # No Content-Length and no chunked encoding (HTTP/2 may send neither):
        # a body, if any, is passed on chunked.
        first = await receive()
        if first.get("body") or first.get("more_body"):
            framing = "chunked"
            head = head[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
    client = scope.get("client")
    server = scope.get("server")
    tls = scope.get("scheme") in ("https", "wss")
    pipe = _Pipe(
        {
            "peername": tuple(client) if client else None,
            "sockname": tuple(server) if server else None,
            "sslcontext": _tls_marker() if tls else None,
            "socket": None,
        }
    )
    protocol = factory()
    protocol.connection_made(pipe)
    protocol.data_received(head)
    feeder: asyncio.Task[None] | None = None
    if framing != "peek":
        feeder = asyncio.get_running_loop().create_task(
            _feed(protocol, pipe, receive, chunked=framing == "chunked", first=first)
        )
    reader = _ResponseReader(head_only=scope["method"] == "HEAD")
    try:
        while not reader.done:
            if pipe.output:
                data = bytes(pipe.output)
                pipe.output.clear()
                for event in reader.feed(data):
                    await send(event)
                continue
            if pipe.closed:
                if not reader.started:
                    await _internal_error(send)
                    return
                for event in reader.feed(b"", eof=True):
                    await send(event)
                return
            await pipe.wait_output()
    finally:
        if feeder is not None and not feeder.done():
            feeder.cancel()
        protocol.connection_lost(None)


async def _feed(
    protocol: asyncio.Protocol,
    pipe: _Pipe,
    receive: Receive,
    *,
    chunked: bool,
    first: Message | None,
) -> None:
    """Pass the request body on as it arrives, no faster than aiohttp reads it."""
    message = first
    while True:
        if message is None:
            message = await receive()
        if message["type"] == "http.disconnect":
            pipe.close()
            protocol.connection_lost(ConnectionResetError("the client went away"))
            return
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if body:
            protocol.data_received(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
        if not more:
            if chunked:
                protocol.data_received(b"0\r\n\r\n")
            return
        message = None
        while pipe.paused and not pipe.closed:
            await pipe.wait_resumed()


async def _internal_error(send: Send) -> None:
    body = orjson.dumps({"error": {"code": "internal", "message": "internal error"}})
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [(b"content-type", b"application/json; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})
