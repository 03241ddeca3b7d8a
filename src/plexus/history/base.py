"""The `HistoryStore` interface that every history backend implements."""

from __future__ import annotations

from typing import Any, Protocol

from plexus.models import HistoryPage, Publication, StreamPosition


class HistoryStore(Protocol):
    """Per-channel offset counter, epoch and bounded message history.

    Contract (checked by `tests/backends/test_history_conformance.py` for every
    implementation):

    * Offsets: `append` gives each message of a channel the offset
      `previous + 1`, starting at 1. Offsets never repeat within an epoch.
    * Ordering: for one channel, calls to `append` complete (their awaits
      return) in the order they were made, so a caller that fans out right
      after `append` returns fans out in offset order.
    * Durability: when `append` returns, the message is stored as durably as
      the implementation promises (memory: for the life of the process;
      SQLite: survives a kill of the process).
    * Epoch: stable for a channel as long as its offset counter survives; a
      new epoch whenever it is lost (a memory store restarted, metadata
      expired). The epoch and top offset outlive the messages themselves.
    * Retention: at most `size` newest messages are kept per channel, none older
      than `ttl` seconds (0 = no age limit). `size == 0` keeps no messages but
      still counts offsets.
    * Failure: a backend that cannot serve raises `plexus.exceptions.Unavailable`.
    """

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
        """Assign the next offset to `data`, store it, and return the publication.

        Args:
            channel: channel name.
            data: payload (JSON value, may contain `bytes`).
            time: publication time in Unix milliseconds.
            client: publishing connection id, None for the HTTP API.
            user: publishing user id, if any.
            size: how many newest messages to keep for this channel (0 = none).
            ttl: seconds to keep each message (0 = no limit).
        """
        ...

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
    ) -> Publication | None:
        """`append` without suspending, for a store that needs no I/O; else None, nothing stored.

        A store returns None always or never, so appends of both kinds never
        interleave and keep the ordering contract.
        """
        ...

    async def position(self, channel: str) -> StreamPosition:
        """Return the channel's current top offset and epoch (creating the epoch if new)."""
        ...

    async def read(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        now: int | None = None,
    ) -> HistoryPage:
        """Return stored messages with offset > `since`, oldest first.

        Args:
            channel: channel name.
            since: return only messages after this offset; None = the oldest kept.
            limit: at most this many (the oldest ones after `since`); None = all.
            now: current Unix milliseconds for TTL filtering (default: wall clock).

        Returns:
            The page; `complete` is False when messages after `since` were
            already dropped (by size or TTL), so a client cannot recover from it.
        """
        ...

    async def close(self) -> None:
        """Flush pending writes and release resources."""
        ...
