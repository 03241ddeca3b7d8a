"""In-process history: a bounded ring of recent publications per channel.

Nothing survives the process. Each channel gets a fresh random epoch the first
time this process sees it, so a client recovering across a restart is told
(by the epoch mismatch) that its position is gone instead of being handed a
history that silently restarted at offset 1.
"""

from __future__ import annotations

import itertools
import secrets
import time as _time
from collections import deque
from typing import Any

from plexus.models import HistoryPage, Publication, StreamPosition

_NEVER = float("inf")


def expiry(time: int, ttl: float) -> int | None:
    """Return when a message published at `time` (ms) expires, None when `ttl` is 0."""
    return time + round(ttl * 1000) if ttl > 0 else None


def now_ms() -> int:
    """Return the wall clock in Unix milliseconds."""
    return _time.time_ns() // 1_000_000


def new_epoch() -> str:
    """Return a fresh random epoch: short, URL-safe, unguessable across restarts."""
    return secrets.token_urlsafe(6)


def page_is_complete(offsets: list[int], since: int, top: int, following: int | None) -> bool:
    """Tell whether a page of `offsets` after `since` misses no message.

    Shared by the history stores so that `HistoryPage.complete` means the same
    everywhere. The page is complete when it starts at `since + 1`, has no gap,
    and either reaches `top` or was cut by the caller's `limit` right before
    `following`. A `since` beyond `top` is never complete: that position was
    not issued in this epoch, so the caller cannot be in sync with it.

    Args:
        offsets: the returned offsets, ascending.
        since: the offset the caller already has (0 for "from the start").
        top: the channel's last offset.
        following: the offset of the first kept message left out by `limit`,
            None when the page holds every kept message after `since`.
    """
    expected = since + 1
    for offset in offsets:
        if offset != expected:
            return False
        expected += 1
    if following is not None:
        return following == expected
    return expected - 1 == top


class _Stream:
    """One channel: its epoch, last offset and kept messages (oldest first)."""

    __slots__ = ("epoch", "messages", "top")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.top = 0
        # (expires_ms, publication); offsets are consecutive because messages
        # are only appended on the right and dropped from the left.
        self.messages: deque[tuple[float, Publication]] = deque()

    def drop_expired_head(self, now: int) -> None:
        # Expiry is checked at the head only, so dropping is O(dropped). A
        # message behind a longer-lived one (the namespace TTL was lowered) is
        # filtered out by `read` and dropped once it reaches the head.
        messages = self.messages
        while messages and messages[0][0] <= now:
            messages.popleft()


class MemoryHistoryStore:
    """History kept in this process's memory, lost on restart.

    Implements `plexus.history.base.HistoryStore`. `append` never suspends, so
    appends complete in call order without any lock. Channels are never
    forgotten while the process runs: their epoch and offset counter must stay
    stable even after every message expired.
    """

    __slots__ = ("_streams",)

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    async def start(self) -> None:
        """Nothing to open; present so that every store starts the same way."""
        return None

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream()
        return stream

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
        """Assign the next offset to `data` and keep it within `size` and `ttl`.

        See `HistoryStore.append`. The message is kept by reference: the caller
        must not mutate `data` afterwards.
        """
        return self.append_nowait(
            channel, data, time=time, client=client, user=user, size=size, ttl=ttl
        )

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
    ) -> Publication:
        """`append`, which never suspends here."""
        stream = self._stream(channel)
        stream.top += 1
        publication = Publication(
            channel=channel,
            data=data,
            offset=stream.top,
            epoch=stream.epoch,
            time=time,
            client=client,
            user=user,
        )
        messages = stream.messages
        if size > 0:
            expires = expiry(time, ttl)
            messages.append((_NEVER if expires is None else expires, publication))
        # The publication time is the caller's clock, so it is also "now" for
        # dropping expired messages; a later size limit may be smaller.
        stream.drop_expired_head(time)
        while len(messages) > size:
            messages.popleft()
        return publication

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's last offset and epoch (creating the epoch if new)."""
        stream = self._stream(channel)
        return StreamPosition(stream.top, stream.epoch)

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
        """
        stream = self._stream(channel)
        if now is None:
            now = now_ms()
        stream.drop_expired_head(now)
        after = max(since or 0, 0)
        messages = stream.messages
        start = after + 1 - messages[0][1].offset if messages else 0
        wanted = max(limit, 0) if limit is not None else len(messages)
        publications: list[Publication] = []
        following: int | None = None
        for expires, publication in itertools.islice(messages, max(start, 0), None):
            if expires <= now:
                continue
            if len(publications) >= wanted:
                following = publication.offset
                break
            publications.append(publication)
        offsets = [p.offset for p in publications]
        complete = page_is_complete(offsets, after, stream.top, following)
        return HistoryPage(publications, StreamPosition(stream.top, stream.epoch), complete)

    async def close(self) -> None:
        """Forget every channel (a closed memory store is as good as a restarted one)."""
        self._streams.clear()
