"""`SqliteBroker`: the engine as the node sees it; the loop's side of the writer thread."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Final, Literal

from plexus.engines.base import EventSink, Health, Retention
from plexus.engines.memory import MemoryBroker, now_ms, page_is_complete
from plexus.engines.sqlite.jobs import (
    Append,
    Job,
    Open,
    Pin,
    Position,
    Positions,
    Read,
    Refused,
    Sweep,
)
from plexus.engines.sqlite.schema import DB_FILE
from plexus.engines.sqlite.writer import Writer
from plexus.exceptions import PlexusError, Unavailable
from plexus.models import UNSET, Duplicate, HistoryPage, Presence, Publication, StreamPosition
from plexus.supervisor import Supervisor

__all__ = ["SqliteBroker"]

_DB_SUFFIXES: Final = (".db", ".sqlite", ".sqlite3")


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
        self._writer = Writer(file, synchronous, busy_timeout, grace_ms=round(grace * 1000))
        # A commit with FULL waits for the disk: never on the loop.
        self._writer.inline = synchronous == "NORMAL"
        # Channels without history: in memory, no I/O (and their idempotency keys).
        self._local = MemoryBroker(idempotency_ttl=idempotency_ttl, grace=grace)
        self._sink: EventSink | None = None
        self._subscribed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        # Committed (offset, epoch) per channel (a tuple: made per publish).
        self._positions: dict[str, tuple[int, str]] = {}
        self._queued: list[Job] = []  # for the writer, at the end of this loop iteration
        self._handed = 0  # jobs handed to the writer so far (see `pending`)
        self._answered = 0  # of those, delivered or failed here
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
        costs one attribute check per batch; set, every batch runs on the
        writer thread (none is committed on the loop).
        """
        return self._writer.before_commit

    @before_commit.setter
    def before_commit(self, hook: Callable[[list[Publication]], None] | None) -> None:
        self._writer.before_commit = hook

    @property
    def pending(self) -> int:
        """Jobs handed to the writer thread and not taken yet (they make up its
        next batch). A test holding a batch with `before_commit` waits on it to
        know what queued behind."""
        return self._handed - self._writer.taken

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
        job = Open(self._new_future())
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
        self._hand_over()
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
        future: asyncio.Future[Publication | Duplicate] = self._new_future()

        def then(outcome: Publication | Duplicate | Exception) -> None:
            if future.done():
                return  # the caller was cancelled
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.publish_then(pub, retention, key, then)
        return await future

    def publish_then(
        self,
        pub: Publication,
        retention: Retention,
        key: str | None,
        then: Callable[[Publication | Duplicate | Exception], None],
    ) -> None:
        """`publish` started now: see `Broker.publish_then`. After the commit, the
        batch's callback calls `then` directly: no future, no extra callback."""
        if not retention.keeps_history:
            self._local.publish_then(pub, retention, key, then)
            return
        pub.raw  # noqa: B018 - encoded here, on the loop, not on the writer thread
        try:
            self._enqueue(Append(pub, retention, key, self.idempotency_ttl_ms, then))
        except PlexusError as exc:
            (self._loop or asyncio.get_running_loop()).call_soon(then, exc)

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
        self._enqueue(Pin(channel, True))

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel`; it is kept for the grace period."""
        self._subscribed.discard(channel)
        await self._local.unsubscribe(channel)
        if not self._closed:
            self._enqueue(Pin(channel, False))

    # ----- reading

    async def position(self, channel: str, *, create: Retention | None = None) -> StreamPosition:
        """The channel's last committed offset and epoch; see `HistoryStore.position`."""
        if self._local.holds(channel) or (create is not None and not create.keeps_history):
            return await self._local.position(channel, create=create)
        known = self._positions.get(channel)
        if known is not None and not self._closed:
            return StreamPosition(*known)
        job = Position(channel, create, self._new_future())
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
            job = Positions(rest, self._new_future())
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
        job = Read(channel, after, fetch, at, max_bytes, self._new_future())
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
        job = Sweep(now_ms() if now is None else now, self._new_future())
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

    def _enqueue(self, job: Job) -> None:
        if self._closed:
            raise Unavailable("history store is closed")
        if self._stopped is not None and self._stopped.done():
            raise Unavailable("history writer stopped")
        loop = self._loop
        if self._thread is None or loop is None:
            # Started synchronously so that even the first job is queued in call order.
            self._loop = loop = asyncio.get_running_loop()
            self._stopped = loop.create_future()
            name = f"plexus-history {self.file}"
            args = (loop, self)
            self._thread = threading.Thread(target=self._writer.run, args=args, name=name)
            self._thread.daemon = True  # a store left open must not hang interpreter exit
            self._thread.start()
        queued = self._queued
        queued.append(job)
        if len(queued) == 1:
            loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Give the writer the jobs queued so far, in one piece.

        Called once per loop iteration with jobs, after the callbacks and the
        input that queued them: the writer is woken (and the GIL fought for)
        once per iteration rather than once per job, and it finds the
        iteration's publishes together, for one commit.
        """
        if not self._queued:
            return
        jobs, self._queued = self._queued, []
        self._handed += len(jobs)
        # Run here when nothing handed over earlier is outstanding (so these
        # cannot overtake it) and the writer agrees (see `Writer.run_inline`).
        if self._handed - len(jobs) == self._answered:
            try:
                results = self._writer.run_inline(jobs)
            except Exception as exc:
                self._fail(jobs, exc)
                return
            if results is not None:
                self._deliver(jobs, results)
                return
        self._writer.jobs.put(jobs)

    def _deliver(self, jobs: list[Job], results: list[Any]) -> None:
        # The cache is updated and the messages delivered before any caller
        # resumes, in queue order: a channel's messages reach the node in
        # offset order, and a caller already sees its own publish in `position`.
        self._answered += len(jobs)
        if self._failure is not None and any(isinstance(job, Append) for job in jobs):
            self._failure = None  # writes work again (a batch of reads proves nothing)
        sink = self._sink
        subscribed = self._subscribed
        positions = self._positions
        for job, result in zip(jobs, results, strict=True):
            if isinstance(job, Append):  # the common case, first
                if type(result) is Publication:
                    channel = result.channel
                    positions[channel] = (result.offset, result.epoch)
                    if sink is not None and channel in subscribed:
                        sink.on_publication(result)
                    job.then(result)
                else:
                    job.then(result.error if isinstance(result, Refused) else result)
                continue
            future = job.future
            if isinstance(result, Refused):
                if future is not None and not future.done():
                    future.set_exception(result.error)
                continue
            if isinstance(job, Position):
                if result.epoch:
                    positions[job.channel] = (result.offset, result.epoch)
            elif isinstance(job, Read):
                if result[0].epoch:
                    positions[job.channel] = (result[0].offset, result[0].epoch)
            elif isinstance(job, Sweep):
                for channel in result:
                    positions.pop(channel, None)
            if future is not None and not future.done():  # done = the caller was cancelled
                future.set_result(result)

    def _fail(self, jobs: list[Job], cause: BaseException) -> None:
        self._answered += len(jobs)
        if any(isinstance(job, Append) for job in jobs) or self._failure is None:
            self._failure = f"{type(cause).__name__}: {cause}"[:300]
        for job in jobs:
            error = Unavailable("history store unavailable")
            error.__cause__ = cause
            if isinstance(job, Append):
                job.then(error)
                continue
            future = job.future
            if future is not None and not future.done():
                future.set_exception(error)

    def _stopped_now(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        # Handed over after the thread's last batch (it ended unexpectedly): refused.
        refused = Unavailable("history writer stopped")
        with contextlib.suppress(queue.Empty):
            while True:
                jobs = self._writer.jobs.get_nowait()
                self._refuse(jobs or [], refused)
        queued, self._queued = self._queued, []
        self._refuse(queued, refused)

    @staticmethod
    def _refuse(jobs: list[Job], error: Unavailable) -> None:
        for job in jobs:
            if isinstance(job, Append):
                job.then(error)
            elif job.future is not None and not job.future.done():
                job.future.set_exception(error)
