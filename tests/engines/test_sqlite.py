"""What only the SQLite engine promises, or can be made to show.

The writer thread's `before_commit` hook (`CommitGate`, in the harness) stops a batch
between its statements and its COMMIT, so the tests can look at the engine
while a batch is written but not committed: that is how "nothing is
acknowledged or delivered before it is committed" is checked on every run,
not only when a race happens to open the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from plexus.engines.base import Retention
from plexus.engines.memory import now_ms
from plexus.engines.sqlite import SqliteBroker
from plexus.engines.sqlite import schema as sqlite_schema
from plexus.engines.sqlite import writer as sqlite_writer
from plexus.exceptions import Unavailable
from plexus.models import ClientInfo, Presence, Publication, StreamPosition
from tests.engines.conftest import ENGINES
from tests.engines.harness import (
    CH,
    NO_HISTORY,
    T0,
    CommitGate,
    EngineKind,
    Harness,
    Launcher,
    Tuning,
    keep,
    message,
    offsets,
    publish,
    yield_to_the_loop,
)
from tests.helpers import TIMEOUT, wait_for


@pytest.fixture(params=[pytest.param(k, id=k.name) for k in ENGINES if k.name.startswith("sqlite")])
def kind(request: pytest.FixtureRequest) -> EngineKind:
    """The engine suites' fixtures (`engine`, `launch`), for the SQLite engines only."""
    chosen: EngineKind = request.param
    return chosen


def writer_of(engine: Harness) -> SqliteBroker:
    assert isinstance(engine.broker, SqliteBroker)
    return engine.broker


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
        health = store.health()
        assert health["status"] == "down"
        assert health["error"].startswith("NotADirectoryError: ")  # the cause, as it was
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
    with pytest.raises(Unavailable) as closed:
        await store.publish(message("y"), keep())
    assert closed.value.message == "history store is closed"
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
    # The stale message shares its chunk with a newer one that never expires:
    # reads skip it until a trim drops the chunk.
    assert [p.offset for p in (await store.read(CH, since=0, now=t)).publications] == [2]
    await store.close()
    with database(store.file) as db:
        chunks = db.execute("SELECT DISTINCT channel FROM chunks ORDER BY channel").fetchall()
        tops = db.execute("SELECT channel, top_offset FROM channels ORDER BY channel").fetchall()
        keys = db.execute("SELECT channel, key FROM idempotency").fetchall()
    assert chunks == [("chat:k",), (CH,)]
    assert tops == [("chat:k", 1), (CH, 2)]
    assert keys == [("chat:k", "key-1")]  # remembered for the idempotency TTL (300 s)
    store = SqliteBroker(tmp_path, grace=1)
    await store.sweep(t + 300_000)
    await store.close()
    with database(store.file) as db:
        assert db.execute("SELECT count(*) FROM idempotency").fetchone() == (0,)


async def test_a_chunk_whose_newest_message_expired_is_deleted(tmp_path: Path) -> None:
    store = SqliteBroker(tmp_path)
    t = now_ms()
    await store.publish(message("a", t - 60_000), keep(10, ttl=1))
    await store.publish(message("b", t - 50_000), keep(10, ttl=1))
    assert await store.sweep(t) == []  # the channel is kept for its grace
    assert (await store.read(CH, since=0, now=t)).publications == []
    assert await store.position(CH) == StreamPosition(2, (await store.position(CH)).epoch)
    await store.close()
    with database(store.file) as db:
        assert db.execute("SELECT count(*) FROM chunks").fetchone() == (0,)


@pytest.mark.parametrize(
    ("boot", "mode", "same_epoch"),
    [("another-boot", "NORMAL", False), ("", "NORMAL", False), ("another-boot", "FULL", True)],
)
async def test_an_unclean_shutdown_before_a_reboot_renews_epochs(
    tmp_path: Path, boot: str, mode: str, same_epoch: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="plexus.engines.sqlite")
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
    warned = (
        []
        if same_epoch
        else [
            f"history: {reopened.file} was not closed before a reboot and may have lost"
            " recent messages: every channel gets a new epoch"
        ]
    )
    assert caplog.messages == warned


