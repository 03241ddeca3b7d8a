"""The contracts every engine implements: `Broker`, `HistoryStore` and `PresenceStore`.

An engine is what keeps channels' streams and moves their events between
nodes. Three come with Plexus: `memory` (one process, nothing installed),
`sqlite` (one process, history on disk) and `redis` (many processes and
machines). One conformance suite (`tests/engines/`) holds each to the
contracts below.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from plexus.models import ClientInfo, Duplicate, HistoryPage, Presence, Publication, StreamPosition
from plexus.supervisor import Supervisor

Health = dict[str, Any]
"""A component's state for `/health`: `{"status": "ok" | "degraded" | "down", ...details}`."""


@dataclass(slots=True, frozen=True)
class Retention:
    """How a namespace keeps its channels' streams (from its options).

    Attributes:
        size: most messages kept per channel (0 = none: the channel keeps no
            history, and no state at all while nobody subscribes to it).
        ttl: seconds each message is kept (0 = no age limit).
        max_bytes: most payload bytes kept per channel (0 = no limit); the
            oldest messages go first.
        max_channels: most channels of the namespace that may hold state at
            once (0 = no limit); a new one beyond it is refused `unavailable`.
        namespace: the namespace these options belong to (for the channel count).
    """

    size: int = 0
    ttl: float = 0.0
    max_bytes: int = 0
    max_channels: int = 0
    namespace: str = ""

    @property
    def keeps_history(self) -> bool:
        """True when messages are stored (and recovery is possible)."""
        return self.size > 0


@runtime_checkable
class Measured(Protocol):
    """A part of an engine that can tell how much state it holds in memory.

    Optional: `Node.engine_state` (and so `/health`) reports the parts that
    implement it. Each entry counts items of one map or set, so that a soak
    can check that nothing grows with the number of channels ever used.
    """

    def state_size(self) -> dict[str, int]:
        """Entries per map or set, by a name unique across the engine's parts."""
        ...


class EventSink(Protocol):
    """What a broker delivers to: the node. Every method is called on the event loop,
    must not block, and is never awaited by the broker."""

    @property
    def name(self) -> str:
        """The node's id, unique across every node sharing the engine."""
        ...

    def info(self) -> dict[str, Any]:
        """The node's id and counters, for the registry of nodes (`Broker.nodes`)."""
        ...

    def on_publication(self, pub: Publication) -> None:
        """A message of a channel this node subscribes to."""
        ...

    def on_presence(self, event: Presence) -> None:
        """A join or leave in a channel this node subscribes to."""
        ...

    def on_node_message(self, payload: bytes) -> None:
        """A message another node (or this one) sent to this node with `Broker.send_nodes`."""
        ...

    def on_gapped(self, channels: Collection[str]) -> None:
        """Messages of these channels may have been lost on their way to this node
        (a dropped connection, an overflowing queue): repair them from history."""
        ...


