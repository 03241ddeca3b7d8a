"""The local registry: which connections of this process subscribe to which channel.

Fan-out happens here: one event is built at most once per wire format (JSON or
MessagePack, compressed or not: `protocol/wire.py`) and the same frame is
pushed to every subscriber's outbox, without awaiting anyone.

The hub also keeps, per channel, the last position this node delivered, and
checks every publication against it: `offset == last + 1` is delivered, an
older offset is a duplicate and is dropped, and a jump or a new epoch is a
gap. A gapped channel holds what arrives until the node repaired it from
history (`resume`) or told its subscribers to resubscribe (`rebase`). Nothing
here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from plexus.models import Presence, Publication, StreamPosition
from plexus.protocol.pushes import EncodedPush
from plexus.protocol.wire import FORMATS

Event = Publication | Presence

# Events a gapped channel holds while it is repaired; beyond this they are
# dropped (and repaired from history in turn), so holding stays bounded.
MAX_HELD: Final = 10_000
# Fewest subscribers for which a lone message is written at once rather than
# queued (see `Hub._fan_out`): with few, the flush pass costs next to nothing,
# and the publisher's own copy would leave in a write apart from its reply.
DIRECT_MIN: Final = 32


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    @property
    def client_id(self) -> str: ...

    @property
    def user(self) -> str | None: ...

    @property
    def format_index(self) -> int:
        """The position of the connection's wire format in `protocol.wire.FORMATS`."""
        ...

    @property
    def push_frame(self) -> Callable[[bytes], object]:
        """Queue one pre-built frame for this connection (never blocks)."""
        ...

    @property
    def outbox(self) -> FrameSink:
        """Where its frames go (the connection's `Outbox`)."""
        ...


class FrameSink(Protocol):
    """A connection's output as the fan-out sees it."""

    def send(self, frame: bytes) -> object:
        """Like `push_frame`, but written at once when nothing is queued before it
        (where the transport allows it; otherwise the same as `push_frame`)."""
        ...


class Ticker(Protocol):
    """Counts event-loop iterations for the hub (the outboxes' `Flusher`)."""

    tick: int

    def arm(self) -> None:
        """Make sure `tick` moves on at the end of this loop iteration."""
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

    __slots__ = ("backlog", "channel", "conn", "floor", "format_index", "info", "out", "push")

    def __init__(self, conn: Subscriber, channel: str, info: object = None) -> None:
        self.conn = conn
        # Copied from the connection so fan-out touches one object per subscriber.
        self.push = conn.push_frame
        # The sink itself rather than its bound `send`: one object fewer to
        # reach per delivery, when every one is far from the CPU's caches.
        self.out = conn.outbox
        self.format_index = conn.format_index
        FORMATS[conn.format_index].use()  # pushes now make room for its frames
        self.channel = channel
        self.info = info
        self.floor = 0
        self.backlog: list[Event] | None = []


