"""A minimal, fast WebSocket client on a raw asyncio Protocol, for load generation only.

Why hand-rolled: the load client must cost less CPU per delivery than the
servers it measures. A general client (aiohttp, websockets) spends several
microseconds per frame in Python objects, futures and callbacks; this one
parses frames in place in the received chunk and, for the common push, only
looks for the marker `"type":"message"` with `bytes.find` (no JSON decode, no
copy). Anything else (welcome, reply, error, pong) is decoded with orjson and
handed to the owner through `on_json`.

Scope (loopback benchmarking, not a general client):
  * permessage-deflate only when asked (`deflate=True`): then offered as a
    browser offers it. Compressed frames are inflated (with one inflater per
    message, or one per connection when the server keeps its context) until
    the connection is `subscribed`; after that every compressed text frame is
    a push of the channel, counted without inflating it, like uncompressed
    pushes are counted without decoding them. Commands are sent
    uncompressed; no subprotocol;
  * client frames are masked with the all-zero key, which RFC 6455 permits on
    the wire (the mask bit is set, the key is 0) and which makes masking free;
  * server pings are answered, a close frame is echoed and the socket aborted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
import zlib
from array import array
from collections.abc import Callable
from typing import Any, Final, cast

import orjson

MESSAGE_MARK: Final = b'"type":"message"'
TS_MARK: Final = b'"ts":'
OFFSET_MARK: Final = b'"offset":'
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_KEY: Final = b"\x00\x00\x00\x00"


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """Return one masked (all-zero key) client frame holding `payload`."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    return header + _ZERO_KEY + payload


class Counters:
    """Counters shared by all connections of one worker process.

    `target` > 0 arms `done`: it is set once `messages` reaches `target`.
    Latencies (ns, receive time minus the `ts` in the data) are kept only
    when `latency` is on.
    """

    __slots__ = (
        "closed",
        "done",
        "last_ns",
        "latencies",
        "latency",
        "messages",
        "order_errors",
        "target",
        "wire_bytes",
    )

    def __init__(self) -> None:
        self.messages = 0
        self.wire_bytes = 0  # bytes received after the handshake (what crossed the wire)
        self.target = 0
        self.done: asyncio.Future[None] | None = None
        self.latency = False
        self.latencies = array("q")
        self.last_ns = 0
        self.order_errors = 0  # offsets that did not follow the previous one (latency runs)
        self.closed: dict[int, int] = {}  # close code -> connections closed with it

    def reset(self) -> None:
        self.messages = 0
        self.target = 0
        self.done = None
        self.latencies = array("q")
        self.last_ns = 0
        self.order_errors = 0
        self.wire_bytes = 0

    def note_close(self, code: int) -> None:
        self.closed[code] = self.closed.get(code, 0) + 1


