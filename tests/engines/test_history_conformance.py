"""The `HistoryStore` contract, for every engine in `ENGINES` (see conftest.py).

Messages are written the one way there is, `broker.publish`, and read back
with `history.read`, `position` and `positions`. Time is never waited for:
publications carry `time=` and reads pass `now=`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from plexus.engines.memory import now_ms
from plexus.models import Publication, StreamPosition
from tests.engines.harness import (
    CH,
    NO_HISTORY,
    T0,
    Harness,
    keep,
    message,
    offsets,
    publish,
    publish_many,
)

NO_STREAM = StreamPosition(0, "")


async def test_reads_of_an_unknown_channel_create_nothing(engine: Harness) -> None:
    assert await engine.history.position("chat:empty") == NO_STREAM
    page = await engine.history.read("chat:empty", since=0)
    assert page.publications == []
    assert page.complete  # nothing was ever published after 0
    assert page.position == NO_STREAM
    assert await engine.history.positions(["chat:empty", "chat:other"]) == {
        "chat:empty": NO_STREAM,
        "chat:other": NO_STREAM,
    }
    # Asked again: still nothing (the reads above made no stream).
    assert await engine.history.position("chat:empty") == NO_STREAM
    assert await engine.held_state() == {}


async def test_position_with_create_makes_the_channel(engine: Harness) -> None:
    created = await engine.history.position(CH, create=keep())
    assert created.offset == 0
    assert created.epoch
    assert await engine.history.position(CH) == created
    assert await engine.history.position(CH, create=keep()) == created  # not made twice
    assert (await engine.history.read(CH, since=0)).position == created
    first = await publish(engine, "x")
    assert (first.offset, first.epoch) == (1, created.epoch)


async def test_offsets_start_at_one_and_grow_by_one(engine: Harness) -> None:
    published = await publish_many(engine, 5)
    assert offsets(published) == [1, 2, 3, 4, 5]
    epoch = published[0].epoch
    assert epoch
    assert {p.epoch for p in published} == {epoch}
    assert await engine.history.position(CH) == StreamPosition(5, epoch)


async def test_channels_count_separately(engine: Harness) -> None:
    a = await publish_many(engine, 3, channel="chat:a")
    b = await publish_many(engine, 2, channel="chat:b")
    assert offsets(b) == [1, 2]
    assert await engine.history.positions(["chat:a", "chat:b", "chat:c"]) == {
        "chat:a": StreamPosition(3, a[0].epoch),
        "chat:b": StreamPosition(2, b[0].epoch),
        "chat:c": NO_STREAM,
    }


async def test_publish_returns_the_publication_it_was_given(engine: Harness) -> None:
    pub = message({"text": "hi"}, T0, client="c-1", user="u")
    returned = await engine.broker.publish(pub, keep(5))
    assert returned is pub  # offset and epoch filled in
    assert pub == Publication(CH, {"text": "hi"}, 1, pub.epoch, T0, "c-1", "u")
    anonymous = await publish(engine, "x", T0 + 1)
    assert (anonymous.client, anonymous.user) == (None, None)
    page = await engine.history.read(CH)
    assert page.publications == [pub, anonymous]


async def test_read_is_oldest_first_after_since_with_limit(engine: Harness) -> None:
    published = await publish_many(engine, 5)
    page = await engine.history.read(CH)
    assert page.publications == published
    assert page.complete
    assert page.position == StreamPosition(5, published[0].epoch)
    assert offsets((await engine.history.read(CH, since=2)).publications) == [3, 4, 5]
    limited = await engine.history.read(CH, since=2, limit=2)
    assert offsets(limited.publications) == [3, 4]
    assert limited.complete  # cut by the caller's limit, nothing missing
    assert limited.position.offset == 5
    assert offsets((await engine.history.read(CH, limit=1)).publications) == [1]
    # A limit that takes exactly what is left: nothing follows the page.
    rest = await engine.history.read(CH, since=3, limit=2)
    assert offsets(rest.publications) == [4, 5]
    assert rest.complete


async def test_read_at_the_top_is_empty_and_complete(engine: Harness) -> None:
    await publish_many(engine, 3)
    page = await engine.history.read(CH, since=3)
    assert page.publications == []
    assert page.complete


async def test_read_beyond_the_top_is_not_complete(engine: Harness) -> None:
    # A position this epoch never issued cannot be recovered from.
    await publish_many(engine, 3)
    page = await engine.history.read(CH, since=7)
    assert page.publications == []
    assert not page.complete


async def test_size_keeps_the_newest(engine: Harness) -> None:
    await publish_many(engine, 5, retention=keep(3))
    page = await engine.history.read(CH)
    assert offsets(page.publications) == [3, 4, 5]
    assert [p.data for p in page.publications] == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert not page.complete  # offsets 1 and 2 are gone
    assert (await engine.history.read(CH, since=2)).complete
    assert offsets((await engine.history.read(CH, since=3)).publications) == [4, 5]


async def test_size_one_keeps_the_last(engine: Harness) -> None:
    await publish_many(engine, 3, retention=keep(1))
    page = await engine.history.read(CH, since=2)
    assert offsets(page.publications) == [3]
    assert page.complete


async def test_read_after_nothing_is_not_complete(engine: Harness) -> None:
    # Nothing was published in a channel that does not exist: no offset above 0 was issued.
    page = await engine.history.read("chat:empty", since=4)
    assert page.publications == []
    assert not page.complete
    assert page.position == NO_STREAM


async def test_since_older_than_kept_is_not_complete(engine: Harness) -> None:
    await publish_many(engine, 5, retention=keep(3))
    for since in (0, 1):
        page = await engine.history.read(CH, since=since)
        assert offsets(page.publications) == [3, 4, 5]
        assert not page.complete
    page = await engine.history.read(CH, since=1, limit=1)
    assert offsets(page.publications) == [3]
    assert not page.complete
    assert not (await engine.history.read(CH, since=1, limit=0)).complete
    assert (await engine.history.read(CH, since=2, limit=0)).complete


async def test_smaller_size_trims_on_next_publish(engine: Harness) -> None:
    await publish_many(engine, 5, retention=keep(10))
    await publish(engine, "last", T0 + 9, retention=keep(2))
    page = await engine.history.read(CH, since=4)
    assert offsets(page.publications) == [5, 6]
    assert page.complete


async def test_size_zero_keeps_no_message_but_a_subscribed_channel_counts(
    engine: Harness,
) -> None:
    await engine.broker.subscribe(CH)
    published = await publish_many(engine, 3, retention=NO_HISTORY)
    assert offsets(published) == [1, 2, 3]
    page = await engine.history.read(CH, since=0)
    assert page.publications == []
    assert not page.complete
    assert page.position == StreamPosition(3, published[0].epoch)
    assert (await engine.history.read(CH, since=3)).complete


async def test_ttl_expires_messages_by_age(engine: Harness) -> None:
    first = await publish(engine, "a", T0, retention=keep(10, 10))
    second = await publish(engine, "b", T0 + 5_000, retention=keep(10, 10))
    page = await engine.history.read(CH, since=0, now=T0 + 9_999)
    assert page.publications == [first, second]
    assert page.complete
    page = await engine.history.read(CH, since=0, now=T0 + 10_000)
    assert page.publications == [second]
    assert not page.complete
    assert (await engine.history.read(CH, since=1, now=T0 + 10_000)).complete
    page = await engine.history.read(CH, since=1, now=T0 + 15_000)
    assert page.publications == []
    assert not page.complete
    # The counter and epoch outlive the messages.
    assert page.position == await engine.history.position(CH)
    assert page.position == StreamPosition(2, first.epoch)
    third = await publish(engine, "c", T0 + 15_000, retention=keep(10, 10))
    assert (third.offset, third.epoch) == (3, first.epoch)


async def test_ttl_zero_never_expires(engine: Harness) -> None:
    await publish_many(engine, 2, retention=keep(100, 0))
    ten_years = 10 * 365 * 24 * 3600 * 1000
    page = await engine.history.read(CH, now=T0 + ten_years)
    assert offsets(page.publications) == [1, 2]
    assert page.complete


async def test_default_now_is_the_wall_clock(engine: Harness) -> None:
    await publish(engine, "old", now_ms() - 60_000, retention=keep(10, 30))
    await publish(engine, "new", now_ms(), retention=keep(10, 30))
    assert [p.data for p in (await engine.history.read(CH)).publications] == ["new"]


async def test_bytes_and_json_values_round_trip(engine: Harness) -> None:
    payloads: list[Any] = [
        {"blob": b"\x00\xff\x80", "list": [b"", {"k": "你好世界"}], "n": None},
        b"\x01raw",
        [1, -2, 1.5, True, False, "", {"nested": {"deep": [b"z"]}}],
        "😀 text",
        None,
        {"$bytes": "not alone", "other": 1},  # not a bytes wrapper: two keys
    ]
    for n, data in enumerate(payloads):
        await publish(engine, data, T0 + n)
    page = await engine.history.read(CH)
    assert [p.data for p in page.publications] == payloads
    # What is stored is the payload's compact JSON, byte for byte.
    assert [p.raw for p in page.publications] == [message(d).raw for d in payloads]


async def test_read_max_bytes_cuts_the_page(engine: Harness) -> None:
    # "xxxxxxxx" is 10 bytes of JSON with its quotes.
    for n in range(5):
        await publish(engine, "x" * 8, T0 + n)
    page = await engine.history.read(CH, since=0, max_bytes=30)
    assert offsets(page.publications) == [1, 2, 3]
    assert not page.complete  # the caller cannot have it all within its budget
    page = await engine.history.read(CH, since=0, max_bytes=49)
    assert offsets(page.publications) == [1, 2, 3, 4]
    assert not page.complete
    page = await engine.history.read(CH, since=0, max_bytes=50)
    assert offsets(page.publications) == [1, 2, 3, 4, 5]
    assert page.complete
    page = await engine.history.read(CH, since=2, max_bytes=0)
    assert page.publications == []
    assert not page.complete
    page = await engine.history.read(CH, since=5, max_bytes=0)
    assert page.publications == []
    assert page.complete  # nothing after 5: nothing left out


async def test_read_limit_within_max_bytes_is_complete(engine: Harness) -> None:
    # A page cut by `limit` alone is complete, even when the messages after
    # it would not fit in `max_bytes`: the caller asked for no more.
    for n in range(5):
        await publish(engine, "x" * 8, T0 + n)
    page = await engine.history.read(CH, since=0, limit=2, max_bytes=20)
    assert offsets(page.publications) == [1, 2]
    assert page.complete
    page = await engine.history.read(CH, since=1, limit=2, max_bytes=25)
    assert offsets(page.publications) == [2, 3]
    assert page.complete
    page = await engine.history.read(CH, since=1, limit=0, max_bytes=0)
    assert page.publications == []
    assert page.complete
    page = await engine.history.read(CH, since=0, limit=3, max_bytes=20)
    assert offsets(page.publications) == [1, 2]
    assert not page.complete  # this one was cut by the bytes


async def test_retention_max_bytes_trims_the_oldest(engine: Harness) -> None:
    retention = keep(100, max_bytes=30)
    for n in range(5):
        await publish(engine, "x" * 8, T0 + n, retention=retention)  # 10 bytes each
    page = await engine.history.read(CH, since=0)
    assert offsets(page.publications) == [3, 4, 5]
    assert not page.complete
    assert (await engine.history.read(CH, since=2)).complete
    await publish(engine, "y" * 23, T0 + 5, retention=retention)  # 25 bytes: 10 + 25 > 30
    assert offsets((await engine.history.read(CH)).publications) == [6]
    # The newest message is always kept, even beyond the limit.
    big = await publish(engine, "z" * 40, T0 + 6, retention=retention)
    assert (await engine.history.read(CH)).publications == [big]
    await publish(engine, "x" * 8, T0 + 7, retention=retention)
    assert offsets((await engine.history.read(CH)).publications) == [8]
    assert (await engine.history.position(CH)).offset == 8


async def test_size_and_byte_limits_trim_together(engine: Harness) -> None:
    """Whichever limit trims first, the other counts what is really kept."""
    retention = keep(3, max_bytes=30)
    for n in range(4):
        await publish(engine, "x" * 8, T0 + n, retention=retention)  # 10 bytes each
    assert offsets((await engine.history.read(CH)).publications) == [2, 3, 4]  # by size
    await publish(engine, "y" * 18, T0 + 4, retention=retention)  # 20 bytes
    # By size (2 goes), then by bytes (3 goes): 10 + 20 bytes are left.
    assert offsets((await engine.history.read(CH)).publications) == [4, 5]
    await publish(engine, "z" * 8, T0 + 5, retention=retention)
    assert offsets((await engine.history.read(CH)).publications) == [5, 6]


async def test_expired_messages_free_their_bytes(engine: Harness) -> None:
    retention = keep(10, 10, max_bytes=30)
    await publish(engine, "a" * 8, T0, retention=retention)  # 10 bytes
    await publish(engine, "b" * 18, T0 + 1, retention=retention)  # 20 bytes
    later = T0 + 20_000  # both expired
    for n in range(3):
        await publish(engine, "c" * 8, later + n, retention=retention)
    page = await engine.history.read(CH, since=2, now=later + 3)
    assert offsets(page.publications) == [3, 4, 5]  # 30 bytes: nothing trimmed
    assert page.complete


async def test_a_ttl_of_one_second(engine: Harness) -> None:
    first = await publish(engine, "a", T0, retention=keep(10, 1))
    assert (await engine.history.read(CH, now=T0 + 999)).publications == [first]
    assert (await engine.history.read(CH, now=T0 + 1_000)).publications == []


async def test_epoch_is_stable(engine: Harness) -> None:
    epoch = (await engine.history.position(CH, create=keep(1))).epoch
    assert (await engine.history.position(CH)).epoch == epoch
    await publish_many(engine, 2, retention=keep(1))
    assert (await engine.history.read(CH)).position.epoch == epoch
    assert (await engine.history.position(CH)).epoch == epoch


async def test_restart(engine: Harness) -> None:
    published = await publish_many(engine, 3, retention=keep(2))
    await engine.restart()
    position = await engine.history.position(CH)
    page = await engine.history.read(CH, since=1)
    if engine.kind.persistent:
        assert position == StreamPosition(3, published[0].epoch)
        assert page.publications == published[1:]
        assert page.complete
        following = await publish(engine, "next", T0 + 3, retention=keep(2))
        assert (following.offset, following.epoch) == (4, published[0].epoch)
    else:
        assert position == NO_STREAM
        assert page.publications == []
        following = await publish(engine, "next", T0 + 3, retention=keep(2))
        assert following.offset == 1
        assert following.epoch not in ("", published[0].epoch)


async def test_concurrent_publishes_get_consecutive_offsets(engine: Harness) -> None:
    published = await asyncio.gather(
        *(publish(engine, {"n": n}, T0 + n, retention=keep(500)) for n in range(200))
    )
    assert sorted(offsets(published)) == list(range(1, 201))
    assert len({p.epoch for p in published}) == 1
    page = await engine.history.read(CH)
    assert page.complete
    assert page.publications == sorted(published, key=lambda p: p.offset)


async def test_concurrent_publishes_to_two_channels(engine: Harness) -> None:
    published = await asyncio.gather(
        *(publish(engine, n, T0, channel=f"chat:{n % 2}") for n in range(100))
    )
    for parity in (0, 1):
        mine = [p for p in published if p.channel == f"chat:{parity}"]
        assert sorted(offsets(mine)) == list(range(1, 51))
        assert sorted(p.data for p in mine) == list(range(parity, 100, 2))
        page = await engine.history.read(f"chat:{parity}")
        assert page.publications == sorted(mine, key=lambda p: p.offset)


async def test_positions_of_channels_with_and_without_history(engine: Harness) -> None:
    await engine.broker.subscribe("live:a")
    live = [await publish(engine, n, channel="live:a", retention=NO_HISTORY) for n in range(2)]
    kept = await publish(engine, "x")
    assert await engine.history.positions(["live:a", CH, "chat:none"]) == {
        "live:a": StreamPosition(2, live[0].epoch),
        CH: StreamPosition(1, kept.epoch),
        "chat:none": NO_STREAM,
    }
