"""The node: wires the hub, the broker, the history and presence stores.

Every channel operation of the server goes through here, whether it comes
from a WebSocket client or the backend HTTP API. The node holds no socket; the
connections it serves are reached through the small `Peer` interface.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from plexus.brokers.base import Broker, Event
from plexus.channels import namespace_of, personal_owner
from plexus.config import NamespaceOptions, Settings
from plexus.exceptions import NotFound, PermissionDenied, PlexusError, Unauthorized
from plexus.history.base import HistoryStore
from plexus.hub import Hub, Subscriber, Subscription
from plexus.metrics import Metrics
from plexus.models import ClientInfo, HistoryPage, Presence, Publication, StreamPosition
from plexus.presence.base import PresenceStore
from plexus.protocol.codes import CloseCode
from plexus.protocol.commands import Since
from plexus.protocol.recovery import can_recover, merge_backlog
from plexus.protocol.session import Limits

log = logging.getLogger("plexus.node")


class Peer(Subscriber, Protocol):
    """A connected client as the node sees it."""

    def close(self, code: CloseCode, reason: str) -> None: ...

    async def end_subscription(self, channel: str, reason: str) -> bool:
        """End the subscription to `channel` on the server's initiative; False if there was none."""
        ...


@dataclass(slots=True, frozen=True)
class RpcCall:
    """An `rpc` command as an application handler receives it."""

    method: str
    data: Any
    client: str
    user: str | None


RpcHandler = Callable[[RpcCall], Awaitable[Any]]