class Broker(Protocol):
    """Owns every channel's offsets: stores each message and delivers it to every node.

    Contract (checked by `tests/engines/test_broker_conformance.py` for every
    engine):

    * Atomic per channel: `publish` assigns the channel's next offset (the
      previous one + 1, starting at 1 in a new epoch), stores the message in
      history (per the `Retention`), and delivers it to every node that
      subscribed the channel, as one step. Every node therefore sees a
      channel's messages in offset order, whichever publishers race.
    * `publish` returns (or raises) only when the outcome is known: returned
      = stored as durably as the engine promises and on its way to every node.
      It raises `plexus.exceptions.Unavailable` when the engine cannot serve;
      nothing was stored then. No publish waits in a queue for a backing
      service to come back.
    * Idempotency: a publish with a `key` already used in the same channel
      within `idempotency_ttl` seconds stores and delivers nothing and returns
      `Duplicate` with the first publish's offset and epoch.
    * Delivery: a node receives the events of a channel from when `subscribe`
      returns until `unsubscribe` is called. A lost event is never silent:
      either it arrives, or the node's sink hears `on_gapped` for its channel.
    * Ordering: the sink sees one channel's publications in offset order, and
      join/leave events in the order they were published.
    * A channel with no history (`Retention.size == 0`) keeps no state while no
      node subscribes to it (an engine shared by nodes, whose state expires on
      its own clock, may keep its counter up to `grace` seconds longer); one
      with history keeps its epoch and offset while
      it holds messages or a subscriber, and for the engine's `grace` seconds
      (setting `channel_grace`) after that, so that a client reconnecting
      shortly after can still recover; then it is forgotten and a later
      message starts a new epoch.
    """

    name: str
    """The engine's name as in the settings (`memory`, `sqlite`, `redis`)."""

    unsubscribe_linger: float
    """Seconds the node keeps an unused channel subscribed after its last local
    subscriber left (a backing service makes subscribing cost a round trip)."""

    check_interval: float | None
    """Seconds between checks of subscribed channels' tops against what the
    node saw (to catch a silently lost message); None: never needed."""

    def inline_for(self, retention: Retention) -> bool:
        """Whether `publish_nowait` serves publishes under `retention`: the engine
        then stores and delivers them without I/O (the memory engine always; the
        others for channels that keep no history). Fixed for the engine's life,
        so the node picks each namespace's publish path once."""
        ...

    def bind(self, sink: EventSink) -> None:
        """Set where events of subscribed channels go (before `start`)."""
        ...

    async def start(self, supervisor: Supervisor) -> None:
        """Connect, and start background work under `supervisor`."""
        ...

    async def publish(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """Store and deliver `pub` (its `offset` and `epoch` are filled in and it is returned)."""
        ...

    def publish_then(
        self,
        pub: Publication,
        retention: Retention,
        key: str | None,
        then: Callable[[Publication | Duplicate | Exception], None],
    ) -> None:
        """`publish` started now: `then` is called once, on the loop and after this
        returns, with what `publish` would return, or with what it would raise.

        For callers that only act on the outcome (a connection answering its
        pipelined publishes): no coroutine, no task and no future per message.
        Calls made one after the other are stored in that order, as with
        `publish`.
        """
        ...

    def publish_nowait(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """`publish` without suspending, where `inline_for(retention)`.

        Elsewhere it raises `NotImplementedError`.
        """
        ...

    async def publish_presence(self, event: Presence) -> None:
        """Deliver a join or leave to every node subscribed to its channel (not stored)."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Start receiving `channel`'s events; returns once they are sure to arrive."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel`'s events."""
        ...

    async def close(self) -> None:
        """Disconnect and release resources."""
        ...

    def health(self) -> Health:
        """The engine's state for `/health` (`status` down = requests fail)."""
        ...

    async def nodes(self) -> list[dict[str, Any]]:
        """`EventSink.info` of every live node sharing this engine (this one included)."""
        ...

    async def send_nodes(self, payload: bytes, node: str | None = None) -> int:
        """Deliver `payload` to the node named `node` (None: to every node sharing the
        engine, this one included), at most once, to its `EventSink.on_node_message`;
        return how many nodes it reached. Not stored: a node that is down misses it."""
        ...


class HistoryStore(Protocol):
    """The read side of channels' streams.

    Contract (checked by `tests/engines/test_history_conformance.py`):

    * `read` returns what `publish` stored, oldest first, each message with the
      offset, epoch, time, publisher and payload it was published with.
    * Retention: at most `size` newest messages (and `max_bytes` of payload)
      are kept per channel, none older than `ttl`.
    * Epoch: stable while the channel's state lives; new after it was lost
      (a memory engine restarted, the state expired or was evicted).
    * Reads never create state: an unknown channel is at offset 0 with epoch
      `""`. `position(..., create=...)` is the one way to make a channel exist
      before its first message (a subscriber needs an epoch to recover from).
    * Failure: raises `plexus.exceptions.Unavailable`.
    """

    async def position(self, channel: str, *, create: Retention | None = None) -> StreamPosition:
        """The channel's top offset and epoch; with `create`, made to exist if it does not."""
        ...

    async def positions(self, channels: Collection[str]) -> dict[str, StreamPosition]:
        """`position` of many channels at once (for the periodic check); creates nothing."""
        ...

    async def read(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        max_bytes: int | None = None,
        now: int | None = None,
    ) -> HistoryPage:
        """Return stored messages with offset > `since`, oldest first.

        Args:
            channel: channel name.
            since: only messages after this offset; None = from the oldest kept.
            limit: at most this many (the oldest ones after `since`); None = all.
            max_bytes: stop before the payloads returned exceed this many bytes
                (the page is then not `complete`); None = no limit. Bounds the
                work a client's recovery can cause.
            now: current Unix milliseconds for TTL filtering (default: wall clock).
        """
        ...

    async def start(self, supervisor: Supervisor) -> None:
        """Open, and start background work under `supervisor` (a no-op when it is the broker)."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...

    def health(self) -> Health:
        """The store's state for `/health`."""
        ...


class PresenceStore(Protocol):
    """Who is subscribed to a channel, across every node sharing the store.

    Contract (checked by `tests/engines/test_presence_conformance.py`):

    * `add` is idempotent per (channel, client) and replaces the info.
    * `remove` of an absent entry is a no-op.
    * `get` returns exactly the entries added and not removed, nor expired:
      an entry lives as long as the node that added it keeps running (stores
      shared by nodes expire a dead node's entries after their TTL).
    * Failure: raises `plexus.exceptions.Unavailable`.
    """

    async def add(self, channel: str, info: ClientInfo) -> None:
        """Record `info.client` as present in `channel`."""
        ...

    async def remove(self, channel: str, client: str) -> None:
        """Forget `client` in `channel`."""
        ...

    async def get(self, channel: str) -> dict[str, ClientInfo]:
        """Return the present clients of `channel`, keyed by client id."""
        ...

    async def start(self, supervisor: Supervisor) -> None:
        """Open, and start background work (such as refreshing this node's entries)."""
        ...

    async def close(self) -> None:
        """Release resources (a shared store forgets this node's entries)."""
        ...

    def health(self) -> Health:
        """The store's state for `/health`."""
        ...


@dataclass(slots=True)
class Engine:
    """The three parts a node works with, chosen together by `plexus.engines.make_engine`."""

    broker: Broker
    history: HistoryStore
    presence: PresenceStore
