"""End-to-end: history, recovery after reconnect, and durability, over real sockets.

The no-loss guarantee of the protocol ("Ordering and recovery"): a client
that resubscribes with `since` gets every message it missed exactly once, in
offset order, before any live message, and is told `recovered: false`
whenever that is impossible (epoch changed, gap beyond history, expired).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import socket
import struct
import time
from array import array
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plexus import node as node_module
from plexus.app import Server
from plexus.client import Client
from plexus.config import NamespaceOptions, default_namespaces
from plexus.models import HistoryPage, Presence, Publication
from plexus.protocol.recovery import merge_backlog
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT, ServerProcess, api_post, wait_for

# ----- helpers shared by the tests of this module


def drop(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Cut the TCP connection under `ws` with no close frame, like a crashed client."""
    sock = ws.get_extra_info("socket")
    if sock is None:  # already gone
        return
    # Linger 0: when the client later closes the socket, it resets the
    # connection instead of lingering; shutdown() ends it right now.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next text frame as JSON; fail on anything else."""
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    result: dict[str, Any] = msg.json()
    return result


# ----- 1. chaos: 100 subscribers dropping and recovering while 20,000 messages flow

CHAOS_CHANNEL = "chat:chaos"
CHAOS_SUBSCRIBERS = 100
CHAOS_MESSAGES = 20_000
CHAOS_PUBLISHERS = 16
CHAOS_WINDOW = 8  # publishes in flight per publisher connection
CHAOS_MEAN_RUN = 2_000  # messages a subscriber takes, on average, before it drops
CHAOS_SEED = 20260405

CHAOS_CONFIG = """
publish_rate = 0
max_queue_bytes = 16777216

[namespaces.chat]
anonymous = true
allow_publish = true
client_info = true
presence = true
join_leave = true
history_size = 25000
history_ttl = 86400
recovery = true
"""


class ChaosSubscriber:
    """One subscriber that keeps dropping its connection and recovering with `since`."""

    def __init__(self, index: int, url: str, session: aiohttp.ClientSession, seed: int) -> None:
        self.index = index
        self.url = url
        self.session = session
        self.rng = random.Random(seed)
        self.offset = 0  # last offset received
        self.epoch: str | None = None
        self.values = array("q")  # each message's data, encoded as p * 1_000_000 + n
        self.resubscribes = 0
        self.drops_before_reply = 0
        self.server_closes: dict[int, int] = {}

    async def subscribe(self) -> tuple[aiohttp.ClientWebSocketResponse, str] | None:
        """Connect and (re)subscribe; None when this attempt chose to vanish before the reply."""
        ws = await self.session.ws_connect(self.url, max_msg_size=0)
        try:
            welcome = await next_json(ws)
            assert welcome["type"] == "welcome"
            command: dict[str, Any] = {"type": "subscribe", "id": 1, "channel": CHAOS_CHANNEL}
            since = None
            if self.epoch is not None:
                since = {"offset": self.offset, "epoch": self.epoch}
                command["since"] = since
            await ws.send_json(command)
            if since is not None and self.rng.random() < 0.1:
                # Vanish before the reply: the server subscribes a dead client.
                self.drops_before_reply += 1
                drop(ws)
                await ws.close()
                return None
            reply = await next_json(ws)  # nothing of the channel may precede the reply
            assert reply["type"] == "reply", reply
            assert reply["id"] == 1, reply
            result = reply["result"]
            if since is None:
                assert result["recovered"] is False
                assert result["offset"] == 0, "subscribers start before the first publish"
                self.epoch = result["epoch"]
            else:
                self.resubscribes += 1
                assert result["recovered"] is True, (self.index, since, result)
                assert result["epoch"] == self.epoch
                assert result["offset"] >= self.offset
        except BaseException:
            await ws.close()
            raise
        return ws, welcome["client"]

    async def run(self, first: tuple[aiohttp.ClientWebSocketResponse, str] | None) -> None:
        """Read, drop at random, resubscribe with `since`, until every message is here."""
        current = first
        while True:
            if current is not None:
                ws, me = current
                try:
                    await self.read(ws, me)
                finally:
                    await ws.close()
            if self.offset >= CHAOS_MESSAGES:
                return
            current = await self.subscribe()

    async def read(self, ws: aiohttp.ClientWebSocketResponse, me: str) -> None:
        budget = max(1, int(self.rng.expovariate(1 / CHAOS_MEAN_RUN)))
        while self.offset < CHAOS_MESSAGES:
            # No per-frame timeout (it would cost more than the frame): the
            # whole scenario runs under one deadline.
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                assert msg.type is aiohttp.WSMsgType.CLOSE, msg
                # A slow consumer (4008) reconnects and recovers like the others.
                self.server_closes[msg.data] = self.server_closes.get(msg.data, 0) + 1
                return
            push = json.loads(msg.data)
            kind = push["type"]
            if kind != "message":
                assert kind in ("join", "leave"), push
                assert push["client"] != me, "a client never sees its own join/leave"
                continue
            assert push["channel"] == CHAOS_CHANNEL
            assert push["epoch"] == self.epoch
            assert push["offset"] == self.offset + 1, (self.index, self.offset, push)
            self.offset += 1
            data = push["data"]
            self.values.append(data["p"] * 1_000_000 + data["n"])
            budget -= 1
            if budget == 0:
                drop(ws)
                return


