"""The engines under test, and the fixtures that start them.

Every conformance suite here is parametrised over `ENGINES` (engines) or
`PRESENCE_STORES` (presence stores): covering a new engine is adding one
entry to each list. The harness they run in is `tests/engines/harness.py`.

Time is never waited for: publications carry `time=`, reads pass `now=` and
sweeps are run by the tests with an explicit `now` (the engines' own
background sweeps are set an hour apart so that they never run during a test).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

import pytest

from plexus.engines.base import Engine, PresenceStore
from plexus.engines.memory import MemoryBroker, MemoryPresenceStore
from plexus.engines.sqlite import SqliteBroker
from plexus.supervisor import Supervisor
from tests.engines.harness import (
    EngineKind,
    Harness,
    Launcher,
    Place,
    PresenceStoreKind,
    Tuning,
)
from tests.helpers import TIMEOUT, RedisServer

# -- memory --------------------------------------------------------------------


def _memory(place: Place, tuning: Tuning) -> Engine:
    broker = MemoryBroker(
        idempotency_ttl=tuning.idempotency_ttl,
        sweep_interval=tuning.sweep_interval,
        grace=tuning.grace,
    )
    return Engine(broker, broker, MemoryPresenceStore())


async def _sweep_memory(engine: Engine, now: int) -> None:
    assert isinstance(engine.broker, MemoryBroker)
    engine.broker.sweep(now)


async def _restart(harness: Harness, channel: str) -> None:
    # All a memory engine knows lives in the process: losing it is a restart.
    await harness.restart()


# -- sqlite --------------------------------------------------------------------


def _sqlite(
    path: Callable[[Path], Path], synchronous: Literal["NORMAL", "FULL"]
) -> Callable[[Place, Tuning], Engine]:
    def make(place: Place, tuning: Tuning) -> Engine:
        broker = SqliteBroker(
            path(place.path),
            synchronous=synchronous,
            sweep_interval=tuning.sweep_interval,
            idempotency_ttl=tuning.idempotency_ttl,
            grace=tuning.grace,
        )
        return Engine(broker, broker, MemoryPresenceStore())

    return make


async def _sweep_sqlite(engine: Engine, now: int) -> None:
    assert isinstance(engine.broker, SqliteBroker)
    await engine.broker.sweep(now)


async def _lose_database(harness: Harness, channel: str) -> None:
    # What a SQLite engine can lose is its file (a wiped data directory or volume).
    assert isinstance(harness.broker, SqliteBroker)
    file = harness.broker.file

    def delete() -> None:
        for suffix in ("", "-wal", "-shm"):
            file.with_name(file.name + suffix).unlink(missing_ok=True)

    await harness.restart(between=delete)


# -- redis ---------------------------------------------------------------------


def _redis(place: Place, tuning: Tuning) -> Engine:
    from plexus.engines.redis.broker import RedisBroker
    from plexus.engines.redis.presence import RedisPresenceStore

    server: RedisServer = place.context["redis_server"]
    broker = RedisBroker(
        [server.url],
        prefix=place.key,
        timeout=TIMEOUT / 5,
        idempotency_ttl=tuning.idempotency_ttl,
        grace=tuning.grace,
    )
    return Engine(broker, broker, RedisPresenceStore(broker))


async def _redis_lose_meta(harness: Harness, channel: str) -> None:
    # What Redis can lose of a channel: its keys (evicted, expired, or a
    # restart without persistence).
    from plexus.engines.redis.broker import RedisBroker

    broker = harness.broker
    assert isinstance(broker, RedisBroker)
    await broker.shard(channel).client.delete(
        broker.keys.meta(channel), broker.keys.stream(channel)
    )


def _redis_presence(place: Place) -> PresenceStore:
    from plexus.engines.redis.broker import RedisBroker
    from plexus.engines.redis.presence import RedisPresenceStore

    server: RedisServer = place.context["redis_server"]

    class _Started(RedisPresenceStore):
        # A presence store on its own: it starts (and closes) its broker's connections.
        async def start(self, supervisor: Supervisor) -> None:
            self.broker.bind(_QuietSink())
            await self.broker.start(supervisor)
            await super().start(supervisor)

        async def close(self) -> None:
            await super().close()
            await self.broker.close()

    return _Started(RedisBroker([server.url], prefix=place.key, timeout=TIMEOUT / 5))


class _QuietSink:
    name = "presence-test"

    def info(self) -> dict[str, object]:
        return {"node": self.name}

    def on_publication(self, pub: object) -> None:
        pass

    def on_presence(self, event: object) -> None:
        pass

    def on_gapped(self, channels: object) -> None:
        pass


# -- the list ------------------------------------------------------------------

ENGINES: list[EngineKind] = [
    EngineKind("memory", _memory, False, sweep=_sweep_memory, lose_meta=_restart),
    # A directory holding history.sqlite3, in the default durability mode.
    EngineKind(
        "sqlite",
        _sqlite(lambda path: path, "NORMAL"),
        True,
        sweep=_sweep_sqlite,
        lose_meta=_lose_database,
    ),
    # A database file named directly, fsynced at every commit.
    EngineKind(
        "sqlite-full",
        _sqlite(lambda path: path / "h.db", "FULL"),
        True,
        sweep=_sweep_sqlite,
        lose_meta=_lose_database,
    ),
    # A real redis-server (one per session; each test under its own key prefix).
    # Redis expires keys on its own clock: no driven sweep.
    EngineKind(
        "redis",
        _redis,
        True,
        needs=("redis_server",),
        lose_meta=_redis_lose_meta,
        own_clock=True,
    ),
]


# Where a presence store is part of an engine, it is listed here too.
PRESENCE_STORES: list[PresenceStoreKind] = [
    PresenceStoreKind("memory", lambda place: MemoryPresenceStore()),
    PresenceStoreKind("redis", _redis_presence, needs=("redis_server",)),
]


@pytest.fixture(params=[pytest.param(kind, id=kind.name) for kind in ENGINES])
def kind(request: pytest.FixtureRequest) -> EngineKind:
    chosen: EngineKind = request.param
    return chosen


@pytest.fixture
def place(kind: EngineKind, request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    context = {name: request.getfixturevalue(name) for name in kind.needs}
    return Place(tmp_path, f"t-{secrets.token_hex(4)}", context)


@pytest.fixture
async def launch(kind: EngineKind, place: Place) -> AsyncIterator[Launcher]:
    """Start engines of the kind under test at the test's place (closed at the end).

    `await launch(Tuning(grace=1))` changes settings; a second call at the
    same place is a second node on it (for engines that allow one).
    """
    started: list[Harness] = []

    async def factory(tuning: Tuning | None = None) -> Harness:
        harness = Harness(kind, place, tuning or Tuning())
        await harness.start()
        started.append(harness)
        return harness

    yield factory
    for harness in reversed(started):
        await harness.close()


@pytest.fixture
async def engine(launch: Launcher) -> Harness:
    """The engine under test, started with the default settings."""
    return await launch()


@pytest.fixture(params=[pytest.param(kind, id=kind.name) for kind in PRESENCE_STORES])
async def presence(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PresenceStore]:
    """A started presence store of each kind (closed at the end)."""
    kind: PresenceStoreKind = request.param
    context = {name: request.getfixturevalue(name) for name in kind.needs}
    store = kind.make(Place(tmp_path, f"t-{secrets.token_hex(4)}", context))
    supervisor = Supervisor()
    await store.start(supervisor)
    yield store
    await supervisor.close()
    await store.close()
