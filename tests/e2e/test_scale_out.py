"""End-to-end: many nodes share channels through a real redis-server, and nothing is lost.

Nodes are separate `plexus serve` processes (or, where a test needs to reach
inside a node, in-process servers) on loopback ports, all on one real
redis-server started by the test. Every subscriber here is a `Follower`: a
plain WebSocket that checks each message arrives exactly once, in offset
order, and that does what a client must when the server says so
(`insufficient_state` -> resubscribe with `since`; a closed connection ->
reconnect to the next node and recover).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plexus.app import Server
from plexus.client import Client
from plexus.config import Settings
from tests.e2e.test_recovery import drop
from tests.helpers import TIMEOUT, RedisServer, ServerProcess, api_post, serve_refused, wait_for

CHANNEL = "chat:scale"


def node_env(redis: RedisServer, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "PLEXUS_ENGINE": "redis",
        "PLEXUS_REDIS_URL": redis.url,
        "PLEXUS_REDIS_PREFIX": prefix,
        "PLEXUS_PUBLISH_RATE": "0",
        "PLEXUS_REDIS_TIMEOUT": "2",
        **extra,
    }


class Follower:
    """A subscriber that proves exactly-once, in-order delivery across failures.

    It reads `channel` from offset `start` and keeps every message's data in
    `values` (in offset order); a gap, a duplicate or an epoch change fails
    the test at once. It recovers from `insufficient_state` and from closed
    connections (trying `urls` in turn), counting each.
    """

    def __init__(
        self, session: aiohttp.ClientSession, urls: list[str], channel: str = CHANNEL
    ) -> None:
        self.session = session
        self.urls = itertools.cycle(urls)
        self.channel = channel
        self.values: list[Any] = []
        self.last = 0
        self.epoch: str | None = None
        self.resubscribes = 0
        self.reconnects = 0
        self.nodes: list[str] = []  # the node of each connection, from its welcome
        self.ready = asyncio.Event()
        self._ids = itertools.count(1)
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def _subscribe(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        command: dict[str, Any] = {
            "type": "subscribe",
            "id": next(self._ids),
            "channel": self.channel,
        }
        if self.epoch is not None:
            command["since"] = {"offset": self.last, "epoch": self.epoch}
        await ws.send_json(command)

    async def run(self, until: int) -> None:
        """Read until offset `until` has arrived."""
        url = next(self.urls)
        while self.last < until:
            try:
                ws = self._ws = await self.session.ws_connect(url)
            except aiohttp.ClientError:
                url = next(self.urls)
                await asyncio.sleep(0.05)  # sleep-ok: reconnect backoff against a dead node
                continue
            try:
                await self._read(ws, until)
            finally:
                await ws.close()
            if self.last < until:
                self.reconnects += 1
                url = next(self.urls)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, until: int) -> None:
        welcome = await ws.receive(timeout=TIMEOUT)
        if welcome.type is not aiohttp.WSMsgType.TEXT:
            return
        self.nodes.append(welcome.json()["node"])
        await self._subscribe(ws)
        while self.last < until:
            msg = await ws.receive(timeout=TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return  # closed: the caller reconnects elsewhere
            push = msg.json()
            kind = push["type"]
            if kind == "reply":
                result = push["result"]
                if self.epoch is None:
                    self.epoch, self.last = result["epoch"], result["offset"]
                else:
                    assert result["recovered"] is True, (self.last, result)
                    assert result["epoch"] == self.epoch
                self.ready.set()
            elif kind == "error":
                assert push["code"] == "unavailable", push  # a node whose Redis is down
                await asyncio.sleep(0.05)  # sleep-ok: retry pacing while Redis is down
                await self._subscribe(ws)
            elif kind == "message":
                assert push["epoch"] == self.epoch, push
                assert push["offset"] == self.last + 1, (self.last, push["offset"])
                self.last = push["offset"]
                self.values.append(push["data"])
            elif kind == "unsubscribed":
                assert push["reason"] == "insufficient_state", push
                assert push["resubscribe"] is True
                self.resubscribes += 1
                await self._subscribe(ws)


async def ws_publisher(
    session: aiohttp.ClientSession,
    url: str,
    name: str,
    count: int,
    acked: dict[int, Any],
    *,
    channel: str = CHANNEL,
    window: int = 8,
) -> list[str]:
    """Publish `count` messages over a WebSocket, `window` in flight; record acks by offset.

    Returns the error codes of refused publishes (they are not retried).
    """
    ws = await session.ws_connect(url)
    refused: list[str] = []
    try:
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        sent: dict[int, Any] = {}
        n = 0
        while n < count or sent:
            while n < count and len(sent) < window:
                data = {"p": name, "n": n}
                sent[n] = data
                await ws.send_json({"type": "publish", "id": n, "channel": channel, "data": data})
                n += 1
            answer = await ws.receive_json(timeout=TIMEOUT)
            if answer["type"] not in ("reply", "error"):
                continue
            data = sent.pop(answer["id"])
            if answer["type"] == "error":
                refused.append(answer["code"])
            else:
                offset = answer["result"]["offset"]
                assert offset not in acked, "two publishes got one offset"
                acked[offset] = data
    finally:
        await ws.close()
    return refused


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_three_nodes_one_offset_order(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    env = node_env(redis_server, redis_prefix)
    nodes = [ServerProcess(env={**env, "PLEXUS_NODE_NAME": n}).start() for n in "ABC"]
    try:
        followers = [Follower(session, [node.ws_url]) for node in nodes]
        total = 2 + 2 * 300
        readers = [asyncio.create_task(f.run(until=total)) for f in followers]
        for follower in followers:
            await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        a, b, c = nodes
        acked: dict[int, Any] = {}
        # A message published on B (WebSocket) and one through C's HTTP API reach A.
        acked.update({o: d for o, d in (await publish_ws_once(session, b.ws_url, "via-b"),)})
        status, body = await api_post(c.url, "/api/publish", {"channel": CHANNEL, "data": "via-c"})
        assert status == 200, body
        acked[body["offset"]] = "via-c"
        # Then two publishers race 300 messages each through A and B.
        refused = await asyncio.gather(
            ws_publisher(session, a.ws_url, "a", 300, acked),
            ws_publisher(session, b.ws_url, "b", 300, acked),
        )
        assert refused == [[], []]
        await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
        expected = [acked[offset] for offset in range(1, total + 1)]
        for follower in followers:
            assert follower.values == expected
        # Each publisher's own messages kept their order in the one sequence.
        for name in "ab":
            mine = [v["n"] for v in expected if isinstance(v, dict) and v["p"] == name]
            assert mine == list(range(300))
        # Every node is in the registry.
        status, info = await api_get(a.url, "/api/info")
        assert status == 200
        assert sorted(n["node"] for n in info["nodes"]) == ["A", "B", "C"]
    finally:
        for node in nodes:
            node.stop()


async def publish_ws_once(session: aiohttp.ClientSession, url: str, data: Any) -> tuple[int, Any]:
    acked: dict[int, Any] = {}
    ws = await session.ws_connect(url)
    try:
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        await ws.send_json({"type": "publish", "id": 1, "channel": CHANNEL, "data": data})
        reply = await ws.receive_json(timeout=TIMEOUT)
        assert reply["type"] == "reply", reply
        acked[reply["result"]["offset"]] = data
    finally:
        await ws.close()
    ((offset, value),) = acked.items()
    return offset, value


async def api_get(base_url: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(base_url + path, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response,
    ):
        return response.status, await response.json()


async def test_kill_9_of_a_node_its_clients_recover_on_another(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    env = node_env(redis_server, redis_prefix)
    a = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "A"}).start()
    b = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "B"}).start()
    try:
        followers = [Follower(session, [a.ws_url, b.ws_url]) for _ in range(5)]
        total = 600
        readers = [asyncio.create_task(f.run(until=total)) for f in followers]
        for follower in followers:
            await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        acked: dict[int, Any] = {}
        publishing = asyncio.create_task(ws_publisher(session, b.ws_url, "b", total, acked))
        await wait_for(lambda: len(acked) >= total // 3)
        await asyncio.to_thread(a.kill)  # SIGKILL mid-stream: A's clients lose their socket
        assert await publishing == []
        await asyncio.wait_for(asyncio.gather(*readers), 2 * TIMEOUT)
        expected = [acked[offset] for offset in range(1, total + 1)]
        for follower in followers:
            assert follower.values == expected
            assert follower.reconnects >= 1
    finally:
        a.kill()
        b.stop()


async def start_node(redis: RedisServer, prefix: str, name: str, **overrides: Any) -> Server:
    values: dict[str, Any] = {
        "port": 0,
        "engine": "redis",
        "redis_url": redis.url,
        "redis_prefix": prefix,
        "publish_rate": 0,
        "redis_timeout": 2.0,
        "node_name": name,
    }
    settings = Settings(**{**values, **overrides})
    server = Server(settings)
    await server.start()
    return server


def reconnects(server: Server) -> int:
    """How often the server's pub/sub link to its one Redis came back."""
    (state,) = server.health()["components"]["broker"]["servers"].values()
    return int(state["reconnects"]) if state["status"] == "ok" else -1


