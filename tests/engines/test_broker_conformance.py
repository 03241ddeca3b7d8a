"""The `Broker` contract, for every engine in `ENGINES` (see conftest.py).

What the node relies on: offsets per channel consecutive and delivered in
order whoever races, publish and history agreeing, delivery only while
subscribed, idempotent publishes, the inline path where the engine offers
it, bounded channel state, and epochs across restarts and lost state.

Engines that deliver through a backing service do so after `publish`
returns: tests wait for deliveries with the sink's bounded `wait_for`, and
check that something was NOT delivered by publishing a later message of the
same channel (a fence) and waiting for it (a channel's events are ordered).
"""

from __future__ import annotations

import asyncio

import pytest

from plexus.engines.base import Retention
from plexus.engines.memory import now_ms
from plexus.exceptions import Unavailable
from plexus.models import ClientInfo, Duplicate, Presence, Publication, StreamPosition
from tests.engines.harness import (
    CH,
    NO_HISTORY,
    T0,
    Harness,
    Launcher,
    Tuning,
    keep,
    message,
    offsets,
    publish,
)
from tests.helpers import TIMEOUT

NO_STREAM = StreamPosition(0, "")
RETENTIONS = [
    pytest.param(keep(1000), id="history"),
    pytest.param(NO_HISTORY, id="no-history"),
]


async def fence(engine: Harness, channel: str, retention: Retention) -> Publication:
    """Publish a marker in a subscribed `channel` and wait for it: what the engine
    would deliver of that channel before it has been delivered by then."""
    marker = await publish(engine, "fence", T0 + 999_999, channel=channel, retention=retention)
    await engine.sink.wait_for(lambda: marker in engine.sink.of(channel))
    return marker


# -- order ---------------------------------------------------------------------


async def test_racing_publishers_get_consecutive_offsets_delivered_in_order(
    engine: Harness,
) -> None:
    await engine.broker.subscribe(CH)
    retention = keep(1000)

    async def publisher(name: str) -> list[Publication]:
        # Each publisher's own calls are sequential; the publishers race.
        return [
            await publish(engine, {"from": name, "n": n}, T0 + n, retention=retention, client=name)
            for n in range(25)
        ]

    results = await asyncio.gather(*(publisher(f"p{i}") for i in range(8)))
    everything = [pub for mine in results for pub in mine]
    assert sorted(offsets(everything)) == list(range(1, 201))
    assert len({pub.epoch for pub in everything}) == 1
    for mine in results:
        assert offsets(mine) == sorted(offsets(mine))  # one caller's messages keep its order
    await engine.sink.wait_for(lambda: len(engine.sink.of(CH)) >= 200)
    seen = engine.sink.of(CH)
    assert offsets(seen) == list(range(1, 201))
    by_offset = {pub.offset: pub for pub in everything}
    assert seen == [by_offset[offset] for offset in range(1, 201)]
    page = await engine.history.read(CH, since=0)
    assert page.complete
    assert page.publications == seen
    assert engine.sink.gapped == []  # nothing was lost on the way


async def test_racing_publishers_in_two_channels_count_separately(engine: Harness) -> None:
    for channel in ("chat:a", "chat:b"):
        await engine.broker.subscribe(channel)
    published = await asyncio.gather(
        *(publish(engine, n, T0, channel=("chat:a", "chat:b")[n % 2]) for n in range(100))
    )
    await engine.sink.wait_for(lambda: len(engine.sink.publications) >= 100)
    for parity, channel in enumerate(("chat:a", "chat:b")):
        mine = [pub for pub in published if pub.channel == channel]
        assert sorted(offsets(mine)) == list(range(1, 51))
        assert offsets(engine.sink.of(channel)) == list(range(1, 51))
        assert sorted(pub.data for pub in engine.sink.of(channel)) == list(range(parity, 100, 2))


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_publish_and_history_agree(engine: Harness, retention: Retention) -> None:
    await engine.broker.subscribe(CH)
    published = [
        await publish(engine, {"n": n}, T0 + n, retention=retention, client="c-1", user="u")
        for n in range(5)
    ]
    assert offsets(published) == [1, 2, 3, 4, 5]
    last = published[-1]
    assert await engine.history.position(CH) == StreamPosition(5, last.epoch)
    await engine.sink.wait_for(lambda: len(engine.sink.of(CH)) >= 5)
    assert engine.sink.of(CH) == published
    page = await engine.history.read(CH, since=0)
    assert page.position == StreamPosition(5, last.epoch)
    assert page.publications == (published if retention.keeps_history else [])