class Channel:
    """A channel this node subscribes to: its subscriptions and where its stream stands.

    `epoch`/`last` is the last publication delivered here (None until the
    node read the channel's position). While `held` is not None the channel
    is not in sync (position unknown, or a gap being repaired): events wait
    there, in arrival order.
    """

    __slots__ = (
        "burst",
        "epoch",
        "held",
        "last",
        "messages",
        "name",
        "overflowed",
        "snapshot",
        "subs",
        "tick",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        # Publications fanned out here since the channel was tracked: one
        # increment per message (never per delivery), for the admin page's rates.
        self.messages = 0
        self.subs: dict[str, Subscription] = {}
        # Fan-out iterates a tuple that membership changes replace, so a
        # subscriber removed during fan-out (a slow consumer) cannot break it.
        self.snapshot: tuple[Subscription, ...] | None = None
        self.epoch: str | None = None
        self.last = 0
        self.held: list[Event] | None = []
        self.overflowed = False  # more than MAX_HELD arrived while held
        # The loop iteration of its last fan-out, and whether that iteration
        # had more than one message (see `Hub._fan_out`).
        self.tick = -1
        self.burst = False


class Hub:
    """channel -> subscriptions of local connections, and each channel's stream position.

    Args:
        on_gap: called (once per gap) with a channel that fell out of sync;
            the node repairs it and then calls `resume` or `rebase`.

    Attributes:
        ticker: counts loop iterations; without one, every frame is queued
            (see `_fan_out`).
    """

    __slots__ = ("_channels", "on_gap", "ticker")

    def __init__(self, on_gap: Callable[[Channel], None] | None = None) -> None:
        self._channels: dict[str, Channel] = {}
        self.on_gap = on_gap
        self.ticker: Ticker | None = None

    # ----- membership

    def add(self, sub: Subscription) -> bool:
        """Register `sub`; return True if it is the channel's first local subscriber."""
        channel = self._channels.get(sub.channel)
        first = channel is None
        if channel is None:
            channel = self._channels[sub.channel] = Channel(sub.channel)
        first = first or not channel.subs
        channel.subs[sub.conn.client_id] = sub
        channel.snapshot = None
        return first

    def remove(self, sub: Subscription) -> bool:
        """Unregister `sub`; return True if the channel has no local subscriber left.

        The channel itself stays (and keeps tracking its stream) until `drop`.
        """
        channel = self._channels.get(sub.channel)
        if channel is None or channel.subs.get(sub.conn.client_id) is not sub:
            return False
        del channel.subs[sub.conn.client_id]
        channel.snapshot = None
        return not channel.subs

    def drop(self, name: str) -> bool:
        """Forget channel `name` if nobody subscribes to it; return whether it was forgotten."""
        channel = self._channels.get(name)
        if channel is None or channel.subs:
            return False
        del self._channels[name]
        return True

    def channel(self, name: str) -> Channel | None:
        """The channel `name`, if this node tracks it."""
        return self._channels.get(name)

    def has_channel(self, channel: str) -> bool:
        """True while any local connection subscribes to `channel`."""
        found = self._channels.get(channel)
        return found is not None and bool(found.subs)

    def channels(self) -> list[str]:
        """Channels with at least one local subscriber."""
        return [name for name, channel in self._channels.items() if channel.subs]

    def tracked(self) -> list[Channel]:
        """Every channel this node tracks (subscribed, or lingering after its last subscriber)."""
        return list(self._channels.values())

    def subscriber_count(self, channel: str | None = None) -> int:
        """Subscriptions in `channel`, or in all channels."""
        if channel is not None:
            found = self._channels.get(channel)
            return len(found.subs) if found is not None else 0
        return sum(len(found.subs) for found in self._channels.values())

    def subscriptions(self, channel: str) -> list[Subscription]:
        """The subscriptions of `channel`."""
        found = self._channels.get(channel)
        return list(found.subs.values()) if found is not None else []

    # ----- stream position

    def sync(self, name: str, position: StreamPosition) -> None:
        """The node read the channel's position: deliver what waited, from there on.

        A no-op when the channel is already in sync (another subscribe synced it).
        """
        channel = self._channels.get(name)
        if channel is None or channel.epoch is not None:
            return
        channel.epoch, channel.last = position.epoch, position.offset
        self._release(channel)

    def resume(self, channel: Channel, repaired: list[Publication]) -> None:
        """The node read what `channel` missed: deliver it, then what was held."""
        held = channel.held or []
        channel.held = None
        for pub in repaired:
            self._publication(channel, pub)
        if channel.held is None:
            channel.held = held
            self._release(channel)
        else:  # the repair itself showed a gap: what was held waits for the next one
            channel.held.extend(held)

    def rebase(self, channel: Channel, position: StreamPosition) -> list[Subscription]:
        """`channel` cannot be repaired: continue from `position`, return the subscriptions
        that must resubscribe (every one already live; those being set up keep
        their backlog, which their own reply will cover)."""
        stale = [sub for sub in channel.subs.values() if sub.backlog is None]
        channel.epoch, channel.last = position.epoch, position.offset
        self._release(channel)
        return stale

    def _release(self, channel: Channel) -> None:
        held = channel.held or []
        channel.held = None
        channel.overflowed = False
        for index, event in enumerate(held):
            if channel.held is not None:  # a new gap: the rest waits with it
                channel.held.extend(held[index:])
                return
            if isinstance(event, Publication):
                self._publication(channel, event)
            else:
                self._fan_out_presence(channel, event)

    # ----- fan-out

    def dispatch(self, event: Event) -> int:
        """Deliver `event` to every local subscriber of its channel; return how many got it."""
        channel = self._channels.get(event.channel)
        if channel is None:
            return 0
        if isinstance(event, Publication):
            return self._publication(channel, event)
        if channel.held is not None:
            self._hold(channel, event)
            return 0
        return self._fan_out_presence(channel, event)

    def _publication(self, channel: Channel, pub: Publication) -> int:
        if channel.held is not None:
            self._hold(channel, pub)
            return 0
        offset = pub.offset
        if pub.epoch == channel.epoch:
            if offset <= channel.last:
                return 0  # a duplicate: a repair already delivered it
            if offset == channel.last + 1:
                channel.last = offset
                return self._fan_out(channel, pub)
        channel.held = [pub]
        if self.on_gap is not None:
            self.on_gap(channel)
        return 0

    def _hold(self, channel: Channel, event: Event) -> None:
        held = channel.held
        assert held is not None
        if len(held) < MAX_HELD:
            held.append(event)
        else:
            # Dropped: the publications among them leave a hole after what
            # was held, which the gap check finds and repairs like any other.
            channel.overflowed = True

    def _fan_out(self, channel: Channel, pub: Publication) -> int:
        channel.messages += 1
        subs = channel.snapshot
        if subs is None:
            subs = channel.snapshot = tuple(channel.subs.values())
        if not subs:
            return 0
        encoded = EncodedPush(pub)
        frames = encoded.frames
        offset = pub.offset
        delivered = 0
        # A message alone in its loop iteration (the channel's previous busy
        # iteration had one too) to many subscribers is written to each
        # socket at once: the
        # outboxes' flush pass at the end of the iteration, over objects that
        # the system calls in between left cold, costs a steady fan-out more
        # than it saves. A burst is queued, to leave in one write per socket.
        ticker = self.ticker
        direct = False
        if ticker is not None and len(subs) >= DIRECT_MIN:
            tick = ticker.tick
            if channel.tick == tick:
                channel.burst = True
            else:
                direct = not channel.burst
                channel.tick, channel.burst = tick, False
                ticker.arm()
        for sub in subs:
            if sub.backlog is not None:
                sub.backlog.append(pub)
            elif offset > sub.floor:
                sub.floor = offset
                frame = frames[sub.format_index]
                if frame is None:
                    frame = encoded.frame(sub.format_index)
                if direct:
                    sub.out.send(frame)
                else:
                    # Loaded, then called: `sub.push(frame)` would be a method
                    # lookup Python 3.11 cannot specialise for a slot.
                    push = sub.push
                    push(frame)
                delivered += 1
        return delivered

    def _fan_out_presence(self, channel: Channel, event: Presence) -> int:
        subs = channel.snapshot
        if subs is None:
            subs = channel.snapshot = tuple(channel.subs.values())
        encoded = EncodedPush(event)
        skip = event.client.client
        delivered = 0
        for sub in subs:
            if sub.backlog is not None:
                sub.backlog.append(event)
            elif sub.conn.client_id != skip:
                sub.push(encoded.frame(sub.format_index))
                delivered += 1
        return delivered
