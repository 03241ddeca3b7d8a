"""The Redis engine: many processes and machines share channels, history and presence."""

from __future__ import annotations

from plexus.config import Settings
from plexus.engines.base import Engine


def make_redis_engine(settings: Settings) -> Engine:
    """The Redis engine for `settings` (see `plexus.engines.redis.broker`)."""
    raise NotImplementedError("the redis engine is being built")
