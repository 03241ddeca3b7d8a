"""End-to-end: the protocol over real sockets to an in-process server on port 0."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgpack
import pytest

from plexus.app import Server
from plexus.client import Client, PlexusClientError
from plexus.config import NamespaceOptions, default_namespaces
from plexus.engines.base import Engine, Retention
from plexus.engines.memory import MemoryBroker, MemoryPresenceStore
from plexus.exceptions import Unavailable
from plexus.models import Duplicate, HistoryPage, Publication, StreamPosition
from plexus.node import RpcCall
from plexus.protocol.codec import MSGPACK_SUBPROTOCOL
from tests.conftest import ClientFactory, ServerFactory
from tests.helpers import TIMEOUT


async def raw(ws: aiohttp.ClientWebSocketResponse, message: Any) -> dict[str, Any]:
    """Send a raw JSON message and return the next message the server sends."""
    if isinstance(message, str):
        await ws.send_str(message)
    else:
        await ws.send_json(message)
    reply = await ws.receive(timeout=TIMEOUT)
    assert reply.type is aiohttp.WSMsgType.TEXT, reply
    result: dict[str, Any] = reply.json()
    return result


async def open_raw(
    session: aiohttp.ClientSession, server: Server, **kwargs: Any
) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(server.ws_url, **kwargs)
    welcome = await ws.receive_json(timeout=TIMEOUT)
    assert welcome["type"] == "welcome"
    return ws


async def test_welcome_shape(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        welcome = await ws.receive_json(timeout=TIMEOUT)
        assert welcome["type"] == "welcome"
        assert welcome["client"].startswith("c-")
        assert welcome["user"] is None
        assert welcome["server"] == "plexus/0.1.0"
        assert welcome["ping_interval"] == 25
        assert welcome["max_message_size"] == 65536
        ws2 = await session.ws_connect(server.ws_url)
        assert (await ws2.receive_json(timeout=TIMEOUT))["client"] != welcome["client"]
        await ws.close()
        await ws2.close()


async def test_two_clients_chat_in_order(connect: ClientFactory) -> None:
    alice, bob = await connect(), await connect()
    sub_a = await alice.subscribe("chat:lobby")
    sub_b = await bob.subscribe("chat:lobby")
    assert sub_a.result["channel"] == "chat:lobby"
    assert sub_a.result["recovered"] is False
    for i in range(20):
        await (alice if i % 2 == 0 else bob).publish("chat:lobby", {"n": i, "text": "你好世界 🎉"})
    for sub in (sub_a, sub_b):
        got = [await sub.get(TIMEOUT, kind="message") for _ in range(20)]
        assert [m["data"]["n"] for m in got] == list(range(20))
        offsets = [m["offset"] for m in got]
        assert offsets == list(range(offsets[0], offsets[0] + 20))
        assert got[0]["data"]["text"] == "你好世界 🎉"
        assert got[0]["from"]["client"] == alice.client_id
        assert got[1]["from"]["client"] == bob.client_id
        assert {"channel", "data", "offset", "epoch", "time", "from"} <= got[0].keys()


async def test_unsubscribe_stops_delivery(connect: ClientFactory) -> None:
    alice, bob = await connect(), await connect()
    sub_b = await bob.subscribe("chat:room")
    await bob.unsubscribe("chat:room")
    await alice.subscribe("chat:room")
    await alice.publish("chat:room", "after")
    # Bob's queue got only the end marker; a later message proves ordering.
    await bob.subscribe("chat:other")
    await alice.publish("chat:other", "marker")
    assert (await bob.subscriptions["chat:other"].get(TIMEOUT, kind="message"))["data"] == "marker"
    assert sub_b.queue.qsize() == 1
    assert sub_b.queue.get_nowait() is None


async def test_ids_match_replies_and_errors(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await open_raw(session, server)
        reply = await raw(ws, {"type": "subscribe", "id": "s-1", "channel": "chat:x"})
        assert reply == {
            "type": "reply",
            "id": "s-1",
            "result": {
                "channel": "chat:x",
                "offset": 0,
                "epoch": reply["result"]["epoch"],
                "recovered": False,
            },
        }
        err = await raw(ws, {"type": "subscribe", "id": 77, "channel": "chat:x"})
        assert err["type"] == "error"
        assert err["id"] == 77
        assert err["code"] == "already_subscribed"
        assert await raw(ws, {"type": "ping", "id": 5}) == {"type": "pong", "id": 5}
        # A command without id gets no answer on success: the next reply is the ping's.
        await ws.send_json({"type": "unsubscribe", "channel": "chat:x"})
        assert await raw(ws, {"type": "ping", "id": 6}) == {"type": "pong", "id": 6}
        # ... and an error without id on failure.
        err = await raw(ws, {"type": "unsubscribe", "channel": "chat:x"})
        assert err["code"] == "not_subscribed"
        assert "id" not in err
        await ws.close()


class BrokenBroker(MemoryBroker):
    """A memory engine whose storage is down."""

    def publish_nowait(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        raise Unavailable("history store is down")

    async def position(self, channel: str, *, create: Retention | None = None) -> StreamPosition:
        raise Unavailable("history store is down")

    async def read(self, channel: str, **kwargs: Any) -> HistoryPage:
        raise Unavailable("history store is down")


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ({"type": "publish", "id": 1, "channel": 5, "data": 1}, "bad_request"),
        ({"type": "teleport", "id": 1}, "unknown_type"),
        ({"type": "subscribe", "id": 1, "channel": "no spaces"}, "invalid_channel"),
        ({"type": "unsubscribe", "id": 1, "channel": "chat:none"}, "not_subscribed"),
        ({"type": "subscribe", "id": 1, "channel": "secure:a"}, "unauthorized"),
        ({"type": "publish", "id": 1, "channel": "news", "data": 1}, "permission_denied"),
        ({"type": "subscribe", "id": 1, "channel": "#alice"}, "unauthorized"),
        ({"type": "subscribe", "id": 1, "channel": "chat:a", "info": "x" * 1100}, "too_large"),
        ({"type": "rpc", "id": 1, "method": "nobody"}, "not_found"),
        ({"type": "rpc", "id": 1, "method": "explode"}, "internal"),
    ],
)
async def test_error_codes(
    make_server: ServerFactory, command: Any, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    namespaces = default_namespaces()
    namespaces["secure"] = NamespaceOptions(anonymous=False)
    server = await make_server(namespaces=namespaces)

    @server.rpc("explode")
    async def explode(call: RpcCall) -> Any:
        raise RuntimeError("boom")

    async with aiohttp.ClientSession() as session:
        ws = await open_raw(session, server)
        err = await raw(ws, command)
        assert err["type"] == "error"
        assert err["code"] == code
        assert isinstance(err["message"], str)
        assert err["message"]
        # The connection stays open and usable.
        assert await raw(ws, {"type": "ping", "id": "after"}) == {"type": "pong", "id": "after"}
        await ws.close()


async def test_rate_limited_and_unavailable(make_server: ServerFactory) -> None:
    limited = await make_server(publish_rate=1.0, publish_burst=2)
    async with Client(limited.ws_url, timeout=TIMEOUT) as client:
        await client.publish("chat:a", 1)
        await client.publish("chat:a", 2)
        with pytest.raises(PlexusClientError) as info:
            await client.publish("chat:a", 3)
        assert info.value.code == "rate_limited"
    broken = Server(limited.settings.__class__(port=0, history_backend="memory"))
    broker = BrokenBroker()
    broken._engine = Engine(broker, broker, MemoryPresenceStore())
    await broken.start()
    try:
        async with Client(broken.ws_url, timeout=TIMEOUT) as client:
            with pytest.raises(PlexusClientError) as info:
                await client.publish("chat:a", 1)
            assert info.value.code == "unavailable"
            with pytest.raises(PlexusClientError) as info:
                await client.subscribe("chat:a")
            assert info.value.code == "unavailable"
            await client.ping()  # still connected
    finally:
        await broken.stop()


async def test_rpc_handler_answers(server: Server, connect: ClientFactory) -> None:
    @server.rpc("add")
    async def add(call: RpcCall) -> Any:
        return {"sum": call.data["a"] + call.data["b"], "client": call.client}

    client = await connect()
    assert await client.rpc("add", {"a": 2, "b": 3}) == {"sum": 5, "client": client.client_id}


async def test_msgpack_and_json_exchange_text_and_bytes(connect: ClientFactory) -> None:
    js = await connect(encoding="json")
    mp = await connect(encoding="msgpack")
    sub_js = await js.subscribe("chat:bin")
    sub_mp = await mp.subscribe("chat:bin")
    blob = bytes(range(256))
    await mp.publish("chat:bin", {"text": "from msgpack ✓", "blob": blob})
    await js.publish("chat:bin", {"text": "from json", "blob": {"$bytes": "AAEC"}})
    for sub in (sub_js, sub_mp):
        first = await sub.get(TIMEOUT, kind="message")
        second = await sub.get(TIMEOUT, kind="message")
        # Both clients decode bytes as bytes: the JSON codec turns $bytes back into bytes.
        assert first["data"] == {"text": "from msgpack ✓", "blob": blob}
        assert second["data"] == {"text": "from json", "blob": b"\x00\x01\x02"}


async def test_json_client_sees_bytes_as_base64_object(
    server: Server, connect: ClientFactory
) -> None:
    mp = await connect(encoding="msgpack")
    async with aiohttp.ClientSession() as session:
        ws = await open_raw(session, server)
        await raw(ws, {"type": "subscribe", "id": 1, "channel": "chat:b64"})
        await mp.publish("chat:b64", b"\xff\x00")
        push = await ws.receive_json(timeout=TIMEOUT)
        assert push["data"] == {"$bytes": "/wA="}
        await ws.close()


async def test_bytes_marker_with_other_keys_is_delivered_as_an_ordinary_object(
    server: Server,
) -> None:
    # Only an object whose one key is "$bytes" stands for bytes; with another key
    # it is plain data: neither decoded (its other keys lost) nor refused as bad
    # base64. Raw sockets, so that no client library decodes anything on the way.
    data = {"$bytes": "AAE=", "note": "kept?"}
    not_base64 = {"$bytes": "%%", "note": 2}
    channel = "chat:not-bytes"
    async with aiohttp.ClientSession() as session:
        js = await open_raw(session, server)
        mp = await session.ws_connect(server.ws_url, protocols=[MSGPACK_SUBPROTOCOL])
        assert msgpack.unpackb(await mp.receive_bytes(timeout=TIMEOUT))["type"] == "welcome"
        publisher = await open_raw(session, server)
        assert (await raw(js, {"type": "subscribe", "id": 1, "channel": channel}))["id"] == 1
        await mp.send_bytes(msgpack.packb({"type": "subscribe", "id": 1, "channel": channel}))
        assert msgpack.unpackb(await mp.receive_bytes(timeout=TIMEOUT))["type"] == "reply"
        for value in (data, not_base64):
            command = {"type": "publish", "id": 2, "channel": channel, "data": value}
            assert (await raw(publisher, command))["type"] == "reply"
            pushed = await js.receive_json(timeout=TIMEOUT)
            while pushed["type"] == "join":  # the MessagePack subscriber's
                pushed = await js.receive_json(timeout=TIMEOUT)
            assert (pushed["type"], pushed["data"]) == ("message", value)
            packed = msgpack.unpackb(await mp.receive_bytes(timeout=TIMEOUT))
            # A map of strings, not MessagePack bin.
            assert (packed["type"], packed["data"]) == ("message", value)
        page = await raw(publisher, {"type": "history", "id": 3, "channel": channel})
        assert [m["data"] for m in page["result"]["messages"]] == [data, not_base64]
        for ws in (js, mp, publisher):
            await ws.close()


async def test_api_publish_reaches_subscribers_without_from(
    server: Server, connect: ClientFactory
) -> None:
    client = await connect()
    sub = await client.subscribe("news")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.url + "/api/publish", json={"channel": "news", "data": {"headline": "hi"}}
        ) as response,
    ):
        assert response.status == 200
        body = await response.json()
    message = await sub.get(TIMEOUT, kind="message")
    assert message["offset"] == body["offset"]
    assert message["data"] == {"headline": "hi"}
    assert "from" not in message


async def test_health_and_info(server: Server, connect: ClientFactory) -> None:
    await connect()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/health") as response:
            health = await response.json()
        async with session.get(server.url + "/api/info") as response:
            info = await response.json()
    assert health["status"] == "ok"
    assert health["connections"] == 1
    assert health["version"] == "0.1.0"
    assert health["uptime"] >= 0
    assert info["connections"] == 1


async def test_chat_page_is_served(server: Server) -> None:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "<html" in (await response.text()).lower()


async def test_many_clients_publish_concurrently(connect: ClientFactory) -> None:
    clients = [await connect() for _ in range(10)]
    subs = [await c.subscribe("chat:many") for c in clients]
    await asyncio.gather(*(c.publish("chat:many", i) for i, c in enumerate(clients)))
    for sub in subs:
        got = [await sub.get(TIMEOUT, kind="message") for _ in range(10)]
        offsets = [m["offset"] for m in got]
        assert offsets == sorted(offsets)
        assert sorted(m["data"] for m in got) == list(range(10))


async def test_metrics_count_what_happened(server: Server, connect: ClientFactory) -> None:
    client = await connect()
    sub = await client.subscribe("chat:m")
    await client.publish("chat:m", "x")
    await sub.get(TIMEOUT, kind="message")
    with pytest.raises(PlexusClientError):
        await client.subscribe("bad name")
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["plexus_connections"] == 1
    assert samples["plexus_subscriptions"] == 1
    assert samples["plexus_messages_published_total"] == 1
    assert samples["plexus_deliveries_total"] >= 1
    assert samples['plexus_errors_total{code="invalid_channel"}'] == 1
    assert samples["plexus_publish_seconds_count"] == 1
    assert samples["plexus_bytes_out_total"] > 0


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_pipelined_publishes_keep_order(make_server: ServerFactory, backend: str) -> None:
    server = await make_server(history_backend=backend)
    async with aiohttp.ClientSession() as session:
        watcher = await open_raw(session, server)
        await raw(watcher, {"type": "subscribe", "id": 0, "channel": "chat:pipe"})
        ws = await open_raw(session, server)
        for i in range(300):
            await ws.send_json({"type": "publish", "id": i, "channel": "chat:pipe", "data": i})
        # A non-publish command waits for the publishes before it.
        await ws.send_json({"type": "history", "id": "h", "channel": "chat:pipe", "limit": 1000})
        replies = [await ws.receive_json(timeout=TIMEOUT) for _ in range(301)]
        assert [r["id"] for r in replies] == [*range(300), "h"]
        assert [r["result"]["offset"] for r in replies[:300]] == list(range(1, 301))
        assert [m["data"] for m in replies[300]["result"]["messages"]] == list(range(300))
        pushes = [await watcher.receive_json(timeout=TIMEOUT) for _ in range(300)]
        assert [p["data"] for p in pushes] == list(range(300))
        await ws.close()
        await watcher.close()
