"""End-to-end: presence and join/leave over real sockets, including clients that vanish.

A `join`/`leave` goes to the other subscribers of the channel, never to the
client itself, and carries the `info` given at subscribe. `presence` (and
`POST /api/presence`) lists exactly the live subscribers: a client that dies
without a close frame is gone once its socket ends or the heartbeat gives up
on it, never left behind as a ghost.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import aiohttp
import pytest

from plexus.app import Server
from plexus.auth import make_token
from plexus.client import Client, PlexusClientError, Subscription
from plexus.config import Settings
from plexus.engines.base import Engine
from plexus.engines.memory import MemoryBroker, MemoryPresenceStore
from plexus.exceptions import Unavailable
from plexus.models import Presence
from tests.conftest import ServerFactory
from tests.e2e.test_recovery import drop, next_json
from tests.helpers import TIMEOUT, api_post

SECRET = "presence-test-secret-of-at-least-32-bytes"
PING_INTERVAL = 0.5
PONG_TIMEOUT = 0.25
# Scheduling slack on top of the heartbeat's own bound (a loaded machine); it stays
# well under the 5 s a closing transport waits for a dead peer's close frame.
SLACK = 0.2 * TIMEOUT


async def heartbeat_server(make_server: ServerFactory) -> Server:
    return await make_server(
        ping_interval=PING_INTERVAL, pong_timeout=PONG_TIMEOUT, jwt_secret=SECRET
    )


async def both_presences(server: Server, client: Client, channel: str) -> dict[str, Any]:
    """The `presence` command's answer, checked equal to `POST /api/presence`'s."""
    clients = await client.presence(channel)
    status, body = await api_post(server.url, "/api/presence", {"channel": channel})
    assert status == 200, body
    assert body == {"clients": clients}
    return clients


async def test_join_leave_go_to_others_with_info(make_server: ServerFactory) -> None:
    server = await heartbeat_server(make_server)
    channel = "chat:room"
    token = make_token(SECRET, user="alice")
    async with (
        Client(server.ws_url, token=token, timeout=TIMEOUT) as alice,
        Client(server.ws_url, timeout=TIMEOUT) as bob,
    ):
        sub_a = await alice.subscribe(channel, info={"name": "Alice", "color": "红"})
        sub_b = await bob.subscribe(channel, info={"name": "Bob"})
        assert await sub_a.get(TIMEOUT) == {
            "type": "join",
            "channel": channel,
            "client": bob.client_id,
            "user": None,
            "info": {"name": "Bob"},
        }
        # Nobody sees their own join: the next push of each is this message.
        await alice.publish(channel, "marker")
        assert (await sub_a.get(TIMEOUT))["data"] == "marker"
        assert (await sub_b.get(TIMEOUT))["data"] == "marker"

        assert await both_presences(server, bob, channel) == {
            alice.client_id: {"user": "alice", "info": {"name": "Alice", "color": "红"}},
            bob.client_id: {"user": None, "info": {"name": "Bob"}},
        }

        # A second connection of the same user is a second entry.
        async with Client(server.ws_url, token=token, timeout=TIMEOUT) as alice2:
            await alice2.subscribe(channel, info={"name": "Alice on her phone"})
            for sub in (sub_a, sub_b):
                join = await sub.get(TIMEOUT)
                assert (join["type"], join["client"], join["user"]) == (
                    "join",
                    alice2.client_id,
                    "alice",
                )
            assert len(await both_presences(server, bob, channel)) == 3
        # Its close (a normal one) is a leave for the others.
        for sub in (sub_a, sub_b):
            assert await sub.get(TIMEOUT) == {
                "type": "leave",
                "channel": channel,
                "client": alice2.client_id,
                "user": "alice",
            }

        await bob.unsubscribe(channel)
        assert await sub_a.get(TIMEOUT) == {
            "type": "leave",
            "channel": channel,
            "client": bob.client_id,
            "user": None,
        }
        assert await both_presences(server, alice, channel) == {
            alice.client_id: {"user": "alice", "info": {"name": "Alice", "color": "红"}}
        }
        # Bob comes back with other info; Alice hears it, Bob hears only Alice's message.
        sub_b = await bob.subscribe(channel, info={"name": "Bob", "away": True})
        assert (await sub_a.get(TIMEOUT))["info"] == {"name": "Bob", "away": True}
        await alice.publish(channel, "again")
        assert (await sub_b.get(TIMEOUT))["data"] == "again"
        assert (await sub_a.get(TIMEOUT))["data"] == "again"
        assert sub_a.queue.empty()
        assert sub_b.queue.empty()


async def next_of(sub: Subscription, kind: str, client: str) -> float:
    """Wait for the `kind` push about `client`; return when it came (monotonic)."""
    while True:
        push = await sub.get(TIMEOUT)
        if push["type"] == kind and push["client"] == client:
            return time.monotonic()


async def test_vanished_clients_leave_no_ghosts(make_server: ServerFactory) -> None:
    server = await heartbeat_server(make_server)
    channel = "chat:ghosts"
    async with (
        Client(server.ws_url, timeout=TIMEOUT) as alice,
        aiohttp.ClientSession() as session,
    ):
        sub_a = await alice.subscribe(channel, info={"name": "Alice"})

        # Erin is a `plexus subscribe` process, to be killed with SIGKILL.
        erin = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "plexus",
            "subscribe",
            channel,
            "--url",
            server.ws_url,
            stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            erin_id = ""
            while not erin_id:
                push = await sub_a.get(TIMEOUT)
                if push["type"] == "join":
                    erin_id = push["client"]

            # Dave's socket will be cut with no close frame.
            dave = await session.ws_connect(server.ws_url)
            dave_id = (await next_json(dave))["client"]
            await dave.send_json({"type": "subscribe", "id": 1, "channel": channel})
            assert (await next_json(dave))["type"] == "reply"
            await next_of(sub_a, "join", dave_id)

            # Carol never answers a WebSocket ping. She stays alive while she
            # sends app-level pings, then goes silent without closing: a frozen
            # process or a dead network path, where no FIN ever arrives.
            carol = await session.ws_connect(server.ws_url, autoping=False)
            carol_id = (await next_json(carol))["client"]
            await carol.send_json(
                {"type": "subscribe", "id": 1, "channel": channel, "info": {"name": "Carol"}}
            )
            assert (await next_json(carol))["type"] == "reply"
            silence = asyncio.Event()
            carol_silent_since = 0.0

            async def keep_carol_alive() -> None:
                nonlocal carol_silent_since
                while not silence.is_set():
                    await carol.send_json({"type": "ping"})
                    carol_silent_since = time.monotonic()
                    await asyncio.sleep(PONG_TIMEOUT / 5)  # a keepalive cadence

            keepalive = asyncio.create_task(keep_carol_alive())
            await next_of(sub_a, "join", carol_id)

            present = await both_presences(server, alice, channel)
            assert set(present) == {alice.client_id, carol_id, dave_id, erin_id}
            assert present[carol_id]["info"] == {"name": "Carol"}

            silence.set()
            await keepalive  # she sends and reads nothing from now on
            cut_at = time.monotonic()
            erin.send_signal(signal.SIGKILL)
            drop(dave)
        finally:
            if erin.returncode is None:
                erin.send_signal(signal.SIGKILL)
            await asyncio.wait_for(erin.wait(), TIMEOUT)
        # 255 is asyncio's word for "reaped by another waiter": pids wrap at 32768
        # here, and a stale subprocess object of an earlier test can reap a reused
        # pid. Either way she did not exit cleanly; her `leave` below is the proof.
        assert erin.returncode in (-signal.SIGKILL, 255)

        left: dict[str, float] = {}  # client -> when its leave came
        while len(left) < 3:
            push = await sub_a.get(TIMEOUT)
            assert push["type"] == "leave", push
            assert push["client"] not in left
            left[push["client"]] = time.monotonic()
        assert set(left) == {carol_id, dave_id, erin_id}
        print(
            f"ghosts: leave after {left[dave_id] - cut_at:.3f}s (socket cut),"
            f" {left[erin_id] - cut_at:.3f}s (process killed),"
            f" {left[carol_id] - carol_silent_since:.3f}s (silent;"
            f" ping_interval {PING_INTERVAL}, pong_timeout {PONG_TIMEOUT})"
        )
        # A socket that ends is noticed at once; a silent one within one
        # heartbeat period plus the pong timeout.
        assert left[dave_id] - cut_at < SLACK
        assert left[erin_id] - cut_at < SLACK
        assert left[carol_id] - carol_silent_since < PING_INTERVAL + PONG_TIMEOUT + SLACK, (
            f"Carol stayed present {left[carol_id] - carol_silent_since:.2f}s after going silent"
        )
        assert await both_presences(server, alice, channel) == {
            alice.client_id: {"user": None, "info": {"name": "Alice"}}
        }
        # Alice herself, answering pings all along, is still connected and subscribed.
        await alice.publish(channel, "still here")
        assert (await sub_a.get(TIMEOUT))["data"] == "still here"
        await carol.close()
        await dave.close()


class JoinFailingBroker(MemoryBroker):
    """A memory broker that can be told to fail publishing `join` events (an outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_joins = False

    async def publish_presence(self, event: Presence) -> None:
        if self.fail_joins and event.kind == "join":
            raise Unavailable("broker is down")
        await super().publish_presence(event)


async def test_failed_subscribe_leaves_no_presence() -> None:
    broker = JoinFailingBroker()
    server = Server(
        Settings(port=0, history_backend="memory", publish_rate=0),
        engine=Engine(broker, broker, MemoryPresenceStore()),
    )
    await server.start()
    channel = "chat:outage"
    try:
        async with (
            Client(server.ws_url, timeout=TIMEOUT) as alice,
            Client(server.ws_url, timeout=TIMEOUT) as bob,
        ):
            sub_a = await alice.subscribe(channel, info={"name": "Alice"})
            broker.fail_joins = True
            with pytest.raises(PlexusClientError) as refused:
                await bob.subscribe(channel, info={"name": "Bob"})
            assert refused.value.code == "unavailable"
            broker.fail_joins = False
            # Bob is not subscribed, so he must not be listed as present.
            assert await both_presences(server, alice, channel) == {
                alice.client_id: {"user": None, "info": {"name": "Alice"}}
            }
            # Once the broker is back, Bob subscribes normally.
            await bob.subscribe(channel, info={"name": "Bob"})
            join = await sub_a.get(TIMEOUT)
            assert (join["type"], join["client"]) == ("join", bob.client_id)
            assert set(await both_presences(server, alice, channel)) == {
                alice.client_id,
                bob.client_id,
            }
    finally:
        await server.stop()
