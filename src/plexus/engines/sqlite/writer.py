"""The writer thread: owns the only connection, runs queued jobs in group commits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from plexus.engines.base import Retention
from plexus.engines.memory import new_epoch, now_ms
from plexus.engines.sqlite.jobs import (
    NO_STREAM,
    Append,
    Job,
    Pin,
    Position,
    Positions,
    Read,
    Refused,
    Row,
    Sweep,
    Top,
)
from plexus.engines.sqlite.schema import (
    INSERT,
    SCHEMA,
    SCHEMA_VERSION,
    SELECT,
    boot_id,
    count_namespaces,
    migrate,
)
from plexus.exceptions import Unavailable
from plexus.models import Duplicate, Publication, StreamPosition

if TYPE_CHECKING:
    from plexus.engines.sqlite.broker import SqliteBroker

logger = logging.getLogger("plexus.engines.sqlite")

SWEEP_BATCH: Final = 10_000  # bounds how long one sweep holds up the appends queued behind it
ERROR_LOG_INTERVAL: Final = 5.0


def _expires(time: int, ttl: float) -> int | None:
    return time + round(ttl * 1000) if ttl > 0 else None


@dataclass
class Writer:
    """The writer thread: owns the connection and each channel's top position."""

    file: Path
    synchronous: str
    busy_timeout: float
    conn: sqlite3.Connection | None = None
    tops: dict[str, Top] = field(default_factory=dict)  # committed, or written by this batch
    counts: Counter[str] = field(default_factory=Counter)  # channels per namespace
    pinned: set[str] = field(default_factory=set)  # channels a local client subscribes to
    grace_ms: int = 300_000
    failures: int = 0
    logged_at: float = -1e9
    # Lists of jobs, one per hand-over from the loop (None = stop).
    jobs: queue.SimpleQueue[list[Job] | None] = field(default_factory=queue.SimpleQueue)
    before_commit: Callable[[list[Publication]], None] | None = None  # see SqliteBroker

    def run(self, loop: asyncio.AbstractEventLoop, store: SqliteBroker) -> None:
        """Thread body: run batches until the stop mark, then close the database."""
        stop = False
        while not stop:
            items = [self.jobs.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self.jobs.get_nowait())
            # `close()` refuses new jobs before it queues the stop mark, so it is last.
            stop = items[-1] is None
            batch = [job for jobs in items if jobs is not None for job in jobs]
            if not batch:
                continue
            try:
                results = self.run_batch(batch)
            except Exception as exc:  # supervised: each caller of the batch hears of it
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
                call_soon(loop, store._fail, batch, exc)
            else:
                call_soon(loop, store._deliver, batch, results)
        self.shutdown()
        call_soon(loop, store._stopped_now)

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
            migrate(conn)
            conn.executescript(SCHEMA)
            self._mark_running(conn)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self.counts = count_namespaces(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def _mark_running(self, conn: sqlite3.Connection) -> None:
        # Fsynced whatever the mode: were this commit lost to a power failure,
        # so would be all later ones, and the next open could not tell.
        conn.execute("PRAGMA synchronous=FULL")
        boot = boot_id()
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

    def run_batch(self, jobs: list[Job]) -> list[Any]:
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
                hook([job.pub for job in jobs if isinstance(job, Append)])
            conn.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        return results

    def _run(
        self, conn: sqlite3.Connection, job: Job, dirty: dict[str, tuple[int, int | None]]
    ) -> Any:
        if isinstance(job, Append):
            try:
                return self._append(conn, job, dirty)
            except Unavailable as exc:
                return Refused(exc)
        if isinstance(job, Read):
            return self._read(conn, job)
        if isinstance(job, Position):
            try:
                top = self._channel(conn, job.channel, job.create)
            except Unavailable as exc:
                return Refused(exc)
            return StreamPosition(top.offset, top.epoch) if top else NO_STREAM
        if isinstance(job, Positions):
            found: dict[str, StreamPosition] = {}
            for channel in job.channels:
                top = self._channel(conn, channel, None)
                found[channel] = StreamPosition(top.offset, top.epoch) if top else NO_STREAM
            return found
        if isinstance(job, Pin):
            self._pin(conn, job)
            return None
        if isinstance(job, Sweep):
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
            self.counts = count_namespaces(conn)

    def _channel(
        self, conn: sqlite3.Connection, channel: str, create: Retention | None
    ) -> Top | None:
        top = self.tops.get(channel)
        if top is not None:
            return top
        sql = "SELECT top_offset, epoch FROM channels WHERE channel = ?"
        row = conn.execute(sql, (channel,)).fetchone()
        if row is not None:
            top = self.tops[channel] = Top(int(row[0]), str(row[1]))
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
        top = Top(0, new_epoch(), 0)
        conn.execute(
            "INSERT INTO channels (channel, epoch, top_offset, updated_ms, expires_ms, namespace)"
            " VALUES (?, ?, 0, ?, ?, ?)",
            (channel, top.epoch, now, now + self.grace_ms, namespace),
        )
        self.counts[namespace] += 1
        self.tops[channel] = top
        return top

    def _append(
        self, conn: sqlite3.Connection, job: Append, dirty: dict[str, tuple[int, int | None]]
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
            conn.execute(INSERT, row)
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
        self, conn: sqlite3.Connection, channel: str, top: Top, added: int, offset: int, limit: int
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

    def _read(self, conn: sqlite3.Connection, job: Read) -> tuple[StreamPosition, list[Row], bool]:
        top = self._channel(conn, job.channel, None)
        if top is None:
            return NO_STREAM, [], False
        position = StreamPosition(top.offset, top.epoch)
        cursor = conn.execute(SELECT, (job.channel, job.since, job.now, job.limit))
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

    def _pin(self, conn: sqlite3.Connection, job: Pin) -> None:
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
            "SELECT DISTINCT channel FROM messages WHERE expires <= ? LIMIT ?", (now, SWEEP_BATCH)
        ).fetchall()
        conn.execute(
            "DELETE FROM messages WHERE rowid IN"
            " (SELECT rowid FROM messages WHERE expires <= ? LIMIT ?)",
            (now, SWEEP_BATCH),
        )
        for (channel,) in stale:
            top = self.tops.get(channel)
            if top is not None:
                top.bytes = None
        conn.execute(
            "DELETE FROM idempotency WHERE (channel, key) IN"
            " (SELECT channel, key FROM idempotency WHERE expires <= ? LIMIT ?)",
            (now, SWEEP_BATCH),
        )
        idle = [
            (str(row[0]), str(row[1]))
            for row in conn.execute(
                "SELECT channel, namespace FROM channels WHERE expires_ms <= ? LIMIT ?",
                (now, SWEEP_BATCH),
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


def call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed without closing the store
        logger.warning("history: event loop closed while the store was open")