# -- delivery ------------------------------------------------------------------


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_delivery_only_between_subscribe_and_unsubscribe(
    engine: Harness, retention: Retention
) -> None:
    await publish(engine, "before", T0, retention=retention)
    await engine.broker.subscribe(CH)
    during = await publish(engine, "during", T0 + 1, retention=retention)
    await engine.sink.wait_for(lambda: during in engine.sink.of(CH))
    await engine.broker.unsubscribe(CH)
    await publish(engine, "after", T0 + 2, retention=retention)
    await engine.broker.subscribe(CH)
    marker = await fence(engine, CH, retention)
    assert [pub.data for pub in engine.sink.of(CH)] == ["during", "fence"]
    assert engine.sink.of(CH) == [during, marker]


async def test_other_channels_are_not_delivered(engine: Harness) -> None:
    await engine.broker.subscribe(CH)
    await publish(engine, "elsewhere", channel="chat:other")
    await publish(engine, "elsewhere", channel="chat:other", retention=NO_HISTORY)
    await fence(engine, CH, keep())
    assert [pub.channel for pub in engine.sink.publications] == [CH]


async def test_presence_is_delivered_only_for_subscribed_channels(engine: Harness) -> None:
    alice = ClientInfo("c-1", "alice", {"color": "red"})
    bob = ClientInfo("c-2", "bob", None)
    await engine.broker.publish_presence(Presence("join", CH, alice))  # nobody listens yet
    await engine.broker.subscribe(CH)
    joined = Presence("join", CH, bob)
    await engine.broker.publish_presence(joined)
    await engine.broker.publish_presence(Presence("join", "chat:other", alice))
    left = Presence("leave", CH, bob)
    await engine.broker.publish_presence(left)
    rejoined = Presence("join", CH, bob)
    await engine.broker.publish_presence(rejoined)
    await engine.sink.wait_for(lambda: len(engine.sink.presence) >= 3)
    assert engine.sink.presence == [joined, left, rejoined]  # in the order published
    await engine.broker.unsubscribe(CH)
    await engine.broker.publish_presence(Presence("leave", CH, alice))
    await engine.broker.subscribe(CH)
    last = Presence("leave", CH, bob)
    await engine.broker.publish_presence(last)
    # `last` equals `left`: wait for a fourth event, not for one equal to it.
    await engine.sink.wait_for(lambda: len(engine.sink.presence) >= 4)
    assert engine.sink.presence == [joined, left, rejoined, last]
    assert engine.sink.publications == []
    assert engine.sink.gapped == []


# -- idempotency ---------------------------------------------------------------


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_a_repeated_key_stores_and_delivers_nothing(
    engine: Harness, retention: Retention
) -> None:
    await engine.broker.subscribe(CH)
    first = await publish(engine, "once", T0, retention=retention, key="k-1")
    again = await engine.broker.publish(message("twice", T0 + 1), retention, "k-1")
    assert again == Duplicate(first.offset, first.epoch)
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    following = await publish(engine, "next", T0 + 2, retention=retention)
    assert following.offset == 2  # the duplicate used no offset
    await engine.sink.wait_for(lambda: following in engine.sink.of(CH))
    assert [pub.data for pub in engine.sink.of(CH)] == ["once", "next"]
    page = await engine.history.read(CH, since=0)
    assert [pub.data for pub in page.publications] == (
        ["once", "next"] if retention.keeps_history else []
    )


async def test_a_repeated_key_of_an_unsubscribed_channel_without_history(
    engine: Harness,
) -> None:
    first = await publish(engine, "once", T0, retention=NO_HISTORY, key="k-1")
    again = await engine.broker.publish(message("twice", T0 + 1), NO_HISTORY, "k-1")
    assert again == Duplicate(first.offset, first.epoch)


