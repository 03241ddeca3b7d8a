"""The Redis broker: channels' offsets, history and fan-out shared by every node.

Each channel lives on one of the configured Redis servers (`shard_of`). A
publish is one Lua script there (see `scripts.PUBLISH`): it assigns the
offset, appends to the channel's stream with its trims and TTLs, publishes
the message on the channel's pub/sub channel and records the idempotency key,
as one step. A node subscribes a channel's pub/sub channel only while it has
local subscribers (through one `PubSubLink` per server), and learns of every
reconnect, so a lost message is always repaired from the stream or reported.

Nothing waits in a queue for Redis: when a server is down, publishes and
subscribes to its channels fail at once with `Unavailable`, `/health` says
which server, and the pub/sub link reconnects with backoff by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from plexus.engines.base import EventSink, Health, Retention
from plexus.engines.memory import new_epoch, now_ms, page_is_complete
from plexus.engines.redis import scripts
from plexus.engines.redis.connection import CommandPipe
from plexus.engines.redis.pubsub import PubSubLink
from plexus.engines.redis.wire import Keys, as_text, body, decode, publication_from_body, shard_of
from plexus.exceptions import Unavailable
from plexus.models import Duplicate, HistoryPage, Presence, Publication, StreamPosition
from plexus.supervisor import Supervisor, cancelling

log = logging.getLogger("plexus.redis")

NODE_REPORT_INTERVAL: Final = 5.0  # seconds between a node's reports to the registry
NODE_EXPIRY: Final = 15.0  # a node that did not report for this long is gone
_NO_STREAM: Final = StreamPosition(0, "")
ERROR_LOG_INTERVAL: Final = 5.0


@dataclass(slots=True)
class _Publish:
    pub: Publication
    retention: Retention
    key: str | None
    future: asyncio.Future[Publication | Duplicate]


@dataclass
class Shard:
    """One Redis server: a command client and a pub/sub link.

    Publishes to the server leave in batches, one at a time: those made while
    a batch is on its way go together in the next pipeline. Redis runs a
    pipeline's scripts in order, so a channel's offsets follow the order in
    which `publish` was called (a connection's pipelined publishes keep their
    order), and a burst costs one round trip instead of one per message.
    """

    index: int
    url: str
    client: aioredis.Redis
    link: PubSubLink
    pipe: CommandPipe
    scripts: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    last_error: str = ""
    pending: list[_Publish] = field(default_factory=list)
    sending: bool = False
    logged_at: float = -1e9

    def script(self, name: str) -> Any:
        return self.scripts[name]


class RedisBroker:
    """Streams, history and fan-out in Redis; see the module docstring.

    Implements `plexus.engines.base.Broker` and `HistoryStore`.

    Args:
        urls: the Redis servers; channels are spread over them by a consistent hash.
        prefix: the prefix of every key and pub/sub channel (several Plexus
            clusters can share a Redis under different prefixes).
        timeout: seconds per Redis command (connect, confirm, answer).
        idempotency_ttl: seconds an idempotency key is remembered.
        grace: seconds an idle channel's epoch and offset are kept.
        linger: seconds a channel stays subscribed after its last local subscriber.
        probe_interval: seconds between PING probes of idle pub/sub connections.
    """

    name = "redis"

    def __init__(
        self,
        urls: list[str],
        *,
        prefix: str = "plexus",
        timeout: float = 5.0,
        idempotency_ttl: float = 300.0,
        grace: float = 300.0,
        linger: float = 2.0,
        probe_interval: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one Redis URL is needed")
        self.urls = list(urls)
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.idempotency_ttl_ms = round(idempotency_ttl * 1000)
        self.grace_ms = round(grace * 1000)
        self.unsubscribe_linger = linger
        self.probe_interval = probe_interval
        # Idle channels are checked often enough to keep their state alive
        # (every check refreshes it) and to catch a lost message within ~40 s.
        self.check_interval: float | None = min(40.0, grace / 3)
        self.shards: list[Shard] = []
        # Every publish carries the epoch its channel starts with if it has none:
        # a random per-process prefix and a counter are unique, and cost no
        # random draw per publish.
        self._epoch_prefix = secrets.token_urlsafe(4)
        self._epoch_counter = itertools.count(1)
        self._sink: EventSink | None = None
        self._started = False

    # ----- lifecycle

    def _epoch_candidate(self) -> str:
        return f"{self._epoch_prefix}{next(self._epoch_counter):x}"

    def inline_for(self, retention: Retention) -> bool:
        """Never: every publish is a round trip to Redis."""
        return False

    def bind(self, sink: EventSink) -> None:
        """Set where events of subscribed channels go."""
        self._sink = sink

    def _client(self, url: str, node: str) -> aioredis.Redis:
        # Every option set explicitly: redis-py 8.0 changed defaults (RESP3, a
        # socket timeout that broke idle connections). No retry: a publish
        # retried after a timeout could be stored twice; the caller (or the
        # SDK, with an idempotency key) retries instead.
        return aioredis.Redis.from_url(
            url,
            protocol=2,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            max_connections=256,
            client_name=f"plexus-{node}",
            decode_responses=False,
        )

    async def start(self, supervisor: Supervisor) -> None:
        """Connect to every server; start degraded (logged, `/ready` 503) if one is down."""
        sink = self._sink
        node = sink.name if sink is not None else "node"
        for index, url in enumerate(self.urls):
            shown = _redact(url)
            link = PubSubLink(
                url,
                on_message=self._on_message,
                on_gap=self._on_gap,
                name=f"{node}#{index}" if len(self.urls) > 1 else node,
                timeout=self.timeout,
                probe_interval=self.probe_interval,
            )
            client = self._client(url, node)
            pipe = CommandPipe(url, f"plexus-publish-{node}", self.timeout)
            shard = Shard(index, shown, client, link, pipe)
            for name, source in (
                ("publish", scripts.PUBLISH),
                ("position", scripts.POSITION),
                ("read", scripts.READ),
                ("presence_get", scripts.PRESENCE_GET),
            ):
                shard.scripts[name] = client.register_script(source)
            self.shards.append(shard)
            link.start(supervisor)
        self._started = True
        for shard in self.shards:
            if not await shard.link.wait_ready(self.timeout):
                log.warning(
                    "redis %s is not reachable (%s): starting degraded; publishes answer"
                    " unavailable and /ready 503 until it is",
                    shard.url,
                    shard.link.last_error or "no answer",
                )
        supervisor.spawn("redis-node-registry", self._report_loop)
        supervisor.spawn("redis-node-channels", self._listen_as_node)

    async def close(self) -> None:
        """Leave the registry and close every connection."""
        sink = self._sink
        if sink is not None and self.shards:
            try:
                first = self.shards[0].client
                await first.hdel(self.keys.nodes, sink.name)
                await first.zrem(self.keys.nodes_expiry, sink.name)
            except RedisError:
                pass  # it expires from the registry by itself
        for shard in self.shards:
            await shard.link.close()
            await shard.pipe.close()
            await shard.client.aclose()
        self.shards = []

    def health(self) -> Health:
        """Down while any server's pub/sub connection is down."""
        servers = {}
        for shard in self.shards:
            state = shard.link.health()
            state["command_errors"] = shard.errors
            if shard.last_error:
                state["last_command_error"] = shard.last_error
            servers[shard.url] = state
        down = not self.shards or any(not shard.link.up for shard in self.shards)
        return {"status": "down" if down else "ok", "servers": servers}

    # ----- where a channel lives

    def shard(self, channel: str) -> Shard:
        """The server that holds `channel`."""
        shards = self.shards
        if not shards:
            raise Unavailable("the redis engine is not started")
        return shards[shard_of(channel, len(shards)) if len(shards) > 1 else 0]

    def _failed(self, shard: Shard, exc: Exception) -> Unavailable:
        shard.errors += 1
        shard.last_error = f"{type(exc).__name__}: {exc}"[:200]
        now = time.monotonic()
        if now - shard.logged_at > ERROR_LOG_INTERVAL:  # an outage is one line, not thousands
            shard.logged_at = now
            log.warning(
                "redis %s: %s (%d errors so far)", shard.url, shard.last_error, shard.errors
            )
        error = Unavailable(f"redis is unavailable: {type(exc).__name__}")
        error.__cause__ = exc
        return error

    # ----- publishing

    async def publish(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """Run the publish script on the channel's server; see `Broker.publish`.

        A cancelled caller does not withdraw the message: it is still sent.

        Raises:
            Unavailable: the server is down or refused; nothing was stored (a
                lost connection may hide a publish that happened: retry with
                the same idempotency key to be sure).
        """
        return await self._start(pub, retention, key)

    def publish_then(
        self,
        pub: Publication,
        retention: Retention,
        key: str | None,
        then: Callable[[Publication | Duplicate | Exception], None],
    ) -> None:
        """`publish` started now: see `Broker.publish_then`."""

        def done(future: asyncio.Future[Publication | Duplicate]) -> None:
            error = future.exception()  # only ever Unavailable (nobody cancels it)
            if error is None:
                then(future.result())
            else:
                then(error if isinstance(error, Exception) else Unavailable(repr(error)))

        self._start(pub, retention, key).add_done_callback(done)

    def _start(
        self, pub: Publication, retention: Retention, key: str | None
    ) -> asyncio.Future[Publication | Duplicate]:
        shard = self.shard(pub.channel)
        pub.raw  # noqa: B018 - encoded now, in call order, not in the batch
        future: asyncio.Future[Publication | Duplicate] = asyncio.get_running_loop().create_future()
        shard.pending.append(_Publish(pub, retention, key, future))
        if not shard.sending:
            shard.sending = True
            asyncio.get_running_loop().create_task(self._send_batches(shard))
        return future

    async def _send_batches(self, shard: Shard) -> None:
        try:
            while shard.pending:
                batch, shard.pending = shard.pending, []
                await self._send(shard, batch)
        except Exception as exc:  # a bug: every waiting publisher hears of it
            log.exception("redis %s: publishing failed", shard.url)
            for job in shard.pending:
                if not job.future.done():
                    job.future.set_exception(Unavailable(f"redis publish failed: {exc}"))
            shard.pending = []
        finally:
            shard.sending = False

    def _publish_args(self, job: _Publish) -> list[Any]:
        pub, retention, key = job.pub, job.retention, job.key
        channel = pub.channel
        keys = self.keys
        meta = keys.meta(channel)
        idempotency = keys.idempotency(channel, key) if key is not None else meta
        limit = self._channel_limit(retention)
        return [
            4,
            meta,
            keys.stream(channel),
            idempotency,
            keys.namespace(retention.namespace) if limit else meta,
            body(pub),
            retention.size,
            round(retention.ttl * 1000),
            retention.max_bytes,
            self.grace_ms,
            keys.pubsub(channel),
            self.idempotency_ttl_ms if key is not None else 0,
            self._epoch_candidate(),
            pub.time,
            limit,
            channel,
        ]

    def _channel_limit(self, retention: Retention) -> int:
        """How many channels of the namespace one server may hold (0 = no limit).

        Each server counts the channels it holds (Redis Cluster is not
        supported, and a script may not reach other servers): the limit is
        shared out evenly, so together they never hold much more than it.
        """
        if not retention.max_channels:
            return 0
        return -(-retention.max_channels // len(self.shards))

    @staticmethod
    def _full(retention: Retention) -> Unavailable:
        return Unavailable(
            f"namespace {retention.namespace or 'default'} holds its maximum of"
            f" {retention.max_channels} channels: try again later"
        )

    async def _send(self, shard: Shard, batch: list[_Publish]) -> None:
        script = shard.script("publish")
        todo = batch
        results: dict[int, Any] = {}
        for attempt in range(2):
            try:
                replies = await shard.pipe.run(
                    [("EVALSHA", script.sha, *self._publish_args(job)) for job in todo]
                )
                missing = []
                for job, reply in zip(todo, replies, strict=True):
                    if _no_script(reply) and attempt == 0:
                        missing.append(job)  # the script cache was emptied (restart, flush)
                    else:
                        results[id(job)] = reply
                if not missing:
                    break
                loaded = await shard.pipe.run([("SCRIPT", "LOAD", scripts.PUBLISH)])
                script.sha = as_text(loaded[0])
                todo = missing
            except Unavailable as exc:
                error = self._failed(shard, exc)
                for job in todo:
                    if not job.future.done():
                        job.future.set_exception(error)
                return
        for job in batch:
            reply = results.get(id(job))
            if job.future.done() or reply is None:
                continue
            if isinstance(reply, Exception):
                job.future.set_exception(self._failed(shard, reply))
                continue
            offset, epoch, duplicate = reply
            if offset == -1:
                job.future.set_exception(self._full(job.retention))
            elif duplicate:
                job.future.set_result(Duplicate(int(offset), as_text(epoch)))
            else:
                job.pub.offset, job.pub.epoch = int(offset), as_text(epoch)
                job.future.set_result(job.pub)

    def publish_nowait(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """Never available here (see `inline_for`)."""
        raise NotImplementedError("the redis engine publishes with `publish`")

    async def publish_presence(self, event: Presence) -> None:
        """Send a join or leave to every node subscribed to the channel."""
        from plexus.engines.redis.wire import presence_payload

        shard = self.shard(event.channel)
        try:
            await shard.client.publish(self.keys.pubsub(event.channel), presence_payload(event))
        except RedisError as exc:
            raise self._failed(shard, exc) from None

    # ----- subscriptions

    async def subscribe(self, channel: str) -> None:
        """Subscribe the channel's pub/sub channel; returns once Redis confirmed."""
        await self.shard(channel).link.subscribe(self.keys.pubsub(channel).encode())

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe the channel's pub/sub channel."""
        if self.shards:
            link = self.shard(channel).link
            confirmed = link.unsubscribe(self.keys.pubsub(channel).encode())
            if confirmed is not None:
                # Once this returns, nothing of the channel is delivered any more.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(confirmed, self.timeout)

    def _on_message(self, pubsub: bytes, payload: bytes) -> None:
        sink = self._sink
        if sink is None:
            return
        if not self.keys.carries_channel(pubsub):
            sink.on_node_message(payload)
            return
        channel = self.keys.channel_of(pubsub)
        try:
            event = decode(channel, payload)
        except (ValueError, IndexError, orjson.JSONDecodeError):
            log.warning("redis: ignored a malformed message on %r", pubsub)
            return
        if isinstance(event, Publication):
            sink.on_publication(event)
        elif event is not None:
            sink.on_presence(event)

    def _on_gap(self, pubsubs: Collection[bytes]) -> None:
        if self._sink is not None:
            channels = [self.keys.channel_of(n) for n in pubsubs if self.keys.carries_channel(n)]
            self._sink.on_gapped(channels)

    # ----- reading

    async def position(self, channel: str, *, create: Retention | None = None) -> StreamPosition:
        """The channel's top offset and epoch; see `HistoryStore.position`."""
        shard = self.shard(channel)
        meta = self.keys.meta(channel)
        limit = 0 if create is None else self._channel_limit(create)
        counted = self.keys.namespace(create.namespace) if create is not None and limit else meta
        try:
            top, epoch = await shard.script("position")(
                keys=[meta, self.keys.stream(channel), counted],
                args=[1 if create is not None else 0, new_epoch(), self.grace_ms, limit, channel],
            )
        except RedisError as exc:
            raise self._failed(shard, exc) from None
        if top == -1 and create is not None:
            raise self._full(create)
        if epoch is None:
            return _NO_STREAM
        return StreamPosition(int(top), as_text(epoch))

    async def positions(self, channels: Collection[str]) -> dict[str, StreamPosition]:
        """Positions of `channels` in one pipeline per server; each existing one is kept
        alive for the grace period from now (the node checks the channels it serves)."""
        by_shard: dict[int, list[str]] = {}
        for channel in channels:
            by_shard.setdefault(self.shard(channel).index, []).append(channel)
        found: dict[str, StreamPosition] = {}
        for index, names in by_shard.items():
            shard = self.shards[index]
            try:
                async with shard.client.pipeline(transaction=False) as pipe:
                    for channel in names:
                        meta = self.keys.meta(channel)
                        await shard.script("position")(
                            keys=[meta, self.keys.stream(channel), meta],
                            args=[0, "", self.grace_ms, 0, channel],
                            client=pipe,
                        )
                    replies = await pipe.execute()
            except RedisError as exc:
                raise self._failed(shard, exc) from None
            for channel, (top, epoch) in zip(names, replies, strict=True):
                found[channel] = (
                    _NO_STREAM if epoch is None else StreamPosition(int(top), as_text(epoch))
                )
        return found

    async def read(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        max_bytes: int | None = None,
        now: int | None = None,
    ) -> HistoryPage:
        """Return kept messages after `since`, oldest first; see `HistoryStore.read`."""
        after = max(since or 0, 0)
        wanted = max(limit, 0) if limit is not None else None
        fetch = -1 if wanted is None else wanted + 1  # one more tells what follows the page
        shard = self.shard(channel)
        try:
            reply = await shard.script("read")(
                keys=[self.keys.meta(channel), self.keys.stream(channel)],
                args=[
                    after,
                    fetch,
                    -1 if max_bytes is None else max_bytes,
                    now or now_ms(),
                    -1 if wanted is None else wanted,
                ],
            )
        except RedisError as exc:
            raise self._failed(shard, exc) from None
        epoch, top, cut = reply[0], int(reply[1]), bool(reply[2])
        if epoch is None:
            return HistoryPage([], _NO_STREAM, page_is_complete([], after, 0, None))
        epoch_text = as_text(epoch)
        position = StreamPosition(top, epoch_text)
        entries = reply[3:]
        publications = [
            publication_from_body(
                channel, int(entries[i].split(b"-", 1)[0]), epoch_text, entries[i + 1]
            )
            for i in range(0, len(entries), 2)
        ]
        following: int | None = None
        if wanted is not None and len(publications) > wanted:
            following = publications[wanted].offset
            publications = publications[:wanted]
        offsets = [p.offset for p in publications]
        complete = not cut and page_is_complete(offsets, after, top, following)
        return HistoryPage(publications, position, complete)

    # ----- nodes

    async def _listen_as_node(self) -> None:
        """Subscribe this node's own pub/sub channels (until it succeeds: Redis may be down)."""
        sink = self._sink
        if sink is None or not self.shards:
            return
        link = self.shards[0].link
        for name in (self.keys.node_channel(sink.name), self.keys.node_channel(None)):
            while True:
                try:
                    await link.subscribe(name.encode())
                    break
                except Unavailable:
                    await link.wait_ready(self.timeout)  # retried once the link is back

    async def send_nodes(self, payload: bytes, node: str | None = None) -> int:
        """PUBLISH on the node's (or every node's) channel; Redis says how many got it."""
        shard = self.shards[0] if self.shards else None
        if shard is None:
            raise Unavailable("the redis engine is not started")
        try:
            reached = await shard.client.publish(self.keys.node_channel(node), payload)
        except RedisError as exc:
            raise self._failed(shard, exc) from None
        return int(reached)

    # ----- the node registry

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node that reported in the last `NODE_EXPIRY` seconds, this one included."""
        shard = self.shards[0] if self.shards else None
        if shard is None:
            return []
        try:
            alive = await shard.client.zrangebyscore(self.keys.nodes_expiry, time.time(), "+inf")
            if not alive:
                return []
            values = await shard.client.hmget(self.keys.nodes, list(alive))  # type: ignore[arg-type]
        except RedisError as exc:
            raise self._failed(shard, exc) from None
        return [orjson.loads(value) for value in values if value is not None]

    async def _report_loop(self) -> None:
        while True:
            await self._report()
            await asyncio.sleep(NODE_REPORT_INTERVAL)

    async def _report(self) -> None:
        sink = self._sink
        if sink is None or not self.shards:
            return
        shard = self.shards[0]
        try:
            async with shard.client.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.nodes, sink.name, orjson.dumps(sink.info()))
                pipe.zadd(self.keys.nodes_expiry, {sink.name: time.time() + NODE_EXPIRY})
                # Nodes that stopped reporting long ago leave the registry.
                pipe.zremrangebyscore(self.keys.nodes_expiry, "-inf", time.time() - 3600)
                await pipe.execute()
        except RedisError as exc:
            if cancelling():
                raise asyncio.CancelledError from exc
            self._failed(shard, exc)


def _no_script(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _redact(url: str) -> str:
    """The URL without its password (for logs and `/health`)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"
