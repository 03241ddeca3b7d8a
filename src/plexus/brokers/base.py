"""The `Broker` interface: fan-out of channel events between nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from plexus.models import Presence, Publication

Event = Publication | Presence
EventHandler = Callable[[Event], None]


class Broker(Protocol):
    """Delivers channel events to every node subscribed to the channel.

    Contract:

    * Delivery: an event published to a channel reaches the handler of every
      node that had subscribed the channel (including the publishing node)
      before `publish` was called, as long as the broker is up.
    * Ordering: events published through one broker instance to one channel
      reach each handler in publish order. Publications of one channel carry
      consecutive offsets; a node may see a gap only after a broker outage.
    * The handler is a plain function called on the event loop; it must not
      block. The broker never awaits a subscriber.
    * Failure: `publish`/`subscribe` raise `plexus.exceptions.Unavailable`.
    """

    inline: bool
    """True if `publish` delivers before it returns, without I/O; then
    `publish_nowait` may be called instead."""

    def set_handler(self, handler: EventHandler) -> None:
        """Set the function that receives every event for subscribed channels."""
        ...

    async def start(self) -> None:
        """Connect; after this returns the broker can subscribe and publish."""
        ...

    async def publish(self, event: Event) -> None:
        """Send `event` to every node subscribed to `event.channel`."""
        ...

    def publish_nowait(self, event: Event) -> None:
        """`publish` for an `inline` broker; any other broker raises `NotImplementedError`."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Start receiving events of `channel` (called for its first local subscriber)."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving events of `channel` (called after its last local subscriber left)."""
        ...

    async def close(self) -> None:
        """Disconnect and release resources."""
        ...