class WSConn(asyncio.Protocol):
    """One client WebSocket connection.

    `ready` resolves with the welcome message (or an exception if the
    handshake or the connection fails). `on_json` receives every decoded
    non-`message` frame after the welcome; `message` pushes only bump
    `count` and the shared `Counters`.
    """

    def __init__(
        self, host: str, port: int, path: str, counters: Counters, *, deflate: bool = False
    ) -> None:
        self.host = host
        self.deflate = deflate
        # Negotiated permessage-deflate: the server's window, and its inflater
        # when the server keeps its context (None: a new one per message).
        self._inflate_bits = 0
        self._inflater: Any = None
        self._server_takeover = False
        self.port = port
        self.path = path
        self.counters = counters
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.on_json: Callable[[dict[str, Any]], None] | None = None
        self.count = 0
        self.last_offset = 0
        self.client_id = ""
        self.closed = False
        self.subscribed = False  # only the channel's pushes arrive from now on
        self._handshaken = False
        self._key = base64.b64encode(os.urandom(16))
        self._buf = b""
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport is no subclass of asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if self.deflate:
            request += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        request += "\r\n"
        self.transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.counters.note_close(1006)
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("connection closed before welcome"))

    def data_received(self, data: bytes) -> None:
        self.counters.wire_bytes += len(data)
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._handshaken:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            self._check_handshake(data[:end])
            if self.closed:
                return
            data = data[end + 4 :]
        self._frames(data)

    # -- frames ----------------------------------------------------------------------

    def _check_handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        accept = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"sec-websocket-accept":
                accept = value.strip()
            elif name == b"sec-websocket-extensions" and b"permessage-deflate" in value:
                params = [p.strip() for p in value.split(b";")]
                self._inflate_bits = 15
                for param in params:
                    if param.startswith(b"server_max_window_bits="):
                        self._inflate_bits = int(param.split(b"=")[1])
                self._server_takeover = b"server_no_context_takeover" not in params
        if len(status) < 2 or status[1] != b"101" or accept != expected:
            self._fail(ConnectionError(f"bad upgrade response: {lines[0]!r}"))
            return
        self._handshaken = True

    def _frames(self, data: bytes) -> None:
        counters = self.counters
        n = len(data)
        pos = 0
        while pos + 2 <= n:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if pos + 4 > n:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if pos + 10 > n:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            pos = end
            if b0 == 0x81:  # final text frame: the hot path
                if data.find(MESSAGE_MARK, start, end) >= 0:
                    self.count += 1
                    counters.messages += 1
                    if counters.latency:
                        now = time.time_ns()
                        i = data.find(TS_MARK, start, end)
                        if i >= 0:
                            j = data.find(b",", i, end)
                            counters.latencies.append(now - int(data[i + 5 : j]))
                        counters.last_ns = now
                        # Offsets must grow by exactly 1 per message on a channel.
                        i = data.find(OFFSET_MARK, start, end)
                        if i >= 0:
                            j = data.find(b",", i, end)
                            offset = int(data[i + 9 : j if j >= 0 else end - 1])
                            if self.last_offset and offset != self.last_offset + 1:
                                counters.order_errors += 1
                            self.last_offset = offset
                    if counters.messages == counters.target and counters.done is not None:
                        counters.last_ns = counters.last_ns or time.time_ns()
                        if not counters.done.done():
                            counters.done.set_result(None)
                    continue
                self._text(data[start:end])
            elif b0 == 0xC1 and self._inflate_bits:  # a compressed text message
                if self.subscribed:
                    self._counted()
                else:
                    self._whole_text(self._inflate(data[start:end]))
            else:
                self._other(b0, data[start:end])
            if self.closed:
                return
        if pos < n:
            self._buf = data[pos:]

    def _other(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode == 0x9:  # ping
            self.send_frame(client_frame(payload, 0xA))
        elif opcode == 0x8:  # close
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.closed = True
            self.counters.note_close(code)
            self.send_frame(client_frame(payload[:2], 0x8))
            if self.transport is not None:
                self.transport.close()
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"closed with {code} before welcome"))
        elif opcode in (0x1, 0x2) and not fin:
            self._fragment_op = opcode
            self._fragments = [payload]
        elif opcode == 0x0:
            self._fragments.append(payload)
            if fin:
                whole = b"".join(self._fragments)
                self._fragments = []
                if self._fragment_op == 0x1:
                    self._whole_text(whole)
        elif opcode == 0x1:  # final text frame with RSV bits set: never offered, treat as text
            self._whole_text(payload)

    def _inflate(self, payload: bytes) -> bytes:
        inflater = self._inflater
        if inflater is None:
            inflater = zlib.decompressobj(-self._inflate_bits)
            if self._server_takeover:
                self._inflater = inflater
        out: bytes = inflater.decompress(payload + b"\x00\x00\xff\xff")
        return out

    def _whole_text(self, payload: bytes) -> None:
        if MESSAGE_MARK in payload:
            self._counted()
            return
        self._text(payload)

    def _counted(self) -> None:
        """Count one push that came by a slow path (fragmented, or unusual spacing)."""
        counters = self.counters
        self.count += 1
        counters.messages += 1
        if counters.messages == counters.target and counters.done is not None:
            counters.last_ns = time.time_ns()
            if not counters.done.done():
                counters.done.set_result(None)

    def _text(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        if not self.ready.done():
            if isinstance(msg, dict) and msg.get("type") == "welcome":
                self.client_id = str(msg.get("client", ""))
                self.ready.set_result(msg)
            else:
                self._fail(ConnectionError(f"expected welcome, got {payload[:200]!r}"))
            return
        if isinstance(msg, dict) and msg.get("type") == "message":  # pushes with spaces etc.
            self._counted()
            return
        if self.on_json is not None:
            self.on_json(msg)

    # -- sending -----------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def send_json(self, obj: Any) -> None:
        self.send_frame(client_frame(orjson.dumps(obj)))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    counters: Counters,
    *,
    path: str = "/ws",
    source: str | None = None,
    timeout: float = 10.0,
    deflate: bool = False,
) -> WSConn:
    """Open one connection (offering permessage-deflate if `deflate`); wait for `welcome`."""
    loop = asyncio.get_running_loop()
    local = (source, 0) if source else None
    _, conn = await asyncio.wait_for(
        loop.create_connection(
            lambda: WSConn(host, port, path, counters, deflate=deflate),
            host,
            port,
            local_addr=local,
        ),
        timeout,
    )
    await asyncio.wait_for(conn.ready, timeout)
    return conn
