"""End-to-end: the SSE transport (`GET /sse` + `POST /emulation`) against real servers.

Every test reads the raw event stream with aiohttp (`tests.helpers.EventStream`)
and posts commands as a client written from the spec would.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from plexus.app import Server
from plexus.auth import make_token
from plexus.client import Client
from plexus.rpc import RpcCall
from tests.conftest import ServerFactory
from tests.e2e.test_scale_out import start_node
from tests.helpers import (
    TIMEOUT,
    EventStream,
    RedisServer,
    api_post,
    metrics,
    read_response,
    wait_for,
)

ANSWERS = ("reply", "error", "pong")
SECRET = "sse-test-secret-that-is-long-enough-0123456789"

OpenStream = Callable[..., EventStream]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def stream_to(http: aiohttp.ClientSession) -> AsyncIterator[OpenStream]:
    """Make `EventStream`s (closed at the end)."""
    made: list[EventStream] = []

    def factory(url: str, **kwargs: Any) -> EventStream:
        stream = EventStream(http, url, **kwargs)
        made.append(stream)
        return stream

    yield factory
    for stream in made:
        stream.close()


async def read_answers(stream: EventStream, count: int) -> list[dict[str, Any]]:
    """The next `count` answers (replies, errors, pongs), pushes skipped."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        message = await stream.event()
        assert message is not None, f"the stream ended after {found}"
        if message["type"] in ANSWERS:
            found.append(message)
    return found


def pings(first: int, last: int) -> list[dict[str, Any]]:
    """`ping` commands with ids `first` .. `last - 1`."""
    return [{"type": "ping", "id": n} for n in range(first, last)]


def error_code(body: Any) -> str:
    """The protocol error code of an HTTP error body."""
    return str(body["error"]["code"])


# ----- opening


async def test_welcome_names_the_session_and_the_node(
    server: Server, stream_to: OpenStream
) -> None:
    assert server.node is not None
    stream = stream_to(server.url)
    welcome = await stream.open()
    assert welcome["type"] == "welcome"
    assert welcome["node"] == server.node.name
    assert welcome["user"] is None
    session = welcome["session"]
    assert isinstance(session, str)
    assert len(session) >= 24
    assert stream.response is not None
    assert "no-cache" in stream.response.headers["Cache-Control"]
    # Each stream is a session of its own; asking for one to resume gets a new one.
    other = await stream_to(server.url).open()
    again = await stream_to(server.url).open(f"?session={session}")
    assert len({session, other["session"], again["session"]}) == 3
    assert len({welcome["client"], other["client"], again["client"]}) == 3
    # ...and the first goes on as before.
    assert await stream.post([{"type": "ping", "id": 1}]) == (204, None)
    assert await stream.event() == {"type": "pong", "id": 1}


