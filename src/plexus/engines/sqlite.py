"""The SQLite engine: one process, history on disk (stdlib `sqlite3`, WAL mode).

Channels that keep history live in SQLite; channels that keep none are served
by an in-process `MemoryBroker` (their offsets need no durability: recovery
is never possible there), so publishing to them costs no I/O.

One writer thread owns the only connection; the loop queues jobs and awaits
futures. Group commit: the thread runs all jobs queued while its previous
commit ran in ONE transaction, then hands the results back with one
`call_soon_threadsafe` callback per batch, which resolves them and delivers
the batch's messages to the node in queue order. Jobs are queued
synchronously in call order, so a channel's messages get offsets, commit and
reach subscribers in call order. Offsets are assigned on the thread from its
cache of each channel's top: a failed batch is rolled back and the cache
reloaded, so a failure leaves no gap and no duplicate. `close()` commits what
is queued, records a clean shutdown and joins the thread.

Durability when `publish` returns: with `synchronous="NORMAL"` (default) the
commit is in the WAL file in the OS cache. It survives a crash or `kill -9`
of the process, but a power loss or OS crash may lose the last transactions
(without corruption), and their offsets would be issued again under the same
epoch. So an open after an unclean shutdown followed by a reboot (or with an
unknown boot id) gives every channel a new epoch: clients reload instead of
recovering across a silent gap. `synchronous="FULL"` fsyncs each commit
(amortised by group commit) and also survives a power loss.

Storage: `channels(channel, epoch, top_offset, updated_ms, expires_ms)` outlives
messages, so epochs and offset counters survive expiry and restarts until
`expires_ms` (NULL: never, for channels whose messages never expire) has
passed while no local client subscribed: then the sweep forgets the channel.
`messages(channel, offset, time, expires, client, user, data)` keeps `data`
as the payload's compact JSON, exactly as it is sent to clients.
`idempotency(channel, key, offset, epoch, expires)` remembers idempotency keys
durably. Appends trim a channel to its `size` newest rows (and `max_bytes` of
payload) in their transaction; reads skip expired rows, which the sweep
deletes. The file is locked exclusively, so two servers cannot hand out the
same offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from plexus.channels import namespace_of
from plexus.engines.base import EventSink, Health, Retention
from plexus.engines.memory import MemoryBroker, new_epoch, now_ms, page_is_complete
from plexus.exceptions import Unavailable
from plexus.models import UNSET, Duplicate, HistoryPage, Presence, Publication, StreamPosition
from plexus.supervisor import Supervisor

__all__ = ["SqliteBroker"]

logger = logging.getLogger(__name__)

DB_FILE: Final = "history.sqlite3"
_DB_SUFFIXES: Final = (".db", ".sqlite", ".sqlite3")
_SWEEP_BATCH: Final = 10_000  # bounds how long one sweep holds up the appends queued behind it
SCHEMA_VERSION: Final = "2"
_NO_STREAM: Final = StreamPosition(0, "")
ERROR_LOG_INTERVAL: Final = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY, epoch TEXT NOT NULL,
    top_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL, expires_ms INTEGER,
    namespace TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    PRIMARY KEY (channel, "offset")
);
CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    channel TEXT NOT NULL, key TEXT NOT NULL, "offset" INTEGER NOT NULL,
    epoch TEXT NOT NULL, expires INTEGER NOT NULL, PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS channels_expires ON channels (expires_ms)
    WHERE expires_ms IS NOT NULL;
"""
_INSERT = (
    'INSERT INTO messages (channel, "offset", time, expires, client, user, data)'
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    'SELECT "offset", time, client, user, data FROM messages WHERE channel = ?'
    ' AND "offset" > ? AND (expires IS NULL OR expires > ?) ORDER BY "offset" LIMIT ?'
)

Row: TypeAlias = tuple[int, int, str | None, str | None, bytes]


@dataclass(slots=True)
class _Top:
    """A channel's committed (or in-batch) top, with the payload bytes it keeps."""

    offset: int
    epoch: str
    bytes: int | None = None  # None until a byte limit needs it


