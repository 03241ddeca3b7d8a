"""The Redis engine: many processes and machines share channels, history and presence.

See `broker.py` (offsets, history, fan-out between nodes), `pubsub.py` (the
connections that never go deaf silently), `presence.py`, `scripts.py` (the
atomic steps) and `wire.py` (key names and payloads). Needs the `redis`
extra: `pip install 'plexus[redis]'`.
"""

from __future__ import annotations

from plexus.config import Settings
from plexus.engines.base import Engine


def make_redis_engine(settings: Settings) -> Engine:
    """The Redis engine for `settings`."""
    from plexus.engines.redis.broker import RedisBroker
    from plexus.engines.redis.presence import RedisPresenceStore

    broker = RedisBroker(
        settings.redis_urls(),
        prefix=settings.redis_prefix,
        timeout=settings.redis_timeout,
        idempotency_ttl=settings.idempotency_ttl,
        grace=settings.channel_grace,
        probe_interval=settings.redis_probe_interval,
    )
    presence = RedisPresenceStore(broker, ttl=settings.presence_ttl)
    return Engine(broker, broker, presence)
