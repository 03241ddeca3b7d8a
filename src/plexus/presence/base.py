"""The `PresenceStore` interface that every presence backend implements."""

from __future__ import annotations

from typing import Protocol

from plexus.models import ClientInfo


class PresenceStore(Protocol):
    """Who is subscribed to a channel, across every node sharing the store.

    Contract (checked by `tests/backends/test_presence_conformance.py`):

    * `add` is idempotent per (channel, client) and replaces the info.
    * `remove` of an absent entry is a no-op.
    * `get` returns exactly the entries added and not removed (nor expired,
      for stores that expire entries of dead nodes after `ttl`).
    * Failure: raises `plexus.exceptions.Unavailable`.
    """

    async def add(self, channel: str, info: ClientInfo) -> None:
        """Record `info.client` as present in `channel`."""
        ...

    async def remove(self, channel: str, client: str) -> None:
        """Forget `client` in `channel`."""
        ...

    async def get(self, channel: str) -> dict[str, ClientInfo]:
        """Return the present clients of `channel`, keyed by client id."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...
