"""Plain data that flows between the node, the hub and the engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from plexus.protocol.codec import JSON, encode_data


class _Unset:
    """The type of `UNSET`: a publication whose payload exists only in encoded form."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


@dataclass(slots=True, frozen=True)
class StreamPosition:
    """Where a channel's stream stands: the last offset and the epoch it belongs to.

    `offset` is 0 for a channel that never had a message. `epoch` changes only
    when the channel's history and offset counter are lost; it is `""` for a
    channel that has no stream at all (nothing was ever published or
    subscribed there, or its state expired).
    """

    offset: int
    epoch: str


class Publication:
    """One message in a channel's stream.

    The payload is kept in whichever form it arrived in and converted at most
    once, on demand: `data` is the value (bytes anywhere inside it stand for
    binary data), `raw` its compact JSON encoding (bytes as `{"$bytes":
    base64}`). A client's publish arrives as both (validation encodes it
    once); one read from SQLite or Redis arrives as `raw` only, and a node
    whose subscribers all speak JSON never decodes it.

    Attributes:
        channel: the channel name.
        offset: position in the channel, growing by exactly 1 per message (0
            until the engine assigned it).
        epoch: the stream epoch the offset belongs to.
        time: publication time, milliseconds since the Unix epoch.
        client: the publishing connection's id, None for the HTTP API.
        user: the publishing user, None when anonymous or from the HTTP API.
    """

    __slots__ = ("_data", "_raw", "channel", "client", "epoch", "offset", "time", "user")

    def __init__(
        self,
        channel: str,
        data: Any,
        offset: int,
        epoch: str,
        time: int,
        client: str | None = None,
        user: str | None = None,
        *,
        raw: bytes | None = None,
    ) -> None:
        if data is UNSET and raw is None:
            raise ValueError("a publication needs its data or its raw encoding")
        self.channel = channel
        self._data = data
        self._raw = raw
        self.offset = offset
        self.epoch = epoch
        self.time = time
        self.client = client
        self.user = user

    @property
    def data(self) -> Any:
        """The payload as a value (decoded from `raw` on first use)."""
        data = self._data
        if data is UNSET:
            assert self._raw is not None
            data = self._data = JSON.decode(self._raw)
        return data

    @property
    def raw(self) -> bytes:
        """The payload as compact JSON (encoded from `data` on first use)."""
        raw = self._raw
        if raw is None:
            raw = self._raw = encode_data(self._data)
        return raw

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Publication):
            return NotImplemented
        return (
            self.channel == other.channel
            and self.offset == other.offset
            and self.epoch == other.epoch
            and self.time == other.time
            and self.client == other.client
            and self.user == other.user
            and self.data == other.data
        )

    __hash__ = None  # type: ignore[assignment]  # mutable until the engine assigns the offset

    def __repr__(self) -> str:
        return (
            f"Publication({self.channel!r}, offset={self.offset}, epoch={self.epoch!r},"
            f" time={self.time}, client={self.client!r}, user={self.user!r},"
            f" raw={self.raw[:60]!r})"
        )

    def header(self) -> bytes:
        """Time, client and user as one small JSON array (how engines store them)."""
        return orjson.dumps([self.time, self.client, self.user])


@dataclass(slots=True, frozen=True)
class Duplicate:
    """A publish whose idempotency key was already used: nothing was stored again.

    `offset` and `epoch` are the first publish's.
    """

    offset: int
    epoch: str


@dataclass(slots=True, frozen=True)
class ClientInfo:
    """What presence shows about one subscribed connection."""

    client: str
    user: str | None
    info: Any = None


@dataclass(slots=True, frozen=True)
class HistoryPage:
    """The answer of `HistoryStore.read`.

    Attributes:
        publications: messages with offset > `since`, oldest first, at most `limit`.
        position: the channel's current top position (last offset, epoch).
        complete: True when no message after `since` is missing from the page,
            i.e. the first returned offset is `since + 1` (or nothing was
            published after `since`) and no message was left out (by `limit`
            or `max_bytes`) before the top. Recovery needs this to answer
            honestly.
    """

    publications: list[Publication]
    position: StreamPosition
    complete: bool = True


@dataclass(slots=True, frozen=True)
class Presence:
    """A `join` or `leave` event of one client in one channel."""

    kind: str  # "join" or "leave"
    channel: str
    client: ClientInfo
