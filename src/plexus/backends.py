"""Choose the broker, history and presence implementations the settings ask for.

Imports are lazy so that a single-process server never imports redis.
"""

from __future__ import annotations

from pathlib import Path

from plexus.brokers.base import Broker
from plexus.config import Settings
from plexus.history.base import HistoryStore
from plexus.presence.base import PresenceStore


def make_history(settings: Settings) -> HistoryStore:
    """The history store named by `settings.history_backend`."""
    if settings.history_backend == "sqlite":
        from plexus.history.sqlite import SqliteHistoryStore

        return SqliteHistoryStore(Path(settings.data_dir))
    if settings.history_backend == "redis":
        from plexus.history.redis import RedisHistoryStore  # type: ignore[import-not-found]

        store: HistoryStore = RedisHistoryStore(settings.redis_url)
        return store
    from plexus.history.memory import MemoryHistoryStore

    return MemoryHistoryStore()


def make_presence(settings: Settings) -> PresenceStore:
    """The presence store named by `settings.presence_backend`."""
    if settings.presence_backend == "redis":
        from plexus.presence.redis import RedisPresenceStore  # type: ignore[import-not-found]

        store: PresenceStore = RedisPresenceStore(settings.redis_url)
        return store
    from plexus.presence.memory import MemoryPresenceStore

    return MemoryPresenceStore()


def make_broker(settings: Settings) -> Broker:
    """The broker named by `settings.broker`."""
    if settings.broker == "redis":
        from plexus.brokers.redis import RedisBroker  # type: ignore[import-not-found]

        broker: Broker = RedisBroker(settings.redis_url)
        return broker
    from plexus.brokers.memory import MemoryBroker

    return MemoryBroker()
