"""Bounded per-connection output buffer with coalesced writes.

Fan-out never awaits a client: it appends a pre-built frame to the client's
outbox and moves on. Frames queued for one socket within one event-loop
iteration leave in a single `transport.write`, which costs the kernel far less
than one write per frame (see shared/NOTES.md). A message alone in its
iteration has nothing to share a write with: `Outbox.send` writes it at once
(straight to the socket while the transport holds nothing). A client whose
unsent output (our queue plus the transport's buffer) would exceed the limit
is a slow consumer: its outbox refuses the frame and reports the overflow once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Final, Protocol

# Pongs queued in a row (within one flush) before each new one replaces the last.
PONG_RUN: Final = 16
# An outbox's socket not looked up yet (see `Outbox.send`).
UNKNOWN: Final = -2


class Transport(Protocol):
    """The part of `asyncio.WriteTransport` an outbox uses."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def is_closing(self) -> bool: ...


def socket_fd(transport: Transport) -> int:
    """The plain socket under `transport`, or -1 (TLS, or none to be found)."""
    get = getattr(transport, "get_extra_info", None)
    if get is None or get("sslcontext") is not None:
        return -1
    sock = get("socket")
    return int(sock.fileno()) if sock is not None else -1


class Flusher:
    """Flushes every outbox that got frames during this loop iteration, in one callback."""

    __slots__ = ("_dirty", "_loop", "_scheduled", "bytes_written", "tick")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self.bytes_written = 0
        # Loop iterations that flushed (or were armed): the hub tells a
        # message alone in its iteration from a burst by it (`hub.Ticker`).
        self.tick = 0

    def arm(self) -> None:
        """Make sure `tick` moves on at the end of this loop iteration."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def mark(self, outbox: Outbox) -> None:
        """Remember `outbox` for the flush at the end of this iteration."""
        self._dirty.append(outbox)
        if not self._scheduled:
            self.arm()

    def flush(self) -> None:
        """Write out every marked outbox now."""
        self._scheduled = False
        self.tick += 1
        dirty, self._dirty = self._dirty, []
        written = 0
        # `Outbox.flush` inlined: in a steady fan-out this loop runs once per
        # delivery, between system calls that leave the CPU caches cold, so
        # every call and every object touched shows in the server's CPU time.
        for outbox in dirty:
            data = outbox._first
            if data is None:
                continue
            more = outbox._more
            if more is not None:
                data = b"".join(more)
                outbox._more = None
            outbox._first = None
            outbox._queued = 0
            transport = outbox._transport
            if not transport.is_closing():
                transport.write(data)
                size = len(data)
                outbox._unsent += size
                written += size
        self.bytes_written += written


class Outbox:
    """Frames waiting for one connection's socket, bounded in bytes.

    Attributes:
        limit: most bytes (queued plus transport-buffered) allowed before overflow.
        peak: the largest buffered size seen, as an upper bound (for tests).
        overflowed: True once a frame was refused; the outbox then accepts nothing.
    """

    __slots__ = (
        "_direct",
        "_fd",
        "_first",
        "_flusher",
        "_more",
        "_on_overflow",
        "_pong",
        "_pongs",
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
        *,
        direct: bool = False,
        fd: int | None = None,
    ) -> None:
        self._transport = transport
        # `send` may write to the transport at once: it is the socket's own,
        # not a wrapper. `_fd`: that socket, when it is a plain one (not TLS),
        # which `send` may write to itself while the transport holds nothing;
        # -1 for none, and UNKNOWN until the first `send` looks (asking at
        # once would make an idle connection keep uvloop's socket object).
        self._direct = direct
        self._fd = (UNKNOWN if direct else -1) if fd is None else fd
        self._flusher = flusher
        self._on_overflow = on_overflow
        # The queue: its first frame, and once there is a second, all of them
        # in a list. Most flushes write one frame, and then no list is touched.
        self._first: bytes | None = None
        self._more: list[bytes] | None = None
        self._queued = 0
        # The last pong queued by `push_pong` (compared by identity), and how
        # many pongs in a row end the queue.
        self._pong: bytes | None = None
        self._pongs = 0
        # An upper bound of the transport's unsent bytes: what it held when
        # last asked plus what was written since. Only when the bound says the
        # limit is reached is the transport asked again, so a fast client costs
        # no call per write (the kernel usually takes a write whole). Asked at
        # once where `send` may write to the socket itself: a handshake's
        # response may still wait in the transport, and nothing may overtake it.
        self._unsent = transport.get_write_buffer_size() if direct else 0
        self.limit = limit
        self.peak = 0
        self.overflowed = False

    def push(self, frame: bytes) -> bool:
        """Queue `frame`; return False (and report overflow once) if it does not fit."""
        if self.overflowed:
            return False
        size = len(frame)
        buffered = self._queued + size + self._unsent
        if buffered > self.limit:
            # The bound may be stale (the kernel drained since): ask.
            self._unsent = self._transport.get_write_buffer_size()
            buffered = self._queued + size + self._unsent
            if buffered > self.limit:
                self.overflowed = True
                self._first = self._more = None
                self._queued = 0
                self._on_overflow()
                return False
        if buffered > self.peak:
            self.peak = buffered
        first = self._first
        if first is None:
            self._first = frame
            self._flusher.mark(self)
        elif self._more is None:
            self._more = [first, frame]
        else:
            self._more.append(frame)
        self._queued += size
        return True

    def send(self, frame: bytes) -> bool:
        """Write `frame` now if nothing is queued (and the outbox may), else `push` it.

        For a message alone in its loop iteration: the frame does not wait for
        the flush, and the outbox is touched once instead of twice. Counted
        against the limit like any frame. When the transport holds nothing
        either, the frame goes straight to the socket with one `os.write`
        (what the kernel does not take goes to the transport, after it): a
        transport's `write` costs a steady fan-out as much Python-side work
        as all of Plexus's own (measured in docs/performance.md).
        """
        if self._first is not None or not self._direct or self.overflowed:
            return self.push(frame)
        size = len(frame)
        unsent = self._unsent + size
        if unsent > self.limit:
            return self.push(frame)  # which asks the transport, and may overflow
        transport = self._transport
        if transport.is_closing():
            return True
        if self._unsent:
            self._unsent = transport.get_write_buffer_size()
            unsent = self._unsent + size
        fd = self._fd
        if fd == UNKNOWN:
            fd = self._fd = socket_fd(transport)
        if fd >= 0 and not self._unsent:
            try:
                sent = os.write(fd, frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return True  # the peer is gone: the transport hears of it itself
            self._flusher.bytes_written += sent
            if sent == size:
                return True
            frame = frame[sent:]
            unsent = len(frame)
        transport.write(frame)
        self._unsent = unsent
        self._flusher.bytes_written += len(frame)
        if unsent > self.peak:
            self.peak = unsent
        return True

    def push_pong(self, frame: bytes) -> bool:
        """Queue a pong frame, counted like any frame; past PONG_RUN in a row, replace the last.

        RFC 6455 5.5.3 lets an endpoint answer only the latest of the pings it
        has not answered yet: a client that floods pings then costs at most
        PONG_RUN pongs per read of its socket, not one per ping. A few pings
        sent at once are all answered, as most peers (and Autobahn's 2.10)
        expect.
        """
        pong = self._pong
        run = 0
        if pong is not None:
            more = self._more
            if (more[-1] if more is not None else self._first) is pong:
                run = self._pongs
                if run >= PONG_RUN:
                    if more is not None:
                        more[-1] = frame
                    else:
                        self._first = frame
                    self._queued += len(frame) - len(pong)
                    self._pong = frame
                    return True
        if not self.push(frame):
            return False
        self._pong = frame
        self._pongs = run + 1
        return True

    def flush(self) -> int:
        """Write every queued frame in one write; return the bytes written."""
        data = self._first
        if data is None:
            return 0
        if self._more is not None:
            data = b"".join(self._more)
            self._more = None
        self._first = None
        self._queued = 0
        transport = self._transport
        if transport.is_closing():
            return 0
        transport.write(data)
        self._unsent += len(data)
        return len(data)

    def write_now(self, frame: bytes) -> None:
        """Flush the queue, then write `frame` at once, uncounted (close frames)."""
        self.flush()
        if not self._transport.is_closing():
            self._transport.write(frame)

    @property
    def buffered(self) -> int:
        """Bytes queued here plus bytes the transport has not sent yet."""
        self._unsent = self._transport.get_write_buffer_size()
        return self._queued + self._unsent