@dataclass(slots=True)
class SubscribeOutcome:
    """The reply to send and the events that must follow it, in order."""

    result: dict[str, Any]
    subscription: Subscription
    events: list[Publication | Presence]
    missed: int = 0  # how many leading `events` were recovered from history


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds."""
    return int(time.time() * 1000)


class Node:
    """One Plexus server process's channel engine."""

    def __init__(
        self,
        settings: Settings,
        *,
        broker: Broker,
        history: HistoryStore,
        presence: PresenceStore,
    ) -> None:
        self.settings = settings
        self.hub = Hub()
        self.broker = broker
        self.history = history
        self.presence = presence
        self.peers: dict[str, Peer] = {}
        self._users: dict[str, set[Peer]] = {}
        self._broker_channels: set[str] = set()
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self.rpc_handlers: dict[str, RpcHandler] = {}
        self.default_rpc_handler: RpcHandler | None = None
        self.started_at = time.time()
        # One immutable copy shared by every connection's session state.
        self.limits = Limits(
            max_info_bytes=settings.max_info_bytes,
            bad_command_limit=settings.bad_command_limit,
            bad_command_window=settings.bad_command_window,
            publish_rate=settings.publish_rate,
            publish_burst=settings.publish_burst,
            subscribe_rate=settings.subscribe_rate,
            subscribe_burst=settings.subscribe_burst,
            rate_limit_disconnect=settings.rate_limit_disconnect,
        )
        self.metrics = Metrics(self._gauges)
        self.counters = self.metrics.counters
        broker.set_handler(self._on_event)

    # ----- lifecycle

    async def start(self) -> None:
        """Start the broker and the stores."""
        for part in (self.broker, self.history, self.presence):
            start = getattr(part, "start", None)
            if start is not None:
                await start()

    async def close(self) -> None:
        """Close the broker and the stores (after the connections are gone)."""
        for part in (self.broker, self.history, self.presence):
            try:
                await part.close()
            except Exception:
                log.exception("error closing %s", type(part).__name__)

    # ----- peers

    def add_peer(self, peer: Peer) -> None:
        """Register a connected client."""
        self.peers[peer.client_id] = peer
        if peer.user is not None:
            self._users.setdefault(peer.user, set()).add(peer)

    def remove_peer(self, peer: Peer) -> None:
        """Forget a client (its subscriptions are ended separately)."""
        self.peers.pop(peer.client_id, None)
        if peer.user is not None:
            peers = self._users.get(peer.user)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del self._users[peer.user]

    def change_user(self, peer: Peer, old: str | None) -> None:
        """Move `peer` in the user index after re-authentication."""
        if old is not None:
            peers = self._users.get(old)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del self._users[old]
        if peer.user is not None:
            self._users.setdefault(peer.user, set()).add(peer)

    def disconnect_user(self, user: str, reason: str = "disconnected by the server") -> int:
        """Close every connection of `user` with 4001; return how many."""
        peers = list(self._users.get(user, ()))
        for peer in peers:
            peer.close(CloseCode.UNAUTHORIZED, reason)
        return len(peers)

    async def unsubscribe_server(
        self,
        channel: str,
        *,
        user: str | None = None,
        client: str | None = None,
        reason: str = "unsubscribed by the server",
    ) -> int:
        """End the subscriptions to `channel` of `user`'s connections, or of connection `client`.

        Exactly one of `user` and `client` is given. Each subscription ends
        exactly as the client's own `unsubscribe` command ends it (presence
        forgets it, the other subscribers get its `leave`), then its connection
        gets the `unsubscribed` push, queued after whatever was already waiting
        for it. The connection stays open and may subscribe again. Only this
        node's connections are reached; one that is closing or not subscribed
        to `channel` is skipped.

        Returns:
            How many subscriptions ended.
        """
        if (user is None) == (client is None):
            raise ValueError("give exactly one of user and client")
        if user is not None:
            peers = list(self._users.get(user, ()))
        elif client in self.peers:
            peers = [self.peers[client]]
        else:
            peers = []
        ended = 0
        for peer in peers:
            if await peer.end_subscription(channel, reason):
                ended += 1
        return ended

    # ----- permissions

    def namespace(self, channel: str) -> NamespaceOptions:
        """The options that apply to `channel`."""
        return self.settings.namespace(namespace_of(channel))

    def check_read(self, user: str | None, channel: str) -> NamespaceOptions:
        """Raise unless `user` may subscribe to (or read) `channel`; return its options."""
        options = self.namespace(channel)
        owner = personal_owner(channel)
        if owner is not None:
            if user is None:
                raise Unauthorized(f"personal channel {channel} needs an authenticated user")
            if user != owner:
                raise PermissionDenied(f"{channel} is the personal channel of another user")
            return options
        if user is None and not options.anonymous:
            raise Unauthorized(f"channel {channel} needs an authenticated user")
        if not options.allow_subscribe:
            raise PermissionDenied(f"subscribing to {channel} is not allowed")
        return options

    def check_publish(self, user: str | None, channel: str) -> NamespaceOptions:
        """Raise unless a client of `user` may publish to `channel`."""
        options = self.namespace(channel)
        if personal_owner(channel) is not None:
            raise PermissionDenied("only the server publishes to personal channels")
        if user is None and not options.anonymous:
            raise Unauthorized(f"publishing to {channel} needs an authenticated user")
        if not options.allow_publish:
            raise PermissionDenied(f"clients may not publish to {channel}")
        return options

    # ----- channel operations

    async def publish(
        self, channel: str, data: Any, *, client: str | None = None, user: str | None = None
    ) -> Publication:
        """Store `data` as the channel's next message, then fan it out.

        Returns once the message is stored (as durably as the history store
        promises), so an acknowledged message is never lost.
        """
        done = self.publish_nowait(channel, data, client=client, user=user)
        if done is not None:
            return done
        options = self.namespace(channel)
        started = time.perf_counter()
        pub = await self.history.append(
            channel,
            data,
            time=now_ms(),
            client=client,
            user=user,
            size=options.history_size,
            ttl=options.history_ttl,
        )
        stored = time.perf_counter()
        await self.broker.publish(pub)
        self._published(started, stored)
        return pub

    def publish_nowait(
        self, channel: str, data: Any, *, client: str | None = None, user: str | None = None
    ) -> Publication | None:
        """`publish` without suspending, or None (and nothing done) if a store needs I/O.

        With the in-process broker and memory history a publish never waits,
        and a client's publish is answered without a task.
        """
        if not self.broker.inline:
            return None
        options = self.namespace(channel)
        started = time.perf_counter()
        pub = self.history.append_nowait(
            channel,
            data,
            time=now_ms(),
            client=client,
            user=user,
            size=options.history_size,
            ttl=options.history_ttl,
        )
        if pub is None:
            return None
        stored = time.perf_counter()
        self.broker.publish_nowait(pub)
        self._published(started, stored)
        return pub

    def _published(self, started: float, stored: float) -> None:
        self.counters.published += 1
        self.metrics.history_latency.observe(stored - started)
        self.metrics.publish_latency.observe(time.perf_counter() - started)

    def _on_event(self, event: Event) -> None:
        self.counters.deliveries += self.hub.dispatch(event)

    def _gauges(self) -> dict[str, int]:
        return {
            "connections": len(self.peers),
            "subscriptions": self.hub.subscriber_count(),
            "channels": len(self.hub.channels()),
        }

    async def _broker_join(self, channel: str) -> None:
        if channel in self._broker_channels:
            lock = self._channel_locks.get(channel)
            if lock is None or not lock.locked():
                return
        lock = self._channel_locks.setdefault(channel, asyncio.Lock())
        async with lock:
            if channel not in self._broker_channels:
                await self.broker.subscribe(channel)
                self._broker_channels.add(channel)

    async def _broker_leave(self, channel: str) -> None:
        lock = self._channel_locks.setdefault(channel, asyncio.Lock())
        async with lock:
            if channel in self._broker_channels and not self.hub.has_channel(channel):
                self._broker_channels.discard(channel)
                try:
                    await self.broker.unsubscribe(channel)
                except PlexusError:
                    log.warning("broker unsubscribe of %s failed", channel)
        if not lock.locked() and not self.hub.has_channel(channel):
            self._channel_locks.pop(channel, None)

    async def subscribe(
        self, peer: Peer, channel: str, *, since: Since | None, info: Any
    ) -> SubscribeOutcome:
        """Subscribe `peer` (permissions already checked) and compute what it must receive.

        The caller sends `result` as the reply, then `events`, then sets
        `subscription.backlog = None`, with no await in between: that is what
        makes the reply come first and the stream have no gap nor duplicate.
        """
        options = self.namespace(channel)
        sub = Subscription(peer, channel, info)
        self.hub.add(sub)
        present = False
        try:
            await self._broker_join(channel)
            recovered = False
            missed: list[Publication] = []
            if since is not None and options.recovery:
                page = await self.history.read(channel, since=since.offset)
                position = page.position
                if can_recover(since, page):
                    recovered = True
                    missed = page.publications
            else:
                position = await self.history.position(channel)
            if options.presence or options.join_leave:
                me = ClientInfo(peer.client_id, peer.user, info)
                if options.presence:
                    await self.presence.add(channel, me)
                    present = True
                if options.join_leave:
                    await self.broker.publish(Presence("join", channel, me))
        except BaseException:
            self.hub.remove(sub)
            if present:
                # The client is told the subscribe failed: it must not stay listed.
                try:
                    await self.presence.remove(channel, peer.client_id)
                except PlexusError:
                    log.warning("presence cleanup of %s in %s failed", peer.client_id, channel)
            if not self.hub.has_channel(channel):
                await self._broker_leave(channel)
            raise
        backlog = sub.backlog or []
        events: list[Publication | Presence] = list(missed)
        events.extend(merge_backlog(position.offset, position.epoch, backlog, peer.client_id))
        result = {
            "channel": channel,
            "offset": position.offset,
            "epoch": position.epoch,
            "recovered": recovered,
        }
        return SubscribeOutcome(result, sub, events, len(missed))

    async def unsubscribe(self, sub: Subscription) -> None:
        """End `sub`: remove it locally, from presence, and announce the leave."""
        self.hub.remove(sub)
        channel = sub.channel
        options = self.namespace(channel)
        peer = sub.conn
        try:
            if options.presence:
                await self.presence.remove(channel, peer.client_id)
            if options.join_leave:
                await self.broker.publish(
                    Presence("leave", channel, ClientInfo(peer.client_id, peer.user, sub.info))
                )
        except PlexusError:
            log.warning("presence cleanup of %s in %s failed", peer.client_id, channel)
        finally:
            if not self.hub.has_channel(channel):
                await self._broker_leave(channel)

    async def history_page(
        self, channel: str, *, since: Since | None, limit: int
    ) -> tuple[HistoryPage, bool]:
        """Read history; the flag says whether `since` (if given) is still recoverable."""
        page = await self.history.read(channel, since=since.offset if since else None, limit=limit)
        return page, (can_recover(since, page) if since is not None else page.complete)

    async def position(self, channel: str) -> StreamPosition:
        """The channel's top offset and epoch."""
        return await self.history.position(channel)

    async def presence_of(self, channel: str) -> dict[str, ClientInfo]:
        """Present clients of `channel` (across nodes sharing the presence store)."""
        return await self.presence.get(channel)

    async def call_rpc(self, call: RpcCall) -> Any:
        """Run the application's handler for `call.method`."""
        handler = self.rpc_handlers.get(call.method, self.default_rpc_handler)
        if handler is None:
            raise NotFound(f"no handler for rpc method {call.method!r}")
        return await handler(call)

    def stats(self) -> dict[str, Any]:
        """Counters for /health and /api/info."""
        return {
            "connections": len(self.peers),
            "users": len(self._users),
            "channels": len(self.hub.channels()),
            "subscriptions": self.hub.subscriber_count(),
            "uptime": round(time.time() - self.started_at, 3),
        }
