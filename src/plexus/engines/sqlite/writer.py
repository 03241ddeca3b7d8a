"""The writer thread: owns the only connection, runs queued jobs in group commits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

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
    CHUNKS,
    SCHEMA,
    SCHEMA_VERSION,
    boot_id,
    count_namespaces,
    migrate,
    pack,
    roll_back,
    unpack,
)
from plexus.exceptions import Unavailable
from plexus.models import Duplicate, Publication, StreamPosition

if TYPE_CHECKING:
    from plexus.engines.sqlite.broker import SqliteBroker

logger = logging.getLogger("plexus.engines.sqlite")

SWEEP_BATCH: Final = 10_000  # bounds how long one sweep holds up the appends queued behind it
ERROR_LOG_INTERVAL: Final = 5.0
# The journal moves into `chunks` once it holds this many messages or payload
# bytes: more per move make bigger chunks (fewer rows and index entries per
# message), fewer bound the pause of the batch that moves and the replay
# after a crash.
MOVE_ROWS: Final = 1024
MOVE_BYTES: Final = 4 << 20
# Seconds without jobs after which the journal is moved anyway.
IDLE_MOVE: Final = 1.0
# Commits after which the WAL is checkpointed (by this thread, after a batch),
# about SQLite's default of 1000 pages; also after each move when idle.
CHECKPOINT_COMMITS: Final = 400


# A message as the journal holds it: channel, offset, time, expires, client,
# user, data, size, max_bytes (see `schema.py`).
JournalRow: TypeAlias = tuple[str, int, int, int | None, str | None, str | None, bytes, int, int]


@dataclass(slots=True)
class Pending:
    """A channel's messages in the journal, not yet moved into `chunks`."""

    offset: int  # of its newest
    time: int  # of its newest
    forget: int | None  # the channel's `expires_ms` once they are moved
    size: int  # the retention they are trimmed to
    max_bytes: int
    bytes: int  # their payload bytes
    rows: list[JournalRow]  # the chunk they become