async def chaos_publisher(
    url: str, session: aiohttp.ClientSession, index: int, count: int, acked: dict[int, int]
) -> None:
    """Publish `count` messages over one WebSocket, `CHAOS_WINDOW` in flight at a time."""
    ws = await session.ws_connect(url, max_msg_size=0)
    try:
        assert (await next_json(ws))["type"] == "welcome"
        window = asyncio.Semaphore(CHAOS_WINDOW)

        async def send() -> None:
            for n in range(count):
                await window.acquire()
                data = {"p": index, "n": n}
                command = {"type": "publish", "id": n + 1, "channel": CHAOS_CHANNEL, "data": data}
                await ws.send_json(command)

        async def receive() -> None:
            last_offset = 0
            for n in range(count):
                reply = await next_json(ws)
                assert reply["type"] == "reply", reply
                assert reply["id"] == n + 1, reply
                offset = reply["result"]["offset"]
                # One connection's commands run in order, so its offsets grow.
                assert offset > last_offset
                last_offset = offset
                assert offset not in acked
                acked[offset] = index * 1_000_000 + n
                window.release()

        async with asyncio.TaskGroup() as group:
            group.create_task(send())
            group.create_task(receive())
    finally:
        await ws.close()


async def watchdog(subscribers: list[ChaosSubscriber], acked: dict[int, int]) -> None:
    """Fail fast when the scenario stops making progress (instead of a bare timeout)."""
    last, since = -1, time.monotonic()
    while len(acked) < CHAOS_MESSAGES or any(s.offset < CHAOS_MESSAGES for s in subscribers):
        await asyncio.sleep(0.5)  # sleep-ok: watchdog interval, synchronises nothing
        progress = len(acked) + sum(s.offset for s in subscribers)
        if progress != last:
            last, since = progress, time.monotonic()
        elif time.monotonic() - since > TIMEOUT:
            behind = sorted(s.offset for s in subscribers)[:5]
            raise AssertionError(
                f"no progress for {TIMEOUT}s: {len(acked)} acknowledged, slowest at {behind}"
            )


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT * 30)
def test_chaos_subscribers_drop_and_recover_every_message(tmp_path: Path) -> None:
    config = tmp_path / "plexus.toml"
    config.write_text(CHAOS_CONFIG)
    env = {
        "PLEXUS_HISTORY_BACKEND": "sqlite",
        "PLEXUS_DATA_DIR": str(tmp_path / "data"),
    }

    async def scenario(server: ServerProcess) -> None:
        seeds = random.Random(CHAOS_SEED)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            subscribers = [
                ChaosSubscriber(i, server.ws_url, session, seeds.randrange(2**32))
                for i in range(CHAOS_SUBSCRIBERS)
            ]
            started = time.monotonic()
            acked: dict[int, int] = {}
            per_publisher = CHAOS_MESSAGES // CHAOS_PUBLISHERS
            # About 35 s on an idle 2-core machine; the deadline is for a busy one.
            async with asyncio.timeout(TIMEOUT * 25):
                # Everyone is subscribed before the first publish, so everyone
                # must end up with every message.
                firsts = await asyncio.gather(*(s.subscribe() for s in subscribers))
                async with asyncio.TaskGroup() as group:
                    group.create_task(watchdog(subscribers, acked))
                    for s, first in zip(subscribers, firsts, strict=True):
                        group.create_task(s.run(first))
                    for p in range(CHAOS_PUBLISHERS):
                        group.create_task(
                            chaos_publisher(server.ws_url, session, p, per_publisher, acked)
                        )
            elapsed = time.monotonic() - started
        assert sorted(acked) == list(range(1, CHAOS_MESSAGES + 1))
        expected = array("q", (acked[offset] for offset in range(1, CHAOS_MESSAGES + 1)))
        for s in subscribers:
            assert set(s.server_closes) <= {4008}, s.server_closes  # only slow consumers
            assert len(s.values) == CHAOS_MESSAGES
            assert s.values == expected, f"subscriber {s.index} holds other messages"
        per_subscriber = sorted(s.resubscribes for s in subscribers)
        resubscribes = sum(per_subscriber)
        assert per_subscriber[0] >= 1, "every subscriber dropped at least once"
        print(
            f"chaos: {CHAOS_SUBSCRIBERS} subscribers x {CHAOS_MESSAGES} messages"
            f" = {CHAOS_SUBSCRIBERS * CHAOS_MESSAGES} checked in offset order;"
            f" {resubscribes} resubscribes all recovered"
            f" ({per_subscriber[0]}..{per_subscriber[-1]} per subscriber)"
            f" (+{sum(s.drops_before_reply for s in subscribers)} drops before the reply,"
            f" server closes {sum(sum(s.server_closes.values()) for s in subscribers)});"
            f" {elapsed:.1f}s"
        )

    with ServerProcess(["--config", str(config)], env=env) as server:
        asyncio.run(scenario(server))


