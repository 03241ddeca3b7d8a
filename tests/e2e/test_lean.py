"""End-to-end: the listener and the WebSocket transport (`transports/lean.py`) at the socket level.

Requests and frames arriving in unusual shapes: the listener's own head
buffering, its hand-off of plain HTTP to aiohttp, the frame reader behind a
real socket, back-pressure.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ServerFactory
from tests.helpers import (
    TIMEOUT,
    masked,
    open_raw_ws,
    read_frame,
    read_message,
    read_response,
    upgrade_request,
    wait_for,
    zero_masked,
)

Raw = Callable[[bytes], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def raw(make_server: ServerFactory) -> AsyncIterator[Raw]:
    """Open raw sockets to a server, past the handshake and the welcome.

    The bytes given go out with the upgrade request, in the same write.
    """
    server = await make_server()
    writers: list[asyncio.StreamWriter] = []

    async def factory(tail: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writers.append(writer)
        writer.write(upgrade_request() + tail)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert (await read_message(reader))["type"] == "welcome"
        return reader, writer

    yield factory
    for writer in writers:
        writer.close()


async def test_frames_sent_with_the_request_are_answered(raw: Raw) -> None:
    reader, _ = await raw(masked(b'{"type":"ping","id":1}'))
    assert await read_message(reader) == {"type": "pong", "id": 1}


async def test_a_flood_of_commands_is_answered_in_order(raw: Raw) -> None:
    reader, writer = await raw(b"")
    count = 3000  # far more than the transport reads ahead before pausing
    writer.write(b"".join(masked(b'{"type":"ping","id":%d}' % i) for i in range(count)))
    for i in range(count):
        assert await read_message(reader) == {"type": "pong", "id": i}


async def test_fragmented_messages_and_control_frames_between(raw: Raw) -> None:
    reader, writer = await raw(b"")
    text = '{"type":"ping","id":"ü"}'.encode()
    writer.write(
        masked(text[:19], fin=False)  # cuts the two bytes of "ü" apart
        + masked(b"hi", 0x9)
        + masked(text[19:], 0x0)
    )
    assert await read_frame(reader) == (0xA, b"hi")
    assert await read_message(reader) == {"type": "pong", "id": "ü"}
    # A close frame in the middle of a fragmented message is answered like any close.
    writer.write(masked(text[:5], fin=False) + masked(struct.pack("!H", 4321), 0x8))
    assert await read_frame(reader) == (0x8, struct.pack("!H", 4321))
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""


async def test_invalid_utf8_closes_1007_after_earlier_replies(raw: Raw) -> None:
    reader, writer = await raw(b"")
    writer.write(masked(b'{"type":"ping","id":1}') + masked(b'{"x":"\xff"}'))
    assert await read_message(reader) == {"type": "pong", "id": 1}
    opcode, payload = await read_frame(reader)
    assert opcode == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 1007


async def test_message_of_exactly_the_limit_passes_one_more_byte_closes_1009(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_message_size=1000)
    async with ws_connect(server.ws_url, max_size=None) as ws:
        await ws.recv()  # welcome
        ping = b'{"type":"ping","id":1,"pad":"'
        exact = ping + b"x" * (1000 - len(ping) - 2) + b'"}'
        await ws.send(exact, text=True)
        assert orjson.loads(await ws.recv()) == {"type": "pong", "id": 1}
        await ws.send(exact[:-2] + b'x"}', text=True)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1009


async def test_an_upgrade_with_a_long_head_is_still_served(make_server: ServerFactory) -> None:
    # Over the 16 KiB a plain HTTP head is buffered: upgrades are kept up to 64 KiB.
    server = await make_server()
    headers = {f"X-Padding-{i}": "p" * 5000 for i in range(4)}
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url, headers=headers)
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        await ws.send_json({"type": "ping", "id": 7})
        assert await ws.receive_json(timeout=TIMEOUT) == {"type": "pong", "id": 7}
        await ws.close()


async def test_pipelined_http_requests_on_one_socket(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    writer.write(request + request)
    for _ in range(2):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        assert orjson.loads(body)["status"] == "ok"
    writer.close()


async def test_refusals_carry_a_json_error(make_server: ServerFactory) -> None:
    server = await make_server(max_connections=1)
    async with aiohttp.ClientSession() as session:
        first = await session.ws_connect(server.ws_url)
        await first.receive_json(timeout=TIMEOUT)
        async with session.get(
            server.ws_url.replace("ws://", "http://"),
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                "Sec-WebSocket-Version": "13",
            },
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "unavailable"
        await first.close()


async def test_a_socket_that_sends_no_request_is_closed(make_server: ServerFactory) -> None:
    server = await make_server(http_request_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ws HTTP/1.1\r\n")  # and never the rest
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()


MALFORMED_ORIGINS = [
    ("Origin: http://xn--zz", 403),  # an IDNA label that does not decode
    ("Origin: http://[::1", 403),
    ("Origin: http://localhost:99999", 403),
    ("Origin: http://local host", 403),
    ("Origin: null", 403),
    ("Origin: http://xn--zz\r\nHost: xn--zz", 403),
    ("Origin: http://127.0.0.1:1\r\nHost: [::1", 101),  # a loopback origin needs no Host
]


@pytest.mark.parametrize(("extra", "status"), MALFORMED_ORIGINS)
async def test_a_malformed_origin_is_a_clean_403(
    make_server: ServerFactory,
    extra: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = upgrade_request(extra=extra + "\r\n")
    if "\r\nHost:" in extra:  # the one given replaces the default
        request = request.replace(b"Host: 127.0.0.1\r\n", b"", 1)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    writer.close()
    # Refused quietly: never a traceback, never an error.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_idle_and_half_sent_http_sockets_are_closed(make_server: ServerFactory) -> None:
    server = await make_server(http_keepalive_timeout=0.3, http_request_timeout=0.3)
    # Idle after a response (keep-alive), and with a second request half sent.
    for tail in (b"", b"GET /health HTTP/1.1\r\nHost: 1"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(HEALTH)
        assert (await read_response(reader))[0] == 200
        writer.write(tail)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    # A head over the listener's buffer, never finished: aiohttp has it then.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /health HTTP/1.1\r\n" + b"X-Pad: %s\r\n" % (b"p" * 4000) * 5)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()


async def test_sockets_not_upgraded_count_against_max_connections_per_ip(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_connections_per_ip=2)
    assert server.endpoint is not None
    endpoint = server.endpoint
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await wait_for(lambda: endpoint.sockets_from("127.0.0.1") == 2)
    for request in (upgrade_request(), HEALTH):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        status, _, body = await read_response(reader)
        assert (status, orjson.loads(body)["error"]["code"]) == (429, "rate_limited")
        writer.close()
    # Far over the limit (more than twice it), a socket is dropped at once, unread.
    await wait_for(lambda: endpoint.sockets_from("127.0.0.1") == 2)
    extra = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    assert await asyncio.wait_for(extra[-1][0].read(), TIMEOUT) == b""
    for _, writer in idle + extra:
        writer.close()
    await wait_for(lambda: endpoint.sockets_from("127.0.0.1") == 0)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        async with session.get(server.url + "/health") as response:  # the second socket
            assert response.status == 200
        await ws.close()


async def test_a_client_that_does_not_read_is_not_read_either(make_server: ServerFactory) -> None:
    """Commands from a client that reads nothing stop being read once its output backs up.

    It is back-pressured instead of answered into an ever-growing buffer (or
    closed as a slow consumer), and gets every answer, in order, once it reads.
    """
    server = await make_server()
    assert server.endpoint is not None
    limit = server.settings.max_queue_bytes
    reader, writer = await open_raw_ws(server.port, buffers=65536)
    (conn,) = server.endpoint.connections
    link = conn.closer.__self__  # type: ignore[attr-defined]  # the socket side
    # A small send buffer at the server's end too (a slow network), so that a
    # short flood backs up.
    sock = link.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:  # until the server stops reading and drain() never returns
            writer.write(
                b"".join(zero_masked(b'{"type":"ping","id":%d}' % (sent + i)) for i in range(2000))
            )
            sent += 2000
            await writer.drain()

    flooding = asyncio.create_task(flood())
    await wait_for(lambda: not link.transport.is_reading(), timeout=TIMEOUT * 3)
    assert conn.close_code is None
    assert conn.outbox.buffered <= limit
    flooding.cancel()
    # Reading again resumes the server: every command is answered, in order.
    for i in range(sent):
        assert await read_message(reader) == {"type": "pong", "id": i}
    writer.close()


async def test_a_message_in_endless_empty_fragments(raw: Raw) -> None:
    """More fragments than `max_fragments` (1024 at the default limit): closed with 1009."""
    reader, writer = await raw(b"")
    cap = 1024  # max(64, max_message_size // 64) at the default 64 KiB
    writer.write(masked(b'{"type":"ping",', fin=False))
    writer.write(zero_masked(b"", 0x0, fin=False) * (cap + 10) + zero_masked(b'"id":1}', 0x0))
    opcode, payload = await read_frame(reader)
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1009)


async def test_a_message_in_many_fragments_within_the_cap_is_whole(raw: Raw) -> None:
    reader, writer = await raw(b"")
    text = b'{"type":"ping","id":1,"pad":"' + b"f" * 990 + b'"}'
    frames = [text[i : i + 1] for i in range(len(text))]  # 1020 one-byte fragments
    assert len(frames) <= 1024
    writer.write(
        masked(frames[0], fin=False)
        + b"".join(zero_masked(f, 0x0, fin=False) for f in frames[1:-1])
        + zero_masked(frames[-1], 0x0)
    )
    assert await read_message(reader) == {"type": "pong", "id": 1}


MALFORMED_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"G@T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS on the HTTP port
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: zz\r\nSec-WebSocket-Version: 13\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED_REQUESTS)
async def test_a_malformed_http_request_is_one_log_line(
    make_server: ServerFactory,
    request_bytes: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes)
    assert (await read_response(reader))[0] == 400
    writer.close()
    records = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert len(records) <= 1, records
    assert not [r for r in records if r.exc_info or r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEALTH,
        b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        MALFORMED_REQUESTS[0],
        upgrade_request(extra="Origin: https://evil.example\r\n"),
        upgrade_request(),
    ],
    ids=["200", "404", "400 unparsable", "403 upgrade", "101"],
)
async def test_no_response_names_python_or_aiohttp_versions(
    make_server: ServerFactory, request_bytes: bytes
) -> None:
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    writer.close()
    servers = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
    assert servers in ([], [b"Server: plexus"]), head


async def test_an_upgrade_on_a_kept_alive_http_socket(make_server: ServerFactory) -> None:
    """An aiohttp session reuses the socket of an earlier request for its WebSocket.

    aiohttp had that socket; it gives it back and the upgrade is served like
    any other, and aiohttp forgets its side of the socket once it closes.
    """
    server = await make_server()
    assert server.endpoint is not None
    assert server._runner is not None
    http = server._runner.server
    assert http is not None
    connector = aiohttp.TCPConnector(limit=1)  # one socket for everything
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(3):
            async with session.get(server.url + "/health") as response:
                assert response.status == 200
            ws = await session.ws_connect(server.ws_url)
            assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
            assert server.endpoint.sockets_from("127.0.0.1") == 1  # the same socket
            await ws.send_json({"type": "ping", "id": i})
            assert await ws.receive_json(timeout=TIMEOUT) == {"type": "pong", "id": i}
            await ws.close()
            assert ws.close_code == 1000
    await wait_for(lambda: server.endpoint is not None and not server.endpoint.connections)
    await wait_for(lambda: not http.connections)
    assert server.endpoint.sockets_from("127.0.0.1") == 0


async def test_a_plain_get_of_the_websocket_path_is_426(make_server: ServerFactory) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as session, session.get(server.url + "/ws") as response:
        assert response.status == 426
        assert response.headers["Upgrade"] == "websocket"
        assert (await response.json())["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("extra", "status", "needle"),
    [
        ("Sec-WebSocket-Version: 8\r\n", 400, "Sec-WebSocket-Version"),
        ("X-Big: " + "b" * 9000 + "\r\n", 431, "8192 bytes"),  # websockets' line limit
    ],
)
async def test_an_invalid_upgrade_gets_a_json_error(
    make_server: ServerFactory, extra: str, status: int, needle: str
) -> None:
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = upgrade_request(extra=extra)
    if "Version" in extra:
        request = request.replace(b"Sec-WebSocket-Version: 13\r\n", b"", 1)
    writer.write(request)
    got, headers, body = await read_response(reader)
    writer.close()
    error = orjson.loads(body)["error"]
    assert (got, error["code"]) == (status, "bad_request"), error
    assert needle in error["message"]
    assert headers["connection"] == "close"


async def test_an_upgrade_head_over_64_kib_is_431(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ws HTTP/1.1\r\n" + b"X-Pad: %s\r\n" % (b"p" * 4000) * 17)
    status, _, body = await read_response(reader)
    writer.close()
    assert (status, orjson.loads(body)["error"]["code"]) == (431, "too_large")
