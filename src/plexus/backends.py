"""Choose the broker, history and presence implementations the settings ask for.

Imports are lazy: a server imports only the implementations it uses. Redis
implementations (`redis` in the settings) are refused by `Settings.validate`
until they exist.
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
    from plexus.history.memory import MemoryHistoryStore

    return MemoryHistoryStore()


def make_presence(settings: Settings) -> PresenceStore:
    """The presence store named by `settings.presence_backend`."""
    from plexus.presence.memory import MemoryPresenceStore

    return MemoryPresenceStore()


def make_broker(settings: Settings) -> Broker:
    """The broker named by `settings.broker`."""
    from plexus.brokers.memory import MemoryBroker

    return MemoryBroker()