@dataclass(slots=True)  # attributes read per message: no instance dict
class Writer:
    """The writer thread: owns the connection and each channel's top position.

    An append commits its message in the journal: one row in `batches` per
    batch, its messages packed in it (a table without index: a commit writes
    a page or two whatever the channels). The journal moves into `chunks`,
    one row per channel, once it is big enough, when idle, before a read of a
    channel it holds, before a sweep and at close; the move also drops each
    channel's chunks that retention left behind and writes its row in
    `channels`, with the retention. Reads filter what a trim at each append
    would have removed from the chunks they unpack, so every read sees what
    that trim would leave; a restart moves what a crash left in the journal
    before anything else.
    """

    file: Path
    synchronous: str
    busy_timeout: float
    conn: sqlite3.Connection | None = None
    tops: dict[str, Top] = field(default_factory=dict)  # committed, or written by this batch
    counts: Counter[str] = field(default_factory=Counter)  # channels per namespace
    pinned: set[str] = field(default_factory=set)  # channels a local client subscribes to
    grace_ms: int = 300_000
    # The journal: channels with rows there, and rows and payload bytes in all.
    journal: dict[str, Pending] = field(default_factory=dict)
    journal_rows: int = 0
    journal_bytes: int = 0
    # Messages of the batch under way, written to the journal in one row.
    rows: list[JournalRow] = field(default_factory=list)
    # The journal's state above is not known (at open, after a failed batch):
    # the next transaction reads it from the database and moves the journal.
    replay: bool = True
    failures: int = 0
    logged_at: float = -1e9
    taken: int = 0  # jobs taken from `jobs` (or run inline) so far (see SqliteBroker.pending)
    # Held while the connection and the state above are used, by this thread
    # or by the loop (`run_inline`, which never waits for it).
    lock: threading.Lock = field(default_factory=threading.Lock)
    inline: bool = False  # the loop may run plain appends itself (see `run_inline`)
    move_asked: bool = False  # the loop woke this thread to move the journal
    commits: int = 0  # since the last checkpoint
    # Lists of jobs, one per hand-over from the loop (None = stop).
    jobs: queue.SimpleQueue[list[Job] | None] = field(default_factory=queue.SimpleQueue)
    before_commit: Callable[[list[Publication]], None] | None = None  # see SqliteBroker

    def run(self, loop: asyncio.AbstractEventLoop, store: SqliteBroker) -> None:
        """Thread body: run batches until the stop mark, then close the database.

        However it ends, the store hears of it (`_stopped_now`): even a thread
        ended by an exception that is not an `Exception` leaves no caller waiting.
        """
        try:
            self._serve(loop, store)
        finally:
            call_soon(loop, store._stopped_now)

    def _serve(self, loop: asyncio.AbstractEventLoop, store: SqliteBroker) -> None:
        stop = False
        while not stop:
            try:
                # Woken each second at least: the loop may have filled the
                # journal by itself (see `run_inline`), and nothing tells.
                items = [self.jobs.get(timeout=IDLE_MOVE)]
            except queue.Empty:
                with self.lock:
                    if self.journal or self.commits:
                        self._settle_quietly()
                continue
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self.jobs.get_nowait())
            # `close()` refuses new jobs before it queues the stop mark, so it is last.
            stop = items[-1] is None
            batch = [job for jobs in items if jobs is not None for job in jobs]
            with self.lock:
                self.taken += len(batch)
                if not batch:
                    if self._move_due():  # asked by `run_inline`
                        self._settle_quietly(idle=False)
                    continue
                try:
                    results = self.run_batch(batch)
                except BaseException as exc:  # supervised: each caller of the batch hears of it
                    self.failed(exc)
                    call_soon(loop, store._fail, batch, exc)
                    if not isinstance(exc, Exception):
                        raise  # SystemExit and the like end the thread; `health` shows it
                    continue
            call_soon(loop, store._deliver, batch, results)
        with self.lock:
            self.shutdown()

    def failed(self, exc: BaseException) -> None:
        """Count and log the failure of a batch."""
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

    def run_inline(self, jobs: list[Job]) -> list[Any] | None:
        """Run `jobs` on the calling thread (the event loop's) if they are plain
        appends and the connection is free; None when they must be queued.

        With `synchronous = NORMAL` a commit of plain appends writes a page or
        two into the OS cache: it costs less than handing it to this thread and
        back (two wake-ups and the GIL changing hands, several context switches
        per batch on a busy CPU). The moves and checkpoints, which may wait for
        the disk, stay on this thread: when the journal is due to move, this
        thread is woken to do it. The caller has made sure that nothing it
        queued before is still outstanding.

        Raises:
            BaseException: the batch failed (rolled back): as `run_batch`.
        """
        if not self.inline or self.conn is None or not self.lock.acquire(blocking=False):
            return None
        try:
            if not self._plain(jobs):
                return None
            self.taken += len(jobs)
            try:
                results = self.run_batch(jobs, inline=True)
            except BaseException as exc:
                self.failed(exc)
                raise
            if self._move_due() and not self.move_asked:
                self.move_asked = True
                self.jobs.put([])
            return results
        finally:
            self.lock.release()

    def _settle_quietly(self, *, idle: bool = True) -> None:
        """Move the journal (`idle`: nothing else is asked); a failure is logged, and
        the journal is moved again later (a rolled-back move loses nothing)."""
        try:
            self.settle(idle=idle)
        except Exception as exc:
            self.failures += 1
            logger.warning("history: moving the journal of %s failed: %s", self.file, exc)

    def settle(self, *, idle: bool = True) -> None:
        """Move the journal into `chunks` in a transaction of its own, then
        checkpoint the WAL if it is due or nothing else is asked (`idle`)."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._move(conn)
            conn.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        if idle or self.commits >= CHECKPOINT_COMMITS:
            self._checkpoint(conn)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database (SQLite's own automatic checkpoints are
        off: one would run inside whichever COMMIT crossed the threshold, the
        loop's own included). A failure is logged: the next one tries again."""
        self.commits = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            logger.warning("history: checkpoint of %s failed: %s", self.file, exc)

    def connect(self) -> sqlite3.Connection:
        if self.conn is not None:
            return self.conn
        self.file.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.file,
            timeout=self.busy_timeout,
            isolation_level=None,
            # Used by the loop too (`run_inline`), never at the same time: `lock`.
            check_same_thread=False,
        )
        try:
            # Exclusive: a second process must not hand out this one's offsets.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode!r})")
            migrate(conn)
            conn.executescript(SCHEMA + CHUNKS)
            self._mark_running(conn)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see `_checkpoint`
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
            roll_back(conn)
            raise

    def shutdown(self) -> None:
        if self.conn is None:
            return
        self._settle_quietly()  # or else the next open moves it
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.execute("DELETE FROM meta WHERE key = 'running'")
            conn.close()
        except sqlite3.Error:
            logger.exception("history: could not close %s cleanly", self.file)

    def run_batch(self, jobs: list[Job], *, inline: bool = False) -> list[Any]:
        """Execute `jobs` in one transaction and return one result per job
        (`inline`: plain appends on the loop's thread, which never move)."""
        conn = self.connect()
        results: list[Any] | None = None
        self.commits += 1
        try:
            if not conn.in_transaction and self._plain(jobs):
                # These run no statement of their own: their row goes in one
                # INSERT that is its own transaction, rather than in BEGIN,
                # INSERT and COMMIT. Each statement releases the GIL twice, and
                # each release can cost a switch to the event loop and back.
                results = [self._append(conn, job) for job in jobs if isinstance(job, Append)]
                if inline or not self._move_due():
                    self._write_rows(conn)
                    return results
            conn.execute("BEGIN IMMEDIATE")
            if results is None:
                if self.replay:
                    self._move(conn)
                results = [self._run(conn, job) for job in jobs]
            if self._move_due():
                self._move(conn)
            else:
                self._write_rows(conn)
            hook = self.before_commit
            if hook is not None:
                hook([job.pub for job in jobs if isinstance(job, Append)])
            conn.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        if self.commits >= CHECKPOINT_COMMITS:
            self._checkpoint(conn)
        return results

    def _move_due(self) -> bool:
        return self.journal_rows >= MOVE_ROWS or self.journal_bytes >= MOVE_BYTES

    def _plain(self, jobs: list[Job]) -> bool:
        """Whether `jobs` are appends that run no statement before their journal
        row is written, with nothing to hold before COMMIT."""
        if self.before_commit is not None or self.replay:
            return False
        tops = self.tops
        for job in jobs:
            if type(job) is not Append or job.key is not None or job.pub.channel not in tops:
                return False
        return True

    def _run(self, conn: sqlite3.Connection, job: Job) -> Any:
        if isinstance(job, Append):
            try:
                return self._append(conn, job)
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
        self.rows.clear()
        self.replay = True  # the journal is back to its last commit
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
        sql = "SELECT top_offset, epoch, size, max_bytes FROM channels WHERE channel = ?"
        row = conn.execute(sql, (channel,)).fetchone()
        if row is not None:
            top = self.tops[channel] = Top(int(row[0]), str(row[1]), None, row[2], row[3])
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

    def _append(self, conn: sqlite3.Connection, job: Append) -> Publication | Duplicate:
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
        top = self.tops.get(channel) or self._channel(conn, channel, retention)
        assert top is not None  # created when missing
        offset = top.offset = top.offset + 1
        pub.offset, pub.epoch = offset, top.epoch
        raw, at = pub.raw, pub.time
        # Forgotten after its newest message expired (plus the grace), or never.
        expires = forget = None
        if retention.ttl > 0:
            expires = at + round(retention.ttl * 1000)
            forget = expires + self.grace_ms
        size, max_bytes = retention.size, retention.max_bytes
        row = (channel, offset, at, expires, pub.client, pub.user, raw, size, max_bytes)
        self.rows.append(row)
        self._pend(row, forget)
        if job.key is not None:
            conn.execute(
                'INSERT OR REPLACE INTO idempotency (channel, key, "offset", epoch, expires)'
                " VALUES (?, ?, ?, ?, ?)",
                (channel, job.key, offset, top.epoch, at + job.idempotency_ttl),
            )
        return pub

    def _pend(self, row: JournalRow, forget: int | None) -> None:
        """Count `row` in the journal (it becomes part of its channel's next chunk)."""
        channel, offset, at, size, max_bytes = row[0], row[1], row[2], row[7], row[8]
        length = len(row[6])
        pending = self.journal.get(channel)
        if pending is None:
            self.journal[channel] = Pending(offset, at, forget, size, max_bytes, length, [row])
        else:
            pending.offset, pending.time, pending.forget = offset, at, forget
            pending.size, pending.max_bytes = size, max_bytes
            pending.bytes += length
            pending.rows.append(row)
        self.journal_rows += 1
        self.journal_bytes += length

    def _write_rows(self, conn: sqlite3.Connection) -> None:
        """Write the batch's messages to the journal: one row, packed."""
        rows = self.rows
        if rows:
            conn.execute("INSERT INTO batches (data) VALUES (?)", (pack(rows),))
            rows.clear()

    def _move(self, conn: sqlite3.Connection) -> None:
        """Move the journal into `chunks`, drop what retention left behind, write
        the channels' rows."""
        if self.replay:
            self._read_journal(conn)
        # The batch under way moves with the rest: its messages need no journal row.
        self.rows.clear()
        journal = self.journal
        if not journal:
            return
        conn.executemany(
            "INSERT INTO chunks (channel, last, expires, bytes, data) VALUES (?, ?, ?, ?, ?)",
            [
                (channel, p.offset, p.rows[-1][3], p.bytes, pack([r[1:7] for r in p.rows]))
                for channel, p in journal.items()
            ],
        )
        conn.execute("DELETE FROM batches")
        conn.executemany(
            "UPDATE channels SET top_offset = ?, updated_ms = ?, expires_ms = ?, size = ?,"
            " max_bytes = ? WHERE channel = ?",
            [
                (p.offset, p.time, p.forget, p.size, p.max_bytes or None, channel)
                for channel, p in journal.items()
            ],
        )
        trims: list[tuple[str, int]] = []
        for channel, p in journal.items():
            top = self.tops.get(channel) or self._channel(conn, channel, None)
            assert top is not None  # its row is there: it has messages
            top.size, top.max_bytes = p.size, p.max_bytes or None
            if top.bytes is not None:
                top.bytes += p.bytes
            # Chunks wholly older than the `size` newest messages go, in
            # steps of a quarter of `size`: one range delete on the primary
            # key now and then rather than one per channel and move.
            horizon = p.offset - p.size
            if horizon >= top.trimmed + max(p.size // 4, 1):
                trims.append((channel, horizon))
                top.trimmed = horizon
                top.bytes = None  # unknown again; recounted only if a byte limit needs it
            if p.max_bytes:
                self._trim_bytes(conn, channel, top, p.max_bytes)
        if trims:
            conn.executemany("DELETE FROM chunks WHERE channel = ? AND last <= ?", trims)
        journal.clear()
        self.journal_rows = self.journal_bytes = 0
        self.move_asked = False

    def _read_journal(self, conn: sqlite3.Connection) -> None:
        """Learn what the journal holds from the database (its state in memory is lost)."""
        self.rows.clear()
        self.journal.clear()
        self.journal_rows = self.journal_bytes = 0
        grace = self.grace_ms
        for (data,) in conn.execute("SELECT data FROM batches ORDER BY rowid").fetchall():
            for row in unpack(data):
                expires = row[3]
                self._pend(tuple(row), None if expires is None else expires + grace)
        self.replay = False

    def _trim_bytes(self, conn: sqlite3.Connection, channel: str, top: Top, limit: int) -> None:
        """Drop the oldest chunks while the newer ones hold `limit` payload bytes
        or more: none of their messages is within the limit (reads cut the rest)."""
        if top.bytes is None:
            row = conn.execute(
                "SELECT coalesce(sum(bytes), 0) FROM chunks WHERE channel = ?", (channel,)
            ).fetchone()
            top.bytes = int(row[0])
        while top.bytes > limit:
            row = conn.execute(
                "SELECT last, bytes FROM chunks WHERE channel = ? ORDER BY last LIMIT 1",
                (channel,),
            ).fetchone()
            if row is None or top.bytes - int(row[1]) < limit:
                return
            conn.execute("DELETE FROM chunks WHERE channel = ? AND last = ?", (channel, row[0]))
            top.bytes -= int(row[1])

    def _read(self, conn: sqlite3.Connection, job: Read) -> tuple[StreamPosition, list[Row], bool]:
        if job.channel in self.journal:
            self._move(conn)
        top = self._channel(conn, job.channel, None)
        if top is None:
            return NO_STREAM, [], False
        position = StreamPosition(top.offset, top.epoch)
        rows = self._kept(conn, job.channel, top, job.since, job.now)
        if job.limit >= 0:
            rows = rows[: job.limit]
        if job.max_bytes is None:
            return position, rows, False
        budget = job.max_bytes
        # With a limit, one row more than wanted is fetched only to tell which
        # offset follows the page: it is not returned, so it spends no budget.
        wanted = job.limit - 1 if job.limit >= 0 else -1
        for index, row in enumerate(rows):
            if index == wanted:
                return position, rows, False
            budget -= len(row[4])
            if budget < 0:
                return position, rows[:index], True  # cut: the caller cannot have it all
        return position, rows, False

    def _kept(
        self, conn: sqlite3.Connection, channel: str, top: Top, since: int, now: int
    ) -> list[Row]:
        """The channel's messages after `since` that a trim at each append would
        have kept, unexpired at `now`, oldest first."""
        # Older than the `size` newest: trimmed (their chunk may still be there).
        window = top.offset - top.size if top.size is not None else 0
        # A byte limit counts from the newest message back: read the whole window.
        first = window if top.max_bytes else max(since, window)
        messages: list[list[Any]] = []
        for (data,) in conn.execute(
            "SELECT data FROM chunks WHERE channel = ? AND last > ? ORDER BY last",
            (channel, first),
        ):
            messages.extend(unpack(data))
        start = 0
        while start < len(messages) and messages[start][0] <= first:
            start += 1
        if top.max_bytes:
            start += _byte_cut(messages[start:], top.max_bytes)
        return [
            (offset, at, client, user, data)
            for offset, at, expires, client, user, data in messages[start:]
            if offset > since and (expires is None or expires > now)
        ]

    def _pin(self, conn: sqlite3.Connection, job: Pin) -> None:
        if job.on:
            self.pinned.add(job.channel)
            return
        self.pinned.discard(job.channel)
        # The channel outlives its last subscriber by the grace period at least.
        kept = now_ms() + self.grace_ms
        conn.execute(
            "UPDATE channels SET expires_ms = max(expires_ms, ?)"
            " WHERE channel = ? AND expires_ms IS NOT NULL",
            (kept, job.channel),
        )
        pending = self.journal.get(job.channel)
        if pending is not None and pending.forget is not None:
            pending.forget = max(pending.forget, kept)  # what the move will write

    def _sweep(self, conn: sqlite3.Connection, now: int) -> list[str]:
        """Delete expired messages, idempotency keys and idle channels; return the channels."""
        self._move(conn)  # the messages to delete, and the channels' expiry, are all in place
        # A chunk goes once its newest message expired (reads skip the others).
        stale = conn.execute(
            "SELECT DISTINCT channel FROM chunks WHERE expires <= ? LIMIT ?", (now, SWEEP_BATCH)
        ).fetchall()
        conn.execute(
            "DELETE FROM chunks WHERE rowid IN"
            " (SELECT rowid FROM chunks WHERE expires <= ? LIMIT ?)",
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
            conn.execute("DELETE FROM chunks WHERE channel = ?", (channel,))
            conn.execute("DELETE FROM idempotency WHERE channel = ?", (channel,))
            conn.execute("DELETE FROM channels WHERE channel = ?", (channel,))
            self.tops.pop(channel, None)
            self.counts[namespace] -= 1
            if self.counts[namespace] <= 0:
                del self.counts[namespace]
            gone.append(channel)
        return gone


def _byte_cut(messages: list[list[Any]], limit: int) -> int:
    """Index of the oldest of `messages` a byte limit keeps: the newest ones
    whose payloads add up to `limit` at most, and the newest one always."""
    total = 0
    index = len(messages)
    while index > 0:
        total += len(messages[index - 1][5])
        if total > limit and index < len(messages):
            break
        index -= 1
    return index


def call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed without closing the store
        logger.warning("history: event loop closed while the store was open")
