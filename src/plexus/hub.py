"""The local registry: which connections of this process subscribe to which channel.

Fan-out happens here: one event is encoded at most once per encoding and the
same frame is pushed to every subscriber's outbox, without awaiting anyone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from plexus.models import Presence, Publication
from plexus.protocol.pushes import EncodedPush


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    @property
    def client_id(self) -> str: ...

    @property
    def user(self) -> str | None: ...

    @property
    def codec_index(self) -> int: ...

    @property
    def push_frame(self) -> Callable[[bytes], object]:
        """Queue one pre-built frame for this connection (never blocks)."""
        ...


class Subscription:
    """One connection's subscription to one channel.

    While `backlog` is not None the subscription is being set up (the
    `subscribe` reply is not sent yet): live events are held there, to be
    merged with recovered history by offset once the reply is out.
    `floor` is the last offset the client has: a publication at or below it
    is never delivered (a store may report a committed offset before the
    fan-out of that message reached this node).
    """

    __slots__ = ("backlog", "channel", "codec_index", "conn", "floor", "info", "push")

    def __init__(self, conn: Subscriber, channel: str, info: object = None) -> None:
        self.conn = conn
        # Copied from the connection so fan-out touches one object per subscriber.
        self.push = conn.push_frame
        self.codec_index = conn.codec_index
        self.channel = channel
        self.info = info
        self.floor = 0
        self.backlog: list[Publication | Presence] | None = []


class Hub:
    """channel -> subscriptions of local connections."""

    __slots__ = ("_channels", "_snapshots")

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, Subscription]] = {}
        # Fan-out iterates a tuple that membership changes replace, so a
        # subscriber removed during fan-out (a slow consumer) cannot break it.
        self._snapshots: dict[str, tuple[Subscription, ...]] = {}

    def add(self, sub: Subscription) -> bool:
        """Register `sub`; return True if it is the channel's first local subscriber."""
        subs = self._channels.get(sub.channel)
        first = subs is None
        if subs is None:
            subs = self._channels[sub.channel] = {}
        subs[sub.conn.client_id] = sub
        self._snapshots.pop(sub.channel, None)
        return first

    def remove(self, sub: Subscription) -> bool:
        """Unregister `sub`; return True if the channel has no local subscriber left."""
        subs = self._channels.get(sub.channel)
        if subs is None or subs.get(sub.conn.client_id) is not sub:
            return False
        del subs[sub.conn.client_id]
        self._snapshots.pop(sub.channel, None)
        if subs:
            return False
        del self._channels[sub.channel]
        return True

    def has_channel(self, channel: str) -> bool:
        """True while any local connection subscribes to `channel`."""
        return channel in self._channels

    def channels(self) -> list[str]:
        """Channels with at least one local subscriber."""
        return list(self._channels)

    def subscriber_count(self, channel: str | None = None) -> int:
        """Subscriptions in `channel`, or in all channels."""
        if channel is not None:
            return len(self._channels.get(channel, ()))
        return sum(len(subs) for subs in self._channels.values())

    def dispatch(self, event: Publication | Presence) -> int:
        """Deliver `event` to every local subscriber of its channel; return how many got it."""
        subs = self._snapshots.get(event.channel)
        if subs is None:
            members = self._channels.get(event.channel)
            if not members:
                return 0
            subs = self._snapshots[event.channel] = tuple(members.values())
        encoded = EncodedPush(event)
        frames = encoded.frames
        delivered = 0
        if isinstance(event, Publication):
            offset = event.offset
            for sub in subs:
                if sub.backlog is not None:
                    sub.backlog.append(event)
                elif offset > sub.floor:
                    sub.floor = offset
                    frame = frames[sub.codec_index]
                    if frame is None:
                        frame = encoded.frame(sub.codec_index)
                    sub.push(frame)
                    delivered += 1
            return delivered
        skip = event.client.client
        for sub in subs:
            if sub.backlog is not None:
                sub.backlog.append(event)
            elif sub.conn.client_id != skip:
                sub.push(encoded.frame(sub.codec_index))
                delivered += 1
        return delivered
