"""Bounded per-connection output buffer with coalesced writes.

Fan-out never awaits a client: it appends a pre-built frame to the client's
outbox and moves on. Frames queued for one socket within one event-loop
iteration leave in a single `transport.write`, which costs the kernel far less
than one write per frame (see shared/NOTES.md). A client whose unsent output
(our queue plus the transport's buffer) would exceed the limit is a slow
consumer: its outbox refuses the frame and reports the overflow once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Transport(Protocol):
    """The part of `asyncio.WriteTransport` an outbox uses."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def is_closing(self) -> bool: ...


class Flusher:
    """Flushes every outbox that got frames during this loop iteration, in one callback."""

    __slots__ = ("_dirty", "_loop", "_scheduled", "bytes_written")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self.bytes_written = 0

    def mark(self, outbox: Outbox) -> None:
        """Remember `outbox` for the flush at the end of this iteration."""
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write out every marked outbox now."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        written = 0
        for outbox in dirty:
            written += outbox.flush()
        self.bytes_written += written


class Outbox:
    """Frames waiting for one connection's socket, bounded in bytes.

    Attributes:
        limit: most bytes (queued plus transport-buffered) allowed before overflow.
        peak: the largest buffered size seen (for tests and metrics).
        overflowed: True once a frame was refused; the outbox then accepts nothing.
    """

    __slots__ = (
        "_flusher",
        "_frames",
        "_on_overflow",
        "_queued",
        "_transport",
        "_unsent",
        "limit",
        "overflowed",
        "peak",
    )

    def __init__(
        self,
        transport: Transport,
        limit: int,
        flusher: Flusher,
        on_overflow: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._flusher = flusher
        self._on_overflow = on_overflow
        self._frames: list[bytes] = []
        self._queued = 0
        # The transport's unsent bytes as of our last write. It can only
        # shrink until our next write (the kernel drains it), so using it as
        # is bounds the total without a transport call on every push.
        self._unsent = 0
        self.limit = limit
        self.peak = 0
        self.overflowed = False

    def push(self, frame: bytes) -> bool:
        """Queue `frame`; return False (and report overflow once) if it does not fit."""
        if self.overflowed:
            return False
        buffered = self._queued + len(frame) + self._unsent
        if buffered > self.limit:
            # The cached figure may be stale (the kernel drained since): ask.
            self._unsent = self._transport.get_write_buffer_size()
            buffered = self._queued + len(frame) + self._unsent
        if buffered > self.limit:
            self.overflowed = True
            self._frames.clear()
            self._queued = 0
            self._on_overflow()
            return False
        if buffered > self.peak:
            self.peak = buffered
        if not self._frames:
            self._flusher.mark(self)
        self._frames.append(frame)
        self._queued += len(frame)
        return True

    def flush(self) -> int:
        """Write every queued frame in one write; return the bytes written."""
        frames = self._frames
        if not frames:
            return 0
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        frames.clear()
        self._queued = 0
        transport = self._transport
        if transport.is_closing():
            return 0
        transport.write(data)
        self._unsent = transport.get_write_buffer_size()
        return len(data)

    def write_now(self, frame: bytes) -> None:
        """Flush the queue, then write `frame` at once (close frames, pongs)."""
        self.flush()
        if not self._transport.is_closing():
            self._transport.write(frame)

    @property
    def buffered(self) -> int:
        """Bytes queued here plus bytes the transport has not sent yet."""
        self._unsent = self._transport.get_write_buffer_size()
        return self._queued + self._unsent
