"""What only the SQLite engine promises, or can be made to show.

The writer thread's `before_commit` hook (`CommitGate` here) stops a batch
between its statements and its COMMIT, so the tests can look at the engine
while a batch is written but not committed: that is how "nothing is
acknowledged or delivered before it is committed" is checked on every run,
not only when a race happens to open the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from plexus.engines.base import Retention
from plexus.engines.memory import now_ms
from plexus.engines.sqlite import SqliteBroker
from plexus.exceptions import Unavailable
from plexus.models import Publication, StreamPosition
from tests.engines.conftest import ENGINES
from tests.engines.harness import (
    CH,
    NO_HISTORY,
    T0,
    EngineKind,
    Harness,
    keep,
    message,
    offsets,
    publish,
)
from tests.helpers import TIMEOUT


@pytest.fixture(params=[pytest.param(k, id=k.name) for k in ENGINES if k.name.startswith("sqlite")])
def kind(request: pytest.FixtureRequest) -> EngineKind:
    """The engine suites' fixtures (`engine`, `launch`), for the SQLite engines only."""
    chosen: EngineKind = request.param
    return chosen


def writer_of(engine: Harness) -> SqliteBroker:
    assert isinstance(engine.broker, SqliteBroker)
    return engine.broker


class CommitGate:
    """The writer's `before_commit` hook: holds chosen batches before their COMMIT.

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


@pytest.fixture
async def gate(engine: Harness) -> AsyncIterator[CommitGate]:
    """A `CommitGate` on the engine's writer, opened at the end so that a failed
    test does not leave a batch held."""
    installed = CommitGate()
    writer_of(engine).before_commit = installed
    yield installed
    installed.open()


async def put(store: SqliteBroker, pub: Publication, retention: Retention) -> Publication:
    """Publish straight to a store that no harness runs; the message must be stored."""
    result = await store.publish(pub, retention)
    assert isinstance(result, Publication)
    return result


async def yield_to_the_loop() -> None:
    """Let every callback already scheduled on the loop run (a wrong writer's early
    acknowledgement would be one of them)."""
    for _ in range(10):
        await asyncio.sleep(0)  # sleep-ok: yields to the loop, waits for nothing


# -- commit before acknowledgement ---------------------------------------------


async def test_nothing_is_acknowledged_or_delivered_before_the_commit(
    engine: Harness, gate: CommitGate
) -> None:
    await engine.broker.subscribe(CH)
    first = await publish(engine, "committed", T0)
    gate.hold(lambda pub: pub.data == "held")
    pending = asyncio.create_task(publish(engine, "held", T0 + 1))
    await gate.held()
    await yield_to_the_loop()
    # The row is written but not committed: a crash now would lose it.
    assert not pending.done()
    assert engine.sink.of(CH) == [first]
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    gate.open()
    second = await asyncio.wait_for(pending, TIMEOUT)
    assert (second.offset, second.epoch) == (2, first.epoch)
    assert engine.sink.of(CH) == [first, second]
    assert await engine.history.position(CH) == StreamPosition(2, first.epoch)


async def test_delivery_follows_offset_order_across_batches(
    engine: Harness, gate: CommitGate
) -> None:
    await engine.broker.subscribe(CH)
    gate.hold()
    finished: list[int] = []

    async def one(n: int) -> Publication:
        pub = await publish(engine, {"n": n}, T0 + n)
        finished.append(pub.offset)
        return pub

    tasks = [asyncio.create_task(one(0))]
    await gate.held()  # batch 1: message 0
    tasks += [asyncio.create_task(one(n)) for n in range(1, 5)]
    await yield_to_the_loop()  # the four queue their jobs behind the held batch
    gate.release()
    await gate.held()  # batch 2: messages 1 to 4, queued together
    assert offsets(engine.sink.of(CH)) == [1]
    assert finished == [1]
    tasks += [asyncio.create_task(one(n)) for n in range(5, 7)]
    await yield_to_the_loop()
    gate.release()
    await gate.held()  # batch 3: messages 5 and 6
    assert offsets(engine.sink.of(CH)) == [1, 2, 3, 4, 5]
    assert finished == [1, 2, 3, 4, 5]
    gate.open()
    published = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert offsets(list(published)) == [1, 2, 3, 4, 5, 6, 7]
    assert [pub.data for pub in published] == [{"n": n} for n in range(7)]
    assert engine.sink.of(CH) == list(published)
    assert finished == [1, 2, 3, 4, 5, 6, 7]


async def test_publishers_woken_by_deliveries_keep_the_order(engine: Harness) -> None:
    """Each delivery starts new publishes (as a node's handlers would) while
    other batches are being written and committed: every message still
    reaches the sink once, in offset order."""
    await engine.broker.subscribe(CH)
    spawned: list[asyncio.Task[Publication]] = []
    total = 150

    def more(pub: Publication) -> None:
        if pub.channel == CH and len(spawned) < total:
            for _ in range(2):
                n = len(spawned)
                spawned.append(asyncio.create_task(publish(engine, {"n": n}, T0 + n)))

    engine.sink.listeners.append(more)
    spawned.append(asyncio.create_task(publish(engine, {"n": 0}, T0)))
    await engine.sink.wait_for(lambda: len(engine.sink.of(CH)) >= len(spawned) >= total)
    published = await asyncio.wait_for(asyncio.gather(*spawned), TIMEOUT)
    seen = engine.sink.of(CH)
    assert offsets(seen) == list(range(1, len(published) + 1))
    assert sorted(offsets(list(published))) == offsets(seen)
    page = await engine.history.read(CH, since=0)
    assert page.publications == seen[-100:]  # the default retention keeps 100


async def test_publishes_complete_in_call_order(engine: Harness) -> None:
    finished: list[int] = []

    async def one(n: int) -> Publication:
        pub = await publish(engine, {"n": n}, T0 + n, retention=keep(500))
        finished.append(n)
        return pub

    published = await asyncio.gather(*(one(n) for n in range(200)))
    assert offsets(list(published)) == list(range(1, 201))
    assert [p.data for p in published] == [{"n": n} for n in range(200)]
    assert finished == list(range(200))


async def test_a_cancelled_publish_is_still_committed_and_delivered(
    engine: Harness, gate: CommitGate
) -> None:
    await engine.broker.subscribe(CH)
    gate.hold()
    pending = asyncio.create_task(publish(engine, "cancelled", T0))
    await gate.held()
    pending.cancel()
    gate.open()
    with pytest.raises(asyncio.CancelledError):
        await pending
    following = await publish(engine, "next", T0 + 1)
    assert following.offset == 2  # the cancelled one used offset 1
    assert [pub.data for pub in engine.sink.of(CH)] == ["cancelled", "next"]
    assert [pub.data for pub in (await engine.history.read(CH)).publications] == [
        "cancelled",
        "next",
    ]


async def test_channels_without_history_do_not_wait_for_the_writer(
    engine: Harness, gate: CommitGate
) -> None:
    await engine.broker.subscribe("live:x")
    gate.hold()
    pending = asyncio.create_task(publish(engine, "stored", T0))
    await gate.held()
    inline = engine.broker.publish_nowait(message("now", channel="live:x"), NO_HISTORY)
    assert isinstance(inline, Publication)
    assert inline.offset == 1
    awaited = await asyncio.wait_for(
        engine.broker.publish(message("soon", channel="live:x"), NO_HISTORY), TIMEOUT
    )
    assert isinstance(awaited, Publication)
    assert awaited.offset == 2
    assert [pub.data for pub in engine.sink.publications] == ["now", "soon"]
    assert not pending.done()
    gate.open()
    assert (await asyncio.wait_for(pending, TIMEOUT)).offset == 1


# -- failures --------------------------------------------------------------------


async def test_a_failed_batch_leaves_no_gap(engine: Harness, gate: CommitGate) -> None:
    await engine.broker.subscribe(CH)
    first = await publish(engine, "a", T0)
    gate.fail = sqlite3.OperationalError("disk I/O error")  # after the row is written
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("boom", T0 + 1), keep())
    health = engine.broker.health()
    assert health["status"] == "down"
    assert "disk I/O error" in health["error"]
    assert await engine.history.position(CH) == StreamPosition(1, first.epoch)
    second = await publish(engine, "b", T0 + 2)
    assert (second.offset, second.epoch) == (2, first.epoch)
    assert engine.broker.health()["status"] == "ok"
    page = await engine.history.read(CH, since=0)
    assert [(p.offset, p.data) for p in page.publications] == [(1, "a"), (2, "b")]
    assert page.complete
    assert engine.sink.of(CH) == [first, second]


async def test_a_failed_batch_fails_every_job_and_forgets_what_it_created(
    engine: Harness, gate: CommitGate
) -> None:
    limited = Retention(10, max_channels=2, namespace="x")
    gate.hold()
    pending = asyncio.create_task(publish(engine, "held", T0))
    await gate.held()
    # Queued behind the held batch, so they make up the next one, which fails.
    doomed = [
        asyncio.create_task(publish(engine, "a", T0, channel="x:a", retention=limited)),
        asyncio.create_task(publish(engine, "b", T0, channel="x:b", retention=limited)),
        asyncio.create_task(publish(engine, "c", T0, channel=CH)),
        asyncio.create_task(engine.history.read(CH, since=0)),
    ]
    await yield_to_the_loop()
    gate.fail = sqlite3.OperationalError("disk I/O error")
    gate.open()
    assert (await asyncio.wait_for(pending, TIMEOUT)).offset == 1
    results = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), TIMEOUT)
    assert all(isinstance(result, Unavailable) for result in results), results
    # x:a and x:b were rolled back: they hold none of the namespace's two slots.
    assert (await publish(engine, "c", T0, channel="x:c", retention=limited)).offset == 1
    assert (await publish(engine, "d", T0, channel="x:d", retention=limited)).offset == 1
    assert (await publish(engine, "c2", T0 + 1)).offset == 2
    assert await engine.history.positions(["x:a", "x:b"]) == {
        "x:a": StreamPosition(0, ""),
        "x:b": StreamPosition(0, ""),
    }


async def test_a_refused_publish_does_not_fail_its_batch(engine: Harness, gate: CommitGate) -> None:
    limited = Retention(10, max_channels=1, namespace="x")
    await publish(engine, "a", T0, channel="x:a", retention=limited)
    gate.hold(lambda pub: pub.data == "held")
    pending = asyncio.create_task(publish(engine, "held", T0))
    await gate.held()
    refused = asyncio.create_task(publish(engine, "b", T0, channel="x:b", retention=limited))
    accepted = asyncio.create_task(publish(engine, "ok", T0 + 1))
    await yield_to_the_loop()
    gate.open()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(refused, TIMEOUT)
    assert (await asyncio.wait_for(accepted, TIMEOUT)).offset == 2
    assert (await asyncio.wait_for(pending, TIMEOUT)).offset == 1
    assert engine.broker.health()["status"] == "ok"  # a full namespace is not a failure


async def test_an_unopenable_directory_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = SqliteBroker(blocker / "data")
    try:
        with pytest.raises(Unavailable):
            await store.start()
        assert store.health()["status"] == "down"
        with pytest.raises(Unavailable):
            await store.publish(message("x"), keep())
        with pytest.raises(Unavailable):
            await store.read(CH)
    finally:
        await store.close()


async def test_a_database_path_that_is_a_directory_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "h.db").mkdir()
    store = SqliteBroker(tmp_path / "h.db")
    try:
        with pytest.raises(Unavailable):
            await store.position(CH)
    finally:
        await store.close()


async def test_one_owner_per_database(tmp_path: Path) -> None:
    owner = SqliteBroker(tmp_path)
    intruder = SqliteBroker(tmp_path, busy_timeout=0)
    try:
        assert (await put(owner, message("x"), keep())).offset == 1
        with pytest.raises(Unavailable):
            await intruder.start()
        assert (await put(owner, message("y"), keep())).offset == 2
    finally:
        await intruder.close()
        await owner.close()


async def test_it_starts_lazily_and_refuses_after_close(tmp_path: Path) -> None:
    store = SqliteBroker(tmp_path / "deep" / "dir")
    assert not store.file.exists()  # the constructor touches nothing
    assert (await put(store, message("x"), keep())).offset == 1
    assert store.file.exists()
    await store.close()
    await store.close()
    with pytest.raises(Unavailable):
        await store.publish(message("y"), keep())
    with pytest.raises(Unavailable):
        await store.read(CH)
    with pytest.raises(Unavailable):
        await store.position(CH)


# -- the file ------------------------------------------------------------------


@contextlib.contextmanager
def database(file: Path) -> Iterator[sqlite3.Connection]:
    """The database file opened directly (the store that owns it is closed)."""
    with contextlib.closing(sqlite3.connect(file)) as db, db:
        yield db


async def test_sweep_deletes_expired_rows(tmp_path: Path) -> None:
    store = SqliteBroker(tmp_path, grace=1)
    t = now_ms()
    await store.publish(message("stale", t - 60_000), keep(10, ttl=1))
    await store.publish(message("fresh", t), keep(10, ttl=0))
    await store.publish(message("gone", t - 60_000, channel="chat:old"), keep(10, ttl=1))
    await store.publish(message("k", t, channel="chat:k"), keep(10), "key-1")
    assert await store.sweep(t) == ["chat:old"]
    await store.close()
    with database(store.file) as db:
        rows = db.execute('SELECT channel, "offset" FROM messages ORDER BY channel').fetchall()
        tops = db.execute("SELECT channel, top_offset FROM channels ORDER BY channel").fetchall()
        keys = db.execute("SELECT channel, key FROM idempotency").fetchall()
    assert rows == [("chat:k", 1), (CH, 2)]
    assert tops == [("chat:k", 1), (CH, 2)]
    assert keys == [("chat:k", "key-1")]  # remembered for the idempotency TTL (300 s)
    store = SqliteBroker(tmp_path, grace=1)
    await store.sweep(t + 300_000)
    await store.close()
    with database(store.file) as db:
        assert db.execute("SELECT count(*) FROM idempotency").fetchone() == (0,)


@pytest.mark.parametrize(
    ("boot", "mode", "same_epoch"),
    [("another-boot", "NORMAL", False), ("", "NORMAL", False), ("another-boot", "FULL", True)],
)
async def test_an_unclean_shutdown_before_a_reboot_renews_epochs(
    tmp_path: Path, boot: str, mode: str, same_epoch: bool
) -> None:
    store = SqliteBroker(tmp_path)
    published = [await put(store, message({"n": n}, T0 + n), keep()) for n in range(2)]
    await store.close()
    # What a run that was still open when the machine went down leaves behind.
    with database(store.file) as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('running', ?)", (f"{boot} {mode}",))
    reopened = SqliteBroker(tmp_path)
    try:
        position = await reopened.position(CH)
        assert position.offset == 2
        assert (position.epoch == published[0].epoch) is same_epoch
        page = await reopened.read(CH)
        assert [p.data for p in page.publications] == [{"n": 0}, {"n": 1}]
        assert {p.epoch for p in page.publications} == {position.epoch}
    finally:
        await reopened.close()


_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE channels (
    channel TEXT PRIMARY KEY, epoch TEXT NOT NULL,
    top_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE messages (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    PRIMARY KEY (channel, "offset")
);
CREATE INDEX messages_expires ON messages (expires) WHERE expires IS NOT NULL;
"""


def write_v1_database(file: Path, t: int) -> None:
    """A database as Plexus wrote it before the engines (schema 1): payloads in
    MessagePack, channels kept forever, no expiry nor namespace per channel."""

    def packed(data: Any) -> bytes:
        return msgpack.packb(data, use_bin_type=True)

    with database(file) as db:
        db.executescript(_V1_SCHEMA)
        db.executemany(
            "INSERT INTO channels VALUES (?, ?, ?, ?)",
            [
                ("chat:forever", "ep-forever", 3, T0),
                ("news:soon", "ep-news", 2, t),
                ("quiet", "ep-quiet", 5, T0),
            ],
        )
        db.executemany(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                # Offset 1 was trimmed; these never expire.
                ("chat:forever", 2, T0 + 1, None, "c-1", "alice", packed(V1_DATA)),
                ("chat:forever", 3, T0 + 2, None, None, None, packed("text")),
                ("news:soon", 1, t, t + 30_000, None, None, packed(1)),
                ("news:soon", 2, t, t + 60_000, None, None, packed(2)),
            ],
        )


