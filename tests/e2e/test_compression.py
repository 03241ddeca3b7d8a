"""End-to-end: permessage-deflate (RFC 7692) with `compression = "on"`, over real sockets.

Raw sockets where the bytes on the wire are the point (what was negotiated,
which frames are compressed, what a client's window can inflate), websockets'
client where a real client's behaviour is.
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from plexus.protocol import wire
from plexus.protocol.codec import MSGPACK, MSGPACK_SUBPROTOCOL
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT, api_post, upgrade_request, wait_for

CHROME_OFFER = "permessage-deflate; client_max_window_bits"
TAIL = b"\x00\x00\xff\xff"


class RawDeflate:
    """A raw client that offered permessage-deflate: reads frames with their RSV1 bit."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions = ""
        self.compressor: Any = None

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame: (first byte, payload as sent)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first, await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)

    async def message(self, bits: int = 15) -> Any:
        """The next text message, inflated if it came compressed (as a fresh inflater would)."""
        first, payload = await self.frame()
        assert first & 0x0F == 0x1, (first, payload)
        if first & 0x40:
            payload = inflate(payload, bits)
        return orjson.loads(payload)

    def send(self, payload: bytes, *, compress: bool = True, takeover: bool = False) -> None:
        """One masked text frame, compressed (a fresh context unless `takeover`)."""
        first = 0x81
        if compress:
            if self.compressor is None or not takeover:
                self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = (self.compressor.compress(payload) + self.compressor.flush(2))[:-4]
            first = 0xC1
        mask = b"\x00\x00\x00\x00"
        length = len(payload)
        if length < 126:
            head = bytes([first, 0x80 | length])
        elif length < 65536:
            head = bytes([first, 0x80 | 126]) + struct.pack("!H", length)
        else:
            head = bytes([first, 0x80 | 127]) + struct.pack("!Q", length)
        self.writer.write(head + mask + payload)


def inflate(payload: bytes, bits: int) -> bytes:
    """Inflate one message in 16-byte steps, so that every match must come from a window
    of 2**bits bytes (zlib would otherwise reach back into its own output buffer)."""
    inflater = zlib.decompressobj(-bits)
    out, data = b"", payload + TAIL
    while chunk := inflater.decompress(data, 16):
        out += chunk
        data = inflater.unconsumed_tail
    return out


Open = Callable[..., Any]


@pytest.fixture
async def raw_deflate() -> AsyncIterator[Open]:
    writers: list[asyncio.StreamWriter] = []

    async def factory(port: int, offer: str | None = CHROME_OFFER, extra: str = "") -> RawDeflate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        if offer is not None:
            extra += f"Sec-WebSocket-Extensions: {offer}\r\n"
        writer.write(upgrade_request(extra=extra))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        client = RawDeflate(reader, writer)
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "sec-websocket-extensions":
                client.extensions = value.strip()
        return client

    yield factory
    for writer in writers:
        writer.close()


async def test_a_browser_offer_is_taken_with_no_context_takeover(
    make_server: ServerFactory, raw_deflate: Open
) -> None:
    server = await make_server(compression="on")
    client = await raw_deflate(server.port)
    assert client.extensions == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    first, payload = await client.frame()
    assert first == 0xC1  # the welcome, compressed
    assert orjson.loads(inflate(payload, 15))["type"] == "welcome"
    client.send(b'{"type":"ping","id":1}')  # compressed by the client
    first, payload = await client.frame()
    assert (first, orjson.loads(payload)) == (0x81, {"type": "pong", "id": 1})  # too small


async def test_without_compression_an_offer_is_declined(
    make_server: ServerFactory, raw_deflate: Open
) -> None:
    server = await make_server()
    client = await raw_deflate(server.port)
    assert client.extensions == ""
    first, payload = await client.frame()
    assert first == 0x81
    assert orjson.loads(payload)["type"] == "welcome"
    client.send(b'{"type":"ping","id":1}')  # RSV1 without the extension: 1002
    first, payload = await client.frame()
    assert (first, struct.unpack("!H", payload[:2])[0]) == (0x88, 1002)