async def test_a_keep_alive_socket_aiohttp_served_becomes_a_stream(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """Browsers reuse the socket that loaded the page for `GET /sse`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers.get("connection", "keep-alive").lower() == "keep-alive"
        writer.write(b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"text/event-stream" in head
        block = await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)
        poster = EventStream(http, server.url)
        poster.welcome = orjson.loads(block[6:])
        assert poster.welcome["type"] == "welcome"
        assert await poster.post([{"type": "ping", "id": "k"}]) == (204, None)
        block = await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)
        assert orjson.loads(block[6:]) == {"type": "pong", "id": "k"}
    finally:
        writer.close()


async def test_tokens_as_on_a_websocket(make_server: ServerFactory, stream_to: OpenStream) -> None:
    server = await make_server(jwt_secret=SECRET)
    alice = stream_to(server.url)
    welcome = await alice.open(f"?token={make_token(SECRET, user='alice')}")
    assert welcome["user"] == "alice"
    # A refused token: the stream carries only the close event, as the
    # WebSocket carries only its close frame.
    for token, code in (("garbage", 4001), (make_token(SECRET, user="bob", ttl=-60), 4002)):
        refused = stream_to(server.url)
        close = await refused.open(f"?token={token}")
        assert (close["type"], close["code"]) == ("close", code), close
        assert await refused.event() is None


# ----- commands


async def test_a_batch_is_answered_in_order_on_the_stream(
    server: Server, stream_to: OpenStream
) -> None:
    stream = stream_to(server.url)
    await stream.open()
    commands = [
        {"type": "subscribe", "id": 1, "channel": "chat:order", "info": {"nick": "sse"}},
        {"type": "publish", "id": 2, "channel": "chat:order", "data": {"n": 1}},
        {"type": "history", "id": 3, "channel": "chat:order"},
        {"type": "presence", "id": 4, "channel": "chat:order"},
        {"type": "publish", "id": 5, "channel": "news", "data": 1},
        {"type": "nope", "id": 6},
        {"type": "rpc", "id": 7, "method": "missing", "data": None},
        {"type": "ping", "id": 8},
        {"type": "publish", "id": 9, "channel": "chat:order", "data": {"$bytes": "AAE="}},
        {"type": "unsubscribe", "id": 10, "channel": "chat:order"},
        {"type": "ping"},
        {"type": "ping", "id": 11},
    ]
    assert await stream.post(commands) == (204, None)
    events = []
    while len([e for e in events if e["type"] in ANSWERS]) < 12:
        events.append(await stream.event())
    answers = [e for e in events if e["type"] in ANSWERS]
    assert [a.get("id") for a in answers] == [*range(1, 11), None, 11]
    kinds = [a["type"] if a["type"] != "error" else a["code"] for a in answers]
    assert kinds == [
        *["reply"] * 4,
        "permission_denied",
        "unknown_type",
        "not_found",
        "pong",
        "reply",
        "reply",
        "pong",
        "pong",
    ]
    assert answers[0]["result"]["offset"] == 0
    assert [m["data"] for m in answers[2]["result"]["messages"]] == [{"n": 1}]
    (me,) = answers[3]["result"]["clients"].values()
    assert me["info"] == {"nick": "sse"}
    # The subscription's messages come after its reply, bytes as `$bytes`.
    pushed = [e for e in events if e["type"] == "message"]
    assert [m["data"] for m in pushed] == [{"n": 1}, {"$bytes": "AAE="}]
    assert events.index(pushed[0]) > events.index(answers[0])


async def test_posts_one_after_another_keep_their_order(
    make_server: ServerFactory, stream_to: OpenStream
) -> None:
    # SQLite history: publishes wait for the store, later commands queue behind them.
    server = await make_server(history_backend="sqlite")
    stream = stream_to(server.url)
    await stream.open()
    assert await stream.post([{"type": "subscribe", "id": -1, "channel": "chat:seq"}]) == (
        204,
        None,
    )
    for batch in range(10):
        commands = [
            {"type": "publish", "id": n, "channel": "chat:seq", "data": n}
            for n in range(batch * 10, batch * 10 + 10)
        ]
        assert await stream.post(commands) == (204, None)
    events = []
    while len([e for e in events if e["type"] == "reply"]) < 101:
        message = await stream.event()
        events.append(message)
    replies = [e for e in events if e["type"] == "reply"]
    assert [r["id"] for r in replies] == [-1, *range(100)]
    assert [r["result"]["offset"] for r in replies[1:]] == list(range(1, 101))
    while len([e for e in events if e["type"] == "message"]) < 100:
        events.append(await stream.event())
    assert [e["data"] for e in events if e["type"] == "message"] == list(range(100))


async def test_an_sse_client_and_a_websocket_client_talk(
    server: Server, stream_to: OpenStream
) -> None:
    stream = stream_to(server.url)
    welcome = await stream.open()
    async with Client(server.ws_url, timeout=TIMEOUT) as ws:
        sub = await ws.subscribe("chat:mixed")
        assert await stream.post(
            [
                {"type": "subscribe", "id": 1, "channel": "chat:mixed"},
                {"type": "publish", "id": 2, "channel": "chat:mixed", "data": "from sse"},
            ]
        ) == (204, None)
        joined = await sub.get(TIMEOUT, kind="join")
        assert joined["client"] == welcome["client"]
        assert (await sub.get(TIMEOUT, kind="message"))["data"] == "from sse"
        await ws.publish("chat:mixed", "from ws")
        message = await stream.until(lambda m: m["type"] == "message" and m["data"] == "from ws")
        assert message["from"]["client"] != welcome["client"]
        presence = await ws.presence("chat:mixed")
        assert welcome["client"] in presence
    left = await stream.until(lambda m: m["type"] == "leave")
    assert left["channel"] == "chat:mixed"


# ----- bad input


async def test_bad_posts_get_their_documented_codes(
    make_server: ServerFactory, stream_to: OpenStream, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_body_size=4096, max_message_size=1024)
    stream = stream_to(server.url)
    await stream.open()
    ping = [{"type": "ping", "id": 1}]
    status, body = await stream.post_raw(b'{"session": ')
    assert (status, error_code(body)) == (400, "bad_request")
    for shape in (
        b"[]",
        b'{"session": 5, "commands": []}',
        b'{"session": "s", "commands": {}}',
        b'{"session": "s", "node": 1, "commands": []}',
    ):
        status, body = await stream.post_raw(shape)
        assert (status, error_code(body)) == (400, "bad_request"), shape
    good = orjson.dumps(
        {"session": stream.session, "node": stream.welcome["node"], "commands": ping}
    )
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, body = await stream.post_raw(good, headers={"Content-Type": content_type})
        assert (status, error_code(body)) == (415, "bad_request")
    status, body = await stream.post(ping, session="no-such-session")
    assert (status, error_code(body)) == (404, "not_found")
    # A node that does not exist answers nothing: 404 as well.
    status, body = await stream.post(ping, session="no-such-session", node="no-such-node")
    assert (status, error_code(body)) == (404, "not_found")
    status, body = await stream.post(ping, headers={"Origin": "https://evil.example"})
    assert (status, error_code(body)) == (403, "permission_denied")
    async with http.get(server.url + "/sse", headers={"Origin": "https://evil.example"}) as refused:
        assert refused.status == 403
        assert error_code(await refused.json()) == "permission_denied"
    status, body = await stream.post([{"type": "ping", "data": "x" * 5000}])
    assert (status, error_code(body)) == (413, "too_large")
    status, body = await stream.post([{"type": "ping"}] * 101)
    assert (status, error_code(body)) == (413, "too_large")
    # None of that touched the session.
    assert await stream.post(ping) == (204, None)
    assert await stream.event() == {"type": "pong", "id": 1}
    assert await stream.post([]) == (204, None)
    # A command over max_message_size: what closes a WebSocket with 1009.
    status, body = await stream.post(
        [
            {"type": "ping", "id": 2},
            {"type": "publish", "id": 3, "channel": "chat:a", "data": "x" * 1100},
        ]
    )
    assert (status, error_code(body)) == (413, "too_large")
    assert await stream.event() == {"type": "close", "code": 1009, "reason": "message too big"}
    assert await stream.event() is None
    status, body = await stream.post(ping)
    assert (status, error_code(body)) == (404, "not_found")


async def test_cors_for_allowed_origins_only(
    make_server: ServerFactory, stream_to: OpenStream, http: aiohttp.ClientSession
) -> None:
    app = "https://app.example"
    server = await make_server(allowed_origins=[app])
    stream = stream_to(server.url)
    await stream.open(headers={"Origin": app})
    assert stream.response is not None
    assert stream.response.headers["Access-Control-Allow-Origin"] == app
    assert stream.response.headers["Vary"] == "Origin"
    status, _ = await stream.post([{"type": "ping", "id": 1}], headers={"Origin": app})
    assert status == 204
    preflight = {
        "Origin": app,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(server.url + "/emulation", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == app
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Access-Control-Allow-Headers"].lower() == "content-type"
    async with http.post(
        server.url + "/emulation",
        json={"session": stream.session, "commands": []},
        headers={"Origin": app},
    ) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == app
    for other in ("https://evil.example", "http://localhost:3000"):
        foreign = {**preflight, "Origin": other}
        async with http.options(server.url + "/emulation", headers=foreign) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.get(server.url + "/sse", headers={"Origin": other}) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        status, body = await stream.post([], headers={"Origin": other})
        assert (status, error_code(body)) == (403, "permission_denied")


# ----- heartbeat, limits and the end


async def test_heartbeat_comments_and_no_pong_asked(
    make_server: ServerFactory, stream_to: OpenStream
) -> None:
    server = await make_server(ping_interval=0.4, pong_timeout=0.2)
    stream = stream_to(server.url)
    await stream.open()
    # Four heartbeats: longer than a WebSocket that never answers would live.
    for _ in range(4):
        assert await stream.event(comments=True) == {"comment": "ping"}
    assert await stream.post([{"type": "ping", "id": "alive"}]) == (204, None)
    assert await stream.until(lambda m: m["type"] == "pong") == {"type": "pong", "id": "alive"}


async def test_the_limits_of_a_connection_apply(
    make_server: ServerFactory, stream_to: OpenStream
) -> None:
    server = await make_server(publish_rate=1, publish_burst=2, max_subscriptions=2)
    stream = stream_to(server.url)
    await stream.open()
    publishes = [
        {"type": "publish", "id": n, "channel": "chat:limits", "data": n} for n in range(3)
    ]
    subscribes = [
        {"type": "subscribe", "id": 10 + n, "channel": f"chat:limit{n}"} for n in range(3)
    ]
    assert await stream.post([*publishes, *subscribes]) == (204, None)
    answers = await read_answers(stream, 6)
    codes = [a.get("code", a["type"]) for a in answers]
    assert codes == ["reply", "reply", "rate_limited", "reply", "reply", "permission_denied"]
    # 20 bad commands (permission_denied was one) close the session with 4000.
    assert await stream.post([{"type": "nope", "id": n} for n in range(25)]) == (204, None)
    errors = [await stream.event() for _ in range(19)]
    assert [(e["code"], e["id"]) for e in errors] == [("unknown_type", n) for n in range(19)]
    assert await stream.event() == {
        "type": "close",
        "code": 4000,
        "reason": "too many bad commands",
    }
    assert await stream.event() is None


async def test_max_connections_per_ip_counts_streams(
    make_server: ServerFactory, stream_to: OpenStream, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_connections_per_ip=3)
    streams = [stream_to(server.url) for _ in range(3)]
    for stream in streams:
        await stream.open()
    async with http.get(server.url + "/sse") as refused:
        assert refused.status == 429
        assert error_code(await refused.json()) == "rate_limited"
    streams[0].close()
    assert server.endpoint is not None
    endpoint = server.endpoint
    await wait_for(lambda: endpoint.sockets_from("127.0.0.1") < 3)
    assert (await stream_to(server.url).open())["type"] == "welcome"


async def test_a_reader_that_stops_reading_is_closed_4008_others_keep_receiving(
    make_server: ServerFactory, stream_to: OpenStream, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_queue_bytes=128 * 1024)
    # The slow reader: a socket with small kernel buffers that reads its
    # welcome and its subscribe reply, then nothing.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    writer.write(b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200 ")
    slow = EventStream(http, server.url)
    slow.welcome = orjson.loads((await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT))[6:])
    subscribe = [{"type": "subscribe", "id": 1, "channel": "chat:flood"}]
    assert await slow.post(subscribe) == (204, None)
    reply = orjson.loads((await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT))[6:])
    assert reply["id"] == 1
    first = reply["result"]["offset"] + 1

    fast = stream_to(server.url)
    await fast.open()
    assert await fast.post(subscribe) == (204, None)
    assert (await fast.until(lambda m: m["type"] == "reply"))["id"] == 1
    seen: list[int] = []
    left = False
    text = "x" * 4000
    for batch in range(200):
        commands = [
            {"type": "publish", "id": n, "channel": "chat:flood", "data": text}
            for n in range(batch * 20, batch * 20 + 20)
        ]
        assert await fast.post(commands) == (204, None)
        while True:
            message = await fast.event()
            assert message is not None
            if message["type"] == "message":
                seen.append(message["offset"])
            elif message["type"] == "leave":
                assert message["client"] == slow.welcome["client"]
                left = True
            elif message["type"] == "reply" and message["id"] == batch * 20 + 19:
                break
        if left:
            break
    assert left, "the reader that stopped was never closed"
    # The fast reader got everything, in order.
    assert seen == list(range(first, first + len(seen)))
    # The slow one: what its socket held, in order, then the close event, then the end.
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    events = [
        orjson.loads(block[6:]) for block in data.split(b"\n\n") if block.startswith(b"data:")
    ]
    assert events[-1] == {
        "type": "close",
        "code": 4008,
        "reason": "slow consumer: output buffer full",
    }
    offsets = [e["offset"] for e in events if e["type"] == "message"]
    assert offsets == sorted(offsets)
    samples = await metrics(server.url)
    assert samples['plexus_connection_closes_total{code="4008"}'] == 1
    # And the others keep receiving.
    assert await fast.post(
        [{"type": "publish", "id": "last", "channel": "chat:flood", "data": 1}]
    ) == (
        204,
        None,
    )
    assert (await fast.until(lambda m: m["type"] == "message"))["data"] == 1


async def test_a_slow_command_backs_posts_up_within_bounds_in_order(
    make_server: ServerFactory, stream_to: OpenStream
) -> None:
    server = await make_server()
    release = asyncio.Event()

    @server.rpc("slow")
    async def slow(call: RpcCall) -> str:
        await release.wait()
        return "done"

    assert server.sse is not None
    stream = stream_to(server.url)
    await stream.open()
    link = server.sse.sessions[stream.session]
    first = [{"type": "rpc", "id": 0, "method": "slow", "data": None}, *pings(1, 100)]
    assert await stream.post(first) == (204, None)
    assert await stream.post(pings(100, 200)) == (204, None)
    # 199 commands wait behind the rpc; 100 more do not fit (256): they wait
    # for room, four POSTs at most.
    waiting = []
    for k in range(4):
        commands = pings(200 + 100 * k, 300 + 100 * k)
        waiting.append(asyncio.create_task(stream.post(commands)))
        await wait_for(lambda k=k: len(link._waiting) == k + 1)  # type: ignore[misc]
    status, body = await stream.post(pings(600, 700))
    assert (status, error_code(body)) == (429, "rate_limited")
    release.set()
    assert await asyncio.gather(*waiting) == [(204, None)] * 4
    answers = await read_answers(stream, 600)
    assert [a["id"] for a in answers] == list(range(600))
    assert answers[0] == {"type": "reply", "id": 0, "result": {"data": "done"}}


async def test_room_is_waited_for_a_bounded_time(
    make_server: ServerFactory, stream_to: OpenStream
) -> None:
    server = await make_server(redis_timeout=0.4)  # the cluster's timeout: 0.2 s of waiting
    release = asyncio.Event()

    @server.rpc("slow")
    async def slow(call: RpcCall) -> str:
        await release.wait()
        return "done"

    stream = stream_to(server.url)
    await stream.open()
    first = [{"type": "rpc", "id": 0, "method": "slow", "data": None}, *pings(1, 100)]
    assert await stream.post(first) == (204, None)
    assert await stream.post(pings(100, 200)) == (204, None)
    status, body = await stream.post(pings(200, 300))
    assert (status, error_code(body)) == (429, "rate_limited")
    release.set()
    answers = await read_answers(stream, 200)
    assert [a["id"] for a in answers] == list(range(200))
    assert await stream.post(pings(300, 400)) == (204, None)
    assert [a["id"] for a in await read_answers(stream, 100)] == list(range(300, 400))


async def test_a_session_ends_with_its_stream(
    make_server: ServerFactory, stream_to: OpenStream
) -> None:
    server = await make_server(jwt_secret=SECRET)
    assert server.sse is not None
    sessions = server.sse.sessions
    # The client goes away: its session is forgotten.
    gone = stream_to(server.url)
    await gone.open()
    gone.close()
    await wait_for(lambda: gone.session not in sessions)
    status, body = await gone.post([{"type": "ping", "id": 1}])
    assert (status, error_code(body)) == (404, "not_found")
    # The server closes it: the close event, the end, and the session is gone.
    alice = stream_to(server.url)
    await alice.open(f"?token={make_token(SECRET, user='alice')}")
    status, body = await api_post(server.url, "/api/disconnect", {"user": "alice"})
    assert (status, body) == (200, {"disconnected": 1})
    close = await alice.event()
    assert (close["type"], close["code"]) == ("close", 4001)
    assert await alice.event() is None
    status, body = await alice.post([{"type": "ping", "id": 1}])
    assert (status, error_code(body)) == (404, "not_found")
    # The server stops: 1001.
    last = stream_to(server.url)
    await last.open()
    assert server.node is not None
    assert (await metrics(server.url))["plexus_sse_connections"] == 1
    await server.stop()
    close = await last.event()
    assert (close["type"], close["code"]) == ("close", 1001)
    assert await last.event() is None
    assert not sessions
    assert server.node.counters.sse_connections == 0


# ----- no sticky sessions


async def test_posts_to_another_node_reach_the_stream_through_redis(
    redis_server: RedisServer, redis_prefix: str, stream_to: OpenStream
) -> None:
    a = await start_node(redis_server, redis_prefix, "A")
    b = await start_node(redis_server, redis_prefix, "B")
    try:
        # The stream on A, every POST to B.
        stream = stream_to(a.url, post_url=b.url)
        welcome = await stream.open()
        assert welcome["node"] == "A"
        async with Client(b.ws_url, timeout=TIMEOUT) as other:
            sub = await other.subscribe("chat:nodes")
            commands = [
                {"type": "subscribe", "id": 1, "channel": "chat:nodes", "info": {"n": "sse"}},
                {"type": "publish", "id": 2, "channel": "chat:nodes", "data": "from sse"},
                {"type": "presence", "id": 3, "channel": "chat:nodes"},
            ]
            assert await stream.post(commands) == (204, None)
            answers = await read_answers(stream, 3)
            assert [a["id"] for a in answers] == [1, 2, 3]
            assert all(a["type"] == "reply" for a in answers), answers
            assert welcome["client"] in answers[2]["result"]["clients"]
            assert (await sub.get(TIMEOUT, kind="message"))["data"] == "from sse"
            await other.publish("chat:nodes", "from ws on B")
            pushed = await stream.until(lambda m: m.get("data") == "from ws on B")
            assert pushed["from"]["client"] != welcome["client"]
            # Batch after batch through B, answered in order on A's stream.
            for batch in range(5):
                publishes = [
                    {"type": "publish", "id": 10 + n, "channel": "chat:nodes", "data": n}
                    for n in range(batch * 10, batch * 10 + 10)
                ]
                assert await stream.post(publishes) == (204, None)
            replies = await read_answers(stream, 50)
            assert [r["id"] for r in replies] == list(range(10, 60))
            offsets = [r["result"]["offset"] for r in replies]
            assert offsets == sorted(offsets)
            history = await other.history("chat:nodes", limit=60)
            datas = [m["data"] for m in history["messages"] if isinstance(m["data"], int)]
            assert datas == list(range(50))
        forwarded = await metrics(b.url)
        assert forwarded['plexus_emulation_posts_total{route="forwarded",status="204"}'] == 6
        # Unknown on A: 404 through B.
        status, body = await stream.post([{"type": "ping"}], session="not-on-a")
        assert (status, error_code(body)) == (404, "not_found")
        # A gone: nobody answers for it.
        await a.stop()
        status, body = await stream.post([{"type": "ping", "id": 1}])
        assert (status, error_code(body)) == (404, "not_found")
    finally:
        await a.stop()
        await b.stop()


async def test_the_forwarding_action_on_one_node_with_the_memory_engine(
    server: Server, stream_to: OpenStream
) -> None:
    """The action other nodes call: with the memory engine the cluster reaches only
    this node, in-process, and the commands join the stream's queue in order."""
    assert server.node is not None
    cluster = server.node.cluster
    stream = stream_to(server.url)
    welcome = await stream.open()
    assert await stream.post([{"type": "ping", "id": 0}]) == (204, None)
    commands = [orjson.dumps({"type": "ping", "id": n}).decode() for n in range(1, 4)]
    answers = await cluster.call(
        "emulation", {"session": welcome["session"], "commands": commands}, node=welcome["node"]
    )
    assert answers == [204]
    assert await stream.post([{"type": "ping", "id": 4}]) == (204, None)
    assert [a["id"] for a in await read_answers(stream, 5)] == list(range(5))
    # No such session here; no such node for a single-node engine.
    assert await cluster.call("emulation", {"session": "gone", "commands": []}) == [404]
    nowhere = {"session": welcome["session"], "commands": commands}
    assert await cluster.call("emulation", nowhere, node="elsewhere") == []


# What differs between two runs of the same script: ids, epochs, names, times.
VOLATILE = frozenset({"client", "epoch", "node", "session", "time", "timestamp"})


def normal(value: Any, clients: dict[str, str]) -> Any:
    """`value` with what differs from run to run replaced by stable stand-ins."""
    if isinstance(value, dict):
        found = {}
        for key, item in value.items():
            if key in clients:  # presence is keyed by client id
                key = clients[key]
            found[key] = "*" if key in VOLATILE and key != "client" else normal(item, clients)
            if key == "client" and isinstance(item, str):
                found[key] = clients.get(item, "someone else")
        return found
    if isinstance(value, list):
        return [normal(item, clients) for item in value]
    return value


SCRIPT: list[list[dict[str, Any]]] = [
    [
        {"type": "subscribe", "id": 1, "channel": "chat:same", "info": {"nick": "sse"}},
        {"type": "presence", "id": 2, "channel": "chat:same"},
        {"type": "subscribe", "id": 3, "channel": "chat:same"},
    ],
    [{"type": "publish", "id": 10 + n, "channel": "chat:same", "data": {"n": n}} for n in range(5)],
    [
        {"type": "history", "id": 20, "channel": "chat:same", "limit": 3},
        {"type": "history", "id": 21, "channel": "chat:same", "since": {"offset": 2, "epoch": ""}},
        {"type": "publish", "id": 22, "channel": "news", "data": 1},
        {"type": "rpc", "id": 23, "method": "nothing", "data": None},
        {"type": "nope", "id": 24},
        {"type": "ping", "id": 25},
        {"type": "publish", "id": 26, "channel": "chat:same", "data": {"$bytes": "AAE="}},
    ],
    [
        {"type": "unsubscribe", "id": 30, "channel": "chat:same"},
        {"type": "unsubscribe", "id": 31, "channel": "chat:same"},
        {"type": "presence", "id": 32, "channel": "chat:same"},
    ],
]


async def run_script(stream: EventStream) -> tuple[list[Any], list[Any]]:
    """Post `SCRIPT` batch by batch; the answers and the pushes, normalised."""
    welcome = await stream.open()
    clients = {welcome["client"]: "me"}
    answers: list[Any] = []
    pushes: list[Any] = []
    for batch in SCRIPT:
        assert await stream.post(batch) == (204, None)
        while len(answers) < sum(len(b) for b in SCRIPT[: SCRIPT.index(batch) + 1]):
            message = await stream.event()
            assert message is not None, "the stream ended"
            (answers if message["type"] in ANSWERS else pushes).append(normal(message, clients))
    return answers, pushes


async def test_across_two_nodes_exactly_as_on_one(
    redis_server: RedisServer, redis_prefix: str, stream_to: OpenStream
) -> None:
    one = await start_node(redis_server, redis_prefix + "-one", "one")
    a = await start_node(redis_server, redis_prefix + "-two", "A")
    b = await start_node(redis_server, redis_prefix + "-two", "B")
    try:
        alone = await run_script(stream_to(one.url))
        across = await run_script(stream_to(a.url, post_url=b.url))
        assert across == alone
        answers, pushes = alone
        assert [m["type"] for m in answers].count("reply") == 12
        assert [m["code"] for m in answers if m["type"] == "error"] == [
            "already_subscribed",
            "permission_denied",
            "not_found",
            "unknown_type",
            "not_subscribed",
        ]
        assert [p["data"] for p in pushes if p["type"] == "message"] == [
            *({"n": n} for n in range(5)),
            {"$bytes": "AAE="},
        ]
    finally:
        for server in (one, a, b):
            await server.stop()