async def test_keys_are_per_channel(engine: Harness) -> None:
    first = await publish(engine, "a", T0, key="k-1")
    other = await publish(engine, "b", T0 + 1, channel="chat:other", key="k-1")
    assert (other.channel, other.offset) == ("chat:other", 1)
    assert (await engine.history.read("chat:other")).publications == [other]
    assert (await engine.history.read(CH)).publications == [first]


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_a_key_is_forgotten_after_its_ttl(launch: Launcher, retention: Retention) -> None:
    engine = await launch(Tuning(idempotency_ttl=10))
    engine.requires("driven_clock")
    await engine.broker.subscribe(CH)  # a channel without history keeps state only so
    first = await publish(engine, "a", T0, key="k-1", retention=retention)
    late = await engine.broker.publish(message("b", T0 + 9_999), retention, "k-1")
    assert late == Duplicate(first.offset, first.epoch)
    expired = await publish(engine, "c", T0 + 10_000, key="k-1", retention=retention)
    assert (expired.offset, expired.epoch) == (2, first.epoch)
    # And the new message's key is remembered from then on.
    again = await engine.broker.publish(message("d", T0 + 10_001), retention, "k-1")
    assert again == Duplicate(2, first.epoch)


async def test_keys_survive_a_restart_of_a_persistent_engine(engine: Harness) -> None:
    if not engine.kind.persistent:
        pytest.skip(f"{engine.kind.name} keeps nothing across a restart")
    first = await publish(engine, "a", T0, key="k-1")
    await engine.restart()
    await engine.broker.subscribe(CH)
    again = await engine.broker.publish(message("a", T0 + 1), keep(), "k-1")
    assert again == Duplicate(first.offset, first.epoch)
    assert (await engine.history.read(CH)).publications == [first]
    marker = await fence(engine, CH, keep())
    assert engine.sink.of(CH) == [marker]


# -- the inline path -----------------------------------------------------------


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_inline_for_tells_whether_publish_nowait_works(
    engine: Harness, retention: Retention
) -> None:
    inline = engine.broker.inline_for(retention)
    assert engine.broker.inline_for(retention) is inline  # fixed for the engine's life
    await engine.broker.subscribe(CH)
    pub = message("now", T0)
    if not inline:
        with pytest.raises(NotImplementedError):
            engine.broker.publish_nowait(pub, retention)
        assert await engine.history.position(CH) == NO_STREAM  # nothing was stored
        assert (await publish(engine, "later", T0 + 1, retention=retention)).offset == 1
        return
    result = engine.broker.publish_nowait(pub, retention)
    assert result is pub
    assert pub.offset == 1
    assert engine.sink.of(CH) == [pub]  # delivered before it returned
    assert engine.broker.publish_nowait(message("x", T0 + 1), retention, "k") == Publication(
        CH, "x", 2, pub.epoch, T0 + 1
    )
    assert engine.broker.publish_nowait(message("y", T0 + 2), retention, "k") == Duplicate(
        2, pub.epoch
    )
    assert await engine.history.position(CH) == StreamPosition(2, pub.epoch)
    if retention.keeps_history:
        assert offsets((await engine.history.read(CH)).publications) == [1, 2]


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_publish_then_is_publish_started_now(engine: Harness, retention: Retention) -> None:
    """Publishes started one after the other store in call order; each callback is
    called once, later, with what `publish` returns, or with what it raises."""
    await engine.broker.subscribe(CH)
    loop = asyncio.get_running_loop()
    called: list[asyncio.Future[Publication | Duplicate | Exception]] = []
    for n in range(5):
        called.append(loop.create_future())
        pub = message({"n": n}, T0 + n)
        engine.broker.publish_then(pub, retention, f"k{n % 3}", called[-1].set_result)
    assert not any(future.done() for future in called)  # never from within the call
    outcomes = await asyncio.wait_for(asyncio.gather(*called), TIMEOUT)
    first = outcomes[0]
    assert isinstance(first, Publication)
    assert outcomes == [
        *(Publication(CH, {"n": n}, n + 1, first.epoch, T0 + n) for n in range(3)),
        Duplicate(1, first.epoch),
        Duplicate(2, first.epoch),
    ]
    await engine.sink.wait_for(lambda: len(engine.sink.of(CH)) >= 3)
    assert engine.sink.of(CH) == outcomes[:3]
    assert await engine.history.position(CH) == StreamPosition(3, first.epoch)
    full = Retention(retention.size, max_channels=1, namespace="full")
    for channel in ("full:a", "full:b"):
        await engine.broker.subscribe(channel)  # without history, only these hold state
    await publish(engine, "a", channel="full:a", retention=full)
    refused: asyncio.Future[Publication | Duplicate | Exception] = loop.create_future()
    engine.broker.publish_then(message("b", channel="full:b"), full, None, refused.set_result)
    assert isinstance(await asyncio.wait_for(refused, TIMEOUT), Unavailable)