async def test_a_push_is_compressed_once_for_all_compressed_subscribers(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await make_server(compression="on")
    calls: list[int] = []
    original = wire.Deflater.compress

    def counted(self: wire.Deflater, data: bytes) -> bytes:
        calls.append(len(data))
        return original(self, data)

    monkeypatch.setattr(wire.Deflater, "compress", counted)
    text = "the same words over and over, " * 20
    async with asyncio.timeout(TIMEOUT * 3):
        clients = [await ws_connect(server.ws_url, compression="deflate") for _ in range(20)] + [
            await ws_connect(server.ws_url, compression=None),
            await ws_connect(
                server.ws_url, compression="deflate", subprotocols=[MSGPACK_SUBPROTOCOL]
            ),
        ]
        try:
            for i, ws in enumerate(clients):
                await ws.recv()  # welcome
                command = {"type": "subscribe", "id": i, "channel": "news"}
                if ws.subprotocol == MSGPACK_SUBPROTOCOL:
                    await ws.send(MSGPACK.encode(command))
                else:
                    await ws.send(orjson.dumps(command).decode())
                await ws.recv()  # the reply
            assert server.endpoint is not None
            formats = sorted(conn.wire.name for conn in server.endpoint.connections)
            assert formats == ["json", *["json+deflate15"] * 20, "msgpack+deflate15"]
            calls.clear()
            status, _ = await api_post(
                server.url, "/api/publish", {"channel": "news", "data": text}
            )
            assert status == 200
            for ws in clients:
                raw = await ws.recv()
                push = MSGPACK.decode(raw) if isinstance(raw, bytes) else orjson.loads(raw)
                assert push["data"] == text
        finally:
            for ws in clients:
                await ws.close()
    # Once as JSON and once as MessagePack, for 22 subscribers (one uncompressed).
    assert len(calls) == 2


async def test_messages_are_limited_by_their_inflated_size(
    make_server: ServerFactory, raw_deflate: Open
) -> None:
    server = await make_server(compression="on", max_message_size=1000)
    client = await raw_deflate(server.port)
    await client.message()  # welcome
    ping = b'{"type":"ping","id":1,"pad":"'
    exact = ping + b"x" * (1000 - len(ping) - 2) + b'"}'
    client.send(exact)  # ~40 bytes on the wire, 1000 inflated: within the limit
    assert await client.message() == {"type": "pong", "id": 1}
    client.send(exact[:-2] + b'x"}')
    first, payload = await client.frame()
    assert (first, struct.unpack("!H", payload[:2])[0]) == (0x88, 1009)


async def test_a_deflate_bomb_closes_1009_after_the_replies_before_it(
    make_server: ServerFactory, raw_deflate: Open
) -> None:
    server = await make_server(compression="on")  # 64 KiB limit
    client = await raw_deflate(server.port)
    await client.message()  # welcome
    client.send(b'{"type":"ping","id":1}')
    client.send(b'{"type":"ping","id":2,"pad":"' + b" " * 50_000_000 + b'"}')  # in ~49 KB
    assert await client.message() == {"type": "pong", "id": 1}
    first, payload = await client.frame()
    assert (first, struct.unpack("!H", payload[:2])[0]) == (0x88, 1009)
    # The server is fine.
    async with ws_connect(server.ws_url) as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"


async def test_a_client_may_keep_its_context_when_allowed(
    make_server: ServerFactory, raw_deflate: Open
) -> None:
    server = await make_server(compression="on", compression_client_takeover=True)
    client = await raw_deflate(server.port)
    assert client.extensions == "permessage-deflate; server_no_context_takeover"
    await client.message()  # welcome
    for i in range(5):
        # Each refers back to the one before: only a kept inflater reads them.
        client.send(b'{"type":"ping","id":%d,"pad":"same padding every time"}' % i, takeover=True)
        assert await client.message() == {"type": "pong", "id": i}


async def test_without_takeover_a_client_that_keeps_its_context_fails(
    make_server: ServerFactory, raw_deflate: Open
) -> None:
    server = await make_server(compression="on")
    client = await raw_deflate(server.port)
    assert "client_no_context_takeover" in client.extensions
    await client.message()
    message = b'{"type":"ping","id":1,"pad":"same padding every time"}'
    client.send(message, takeover=True)
    assert await client.message() == {"type": "pong", "id": 1}
    client.send(message, takeover=True)  # refers to the first: not inflatable alone
    first, payload = await client.frame()
    assert (first, struct.unpack("!H", payload[:2])[0]) == (0x88, 1002)


@pytest.mark.parametrize("bits", [9, 12])
async def test_pushes_fit_the_window_the_client_asked_for(
    make_server: ServerFactory, raw_deflate: Open, bits: int
) -> None:
    server = await make_server(compression="on")
    client = await raw_deflate(server.port, f"permessage-deflate; server_max_window_bits={bits}")
    assert f"server_max_window_bits={bits}" in client.extensions
    await client.message(bits)  # welcome
    client.send(b'{"type":"subscribe","id":1,"channel":"news"}', compress=False)
    assert (await client.message(bits))["id"] == 1
    # Repeats 5120 bytes apart: beyond a 4 KiB or a 512-byte window.
    chunk = os.urandom(2560).hex()
    data = {"text": chunk + chunk}
    assert (await api_post(server.url, "/api/publish", {"channel": "news", "data": data}))[0] == 200
    first, payload = await client.frame()
    assert first == 0xC1
    assert len(payload) < 8000
    assert orjson.loads(inflate(payload, bits))["data"] == data


async def test_the_compression_setting_is_checked(make_server: ServerFactory) -> None:
    from plexus.exceptions import ConfigError

    with pytest.raises(ConfigError, match="compression: must be off or on"):
        await make_server(compression="yes")


async def test_websockets_client_round_trip_with_compression(make_server: ServerFactory) -> None:
    """A real client that compresses what it sends (websockets does, every message)."""
    server = await make_server(compression="on")
    async with ws_connect(server.ws_url, compression="deflate") as ws:
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        await ws.send(orjson.dumps({"type": "subscribe", "id": 1, "channel": "chat:c"}).decode())
        assert orjson.loads(await ws.recv())["id"] == 1
        text = "ü" * 3000
        await ws.send(
            orjson.dumps(
                {"type": "publish", "id": 2, "channel": "chat:c", "data": {"text": text}}
            ).decode()
        )
        replies = [orjson.loads(await ws.recv()) for _ in range(2)]
        assert {m["type"] for m in replies} == {"reply", "message"}
        assert next(m for m in replies if m["type"] == "message")["data"]["text"] == text
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    await wait_for(lambda: server.endpoint is not None and not server.endpoint.connections)
