"""Durable history in SQLite (stdlib `sqlite3`, WAL mode), off the event loop.

One writer thread owns the only connection; the loop queues jobs and awaits
futures. Group commit: the thread runs all jobs queued while its previous
commit ran in ONE transaction, then resolves their futures in queue order with
one `call_soon_threadsafe` callback per batch. Jobs are queued synchronously in
call order, so a channel's appends get offsets and complete in call order.
Offsets are assigned on the thread from its cache of each channel's top: a
failed batch is rolled back and the cache reloaded, so a failure leaves no gap
and no duplicate. The constructor touches nothing; `await start()` opens the
database (other methods start the thread lazily); `close()` commits what is
queued, records a clean shutdown and joins the thread.

Durability when `append` returns: with `synchronous="NORMAL"` (default) the
commit is in the WAL file in the OS cache. It survives a crash or `kill -9`
of the process, but a power loss or OS crash may lose the last transactions
(without corruption), and their offsets would be issued again under the same
epoch. So an open after an unclean shutdown followed by a reboot (or with an
unknown boot id) gives every channel a new epoch: clients reload instead of
recovering across a silent gap. `synchronous="FULL"` fsyncs each commit
(amortised by group commit) and also survives a power loss.

Storage: `channels(channel, epoch, top_offset, updated_ms)` outlives messages,
so epochs and offset counters survive expiry and restarts; `messages(channel,
offset, time, expires, client, user, data)` keeps `data` as MessagePack (bin
type for `bytes`; tuples read back as lists). Appends trim a channel to its
`size` newest rows in their transaction; reads skip expired rows, which a sweep
deletes every `sweep_interval` seconds. The file is locked exclusively, so two
servers cannot hand out the same offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import msgpack

from plexus.exceptions import Unavailable
from plexus.history.memory import expiry, new_epoch, now_ms, page_is_complete
from plexus.models import HistoryPage, Publication, StreamPosition

__all__ = ["SqliteHistoryStore"]

logger = logging.getLogger(__name__)

DB_FILE = "history.sqlite3"
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SWEEP_BATCH = 10_000  # bounds how long one sweep holds up the appends queued behind it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY, epoch TEXT NOT NULL,
    top_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    PRIMARY KEY (channel, "offset")
);
CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires) WHERE expires IS NOT NULL;
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
class _Open:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Position:
    channel: str
    future: asyncio.Future[StreamPosition]


@dataclass(slots=True)
class _Append:
    channel: str
    payload: bytes
    time: int
    expires: int | None
    client: str | None
    user: str | None
    size: int
    future: asyncio.Future[StreamPosition]


@dataclass(slots=True)
class _Read:
    channel: str
    since: int
    limit: int  # -1 = no limit (SQLite's own convention)
    now: int
    future: asyncio.Future[tuple[StreamPosition, list[Row]]]


_Job: TypeAlias = _Open | _Position | _Append | _Read


def _boot_id() -> str:
    """Return an id that changes when the machine reboots ("" where unknown)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class _Writer:
    """The writer thread: owns the connection and each channel's top position."""

    def __init__(self, file: Path, synchronous: str, busy_timeout: float, sweep: float) -> None:
        self.file = file
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.sweep_interval = sweep
        self.next_sweep = 0.0
        self.conn: sqlite3.Connection | None = None
        self.tops: dict[str, StreamPosition] = {}  # committed, or written by this batch
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None = stop

    def run(self, loop: asyncio.AbstractEventLoop, store: SqliteHistoryStore) -> None:
        """Thread body: run batches until the stop mark, then close the database."""
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
            except Exception as exc:  # supervised: each caller of the batch hears of it
                if isinstance(exc, sqlite3.Error | OSError):
                    logger.warning("history: %s failed: %s", self.file, exc)
                else:
                    logger.exception("history: unexpected failure in %s", self.file)
                _call_soon(loop, store._fail, batch, exc)
            else:
                _call_soon(loop, store._deliver, batch, results)
        self.shutdown()
        _call_soon(loop, store._stopped_now)

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
            conn.executescript(_SCHEMA)
            self._mark_running(conn)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.next_sweep = _time.monotonic() + self.sweep_interval
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
            dirty: dict[str, int] = {}
            results: list[Any] = []
            for job in jobs:
                if isinstance(job, _Append):
                    results.append(self._append(conn, job, dirty))
                elif isinstance(job, _Read):
                    top = self._channel(conn, job.channel)
                    rows = conn.execute(_SELECT, (job.channel, job.since, job.now, job.limit))
                    results.append((top, rows.fetchall()))
                elif isinstance(job, _Position):
                    results.append(self._channel(conn, job.channel))
                else:
                    results.append(None)
            # One UPDATE per channel and batch, not per message.
            conn.executemany(
                "UPDATE channels SET top_offset = ?, updated_ms = ? WHERE channel = ?",
                [(self.tops[name].offset, at, name) for name, at in dirty.items()],
            )
            self._maybe_sweep(conn)
            conn.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        return results

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

    def _channel(self, conn: sqlite3.Connection, channel: str) -> StreamPosition:
        position = self.tops.get(channel)
        if position is not None:
            return position
        sql = "SELECT top_offset, epoch FROM channels WHERE channel = ?"
        row = conn.execute(sql, (channel,)).fetchone()
        if row is None:
            position = StreamPosition(0, new_epoch())
            conn.execute(
                "INSERT INTO channels (channel, epoch, top_offset, updated_ms) VALUES (?, ?, 0, ?)",
                (channel, position.epoch, now_ms()),
            )
        else:
            position = StreamPosition(int(row[0]), str(row[1]))
        self.tops[channel] = position
        return position

    def _append(
        self, conn: sqlite3.Connection, job: _Append, dirty: dict[str, int]
    ) -> StreamPosition:
        top = self._channel(conn, job.channel)
        offset = top.offset + 1
        if job.size > 0:
            row = (job.channel, offset, job.time, job.expires, job.client, job.user, job.payload)
            conn.execute(_INSERT, row)
        if offset > job.size:  # a range delete on the primary key, usually of one row
            sql = 'DELETE FROM messages WHERE channel = ? AND "offset" <= ?'
            conn.execute(sql, (job.channel, offset - job.size))
        position = self.tops[job.channel] = StreamPosition(offset, top.epoch)
        dirty[job.channel] = job.time
        return position

    def _maybe_sweep(self, conn: sqlite3.Connection) -> None:
        if _time.monotonic() < self.next_sweep:
            return
        self.next_sweep = _time.monotonic() + self.sweep_interval
        conn.execute(
            "DELETE FROM messages WHERE rowid IN"
            " (SELECT rowid FROM messages WHERE expires <= ? LIMIT ?)",
            (now_ms(), _SWEEP_BATCH),
        )


