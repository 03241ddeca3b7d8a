"""What only the memory engine promises, or can be made to show.

Its state is all in this process, so these tests look at it directly
(`state_size`, `holds`) and drive its clock with `sweep(now)`; the engine
contracts themselves are checked by the conformance suites.
"""

from __future__ import annotations

import re
import time

import pytest

from plexus.engines.base import Retention
from plexus.engines.memory import (
    MAX_IDEMPOTENCY_KEYS,
    IdempotencyKeys,
    MemoryBroker,
    MemoryPresenceStore,
    new_epoch,
    now_ms,
)
from plexus.models import ClientInfo, Duplicate, StreamPosition
from tests.engines.conftest import ENGINES
from tests.engines.harness import (
    CH,
    NO_HISTORY,
    T0,
    EngineKind,
    Harness,
    Launcher,
    Tuning,
    keep,
    message,
    publish,
)
from tests.helpers import wait_for


@pytest.fixture(params=[pytest.param(k, id=k.name) for k in ENGINES if k.name == "memory"])
def kind(request: pytest.FixtureRequest) -> EngineKind:
    """The engine suites' fixtures (`engine`, `launch`), for the memory engine only."""
    chosen: EngineKind = request.param
    return chosen


def broker_of(engine: Harness) -> MemoryBroker:
    assert isinstance(engine.broker, MemoryBroker)
    return engine.broker


# ----- epochs and idempotency keys


def test_an_epoch_is_eight_url_safe_characters() -> None:
    epochs = {new_epoch() for _ in range(100)}
    assert len(epochs) == 100  # 48 random bits each
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{8}", epoch) for epoch in epochs)


def test_now_is_the_wall_clock_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    now = now_ms()
    assert isinstance(now, int)
    assert before <= now <= time.time_ns() // 1_000_000


def test_idempotency_keys_expire_oldest_first() -> None:
    keys = IdempotencyKeys(ttl=1.0)
    assert (keys.ttl_ms, keys.limit) == (1000, MAX_IDEMPOTENCY_KEYS)
    keys.put(CH, "a", 1, "e", now=T0)
    keys.put(CH, "b", 2, "e", now=T0 + 500)
    assert keys.get(CH, "a", now=T0 + 999) == Duplicate(1, "e")
    # At T0 + 1000 "a" expires; "b" (put later) does not.
    assert keys.get(CH, "b", now=T0 + 1000) == Duplicate(2, "e")
    assert keys.get(CH, "a", now=T0 + 1000) is None
    assert len(keys) == 1
    assert keys.get(CH, "b", now=T0 + 1500) is None
    assert len(keys) == 0


def test_idempotency_keys_are_bounded_dropping_the_oldest() -> None:
    keys = IdempotencyKeys(ttl=60.0, limit=2)
    keys.put(CH, "a", 1, "e", now=T0)
    keys.put(CH, "b", 2, "e", now=T0)
    assert len(keys) == 2  # up to the limit, all kept
    keys.put(CH, "c", 3, "e", now=T0)
    assert len(keys) == 2
    assert keys.get(CH, "a", now=T0) is None
    assert keys.get(CH, "b", now=T0) == Duplicate(2, "e")
    assert keys.get(CH, "c", now=T0) == Duplicate(3, "e")


# ----- what the engine holds


async def test_state_size_counts_everything_held(engine: Harness) -> None:
    broker = broker_of(engine)
    assert broker.state_size() == {
        "streams": 0,
        "subscribed": 0,
        "scheduled": 0,
        "idempotency_keys": 0,
        "namespaces": 0,
    }
    await broker.subscribe("live:a")
    await publish(engine, 1, retention=keep(namespace="chat"), key="k-1")
    await publish(engine, 2, channel="chat:b", retention=keep(namespace="chat"))
    await publish(engine, 3, channel="live:a", retention=NO_HISTORY)
    assert broker.state_size() == {
        "streams": 3,  # CH, chat:b and the subscribed live:a
        "subscribed": 1,
        "scheduled": 2,  # CH and chat:b, to be forgotten once idle; live:a is subscribed
        "idempotency_keys": 1,
        "namespaces": 2,  # "chat", and "" of live:a
    }


async def test_a_channel_is_scheduled_once(engine: Harness) -> None:
    broker = broker_of(engine)
    await broker.position(CH, create=keep(ttl=10))
    for _ in range(3):
        await broker.subscribe(CH)
        await broker.unsubscribe(CH)
    assert broker.state_size()["scheduled"] == 1


async def test_health_counts_channels(engine: Harness) -> None:
    broker = broker_of(engine)
    await publish(engine, 1)
    await publish(engine, 1, channel="chat:b")
    assert broker.health() == {"status": "ok", "channels": 2}
    store = MemoryPresenceStore()
    await store.add(CH, ClientInfo("c-1", None))
    assert store.health() == {"status": "ok", "channels": 1}


