"""End-to-end: the subscribe race, forced on every engine where it can happen.

A client subscribing to a channel the node already delivers gets a reply
holding the channel's position, read from the engine, and then every later
message exactly once (protocol "Ordering and recovery"). Live messages keep
arriving while that read is on its way, and three interleavings can hurt:

(a) the node's delivery trails the position it read: the reply says offset
    N while the node has delivered less; message N must not reach the new
    subscriber when its delivery comes (the hub's delivery floor);
(b) a message arrives during the subscribe and the read covers it: it waits
    in the subscription's backlog and must be dropped there (no duplicate);
(c) a message arrives during the subscribe and the read does not cover it:
    it must be sent from the backlog (no gap).

Each test forces its interleaving, checks that it happened, and then that the
new subscriber gets every message once, in order. Where each one exists:

* redis: all three. A node reads positions and history over its command
  connections and receives messages over its pub/sub connection, so either
  can trail the other. `RedisGate`, a TCP relay between the node and
  redis-server, holds what Redis sends on one connection: the pub/sub
  messages (a), or the reply to the subscribe's read (b, c).
* sqlite: (b) and (c), for a subscriber recovering with `since`, whose read
  is a job of the writer thread: `CommitGate` (the store's `before_commit`
  hook) holds a batch while the read and a later message queue behind it.
  Not (a): the store records a channel's committed position and delivers
  the batch's messages in the same callback on the loop, before any reader
  resumes. A fresh subscriber reads the position the store caches, without
  suspending, so its subscribe has no window at all.
* memory: none. Publishing delivers before it returns, and nothing in a
  subscribe to a channel the node already follows suspends (every read and
  presence call of the engine returns without waiting), so no message can
  arrive between the read and the reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from plexus.app import Server
from plexus.config import NamespaceOptions, default_namespaces
from plexus.engines.redis import scripts
from plexus.engines.redis.broker import RedisBroker
from plexus.engines.sqlite import SqliteBroker
from plexus.models import Publication
from plexus.node import Node
from plexus.protocol.commands import Since
from tests.conftest import ServerFactory
from tests.e2e.test_recovery import next_json
from tests.engines.harness import CommitGate, yield_to_the_loop
from tests.helpers import TIMEOUT, RedisServer, wait_for

CH = "race:room"
# Plain history and recovery: no presence nor join/leave pushes among the messages.
NAMESPACES = {"race": NamespaceOptions(history_size=100, recovery=True, allow_publish=True)}


class Peer:
    """A plain WebSocket client that sees every frame the server sends, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str) -> Peer:
        ws = await session.ws_connect(url)
        welcome = await next_json(ws)
        assert welcome["type"] == "welcome", welcome
        return cls(ws)

    async def send_subscribe(self, since: dict[str, Any] | None = None) -> int:
        """Send `subscribe` to `CH` without waiting for its reply; return its id."""
        command: dict[str, Any] = {"type": "subscribe", "id": next(self._ids), "channel": CH}
        if since is not None:
            command["since"] = since
        await self.ws.send_json(command)
        return int(command["id"])

    async def reply(self, command_id: int) -> dict[str, Any]:
        """The next frame, which must be the reply to `command_id`; its result."""
        frame = await next_json(self.ws)
        assert (frame["type"], frame["id"]) == ("reply", command_id), frame
        result: dict[str, Any] = frame["result"]
        return result

    async def subscribe(self, since: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.reply(await self.send_subscribe(since))

    async def offset(self) -> int:
        """The offset of the next frame, which must be a message of `CH`."""
        frame = await next_json(self.ws)
        assert (frame["type"], frame["channel"]) == ("message", CH), frame
        return int(frame["offset"])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


def node_of(server: Server) -> Node:
    assert server.node is not None
    return server.node


async def publish(server: Server, n: int) -> Publication:
    """Publish `{"n": n}` through the node; return it with its offset."""
    pub = await asyncio.wait_for(node_of(server).publish(CH, {"n": n}), TIMEOUT)
    assert isinstance(pub, Publication)
    return pub


def delivered(server: Server) -> int:
    """The last offset of `CH` the node has delivered to its subscribers."""
    channel = node_of(server).hub.channel(CH)
    assert channel is not None
    return channel.last


# ----- redis: a relay that holds what Redis sends


class _Hold:
    """Bytes Redis sent on one connection, kept from the node until `release`."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None  # to the node, once known
        self.arrived = asyncio.Event()  # something is held
        self.released = False

    def keep(self, data: bytes) -> None:
        self.chunks.append(data)
        self.arrived.set()

    async def holding(self) -> None:
        """Wait until Redis sent something that is now held."""
        await asyncio.wait_for(self.arrived.wait(), TIMEOUT)

    def release(self) -> None:
        """Send the node what was held, in order, and hold no more."""
        self.released = True
        if self.writer is not None:
            for chunk in self.chunks:
                self.writer.write(chunk)
        self.chunks.clear()


class RedisGate:
    """A TCP relay between a node and redis-server that can hold what Redis sends back.

    `hold_pubsub()` holds every byte Redis sends the node's pub/sub
    connection from now on (its messages reach the node late, as over a slow
    network); `hold_reply(marker)` holds the reply to the next command whose
    bytes contain `marker`, and what follows it on that connection. Held
    bytes are sent, in order, by the hold's `release()`; nothing is dropped.
    Held longer than the node's `redis_timeout`, a pub/sub connection would
    miss its PING probe and be replaced: keep holds short.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pubsub: list[asyncio.StreamWriter] = []  # to the node, of its pub/sub connections
        self._holds: dict[asyncio.StreamWriter, _Hold] = {}  # by the writer to the node
        self._marker: tuple[bytes, _Hold] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisGate:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def hold_pubsub(self) -> _Hold:
        """Hold what Redis sends the node's pub/sub connection from now on."""
        hold = _Hold()
        for writer in self._pubsub:
            hold.writer = writer
            self._holds[writer] = hold
        assert hold.writer is not None, "the node has no pub/sub connection through the gate"
        return hold

    def hold_reply(self, marker: bytes) -> _Hold:
        """Hold the reply to the next command that contains `marker`."""
        hold = _Hold()
        self._marker = (marker, hold)
        return hold

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            await asyncio.gather(self._up(reader, up_writer, writer), self._down(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            for end in (writer, up_writer):
                end.close()

    async def _up(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, node: asyncio.StreamWriter
    ) -> None:
        tail = b""  # the end of what came before, for a marker split across reads
        while data := await reader.read(65536):
            seen = tail + data
            if b"plexus-pubsub" in seen and node not in self._pubsub:
                self._pubsub.append(node)  # named in the link's handshake
            if self._marker is not None and self._marker[0] in seen:
                # Armed before the command leaves: its whole reply is held.
                hold = self._marker[1]
                self._marker = None
                hold.writer = node
                self._holds[node] = hold
            tail = seen[-256:]
            up.write(data)
            await up.drain()
        up.close()

    async def _down(self, up: asyncio.StreamReader, node: asyncio.StreamWriter) -> None:
        while data := await up.read(65536):
            hold = self._holds.get(node)
            if hold is not None and hold.released:
                del self._holds[node]
                hold = None
            if hold is not None:
                hold.keep(data)
            else:
                node.write(data)
                await node.drain()
        node.close()


@pytest.fixture
async def redis_race(
    make_server: ServerFactory, redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[tuple[Server, RedisGate]]:
    """A node on the Redis engine, connected to Redis through a `RedisGate`."""
    gate = await RedisGate(redis_server.port).start()
    server = await make_server(
        engine="redis",
        redis_url=gate.url,
        redis_prefix=redis_prefix,
        # Longer than any hold: no command or PING probe times out while one lasts.
        redis_timeout=TIMEOUT,
        namespaces=NAMESPACES,
    )
    yield server, gate
    await server.stop()
    await gate.close()


def read_marker(server: Server, recovering: bool) -> bytes:
    """The bytes that make the subscribe's read of `CH` on the wire: `EVALSHA <sha>
    <keys> <meta key>` of the READ script (with `since`; 2 keys) or the POSITION
    script (3 keys)."""
    broker = node_of(server).broker
    assert isinstance(broker, RedisBroker)
    script, keys = (scripts.READ, b"2") if recovering else (scripts.POSITION, b"3")
    sha = hashlib.sha1(script.encode()).hexdigest().encode()
    meta = broker.keys.meta(CH).encode()
    return b"%s\r\n$1\r\n%s\r\n$%d\r\n%s" % (sha, keys, len(meta), meta)


async def first_subscriber(server: Server, session: aiohttp.ClientSession) -> tuple[Peer, str]:
    """A subscriber that keeps `CH` followed by the node, and `CH` at offsets 1 and 2."""
    first = await Peer.connect(session, server.ws_url)
    await first.subscribe()
    one, two = await publish(server, 1), await publish(server, 2)
    assert [await first.offset(), await first.offset()] == [one.offset, two.offset] == [1, 2]
    return first, one.epoch


def since_one(epoch: str, recovering: bool) -> dict[str, Any] | None:
    """A recovering subscriber has offset 1 (and recovers 2 and up); a fresh one nothing."""
    return {"offset": 1, "epoch": epoch} if recovering else None


RECOVERING = pytest.mark.parametrize("recovering", [False, True], ids=["fresh", "recovering"])


@RECOVERING
async def test_redis_delivery_trailing_the_position_is_not_repeated(
    redis_race: tuple[Server, RedisGate], session: aiohttp.ClientSession, recovering: bool
) -> None:
    """(a) The reply's offset is ahead of what the node delivered: that message, when
    its delivery comes, is not sent to the new subscriber again."""
    server, gate = redis_race
    first, epoch = await first_subscriber(server, session)
    pubsub = gate.hold_pubsub()
    three = await publish(server, 3)  # in Redis; on its way to the node, held
    await pubsub.holding()
    peer = await Peer.connect(session, server.ws_url)
    result = await peer.subscribe(since_one(epoch, recovering))
    # The race is on: the reply says 3, the node has delivered only 2.
    assert (result["offset"], delivered(server)) == (three.offset, 2)
    if recovering:
        assert [await peer.offset(), await peer.offset()] == [2, 3]  # recovered
    pubsub.release()
    assert await first.offset() == three.offset  # the node's delivery of 3 reached its subscribers
    four = await publish(server, 4)
    five = await publish(server, 5)
    assert [await first.offset(), await first.offset()] == [four.offset, five.offset]
    # Not 3 again: the next message the new subscriber gets is 4.
    assert [await peer.offset(), await peer.offset()] == [four.offset, five.offset]


@RECOVERING
async def test_redis_message_during_the_subscribe_covered_by_its_read_is_not_repeated(
    redis_race: tuple[Server, RedisGate], session: aiohttp.ClientSession, recovering: bool
) -> None:
    """(b) A message the subscribe's read covers reaches the node while the subscribe
    is being set up: it is dropped from the backlog, not sent twice."""
    server, gate = redis_race
    first, epoch = await first_subscriber(server, session)
    pubsub = gate.hold_pubsub()
    three = await publish(server, 3)  # in Redis; its delivery to the node held
    read = gate.hold_reply(read_marker(server, recovering))
    peer = await Peer.connect(session, server.ws_url)
    command = await peer.send_subscribe(since_one(epoch, recovering))
    await read.holding()  # Redis answered the read, after 3: it covers 3
    pubsub.release()
    # The node delivers 3 while the subscribe waits for its read: into its backlog.
    assert await first.offset() == three.offset
    read.release()
    result = await peer.reply(command)
    assert result["offset"] == three.offset
    if recovering:
        assert result["recovered"] is True
        assert [await peer.offset(), await peer.offset()] == [2, 3]
    four = await publish(server, 4)
    assert await first.offset() == four.offset
    assert await peer.offset() == four.offset  # not 3 again


@RECOVERING
async def test_redis_message_during_the_subscribe_after_its_read_is_not_lost(
    redis_race: tuple[Server, RedisGate], session: aiohttp.ClientSession, recovering: bool
) -> None:
    """(c) A message published after the subscribe's read reaches the node before the
    read's answer: it is sent from the backlog, right after the reply."""
    server, gate = redis_race
    first, epoch = await first_subscriber(server, session)
    read = gate.hold_reply(read_marker(server, recovering))
    peer = await Peer.connect(session, server.ws_url)
    command = await peer.send_subscribe(since_one(epoch, recovering))
    await read.holding()  # Redis answered the read: offset 2
    three = await publish(server, 3)
    # Delivered to the node while the subscribe waits for its read: into its backlog.
    assert await first.offset() == three.offset
    read.release()
    result = await peer.reply(command)
    assert result["offset"] == 2
    if recovering:
        assert await peer.offset() == 2  # recovered
    assert await peer.offset() == three.offset  # from the backlog: no gap
    four = await publish(server, 4)
    assert await first.offset() == four.offset
    assert await peer.offset() == four.offset


# ----- sqlite: the commit gate


async def test_sqlite_commits_around_a_recovering_subscribe(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """(b) and (c) at once: the read of a recovering subscribe is queued behind a held
    batch with message 3, and message 4 behind the read. Once released, 3 is
    delivered while the subscribe waits (and its read covers it), and 4 is
    committed in the read's own batch, so it is delivered before the
    subscribe resumes (and its read does not cover it)."""
    server = await make_server(history_backend="sqlite", namespaces=NAMESPACES)
    store = node_of(server).history
    assert isinstance(store, SqliteBroker)
    gate = CommitGate()
    store.before_commit = gate
    try:
        first, epoch = await first_subscriber(server, session)
        gate.hold(lambda pub: pub.data == {"n": 3})
        three = asyncio.create_task(publish(server, 3))
        await gate.held()  # 3 is written, not committed
        peer = await Peer.connect(session, server.ws_url)
        command = await peer.send_subscribe(since_one(epoch, True))
        # In the hub: its read was queued in the same step.
        await wait_for(lambda: len(node_of(server).hub.subscriptions(CH)) == 2)
        four = asyncio.create_task(publish(server, 4))
        await yield_to_the_loop()
        assert store.pending == 2  # the read, then 4: the writer's next batch
        gate.open()
        assert (await three).offset == 3
        assert (await four).offset == 4
        assert [await first.offset(), await first.offset()] == [3, 4]
        result = await peer.reply(command)
        assert (result["offset"], result["recovered"]) == (3, True)
        # 2 and 3 recovered, 3 not again from the backlog; then 4 from the backlog.
        assert [await peer.offset() for _ in range(3)] == [2, 3, 4]
        five = await publish(server, 5)
        assert await first.offset() == five.offset
        assert await peer.offset() == five.offset
    finally:
        gate.open()


# ----- where there is no window


class Listener:
    """A subscriber as the node sees one, with no connection: it keeps what it is sent."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.user: str | None = None
        self.format_index = 0
        self.frames: list[bytes] = []
        self.push_frame = self.frames.append
        self.outbox = SimpleNamespace(send=self.frames.append)

    def close(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed {code} {reason}")

    async def end_subscription(
        self, channel: str, reason: str, *, resubscribe: bool = False
    ) -> bool:
        raise AssertionError(f"subscription to {channel} ended: {reason}")


@pytest.mark.parametrize(
    ("engine", "namespace", "recovering"),
    [
        ("memory", "race", False),
        ("memory", "race", True),
        ("memory", "chat", False),  # with presence and join/leave
        ("memory", "chat", True),
        ("sqlite", "race", False),
        ("sqlite", "chat", False),
    ],
)
async def test_a_subscribe_with_no_window_never_suspends(
    make_server: ServerFactory, engine: str, namespace: str, recovering: bool
) -> None:
    """Why the races above cannot happen on these engines: a subscribe to a channel the
    node already follows runs from its start to its outcome in one step of the
    loop, so no message can arrive between its read and its reply."""
    server = await make_server(
        history_backend=engine, namespaces={**default_namespaces(), **NAMESPACES}
    )
    node = node_of(server)
    channel = f"{namespace}:room"
    await node.subscribe(Listener("first"), channel, since=None, info=None)
    pub = await node.publish(channel, {"n": 1})
    assert isinstance(pub, Publication)
    since = Since(0, pub.epoch) if recovering else None
    steps = node.subscribe(Listener("second"), channel, since=since, info=None)
    with pytest.raises(StopIteration) as finished:
        steps.send(None)  # returns at its first suspension, if it has one
    outcome = finished.value.value
    assert outcome.result["offset"] == pub.offset
    assert outcome.missed == (1 if recovering else 0)