def test_the_boot_id_is_empty_where_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    known = Path("/proc/sys/kernel/random/boot_id")
    if known.exists():
        assert sqlite_schema.boot_id() == known.read_text().strip()

    def unreadable(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(str(self))

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert sqlite_schema.boot_id() == ""


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


async def test_a_version_1_database_is_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plexus.engines.sqlite")
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
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        channels = {
            row[0]: row[1:]
            for row in db.execute("SELECT channel, namespace, expires_ms FROM channels")
        }
        chunk = db.execute("SELECT data FROM chunks WHERE channel = 'chat:forever'").fetchone()[0]
        columns = [row[1] for row in db.execute("PRAGMA table_info(channels)")]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert caplog.messages == [
        "history: migrated 4 messages to schema 2",
        "history: moved 4 messages into chunks (schema 4)",
    ]
    assert columns == [
        "channel",
        "epoch",
        "top_offset",
        "updated_ms",
        "expires_ms",
        "namespace",
        "size",
        "max_bytes",
    ]
    assert "messages" not in tables
    data = next(row[5] for row in msgpack.unpackb(chunk) if row[0] == 2)
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


_V3_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE channels (
    channel TEXT PRIMARY KEY, epoch TEXT NOT NULL,
    top_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL, expires_ms INTEGER,
    namespace TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE messages (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    PRIMARY KEY (channel, "offset")
);
CREATE TABLE idempotency (
    channel TEXT NOT NULL, key TEXT NOT NULL, "offset" INTEGER NOT NULL,
    epoch TEXT NOT NULL, expires INTEGER NOT NULL, PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE TABLE journal (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    size INTEGER NOT NULL, max_bytes INTEGER NOT NULL
);
"""


async def test_a_version_3_database_and_its_journal_are_migrated(tmp_path: Path) -> None:
    """Schema 3 kept a row per message, and a crash could leave some in its journal."""
    file = tmp_path / "v3.db"
    with database(file) as db:
        db.executescript(_V3_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema', '3')")
        db.execute("INSERT INTO channels VALUES ('chat:a', 'ep-a', 2, ?, NULL, 'chat')", (T0,))
        db.executemany(
            "INSERT INTO messages VALUES ('chat:a', ?, ?, NULL, 'c-1', 'alice', ?)",
            [(n, T0 + n, message(n).raw) for n in (1, 2)],
        )
        db.executemany(  # moved into messages by the next open, trimmed to its 3 newest
            "INSERT INTO journal VALUES ('chat:a', ?, ?, NULL, NULL, NULL, ?, 3, 0)",
            [(n, T0 + n, message(n).raw) for n in (3, 4, 5)],
        )
    store = SqliteBroker(file)
    try:
        page = await store.read("chat:a", since=0)
        assert [(p.offset, p.data) for p in page.publications] == [(3, 3), (4, 4), (5, 5)]
        assert not page.complete  # 1 and 2 were trimmed
        assert page.position == StreamPosition(5, "ep-a")
        following = await put(store, message(6, channel="chat:a"), keep(3))
        assert (following.offset, following.epoch) == (6, "ep-a")
        page = await store.read("chat:a", since=0)
        assert [p.offset for p in page.publications] == [4, 5, 6]
    finally:
        await store.close()
    with database(file) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"messages", "journal"}.isdisjoint(tables)


# -- plain appends on the loop's thread -------------------------------------------


def trace(store: SqliteBroker) -> list[tuple[int, str]]:
    """From now on, record (thread id, SQL) of each statement the store's connection runs."""
    seen: list[tuple[int, str]] = []
    writer = store._writer
    assert writer.conn is not None
    with writer.lock:
        writer.conn.set_trace_callback(lambda sql: seen.append((threading.get_ident(), sql)))
    return seen


@pytest.mark.parametrize(("mode", "on_loop"), [("NORMAL", True), ("FULL", False)])
async def test_plain_appends_commit_on_the_loop_unless_each_commit_is_fsynced(
    tmp_path: Path, mode: Any, on_loop: bool
) -> None:
    store = SqliteBroker(tmp_path, synchronous=mode)
    try:
        await put(store, message("new"), keep())  # creates the channel: on the writer
        seen = trace(store)
        for n in range(5):
            await put(store, message(n), keep())
        loop = threading.get_ident()
        inserts = [thread for thread, sql in seen if sql.startswith("INSERT INTO batches")]
        assert len(inserts) == 5
        assert [thread == loop for thread in inserts] == [on_loop] * 5
        page = await store.read(CH, since=1)
        assert [p.data for p in page.publications] == [0, 1, 2, 3, 4]
    finally:
        await store.close()


async def test_moves_and_checkpoints_stay_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_writer, "MOVE_ROWS", 8)
    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_COMMITS", 4)
    monkeypatch.setattr(sqlite_writer, "IDLE_MOVE", 3600.0)
    store = SqliteBroker(tmp_path)
    try:
        await put(store, message("new"), keep(5))
        seen = trace(store)
        for n in range(40):
            await put(store, message(n), keep(5))
        # The loop asked the writer to move the journal (and checkpoint) when it
        # was due: the idle move, which would do it too, is an hour away.
        writer = store._writer
        await wait_for(lambda: writer.journal_rows < 8 and not writer.move_asked)
        await wait_for(lambda: any("wal_checkpoint" in sql for _, sql in seen))
        loop = threading.get_ident()
        on_loop = {sql.split(" (")[0] for thread, sql in seen if thread == loop}
        assert on_loop == {"INSERT INTO batches"}
        page = await store.read(CH, since=0)
        assert [p.data for p in page.publications] == [35, 36, 37, 38, 39]
    finally:
        await store.close()


async def test_a_failed_append_on_the_loop_leaves_no_gap(tmp_path: Path) -> None:
    store = SqliteBroker(tmp_path)
    try:
        first = await put(store, message("a"), keep())
        writer = store._writer
        assert writer.conn is not None
        with writer.lock:
            writer.conn.execute("ALTER TABLE batches RENAME TO hidden")
        with pytest.raises(Unavailable):
            await store.publish(message("boom"), keep())
        assert store.health()["status"] == "down"
        with writer.lock:
            writer.conn.execute("ALTER TABLE hidden RENAME TO batches")
        second = await put(store, message("b"), keep())
        assert (second.offset, second.epoch) == (2, first.epoch)
        assert store.health()["status"] == "ok"
        page = await store.read(CH, since=0)
        assert [(p.offset, p.data) for p in page.publications] == [(1, "a"), (2, "b")]
    finally:
        await store.close()


async def test_appends_wait_behind_a_job_not_answered_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer finished a read but the loop has not heard yet: a publish made
    now must not run on the loop, where it would be answered before the read."""
    held: list[tuple[asyncio.AbstractEventLoop, Any, tuple[Any, ...]]] = []
    holding = [False]
    real_call_soon = sqlite_writer.call_soon

    def call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
        if holding[0]:
            held.append((loop, callback, args))
        else:
            real_call_soon(loop, callback, *args)

    monkeypatch.setattr(sqlite_writer, "call_soon", call_soon)

    def release() -> None:
        holding[0] = False
        for loop, callback, args in held:
            real_call_soon(loop, callback, *args)
        held.clear()

    store = SqliteBroker(tmp_path)
    try:
        await put(store, message("a"), keep())
        answered: list[str] = []
        holding[0] = True
        read = asyncio.ensure_future(store.read(CH, since=0))
        read.add_done_callback(lambda _: answered.append("read"))
        await wait_for(lambda: len(held) == 1)  # done by the writer, not delivered
        publish = asyncio.ensure_future(store.publish(message("b"), keep()))
        publish.add_done_callback(lambda _: answered.append("publish"))
        await wait_for(lambda: len(held) == 2)  # it went to the writer too
        assert answered == []
        release()
        page, second = await asyncio.wait_for(asyncio.gather(read, publish), TIMEOUT)
        assert answered == ["read", "publish"]
        assert [p.data for p in page.publications] == ["a"]
        assert isinstance(second, Publication)
        assert second.offset == 2
    finally:
        release()  # whatever failed, the store can close
        await store.close()


# -- what it shows: health, logs, its thread ------------------------------------


async def test_health_shows_the_file_and_the_channels(engine: Harness) -> None:
    store = writer_of(engine)
    assert store.health() == {"status": "ok", "file": str(store.file), "channels": 0}
    await publish(engine, "a")
    await publish(engine, "b", channel="chat:b")
    assert store.health() == {"status": "ok", "file": str(store.file), "channels": 2}


async def test_a_failure_shows_with_its_cause(engine: Harness, gate: CommitGate) -> None:
    store = writer_of(engine)
    cause = sqlite3.OperationalError("disk I/O error")
    gate.fail = cause
    with pytest.raises(Unavailable) as failed:
        await engine.broker.publish(message("boom"), keep())
    assert failed.value.message == "history store unavailable"
    assert failed.value.__cause__ is cause
    assert store.health() == {
        "status": "down",
        "error": "OperationalError: disk I/O error",
        "file": str(store.file),
    }
    gate.fail = sqlite3.OperationalError("x" * 400)
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("boom"), keep())
    error = store.health()["error"]
    assert error == ("OperationalError: " + "x" * 400)[:300]


async def test_failures_are_logged_once_per_interval(
    engine: Harness, gate: CommitGate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="plexus.engines.sqlite")
    file = writer_of(engine).file
    for n in range(3):
        gate.fail = sqlite3.OperationalError("disk I/O error")
        with pytest.raises(Unavailable):
            await engine.broker.publish(message(n), keep())
    # A full disk fails every batch: one line, not one per batch.
    assert caplog.messages == [f"history: {file} failed: disk I/O error (1 failed batches so far)"]
    assert caplog.records[0].exc_info is None


async def test_each_failure_is_counted(
    engine: Harness, gate: CommitGate, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setattr(sqlite_writer, "ERROR_LOG_INTERVAL", -1.0)  # log every one
    caplog.set_level(logging.WARNING, logger="plexus.engines.sqlite")
    for n in range(2):
        gate.fail = sqlite3.OperationalError("disk full")
        with pytest.raises(Unavailable):
            await engine.broker.publish(message(n), keep())
    file = writer_of(engine).file
    assert caplog.messages == [
        f"history: {file} failed: disk full (1 failed batches so far)",
        f"history: {file} failed: disk full (2 failed batches so far)",
    ]


async def test_an_unexpected_failure_is_logged_with_its_traceback(
    engine: Harness, gate: CommitGate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="plexus.engines.sqlite")
    gate.fail = RuntimeError("a bug")
    with pytest.raises(Unavailable):
        await engine.broker.publish(message("x"), keep())
    assert caplog.messages == [f"history: unexpected failure in {writer_of(engine).file}"]
    assert caplog.records[0].exc_info is not None
    assert writer_of(engine).health()["error"] == "RuntimeError: a bug"


async def test_the_writer_is_a_named_daemon_thread(engine: Harness) -> None:
    await publish(engine, "a")
    store = writer_of(engine)
    (writer,) = [t for t in threading.enumerate() if t.name == f"plexus-history {store.file}"]
    assert writer.daemon  # a store left open does not hang the interpreter's exit


async def test_the_durability_mode_is_the_connections_and_marked(engine: Harness) -> None:
    """The connection runs in the mode asked for, and the database says so while the
    store runs: its next open can then tell whether a crash could have lost commits."""
    store = writer_of(engine)
    mode = "FULL" if engine.kind.name == "sqlite-full" else "NORMAL"
    seen: list[tuple[int, str]] = []

    def look(appended: list[Publication]) -> None:  # on the writer thread, in its transaction
        conn = store._writer.conn
        assert conn is not None
        synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        mark = conn.execute("SELECT value FROM meta WHERE key = 'running'").fetchone()[0]
        seen.append((synchronous, mark))

    store.before_commit = look
    await publish(engine, "a")
    assert seen == [({"NORMAL": 1, "FULL": 2}[mode], f"{sqlite_schema.boot_id()} {mode}")]


def test_a_bad_durability_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^synchronous must be 'NORMAL' or 'FULL', got 'OFF'$"):
        SqliteBroker(tmp_path, synchronous="OFF")  # type: ignore[arg-type]


async def test_a_channel_with_history_is_not_published_inline(engine: Harness) -> None:
    with pytest.raises(NotImplementedError) as refused:
        engine.broker.publish_nowait(message("x"), keep())
    assert str(refused.value) == "a channel with history is published with `publish`"


async def test_a_store_without_a_sink(tmp_path: Path) -> None:
    store = SqliteBroker(tmp_path)
    try:
        await store.subscribe(CH)
        assert (await put(store, message("x"), keep())).offset == 1
        await store.publish_presence(Presence("join", CH, ClientInfo("c-1", None)))
        assert await store.nodes() == []
    finally:
        await store.close()


async def test_start_without_a_supervisor_opens_the_database(tmp_path: Path) -> None:
    store = SqliteBroker(tmp_path)
    try:
        await store.start()
        assert store.file.exists()
        assert store.health()["status"] == "ok"
    finally:
        await store.close()


# -- batches that mix work ------------------------------------------------------


async def test_a_subscribe_and_a_publish_in_one_batch(engine: Harness, gate: CommitGate) -> None:
    gate.hold(lambda pub: pub.data == "held")
    held = asyncio.create_task(publish(engine, "held"))
    await gate.held()
    await engine.broker.subscribe("chat:b")  # queued behind the held batch
    behind = asyncio.create_task(publish(engine, "behind", channel="chat:b"))
    await yield_to_the_loop()
    assert writer_of(engine).pending == 2  # the subscribe and the publish: one batch
    gate.open()
    published = await asyncio.wait_for(behind, TIMEOUT)
    assert published.offset == 1
    assert engine.sink.of("chat:b") == [published]
    assert (await asyncio.wait_for(held, TIMEOUT)).offset == 1


async def test_a_failed_batch_with_a_subscribe_fails_its_publishes(
    engine: Harness, gate: CommitGate
) -> None:
    gate.hold(lambda pub: pub.data == "held")
    held = asyncio.create_task(publish(engine, "held"))
    await gate.held()
    await engine.broker.subscribe("chat:b")
    doomed = asyncio.create_task(publish(engine, "doomed", channel="chat:b"))
    await yield_to_the_loop()
    assert writer_of(engine).pending == 2
    gate.fail = sqlite3.OperationalError("disk I/O error")
    gate.open()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(doomed, TIMEOUT)
    assert (await asyncio.wait_for(held, TIMEOUT)).offset == 1


# -- sweeping --------------------------------------------------------------------


async def test_a_sweep_recounts_the_bytes_it_deleted(engine: Harness) -> None:
    retention = keep(10, 10, max_bytes=30)
    await publish(engine, "a" * 8, T0, retention=retention)  # 10 bytes
    await publish(engine, "b" * 18, T0 + 1, retention=retention)  # 20 bytes
    await engine.sweep(T0 + 20_000)  # both expired: deleted
    later = T0 + 20_000
    for n in range(3):
        await publish(engine, "c" * 8, later + n, retention=retention)
    page = await engine.history.read(CH, since=2, now=later + 3)
    assert offsets(page.publications) == [3, 4, 5]  # 30 bytes: nothing trimmed
    assert page.complete


async def test_sweep_defaults_to_the_wall_clock(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=1))
    t = now_ms()
    await publish(engine, "old", t - 60_000, retention=keep(10, 1))
    await publish(engine, "new", t, channel="chat:new", retention=keep(10, 60))
    assert await writer_of(engine).sweep() == [CH]


async def test_the_engine_sweeps_by_itself(launch: Launcher) -> None:
    engine = await launch(Tuning(grace=0, sweep_interval=0.01))
    assert "sqlite-sweeper" in engine.supervisor.health()["tasks"]
    store = writer_of(engine)
    await store.position(CH, create=keep(10, 1))  # due at once: nobody subscribed
    await store.position("live:a", create=NO_HISTORY)  # likewise, kept in memory
    await wait_for(lambda: store.state_size()["positions"] == store.state_size()["streams"] == 0)


async def test_the_sweeper_outlives_failed_sweeps(launch: Launcher) -> None:
    engine = await launch(Tuning(sweep_interval=0.01))
    store = writer_of(engine)
    failed: list[int] = []

    def fail(appended: list[Publication]) -> None:  # every batch: each sweep fails
        failed.append(len(appended))
        raise sqlite3.OperationalError("disk I/O error")

    store.before_commit = fail
    await wait_for(lambda: len(failed) >= 3)
    assert store.health()["status"] == "down"
    assert engine.supervisor.health()["tasks"]["sqlite-sweeper"] == {
        "status": "running",
        "restarts": 0,
    }


# The thread's end by SystemExit is the point of the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_writer_that_dies_leaves_no_caller_waiting(tmp_path: Path) -> None:
    """Only an exception that is not an `Exception` (SystemExit, say) can end the
    writer thread: the batch it ended and everything queued behind it fail,
    later calls are refused, and `close` still returns."""
    store = SqliteBroker(tmp_path)
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()
    go = threading.Event()

    def die(appended: list[Publication]) -> None:  # on the writer thread
        loop.call_soon_threadsafe(arrived.set)
        go.wait(TIMEOUT)
        raise SystemExit

    try:
        await put(store, message("a"), keep())
        store.before_commit = die
        dying = asyncio.create_task(store.publish(message("b"), keep()))
        await asyncio.wait_for(arrived.wait(), TIMEOUT)
        await store.subscribe("chat:b")  # a job without a caller waiting for it
        queued = asyncio.create_task(store.publish(message("c"), keep()))
        await yield_to_the_loop()
        assert store.pending == 2
        go.set()
        with pytest.raises(Unavailable) as ended:
            await asyncio.wait_for(dying, TIMEOUT)
        assert ended.value.message == "history store unavailable"
        with pytest.raises(Unavailable) as behind:
            await asyncio.wait_for(queued, TIMEOUT)
        assert behind.value.message == "history writer stopped"
        await wait_for(lambda: store.health()["error"] == "writer thread stopped")
        assert store.health() == {
            "status": "down",
            "error": "writer thread stopped",
            "file": str(store.file),
        }
        with pytest.raises(Unavailable) as refused:
            await store.read(CH)
        assert refused.value.message == "history writer stopped"
    finally:
        await asyncio.wait_for(store.close(), TIMEOUT)


async def test_state_size(engine: Harness) -> None:
    broker = engine.broker
    await broker.subscribe(CH)
    await publish(engine, "a")
    await broker.subscribe("live:a")
    await publish(engine, "b", channel="live:a", retention=NO_HISTORY)
    assert await engine.state_size() == {
        "streams": 1,  # live:a, in memory
        "subscribed": 2,
        "scheduled": 0,
        "idempotency_keys": 0,
        "namespaces": 1,
        "positions": 1,  # CH
        "tops": 1,
        "pinned": 2,
    }


async def test_a_database_that_is_not_plexus_is_refused_with_its_cause(tmp_path: Path) -> None:
    file = tmp_path / "other.db"
    with database(file) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY)")  # another program's
    store = SqliteBroker(file)
    try:
        with pytest.raises(Unavailable):
            await store.start()
        assert store.health()["error"] == "OperationalError: no such column: value"
    finally:
        await store.close()


async def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    file = tmp_path / "v1.db"
    write_v1_database(file, now_ms())
    with database(file) as db:
        db.execute('UPDATE messages SET data = ? WHERE "offset" = 3', (b"\xc1",))  # not msgpack
    store = SqliteBroker(file)
    try:
        with pytest.raises(Unavailable):
            await store.start()
        assert store.health()["error"].startswith("FormatError: ")  # msgpack's, as it was
    finally:
        await store.close()
    with database(file) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(channels)")]
    assert columns == ["channel", "epoch", "top_offset", "updated_ms"]  # still version 1


async def test_a_close_that_fails_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteBroker(tmp_path)
    await put(store, message("a"), keep())

    def vandal(appended: list[Publication]) -> None:  # on the writer thread
        conn = store._writer.conn
        assert conn is not None
        conn.execute("DROP TABLE meta")  # where the clean shutdown is recorded

    store.before_commit = vandal
    await put(store, message("b"), keep())
    caplog.set_level(logging.ERROR, logger="plexus.engines.sqlite")
    await store.close()
    assert caplog.messages == [f"history: could not close {store.file} cleanly"]
    assert caplog.records[0].exc_info is not None


def test_a_store_whose_loop_closed_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Left open when its event loop closed: the writer cannot hand results back,
    says so, and still stops."""
    store = SqliteBroker(tmp_path)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(put(store, message("a"), keep()))
    finally:
        loop.close()
    caplog.set_level(logging.WARNING, logger="plexus.engines.sqlite")
    store._writer.jobs.put(None)  # what close() would queue
    assert store._thread is not None
    store._thread.join(TIMEOUT)
    assert not store._thread.is_alive()
    assert caplog.messages == ["history: event loop closed while the store was open"]
