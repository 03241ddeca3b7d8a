"""The memory engine: one process, nothing installed, nothing survives a restart.

`MemoryBroker` owns every channel's stream in this process's memory and
delivers synchronously: a publish is stored and fanned out before
`publish_nowait` returns, so no event ever waits in a queue. Each channel gets
a fresh random epoch the first time this process sees it, so a client
recovering across a restart is told (by the epoch mismatch) that its position
is gone instead of being handed a history that silently restarted at offset 1.

Channel state is bounded (channel names are chosen by clients): a channel
that keeps no history exists only while someone here subscribes to it; one
with history is forgotten `grace` seconds after its last message
expired and its last subscriber left (`channel_grace`); a namespace holds at most
`Retention.max_channels` channels.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import secrets
import time as _time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection
from typing import Any, Final

from plexus.engines.base import EventSink, Health, Retention
from plexus.exceptions import PlexusError, Unavailable
from plexus.models import ClientInfo, Duplicate, HistoryPage, Presence, Publication, StreamPosition
from plexus.supervisor import Supervisor

_NEVER: Final = float("inf")
# Idempotency keys remembered per process at most; the oldest go first. Bounds
# what a client publishing with a fresh key each time can make the server keep.
MAX_IDEMPOTENCY_KEYS: Final = 100_000


def now_ms() -> int:
    """Return the wall clock in Unix milliseconds."""
    return _time.time_ns() // 1_000_000


def new_epoch() -> str:
    """Return a fresh random epoch: short, URL-safe, unguessable across restarts."""
    return secrets.token_urlsafe(6)


def page_is_complete(offsets: list[int], since: int, top: int, following: int | None) -> bool:
    """Tell whether a page of `offsets` after `since` misses no message.

    Shared by the engines so that `HistoryPage.complete` means the same
    everywhere. The page is complete when it starts at `since + 1`, has no gap,
    and either reaches `top` or was cut by the caller's `limit` right before
    `following`. A `since` beyond `top` is never complete: that position was
    not issued in this epoch, so the caller cannot be in sync with it.

    Args:
        offsets: the returned offsets, ascending.
        since: the offset the caller already has (0 for "from the start").
        top: the channel's last offset.
        following: the offset of the first kept message left out by `limit`,
            None when the page holds every kept message after `since`.
    """
    expected = since + 1
    for offset in offsets:
        if offset != expected:
            return False
        expected += 1
    if following is not None:
        return following == expected
    return expected - 1 == top


def namespace_count_key(retention: Retention) -> str:
    """The key channels are counted under for `Retention.max_channels`."""
    return retention.namespace


class IdempotencyKeys:
    """Idempotency keys seen in the last `ttl` seconds, with the offset they got.

    Entries are added in time order and all live `ttl`, so the oldest is always
    first: expiry pops from the front, and so does the bound.
    """

    __slots__ = ("_entries", "limit", "ttl_ms")

    def __init__(self, ttl: float, limit: int = MAX_IDEMPOTENCY_KEYS) -> None:
        self.ttl_ms = round(ttl * 1000)
        self.limit = limit
        self._entries: OrderedDict[tuple[str, str], tuple[int, Duplicate]] = OrderedDict()

    def get(self, channel: str, key: str, now: int) -> Duplicate | None:
        """The first publish with `key` in `channel`, if still remembered."""
        self._expire(now)
        entry = self._entries.get((channel, key))
        return entry[1] if entry is not None else None

    def put(self, channel: str, key: str, offset: int, epoch: str, now: int) -> None:
        """Remember that `key` published `offset` in `epoch`."""
        self._entries[(channel, key)] = (now + self.ttl_ms, Duplicate(offset, epoch))
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def _expire(self, now: int) -> None:
        entries = self._entries
        while entries:
            expires, _ = next(iter(entries.values()))
            if expires > now:
                return
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _Stream:
    """One channel: its epoch, last offset and kept messages (oldest first)."""

    __slots__ = (
        "bytes",
        "epoch",
        "kept_until",
        "messages",
        "retention",
        "scheduled",
        "top",
        "touched",
    )

    def __init__(self, retention: Retention, now: int) -> None:
        self.epoch = new_epoch()
        self.top = 0
        self.retention = retention
        # Offsets are consecutive: messages are only appended on the right
        # and dropped from the left.
        self.messages: deque[Publication] = deque()
        self.bytes = 0  # payload bytes of `messages`
        self.touched = now  # last publish, subscribe or unsubscribe
        # When the newest message expires (0: none expires): the grace runs
        # from then, even once the expired messages were dropped.
        self.kept_until = 0
        self.scheduled = False  # in the sweeper's heap

    def drop_expired_head(self, now: int) -> None:
        ttl = self.retention.ttl
        if ttl <= 0:
            return
        horizon = now - ttl * 1000
        messages = self.messages
        while messages and messages[0].time <= horizon:
            self.bytes -= len(messages.popleft().raw)

    def forget_at(self, grace_ms: int) -> float:
        """When this stream may be forgotten, if nobody subscribes to it by then."""
        if self.messages and self.retention.ttl <= 0:
            return _NEVER
        return max(self.touched, self.kept_until) + grace_ms


class MemoryBroker:
    """Streams, history and fan-out in this process's memory.

    Implements `plexus.engines.base.Broker` and `HistoryStore`. Nothing here
    suspends: every publish is inline.

    Args:
        idempotency_ttl: seconds an idempotency key is remembered.
        sweep_interval: seconds between passes that forget idle channels.
        grace: seconds an idle channel with history is kept (see `Broker`).
    """

    name = "memory"
    unsubscribe_linger = 0.0
    check_interval: float | None = None

    def __init__(
        self, *, idempotency_ttl: float = 300.0, sweep_interval: float = 5.0, grace: float = 300.0
    ) -> None:
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._counts: Counter[str] = Counter()  # streams per namespace
        self._due: list[tuple[float, int, str]] = []  # (forget_at, tiebreak, channel)
        self._tiebreak = itertools.count()
        self._keys = IdempotencyKeys(idempotency_ttl)
        self._sink: EventSink | None = None
        self.sweep_interval = sweep_interval
        self.grace_ms = round(grace * 1000)

    # ----- lifecycle

    def bind(self, sink: EventSink) -> None:
        """Set where events of subscribed channels go."""
        self._sink = sink

    async def start(self, supervisor: Supervisor) -> None:
        """Start the sweeper that forgets idle channels."""
        supervisor.spawn("memory-sweeper", self._sweep_loop)

    async def close(self) -> None:
        """Forget every channel (a closed memory engine is as good as a restarted one)."""
        self._streams.clear()
        self._subscribed.clear()
        self._counts.clear()
        self._due.clear()

    async def nodes(self) -> list[dict[str, Any]]:
        """Only this node shares this engine."""
        return [self._sink.info()] if self._sink is not None else []

    async def send_nodes(self, payload: bytes, node: str | None = None) -> int:
        """Only this node can be reached (on the next loop iteration, like from afar)."""
        sink = self._sink
        if sink is None or (node is not None and node != sink.name):
            return 0
        asyncio.get_running_loop().call_soon(sink.on_node_message, payload)
        return 1

    def health(self) -> Health:
        """Always ok: nothing here can be down."""
        return {"status": "ok", "channels": len(self._streams)}

    # ----- publishing

    def inline_for(self, retention: Retention) -> bool:
        """Always True: nothing here does I/O."""
        return True

    async def publish(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """See `Broker.publish`; never suspends here."""
        return self.publish_nowait(pub, retention, key)

    def publish_then(
        self,
        pub: Publication,
        retention: Retention,
        key: str | None,
        then: Callable[[Publication | Duplicate | Exception], None],
    ) -> None:
        """See `Broker.publish_then`: done now, `then` called soon."""
        outcome: Publication | Duplicate | Exception
        try:
            outcome = self.publish_nowait(pub, retention, key)
        except PlexusError as exc:
            outcome = exc
        asyncio.get_running_loop().call_soon(then, outcome)

    def publish_nowait(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """Assign the next offset, keep `pub` within the retention and deliver it.

        The message is kept by reference: the caller must not mutate its data.

        Raises:
            Unavailable: the channel is new and its namespace is at `max_channels`.
        """
        channel = pub.channel
        now = pub.time
        if key is not None:
            seen = self._keys.get(channel, key, now)
            if seen is not None:
                return seen
        stream = self._streams.get(channel)
        if stream is None:
            if not retention.keeps_history and channel not in self._subscribed:
                # Nothing is kept and nobody listens: the message goes nowhere,
                # and the channel keeps no state (each such publish is an epoch).
                pub.offset, pub.epoch = 1, new_epoch()
                if key is not None:
                    self._keys.put(channel, key, 1, pub.epoch, now)
                return pub
            stream = self._create(channel, retention, now)
        stream.top += 1
        pub.offset = stream.top
        pub.epoch = stream.epoch
        stream.touched = now
        if retention.size > 0:
            self._keep(stream, pub, retention, now)
        if key is not None:
            self._keys.put(channel, key, pub.offset, pub.epoch, now)
        if channel in self._subscribed and self._sink is not None:
            self._sink.on_publication(pub)
        return pub

    def _keep(self, stream: _Stream, pub: Publication, retention: Retention, now: int) -> None:
        messages = stream.messages
        messages.append(pub)
        stream.bytes += len(pub.raw)
        if stream.retention.ttl > 0:
            stream.kept_until = pub.time + round(stream.retention.ttl * 1000)
        # The publication time is the caller's clock, so it is also "now" for
        # dropping expired messages.
        stream.drop_expired_head(now)
        while len(messages) > retention.size:
            stream.bytes -= len(messages.popleft().raw)
        if retention.max_bytes:
            while stream.bytes > retention.max_bytes and len(messages) > 1:
                stream.bytes -= len(messages.popleft().raw)

    async def publish_presence(self, event: Presence) -> None:
        """Deliver a join or leave to this node, if it subscribes to the channel."""
        if event.channel in self._subscribed and self._sink is not None:
            self._sink.on_presence(event)

    # ----- subscriptions

    async def subscribe(self, channel: str) -> None:
        """Deliver `channel`'s events from now on; its state lives while subscribed."""
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel`; a channel without history is forgotten at once."""
        self._subscribed.discard(channel)
        stream = self._streams.get(channel)
        if stream is None:
            return
        if not stream.retention.keeps_history:
            self._forget(channel, stream)
            return
        stream.touched = now_ms()
        self._schedule(channel, stream)

    # ----- reading

    def holds(self, channel: str) -> bool:
        """Whether `channel` has state here."""
        return channel in self._streams

    async def position(self, channel: str, *, create: Retention | None = None) -> StreamPosition:
        """The channel's last offset and epoch; see `HistoryStore.position`."""
        stream = self._streams.get(channel)
        if stream is None:
            if create is None:
                return StreamPosition(0, "")
            stream = self._create(channel, create, now_ms())
        elif create is not None:
            stream.touched = now_ms()
        return StreamPosition(stream.top, stream.epoch)

    async def positions(self, channels: Collection[str]) -> dict[str, StreamPosition]:
        """Positions of `channels`, creating none."""
        return {channel: await self.position(channel) for channel in channels}

    async def read(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        max_bytes: int | None = None,
        now: int | None = None,
    ) -> HistoryPage:
        """Return kept messages after `since`, oldest first; see `HistoryStore.read`.

        `since=None` reads from the oldest kept message and is complete only if
        no message of the epoch was dropped yet (as if `since` were 0).
        """
        after = max(since or 0, 0)
        stream = self._streams.get(channel)
        if stream is None:
            top = StreamPosition(0, "")
            return HistoryPage([], top, page_is_complete([], after, 0, None))
        if now is None:
            now = now_ms()
        stream.drop_expired_head(now)
        messages = stream.messages
        start = after + 1 - messages[0].offset if messages else 0
        wanted = max(limit, 0) if limit is not None else len(messages)
        budget = max_bytes if max_bytes is not None else -1
        publications: list[Publication] = []
        following: int | None = None
        cut = False
        for publication in itertools.islice(messages, max(start, 0), None):
            if len(publications) >= wanted:
                following = publication.offset
                break
            if budget >= 0:
                budget -= len(publication.raw)
                if budget < 0:
                    cut = True
                    break
            publications.append(publication)
        offsets = [p.offset for p in publications]
        complete = not cut and page_is_complete(offsets, after, stream.top, following)
        return HistoryPage(publications, StreamPosition(stream.top, stream.epoch), complete)

    # ----- state bounds

    def _create(self, channel: str, retention: Retention, now: int) -> _Stream:
        key = namespace_count_key(retention)
        if retention.max_channels and self._counts[key] >= retention.max_channels:
            raise Unavailable(
                f"namespace {retention.namespace or 'default'} holds its maximum of"
                f" {retention.max_channels} channels: try again later"
            )
        stream = self._streams[channel] = _Stream(retention, now)
        self._counts[key] += 1
        if channel not in self._subscribed:
            self._schedule(channel, stream)
        return stream

    def _forget(self, channel: str, stream: _Stream) -> None:
        del self._streams[channel]
        key = namespace_count_key(stream.retention)
        left = self._counts[key] - 1
        if left > 0:
            self._counts[key] = left
        else:
            del self._counts[key]

    def _schedule(self, channel: str, stream: _Stream) -> None:
        if stream.scheduled:
            return
        at = stream.forget_at(self.grace_ms)
        if at != _NEVER:
            stream.scheduled = True
            heapq.heappush(self._due, (at, next(self._tiebreak), channel))

    def sweep(self, now: int | None = None) -> int:
        """Forget the idle channels whose time has come; return how many."""
        if now is None:
            now = now_ms()
        due = self._due
        forgotten = 0
        while due and due[0][0] <= now:
            _, _, channel = heapq.heappop(due)
            stream = self._streams.get(channel)
            if stream is None:
                continue
            stream.scheduled = False
            if channel in self._subscribed:
                continue  # unsubscribe schedules it again
            stream.drop_expired_head(now)
            if stream.forget_at(self.grace_ms) <= now:
                self._forget(channel, stream)
                forgotten += 1
            else:
                self._schedule(channel, stream)
        return forgotten

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep()

    def state_size(self) -> dict[str, int]:
        """How much state this engine holds (for tests and the soak benchmark)."""
        return {
            "streams": len(self._streams),
            "subscribed": len(self._subscribed),
            "scheduled": len(self._due),
            "idempotency_keys": len(self._keys),
            "namespaces": len(self._counts),
        }


class MemoryPresenceStore:
    """Presence kept in this process's memory; see `plexus.engines.base.PresenceStore`.

    Entries never expire: a node that dies takes its whole store with it, so
    there are no dead nodes' entries to clean up. No method suspends.
    """

    __slots__ = ("_channels",)

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, ClientInfo]] = {}

    async def start(self, supervisor: Supervisor) -> None:
        """Nothing to open; present so that every store starts the same way."""
        return None

    async def add(self, channel: str, info: ClientInfo) -> None:
        """Record `info.client` as present in `channel`, replacing its previous info."""
        self._channels.setdefault(channel, {})[info.client] = info

    async def remove(self, channel: str, client: str) -> None:
        """Forget `client` in `channel`; a no-op when it is not there."""
        clients = self._channels.get(channel)
        if clients is None:
            return
        clients.pop(client, None)
        if not clients:
            # An empty channel must not keep its entry: channel names are
            # chosen by clients, so the map would otherwise grow without bound.
            del self._channels[channel]

    async def get(self, channel: str) -> dict[str, ClientInfo]:
        """Return a snapshot of the present clients of `channel`, keyed by client id."""
        return dict(self._channels.get(channel, {}))

    async def close(self) -> None:
        """Forget everyone."""
        self._channels.clear()

    def health(self) -> Health:
        """Always ok."""
        return {"status": "ok", "channels": len(self._channels)}

    def state_size(self) -> dict[str, int]:
        """How much state this store holds (for tests and the soak benchmark)."""
        return {"presence_channels": len(self._channels)}
