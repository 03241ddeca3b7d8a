"""Plain data that flows between the node, the stores and the brokers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class StreamPosition:
    """Where a channel's stream stands: the last offset and the epoch it belongs to.

    `offset` is 0 for a channel that never had a message. `epoch` changes only
    when the channel's history and offset counter are lost.
    """

    offset: int
    epoch: str


@dataclass(slots=True)  # not frozen: built per message (see protocol/commands.py)
class Publication:
    """One message in a channel's stream.

    Attributes:
        channel: the channel name.
        data: the payload: any JSON value; `bytes` anywhere inside it stand for
            binary data (MessagePack bin, or `{"$bytes": base64}` in JSON).
        offset: position in the channel, growing by exactly 1 per message.
        epoch: the stream epoch the offset belongs to.
        time: publication time, milliseconds since the Unix epoch.
        client: the publishing connection's id, None for the HTTP API.
        user: the publishing user, None when anonymous or from the HTTP API.
    """

    channel: str
    data: Any
    offset: int
    epoch: str
    time: int
    client: str | None = None
    user: str | None = None


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
        complete: True when no message after `since` is missing from history,
            i.e. the first returned offset is `since + 1` (or nothing was
            published after `since`). Recovery needs this to answer honestly.
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