# -- channel state bounds ------------------------------------------------------


async def test_a_channel_without_history_keeps_no_state_while_unsubscribed(
    engine: Harness,
) -> None:
    published = [await publish(engine, n, T0 + n, retention=NO_HISTORY) for n in range(3)]
    # Nothing is counted: each such publish is the first of a fresh epoch.
    assert offsets(published) == [1, 1, 1]
    assert len({pub.epoch for pub in published}) == 3
    assert "" not in {pub.epoch for pub in published}
    assert await engine.history.position(CH) == NO_STREAM
    assert await engine.held_state() == {}


async def test_a_subscribed_channel_without_history_counts_until_unsubscribed(
    engine: Harness,
) -> None:
    await engine.broker.subscribe(CH)
    created = await engine.history.position(CH, create=NO_HISTORY)
    published = [await publish(engine, n, T0 + n, retention=NO_HISTORY) for n in range(3)]
    assert offsets(published) == [1, 2, 3]
    assert {pub.epoch for pub in published} == {created.epoch}
    assert await engine.history.position(CH) == StreamPosition(3, created.epoch)
    await engine.broker.unsubscribe(CH)
    engine.requires("driven_clock")  # Redis keeps the counter until its TTL (the grace)
    assert await engine.history.position(CH) == NO_STREAM
    assert await engine.held_state() == {}
    await engine.broker.subscribe(CH)
    again = await publish(engine, "again", T0 + 9, retention=NO_HISTORY)
    assert again.offset == 1
    assert again.epoch != created.epoch


async def test_a_channel_with_history_is_forgotten_after_expiry_and_grace(
    launch: Launcher,
) -> None:
    engine = await launch(Tuning(grace=1))
    t = now_ms()
    retention = keep(10, ttl=1)
    first = await publish(engine, "a", t, retention=retention)
    await engine.sweep(t + 1_999)  # expired at t + 1000, in its grace until t + 2000
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    await engine.sweep(t + 2_000)
    assert await engine.history.position(CH) == NO_STREAM
    page = await engine.history.read(CH, since=1, now=t + 2_000)
    assert (page.publications, page.position) == ([], NO_STREAM)
    assert await engine.held_state() == {}
    again = await publish(engine, "b", t + 2_000, retention=retention)
    assert again.offset == 1
    assert again.epoch not in ("", first.epoch)


async def test_a_channel_with_history_is_kept_while_subscribed(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=5))
    retention = keep(10, ttl=1)
    # Published 10 s ago: expired, and past its grace (at t + 6 s), but subscribed.
    t = now_ms() - 10_000
    first = await publish(engine, "a", t, retention=retention)
    await engine.broker.subscribe(CH)
    await engine.sweep(now_ms())
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    await engine.sweep(now_ms() + 60_000)  # however long it stays subscribed
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    page = await engine.history.read(CH, since=1)
    assert (page.publications, page.complete) == ([], True)  # a subscriber at 1 is in sync
    before = now_ms()
    await engine.broker.unsubscribe(CH)
    await engine.settle()  # the unsubscribe is done
    after = now_ms()
    # The grace runs from when the last subscriber left.
    await engine.sweep(before + 4_999)
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    await engine.sweep(after + 5_000)
    assert await engine.history.position(CH) == NO_STREAM
    assert await engine.held_state() == {}