class SqliteHistoryStore:
    """Durable history in one SQLite database; see the module docstring.

    Implements `plexus.history.base.HistoryStore`. Use it from one event loop.

    Args:
        path: a file ending in `.db`, `.sqlite` or `.sqlite3` is the database
            itself; any other path is a directory (created if missing) that
            holds `history.sqlite3`.
        synchronous: `"NORMAL"` survives a process kill, `"FULL"` also a power loss.
        busy_timeout: seconds to wait for a database lock before failing.
        sweep_interval: seconds between deletions of expired messages.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
        sweep_interval: float = 60.0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        path = Path(path)
        file = path if path.suffix in _DB_SUFFIXES else path / DB_FILE
        self._writer = _Writer(file, synchronous, busy_timeout, sweep_interval)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._positions: dict[str, StreamPosition] = {}  # committed, per channel
        self._closed = False

    @property
    def file(self) -> Path:
        """The database file."""
        return self._writer.file

    async def start(self) -> None:
        """Open the database, creating it if needed.

        Raises:
            Unavailable: it cannot be opened (or another process holds it).
        """
        job = _Open(self._new_future())
        self._enqueue(job)
        await job.future

    async def append(
        self,
        channel: str,
        data: Any,
        *,
        time: int,
        client: str | None = None,
        user: str | None = None,
        size: int,
        ttl: float,
    ) -> Publication:
        """Store `data` under the channel's next offset; return after the commit.

        See `HistoryStore.append`. A cancelled caller does not withdraw the
        message: it is still committed and uses its offset.

        Raises:
            Unavailable: the database failed; the message was not stored.
            TypeError: `data` cannot be encoded as MessagePack.
        """
        payload = msgpack.packb(data, use_bin_type=True)
        expires = expiry(time, ttl)
        future: asyncio.Future[StreamPosition] = self._new_future()
        self._enqueue(_Append(channel, payload, time, expires, client, user, max(size, 0), future))
        position = await future
        return Publication(channel, data, position.offset, position.epoch, time, client, user)

    def append_nowait(
        self,
        channel: str,
        data: Any,
        *,
        time: int,
        client: str | None = None,
        user: str | None = None,
        size: int,
        ttl: float,
    ) -> None:
        """Always None: an append waits for its commit (see `HistoryStore.append_nowait`)."""
        return None

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's last committed offset and epoch (creating the epoch if new)."""
        known = self._positions.get(channel)
        if known is not None and not self._closed:
            return known
        job = _Position(channel, self._new_future())
        self._enqueue(job)
        return await job.future

    async def read(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        now: int | None = None,
    ) -> HistoryPage:
        """Return kept messages after `since`, oldest first; see `HistoryStore.read`.

        `since=None` reads from the oldest kept message and is complete only if
        no message of the epoch was dropped yet (as if `since` were 0).

        Raises:
            Unavailable: the database failed or holds an unreadable message.
        """
        after = max(since or 0, 0)
        wanted = max(limit, 0) if limit is not None else None
        # One row more than wanted tells which offset follows the page.
        fetch = -1 if wanted is None else wanted + 1
        job = _Read(channel, after, fetch, now_ms() if now is None else now, self._new_future())
        self._enqueue(job)
        top, rows = await job.future
        following: int | None = None
        if wanted is not None and len(rows) > wanted:
            following = rows[wanted][0]
            rows = rows[:wanted]
        try:
            publications = [
                Publication(channel, msgpack.unpackb(data, raw=False), offset, top.epoch, at, c, u)
                for offset, at, c, u, data in rows
            ]
        except (ValueError, msgpack.UnpackException) as exc:
            raise Unavailable(f"history of {channel!r} holds an unreadable message") from exc
        offsets = [p.offset for p in publications]
        complete = page_is_complete(offsets, after, top.offset, following)
        return HistoryPage(publications, top, complete)

    async def close(self) -> None:
        """Commit everything queued, record a clean shutdown and join the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None or self._stopped is None:
            return
        self._writer.jobs.put(None)
        await self._stopped
        self._thread.join()  # it has nothing left to do but return

    # The rest runs on the event loop; `_deliver`, `_fail` and `_stopped_now`
    # are called back by the writer thread through `call_soon_threadsafe`.

    def _new_future(self) -> asyncio.Future[Any]:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        return loop.create_future()

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise Unavailable("history store is closed")
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
        # The cache is updated before any caller resumes, so a caller already
        # sees its own append in `position`.
        for job, result in zip(jobs, results, strict=True):
            if isinstance(job, _Append | _Position):
                self._positions[job.channel] = result
            elif isinstance(job, _Read):
                self._positions[job.channel] = result[0]
            if not job.future.done():  # done = the caller was cancelled
                job.future.set_result(result)

    def _fail(self, jobs: list[_Job], cause: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                error = Unavailable("history store unavailable")
                error.__cause__ = cause
                job.future.set_exception(error)

    def _stopped_now(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed without closing the store
        logger.warning("history: event loop closed while the store was open")
