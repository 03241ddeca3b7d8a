"""Presence in Redis: shared by every node, and a dead node's clients vanish by themselves.

Each entry is refreshed by the node that added it every `refresh` seconds
and expires `ttl` seconds after its last refresh (Redis 7.0 has no per-field
hash expiry: a sorted set beside the hash holds each entry's expiry, and
reads drop what expired). A node killed without a goodbye stops refreshing,
so its clients leave presence within `ttl`; they never produce `leave`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from redis.exceptions import RedisError

from plexus.engines.base import Health
from plexus.engines.redis.broker import RedisBroker
from plexus.engines.redis.wire import as_text, client_info, presence_entry
from plexus.models import ClientInfo
from plexus.supervisor import Supervisor, cancelling

log = logging.getLogger("plexus.redis")

REFRESH_BATCH: Final = 1000


class RedisPresenceStore:
    """Presence on the servers of a `RedisBroker`; see `plexus.engines.base.PresenceStore`.

    Args:
        broker: the engine's broker (its servers, keys and error accounting).
        ttl: seconds an entry lives after its node's last refresh.
        refresh: seconds between refreshes of this node's entries (default: 25, or
            less when `ttl` is short).
    """

    def __init__(
        self, broker: RedisBroker, *, ttl: float = 60.0, refresh: float | None = None
    ) -> None:
        self.broker = broker
        self.keys = broker.keys
        self.ttl_ms = round(ttl * 1000)
        # Twice per TTL at least, so one late refresh does not expire anyone.
        self.refresh = refresh if refresh is not None else min(25.0, ttl * 0.4)
        # What this node added: it refreshes exactly these.
        self._mine: dict[str, dict[str, ClientInfo]] = {}

    async def start(self, supervisor: Supervisor) -> None:
        """Start refreshing this node's entries."""
        supervisor.spawn("redis-presence-refresh", self._refresh_loop)

    async def close(self) -> None:
        """Remove this node's entries (a graceful stop: its clients leave at once)."""
        mine, self._mine = self._mine, {}
        for channel, clients in mine.items():
            for client in clients:
                try:
                    await self._remove(channel, client)
                except RedisError:
                    return  # they expire by themselves

    def health(self) -> Health:
        """Presence shares the broker's servers."""
        return {
            "status": self.broker.health()["status"],
            "entries": sum(len(clients) for clients in self._mine.values()),
        }

    async def add(self, channel: str, info: ClientInfo) -> None:
        """Record `info.client` as present in `channel`."""
        shard = self.broker.shard(channel)
        expires = time.time() * 1000 + self.ttl_ms
        try:
            async with shard.client.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.presence(channel), info.client, presence_entry(info))
                pipe.zadd(self.keys.presence_expiry(channel), {info.client: expires})
                pipe.pexpire(self.keys.presence(channel), self.ttl_ms * 2)
                pipe.pexpire(self.keys.presence_expiry(channel), self.ttl_ms * 2)
                await pipe.execute()
        except RedisError as exc:
            raise self.broker._failed(shard, exc) from None
        self._mine.setdefault(channel, {})[info.client] = info

    async def remove(self, channel: str, client: str) -> None:
        """Forget `client` in `channel`."""
        clients = self._mine.get(channel)
        if clients is not None:
            clients.pop(client, None)
            if not clients:
                del self._mine[channel]
        try:
            await self._remove(channel, client)
        except RedisError as exc:
            raise self.broker._failed(self.broker.shard(channel), exc) from None

    async def _remove(self, channel: str, client: str) -> None:
        shard = self.broker.shard(channel)
        async with shard.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.presence(channel), client)
            pipe.zrem(self.keys.presence_expiry(channel), client)
            await pipe.execute()

    async def get(self, channel: str) -> dict[str, ClientInfo]:
        """The present clients of `channel`, expired entries dropped."""
        shard = self.broker.shard(channel)
        try:
            flat = await shard.script("presence_get")(
                keys=[self.keys.presence(channel), self.keys.presence_expiry(channel)],
                args=[int(time.time() * 1000)],
            )
        except RedisError as exc:
            raise self.broker._failed(shard, exc) from None
        present: dict[str, ClientInfo] = {}
        for index in range(0, len(flat), 2):
            client = as_text(flat[index])
            present[client] = client_info(client, flat[index + 1])
        return present

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            try:
                await self.refresh_now()
            except RedisError as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                log.warning("redis: presence refresh failed: %s", exc)

    async def refresh_now(self) -> None:
        """Push back the expiry of every entry this node added (batched per server)."""
        by_shard: dict[int, list[tuple[str, str]]] = {}
        for channel, clients in self._mine.items():
            index = self.broker.shard(channel).index
            by_shard.setdefault(index, []).extend((channel, client) for client in clients)
        expires = time.time() * 1000 + self.ttl_ms
        for index, entries in by_shard.items():
            shard = self.broker.shards[index]
            for start in range(0, len(entries), REFRESH_BATCH):
                async with shard.client.pipeline(transaction=False) as pipe:
                    channels: set[str] = set()
                    for channel, client in entries[start : start + REFRESH_BATCH]:
                        pipe.zadd(self.keys.presence_expiry(channel), {client: expires}, xx=True)
                        channels.add(channel)
                    for channel in channels:
                        pipe.pexpire(self.keys.presence(channel), self.ttl_ms * 2)
                        pipe.pexpire(self.keys.presence_expiry(channel), self.ttl_ms * 2)
                    await pipe.execute()
