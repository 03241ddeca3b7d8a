"""The attacks of issue 10, as the soak makes them: each once per round, at a bounded rate.

They are the rows of `tests/e2e/test_security.py` that a server could
survive once and still leak from: floods, endless fragments, sockets that
never finish a request, and API bodies that are oversized, trickled,
truncated or never finished. Each reports what the attacker saw, to be
compared with `EXPECTED`, the documented answer. Loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

PAD = "p" * 64  # the soak's payloads all have this size, so history memory stays flat


# ----- raw WebSocket and HTTP, for what a library would not send


def frame(payload: bytes, opcode: int = 0x1, *, fin: bool = True) -> bytes:
    """One client frame, masked with the all-zero key (a valid mask: no XOR to do)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + bytes(4) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked): (opcode, payload)."""
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(n)


async def raw_ws(
    port: int, timeout: float, buffers: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw socket past the handshake and the `welcome`; `buffers`: small kernel buffers."""
    async with asyncio.timeout(timeout):
        return await _raw_ws(port, buffers)


async def _raw_ws(
    port: int, buffers: int | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if buffers is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 "):
        writer.close()
        raise ConnectionError(f"upgrade refused: {head[:40]!r}")
    opcode, payload = await read_frame(reader)
    if opcode != 0x1 or orjson.loads(payload)["type"] != "welcome":
        writer.close()
        raise ConnectionError("no welcome")
    return reader, writer


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(lines[0].split(" ")[1]), await reader.readexactly(length)


async def connect(
    session: aiohttp.ClientSession, url: str, timeout: float
) -> aiohttp.ClientWebSocketResponse:
    """A WebSocket to `url`, its handshake bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        return await session.ws_connect(url)


async def welcome(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
    """Read the `welcome` that opens every connection."""
    first: dict[str, Any] = await ws.receive_json(timeout=timeout)
    if first.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {first}")


class Attacks:
    """The attacks, against the server on `port`.

    Args:
        port: the server's loopback port.
        session: for the attacks that use a WebSocket library.
        timeout: bound of every single wait.
        request_timeout: the server's `http_request_timeout`.
        pings: pings per ping flood.
        max_body_size: the server's `max_body_size`.
        acked: called with (room, offset) for each message an attack got
            acknowledged (the bystanders must receive it).
    """

    def __init__(
        self,
        port: int,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        request_timeout: float,
        pings: int,
        max_body_size: int,
        acked: Callable[[str, int], None],
    ) -> None:
        self.port = port
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        self.session = session
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.pings = pings
        self.max_body_size = max_body_size
        self.acked = acked

    async def run(self, room: str) -> tuple[Counter[str], list[str]]:
        """Make each attack once, at once (the floods into `room`).

        Returns:
            "attack: outcome" counts, and an error for each outcome that is not
            the documented one (`EXPECTED`).
        """
        attacks: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("ping flood", self._ping_flood),
            ("join/leave flood", lambda: self._join_leave_flood(room)),
            ("publish flood", lambda: self._publish_flood(room)),
            ("endless fragments", self._endless_fragments),
            ("half-sent heads", self._half_sent_heads),
            ("idle keep-alive", self._idle_keepalive),
            ("declared oversized body", self._declared_oversized),
            ("chunked oversized body", self._chunked_oversized),
            ("trickled body", lambda: self._trickled(room)),
            ("truncated body, client gone", self._truncated_gone),
            ("unfinished body", self._unfinished_body),
        ]
        outcomes: Counter[str] = Counter()
        errors: list[str] = []

        async def one(name: str, attack: Callable[[], Awaitable[str]]) -> None:
            try:
                # Each attack bounds its own waits; this bounds the whole of it.
                async with asyncio.timeout(self.request_timeout + 3 * self.timeout):
                    outcome = await attack()
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            outcomes[f"{name}: {outcome}"] += 1
            if outcome not in EXPECTED[name]:
                errors.append(f"attack {name}: {outcome} (expected {EXPECTED[name]})")

        await asyncio.gather(*(one(name, attack) for name, attack in attacks))
        return outcomes, errors

    async def _ping_flood(self) -> str:
        """Pings from a client that reads nothing until it sent them all."""
        reader, writer = await raw_ws(self.port, self.timeout, buffers=65536)
        try:
            count = self.pings
            per_write = 1000
            for start in range(0, count, per_write):
                end = min(count, start + per_write)
                writer.write(b"".join(frame(b"%08d" % i, 0x9) for i in range(start, end)))
                async with asyncio.timeout(self.timeout):
                    await writer.drain()
            writer.write(frame(b'{"type":"ping","id":"end"}'))
            last = b""
            async with asyncio.timeout(self.timeout):
                while True:
                    opcode, payload = await read_frame(reader)
                    if opcode == 0xA:
                        last = payload
                    elif opcode == 0x8:
                        return f"close {int.from_bytes(payload[:2])}"
                    elif opcode == 0x1 and orjson.loads(payload).get("id") == "end":
                        break
            return "last ping answered" if last == b"%08d" % (count - 1) else f"last pong {last!r}"
        finally:
            writer.close()

    async def _join_leave_flood(self, room: str) -> str:
        """Subscribe/unsubscribe pairs with 512 bytes of info into a bystander's room."""
        ws = await connect(self.session, self.ws_url, self.timeout)
        try:
            await welcome(ws, self.timeout)
            info = {"pad": "i" * 512}
            for i in range(300):
                await ws.send_bytes(
                    orjson.dumps({"type": "subscribe", "id": 2 * i, "channel": room, "info": info})
                )
                await ws.send_bytes(
                    orjson.dumps({"type": "unsubscribe", "id": 2 * i + 1, "channel": room})
                )
            limited = 0
            async with asyncio.timeout(self.timeout):
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        limited += orjson.loads(msg.data).get("code") == "rate_limited"
            return f"close {ws.close_code}" + (" after rate_limited" if limited else "")
        finally:
            await ws.close()

    async def _publish_flood(self, room: str) -> str:
        """Publishes at once into a bystander's room: the burst is stored, the rest refused."""
        ws = await connect(self.session, self.ws_url, self.timeout)
        try:
            await welcome(ws, self.timeout)
            for i in range(300):
                data = {"flood": i, "pad": PAD}
                await ws.send_bytes(
                    orjson.dumps({"type": "publish", "id": i, "channel": room, "data": data})
                )
            limited = 0
            async with asyncio.timeout(self.timeout):
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        continue
                    answer = orjson.loads(msg.data)
                    if answer.get("type") == "reply":
                        self.acked(room, answer["result"]["offset"])
                    limited += answer.get("code") == "rate_limited"
            return f"close {ws.close_code}" + (" after rate_limited" if limited else "")
        finally:
            await ws.close()

    async def _endless_fragments(self) -> str:
        """One message begun, then more empty continuation frames than any message may have."""
        reader, writer = await raw_ws(self.port, self.timeout)
        try:
            writer.write(frame(b'{"type":"ping",', 0x1, fin=False))
            writer.write(frame(b"", 0x0, fin=False) * 5000 + frame(b'"id":1}', 0x0))
            async with asyncio.timeout(self.timeout):
                opcode, payload = await read_frame(reader)
            if opcode == 0x8:
                return f"close {int.from_bytes(payload[:2])}"
            return orjson.loads(payload)["type"]
        finally:
            writer.close()

    async def _closed_by_server(self, reader: asyncio.StreamReader) -> str:
        """Wait for the server to close an idle socket (within `http_request_timeout` + margin)."""
        async with asyncio.timeout(self.request_timeout + self.timeout):
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        return "closed by the server"

    async def _half_sent_heads(self) -> str:
        """Sockets that send part of a request head and then nothing."""
        sockets = [await asyncio.open_connection("127.0.0.1", self.port) for _ in range(8)]
        try:
            for k, (_, writer) in enumerate(sockets):
                writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"[: 10 + 4 * k])
            outcomes = {await self._closed_by_server(reader) for reader, _ in sockets}
            return outcomes.pop() if len(outcomes) == 1 else str(sorted(outcomes))
        finally:
            for _, writer in sockets:
                writer.close()

    async def _idle_keepalive(self) -> str:
        """A whole request, then the socket kept idle (keep-alive), with half a next one."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request_head("GET", "/health", {}))
            async with asyncio.timeout(self.timeout):
                status, _ = await read_response(reader)
            if status != 200:
                return f"status {status}"
            writer.write(b"GET /hea")
            return await self._closed_by_server(reader)
        finally:
            writer.close()

    async def _post_raw(self, head: bytes, body: bytes, *, then_close: bool = False) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(head + body)
            await writer.drain()
            if then_close:
                return "sent"
            async with asyncio.timeout(self.request_timeout + self.timeout):
                status, answer = await read_response(reader)
            return f"{status} {orjson.loads(answer)['error']['code']}"
        finally:
            writer.close()

    def _json_head(self, path: str, extra: dict[str, str]) -> bytes:
        return request_head("POST", path, {"Content-Type": "application/json", **extra})

    async def _declared_oversized(self) -> str:
        """A Content-Length over `max_body_size`: refused before any of it is read."""
        head = self._json_head("/api/publish", {"Content-Length": str(self.max_body_size + 1)})
        return await self._post_raw(head, b"")

    async def _chunked_oversized(self) -> str:
        """A chunked body (no Content-Length) that goes over `max_body_size` while read."""
        head = self._json_head("/api/publish", {"Transfer-Encoding": "chunked"})
        pieces = [b'{"channel": "soak.big", "data": "'] + [b"x" * 4096] * (
            self.max_body_size // 4096 + 1
        )
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
        return await self._post_raw(head, chunks)

    async def _trickled(self, room: str) -> str:
        """A publish whose body arrives in three TCP segments: read whole, not cut."""
        body = orjson.dumps({"channel": room, "data": {"trickled": "t" * 3000}})
        head = self._json_head("/api/publish", {"Content-Length": str(len(body))})
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for part in (head + body[:10], body[10:2000], body[2000:]):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)  # sleep-ok: each part in its own read of the server
            async with asyncio.timeout(self.timeout):
                status, answer = await read_response(reader)
        finally:
            writer.close()
        if status != 200:
            return f"status {status}"
        self.acked(room, orjson.loads(answer)["offset"])
        return "200"

    async def _truncated_gone(self) -> str:
        """Half the declared body, then the client goes away."""
        head = self._json_head("/api/publish", {"Content-Length": "2000"})
        return await self._post_raw(
            head, b'{"channel": "soak.cut", "data": "' + b"c" * 900, then_close=True
        )

    async def _unfinished_body(self) -> str:
        """Half the declared body, then nothing: 408 after `http_request_timeout`."""
        head = self._json_head("/api/publish", {"Content-Length": "2000"})
        return await self._post_raw(head, b'{"channel": "soak.cut", "data": "' + b"c" * 900)


# What each attack may end in: the documented answer. Endless fragments are
# closed 1009 by the lean engine; aiohttp's parser keeps nothing per empty
# fragment and answers the message (`pong`).
EXPECTED: dict[str, set[str]] = {
    "ping flood": {"last ping answered", "close 4008"},
    "join/leave flood": {"close 4029 after rate_limited"},
    "publish flood": {"close 4029 after rate_limited"},
    "endless fragments": {"close 1009", "pong"},
    "half-sent heads": {"closed by the server"},
    "idle keep-alive": {"closed by the server"},
    "declared oversized body": {"413 too_large"},
    "chunked oversized body": {"413 too_large"},
    "trickled body": {"200"},
    "truncated body, client gone": {"sent"},
    "unfinished body": {"408 bad_request"},
}