V1_DATA = {"n": 1, "b": b"\x00\xff", "list": [b"", "你好"]}
GRACE_MS = 300_000  # what a migrated channel is kept for after its messages


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    file = tmp_path / "v1.db"
    before = now_ms()
    write_v1_database(file, before)
    store = SqliteBroker(file)
    try:
        assert await store.position("chat:forever") == StreamPosition(3, "ep-forever")
        page = await store.read("chat:forever", since=1)
        assert page.complete
        assert page.publications == [
            Publication("chat:forever", V1_DATA, 2, "ep-forever", T0 + 1, "c-1", "alice"),
            Publication("chat:forever", "text", 3, "ep-forever", T0 + 2),
        ]
        page = await store.read("news:soon", since=0, now=before)
        assert [p.data for p in page.publications] == [1, 2]
        assert await store.position("quiet") == StreamPosition(5, "ep-quiet")
        following = await put(store, message("next", channel="chat:forever"), keep())
        assert (following.offset, following.epoch) == (4, "ep-forever")
        # Channels were counted per namespace: chat:forever is one of "chat".
        with pytest.raises(Unavailable):
            await store.publish(
                message("x", channel="chat:new"), Retention(10, max_channels=1, namespace="chat")
            )
    finally:
        await store.close()
    after = now_ms()
    with database(file) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
        channels = {
            row[0]: row[1:]
            for row in db.execute("SELECT channel, namespace, expires_ms FROM channels")
        }
        data = db.execute(
            "SELECT data FROM messages WHERE channel = 'chat:forever' AND \"offset\" = 2"
        ).fetchone()[0]
    assert channels["chat:forever"] == ("chat", None)  # its messages never expire
    assert channels["news:soon"] == ("news", before + 60_000 + GRACE_MS)
    namespace, expires = channels["quiet"]
    assert namespace == ""
    assert before + GRACE_MS <= expires <= after + GRACE_MS
    assert bytes(data) == message(V1_DATA).raw  # the payload's JSON, as sent to clients

    # Opened again: already migrated, nothing changes; the sweep honours the new expiries.
    store = SqliteBroker(file)
    try:
        page = await store.read("chat:forever", since=1)
        assert [p.data for p in page.publications] == [V1_DATA, "text", "next"]
        forgotten = await store.sweep(after + 60_000 + GRACE_MS)
        assert sorted(forgotten) == ["news:soon", "quiet"]
        assert (await store.position("chat:forever")).epoch == "ep-forever"
    finally:
        await store.close()
