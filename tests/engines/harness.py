"""What the engine suites share: where an engine lives, how it is made, a
harness that runs one as a node would, a recording sink, message helpers, and
`CommitGate`, which holds a SQLite batch before its COMMIT (the end-to-end
race tests use it too).

The engines themselves are listed in `conftest.py` (`ENGINES`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytest

from plexus.engines.base import Broker, Engine, HistoryStore, PresenceStore, Retention
from plexus.models import Presence, Publication
from plexus.supervisor import Supervisor
from tests.helpers import TIMEOUT

T0 = 1_764_129_600_000  # publication times are fixed; `now=` moves the clock
CH = "chat:lobby"

# -- where an engine lives -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """Where one test's engine keeps its state: making an engine again at the
    same place is a restart.

    Attributes:
        path: a directory of the test's own (`tmp_path`).
        key: unique to the test, for engines that share a server between
            tests (a key prefix in Redis, say).
        context: the values of the fixtures the engine's kind `needs`, by
            fixture name (such as a session-wide server's URL).
    """

    path: Path
    key: str
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Tuning:
    """The engine settings a test may change (the rest are the defaults)."""

    grace: float = 300.0  # setting `channel_grace`
    idempotency_ttl: float = 300.0
    # An hour: the background sweep never runs during a test; tests call `sweep(now)`.
    sweep_interval: float = 3600.0


@dataclass(frozen=True, slots=True)
class EngineKind:
    """How to make one engine, and what only it can do for the tests.

    Attributes:
        name: the test id.
        make: builds an unstarted engine at a place (called again = restart).
        persistent: whether a restarted engine keeps epochs, offsets and messages.
        needs: names of fixtures whose values `make` finds in `Place.context`.
        sweep: forgets what the engine's clock says is due at `now` (Unix ms);
            None when the engine forgets on its own clock (the tests that need
            it are skipped).
        lose_meta: makes the engine lose what it knows of a channel (its
            epoch and counter) as the kind of failure it can have does; the
            engine may be restarted meanwhile.
        own_clock: the engine expires state on its own clock (Redis's TTLs),
            not by the publication times and `now`s a test passes: tests that
            move time skip it, and an unused channel's state lives until its
            TTL rather than going at once.
    """

    name: str
    make: Callable[[Place, Tuning], Engine]
    persistent: bool
    needs: tuple[str, ...] = ()
    sweep: Callable[[Engine, int], Awaitable[None]] | None = None
    lose_meta: Callable[[Harness, str], Awaitable[None]] | None = None
    own_clock: bool = False


@dataclass(frozen=True, slots=True)
class PresenceStoreKind:
    """How to make one presence store (see `EngineKind` for `needs`)."""

    name: str
    make: Callable[[Place], PresenceStore]
    needs: tuple[str, ...] = ()


# -- the harness ---------------------------------------------------------------


class Recorder:
    """An `EventSink` that records every call in order, and can be waited on."""

    name = "engine-test"  # the node's id, for engines that register nodes

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.presence: list[Presence] = []
        self.gapped: list[frozenset[str]] = []
        # Called with each publication as it arrives, as the node's own work would be.
        self.listeners: list[Callable[[Publication], None]] = []
        self._changed = asyncio.Event()

    def info(self) -> dict[str, Any]:
        return {"node": self.name}

    def on_publication(self, pub: Publication) -> None:
        self.publications.append(pub)
        for listener in self.listeners:
            listener(pub)
        self._changed.set()

    def on_presence(self, event: Presence) -> None:
        self.presence.append(event)
        self._changed.set()

    def on_gapped(self, channels: Collection[str]) -> None:
        self.gapped.append(frozenset(channels))
        self._changed.set()

    def of(self, channel: str) -> list[Publication]:
        """The publications of `channel` received so far."""
        return [pub for pub in self.publications if pub.channel == channel]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait until `predicate()` holds, checking it after each event.

        Engines that deliver through a backing service do so after `publish`
        returns; the local ones have delivered by then.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@runtime_checkable
class _Measured(Protocol):
    def state_size(self) -> dict[str, int]: ...


class Harness:
    """One engine started as a node starts it: a `Supervisor`, and a `Recorder`
    bound as its sink. `restart` closes it and makes it again at the same place."""

    def __init__(self, kind: EngineKind, place: Place, tuning: Tuning) -> None:
        self.kind = kind
        self.place = place
        self.tuning = tuning
        self.engine = kind.make(place, tuning)
        self.sink = Recorder()
        self.supervisor = Supervisor()
        self.running = False

    @property
    def broker(self) -> Broker:
        return self.engine.broker

    @property
    def history(self) -> HistoryStore:
        return self.engine.history

    @property
    def presence(self) -> PresenceStore:
        return self.engine.presence

    def _parts(self) -> list[Any]:
        # The broker is often the history store too: each part starts once.
        parts: list[Any] = []
        for part in (self.engine.broker, self.engine.history, self.engine.presence):
            if all(part is not seen for seen in parts):
                parts.append(part)
        return parts

    async def start(self) -> None:
        self.broker.bind(self.sink)
        for part in self._parts():
            await part.start(self.supervisor)
        self.running = True

    async def close(self) -> None:
        if not self.running:
            return
        self.running = False
        await self.supervisor.close()
        for part in self._parts():
            await part.close()

    async def restart(self, between: Callable[[], None] | None = None) -> None:
        """Close, run `between` (the engine is down then), make anew and start."""
        await self.close()
        if between is not None:
            between()
        self.engine = self.kind.make(self.place, self.tuning)
        self.sink = Recorder()
        self.supervisor = Supervisor()
        await self.start()

    async def sweep(self, now: int) -> None:
        """Let the engine forget what is due at `now` (skips engines that cannot be told)."""
        if self.kind.sweep is None:
            pytest.skip(f"{self.kind.name} forgets channels on its own clock")
        await self.kind.sweep(self.engine, now)

    def requires(self, capability: str) -> None:
        """Skip the test unless the engine has `capability` (an `EngineKind` flag)."""
        if capability == "driven_clock" and self.kind.own_clock:
            pytest.skip(f"{self.kind.name} expires state on its own clock")
        if capability == "forgets_unused_at_once" and self.kind.own_clock:
            pytest.skip(f"{self.kind.name} keeps an unused channel's state until its TTL")

    async def lose_meta(self, channel: str) -> None:
        if self.kind.lose_meta is None:
            pytest.skip(f"{self.kind.name} cannot lose a channel's meta")
        await self.kind.lose_meta(self, channel)

    async def settle(self) -> None:
        """Return once the engine has done what it queued without waiting for it.

        A read round trip: an engine with a worker (SQLite's writer thread)
        applies subscribes and unsubscribes in queue order, without the
        caller waiting, and answers the read after them.
        """
        await self.history.positions(["engines-test:settle"])

    async def state_size(self) -> dict[str, int]:
        """The engine's in-memory state, once it has settled."""
        if not isinstance(self.broker, _Measured):
            pytest.skip(f"{self.kind.name} does not report its state size")
        await self.settle()
        return self.broker.state_size()

    async def held_state(self) -> dict[str, int]:
        """The nonzero entries of `state_size` (empty: the engine holds nothing)."""
        return {name: count for name, count in (await self.state_size()).items() if count}


Launcher = Callable[..., Awaitable[Harness]]


def keep(
    size: int = 100,
    ttl: float = 0.0,
    *,
    max_bytes: int = 0,
    max_channels: int = 0,
    namespace: str = "",
) -> Retention:
    """A `Retention` (by default: 100 messages, no age or byte limit)."""
    return Retention(size, ttl, max_bytes, max_channels, namespace)


NO_HISTORY = Retention()


def message(
    data: Any,
    time: int = T0,
    *,
    channel: str = CH,
    client: str | None = None,
    user: str | None = None,
) -> Publication:
    """A publication as the node hands it to the broker (offset and epoch not yet assigned)."""
    return Publication(channel, data, 0, "", time, client, user)


async def publish(
    harness: Harness,
    data: Any,
    time: int = T0,
    *,
    channel: str = CH,
    retention: Retention | None = None,
    key: str | None = None,
    client: str | None = None,
    user: str | None = None,
) -> Publication:
    """Publish one message that must be stored (not a duplicate); return it."""
    pub = message(data, time, channel=channel, client=client, user=user)
    result = await harness.broker.publish(pub, retention or keep(), key)
    assert isinstance(result, Publication), result
    return result


async def publish_many(
    harness: Harness,
    count: int,
    *,
    channel: str = CH,
    retention: Retention | None = None,
    at: int = T0,
) -> list[Publication]:
    """Publish `{"n": 0}` ... `{"n": count - 1}` one after the other, at `at + n`."""
    return [
        await publish(harness, {"n": n}, at + n, channel=channel, retention=retention)
        for n in range(count)
    ]


def offsets(publications: list[Publication]) -> list[int]:
    return [p.offset for p in publications]


# -- forcing races ---------------------------------------------------------------


class CommitGate:
    """The writer's `before_commit` hook: holds chosen batches before their COMMIT.

    Installed as `SqliteBroker.before_commit = CommitGate()` (made on the
    loop that runs the store).

    `hold(chosen)` holds each batch that appends a publication `chosen`
    accepts: batches of other work (a subscribe, a read), or of messages
    published earlier, go through, so the batch held is the test's whatever
    the timing of the writer's earlier batches (even in a wrong writer that
    acknowledges before it reaches its COMMIT). `fail` fails the next batch
    that appends something, there.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arrivals: asyncio.Queue[None] = asyncio.Queue()
        self._permits = threading.Semaphore(0)
        self._chosen: Callable[[Publication], bool] | None = None
        self.fail: Exception | None = None

    def __call__(self, appended: list[Publication]) -> None:
        # On the writer thread, with the batch's transaction open.
        if not appended:
            return
        error, self.fail = self.fail, None
        if error is not None:
            raise error
        chosen = self._chosen
        if chosen is None or not any(chosen(pub) for pub in appended):
            return
        self._loop.call_soon_threadsafe(self._arrivals.put_nowait, None)
        if not self._permits.acquire(timeout=TIMEOUT):
            raise TimeoutError("the test never released the held commit")

    def hold(self, chosen: Callable[[Publication], bool] = lambda pub: True) -> None:
        """From now on, stop each batch that appends a `chosen` publication before its COMMIT."""
        self._chosen = chosen

    async def held(self) -> None:
        """Wait until a batch is stopped before its COMMIT."""
        await asyncio.wait_for(self._arrivals.get(), TIMEOUT)

    def release(self) -> None:
        """Let the held batch commit; the next chosen one is held again."""
        self._permits.release()

    def open(self) -> None:
        """Let the held batch commit and hold no more."""
        self._chosen = None
        self._permits.release()


async def yield_to_the_loop() -> None:
    """Let every callback already scheduled on the loop run (a wrong writer's early
    acknowledgement would be one of them)."""
    for _ in range(10):
        await asyncio.sleep(0)  # sleep-ok: yields to the loop, waits for nothing
