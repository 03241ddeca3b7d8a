"""Per-connection rate limits, driven by a clock the caller passes in (no I/O)."""

from __future__ import annotations

from collections import deque


class TokenBucket:
    """Allows `rate` events per second on average, with bursts of up to `burst`.

    A `rate` of 0 disables the limit.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def allow(self, now: float) -> bool:
        """Take one token if there is one; return whether the event may proceed."""
        if self.rate <= 0:
            return True
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class EventWindow:
    """Counts events in a sliding window; says when more than `limit` happened.

    Memory is bounded by `limit`: older timestamps are dropped as they expire
    and at most `limit` are kept.
    """

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        # Created on the first event: most connections never misbehave, and
        # an empty deque still costs ~600 bytes per idle connection.
        self._times: deque[float] | None = None

    def hit(self, now: float) -> bool:
        """Record one event; return True when this makes `limit` events within the window."""
        times = self._times
        if times is None:
            times = self._times = deque(maxlen=self.limit)
        times.append(now)
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times) >= self.limit