async def test_nodes_is_this_node(engine: Harness) -> None:
    assert await engine.broker.nodes() == [engine.sink.info()]
    assert await MemoryBroker().nodes() == []


# ----- forgetting idle channels


async def test_sweep_counts_what_it_forgot_and_skips_what_it_must(launch: Launcher) -> None:
    """Due entries of a channel forgotten otherwise, or subscribed again, are
    skipped; the sweep goes on past them."""
    engine = await launch(Tuning(grace=1))
    broker = broker_of(engine)
    t = now_ms()
    # Made for a subscriber (due at t + 1 s), then forgotten when it left (no history).
    await broker.position("live:gone", create=NO_HISTORY)
    await broker.subscribe("live:gone")
    await broker.unsubscribe("live:gone")
    # Due at t + 1.5 s, but subscribed again.
    await publish(engine, 1, t + 500, channel="chat:busy", retention=keep(ttl=1))
    await broker.subscribe("chat:busy")
    # Due at t + 6 s, and idle.
    for name in ("chat:a", "chat:b"):
        await publish(engine, 1, t + 5_000, channel=name, retention=keep(ttl=1))
    assert broker.sweep(t + 20_000) == 2
    assert not broker.holds("chat:a")
    assert not broker.holds("chat:b")
    assert broker.holds("chat:busy")
    assert broker.sweep(t + 30_000) == 0


async def test_sweep_defaults_to_the_wall_clock(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=1))
    broker = broker_of(engine)
    await publish(engine, 1, now_ms() - 60_000, retention=keep(ttl=1))
    await publish(engine, 1, now_ms(), channel="chat:new", retention=keep(ttl=10))
    assert broker.sweep() == 1
    assert not broker.holds(CH)
    assert broker.holds("chat:new")


async def test_the_engine_sweeps_by_itself(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=0, sweep_interval=0.01))
    assert "memory-sweeper" in engine.supervisor.health()["tasks"]
    await engine.broker.subscribe(CH)
    await publish(engine, 1, now_ms() - 60_000, retention=keep(ttl=1))
    await engine.broker.unsubscribe(CH)  # idle from now: forgotten at the next pass
    await wait_for(lambda: not broker_of(engine).holds(CH))


async def test_asking_for_a_position_to_subscribe_keeps_the_channel(launch: Launcher) -> None:
    """`position(create=...)` of a channel is a subscriber arriving: its grace runs
    from then, not from the last message."""
    engine = await launch(Tuning(grace=1))
    broker = broker_of(engine)
    old = await publish(engine, 1, now_ms() - 60_000, retention=keep(ttl=1))
    # Expired 59 s ago, its grace over 58 s ago; asked for now.
    position = await broker.position(CH, create=keep(ttl=1))
    assert position == StreamPosition(1, old.epoch)
    assert broker.sweep(now_ms() - 30_000) == 0
    assert broker.holds(CH)


async def test_an_unsubscribed_channel_with_expiring_messages_is_forgotten(
    launch: Launcher,
) -> None:
    """Scheduled when its last subscriber leaves, while it still holds messages."""
    engine = await launch(Tuning(grace=1))
    broker = broker_of(engine)
    await broker.subscribe(CH)
    await publish(engine, 1, now_ms(), retention=keep(ttl=1))
    await broker.unsubscribe(CH)
    assert broker.sweep(now_ms() + 1_500) == 0  # expired, in its grace
    assert broker.sweep(now_ms() + 2_500) == 1


def test_a_message_goes_nowhere_without_state(engine: Harness) -> None:
    """No history and nobody subscribed: every publish is an epoch of its own."""
    broker = broker_of(engine)
    first = broker.publish_nowait(message(1), NO_HISTORY, "k")
    second = broker.publish_nowait(message(2), NO_HISTORY)
    assert (first.offset, second.offset) == (1, 1)
    assert first.epoch != second.epoch
    assert broker.state_size()["streams"] == 0


async def test_close_forgets_every_channel(engine: Harness) -> None:
    broker = broker_of(engine)
    await broker.subscribe(CH)
    await publish(engine, 1, retention=keep(namespace="x"))
    await publish(engine, 1, channel="chat:b", retention=keep(ttl=1, namespace="x"))
    await broker.close()
    held = broker.state_size()
    assert (held["streams"], held["subscribed"], held["scheduled"], held["namespaces"]) == (
        0,
        0,
        0,
        0,
    )


async def test_a_channel_without_history_keeps_no_expiry(launch: Launcher) -> None:
    """Made for a subscriber who never came, then published to: it is forgotten after
    the grace, whatever the TTL its namespace gives messages it does not keep."""
    engine = await launch(Tuning(grace=1))
    broker = broker_of(engine)
    no_history = Retention(0, ttl=60)
    await broker.position(CH, create=no_history)
    t = now_ms()
    broker.publish_nowait(message("x", t), no_history)
    assert broker.sweep(t + 2_000) == 1