@dataclass(slots=True)
class _Open:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Position:
    channel: str
    create: Retention | None
    future: asyncio.Future[StreamPosition]


@dataclass(slots=True)
class _Positions:
    channels: list[str]
    future: asyncio.Future[dict[str, StreamPosition]]


@dataclass(slots=True)
class _Append:
    pub: Publication
    retention: Retention
    key: str | None
    idempotency_ttl: int
    future: asyncio.Future[Publication | Duplicate]


@dataclass(slots=True)
class _Read:
    channel: str
    since: int
    limit: int  # -1 = no limit (SQLite's own convention)
    now: int
    max_bytes: int | None
    future: asyncio.Future[tuple[StreamPosition, list[Row], bool]]


@dataclass(slots=True)
class _Pin:
    """A local client subscribes to `channel` (`on`), or its last one left: keep or release it."""

    channel: str
    on: bool
    future: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Sweep:
    now: int
    future: asyncio.Future[list[str]]


_Job: TypeAlias = _Open | _Position | _Positions | _Append | _Read | _Pin | _Sweep


class _Refused:
    """One job's own failure inside a batch that otherwise commits."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _boot_id() -> str:
    """Return an id that changes when the machine reboots ("" where unknown)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _expires(time: int, ttl: float) -> int | None:
    return time + round(ttl * 1000) if ttl > 0 else None


