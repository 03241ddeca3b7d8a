"""What the event loop asks of the writer thread: one job per call, in call order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from plexus.engines.base import Retention
from plexus.models import Duplicate, Publication, StreamPosition

NO_STREAM: Final = StreamPosition(0, "")

Row: TypeAlias = tuple[int, int, str | None, str | None, bytes]


@dataclass(slots=True)
class Top:
    """A channel's committed (or in-batch) top, with the payload bytes it keeps."""

    offset: int
    epoch: str
    bytes: int | None = None  # of its chunks; None until a byte limit needs it
    size: int | None = None  # its retention, as last moved (None: not known)
    max_bytes: int | None = None
    trimmed: int = 0  # its chunks up to this offset were dropped (0: maybe none)


@dataclass(slots=True)
class Open:
    future: asyncio.Future[None]


@dataclass(slots=True)
class Position:
    channel: str
    create: Retention | None
    future: asyncio.Future[StreamPosition]


@dataclass(slots=True)
class Positions:
    channels: list[str]
    future: asyncio.Future[dict[str, StreamPosition]]


@dataclass(slots=True)
class Append:
    pub: Publication
    retention: Retention
    key: str | None
    idempotency_ttl: int
    then: Callable[[Publication | Duplicate | Exception], None]  # see `Broker.publish_then`


@dataclass(slots=True)
class Read:
    channel: str
    since: int
    limit: int  # -1 = no limit (SQLite's own convention)
    now: int
    max_bytes: int | None
    future: asyncio.Future[tuple[StreamPosition, list[Row], bool]]


@dataclass(slots=True)
class Pin:
    """A local client subscribes to `channel` (`on`), or its last one left: keep or release it."""

    channel: str
    on: bool
    future: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Sweep:
    now: int
    future: asyncio.Future[list[str]]


Job: TypeAlias = Open | Position | Positions | Append | Read | Pin | Sweep


class Refused:
    """One job's own failure inside a batch that otherwise commits."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error
