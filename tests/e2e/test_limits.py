"""End-to-end: limits, slow consumers, bad input and shutdown, over real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from plexus.app import Server
from plexus.client import Client
from plexus.connection import Connection
from tests.conftest import ClientFactory, ServerFactory
from tests.helpers import TIMEOUT, ServerProcess, metrics, serve_refused, wait_for


async def test_oversized_message_closes_1009_others_unaffected(
    server: Server, connect: ClientFactory
) -> None:
    other = await connect()
    sub = await other.subscribe("chat:x")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        await ws.receive_json(timeout=TIMEOUT)
        await ws.send_str('{"type":"publish","channel":"chat:x","data":"' + "x" * 70_000 + '"}')
        msg = await ws.receive(timeout=TIMEOUT)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009
    publisher = await connect()
    await publisher.publish("chat:x", "still fine")
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == "still fine"


async def test_twenty_bad_commands_close_4000_others_unaffected(
    server: Server, connect: ClientFactory
) -> None:
    other = await connect()
    sub = await other.subscribe("chat:y")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        await ws.receive_json(timeout=TIMEOUT)
        for _ in range(20):
            await ws.send_str("garbage")
        errors = 0
        while True:
            msg = await ws.receive(timeout=TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            assert msg.json()["code"] == "bad_request"
            errors += 1
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4000
        assert errors == 20  # every bad command was answered before the close
    await other.publish("chat:y", "ok")
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == "ok"


async def test_publish_flood_closes_4029(make_server: ServerFactory) -> None:
    server = await make_server(publish_rate=1.0, publish_burst=1, rate_limit_disconnect=30)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        await ws.receive_json(timeout=TIMEOUT)
        for i in range(40):
            await ws.send_json({"type": "publish", "id": i, "channel": "chat:f", "data": i})
        answers: dict[int, str | None] = {}
        while True:
            msg = await ws.receive(timeout=TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            answer = msg.json()
            answers[answer["id"]] = answer.get("code")
        assert msg.data == 4029
        # Answers may come in any order (publishes are pipelined): match by id.
        assert list(answers.values()).count("rate_limited") == 31
        assert answers[0] is None  # the first publish was accepted


async def test_slow_consumer_closed_4008_others_get_everything(
    make_server: ServerFactory,
) -> None:
    limit = 256 * 1024
    server = await make_server(max_queue_bytes=limit)
    assert (await metrics(server.url))["plexus_slow_consumer_disconnects_total"] == 0
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    fast = [Client(server.ws_url, session=session, timeout=TIMEOUT) for _ in range(100)]
    for client in fast:
        await client.connect()
    subs = [await c.subscribe("chat:firehose") for c in fast]

    # The slow client: a tiny receive buffer and a client library that stops
    # reading the socket once its queue is full (websockets' flow control).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    slow = await ws_connect(server.ws_url, sock=sock, max_queue=1, max_size=None)
    await slow.recv()  # welcome
    await slow.send('{"type":"subscribe","id":1,"channel":"chat:firehose"}')
    await slow.recv()  # reply
    assert server.endpoint is not None
    slow_conn: Connection = next(
        c for c in server.endpoint.connections if c.client_id not in {f.client_id for f in fast}
    )

    async def drain_slow() -> tuple[int, websockets.ConnectionClosed]:
        # Once the server gave up on it, the slow client reads again and
        # finds the close frame behind what was already sent.
        await wait_for(lambda: slow_conn.close_code is not None, timeout=TIMEOUT * 6)
        received = 0
        try:
            while True:
                await asyncio.wait_for(slow.recv(), TIMEOUT)
                received += 1
        except websockets.ConnectionClosed as exc:
            return received, exc

    slow_reader = asyncio.create_task(drain_slow())
    # 4.8 MB for each subscriber: more than the kernel buffers of loopback
    # (about 3 MB here) plus the outbox limit, so the slow client must overflow.
    payload = "p" * 16_000
    count = 300
    async with Client(server.ws_url, session=session, timeout=TIMEOUT) as publisher:
        for i in range(count):
            await publisher.publish("chat:firehose", {"i": i, "p": payload})
    received, closed = await asyncio.wait_for(slow_reader, TIMEOUT * 6)
    assert slow_conn.close_code == 4008
    assert (await metrics(server.url))["plexus_slow_consumer_disconnects_total"] == 1
    assert slow_conn.outbox.peak <= limit
    assert closed.rcvd is not None
    assert closed.rcvd.code == 4008
    assert received < count

    for sub in subs:
        got = [(await sub.get(TIMEOUT, kind="message"))["data"]["i"] for _ in range(count)]
        assert got == list(range(count))
    for client in fast:
        await client.close()
    await session.close()


async def test_heartbeat_closes_silent_peer(make_server: ServerFactory) -> None:
    interval = 0.4
    server = await make_server(ping_interval=interval, pong_timeout=0.2)
    # A raw client that never answers pings: aiohttp with autoping off.
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url, autoping=False)
        await ws.receive_json(timeout=TIMEOUT)
        pings = 0
        # One deadline for the whole wait: a server that keeps pinging but never
        # closes would otherwise keep this loop alive until pytest's own timeout.
        try:
            async with asyncio.timeout(TIMEOUT):
                while (msg := await ws.receive()).type is aiohttp.WSMsgType.PING:
                    pings += 1
        except TimeoutError:
            pytest.fail(f"not closed within {TIMEOUT}s of silence ({pings} pings unanswered)")
        assert pings >= 1
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1008
        # A peer that answers stays connected through several intervals.
        async with Client(server.ws_url, timeout=TIMEOUT) as alive:
            assert server.endpoint is not None
            conn = next(iter(server.endpoint.connections))
            await asyncio.sleep(4 * interval)  # sleep-ok: heartbeat rounds must pass; no event
            assert conn.close_code is None
            await alive.ping()


def test_sigterm_closes_every_client_with_1001() -> None:
    async def scenario(server: ServerProcess) -> list[int | None]:
        clients = [Client(server.ws_url, timeout=TIMEOUT) for _ in range(20)]
        for client in clients:
            await client.connect()
            await client.subscribe("chat:bye")
        assert server.proc is not None
        server.proc.terminate()
        codes = [await client.wait_closed(TIMEOUT) for client in clients]
        for client in clients:
            await client.close()
        return codes

    server = ServerProcess(env={"PLEXUS_HISTORY_BACKEND": "memory"}).start()
    try:
        started = time.monotonic()
        codes = asyncio.run(scenario(server))
        assert server.proc is not None
        status = server.proc.wait(TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        server.kill()
    assert codes == [1001] * 20
    assert status == 0
    assert elapsed < 5.0 + 2.0  # shutdown_timeout plus process start-up margin
    assert "shutting down" in server.output()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--port", "99999"], {}, "port"),
        ([], {"PLEXUS_PING_INTERVAL": "soon"}, "PLEXUS_PING_INTERVAL"),
        ([], {"PLEXUS_MAX_QUEUE_BYTES": "0"}, "max_queue_bytes"),
        ([], {"PLEXUS_LOG_FORMAT": "xml"}, "log_format"),
        ([], {"PLEXUS_BROKER": "redis"}, "broker"),
        ([], {"PLEXUS_WS_ENGINE": "aiohttp"}, "ws_engine: the 'aiohttp' engine was retired"),
        ([], {"PLEXUS_COMPRESSION": "gzip"}, "compression: must be off or on"),
        (["--config", "/nonexistent.toml"], {}, "config"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    assert needle in serve_refused(args, env)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_unwritable_data_dir_exits_2_with_one_line(tmp_path: Any, how: str) -> None:
    # Under a regular file: no one can create it, root included (chmod would
    # not stop root).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data_dir = str(blocker / "sub")
    args = ["--data-dir", data_dir] if how == "flag" else []
    env = {"PLEXUS_DATA_DIR": data_dir} if how == "env" else {}
    # The default history backend, sqlite, needs the directory.
    line = serve_refused(["--port", "0", *args], {**env, "PLEXUS_HISTORY_BACKEND": "sqlite"})
    assert "data_dir" in line
    assert data_dir in line


def test_bad_toml_setting_names_it(tmp_path: Any) -> None:
    config = tmp_path / "plexus.toml"
    config.write_text("ping_interval = 5\npong_timeout = 9\n[namespaces.chat]\nhistory_size = -1\n")
    assert "pong_timeout" in serve_refused(["--config", str(config)])


async def test_origin_check(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        for origin in ("http://localhost:3000", "http://127.0.0.1:9", server.url):
            ws = await session.ws_connect(server.ws_url, origin=origin)
            assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
            await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(server.ws_url, origin="https://evil.example")
        assert info.value.status == 403