# ----- 2. kill -9 of a server with SQLite history, restart on the same port

KILL_AFTER = 600  # acknowledged publishes before the kill
KILL_PUBLISHERS = 8
DURABLE_CHANNEL = "chat:durable"


async def durable_publisher(
    url: str, session: aiohttp.ClientSession, index: int, acked: dict[int, Any]
) -> None:
    """Publish one message at a time until the server dies; record every acknowledgement."""
    ws = await session.ws_connect(url)
    try:
        assert (await next_json(ws))["type"] == "welcome"
        n = 0
        while True:
            data = {"p": index, "n": n}
            try:
                command = {"type": "publish", "id": n, "channel": DURABLE_CHANNEL, "data": data}
                await ws.send_json(command)
            except ConnectionError:
                return
            msg = await ws.receive(timeout=TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return  # the server is gone; this publish was never acknowledged
            reply = msg.json()
            assert reply["type"] == "reply", reply
            offset = reply["result"]["offset"]
            assert offset not in acked
            acked[offset] = data
            n += 1
    finally:
        await ws.close()


async def durable_reader(
    url: str, session: aiohttp.ClientSession, stop_at: int | None, subscribed: asyncio.Event
) -> tuple[int, str]:
    """Read the channel from its start until offset `stop_at` (or until the server dies).

    Returns the last offset and epoch seen: where this client resumes after the restart.
    """
    ws = await session.ws_connect(url)
    try:
        assert (await next_json(ws))["type"] == "welcome"
        await ws.send_json({"type": "subscribe", "id": 1, "channel": DURABLE_CHANNEL})
        reply = await next_json(ws)
        assert reply["result"]["offset"] == 0
        subscribed.set()
        epoch, last = reply["result"]["epoch"], 0
        while stop_at is None or last < stop_at:
            msg = await ws.receive(timeout=TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            push = msg.json()
            if push["type"] != "message":
                continue  # the other readers' join/leave
            assert push["offset"] == last + 1
            last = push["offset"]
        return last, epoch
    finally:
        await ws.close()


async def resume(url: str, session: aiohttp.ClientSession, since: dict[str, Any]) -> list[Any]:
    """Resubscribe with `since`; return the reply's result followed by the missed pushes."""
    ws = await session.ws_connect(url)
    try:
        assert (await next_json(ws))["type"] == "welcome"
        await ws.send_json(
            {"type": "subscribe", "id": 1, "channel": DURABLE_CHANNEL, "since": since}
        )
        reply = await next_json(ws)
        assert reply["type"] == "reply", reply
        result = reply["result"]
        missed: list[dict[str, Any]] = []
        while len(missed) < result["offset"] - since["offset"]:
            push = await next_json(ws)
            if push["type"] != "message":
                continue  # the leave of an earlier connection of this test
            missed.append(push)
        return [result, *missed]
    finally:
        await ws.close()


def test_kill_9_keeps_every_acknowledged_message_and_recovery(tmp_path: Path) -> None:
    env = {
        "PLEXUS_HISTORY_BACKEND": "sqlite",
        "PLEXUS_DATA_DIR": str(tmp_path / "data"),
        "PLEXUS_PUBLISH_RATE": "0",
    }
    server = ServerProcess(env=env).start()
    acked: dict[int, Any] = {}

    async def until_killed() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession() as session:
            # Two readers leave early (at offsets 50 and 300), one reads until the kill.
            subscribed = [asyncio.Event() for _ in range(3)]
            readers = [
                asyncio.create_task(durable_reader(server.ws_url, session, stop, ready))
                for stop, ready in zip((50, 300, None), subscribed, strict=True)
            ]
            for ready in subscribed:  # they start from offset 0
                await asyncio.wait_for(ready.wait(), TIMEOUT)
            publishers = [
                asyncio.create_task(durable_publisher(server.ws_url, session, i, acked))
                for i in range(KILL_PUBLISHERS)
            ]
            await wait_for(lambda: len(acked) >= KILL_AFTER)
            await asyncio.to_thread(server.kill)  # SIGKILL mid-stream: no shutdown at all
            await asyncio.gather(*publishers)
            return await asyncio.gather(*readers)

    try:
        positions = asyncio.run(until_killed())
    finally:
        server.kill()
    assert server.proc is not None
    assert server.proc.returncode == -9
    assert len(acked) >= KILL_AFTER

    restarted = ServerProcess(env=env, port=server.port).start()
    try:

        async def after_restart() -> None:
            status, page = await api_post(
                restarted.url, "/api/history", {"channel": DURABLE_CHANNEL, "limit": 10_000}
            )
            assert status == 200, page
            epoch = page["epoch"]
            assert {e for _, e in positions} == {epoch}, "a kill -9 must not change the epoch"
            stored = {m["offset"]: m for m in page["messages"]}
            assert [m["offset"] for m in page["messages"]] == list(range(1, page["offset"] + 1))
            for offset, data in acked.items():
                assert stored[offset]["data"] == data, offset
                assert stored[offset]["epoch"] == epoch
            top = page["offset"]
            assert top >= max(acked)
            async with aiohttp.ClientSession() as session:
                for last, seen_epoch in positions:
                    assert last >= 1
                    result, *missed = await resume(
                        restarted.ws_url, session, {"offset": last, "epoch": seen_epoch}
                    )
                    assert result["recovered"] is True, (last, result)
                    assert result["epoch"] == epoch
                    assert result["offset"] == top
                    assert [m["offset"] for m in missed] == list(range(last + 1, top + 1))
                    assert [m["data"] for m in missed] == [
                        stored[o]["data"] for o in range(last + 1, top + 1)
                    ]
                # The offset counter carries on where it stopped.
                status, body = await api_post(
                    restarted.url, "/api/publish", {"channel": DURABLE_CHANNEL, "data": "after"}
                )
                assert status == 200, body
                assert body["offset"] == top + 1
            print(
                f"kill -9: {len(acked)} acknowledged messages of {top} stored all kept;"
                f" readers resumed from offsets {[last for last, _ in positions]}"
            )

        asyncio.run(after_restart())
    finally:
        restarted.stop()


# ----- 3-5. in-process servers: epochs, gaps, expiry and the history command

SMALL = "small"  # a namespace that keeps only the newest 5 messages
BRIEF = "brief"  # a namespace whose messages expire after BRIEF_TTL seconds
BRIEF_TTL = 0.1 * TIMEOUT


def namespaces() -> dict[str, NamespaceOptions]:
    spaces = default_namespaces()
    spaces[SMALL] = NamespaceOptions(allow_publish=True, history_size=5, recovery=True)
    spaces[BRIEF] = NamespaceOptions(
        allow_publish=True, history_size=100, history_ttl=BRIEF_TTL, recovery=True
    )
    return spaces


BACKENDS = ["memory", "sqlite"]


async def publish_api(server: Server, channel: str, data: Any) -> int:
    status, body = await api_post(server.url, "/api/publish", {"channel": channel, "data": data})
    assert status == 200, body
    offset: int = body["offset"]
    return offset


async def test_memory_restart_changes_epoch_so_nothing_is_recovered(
    make_server: ServerFactory,
) -> None:
    first = await make_server(history_backend="memory")
    async with Client(first.ws_url, timeout=TIMEOUT) as client:
        sub = await client.subscribe("chat:epoch")
        for n in range(5):
            await client.publish("chat:epoch", n)
        seen = [await sub.get(TIMEOUT, kind="message") for _ in range(5)]
    epoch, last = seen[-1]["epoch"], seen[-1]["offset"]
    assert last == 5
    port = first.port
    await first.stop()

    second = await make_server(history_backend="memory", port=port)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(second.ws_url)
        assert (await next_json(ws))["type"] == "welcome"
        since = {"offset": last, "epoch": epoch}
        await ws.send_json({"type": "subscribe", "id": 1, "channel": "chat:epoch", "since": since})
        result = (await next_json(ws))["result"]
        assert result["recovered"] is False
        assert result["epoch"] != epoch
        assert result["offset"] == 0
        # The new stream starts over; the first push is its first live message.
        assert await publish_api(second, "chat:epoch", "new") == 1
        push = await next_json(ws)
        assert push["type"] == "message"
        assert (push["offset"], push["epoch"], push["data"]) == (1, result["epoch"], "new")
        await ws.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_gap_beyond_history_size_is_not_recovered(
    make_server: ServerFactory, backend: str
) -> None:
    server = await make_server(history_backend=backend, namespaces=namespaces())
    channel = f"{SMALL}:gap"
    for n in range(15):  # offsets 1..15; the newest 5 (11..15) are kept
        await publish_api(server, channel, n)
    status, page = await api_post(server.url, "/api/history", {"channel": channel})
    assert status == 200
    epoch = page["epoch"]
    assert [m["offset"] for m in page["messages"]] == [11, 12, 13, 14, 15]

    async with aiohttp.ClientSession() as session:

        async def resubscribe(since: int) -> tuple[dict[str, Any], list[int]]:
            """Subscribe with `since`, publish one live message; return the reply and offsets."""
            ws = await session.ws_connect(server.ws_url)
            try:
                assert (await next_json(ws))["type"] == "welcome"
                command = {"type": "subscribe", "id": 1, "channel": channel}
                command["since"] = {"offset": since, "epoch": epoch}
                await ws.send_json(command)
                result: dict[str, Any] = (await next_json(ws))["result"]
                live = await publish_api(server, channel, "live")
                offsets: list[int] = []
                while not offsets or offsets[-1] != live:
                    push = await next_json(ws)
                    assert push["type"] == "message"
                    offsets.append(push["offset"])
                return result, offsets
            finally:
                await ws.close()

        # Missed 11..15, all kept: recovered, then the live message.
        result, offsets = await resubscribe(10)
        assert result["recovered"] is True
        assert offsets == [11, 12, 13, 14, 15, 16]
        # Missed 10..16 but 10 and 11 are gone (kept: 12..16): not recovered, and
        # no partial history is pushed: only the live message follows.
        result, offsets = await resubscribe(9)
        assert result["recovered"] is False
        assert result["offset"] == 16
        assert offsets == [17]
        # A far older position: the same.
        result, offsets = await resubscribe(3)
        assert result["recovered"] is False
        assert offsets == [18]
    status, page = await api_post(
        server.url, "/api/history", {"channel": channel, "since": {"offset": 3, "epoch": epoch}}
    )
    assert page["complete"] is False
    assert [m["offset"] for m in page["messages"]] == [14, 15, 16, 17, 18]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_expired_messages_are_gone_from_history_and_recovery(
    make_server: ServerFactory, backend: str
) -> None:
    server = await make_server(history_backend=backend, namespaces=namespaces())
    channel = f"{BRIEF}:ttl"
    published_at = time.time()
    for n in range(3):
        await publish_api(server, channel, n)
    status, page = await api_post(server.url, "/api/history", {"channel": channel})
    assert status == 200
    assert [m["data"] for m in page["messages"]] == [0, 1, 2]
    epoch = page["epoch"]

    async def history_empty() -> dict[str, Any]:
        while True:
            status, body = await api_post(server.url, "/api/history", {"channel": channel})
            assert status == 200
            if not body["messages"]:
                result: dict[str, Any] = body
                return result
            await asyncio.sleep(0.05)  # sleep-ok: expiry has no event to wait for: poll

    page = await asyncio.wait_for(history_empty(), TIMEOUT)
    assert time.time() - published_at >= BRIEF_TTL, "messages expired before their TTL"
    # The stream's position outlives its messages.
    assert (page["offset"], page["epoch"]) == (3, epoch)
    async with Client(server.ws_url, timeout=TIMEOUT) as client:
        assert (await client.history(channel))["messages"] == []
        gone = await client.subscribe(channel, since={"offset": 0, "epoch": epoch})
        assert gone.recovered is False
        assert gone.result["offset"] == 3
        await client.unsubscribe(channel)
        # Nothing was missed after offset 3: that position is still recoverable.
        current = await client.subscribe(channel, since={"offset": 3, "epoch": epoch})
        assert current.recovered is True
        assert await publish_api(server, channel, "next") == 4
        push = await current.get(TIMEOUT)
        assert (push["type"], push["offset"], push["data"]) == ("message", 4, "next")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_history_command_and_api(make_server: ServerFactory, backend: str) -> None:
    server = await make_server(history_backend=backend)
    channel = "chat:hist"
    async with Client(server.ws_url, timeout=TIMEOUT) as alice:
        # Reading a channel that has no stream creates none: no epoch yet.
        empty = await alice.history(channel)
        assert empty == {"messages": [], "offset": 0, "epoch": ""}
        before = int(time.time() * 1000)
        for n in range(6):
            assert await alice.publish(channel, {"n": n, "text": "你好"}) == n + 1
        epoch = (await alice.history(channel, limit=0))["epoch"]
        assert isinstance(epoch, str)
        assert epoch
        for n in range(6, 8):
            assert await publish_api(server, channel, {"n": n}) == n + 1
        after = int(time.time() * 1000)

        full = await alice.history(channel)
        assert (full["offset"], full["epoch"]) == (8, epoch)
        messages = full["messages"]
        assert [m["offset"] for m in messages] == list(range(1, 9))  # oldest first
        assert [m["data"]["n"] for m in messages] == list(range(8))
        for m in messages:
            assert m["type"] == "message"
            assert m["channel"] == channel
            assert m["epoch"] == epoch
            assert before <= m["time"] <= after
        for m in messages[:6]:
            assert m.keys() == {"type", "channel", "data", "offset", "epoch", "time", "from"}
            assert m["from"] == {"client": alice.client_id, "user": None}
        for m in messages[6:]:
            assert m.keys() == {"type", "channel", "data", "offset", "epoch", "time"}
        assert messages[0]["data"]["text"] == "你好"

        def offsets(result: dict[str, Any]) -> list[int]:
            return [m["offset"] for m in result["messages"]]

        assert offsets(await alice.history(channel, limit=3)) == [1, 2, 3]
        since = {"offset": 4, "epoch": epoch}
        assert offsets(await alice.history(channel, since=since, limit=2)) == [5, 6]
        assert offsets(await alice.history(channel, since=since)) == [5, 6, 7, 8]
        assert offsets(await alice.history(channel, since={"offset": 8, "epoch": epoch})) == []
        assert offsets(await alice.history(channel, limit=0)) == []

        # The HTTP API answers the same pages, plus whether `since` is still complete.
        cases: list[dict[str, Any]] = [{}, {"limit": 3}, {"since": since, "limit": 2}]
        for case in cases:
            status, body = await api_post(server.url, "/api/history", {"channel": channel, **case})
            assert status == 200, body
            ws_result = await alice.history(channel, **case)
            assert body["messages"] == ws_result["messages"]
            assert (body["offset"], body["epoch"]) == (8, epoch)
            assert body["complete"] is True
        stale = {"offset": 4, "epoch": "not-" + epoch}
        status, body = await api_post(
            server.url, "/api/history", {"channel": channel, "since": stale}
        )
        assert status == 200
        assert body["complete"] is False

        # Default limit 100: the oldest 100 of 130.
        for n in range(8, 130):
            await publish_api(server, channel, {"n": n})
        assert offsets(await alice.history(channel)) == list(range(1, 101))
        status, body = await api_post(server.url, "/api/history", {"channel": channel})
        assert [m["offset"] for m in body["messages"]] == list(range(1, 101))


# ----- 7. resubscribing while live messages flow: no gap, no duplicate, reply first

RACE_CHANNEL = "chat:race"
RACE_ROUNDS = 60
RACE_PUBLISHERS = 4
# Publishers may run at most RACE_WINDOW offsets ahead of what the subscriber
# has read, and RACE_WINDOW more once it sends a subscribe (see `Pace`): a
# resubscribe then misses at most 2 * RACE_WINDOW + 2 * RACE_PUBLISHERS
# messages, which the channel's history always holds. Unthrottled, they could
# publish more than the history holds while a reconnect is slow, and the server
# rightly answered `recovered: false`: a failure by chance, not a bug.
RACE_WINDOW = 100
RACE_HISTORY = 1000
assert 2 * RACE_WINDOW + 2 * RACE_PUBLISHERS < RACE_HISTORY


class RemoteLikeHistory:
    """A history store whose reads take a moment, as over a network.

    Live messages then reach a subscribing client both while its recovery read
    is in flight (they are in the page and held live: duplicates to drop) and
    after it (held live only: they must follow the page).
    """

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read(self, channel: str, **kwargs: Any) -> HistoryPage:
        await asyncio.sleep(0.002)  # sleep-ok: widens the race window, synchronises nothing
        page: HistoryPage = await self._store.read(channel, **kwargs)
        await asyncio.sleep(0.002)  # sleep-ok: widens the race window
        return page


class Pace:
    """Keeps the race test's publishers within reach of the subscriber's history.

    `limit` is the highest offset the publishers may still publish: RACE_WINDOW
    past the last message the subscriber read, or past the last published one
    when the subscriber sends a subscribe, so that publishes keep flowing while
    the server handles it (the race under test) even after a slow reconnect.
    Each publisher has at most one publish in flight past the check.
    """

    def __init__(self) -> None:
        self.limit = RACE_WINDOW
        self.published = 0  # highest offset acknowledged to a publisher
        self.advanced = asyncio.Event()

    def allow(self, offset: int) -> None:
        """Let the publishers go on up to `offset`."""
        if offset > self.limit:
            self.limit = offset
            self.advanced.set()

    async def wait_for_room(self) -> None:
        """Return once the publishers may publish again (or `release` was called)."""
        while self.published >= self.limit:
            self.advanced.clear()
            await self.advanced.wait()

    def release(self) -> None:
        """Unblock every waiting publisher for good (the test is ending)."""
        self.limit = 2**63
        self.advanced.set()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_resubscribe_races_live_messages(
    make_server: ServerFactory, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the subscribes whose live backlog held messages: proof that the
    # race this test is about did happen, not only that nothing broke.
    raced: list[int] = []

    def counting_merge(
        last_offset: int, epoch: str, backlog: list[Publication | Presence], own: str
    ) -> list[Publication | Presence]:
        held = sum(isinstance(event, Publication) for event in backlog)
        if held:
            raced.append(held)
        return merge_backlog(last_offset, epoch, backlog, own)

    monkeypatch.setattr(node_module, "merge_backlog", counting_merge)
    spaces = default_namespaces()
    spaces["chat"] = dataclasses.replace(spaces["chat"], history_size=RACE_HISTORY)
    server = await make_server(history_backend=backend, namespaces=spaces)
    assert server.node is not None
    server.node.history = RemoteLikeHistory(server.node.history)
    rng = random.Random(7)
    acked: dict[int, int] = {}
    stop = asyncio.Event()
    pace = Pace()

    async def publisher(index: int) -> None:
        async with Client(server.ws_url, timeout=TIMEOUT) as client:
            n = 0
            while not stop.is_set():
                await pace.wait_for_room()
                if stop.is_set():
                    break
                value = index * 1_000_000 + n
                offset = await client.publish(RACE_CHANNEL, value)
                acked[offset] = value
                pace.published = max(pace.published, offset)
                n += 1

    async def subscriber(session: aiohttp.ClientSession) -> tuple[list[int], int, int]:
        """Resubscribe RACE_ROUNDS times; return the data in offset order and counts."""
        values: list[int] = []
        last, epoch = 0, None
        recovered_messages = 0
        ws = None
        try:
            for round_ in range(RACE_ROUNDS):
                command: dict[str, Any] = {
                    "type": "subscribe",
                    "id": round_,
                    "channel": RACE_CHANNEL,
                }
                if epoch is not None:
                    command["since"] = {"offset": last, "epoch": epoch}
                if ws is None:
                    ws = await session.ws_connect(server.ws_url)
                    assert (await next_json(ws))["type"] == "welcome"
                pace.allow(pace.published + RACE_WINDOW)
                await ws.send_json(command)
                # Reply first: no message of the channel may come before it.
                reply = await next_json(ws)
                assert reply["type"] == "reply", (round_, reply)
                assert reply["id"] == round_
                result = reply["result"]
                if epoch is None:
                    epoch, last = result["epoch"], result["offset"]
                else:
                    assert result["recovered"] is True, (round_, result)
                    assert result["epoch"] == epoch
                    recovered_messages += result["offset"] - last
                # Read past what the reply covered, into live messages.
                target = result["offset"] + rng.randint(1, 20)
                while last < target:
                    push = await next_json(ws)
                    if push["type"] == "leave":
                        continue  # of our previous connection, if the server saw it end late
                    assert push["type"] == "message", push
                    assert push["offset"] == last + 1, (round_, last, push["offset"])
                    assert push["epoch"] == epoch
                    last = push["offset"]
                    values.append(push["data"])
                    pace.allow(last + RACE_WINDOW)
                if rng.random() < 0.5:
                    # Vanish like a crashed client; reconnect on a new socket.
                    drop(ws)
                    await ws.close()
                    ws = None
                else:
                    # Same socket: what precedes the unsubscribe reply still counts.
                    await ws.send_json({"type": "unsubscribe", "id": "u", "channel": RACE_CHANNEL})
                    while True:
                        push = await next_json(ws)
                        if push["type"] == "reply":
                            assert push["id"] == "u"
                            break
                        if push["type"] == "leave":
                            continue
                        assert push["type"] == "message", push
                        assert push["offset"] == last + 1
                        last = push["offset"]
                        values.append(push["data"])
                        pace.allow(last + RACE_WINDOW)
            return values, last, recovered_messages
        finally:
            if ws is not None:
                await ws.close()

    async with asyncio.timeout(TIMEOUT * 3), aiohttp.ClientSession() as session:
        publishers = [asyncio.create_task(publisher(i)) for i in range(RACE_PUBLISHERS)]
        try:
            await wait_for(lambda: len(acked) >= 10)
            values, last, recovered_messages = await subscriber(session)
        finally:
            stop.set()
            pace.release()
            await asyncio.gather(*publishers)
    first = last - len(values) + 1
    assert values == [acked[offset] for offset in range(first, last + 1)]
    print(
        f"race ({backend}): {RACE_ROUNDS} resubscribes, {len(values)} messages"
        f" (offsets {first}..{last}) in order, {recovered_messages} of them recovered;"
        f" live messages held during {len(raced)} subscribes"
    )
    assert len(raced) >= RACE_ROUNDS // 2


async def test_recovery_too_big_for_the_output_buffer_is_refused_not_closed(
    make_server: ServerFactory,
) -> None:
    # 100 missed messages of 2 KB do not fit a 64 KiB output buffer: pushing
    # them would close the client as a slow consumer (4008) on every retry.
    server = await make_server(max_queue_bytes=64 * 1024)
    channel = "chat:bulky"
    async with Client(server.ws_url, timeout=TIMEOUT) as client:
        for n in range(100):
            await publish_api(server, channel, {"n": n, "pad": "x" * 2000})
        epoch = (await client.history(channel, limit=0))["epoch"]
        sub = await client.subscribe(channel, since={"offset": 0, "epoch": epoch})
        assert sub.recovered is False
        assert sub.result["offset"] == 100
        # Still connected; live messages flow, and history can be read in pages.
        assert await publish_api(server, channel, {"n": 100}) == 101
        push = await sub.get(TIMEOUT)
        assert (push["type"], push["offset"]) == ("message", 101)
        page = await client.history(channel, since={"offset": 0, "epoch": epoch}, limit=10)
        assert [m["offset"] for m in page["messages"]] == list(range(1, 11))
        await client.unsubscribe(channel)
        # A gap that fits is recovered as usual.
        sub = await client.subscribe(channel, since={"offset": 95, "epoch": epoch})
        assert sub.recovered is True
        got = [(await sub.get(TIMEOUT))["offset"] for _ in range(6)]
        assert got == [96, 97, 98, 99, 100, 101]
        await client.ping()


class MeasuredHistory:
    """A history store that records how many payload bytes each read returned."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.pages: list[tuple[int | None, int]] = []  # (max_bytes asked, payload bytes read)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read(self, channel: str, **kwargs: Any) -> HistoryPage:
        page: HistoryPage = await self._store.read(channel, **kwargs)
        self.pages.append((kwargs.get("max_bytes"), sum(len(p.raw) for p in page.publications)))
        return page


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_recovery_reads_no_more_than_the_client_can_take(
    make_server: ServerFactory, backend: str
) -> None:
    """A resubscribe far behind a big history is refused (`recovered: false`) after
    reading at most what fits the client's output buffer, not the whole backlog:
    a client cannot make the server read and encode megabytes per attempt."""
    spaces = default_namespaces()
    spaces["big"] = NamespaceOptions(allow_publish=True, history_size=5000, recovery=True)
    limit = 256 * 1024
    server = await make_server(history_backend=backend, namespaces=spaces, max_queue_bytes=limit)
    assert server.node is not None
    channel = "big:backlog"
    for n in range(400):  # ~3.2 MB of history, twelve times what the client can take
        await publish_api(server, channel, {"n": n, "pad": "x" * 8000})
    epoch = (await api_post(server.url, "/api/history", {"channel": channel, "limit": 0}))[1][
        "epoch"
    ]
    measured = MeasuredHistory(server.node.history)
    server.node.history = measured
    async with Client(server.ws_url, timeout=TIMEOUT, reconnect=False) as client:
        for _ in range(5):  # every attempt is bounded, not only the first
            sub = await client.subscribe(channel, since={"offset": 0, "epoch": epoch})
            assert sub.recovered is False
            assert sub.result["offset"] == 400
            await client.unsubscribe(channel)
        recovery_reads = [page for page in measured.pages if page[0] is not None]
        assert len(recovery_reads) == 5
        for budget, read in recovery_reads:
            assert budget is not None
            assert budget <= limit
            assert read <= budget
        # What fits is still recovered whole.
        sub = await client.subscribe(channel, since={"offset": 398, "epoch": epoch})
        assert sub.recovered is True
        assert [(await sub.get(TIMEOUT))["offset"] for _ in range(2)] == [399, 400]
