"""In-process presence: who is subscribed to each channel on this node only."""

from __future__ import annotations

from plexus.models import ClientInfo


class MemoryPresenceStore:
    """Presence kept in this process's memory; see `plexus.presence.base.PresenceStore`.

    Entries never expire: a node that dies takes its whole store with it, so
    there are no dead nodes' entries to clean up. No method suspends.
    """

    __slots__ = ("_channels",)

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, ClientInfo]] = {}

    async def start(self) -> None:
        """Nothing to open; present so that every store starts the same way."""
        return None

    async def add(self, channel: str, info: ClientInfo) -> None:
        """Record `info.client` as present in `channel`, replacing its previous info."""
        self._channels.setdefault(channel, {})[info.client] = info

    async def remove(self, channel: str, client: str) -> None:
        """Forget `client` in `channel`; a no-op when it is not there."""
        clients = self._channels.get(channel)
        if clients is None:
            return
        clients.pop(client, None)
        if not clients:
            # An empty channel must not keep its entry: channel names are
            # chosen by clients, so the map would otherwise grow without bound.
            del self._channels[channel]

    async def get(self, channel: str) -> dict[str, ClientInfo]:
        """Return a snapshot of the present clients of `channel`, keyed by client id."""
        return dict(self._channels.get(channel, {}))

    async def close(self) -> None:
        """Forget everyone."""
        self._channels.clear()