@dataclass
class _Writer:
    """The writer thread: owns the connection and each channel's top position."""

    file: Path
    synchronous: str
    busy_timeout: float
    conn: sqlite3.Connection | None = None
    tops: dict[str, _Top] = field(default_factory=dict)  # committed, or written by this batch
    counts: Counter[str] = field(default_factory=Counter)  # channels per namespace
    pinned: set[str] = field(default_factory=set)  # channels a local client subscribes to
    grace_ms: int = 300_000
    failures: int = 0
    logged_at: float = -1e9
    jobs: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)  # None = stop
    before_commit: Callable[[list[Publication]], None] | None = None  # see SqliteBroker

    def run(self, loop: asyncio.AbstractEventLoop, store: SqliteBroker) -> None:
        """Thread body: run batches until the stop mark, then close the database.

        However it ends, the store hears of it (`_stopped_now`): even a thread
        ended by an exception that is not an `Exception` leaves no caller waiting.
        """
        try:
            self._serve(loop, store)
        finally:
            _call_soon(loop, store._stopped_now)

    def _serve(self, loop: asyncio.AbstractEventLoop, store: SqliteBroker) -> None:
        stop = False
        while not stop:
            items = [self.jobs.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self.jobs.get_nowait())
            # `close()` refuses new jobs before it queues the stop mark, so it is last.
            stop = items[-1] is None
            batch = [job for job in items if job is not None]
            if not batch:
                continue
            try:
                results = self.run_batch(batch)
            except BaseException as exc:  # supervised: each caller of the batch hears of it
                self.failures += 1
                if not isinstance(exc, sqlite3.Error | OSError):
                    logger.exception("history: unexpected failure in %s", self.file)
                elif time.monotonic() - self.logged_at > ERROR_LOG_INTERVAL:
                    # A full disk fails every batch: one line now and then, not thousands.
                    self.logged_at = time.monotonic()
                    logger.warning(
                        "history: %s failed: %s (%d failed batches so far)",
                        self.file,
                        exc,
                        self.failures,
                    )
                _call_soon(loop, store._fail, batch, exc)
                if not isinstance(exc, Exception):
                    raise  # SystemExit and the like end the thread; `health` shows it
            else:
                _call_soon(loop, store._deliver, batch, results)
        self.shutdown()

    def connect(self) -> sqlite3.Connection:
        if self.conn is not None:
            return self.conn
        self.file.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.file, timeout=self.busy_timeout, isolation_level=None)
        try:
            # Exclusive: a second process must not hand out this one's offsets.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode!r})")
            _migrate(conn)
            conn.executescript(_SCHEMA)
            self._mark_running(conn)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self.counts = _count_namespaces(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def _mark_running(self, conn: sqlite3.Connection) -> None:
        # Fsynced whatever the mode: were this commit lost to a power failure,
        # so would be all later ones, and the next open could not tell.
        conn.execute("PRAGMA synchronous=FULL")
        boot = _boot_id()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'running'").fetchone()
            if row is not None:
                last_boot, _, last_sync = str(row[0]).partition(" ")
                if last_sync != "FULL" and (not boot or last_boot != boot):
                    conn.execute("UPDATE channels SET epoch = ?", (new_epoch(),))
                    logger.warning(
                        "history: %s was not closed before a reboot and may have lost"
                        " recent messages: every channel gets a new epoch",
                        self.file,
                    )
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('running', ?)",
                (f"{boot} {self.synchronous}",),
            )
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def shutdown(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.execute("DELETE FROM meta WHERE key = 'running'")
            conn.close()
        except sqlite3.Error:
            logger.exception("history: could not close %s cleanly", self.file)

    def run_batch(self, jobs: list[_Job]) -> list[Any]:
        """Execute `jobs` in one transaction and return one result per job."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            dirty: dict[str, tuple[int, int | None]] = {}
            results: list[Any] = []
            for job in jobs:
                results.append(self._run(conn, job, dirty))
            # One UPDATE per channel and batch, not per message.
            conn.executemany(
                "UPDATE channels SET top_offset = ?, updated_ms = ?, expires_ms = ?"
                " WHERE channel = ?",
                [(self.tops[ch].offset, at, forget, ch) for ch, (at, forget) in dirty.items()],
            )
            hook = self.before_commit
            if hook is not None:
                hook([job.pub for job in jobs if isinstance(job, _Append)])
            conn.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        return results

    def _run(
        self, conn: sqlite3.Connection, job: _Job, dirty: dict[str, tuple[int, int | None]]
    ) -> Any:
        if isinstance(job, _Append):
            try:
                return self._append(conn, job, dirty)
            except Unavailable as exc:
                return _Refused(exc)
        if isinstance(job, _Read):
            return self._read(conn, job)
        if isinstance(job, _Position):
            try:
                top = self._channel(conn, job.channel, job.create)
            except Unavailable as exc:
                return _Refused(exc)
            return StreamPosition(top.offset, top.epoch) if top else _NO_STREAM
        if isinstance(job, _Positions):
            found: dict[str, StreamPosition] = {}
            for channel in job.channels:
                top = self._channel(conn, channel, None)
                found[channel] = StreamPosition(top.offset, top.epoch) if top else _NO_STREAM
            return found
        if isinstance(job, _Pin):
            self._pin(conn, job)
            return None
        if isinstance(job, _Sweep):
            return self._sweep(conn, job.now)
        return None

    def _abort(self) -> None:
        self.tops.clear()  # it may hold offsets of the rolled-back batch
        conn = self.conn
        if conn is None or not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self.conn = None  # a connection that cannot roll back is not trusted again
            conn.close()
        else:
            # Namespace counts may hold channels of the rolled-back batch.
            self.counts = _count_namespaces(conn)

    def _channel(
        self, conn: sqlite3.Connection, channel: str, create: Retention | None
    ) -> _Top | None:
        top = self.tops.get(channel)
        if top is not None:
            return top
        sql = "SELECT top_offset, epoch FROM channels WHERE channel = ?"
        row = conn.execute(sql, (channel,)).fetchone()
        if row is not None:
            top = self.tops[channel] = _Top(int(row[0]), str(row[1]))
            return top
        if create is None:
            return None
        namespace = create.namespace
        if create.max_channels and self.counts[namespace] >= create.max_channels:
            raise Unavailable(
                f"namespace {namespace or 'default'} holds its maximum of"
                f" {create.max_channels} channels: try again later"
            )
        now = now_ms()
        top = _Top(0, new_epoch(), 0)
        conn.execute(
            "INSERT INTO channels (channel, epoch, top_offset, updated_ms, expires_ms, namespace)"
            " VALUES (?, ?, 0, ?, ?, ?)",
            (channel, top.epoch, now, now + self.grace_ms, namespace),
        )
        self.counts[namespace] += 1
        self.tops[channel] = top
        return top

    def _append(
        self, conn: sqlite3.Connection, job: _Append, dirty: dict[str, tuple[int, int | None]]
    ) -> Publication | Duplicate:
        pub, retention = job.pub, job.retention
        channel = pub.channel
        if job.key is not None:
            row = conn.execute(
                'SELECT "offset", epoch FROM idempotency WHERE channel = ? AND key = ?'
                " AND expires > ?",
                (channel, job.key, pub.time),
            ).fetchone()
            if row is not None:
                return Duplicate(int(row[0]), str(row[1]))
        top = self._channel(conn, channel, retention)
        assert top is not None  # created when missing
        offset = top.offset + 1
        raw = pub.raw
        size = retention.size
        if size > 0:
            expires = _expires(pub.time, retention.ttl)
            row = (channel, offset, pub.time, expires, pub.client, pub.user, raw)
            conn.execute(_INSERT, row)
        if offset > size:  # a range delete on the primary key, usually of one row
            sql = 'DELETE FROM messages WHERE channel = ? AND "offset" <= ?'
            conn.execute(sql, (channel, offset - size))
            top.bytes = None  # unknown again; recounted only if a byte limit needs it
        if retention.max_bytes and size > 0:
            self._trim_bytes(conn, channel, top, len(raw), offset, retention.max_bytes)
        top.offset = offset
        pub.offset, pub.epoch = offset, top.epoch
        if job.key is not None:
            conn.execute(
                'INSERT OR REPLACE INTO idempotency (channel, key, "offset", epoch, expires)'
                " VALUES (?, ?, ?, ?, ?)",
                (channel, job.key, offset, top.epoch, pub.time + job.idempotency_ttl),
            )
        # Forgotten after its newest message expired (plus the grace), or never.
        forget = None
        if retention.ttl > 0:
            forget = pub.time + round(retention.ttl * 1000) + self.grace_ms
        dirty[channel] = (pub.time, forget)
        return pub

    def _trim_bytes(
        self, conn: sqlite3.Connection, channel: str, top: _Top, added: int, offset: int, limit: int
    ) -> None:
        if top.bytes is None:
            row = conn.execute(
                "SELECT coalesce(sum(length(data)), 0) FROM messages WHERE channel = ?", (channel,)
            ).fetchone()
            top.bytes = int(row[0])
        else:
            top.bytes += added
        while top.bytes > limit:
            row = conn.execute(
                'SELECT "offset", length(data) FROM messages WHERE channel = ?'
                ' AND "offset" < ? ORDER BY "offset" LIMIT 1',
                (channel, offset),
            ).fetchone()
            if row is None:
                return  # only the newest message is left: it is kept
            conn.execute(
                'DELETE FROM messages WHERE channel = ? AND "offset" = ?', (channel, row[0])
            )
            top.bytes -= int(row[1])

    def _read(self, conn: sqlite3.Connection, job: _Read) -> tuple[StreamPosition, list[Row], bool]:
        top = self._channel(conn, job.channel, None)
        if top is None:
            return _NO_STREAM, [], False
        position = StreamPosition(top.offset, top.epoch)
        cursor = conn.execute(_SELECT, (job.channel, job.since, job.now, job.limit))
        if job.max_bytes is None:
            return position, cursor.fetchall(), False
        rows: list[Row] = []
        budget = job.max_bytes
        # With a limit, one row more than wanted is fetched only to tell which
        # offset follows the page: it is not returned, so it spends no budget.
        wanted = job.limit - 1 if job.limit >= 0 else -1
        for row in cursor:
            if len(rows) == wanted:
                rows.append(row)
                break
            budget -= len(row[4])
            if budget < 0:
                return position, rows, True  # cut: the caller cannot have it all
            rows.append(row)
        return position, rows, False

    def _pin(self, conn: sqlite3.Connection, job: _Pin) -> None:
        if job.on:
            self.pinned.add(job.channel)
            return
        self.pinned.discard(job.channel)
        # The channel outlives its last subscriber by the grace period at least.
        conn.execute(
            "UPDATE channels SET expires_ms = max(expires_ms, ?)"
            " WHERE channel = ? AND expires_ms IS NOT NULL",
            (now_ms() + self.grace_ms, job.channel),
        )

    def _sweep(self, conn: sqlite3.Connection, now: int) -> list[str]:
        """Delete expired messages, idempotency keys and idle channels; return the channels."""
        stale = conn.execute(
            "SELECT DISTINCT channel FROM messages WHERE expires <= ? LIMIT ?", (now, _SWEEP_BATCH)
        ).fetchall()
        conn.execute(
            "DELETE FROM messages WHERE rowid IN"
            " (SELECT rowid FROM messages WHERE expires <= ? LIMIT ?)",
            (now, _SWEEP_BATCH),
        )
        for (channel,) in stale:
            top = self.tops.get(channel)
            if top is not None:
                top.bytes = None
        conn.execute(
            "DELETE FROM idempotency WHERE (channel, key) IN"
            " (SELECT channel, key FROM idempotency WHERE expires <= ? LIMIT ?)",
            (now, _SWEEP_BATCH),
        )
        idle = [
            (str(row[0]), str(row[1]))
            for row in conn.execute(
                "SELECT channel, namespace FROM channels WHERE expires_ms <= ? LIMIT ?",
                (now, _SWEEP_BATCH),
            )
        ]
        gone: list[str] = []
        for channel, namespace in idle:
            if channel in self.pinned:
                continue
            conn.execute("DELETE FROM messages WHERE channel = ?", (channel,))
            conn.execute("DELETE FROM idempotency WHERE channel = ?", (channel,))
            conn.execute("DELETE FROM channels WHERE channel = ?", (channel,))
            self.tops.pop(channel, None)
            self.counts[namespace] -= 1
            if self.counts[namespace] <= 0:
                del self.counts[namespace]
            gone.append(channel)
        return gone


def _count_namespaces(conn: sqlite3.Connection) -> Counter[str]:
    rows = conn.execute("SELECT namespace, count(*) FROM channels GROUP BY namespace")
    return Counter({str(namespace): int(count) for namespace, count in rows})


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database written by an older Plexus to the current schema.

    Version 1 kept payloads as MessagePack and channels forever; version 2
    keeps the payload's JSON and an expiry per channel. Version 1 channels
    with messages that never expire keep living; the others expire after
    their last message does (plus five minutes), or in five minutes when
    they hold none.
    """
    tables = {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master")}
    if "channels" not in tables:
        return  # a new database
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(channels)")}
    if "expires_ms" in columns:
        return
    import msgpack

    from plexus.protocol.codec import encode_data

    grace = 300_000
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE channels ADD COLUMN expires_ms INTEGER")
        conn.execute("ALTER TABLE channels ADD COLUMN namespace TEXT NOT NULL DEFAULT ''")
        conn.executemany(
            "UPDATE channels SET namespace = ? WHERE channel = ?",
            [
                (namespace_of(str(channel)), channel)
                for (channel,) in conn.execute("SELECT channel FROM channels").fetchall()
            ],
        )
        conn.execute(
            "UPDATE channels SET expires_ms = (SELECT CASE"
            " WHEN count(*) = 0 THEN ? WHEN count(m.expires) < count(*) THEN NULL"
            " ELSE max(m.expires) + ? END FROM messages m WHERE m.channel = channels.channel)",
            (now_ms() + grace, grace),
        )
        rows = conn.execute('SELECT channel, "offset", data FROM messages').fetchall()
        conn.executemany(
            'UPDATE messages SET data = ? WHERE channel = ? AND "offset" = ?',
            [
                (encode_data(msgpack.unpackb(data, raw=False)), channel, offset)
                for channel, offset, data in rows
            ],
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    logger.info("history: migrated %d messages to schema %s", len(rows), SCHEMA_VERSION)


class SqliteBroker:
    """Durable history in one SQLite database; see the module docstring.

    Implements `plexus.engines.base.Broker` and `HistoryStore`. Use it from one
    event loop.

    Args:
        path: a file ending in `.db`, `.sqlite` or `.sqlite3` is the database
            itself; any other path is a directory (created if missing) that
            holds `history.sqlite3`.
        synchronous: `"NORMAL"` survives a process kill, `"FULL"` also a power loss.
        busy_timeout: seconds to wait for a database lock before failing.
        sweep_interval: seconds between deletions of expired messages and idle channels.
        idempotency_ttl: seconds an idempotency key is remembered.
        grace: seconds an idle channel's epoch and offset are kept (see `Retention`).
    """

    name = "sqlite"
    unsubscribe_linger = 0.0
    check_interval: float | None = None

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
        sweep_interval: float = 60.0,
        idempotency_ttl: float = 300.0,
        grace: float = 300.0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        path = Path(path)
        file = path if path.suffix in _DB_SUFFIXES else path / DB_FILE
        self._writer = _Writer(file, synchronous, busy_timeout, grace_ms=round(grace * 1000))
        # Channels without history: in memory, no I/O (and their idempotency keys).
        self._local = MemoryBroker(idempotency_ttl=idempotency_ttl, grace=grace)
        self._sink: EventSink | None = None
        self._subscribed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._positions: dict[str, StreamPosition] = {}  # committed, per channel
        self._closed = False
        # Why the last batch that wrote (or any batch, if none wrote since) failed;
        # cleared by a batch that wrote.
        self._failure: str | None = None
        self.sweep_interval = sweep_interval
        self.idempotency_ttl_ms = round(idempotency_ttl * 1000)

    @property
    def file(self) -> Path:
        """The database file."""
        return self._writer.file

    @property
    def before_commit(self) -> Callable[[list[Publication]], None] | None:
        """Test hook: called on the writer thread in every batch, after its
        statements and right before its COMMIT, with the publications the
        batch appends (None, the default: nothing is called).

        Tests hold a batch there to check that nothing of it is acknowledged
        or delivered before it is committed, or raise there to fail a batch
        (it then fails like a database error: rolled back, every caller
        hears `Unavailable`). The hook must not use the store. Unused, it
        costs one attribute check per batch.
        """
        return self._writer.before_commit

    @before_commit.setter
    def before_commit(self, hook: Callable[[list[Publication]], None] | None) -> None:
        self._writer.before_commit = hook

    @property
    def pending(self) -> int:
        """Jobs queued for the writer thread and not taken yet (they make up its next
        batch). A test holding a batch with `before_commit` waits on it to know what
        queued behind."""
        return self._writer.jobs.qsize()

    # ----- lifecycle

    def bind(self, sink: EventSink) -> None:
        """Set where events of subscribed channels go."""
        self._sink = sink
        self._local.bind(sink)

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Open the database (creating it if needed) and start the sweeps.

        Raises:
            Unavailable: it cannot be opened (or another process holds it).
        """
        job = _Open(self._new_future())
        self._enqueue(job)
        await job.future
        if supervisor is not None:
            await self._local.start(supervisor)
            supervisor.spawn("sqlite-sweeper", self._sweep_loop)

    async def close(self) -> None:
        """Commit everything queued, record a clean shutdown and join the thread."""
        if self._closed:
            return
        self._closed = True
        await self._local.close()
        if self._thread is None or self._stopped is None:
            return
        self._writer.jobs.put(None)
        await self._stopped
        self._thread.join()  # it has nothing left to do but return

    async def nodes(self) -> list[dict[str, Any]]:
        """Only this node shares this engine."""
        return await self._local.nodes()

    async def send_nodes(self, payload: bytes, node: str | None = None) -> int:
        """Only this node can be reached."""
        return await self._local.send_nodes(payload, node)

    def health(self) -> Health:
        """Down while the writer thread is dead or its last batch failed."""
        if self._thread is not None and not self._thread.is_alive() and not self._closed:
            return {"status": "down", "error": "writer thread stopped", "file": str(self.file)}
        if self._failure is not None:
            return {"status": "down", "error": self._failure, "file": str(self.file)}
        return {"status": "ok", "file": str(self.file), "channels": len(self._positions)}

    # ----- publishing

    def inline_for(self, retention: Retention) -> bool:
        """True for channels that keep no history (served in memory)."""
        return not retention.keeps_history

    async def publish(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """Store `pub` and deliver it; returns after the commit.

        See `Broker.publish`. A cancelled caller does not withdraw the
        message: it is still committed, uses its offset and is delivered.

        Raises:
            Unavailable: the database failed, or the namespace is full; the
                message was not stored.
        """
        if not retention.keeps_history:
            return self._local.publish_nowait(pub, retention, key)
        pub.raw  # noqa: B018 - encoded here, on the loop, not on the writer thread
        future: asyncio.Future[Publication | Duplicate] = self._new_future()
        self._enqueue(_Append(pub, retention, key, self.idempotency_ttl_ms, future))
        return await future

    def publish_nowait(
        self, pub: Publication, retention: Retention, key: str | None = None
    ) -> Publication | Duplicate:
        """`publish` of a channel without history; others raise `NotImplementedError`."""
        if retention.keeps_history:
            raise NotImplementedError("a channel with history is published with `publish`")
        return self._local.publish_nowait(pub, retention, key)

    async def publish_presence(self, event: Presence) -> None:
        """Deliver a join or leave to this node, if it subscribes to the channel."""
        if event.channel in self._subscribed and self._sink is not None:
            self._sink.on_presence(event)

    # ----- subscriptions

    async def subscribe(self, channel: str) -> None:
        """Deliver `channel`'s events; its state is kept while subscribed."""
        self._subscribed.add(channel)
        await self._local.subscribe(channel)
        # Queued, not awaited: the writer sees it before any later job.
        self._enqueue(_Pin(channel, True))

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel`; it is kept for the grace period."""
        self._subscribed.discard(channel)
        await self._local.unsubscribe(channel)
        if not self._closed:
            self._enqueue(_Pin(channel, False))

    # ----- reading

    async def position(self, channel: str, *, create: Retention | None = None) -> StreamPosition:
        """The channel's last committed offset and epoch; see `HistoryStore.position`."""
        if self._local.holds(channel) or (create is not None and not create.keeps_history):
            return await self._local.position(channel, create=create)
        known = self._positions.get(channel)
        if known is not None and not self._closed:
            return known
        job = _Position(channel, create, self._new_future())
        self._enqueue(job)
        return await job.future

    async def positions(self, channels: Collection[str]) -> dict[str, StreamPosition]:
        """Positions of `channels`, creating none."""
        found: dict[str, StreamPosition] = {}
        rest: list[str] = []
        for channel in channels:
            if self._local.holds(channel):
                found[channel] = await self._local.position(channel)
            else:
                rest.append(channel)
        if rest:
            job = _Positions(rest, self._new_future())
            self._enqueue(job)
            found.update(await job.future)
        return found

    async def read(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        max_bytes: int | None = None,
        now: int | None = None,
    ) -> HistoryPage:
        """Return kept messages after `since`, oldest first; see `HistoryStore.read`.

        Raises:
            Unavailable: the database failed.
        """
        if self._local.holds(channel):
            return await self._local.read(
                channel, since=since, limit=limit, max_bytes=max_bytes, now=now
            )
        after = max(since or 0, 0)
        wanted = max(limit, 0) if limit is not None else None
        # One row more than wanted tells which offset follows the page.
        fetch = -1 if wanted is None else wanted + 1
        at = now_ms() if now is None else now
        job = _Read(channel, after, fetch, at, max_bytes, self._new_future())
        self._enqueue(job)
        top, rows, cut = await job.future
        following: int | None = None
        if wanted is not None and len(rows) > wanted:
            following = rows[wanted][0]
            rows = rows[:wanted]
        publications = [
            Publication(channel, UNSET, offset, top.epoch, time, client, user, raw=bytes(data))
            for offset, time, client, user, data in rows
        ]
        offsets = [p.offset for p in publications]
        complete = not cut and page_is_complete(offsets, after, top.offset, following)
        return HistoryPage(publications, top, complete)

    # ----- background

    async def sweep(self, now: int | None = None) -> list[str]:
        """Delete expired messages and forget idle channels now; return the channels forgotten."""
        self._local.sweep(now)
        job = _Sweep(now_ms() if now is None else now, self._new_future())
        self._enqueue(job)
        return await job.future

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            # A failure is logged by the writer and shown by `health`; the next sweep tries again.
            with contextlib.suppress(Unavailable):
                await self.sweep()

    def state_size(self) -> dict[str, int]:
        """How much state this engine holds in memory (for tests and the soak benchmark)."""
        return {
            **self._local.state_size(),
            "positions": len(self._positions),
            "tops": len(self._writer.tops),
            "pinned": len(self._writer.pinned),
        }

    # The rest runs on the event loop; `_deliver`, `_fail` and `_stopped_now`
    # are called back by the writer thread through `call_soon_threadsafe`.

    def _new_future(self) -> asyncio.Future[Any]:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        return loop.create_future()

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise Unavailable("history store is closed")
        if self._stopped is not None and self._stopped.done():
            raise Unavailable("history writer stopped")
        if self._thread is None:
            # Started synchronously so that even the first job is queued in call order.
            self._loop = loop = asyncio.get_running_loop()
            self._stopped = loop.create_future()
            name = f"plexus-history {self.file}"
            args = (loop, self)
            self._thread = threading.Thread(target=self._writer.run, args=args, name=name)
            self._thread.daemon = True  # a store left open must not hang interpreter exit
            self._thread.start()
        self._writer.jobs.put(job)

    def _deliver(self, jobs: list[_Job], results: list[Any]) -> None:
        # The cache is updated and the messages delivered before any caller
        # resumes, in queue order: a channel's messages reach the node in
        # offset order, and a caller already sees its own publish in `position`.
        if any(isinstance(job, _Append) for job in jobs):
            self._failure = None  # writes work again (a batch of reads proves nothing)
        sink = self._sink
        subscribed = self._subscribed
        positions = self._positions
        for job, result in zip(jobs, results, strict=True):
            future = job.future
            if isinstance(result, _Refused):
                if future is not None and not future.done():
                    future.set_exception(result.error)
                continue
            if isinstance(job, _Append):
                if isinstance(result, Publication):
                    positions[result.channel] = StreamPosition(result.offset, result.epoch)
                    if sink is not None and result.channel in subscribed:
                        sink.on_publication(result)
            elif isinstance(job, _Position):
                if result.epoch:
                    positions[job.channel] = result
            elif isinstance(job, _Read):
                if result[0].epoch:
                    positions[job.channel] = result[0]
            elif isinstance(job, _Sweep):
                for channel in result:
                    positions.pop(channel, None)
            if future is not None and not future.done():  # done = the caller was cancelled
                future.set_result(result)

    def _fail(self, jobs: list[_Job], cause: BaseException) -> None:
        if any(isinstance(job, _Append) for job in jobs) or self._failure is None:
            self._failure = f"{type(cause).__name__}: {cause}"[:300]
        for job in jobs:
            future = job.future
            if future is not None and not future.done():
                error = Unavailable("history store unavailable")
                error.__cause__ = cause
                future.set_exception(error)

    def _stopped_now(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        # Queued after the thread's last batch (it ended unexpectedly): refused.
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._writer.jobs.get_nowait()
                if job is not None and job.future is not None and not job.future.done():
                    job.future.set_exception(Unavailable("history writer stopped"))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed without closing the store
        logger.warning("history: event loop closed while the store was open")
