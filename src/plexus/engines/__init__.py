"""Engines: where channels' streams live and how their events reach every node.

`make_engine` builds the one the settings name. Imports are lazy: a server
imports only the implementation it uses (the Redis client is not loaded by a
single-process server).
"""

from __future__ import annotations

from pathlib import Path

from plexus.config import Settings
from plexus.engines.base import Engine


def make_engine(settings: Settings) -> Engine:
    """The engine `settings` name (already validated to be a coherent one)."""
    if settings.broker == "redis":
        from plexus.engines.redis import make_redis_engine

        return make_redis_engine(settings)
    from plexus.engines.memory import MemoryBroker, MemoryPresenceStore

    presence = MemoryPresenceStore()
    if settings.history_backend == "sqlite":
        from plexus.engines.sqlite import SqliteBroker

        sqlite = SqliteBroker(
            Path(settings.data_dir),
            sweep_interval=settings.sweep_interval,
            idempotency_ttl=settings.idempotency_ttl,
            grace=settings.channel_grace,
        )
        return Engine(sqlite, sqlite, presence)
    memory = MemoryBroker(
        idempotency_ttl=settings.idempotency_ttl,
        sweep_interval=settings.sweep_interval,
        grace=settings.channel_grace,
    )
    return Engine(memory, memory, presence)
