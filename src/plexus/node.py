"""The node: wires the hub and the engine (broker, history, presence).

Every channel operation of the server goes through here, whether it comes
from a WebSocket client or the backend HTTP API. The node holds no socket; the
connections it serves are reached through the small `Peer` interface. It is
the engine's `EventSink`: events of subscribed channels come in here and go
out through the hub, which checks each channel's offsets and reports gaps
that the node repairs from history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from plexus.channels import namespace_of, personal_owner
from plexus.cluster import Cluster
from plexus.config import PERSONAL, NamespaceOptions, Settings
from plexus.decisions import Decider
from plexus.directory import Directory, Peer
from plexus.engines.base import Engine, Health, Measured, Retention
from plexus.exceptions import NotFound, PermissionDenied, PlexusError, Unauthorized
from plexus.hub import Channel, Hub, Subscription
from plexus.metrics import Metrics
from plexus.models import (
    ClientInfo,
    Duplicate,
    HistoryPage,
    Presence,
    Publication,
    StreamPosition,
)
from plexus.protocol.commands import Since
from plexus.protocol.pushes import EncodedPush
from plexus.protocol.recovery import can_recover, merge_backlog
from plexus.protocol.session import Limits
from plexus.rpc import RpcCall, RpcHandler
from plexus.supervisor import Supervisor

__all__ = ["Node", "Peer", "RpcCall", "RpcHandler", "Space", "SubscribeOutcome"]

log = logging.getLogger("plexus.node")

# Most messages one repair reads; a bigger gap is not repaired but reported
# to the channel's subscribers, who recover (or reload) by themselves.
REPAIR_LIMIT: Final = 10_000
REPAIR_BACKOFF_MAX: Final = 5.0
INSUFFICIENT_STATE: Final = "insufficient_state"


@dataclass(slots=True)
class SubscribeOutcome:
    """The reply to send and the events that must follow it, in order."""

    result: dict[str, Any]
    subscription: Subscription
    events: list[Publication | Presence]
    missed: int = 0  # how many leading `events` were recovered from history


@dataclass(slots=True, frozen=True)
class Space:
    """A namespace as the node uses it: its options, how its streams are kept,
    and whether its publishes complete without I/O (never when the
    application decides them)."""

    options: NamespaceOptions
    retention: Retention
    inline: bool


def new_node_name() -> str:
    """A node id unique across hosts, processes and restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds."""
    return int(time.time() * 1000)


class Node:
    """One Plexus server process's channel engine.

    Args:
        settings: the server's settings.
        engine: broker, history and presence, chosen together.
        supervisor: runs the node's and the engine's background tasks.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        supervisor: Supervisor | None = None,
        *,
        hooks: object = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.broker = engine.broker
        self.history = engine.history
        self.presence = engine.presence
        self.supervisor = supervisor or Supervisor()
        self.hub = Hub(on_gap=self._found_gap)
        self._spaces: dict[str, Space] = {}
        # Channels the broker delivers to this node, and the lock that orders
        # each channel's broker subscribe and unsubscribe.
        self._joined: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._repair_again: set[str] = set()
        self._unsynced_gaps: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rpc_handlers: dict[str, RpcHandler] = {}
        self.default_rpc_handler: RpcHandler | None = None
        self.started_at = time.time()
        self.name = settings.node_name or new_node_name()
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
        # The application's decisions (proxies and hooks); checked before any I/O.
        self.decider = Decider(settings, self.metrics.decisions, hooks)
        self.cluster = Cluster(self.name, self.broker, timeout=settings.redis_timeout)
        # The connections, and the server's actions on them on every node.
        self.directory = Directory(self.cluster)
        self.peers = self.directory.peers
        self.broker.bind(self)

    # ----- lifecycle

    def _parts(self) -> list[Any]:
        parts: list[Any] = []
        for part in (self.broker, self.history, self.presence):
            if all(part is not seen for seen in parts):
                parts.append(part)
        return parts

    async def start(self) -> None:
        """Start the engine and the node's background work."""
        for part in self._parts():
            await part.start(self.supervisor)
        if self.broker.check_interval:
            self.supervisor.spawn("channel-check", self._check_loop)

    async def close(self) -> None:
        """Close the engine (after the connections are gone)."""
        await self.cluster.close()
        await self.decider.close()
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        tasks = [*self._repairs.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.supervisor.close()
        for part in self._parts():
            try:
                await part.close()
            except Exception:
                log.exception("error closing %s", type(part).__name__)

    def health(self) -> dict[str, Any]:
        """Each component's state; `status` is degraded when any is not ok."""
        components: dict[str, Health] = {
            "tasks": self.supervisor.health(),
            "broker": self.broker.health(),
            "history": self.history.health(),
            "presence": self.presence.health(),
        }
        down = any(part["status"] == "down" for part in components.values())
        degraded = any(part["status"] != "ok" for part in components.values())
        return {
            "status": "degraded" if degraded else "ok",
            "ready": not down,
            "components": components,
        }

    # ----- namespaces and permissions

    def space(self, channel: str) -> Space:
        """The namespace `channel` is in, as the node uses it (`#USER` channels: `personal`)."""
        if channel[:1] == PERSONAL and personal_owner(channel) is not None:
            name = PERSONAL
        else:
            name = namespace_of(channel)
            if name not in self.settings.namespaces:
                name = ""  # unknown namespaces use (and count against) the default's options
        space = self._spaces.get(name)
        if space is None:
            options = self.settings.personal if name == PERSONAL else self.settings.namespace(name)
            retention = Retention(
                size=options.history_size,
                ttl=options.history_ttl,
                max_bytes=options.history_max_bytes,
                max_channels=options.max_channels,
                namespace=name,
            )
            inline = self.broker.inline_for(retention) and not options.proxy_publish
            space = Space(options, retention, inline)
            self._spaces[name] = space
        return space

    def namespace(self, channel: str) -> NamespaceOptions:
        """The options that apply to `channel`."""
        return self.space(channel).options

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
        if not options.allow_publish and not options.proxy_publish:
            # With proxy_publish the application's yes is the permission.
            raise PermissionDenied(f"clients may not publish to {channel}")
        return options

    # ----- publishing

    def publish_nowait(
        self,
        channel: str,
        data: Any,
        *,
        raw: bytes | None = None,
        client: str | None = None,
        user: str | None = None,
        key: str | None = None,
    ) -> Publication | Duplicate:
        """Publish to a channel whose namespace is `inline` (see `Space`): stored and
        fanned out before this returns.

        `raw` is `data` already encoded (see `Publication`); it is encoded here
        when not given. Raises `PlexusError` subclasses (`Unavailable`, ...).
        """
        space = self.space(channel)
        started = time.perf_counter()
        pub = Publication(channel, data, 0, "", now_ms(), client, user, raw=raw)
        result = self.broker.publish_nowait(pub, space.retention, key)
        self._published(started)
        return result

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        raw: bytes | None = None,
        client: str | None = None,
        user: str | None = None,
        key: str | None = None,
    ) -> Publication | Duplicate:
        """Store `data` as the channel's next message and deliver it to every node.

        Returns once the message is stored (as durably as the engine promises)
        and on its way to every subscriber, so an acknowledged message is never
        lost; a `Duplicate` when `key` was used in the channel recently.
        """
        space = self.space(channel)
        if space.inline:
            return self.publish_nowait(channel, data, raw=raw, client=client, user=user, key=key)
        started = time.perf_counter()
        pub = Publication(channel, data, 0, "", now_ms(), client, user, raw=raw)
        result = await self.broker.publish(pub, space.retention, key)
        self._published(started)
        return result

    def publish_then(
        self,
        channel: str,
        data: Any,
        *,
        raw: bytes | None = None,
        client: str | None = None,
        user: str | None = None,
        key: str | None = None,
        then: Callable[[Publication | Duplicate | Exception], None],
    ) -> None:
        """`publish`, started now: `then` is called on the loop, after this returns,
        with what `publish` would return or raise (see `Broker.publish_then`).

        For a caller that only acts on the outcome (a connection answering its
        pipelined publishes): no coroutine, no task and no future per message.
        Calls made one after the other are stored in call order.
        """
        space = self.space(channel)
        started = time.perf_counter()
        pub = Publication(channel, data, 0, "", now_ms(), client, user, raw=raw)

        def done(outcome: Publication | Duplicate | Exception) -> None:
            if not isinstance(outcome, Exception):
                self._published(started)
            then(outcome)

        self.broker.publish_then(pub, space.retention, key, done)

    def _published(self, started: float) -> None:
        self.counters.published += 1
        self.metrics.publish_latency.observe(time.perf_counter() - started)

    # ----- the engine's EventSink

    def on_publication(self, pub: Publication) -> None:
        """A message of a subscribed channel arrived from the broker."""
        self.counters.deliveries += self.hub.dispatch(pub)

    def on_presence(self, event: Presence) -> None:
        """A join or leave of a subscribed channel arrived from the broker."""
        self.counters.deliveries += self.hub.dispatch(event)

    def on_gapped(self, channels: Collection[str]) -> None:
        """The broker may have lost messages of `channels`: repair each from history."""
        for name in channels:
            channel = self.hub.channel(name)
            if channel is None:
                continue
            self.counters.gaps += 1
            if channel.epoch is None:
                self._unsynced_gaps.add(name)  # repaired once its position is known
            elif channel.held is None:
                channel.held = []
                self._gap(channel)
            else:
                self._gap(channel)

    def on_node_message(self, payload: bytes) -> None:
        """Another node (or this one) asks this node to act on its connections."""
        self.cluster.on_message(payload)

    # ----- repairs

    def _found_gap(self, channel: Channel) -> None:
        """The hub saw a channel's offsets jump or its epoch change: count it, repair it."""
        self.counters.gaps += 1
        self._gap(channel)

    def _gap(self, channel: Channel) -> None:
        name = channel.name
        if name in self._repairs:
            self._repair_again.add(name)
            return
        task = asyncio.get_running_loop().create_task(self._repair(name), name=f"repair {name}")
        self._repairs[name] = task
        task.add_done_callback(lambda _: self._repairs.pop(name, None))

    async def _repair(self, name: str) -> None:
        """Read what a gapped channel missed and deliver it, or send its subscribers
        `insufficient_state` when history no longer has it."""
        backoff = 0.05
        while True:
            channel = self.hub.channel(name)
            if channel is None or channel.held is None or channel.epoch is None:
                return
            self._repair_again.discard(name)
            since, epoch = channel.last, channel.epoch
            try:
                page = await self.history.read(name, since=since, limit=REPAIR_LIMIT)
            except PlexusError as exc:
                log.warning("repair of %s failed (%s); retrying", name, exc.message)
                await asyncio.sleep(backoff)  # the engine is down: held events stay bounded
                backoff = min(backoff * 2, REPAIR_BACKOFF_MAX)
                continue
            except Exception:
                log.exception("repair of %s failed", name)
                await asyncio.sleep(REPAIR_BACKOFF_MAX)
                continue
            channel = self.hub.channel(name)
            if channel is None or channel.held is None:
                return
            position = page.position
            if position.epoch == epoch and page.complete:
                self.counters.repaired += len(page.publications)
                self.hub.resume(channel, page.publications)
            else:
                self._rebase(channel, position)
            if name not in self._repair_again:
                return
            if channel.held is None:
                channel.held = []

    def _rebase(self, channel: Channel, position: StreamPosition) -> None:
        stale = self.hub.rebase(channel, position)
        if not stale:
            return
        log.info(
            "channel %s cannot be repaired: %d subscribers resubscribe", channel.name, len(stale)
        )
        self.counters.insufficient_state += len(stale)
        for sub in stale:
            peer: Peer = sub.conn  # type: ignore[assignment]  # the node's subscribers are peers
            self._spawn(peer.end_subscription(channel.name, INSUFFICIENT_STATE, resubscribe=True))

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("background work of the node failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_loop(self) -> None:
        """Compare subscribed channels' tops with what this node delivered (catches a
        message lost without any other sign)."""
        interval = self.broker.check_interval
        assert interval is not None
        while True:
            await asyncio.sleep(interval)
            synced = [c.name for c in self.hub.tracked() if c.epoch is not None and c.held is None]
            if not synced:
                continue
            positions = await self.history.positions(synced)
            for name, position in positions.items():
                channel = self.hub.channel(name)
                if channel is None or channel.held is not None or channel.epoch is None:
                    continue
                if position.epoch != channel.epoch or position.offset > channel.last:
                    self.on_gapped([name])

    # ----- subscriptions

    async def _join(self, channel: str, retention: Retention) -> None:
        """Make sure the broker delivers `channel` here and the hub knows its position."""
        lingering = self._lingering.pop(channel, None)
        if lingering is not None:
            lingering.cancel()
        tracked = self.hub.channel(channel)
        if channel in self._joined and tracked is not None and tracked.epoch is not None:
            return
        lock = self._locks.setdefault(channel, asyncio.Lock())
        async with lock:
            if channel not in self._joined:
                await self.broker.subscribe(channel)
                self._joined.add(channel)
            tracked = self.hub.channel(channel)
            if tracked is not None and tracked.epoch is None:
                # Read after the broker confirmed the subscription: every later
                # message reaches this node, every earlier one is <= this.
                position = await self.history.position(channel, create=retention)
                self.hub.sync(channel, position)
                if channel in self._unsynced_gaps:
                    self._unsynced_gaps.discard(channel)
                    self.on_gapped([channel])

    async def _leave(self, channel: str) -> None:
        """The last local subscriber of `channel` left: stop receiving it (after a linger)."""
        linger = self.broker.unsubscribe_linger
        if linger > 0:
            if channel not in self._lingering:
                loop = asyncio.get_running_loop()
                self._lingering[channel] = loop.call_later(
                    linger, lambda: self._spawn(self._leave_now(channel))
                )
            return
        await self._leave_now(channel)

    async def _leave_now(self, channel: str) -> None:
        self._lingering.pop(channel, None)
        lock = self._locks.setdefault(channel, asyncio.Lock())
        async with lock:
            if self.hub.has_channel(channel):
                return  # someone subscribed again meanwhile
            self.hub.drop(channel)
            self._unsynced_gaps.discard(channel)
            if channel in self._joined:
                self._joined.discard(channel)
                try:
                    await self.broker.unsubscribe(channel)
                except PlexusError:
                    log.warning("broker unsubscribe of %s failed", channel)
        if not lock.locked() and self.hub.channel(channel) is None:
            self._locks.pop(channel, None)

    async def subscribe(
        self,
        peer: Peer,
        channel: str,
        *,
        since: Since | None,
        info: Any,
        recovery_budget: int | None = None,
    ) -> SubscribeOutcome:
        """Subscribe `peer` (permissions already checked) and compute what it must receive.

        The caller sends `result` as the reply, then `events`, then sets
        `subscription.backlog = None`, with no await in between: that is what
        makes the reply come first and the stream have no gap nor duplicate.
        `recovery_budget` bounds the payload bytes a recovery may read (what
        the client's output buffer can take): beyond it, `recovered` is false.
        """
        space = self.space(channel)
        options, retention = space.options, space.retention
        sub = Subscription(peer, channel, info)
        self.hub.add(sub)
        present = False
        try:
            await self._join(channel, retention)
            recovered = False
            missed: list[Publication] = []
            position: StreamPosition | None = None
            if since is not None and options.recovery:
                page = await self.history.read(
                    channel, since=since.offset, max_bytes=recovery_budget
                )
                if page.position.epoch:
                    position = page.position
                    if can_recover(since, page):
                        recovered = True
                        missed = page.publications
            if position is None:
                position = await self.history.position(channel, create=retention)
            if options.presence or options.join_leave:
                me = ClientInfo(peer.client_id, peer.user, info)
                if options.presence:
                    await self.presence.add(channel, me)
                    present = True
                if options.join_leave:
                    await self.broker.publish_presence(Presence("join", channel, me))
        except BaseException:
            last = self.hub.remove(sub)
            if present:
                # The client is told the subscribe failed: it must not stay listed.
                try:
                    await self.presence.remove(channel, peer.client_id)
                except PlexusError:
                    log.warning("presence cleanup of %s in %s failed", peer.client_id, channel)
            if last:
                await self._leave(channel)
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

    async def watch(self, sub: Subscription) -> None:
        """Add an internal subscriber (the admin page's tail of a channel).

        It receives the channel's live messages and join/leave events from
        every node, like a client's subscription, but it is nobody in
        presence, announces no join, and recovers nothing: it gets what is
        fanned out here from the moment it is added.
        """
        channel = sub.channel
        self.hub.add(sub)
        try:
            await self._join(channel, self.space(channel).retention)
        except BaseException:
            if self.hub.remove(sub):
                await self._leave(channel)
            raise
        backlog, sub.backlog = sub.backlog or [], None
        for event in backlog:  # fanned out while the join was under way
            if isinstance(event, Publication):
                sub.floor = max(sub.floor, event.offset)
            sub.push(EncodedPush(event).frame(sub.format_index))

    async def unwatch(self, sub: Subscription) -> None:
        """Remove a subscriber added by `watch`."""
        if self.hub.remove(sub):
            await self._leave(sub.channel)

    async def unsubscribe(self, sub: Subscription) -> None:
        """End `sub`: remove it locally, from presence, and announce the leave."""
        last = self.hub.remove(sub)
        channel = sub.channel
        options = self.namespace(channel)
        peer = sub.conn
        try:
            if options.presence:
                await self.presence.remove(channel, peer.client_id)
            if options.join_leave:
                await self.broker.publish_presence(
                    Presence("leave", channel, ClientInfo(peer.client_id, peer.user, sub.info))
                )
        except PlexusError:
            log.warning("presence cleanup of %s in %s failed", peer.client_id, channel)
        finally:
            if last:
                await self._leave(channel)

    # ----- reads

    async def history_page(
        self, channel: str, *, since: Since | None, limit: int, max_bytes: int | None = None
    ) -> tuple[HistoryPage, bool]:
        """Read history; the flag says whether `since` (if given) is still recoverable."""
        page = await self.history.read(
            channel, since=since.offset if since else None, limit=limit, max_bytes=max_bytes
        )
        return page, (can_recover(since, page) if since is not None else page.complete)

    async def position(self, channel: str) -> StreamPosition:
        """The channel's top offset and epoch (`(0, "")` when it has no stream)."""
        return await self.history.position(channel)

    async def presence_of(self, channel: str) -> dict[str, ClientInfo]:
        """Present clients of `channel` (across nodes sharing the presence store)."""
        return await self.presence.get(channel)

    def has_rpc_handler(self, method: str) -> bool:
        """Whether a Python handler (or the default one) answers `method`."""
        return method in self.rpc_handlers or self.default_rpc_handler is not None

    async def call_rpc(self, call: RpcCall) -> Any:
        """Run the application's handler for `call.method`."""
        handler = self.rpc_handlers.get(call.method, self.default_rpc_handler)
        if handler is None:
            raise NotFound(f"no handler for rpc method {call.method!r}")
        return await handler(call)

    # ----- counters

    def _gauges(self) -> dict[str, int]:
        return {
            "connections": len(self.peers),
            "subscriptions": self.hub.subscriber_count(),
            "channels": len(self.hub.channels()),
            "repairs_running": len(self._repairs),
        }

    def info(self) -> dict[str, Any]:
        """This node's id and counters (what the registry of nodes shows)."""
        from plexus import __version__

        counters = self.counters
        return {
            "node": self.name,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": round(self.started_at, 3),
            "uptime": round(time.time() - self.started_at, 3),
            "connections": len(self.peers),
            "subscriptions": self.hub.subscriber_count(),
            "channels": len(self.hub.channels()),
            "commands": counters.commands,
            "published": counters.published,
            "deliveries": counters.deliveries,
            "slow_consumers": counters.slow_consumers,
            "status": self.health()["status"],
        }

    async def nodes(self) -> list[dict[str, Any]]:
        """Every live node sharing this node's engine (this one from fresh counters)."""
        others = [n for n in await self.broker.nodes() if n.get("node") != self.name]
        return sorted([self.info(), *others], key=lambda n: str(n.get("node")))

    def stats(self) -> dict[str, Any]:
        """Counters for /health and /api/info."""
        return {
            "connections": len(self.peers),
            "users": self.directory.users,
            "channels": len(self.hub.channels()),
            "subscriptions": self.hub.subscriber_count(),
            "uptime": round(time.time() - self.started_at, 3),
        }

    def state_size(self) -> dict[str, int]:
        """How many entries the node's own maps hold (for tests and the soak benchmark)."""
        return {
            "peers": len(self.peers),
            "users": self.directory.users,
            "hub_channels": len(self.hub.tracked()),
            "joined": len(self._joined),
            "locks": len(self._locks),
            "lingering": len(self._lingering),
            "repairs": len(self._repairs),
            "repair_again": len(self._repair_again),
            "unsynced_gaps": len(self._unsynced_gaps),
            "tasks": len(self._tasks),
        }

    def engine_state(self) -> dict[str, int]:
        """How many entries the engine's parts hold in memory (those that tell: see `Measured`)."""
        sizes: dict[str, int] = {}
        for part in self._parts():
            if isinstance(part, Measured):
                sizes.update(part.state_size())
        return sizes
