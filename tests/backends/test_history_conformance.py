"""One suite for every `HistoryStore`: add a line to `BACKENDS` to cover a new one.

Time is never waited for: appends pass `time=` and reads pass `now=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import pytest

from plexus.exceptions import Unavailable
from plexus.history import sqlite as sqlite_history
from plexus.history.base import HistoryStore
from plexus.history.memory import MemoryHistoryStore, now_ms
from plexus.history.sqlite import SqliteHistoryStore
from plexus.models import Publication


class Store(HistoryStore, Protocol):
    async def start(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Backend:
    """How to make one implementation.

    `make(place)` called again with the same place stands for a restart;
    `persistent` says whether the restarted store keeps epoch, offsets and messages.
    """

    make: Callable[[Path], Store]
    persistent: bool


BACKENDS = [
    pytest.param(Backend(lambda place: MemoryHistoryStore(), persistent=False), id="memory"),
    pytest.param(Backend(lambda place: SqliteHistoryStore(place), persistent=True), id="sqlite"),
    pytest.param(
        Backend(lambda place: SqliteHistoryStore(place / "h.db", synchronous="FULL"), True),
        id="sqlite-full",
    ),
]

T0 = 1_764_129_600_000  # publication times are fixed; `now=` moves the clock
CH = "chat:lobby"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    chosen: Backend = request.param
    return chosen


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[Store]:
    history = backend.make(tmp_path)
    await history.start()
    yield history
    await history.close()


async def publish(
    store: Store, count: int, *, channel: str = CH, size: int = 100, ttl: float = 0, at: int = T0
) -> list[Publication]:
    return [
        await store.append(channel, {"n": n}, time=at + n, size=size, ttl=ttl) for n in range(count)
    ]


def offsets(publications: list[Publication]) -> list[int]:
    return [p.offset for p in publications]


async def test_new_channel_is_at_offset_zero_with_an_epoch(store: Store) -> None:
    position = await store.position(CH)
    assert position.offset == 0
    assert isinstance(position.epoch, str)
    assert position.epoch


async def test_offsets_start_at_one_and_grow_by_one(store: Store) -> None:
    epoch = (await store.position(CH)).epoch
    published = await publish(store, 5)
    assert offsets(published) == [1, 2, 3, 4, 5]
    assert {p.epoch for p in published} == {epoch}
    position = await store.position(CH)
    assert (position.offset, position.epoch) == (5, epoch)


async def test_channels_count_separately(store: Store) -> None:
    await publish(store, 3, channel="chat:a")
    assert offsets(await publish(store, 2, channel="chat:b")) == [1, 2]
    assert (await store.position("chat:a")).offset == 3


async def test_append_returns_the_publication(store: Store) -> None:
    pub = await store.append(CH, {"text": "hi"}, time=T0, client="c-1", user="u", size=5, ttl=0)
    assert pub == Publication(CH, {"text": "hi"}, 1, pub.epoch, T0, "c-1", "u")
    anonymous = await store.append(CH, "x", time=T0 + 1, size=5, ttl=0)
    assert (anonymous.client, anonymous.user) == (None, None)
    page = await store.read(CH)
    assert page.publications == [pub, anonymous]


async def test_read_is_oldest_first_after_since_with_limit(store: Store) -> None:
    published = await publish(store, 5)
    page = await store.read(CH)
    assert page.publications == published
    assert page.complete
    assert (page.position.offset, page.position.epoch) == (5, published[0].epoch)
    assert offsets((await store.read(CH, since=2)).publications) == [3, 4, 5]
    limited = await store.read(CH, since=2, limit=2)
    assert offsets(limited.publications) == [3, 4]
    assert limited.complete
    assert limited.position.offset == 5
    assert offsets((await store.read(CH, limit=1)).publications) == [1]


async def test_read_at_the_top_is_empty_and_complete(store: Store) -> None:
    await publish(store, 3)
    page = await store.read(CH, since=3)
    assert page.publications == []
    assert page.complete


async def test_read_beyond_the_top_is_not_complete(store: Store) -> None:
    # A position this epoch never issued cannot be recovered from.
    await publish(store, 3)
    page = await store.read(CH, since=7)
    assert page.publications == []
    assert not page.complete


async def test_read_unknown_channel(store: Store) -> None:
    page = await store.read("chat:empty", since=0)
    assert page.publications == []
    assert page.complete
    assert page.position == await store.position("chat:empty")
    assert page.position.offset == 0


async def test_size_keeps_the_newest(store: Store) -> None:
    await publish(store, 5, size=3)
    page = await store.read(CH)
    assert offsets(page.publications) == [3, 4, 5]
    assert [p.data for p in page.publications] == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert not page.complete  # offsets 1 and 2 are gone
    assert (await store.read(CH, since=2)).complete
    assert offsets((await store.read(CH, since=3)).publications) == [4, 5]


async def test_since_older_than_kept_is_not_complete(store: Store) -> None:
    await publish(store, 5, size=3)
    for since in (0, 1):
        page = await store.read(CH, since=since)
        assert offsets(page.publications) == [3, 4, 5]
        assert not page.complete
    page = await store.read(CH, since=1, limit=1)
    assert offsets(page.publications) == [3]
    assert not page.complete
    assert not (await store.read(CH, since=1, limit=0)).complete
    assert (await store.read(CH, since=2, limit=0)).complete


async def test_smaller_size_trims_on_next_append(store: Store) -> None:
    await publish(store, 5, size=10)
    await store.append(CH, "last", time=T0 + 9, size=2, ttl=0)
    page = await store.read(CH, since=4)
    assert offsets(page.publications) == [5, 6]
    assert page.complete


async def test_size_zero_keeps_nothing_but_counts_offsets(store: Store) -> None:
    assert offsets(await publish(store, 3, size=0)) == [1, 2, 3]
    page = await store.read(CH, since=0)
    assert page.publications == []
    assert not page.complete
    assert page.position.offset == 3
    assert (await store.read(CH, since=3)).complete


async def test_ttl_expires_messages_by_age(store: Store) -> None:
    first = await store.append(CH, "a", time=T0, size=10, ttl=10)
    second = await store.append(CH, "b", time=T0 + 5_000, size=10, ttl=10)
    page = await store.read(CH, since=0, now=T0 + 9_999)
    assert page.publications == [first, second]
    assert page.complete
    page = await store.read(CH, since=0, now=T0 + 10_000)
    assert page.publications == [second]
    assert not page.complete
    assert (await store.read(CH, since=1, now=T0 + 10_000)).complete
    page = await store.read(CH, since=1, now=T0 + 15_000)
    assert page.publications == []
    assert not page.complete
    # The counter and epoch outlive the messages.
    assert page.position == await store.position(CH)
    assert (page.position.offset, page.position.epoch) == (2, first.epoch)
    third = await store.append(CH, "c", time=T0 + 15_000, size=10, ttl=10)
    assert (third.offset, third.epoch) == (3, first.epoch)


async def test_ttl_zero_never_expires(store: Store) -> None:
    await publish(store, 2, ttl=0)
    ten_years = 10 * 365 * 24 * 3600 * 1000
    page = await store.read(CH, now=T0 + ten_years)
    assert offsets(page.publications) == [1, 2]
    assert page.complete


async def test_default_now_is_the_wall_clock(store: Store) -> None:
    await store.append(CH, "old", time=now_ms() - 60_000, size=10, ttl=30)
    await store.append(CH, "new", time=now_ms(), size=10, ttl=30)
    assert [p.data for p in (await store.read(CH)).publications] == ["new"]


async def test_bytes_and_json_values_round_trip(store: Store) -> None:
    payloads: list[Any] = [
        {"blob": b"\x00\xff\x80", "list": [b"", {"k": "你好世界"}], "n": None},
        b"\x01raw",
        [1, -2, 1.5, True, False, "", {"nested": {"deep": [b"z"]}}],
        "😀 text",
        None,
    ]
    for n, data in enumerate(payloads):
        await store.append(CH, data, time=T0 + n, size=10, ttl=0)
    assert [p.data for p in (await store.read(CH)).publications] == payloads


async def test_epoch_is_stable(store: Store) -> None:
    epoch = (await store.position(CH)).epoch
    assert (await store.position(CH)).epoch == epoch
    await publish(store, 2, size=1)
    assert (await store.read(CH)).position.epoch == epoch
    assert (await store.position(CH)).epoch == epoch


async def test_restart(backend: Backend, tmp_path: Path) -> None:
    before = backend.make(tmp_path)
    await before.start()
    published = await publish(before, 3, size=2)
    await before.close()
    after = backend.make(tmp_path)
    await after.start()
    try:
        position = await after.position(CH)
        page = await after.read(CH, since=1)
        if backend.persistent:
            assert (position.offset, position.epoch) == (3, published[0].epoch)
            assert page.publications == published[1:]
            assert page.complete
            assert (await after.append(CH, "next", time=T0, size=2, ttl=0)).offset == 4
        else:
            assert position.offset == 0
            assert position.epoch != published[0].epoch
            assert page.publications == []
    finally:
        await after.close()


async def test_concurrent_appends_complete_in_call_order(store: Store) -> None:
    done: list[int] = []

    async def one(n: int) -> Publication:
        pub = await store.append(CH, {"n": n}, time=T0 + n, size=500, ttl=0)
        done.append(n)
        return pub

    published = await asyncio.gather(*(one(n) for n in range(200)))
    assert [p.offset for p in published] == list(range(1, 201))
    assert [p.data for p in published] == [{"n": n} for n in range(200)]
    assert done == list(range(200))
    page = await store.read(CH)
    assert page.publications == list(published)
    assert page.complete


async def test_concurrent_appends_to_two_channels(store: Store) -> None:
    calls = [store.append(f"chat:{n % 2}", n, time=T0, size=10, ttl=0) for n in range(100)]
    published = await asyncio.gather(*calls)
    for parity in (0, 1):
        mine = [p for p in published if p.channel == f"chat:{parity}"]
        assert [p.offset for p in mine] == list(range(1, 51))
        assert [p.data for p in mine] == list(range(parity, 100, 2))


async def test_append_nowait_is_append_or_nothing(store: Store) -> None:
    """Either every `append_nowait` stores at once (like `append`), or none stores anything."""
    first = store.append_nowait(CH, {"n": 0}, time=T0, size=10, ttl=0)
    if first is None:
        assert (await store.position(CH)).offset == 0
        assert store.append_nowait(CH, {"n": 1}, time=T0, size=10, ttl=0) is None
        assert (await store.read(CH)).publications == []
        return
    second = await store.append(CH, {"n": 1}, time=T0 + 1, size=10, ttl=0)
    third = store.append_nowait(CH, {"n": 2}, time=T0 + 2, size=10, ttl=0)
    assert third is not None
    assert offsets([first, second, third]) == [1, 2, 3]
    assert (await store.read(CH)).publications == [first, second, third]


# -- SQLite only --------------------------------------------------------------


async def test_sqlite_unopenable_directory_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = SqliteHistoryStore(blocker / "data")
    try:
        with pytest.raises(Unavailable):
            await store.start()
        with pytest.raises(Unavailable):
            await store.append(CH, "x", time=T0, size=1, ttl=0)
        with pytest.raises(Unavailable):
            await store.read(CH)
    finally:
        await store.close()


async def test_sqlite_database_path_that_is_a_directory_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "h.db").mkdir()
    store = SqliteHistoryStore(tmp_path / "h.db")
    try:
        with pytest.raises(Unavailable):
            await store.position(CH)
    finally:
        await store.close()


async def test_sqlite_one_owner_per_database(tmp_path: Path) -> None:
    owner = SqliteHistoryStore(tmp_path)
    intruder = SqliteHistoryStore(tmp_path, busy_timeout=0)
    try:
        await owner.append(CH, "x", time=T0, size=1, ttl=0)
        with pytest.raises(Unavailable):
            await intruder.start()
        assert (await owner.append(CH, "y", time=T0, size=1, ttl=0)).offset == 2
    finally:
        await intruder.close()
        await owner.close()


async def test_sqlite_failed_batch_leaves_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_append = sqlite_history._Writer._append
    poison = msgpack.packb("boom")

    def failing_append(writer: Any, conn: sqlite3.Connection, job: Any, dirty: Any) -> Any:
        position = real_append(writer, conn, job, dirty)  # the row is written, then lost
        if job.payload == poison:
            raise sqlite3.OperationalError("disk I/O error")
        return position

    monkeypatch.setattr(sqlite_history._Writer, "_append", failing_append)
    store = SqliteHistoryStore(tmp_path)
    try:
        assert (await store.append(CH, "a", time=T0, size=10, ttl=0)).offset == 1
        with pytest.raises(Unavailable):
            await store.append(CH, "boom", time=T0, size=10, ttl=0)
        assert (await store.position(CH)).offset == 1
        assert (await store.append(CH, "b", time=T0, size=10, ttl=0)).offset == 2
        page = await store.read(CH, since=0)
        assert [(p.offset, p.data) for p in page.publications] == [(1, "a"), (2, "b")]
        assert page.complete
    finally:
        await store.close()


async def test_sqlite_sweep_deletes_expired_rows(tmp_path: Path) -> None:
    store = SqliteHistoryStore(tmp_path, sweep_interval=0)
    await store.append(CH, "stale", time=now_ms() - 60_000, size=10, ttl=1)
    await store.append(CH, "fresh", time=now_ms(), size=10, ttl=0)
    await store.close()
    with contextlib.closing(sqlite3.connect(store.file)) as db:
        rows = db.execute('SELECT "offset" FROM messages').fetchall()
        top = db.execute("SELECT top_offset FROM channels").fetchall()
    assert rows == [(2,)]
    assert top == [(2,)]


async def test_sqlite_starts_lazily_and_refuses_after_close(tmp_path: Path) -> None:
    store = SqliteHistoryStore(tmp_path / "deep" / "dir")
    assert not store.file.exists()  # the constructor touches nothing
    assert (await store.append(CH, "x", time=T0, size=1, ttl=0)).offset == 1
    await store.close()
    await store.close()
    with pytest.raises(Unavailable):
        await store.append(CH, "y", time=T0, size=1, ttl=0)


@pytest.mark.parametrize(
    ("boot", "mode", "same_epoch"),
    [("another-boot", "NORMAL", False), ("", "NORMAL", False), ("another-boot", "FULL", True)],
)
async def test_sqlite_unclean_shutdown_before_a_reboot_renews_epochs(
    tmp_path: Path, boot: str, mode: str, same_epoch: bool
) -> None:
    store = SqliteHistoryStore(tmp_path)
    published = await publish(store, 2)
    await store.close()
    # What a run that was still open when the machine went down leaves behind.
    with contextlib.closing(sqlite3.connect(store.file)) as db, db:
        db.execute("INSERT INTO meta (key, value) VALUES ('running', ?)", (f"{boot} {mode}",))
    reopened = SqliteHistoryStore(tmp_path)
    try:
        position = await reopened.position(CH)
        assert position.offset == 2
        assert (position.epoch == published[0].epoch) is same_epoch
        page = await reopened.read(CH)
        assert [p.data for p in page.publications] == [{"n": 0}, {"n": 1}]
    finally:
        await reopened.close()
