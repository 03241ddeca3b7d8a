"""End-to-end: the Python client reconnects, recovers and follows the server, over real sockets.

In-process servers (memory or SQLite history) on loopback ports. A drop is
made by the server: a restart on the same port (1001), or one connection
closed with a given code. Reconnects wait for a long backoff that the test
cuts short with `retry_now()`, so messages are published while the client is
away, deterministically.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from plexus.app import Server
from plexus.auth import make_token
from plexus.client import (
    Backoff,
    Client,
    ConnectionClosed,
    Subscription,
    SubscriptionEnded,
    token_expiry,
)
from plexus.protocol.codes import CloseCode
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT, api_post

SECRET = "plexus-client-suite-secret-0123456789abc"  # >= 32 bytes, as HS256 needs


class Patient(Backoff):
    """A reconnect delay longer than any test: the test reconnects with retry_now()."""

    def delay(self, attempt: int, rand: Any = None) -> float:
        return 10 * TIMEOUT


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients made by a test; all closed at the end."""
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


def peer(server: Server, client: Client) -> Any:
    """The server's side of `client`'s current connection."""
    assert server.node is not None
    return server.node.peers[client.client_id]


async def publish(server: Server, channel: str, data: Any) -> int:
    status, body = await api_post(server.url, "/api/publish", {"channel": channel, "data": data})
    assert status == 200, body
    offset: int = body["offset"]
    return offset


async def messages(sub: Subscription, count: int) -> list[dict[str, Any]]:
    return [await sub.get(TIMEOUT, kind="message") for _ in range(count)]


async def then_only(server: Server, sub: Subscription, marker: str) -> None:
    """Nothing more is queued on `sub` (no duplicate): the next item is a fresh marker."""
    await publish(server, sub.channel, marker)
    item = await sub.get(TIMEOUT)
    assert (item["type"], item.get("data")) == ("message", marker)


async def connect(clients: list[Client], url: str, **kwargs: Any) -> Client:
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("backoff", Patient())
    client = Client(url, **kwargs)
    clients.append(client)
    return await client.connect()


# ----- reconnect and recover