async def test_a_channel_with_messages_that_never_expire_is_kept(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=1))
    first = await publish(engine, "a", T0, retention=keep(10, ttl=0))
    ten_years = 10 * 365 * 24 * 3600 * 1000
    await engine.sweep(now_ms() + ten_years)
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)


@pytest.mark.parametrize("retention", [*RETENTIONS, pytest.param(keep(10, ttl=60), id="ttl")])
async def test_a_channel_made_for_a_subscriber_who_never_came_lives_the_grace(
    launch: Launcher, retention: Retention
) -> None:
    """`position(create=...)` makes a channel (a subscribe that failed after it, say):
    it is kept for the grace from then, and forgotten after."""
    engine = await launch(Tuning(grace=1))
    engine.requires("driven_clock")
    before = now_ms()
    created = await engine.history.position(CH, create=retention)
    after = now_ms()
    await engine.sweep(before + 999)
    assert await engine.history.position(CH) == created
    await engine.sweep(after + 1_000)
    assert await engine.history.position(CH) == NO_STREAM
    assert await engine.held_state() == {}


async def test_a_created_channel_without_messages_is_forgotten_after_the_grace(
    launch: Launcher,
) -> None:
    engine = await launch(Tuning(grace=1))
    await engine.broker.subscribe(CH)
    created = await engine.history.position(CH, create=keep(10, ttl=60))
    await engine.broker.unsubscribe(CH)
    await engine.settle()  # the unsubscribe is done
    after = now_ms()
    await engine.sweep(after + 1_000)
    assert await engine.history.position(CH) == NO_STREAM
    assert created.epoch
    assert await engine.held_state() == {}


@pytest.mark.parametrize("retention", RETENTIONS)
async def test_max_channels_refuses_only_new_channels_of_a_full_namespace(
    engine: Harness, retention: Retention
) -> None:
    limited = Retention(retention.size, max_channels=2, namespace="ns")
    for channel in ("ns:a", "ns:b", "ns:c"):
        await engine.broker.subscribe(channel)  # without history, only these hold state
    a = await publish(engine, "a", channel="ns:a", retention=limited)
    await publish(engine, "b", channel="ns:b", retention=limited)
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("c", channel="ns:c"), limited)
    with pytest.raises(Unavailable):
        await engine.history.position("ns:c", create=limited)
    assert await engine.history.position("ns:c") == NO_STREAM
    again = await publish(engine, "a2", T0 + 1, channel="ns:a", retention=limited)
    assert (again.offset, again.epoch) == (2, a.epoch)
    # Another namespace counts its own channels.
    other = Retention(retention.size, max_channels=2, namespace="other")
    assert (await publish(engine, "o", channel="other:a", retention=other)).offset == 1
    marker = await fence(engine, "ns:a", limited)
    assert [pub.data for pub in engine.sink.of("ns:c")] == []
    assert engine.sink.of("ns:a")[-1] == marker


async def test_a_forgotten_channel_frees_its_slot(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=1))
    t = now_ms()
    limited = Retention(10, ttl=1, max_channels=1, namespace="ns")
    await publish(engine, "a", t, channel="ns:a", retention=limited)
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("b", t, channel="ns:b"), limited)
    await engine.sweep(t + 2_000)
    assert (await publish(engine, "b", t + 2_000, channel="ns:b", retention=limited)).offset == 1


async def test_forgetting_a_channel_frees_one_slot(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=1))
    t = now_ms()
    full = Retention(10, ttl=1, max_channels=2, namespace="ns")
    for name in ("ns:a", "ns:b"):
        await publish(engine, "x", t, channel=name, retention=full)
    await publish(engine, "y", t + 60_000, channel="ns:b", retention=full)  # b is kept
    await engine.sweep(t + 3_000)  # ns:a expired, and its grace is over
    assert await engine.history.position("ns:a") == NO_STREAM
    await publish(engine, "c", t + 3_000, channel="ns:c", retention=full)
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("d", t + 3_000, channel="ns:d"), full)