async def test_pubsub_connections_killed_mid_stream_lose_nothing(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    a = await start_node(redis_server, redis_prefix, "A")
    b = await start_node(redis_server, redis_prefix, "B")
    try:
        followers = [Follower(session, [node.ws_url]) for node in (a, b, a, b)]
        total = 1500
        readers = [asyncio.create_task(f.run(until=total)) for f in followers]
        for follower in followers:
            await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        acked: dict[int, Any] = {}
        publishing = asyncio.create_task(ws_publisher(session, b.ws_url, "b", total, acked))
        for kill, threshold in enumerate((300, 700, 1100)):
            await wait_for(lambda t=threshold: len(acked) >= t)  # type: ignore[misc]
            # Both nodes' links are back from the previous kill before the next.
            await wait_for(lambda k=kill: reconnects(a) == reconnects(b) == k)  # type: ignore[misc]
            killed = redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed == 2
        assert await publishing == []
        await asyncio.wait_for(asyncio.gather(*readers), 2 * TIMEOUT)
        expected = [acked[offset] for offset in range(1, total + 1)]
        for follower in followers:
            assert follower.values == expected
            # Repaired on the same socket: no client had to reconnect.
            assert follower.reconnects == 0
        await wait_for(lambda: reconnects(a) == reconnects(b) == 3)
        for node in (a, b):
            assert node.node is not None
            assert node.node.counters.gaps >= 3
        for node in (a, b):
            broker = node.health()["components"]["broker"]
            assert broker["status"] == "ok"
            (server_state,) = broker["servers"].values()
            assert server_state["reconnects"] >= 3
    finally:
        await a.stop()
        await b.stop()


async def test_redis_restart_mid_stream(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    a = b = None
    try:
        a = await start_node(redis, "r", "A")
        b = await start_node(redis, "r", "B")
        followers = [Follower(session, [node.ws_url]) for node in (a, b)]
        target = 400
        readers = [asyncio.create_task(f.run(until=10**9)) for f in followers]
        for follower in followers:
            await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        acked: dict[int, Any] = {}
        await ws_publisher(session, a.ws_url, "before", target // 2, acked)
        await asyncio.to_thread(redis.stop)  # a clean stop: the append-only file is complete
        # While Redis is down: publishes are refused (never a 200 without delivery),
        # the nodes stay up and say so.
        status, body = await api_post(b.url, "/api/publish", {"channel": CHANNEL, "data": "x"})
        assert (status, body["error"]["code"]) == (503, "unavailable")
        refused = await ws_publisher(session, a.ws_url, "down", 5, acked)
        assert refused == ["unavailable"] * 5
        await wait_for(lambda: not a.health()["ready"])
        async with session.get(a.url + "/ready") as response:
            assert response.status == 503
        async with session.get(a.url + "/health") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "degraded"
        await asyncio.to_thread(redis.start)
        await wait_for(lambda: a.health()["ready"] and b.health()["ready"])
        await ws_publisher(session, b.ws_url, "after", target // 2, acked)
        top = max(acked)
        await wait_for(lambda: all(f.last >= top for f in followers))
        expected = [acked[offset] for offset in range(1, top + 1)]
        for follower in followers:
            assert follower.values == expected
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()
        redis.kill()


async def test_api_publish_retried_on_another_node_is_delivered_once(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    a = await start_node(redis_server, redis_prefix, "A")
    b = await start_node(redis_server, redis_prefix, "B")
    try:
        follower = Follower(session, [a.ws_url])
        reading = asyncio.create_task(follower.run(until=2))
        await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        body = {"channel": CHANNEL, "data": {"order": 17}, "idempotency_key": "order-17"}
        status, first = await api_post(a.url, "/api/publish", body)
        assert status == 200, first
        status, again = await api_post(b.url, "/api/publish", body)
        assert status == 200, again
        assert again == {**first, "duplicate": True}
        status, _ = await api_post(b.url, "/api/publish", {"channel": CHANNEL, "data": "next"})
        assert status == 200
        await asyncio.wait_for(reading, TIMEOUT)
        assert follower.values == [{"order": 17}, "next"]
    finally:
        await a.stop()
        await b.stop()


async def test_subscribe_churn_leaves_no_redis_subscription(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    # The churn is the point here, not the subscribe rate limit.
    node = await start_node(redis_server, redis_prefix, "A", subscribe_rate=0)
    assert node.node is not None
    node.node.broker.unsubscribe_linger = 0.05
    try:
        ws = await session.ws_connect(node.ws_url)
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        channels = [f"chat:churn-{n}" for n in range(40)]
        for round_ in range(5):
            for channel in channels:
                await ws.send_json({"type": "subscribe", "id": round_, "channel": channel})
            for channel in channels:
                await ws.send_json({"type": "unsubscribe", "id": round_, "channel": channel})
        await ws.send_json({"type": "ping", "id": "done"})
        while (await ws.receive_json(timeout=TIMEOUT)).get("id") != "done":
            pass
        pattern = f"{redis_prefix}.c.*"
        await wait_for(lambda: redis_server.command("PUBSUB", "CHANNELS", pattern) == [])
        # A connection that vanishes leaves nothing behind either.
        await ws.send_json({"type": "subscribe", "id": "x", "channel": "chat:churn-last"})
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "reply"
        assert redis_server.command("PUBSUB", "CHANNELS", pattern) != []
        drop(ws)
        await ws.close()
        await wait_for(lambda: redis_server.command("PUBSUB", "CHANNELS", pattern) == [])
        assert node.node.state_size()["joined"] == 0
    finally:
        await node.stop()


async def test_presence_of_a_killed_node_expires(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    env = node_env(redis_server, redis_prefix, PLEXUS_PRESENCE_TTL="1.5")
    a = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "A"}).start()
    b = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "B"}).start()
    try:
        ws_a = await session.ws_connect(a.ws_url)
        welcome = await ws_a.receive_json(timeout=TIMEOUT)
        await ws_a.send_json({"type": "subscribe", "id": 1, "channel": CHANNEL, "info": "on A"})
        assert (await ws_a.receive_json(timeout=TIMEOUT))["type"] == "reply"
        ws_b = await session.ws_connect(b.ws_url)
        assert (await ws_b.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        await ws_b.send_json({"type": "subscribe", "id": 1, "channel": CHANNEL, "info": "on B"})
        assert (await ws_b.receive_json(timeout=TIMEOUT))["type"] == "reply"

        async def present() -> set[str]:
            status, body = await api_post(b.url, "/api/presence", {"channel": CHANNEL})
            assert status == 200, body
            return {entry["info"] for entry in body["clients"].values()}

        assert await present() == {"on A", "on B"}
        # Presence outlives several refresh periods while A lives.
        await asyncio.sleep(3)  # sleep-ok: spans two TTLs, to show refreshes keep A's entry
        assert await present() == {"on A", "on B"}
        a.kill()
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while await present() != {"on B"}:
            assert asyncio.get_running_loop().time() < deadline, "A's client never expired"
            await asyncio.sleep(0.1)  # sleep-ok: polls presence in another process
        assert welcome["type"] == "welcome"
        await ws_b.close()
        await ws_a.close()
    finally:
        a.kill()
        b.stop()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PLEXUS_ENGINE": "cassandra"}, "engine: must be memory, sqlite, redis"),
        ({"PLEXUS_HISTORY_BACKEND": "redis"}, "broker: a redis broker, history and presence"),
        ({"PLEXUS_BROKER": "kafka"}, "broker: must be memory or redis"),
        ({"PLEXUS_ENGINE": "redis", "PLEXUS_REDIS_URL": "http://127.0.0.1:1"}, "redis_url"),
        ({"PLEXUS_ENGINE": "redis", "PLEXUS_REDIS_URL": " , "}, "redis_url: no Redis URL"),
        ({"PLEXUS_WORKERS": "2"}, "workers: 2 processes share channels only through"),
        ({"PLEXUS_WORKERS": "0"}, "workers: must be >= 1"),
        ({"PLEXUS_ENGINE": "redis", "PLEXUS_CHANNEL_GRACE": "0"}, "channel_grace"),
    ],
)
def test_bad_engine_settings_exit_2_with_one_line(env: dict[str, str], needle: str) -> None:
    assert needle in serve_refused(["--port", "0"], env)


async def test_unreachable_redis_at_start_starts_degraded_then_recovers(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")  # its port is chosen, nothing listens yet
    node = ServerProcess(env=node_env(redis, "late")).start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(node.url + "/ready") as response:
                assert response.status == 503
            async with client.get(node.url + "/health") as response:
                assert response.status == 200
                health = await response.json()
            assert health["status"] == "degraded"
            assert health["components"]["broker"]["status"] == "down"
            status, body = await api_post(node.url, "/api/publish", {"channel": "c", "data": 1})
            assert (status, body["error"]["code"]) == (503, "unavailable")
            redis.start()
            await wait_for(lambda: node_ready(node.url))
            status, body = await api_post(node.url, "/api/publish", {"channel": "c", "data": 1})
            assert status == 200, body
        assert "starting degraded" in node.output()
        assert "Traceback" not in node.output()
    finally:
        node.stop()
        redis.kill()


def node_ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/ready", timeout=TIMEOUT) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


async def test_a_server_that_is_not_redis_is_a_clear_degraded_state() -> None:
    impostor = ServerProcess().start()  # an HTTP server where Redis should be
    node = ServerProcess(
        env={
            "PLEXUS_ENGINE": "redis",
            "PLEXUS_REDIS_URL": f"redis://127.0.0.1:{impostor.port}/0",
            "PLEXUS_REDIS_TIMEOUT": "1",
        }
    ).start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(node.url + "/ready") as response:
                assert response.status == 503
            async with client.get(node.url + "/health") as response:
                health = await response.json()
        (server,) = health["components"]["broker"]["servers"].values()
        assert server["status"] == "down"
        assert server["last_error"]
        status, body = await api_post(node.url, "/api/publish", {"channel": "c", "data": 1})
        assert (status, body["error"]["code"]) == (503, "unavailable")
        output = node.output()
        assert "Traceback" not in output
        assert output.count("pub/sub connection failed") == 1  # one line per outage
    finally:
        node.stop()
        impostor.stop()


async def test_workers_share_one_port_and_a_dead_worker_is_replaced(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    master = ServerProcess(args=["--workers", "2"], env=node_env(redis_server, redis_prefix))
    master.start()  # returns at the first worker's "listening on" line
    try:

        async def workers_up() -> int:
            _, info = await api_get(master.url, "/api/info")
            return len(info["nodes"])

        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while await workers_up() < 2:
            assert asyncio.get_running_loop().time() < deadline, "the workers did not start"
            await asyncio.sleep(0.05)  # sleep-ok: polls the registry of another process
        total = 400
        followers: list[Follower] = []
        readers: list[asyncio.Task[None]] = []
        # The kernel spreads connections over the workers: open followers until
        # both have some (bounded: it would take absurd luck to need them all).
        for _ in range(40):
            follower = Follower(session, [master.ws_url])
            followers.append(follower)
            readers.append(asyncio.create_task(follower.run(until=total)))
            await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
            if len({f.nodes[0] for f in followers}) == 2 and len(followers) >= 4:
                break
        workers = {f.nodes[0] for f in followers}
        assert len(workers) == 2
        status, info = await api_get(master.url, "/api/info")
        assert status == 200
        pids = {n["node"]: n["pid"] for n in info["nodes"]}
        assert set(pids) == workers
        victim = sorted(workers)[0]
        acked: dict[int, Any] = {}
        await ws_publisher(session, master.ws_url, "first", total // 2, acked)
        os.kill(pids[victim], 9)
        # The master starts it again (same node name, new process).

        async def replaced() -> bool:
            _, info = await api_get(master.url, "/api/info")
            now = {n["node"]: n["pid"] for n in info["nodes"]}
            return now.get(victim) not in (None, pids[victim])

        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not await replaced():
            assert asyncio.get_running_loop().time() < deadline, "the worker was not restarted"
            await asyncio.sleep(0.1)  # sleep-ok: polls another process's registry entry
        await ws_publisher(session, master.ws_url, "second", total - total // 2, acked)
        await asyncio.wait_for(asyncio.gather(*readers), 2 * TIMEOUT)
        expected = [acked[offset] for offset in range(1, total + 1)]
        for follower in followers:
            assert follower.values == expected
            if follower.nodes[0] == victim:
                assert follower.reconnects >= 1
        assert "exited with -9: restarting" in master.output()
    finally:
        status = master.stop()
    assert status == 0
    assert "stopped 2 workers" in master.output()


BIG_CONFIG = """
max_queue_bytes = 67108864

[namespaces.big]
anonymous = true
allow_publish = true
history_size = 5000
recovery = true
"""


async def test_a_node_too_slow_for_redis_is_cut_off_and_repairs(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """SIGSTOP a node while messages flow: Redis cuts its pub/sub connection when the
    output buffer passes its limit (every message queued for it is lost there);
    once the node runs again it reconnects and repairs the gap from the stream,
    and its subscribers get every message exactly once on their same sockets."""
    redis = RedisServer(tmp_path / "redis").start()
    redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 256kb 128kb 1")
    config = tmp_path / "plexus.toml"
    config.write_text(BIG_CONFIG)
    env = node_env(redis, "slow")
    a = ServerProcess(["--config", str(config)], env={**env, "PLEXUS_NODE_NAME": "A"}).start()
    b = ServerProcess(["--config", str(config)], env={**env, "PLEXUS_NODE_NAME": "B"}).start()
    try:
        channel = "big:stream"
        followers = [Follower(session, [a.ws_url], channel) for _ in range(2)]
        total = 2500
        readers = [asyncio.create_task(f.run(until=total)) for f in followers]
        for follower in followers:
            await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        acked: dict[int, Any] = {}
        await ws_publisher(session, b.ws_url, "warm", 100, acked, channel=channel)
        a.pause()
        try:
            # ~20 MB: more than the kernel's socket buffers hold, so Redis's own
            # output buffer for the stopped node passes its limit.
            padded = "x" * 8000
            await ws_publisher(
                session, b.ws_url, padded, total - 200, acked, channel=channel, window=64
            )
            killed = await asyncio.to_thread(
                wait_until_sync, lambda: redis.command("CLIENT", "LIST", "TYPE", "pubsub")
            )
        finally:
            a.resume()
        assert "name=plexus-pubsub-A" not in killed  # Redis dropped the stopped node
        await ws_publisher(session, b.ws_url, "after", 100, acked, channel=channel)
        await asyncio.wait_for(asyncio.gather(*readers), 3 * TIMEOUT)
        expected = [acked[offset] for offset in range(1, total + 1)]
        for follower in followers:
            assert follower.values == expected
            assert follower.reconnects == 0
            assert follower.resubscribes == 0
        _, health = await api_get(a.url, "/health")
        (state,) = health["components"]["broker"]["servers"].values()
        assert state["reconnects"] >= 1
    finally:
        a.resume()
        a.stop()
        b.stop()
        redis.kill()


def wait_until_sync(read: Any) -> str:
    """Poll `read()` (a CLIENT LIST) until the stopped node is no longer in it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        listing = str(read())
        if "name=plexus-pubsub-A" not in listing or time.monotonic() > deadline:
            return listing
        time.sleep(0.05)  # sleep-ok: polls Redis's client list, bounded


class FreezingProxy:
    """A TCP proxy to Redis that can go silent without closing: a deaf connection.

    After `freeze()`, connections open at that moment stop passing Redis's
    replies on (they are held, not closed); new connections work normally.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen: set[asyncio.StreamWriter] = set()
        self.live: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.never = asyncio.Event()

    async def start(self) -> FreezingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.live.add(writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            while data := await src.read(65536):
                if down and writer in self.frozen:
                    await self.never.wait()  # held for good: the link is deaf, not closed
                dst.write(data)
                await dst.drain()

        try:
            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.live.discard(writer)
            for end in (writer, up_writer):
                end.close()

    def freeze(self) -> None:
        self.frozen |= self.live

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.live):
                writer.close()


async def test_a_deaf_pubsub_connection_is_found_and_repaired(
    redis_server: RedisServer, redis_prefix: str, session: aiohttp.ClientSession
) -> None:
    proxy = await FreezingProxy(redis_server.port).start()
    behind = RedisServer(Path("."), port=proxy.port)  # only for its URL
    a = await start_node(behind, redis_prefix, "A", redis_probe_interval=0.2, redis_timeout=0.5)
    b = await start_node(redis_server, redis_prefix, "B")
    try:
        follower = Follower(session, [a.ws_url])
        total = 300
        reading = asyncio.create_task(follower.run(until=total))
        await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
        acked: dict[int, Any] = {}
        await ws_publisher(session, b.ws_url, "before", 100, acked)
        await wait_for(lambda: follower.last >= 100)
        proxy.freeze()  # A's connections to Redis stay open but hear nothing
        await ws_publisher(session, b.ws_url, "deaf", 100, acked)
        await wait_for(lambda: reconnects(a) >= 1)
        await ws_publisher(session, b.ws_url, "after", 100, acked)
        await asyncio.wait_for(reading, TIMEOUT)
        assert follower.values == [acked[offset] for offset in range(1, total + 1)]
        assert follower.reconnects == 0
        assert "deaf connection" in reconnect_error(a)
    finally:
        await a.stop()
        await b.stop()
        await proxy.close()


def reconnect_error(server: Server) -> str:
    (state,) = server.health()["components"]["broker"]["servers"].values()
    return str(state.get("last_error", ""))


async def test_probes_keep_an_idle_link_without_reconnecting(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A PING answered on a connection subscribed to nothing is a plain PONG, and one
    subscribed to channels answers in pub/sub form: both count as alive."""
    node = await start_node(
        redis_server, redis_prefix, "A", redis_probe_interval=0.05, redis_timeout=1.0
    )
    assert node.node is not None

    def state() -> dict[str, Any]:
        (server,) = node.health()["components"]["broker"]["servers"].values()
        return dict(server)

    try:
        await wait_for(lambda: state()["probes"] >= 5)
        async with Client(node.ws_url, timeout=TIMEOUT) as client:
            await client.subscribe(CHANNEL)
            probes = state()["probes"]
            await wait_for(lambda: state()["probes"] >= probes + 5)
        assert state()["reconnects"] == 0
        assert "last_error" not in state()
    finally:
        await node.stop()


async def test_api_disconnect_subscribe_and_unsubscribe_reach_every_node(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    from plexus.auth import make_token

    secret = "scale-out-test-secret-of-32-bytes-or-more"
    a = await start_node(redis_server, redis_prefix, "A", jwt_secret=secret)
    b = await start_node(redis_server, redis_prefix, "B", jwt_secret=secret)
    alice = make_token(secret, user="alice")
    bob = make_token(secret, user="bob")
    clients = []
    try:
        for node, token in ((a, alice), (b, alice), (b, bob)):
            client = Client(node.ws_url, token=token, timeout=TIMEOUT, reconnect=False)
            await client.connect()
            await client.subscribe(CHANNEL)
            clients.append(client)
        alice_a, alice_b, bob_b = clients
        # From node A: bob's connection on node B gets a subscription, then loses it.
        status, body = await api_post(
            a.url, "/api/subscribe", {"channel": "chat:extra", "user": "bob"}
        )
        assert (status, body) == (200, {"subscribed": 1})
        assert (await bob_b.wait_subscription("chat:extra", TIMEOUT)).server
        # From node A: bob's subscription on node B ends, his connection stays.
        status, body = await api_post(
            a.url, "/api/unsubscribe", {"channel": CHANNEL, "user": "bob"}
        )
        assert (status, body) == (200, {"unsubscribed": 1})
        ended = await bob_b.other.get()
        assert (ended["type"], ended["channel"]) == ("unsubscribed", CHANNEL)
        await bob_b.ping()
        # From node B: both of alice's connections close, on A and on B.
        status, body = await api_post(b.url, "/api/disconnect", {"user": "alice"})
        assert (status, body) == (200, {"disconnected": 2})
        assert await alice_a.wait_closed(TIMEOUT) == 4001
        assert await alice_b.wait_closed(TIMEOUT) == 4001
        await bob_b.ping()
        status, body = await api_post(a.url, "/api/disconnect", {"user": "nobody"})
        assert (status, body) == (200, {"disconnected": 0})
    finally:
        for client in clients:
            await client.close()
        await a.stop()
        await b.stop()


async def test_channels_spread_over_two_redis_servers(tmp_path: Path) -> None:
    """`redis_url` lists two servers: each channel lives on the one its name hashes
    to (keys and pub/sub), nodes agree on it, and join/leave cross nodes too."""
    from plexus.engines.redis.wire import Keys, shard_of

    first = RedisServer(tmp_path / "r1").start()
    second = RedisServer(tmp_path / "r2").start()
    servers = [first, second]
    urls = f"{first.url},{second.url}"
    a = b = None
    try:
        a = await start_node(first, "two", "A", redis_url=urls)
        b = await start_node(first, "two", "B", redis_url=urls)
        channels = [f"chat:spread-{n}" for n in range(12)]
        assert {shard_of(c, 2) for c in channels} == {0, 1}
        async with (
            Client(a.ws_url, timeout=TIMEOUT, reconnect=False) as on_a,
            Client(b.ws_url, timeout=TIMEOUT, reconnect=False) as on_b,
        ):
            subs = {c: await on_a.subscribe(c) for c in channels}
            for n, channel in enumerate(channels):
                assert await on_b.publish(channel, {"n": n}) == 1
            for n, channel in enumerate(channels):
                got = await subs[channel].get(TIMEOUT, kind="message")
                assert (got["data"], got["offset"]) == ({"n": n}, 1)
            keys = Keys("two")
            for channel in channels:
                home = servers[shard_of(channel, 2)]
                away = servers[1 - shard_of(channel, 2)]
                assert home.command("EXISTS", keys.meta(channel)) == 1
                assert away.command("EXISTS", keys.meta(channel)) == 0
                assert home.command("PUBSUB", "NUMSUB", keys.pubsub(channel))[1] == 1
            # join/leave of a client on node B reach a subscriber on node A.
            joined = await on_b.subscribe(channels[0], info={"name": "b"})
            join = await subs[channels[0]].get(TIMEOUT, kind="join")
            assert (join["client"], join["info"]) == (on_b.client_id, {"name": "b"})
            await joined.unsubscribe()
            leave = await subs[channels[0]].get(TIMEOUT, kind="leave")
            assert leave["client"] == on_b.client_id
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()
        first.kill()
        second.kill()