async def test_restart_on_the_same_port_recovers_every_missed_message_once(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    first = await make_server(history_backend="sqlite")
    client = await connect(clients, first.ws_url)
    sub = await client.subscribe("chat:restart")
    for n in range(3):
        await client.publish("chat:restart", n)
    before = await messages(sub, 3)
    port, old_id = first.port, client.client_id

    await first.stop()
    assert await client.wait_closed(TIMEOUT) == CloseCode.GOING_AWAY
    second = await make_server(history_backend="sqlite", port=port)
    for n in range(3, 8):
        await publish(second, "chat:restart", n)
    client.retry_now()
    after = await messages(sub, 5)

    seen = before + after
    assert [m["data"] for m in seen] == list(range(8))
    assert [m["offset"] for m in seen] == list(range(1, 9))
    assert client.reconnects == 1
    assert client.client_id != old_id
    assert client.subscriptions["chat:restart"] is sub
    assert sub.recovered is True
    assert sub.lost == []
    await then_only(second, sub, "live")


@pytest.mark.parametrize(
    "code", [CloseCode.SLOW_CONSUMER, CloseCode.GOING_AWAY, CloseCode.POLICY_VIOLATION]
)
async def test_a_connection_closed_by_the_server_reconnects_and_recovers(
    server: Server, clients: list[Client], code: CloseCode
) -> None:
    client = await connect(clients, server.ws_url)
    sub = await client.subscribe("chat:drop")
    joined = await client.subscribe("chat:other")
    await publish(server, "chat:drop", "a")
    await messages(sub, 1)
    peer(server, client).close(code, "test")
    assert await client.wait_closed(TIMEOUT) == code
    with pytest.raises(TimeoutError):  # requests wait for the connection, within the timeout
        await asyncio.wait_for(client.ping(), 0.2)
    for data in "bcd":
        await publish(server, "chat:drop", data)
    client.retry_now()
    assert [m["data"] for m in await messages(sub, 3)] == ["b", "c", "d"]
    assert client.connected
    assert set(client.subscriptions) == {"chat:drop", "chat:other"}
    await publish(server, "chat:other", "x")
    assert (await joined.get(TIMEOUT, kind="message"))["data"] == "x"
    await then_only(server, sub, "live")


async def test_memory_restart_is_surfaced_as_a_lost_item_not_hidden(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    first = await make_server(history_backend="memory")
    client = await connect(clients, first.ws_url)
    sub = await client.subscribe("chat:epoch")
    await client.publish("chat:epoch", "old")
    (old,) = await messages(sub, 1)
    port = first.port
    await first.stop()
    await client.wait_closed(TIMEOUT)
    second = await make_server(history_backend="memory", port=port)
    await publish(second, "chat:epoch", "gone")  # in the new epoch, before we return
    client.retry_now()
    lost = await sub.get(TIMEOUT)
    assert lost["type"] == "lost"
    assert lost["since"] == {"offset": old["offset"], "epoch": old["epoch"]}
    assert lost["epoch"] != old["epoch"]
    assert sub.lost == [lost]
    assert sub.recovered is False
    # The new stream follows the item: only what came after the resubscribe.
    await then_only(second, sub, "new")


async def test_rate_limited_close_waits_longer_before_reconnecting(
    server: Server, clients: list[Client]
) -> None:
    client = await connect(clients, server.ws_url, backoff=Backoff(0.0, 0.0), rate_limit_delay=0.5)
    sub = await client.subscribe("chat:slow")
    loop = asyncio.get_running_loop()
    peer(server, client).close(CloseCode.RATE_LIMITED, "test")
    await client.wait_closed(TIMEOUT)
    closed_at = loop.time()
    await client.ping()  # waits for the reconnect
    assert loop.time() - closed_at >= 0.5
    await publish(server, "chat:slow", 1)
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == 1


async def test_4001_stops_the_client(server: Server, clients: list[Client]) -> None:
    client = await connect(clients, server.ws_url, backoff=Backoff(0.0, 0.0))
    sub = await client.subscribe("chat:kicked")
    peer(server, client).close(CloseCode.UNAUTHORIZED, "test")
    assert await client.wait_closed(TIMEOUT) == CloseCode.UNAUTHORIZED
    with pytest.raises(ConnectionClosed) as ended:
        await sub.get(TIMEOUT)
    assert ended.value.code == CloseCode.UNAUTHORIZED
    with pytest.raises(ConnectionClosed):
        await client.ping()
    assert client.subscriptions == {}
    assert not client.connected


async def test_reconnect_false_keeps_a_single_connection(
    server: Server, clients: list[Client]
) -> None:
    client = await connect(clients, server.ws_url, reconnect=False)
    sub = await client.subscribe("chat:once")
    peer(server, client).close(CloseCode.SLOW_CONSUMER, "test")
    assert await client.wait_closed(TIMEOUT) == CloseCode.SLOW_CONSUMER
    with pytest.raises(ConnectionClosed):
        await sub.get(TIMEOUT)
    with pytest.raises(ConnectionClosed):
        await client.publish("chat:once", 1)
    assert client.reconnects == 0


async def test_heartbeat_keeps_a_healthy_connection(server: Server, clients: list[Client]) -> None:
    client = await connect(clients, server.ws_url, heartbeat=0.1)
    first_id = client.client_id
    # Several heartbeat rounds (ping, pong within 0.05 s) must pass. The server
    # shows a ping only by moving the connection's last_seen, so that is polled.
    conn = peer(server, client)
    seen = [conn.last_seen]
    async with asyncio.timeout(TIMEOUT):
        while len(seen) <= 5:
            await asyncio.sleep(0.02)  # sleep-ok: polls last_seen, which has no event
            if conn.last_seen != seen[-1]:
                seen.append(conn.last_seen)
    await client.ping()
    assert (client.client_id, client.reconnects, client.close_code) == (first_id, 0, None)


# ----- tokens


async def test_get_token_gives_the_first_token_and_a_new_one_after_4002(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    server = await make_server(jwt_secret=SECRET)
    issued: list[str] = []

    async def get_token() -> str:
        # A distinct token each time: issued a second apart.
        issued.append(make_token(SECRET, user="alice", ttl=3600, now=time.time() + len(issued)))
        return issued[-1]

    client = await connect(clients, server.ws_url, get_token=get_token)
    assert len(issued) == 1
    assert client.welcome["user"] == "alice"
    sub = await client.subscribe("#alice")
    await publish(server, "#alice", "hi")
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == "hi"

    peer(server, client).close(CloseCode.TOKEN_EXPIRED, "test")
    assert await client.wait_closed(TIMEOUT) == CloseCode.TOKEN_EXPIRED
    client.retry_now()
    await client.ping()
    assert len(issued) == 2
    assert client.token == issued[1]
    assert peer(server, client).user == "alice"
    await publish(server, "#alice", "again")
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == "again"


async def test_4002_without_get_token_stops(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET)
    token = make_token(SECRET, user="alice", ttl=3600)
    async with Client(server.ws_url, token=token, timeout=TIMEOUT, backoff=Backoff(0, 0)) as client:
        peer(server, client).close(CloseCode.TOKEN_EXPIRED, "test")
        assert await client.wait_closed(TIMEOUT) == CloseCode.TOKEN_EXPIRED
        with pytest.raises(ConnectionClosed):
            await client.ping()


async def test_the_token_is_refreshed_with_auth_before_it_expires(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    server = await make_server(jwt_secret=SECRET)
    asked = asyncio.Event()
    fresh = make_token(SECRET, user="alice", ttl=3600)

    def get_token() -> str:  # a plain function works as well as a coroutine
        asked.set()
        return fresh

    # 2 s to live: refreshed halfway, long before the server's 4002.
    short = make_token(SECRET, user="alice", ttl=2)
    client = await connect(clients, server.ws_url, token=short, get_token=get_token)
    conn, first_id = peer(server, client), client.client_id
    await asyncio.wait_for(asked.wait(), TIMEOUT)
    await client.ping()  # answered after the `auth` sent before it
    assert client.token == fresh
    assert conn.credentials.expires_at == token_expiry(fresh)
    assert (client.client_id, client.reconnects) == (first_id, 0)


# ----- server-side subscriptions


async def test_server_side_subscriptions_are_subscriptions_and_recover_across_a_drop(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    server = await make_server(jwt_secret=SECRET)
    made: list[Subscription] = []
    token = make_token(SECRET, user="alice", channels=["chat:news", "#alice", "bulletin"])
    client = await connect(clients, server.ws_url, token=token, on_subscribed=made.append)
    news = await client.wait_subscription("chat:news", TIMEOUT)
    alice = await client.wait_subscription("#alice", TIMEOUT)
    bulletin = await client.wait_subscription("bulletin", TIMEOUT)
    assert [sub.channel for sub in made] == ["chat:news", "#alice", "bulletin"]
    assert made == [news, alice, bulletin]
    assert news.server
    assert alice.server
    assert news.result == {
        "channel": "chat:news",
        "offset": 0,
        "epoch": news.result["epoch"],
        "recovered": False,
    }
    assert await client.subscribe("chat:news") is news  # not already_subscribed
    for n in range(2):
        await publish(server, "chat:news", n)
    assert [m["data"] for m in await messages(news, 2)] == [0, 1]

    # Dropped; meanwhile the channels move on. On reconnect the server
    # subscribes again (from the token) at the current offsets: the client
    # reads what it missed from history where there is history (chat:, and
    # personal channels by default), and says so where there is none
    # (bulletin, default namespace).
    bulletin_before = bulletin.position
    peer(server, client).close(CloseCode.SLOW_CONSUMER, "test")
    await client.wait_closed(TIMEOUT)
    for n in range(2, 6):
        await publish(server, "chat:news", n)
    await publish(server, "#alice", "while away")
    await publish(server, "bulletin", "while away")
    client.retry_now()
    assert [m["data"] for m in await messages(news, 4)] == [2, 3, 4, 5]
    assert (await alice.get(TIMEOUT))["data"] == "while away"
    lost = await bulletin.get(TIMEOUT)
    assert (lost["type"], lost["since"]) == ("lost", bulletin_before)
    assert news.lost == []
    assert alice.lost == []
    assert client.subscriptions == {"chat:news": news, "#alice": alice, "bulletin": bulletin}
    assert len(made) == 3, "the same Subscriptions after the reconnect"
    assert client.other.empty(), "no already_subscribed (or other) error surfaced"
    # It waited for the server's own subscribes (a ping) instead of sending
    # its own that would be refused: no bad command counted against it.
    assert server.node is not None
    assert server.node.counters.errors["already_subscribed"] == 0
    await then_only(server, news, "live")
    await then_only(server, alice, "live too")


async def test_the_apps_subscribe_racing_the_servers_is_one_subscription(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    server = await make_server(jwt_secret=SECRET)
    made: list[Subscription] = []
    token = make_token(SECRET, user="alice", channels=["chat:both"])
    client = await connect(clients, server.ws_url, token=token, on_subscribed=made.append)
    # connect() returned before the server's `subscribed` push was read: our
    # subscribe goes out, the push comes first, ours is refused as already
    # subscribed; the app sees one subscription and no error.
    sub = await client.subscribe("chat:both")
    assert client.subscriptions == {"chat:both": sub}
    assert sub.server is True
    assert made == [], "the app had it already"
    await publish(server, "chat:both", 1)
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == 1
    await client.ping()
    assert client.other.empty()
    assert server.node is not None
    assert server.node.counters.errors["already_subscribed"] == 1, "the race did happen"


# ----- insufficient_state


async def test_insufficient_state_resubscribes_with_since_and_loses_nothing(
    server: Server, clients: list[Client]
) -> None:
    client = await connect(clients, server.ws_url)
    sub = await client.subscribe("chat:gap")
    for n in range(3):
        await publish(server, "chat:gap", n)
    conn = peer(server, client)
    # The server ends the subscription while publishes race the resubscribe.
    ended, *_ = await asyncio.gather(
        conn.end_subscription("chat:gap", "insufficient_state", resubscribe=True),
        *(publish(server, "chat:gap", n) for n in range(3, 8)),
    )
    assert ended is True
    for n in range(8, 10):
        await publish(server, "chat:gap", n)
    seen = await messages(sub, 10)
    assert [m["offset"] for m in seen] == list(range(1, 11))
    assert sorted(m["data"] for m in seen) == list(range(10))
    assert client.subscriptions["chat:gap"] is sub
    assert sub.recovered is True
    assert sub.lost == []
    assert client.other.empty(), "the unsubscribed push is handled, not passed on"
    assert client.reconnects == 0
    await then_only(server, sub, "live")


async def test_insufficient_state_that_cannot_be_recovered_is_a_lost_item(
    server: Server, clients: list[Client]
) -> None:
    # The default namespace keeps no history: `since` is never recovered.
    client = await connect(clients, server.ws_url)
    sub = await client.subscribe("news")
    await publish(server, "news", "first")
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == "first"
    await peer(server, client).end_subscription("news", "insufficient_state", resubscribe=True)
    lost = await sub.get(TIMEOUT)
    assert lost["type"] == "lost"
    assert lost["since"]["offset"] == 1
    assert sub.lost == [lost]
    await then_only(server, sub, "after")


async def test_an_unsubscribed_push_without_resubscribe_ends_the_stream(
    server: Server, clients: list[Client]
) -> None:
    client = await connect(clients, server.ws_url)
    sub = await client.subscribe("chat:end")
    await peer(server, client).end_subscription("chat:end", "kicked")
    with pytest.raises(SubscriptionEnded) as ended:
        await sub.get(TIMEOUT)
    assert ended.value.reason == "kicked"
    assert "chat:end" not in client.subscriptions
    assert (await asyncio.wait_for(client.other.get(), TIMEOUT))["reason"] == "kicked"


# ----- notifications that arrive


async def test_a_notification_sent_while_the_user_was_offline_arrives_once_on_reconnect(
    make_server: ServerFactory, clients: list[Client]
) -> None:
    """`#user` channels keep history with recovery by default (the `personal` options)."""
    first = await make_server(history_backend="sqlite", jwt_secret=SECRET)

    def get_token() -> str:
        return make_token(SECRET, user="alice", channels=["#alice"])

    client = await connect(clients, first.ws_url, get_token=get_token)
    notes = await client.wait_subscription("#alice", TIMEOUT)
    await publish(first, "#alice", {"notice": "one"})
    assert (await notes.get(TIMEOUT, kind="message"))["data"] == {"notice": "one"}

    # The server goes away (a deploy); alice has no connection anywhere when
    # the backend notifies her, after the restart.
    port = first.port
    await first.stop()
    assert await client.wait_closed(TIMEOUT) == CloseCode.GOING_AWAY
    second = await make_server(history_backend="sqlite", jwt_secret=SECRET, port=port)
    assert second.node is not None
    assert second.node.peers == {}
    await publish(second, "#alice", {"notice": "while you were away"})
    await publish(second, "#alice", {"notice": "and this"})
    client.retry_now()
    missed = await messages(notes, 2)
    assert [m["data"]["notice"] for m in missed] == ["while you were away", "and this"]
    assert [m["offset"] for m in missed] == [2, 3]
    assert notes.lost == []
    assert client.subscriptions == {"#alice": notes}
    await then_only(second, notes, "live")  # and nothing twice