async def test_a_full_namespace_says_which_and_how_many(engine: Harness) -> None:
    named = Retention(10, max_channels=1, namespace="x")
    await publish(engine, 1, channel="x:a", retention=named)
    with pytest.raises(Unavailable) as refused:
        await engine.broker.publish(message(1, channel="x:b"), named)
    assert refused.value.message == "namespace x holds its maximum of 1 channels: try again later"
    default = Retention(10, max_channels=2)
    await publish(engine, 1, channel="a", retention=default)
    await publish(engine, 1, channel="b", retention=default)
    with pytest.raises(Unavailable) as refused:
        await engine.history.position("c", create=default)
    assert refused.value.message == (
        "namespace default holds its maximum of 2 channels: try again later"
    )


async def test_a_sweep_passes_over_subscribed_channels(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=1))
    t = now_ms()
    retention = keep(10, ttl=1)
    kept = await publish(engine, "a", t, channel="chat:a", retention=retention)
    await publish(engine, "b", t, channel="chat:b", retention=retention)
    await engine.broker.subscribe("chat:a")
    await engine.settle()
    await engine.sweep(t + 60_000)
    assert await engine.history.position("chat:a") == StreamPosition(1, kept.epoch)
    assert await engine.history.position("chat:b") == NO_STREAM


async def test_unsubscribing_frees_the_slot_of_a_channel_without_history(
    engine: Harness,
) -> None:
    engine.requires("forgets_unused_at_once")
    limited = Retention(0, max_channels=1, namespace="ns")
    await engine.broker.subscribe("ns:a")
    await engine.broker.subscribe("ns:b")
    await publish(engine, "a", channel="ns:a", retention=limited)
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("b", channel="ns:b"), limited)
    await engine.broker.unsubscribe("ns:a")
    assert (await publish(engine, "b", channel="ns:b", retention=limited)).offset == 1


# -- restarts and lost state ---------------------------------------------------


async def test_restart_keeps_or_renews_the_stream(engine: Harness) -> None:
    published = [await publish(engine, n, T0 + n) for n in range(3)]
    epoch = published[0].epoch
    await engine.restart()
    await engine.broker.subscribe(CH)
    following = await publish(engine, "next", T0 + 3)
    if engine.kind.persistent:
        assert (following.offset, following.epoch) == (4, epoch)
        assert (await engine.history.read(CH)).publications == [*published, following]
    else:
        # A client at offset 3 of the old epoch is told its position is gone.
        assert following.offset == 1
        assert following.epoch not in ("", epoch)
        assert (await engine.history.read(CH)).publications == [following]
    await engine.sink.wait_for(lambda: following in engine.sink.of(CH))
    assert engine.sink.of(CH) == [following]


async def test_lost_meta_gives_a_new_epoch(engine: Harness) -> None:
    published = [await publish(engine, n, T0 + n) for n in range(3)]
    await engine.lose_meta(CH)
    position = await engine.history.position(CH)
    assert position.epoch != published[0].epoch
    following = await publish(engine, "next", T0 + 3)
    assert following.epoch not in ("", published[0].epoch)
    assert following.offset == position.offset + 1
    page = await engine.history.read(CH, since=0)
    # Never the old epoch's messages presented as the new one's.
    assert all(pub.epoch == following.epoch for pub in page.publications)
    assert "next" in [pub.data for pub in page.publications]
    assert [pub.data for pub in page.publications if pub.data != "next"] == []


async def test_health_is_ok_when_started(engine: Harness) -> None:
    assert engine.broker.health()["status"] == "ok"
    assert engine.history.health()["status"] == "ok"
    assert engine.presence.health()["status"] == "ok"


async def test_nodes_lists_this_node(engine: Harness) -> None:
    # An engine shared by nodes reports to its registry in the background.
    async with asyncio.timeout(TIMEOUT):
        nodes = await engine.broker.nodes()
        while engine.sink.info() not in nodes:
            await asyncio.sleep(0.01)  # sleep-ok: polls the shared registry, bounded
            nodes = await engine.broker.nodes()
    assert nodes == [engine.sink.info()]  # this node only
