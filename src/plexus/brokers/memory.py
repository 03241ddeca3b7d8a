"""In-process broker: one node, no network."""

from __future__ import annotations

from plexus.brokers.base import Event, EventHandler


class MemoryBroker:
    """Delivers events to this process's handler synchronously, in publish order."""

    __slots__ = ("_channels", "_handler")

    inline = True

    def __init__(self) -> None:
        self._handler: EventHandler | None = None
        self._channels: set[str] = set()

    def set_handler(self, handler: EventHandler) -> None:
        self._handler = handler

    async def start(self) -> None:
        return None

    async def publish(self, event: Event) -> None:
        self.publish_nowait(event)

    def publish_nowait(self, event: Event) -> None:
        # Synchronous delivery keeps the order of `publish` calls and means no
        # event waits in a queue that could grow without bound.
        if self._handler is not None and event.channel in self._channels:
            self._handler(event)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def close(self) -> None:
        self._channels.clear()
