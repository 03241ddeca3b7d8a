"""End-to-end: every metric of docs/operations.md moves when the server does what it counts.

One in-process server with the SQLite engine, driven over real sockets
through what each metric counts. The gap metrics are driven through the
node's two gap paths with what an engine would do, since neither local engine
loses messages by itself:

* the hub's: the broker is bound for a moment to a sink that hears nothing
  (`Broker.bind`), so two messages are stored but not delivered, and the next
  one reaches the hub with its offset jumping: a gap, repaired from history;
* the broker's: `Node.on_gapped`, as the Redis engine calls it after a
  dropped pub/sub connection, while the SQLite writer is held before a commit
  (the `before_commit` test hook), so that the repair waits in its queue
  (`plexus_repairs_running` is 1) and then finds that history, one message
  deep, no longer holds the gap: `insufficient_state`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import aiohttp

from plexus.config import NamespaceOptions, default_namespaces
from plexus.engines.sqlite import SqliteBroker
from plexus.models import Presence, Publication
from tests.conftest import ServerFactory
from tests.e2e.test_recovery import drop
from tests.engines.test_sqlite import CommitGate
from tests.helpers import (
    ROOT,
    TIMEOUT,
    EventStream,
    api_post,
    masked,
    metrics,
    open_raw_ws,
    read_frame,
    wait_for,
)

DOCUMENTED = re.compile(r"^\| `(plexus_[a-z_]+)` \|", re.MULTILINE)


def documented() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    return set(DOCUMENTED.findall(text))


def family(sample: str) -> str:
    """The metric a sample belongs to: `plexus_x_total{code="1"}` -> `plexus_x_total`."""
    name = sample.split("{", 1)[0]
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name != "plexus_publish_seconds":
            return name.removesuffix(suffix)
    return name


class Deaf:
    """A sink that hears nothing: what a node misses while its events are lost."""

    name = "deaf"

    def info(self) -> dict[str, Any]:
        return {"node": self.name}

    def on_publication(self, pub: Publication) -> None:
        pass

    def on_presence(self, event: Presence) -> None:
        pass

    def on_gapped(self, channels: Collection[str]) -> None:
        pass


class Peer:
    """A WebSocket client that keeps the pushes it read while waiting for an answer."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []

    async def _read(self) -> dict[str, Any]:
        push: dict[str, Any] = await self.ws.receive_json(timeout=TIMEOUT)
        return push

    async def next(self, kind: str) -> dict[str, Any]:
        """The next push of `kind` (earlier ones of other kinds are dropped)."""
        while True:
            push = self.pushes.pop(0) if self.pushes else await self._read()
            if push["type"] == kind:
                return push

    async def answer(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send `command`; return its reply or error, keeping the pushes before it."""
        await self.ws.send_json(command)
        while True:
            push = await self._read()
            if push.get("id") == command["id"]:
                return push
            self.pushes.append(push)


async def test_every_documented_metric_moves(make_server: ServerFactory, tmp_path: Path) -> None:
    spaces = default_namespaces()
    spaces["tiny"] = NamespaceOptions(history_size=1, recovery=True)
    server = await make_server(
        engine="sqlite",
        data_dir=str(tmp_path / "data"),
        namespaces=spaces,
        max_queue_bytes=64 * 1024,
    )
    assert server.node is not None
    node = server.node
    broker = node.broker
    assert isinstance(broker, SqliteBroker)
    url = server.url
    before = await metrics(url)
    assert {family(sample) for sample in before} <= documented()
    moved: set[str] = set()

    def grew(now: dict[str, float], *samples: str) -> None:
        for sample in samples:
            assert now.get(sample, 0.0) > before.get(sample, 0.0), sample
            moved.add(family(sample))

    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url)
        client = Peer(ws)
        await client.next("welcome")
        for channel in ("chat:m", "tiny:m"):
            reply = await client.answer({"type": "subscribe", "id": channel, "channel": channel})
            assert reply["type"] == "reply", reply
        now = await metrics(url)
        assert (now["plexus_connections"], now["plexus_subscriptions"]) == (1, 2)
        assert now["plexus_channels"] == 2
        moved |= {"plexus_connections", "plexus_subscriptions", "plexus_channels"}

        # Publish, deliver, answer, and a bad command.
        reply = await client.answer({"type": "publish", "id": 1, "channel": "chat:m", "data": 1})
        assert reply["result"]["offset"] == 1
        assert (await client.next("message"))["offset"] == 1
        error = await client.answer({"type": "subscribe", "id": 2})
        assert error["code"] == "bad_request"
        now = await metrics(url)
        grew(
            now,
            "plexus_commands_total",
            "plexus_messages_published_total",
            "plexus_deliveries_total",
            "plexus_bytes_out_total",
            "plexus_publish_seconds_count",
            "plexus_publish_seconds_sum",
            'plexus_errors_total{code="bad_request"}',
        )
        assert now["plexus_channel_gaps_total"] == 0

        # A connection over SSE, and a POST of its commands.
        stream = EventStream(session, url)
        await stream.open()
        assert await stream.post([{"type": "ping", "id": 1}]) == (204, None)
        assert await stream.event() == {"type": "pong", "id": 1}
        now = await metrics(url)
        assert (now["plexus_connections"], now["plexus_sse_connections"]) == (2, 1)
        moved.add("plexus_sse_connections")
        grew(now, 'plexus_emulation_posts_total{route="local",status="204"}')
        stream.close()

        # The hub's gap path: offsets 2 and 3 are stored but never reach the
        # node, so 4 arrives after 1; the repair delivers 2, 3 and 4, in order.
        broker.bind(Deaf())
        for n in (2, 3):
            await api_post(url, "/api/publish", {"channel": "chat:m", "data": n})
        broker.bind(node)
        await api_post(url, "/api/publish", {"channel": "chat:m", "data": 4})
        repaired = [await client.next("message") for _ in range(3)]
        assert [(m["offset"], m["data"]) for m in repaired] == [(2, 2), (3, 3), (4, 4)]
        now = await metrics(url)
        assert now["plexus_channel_gaps_total"] == 1  # found by the hub, counted once
        grew(now, "plexus_channel_gaps_total", "plexus_repaired_messages_total")
        assert now["plexus_repaired_messages_total"] == 3

        # The broker's gap path, with a repair that must wait for the writer
        # and then finds history (one message deep) missing what it needs.
        broker.bind(Deaf())
        for n in (1, 2):  # offsets 1 and 2, never delivered; history keeps one message
            await api_post(url, "/api/publish", {"channel": "tiny:m", "data": n})
        broker.bind(node)
        gate = CommitGate()
        broker.before_commit = gate
        gate.hold(lambda pub: pub.channel == "tiny:m")
        publishing = asyncio.create_task(
            api_post(url, "/api/publish", {"channel": "tiny:m", "data": 3})
        )
        await gate.held()
        node.on_gapped(["tiny:m"])  # as the Redis engine does after losing its pub/sub link
        now = await metrics(url)
        assert now["plexus_repairs_running"] == 1
        moved.add("plexus_repairs_running")
        gate.open()
        status, published = await publishing
        assert (status, published["offset"]) == (200, 3)
        ended = await client.next("unsubscribed")
        assert (ended["channel"], ended["reason"]) == ("tiny:m", "insufficient_state")
        now = await metrics(url)
        grew(now, "plexus_insufficient_state_total")
        assert now["plexus_repairs_running"] == 0
        assert now["plexus_channel_gaps_total"] == 2

        # A client that never reads what it subscribed to: closed 4008.
        reader, writer = await open_raw_ws(server.port, buffers=4096)
        writer.write(masked(b'{"type":"subscribe","id":1,"channel":"firehose"}'))
        assert json.loads((await read_frame(reader))[1])["type"] == "reply"
        big = {"channel": "firehose", "data": "f" * 900_000}
        for _ in range(20):  # 18 MB at most: far beyond the kernel's buffers and the outbox
            await api_post(url, "/api/publish", big)
            if (await metrics(url)).get("plexus_slow_consumer_disconnects_total", 0) > 0:
                break
        writer.close()

        # A normal close and a connection cut without a close frame.
        await ws.close()
        cut = await session.ws_connect(server.ws_url)
        await Peer(cut).next("welcome")
        drop(cut)
        await cut.close()
        assert server.endpoint is not None
        endpoint = server.endpoint
        await wait_for(lambda: not endpoint.connections)
        now = await metrics(url)
        grew(
            now,
            "plexus_slow_consumer_disconnects_total",
            'plexus_connection_closes_total{code="4008"}',
            'plexus_connection_closes_total{code="1000"}',
            'plexus_connection_closes_total{code="1006"}',
        )
    assert moved == documented(), documented() - moved
    assert {family(sample) for sample in now} == documented()
