"""Recovery after reconnect: decide what a resubscribing client gets (pure functions)."""

from __future__ import annotations

from collections.abc import Iterable

from plexus.models import HistoryPage, Presence, Publication
from plexus.protocol.commands import Since


def can_recover(since: Since, page: HistoryPage) -> bool:
    """True when every message after `since` is in `page`: same epoch, nothing dropped."""
    position = page.position
    return since.epoch == position.epoch and since.offset <= position.offset and page.complete


def merge_backlog(
    last_offset: int,
    epoch: str,
    backlog: Iterable[Publication | Presence],
    own_client: str,
) -> list[Publication | Presence]:
    """Live events held during subscribe that the client still needs, in order.

    Publications at or below `last_offset` were already covered by the reply
    (or by the recovered history) and are dropped, so the client sees no
    duplicate; a publication of another epoch cannot follow this stream and
    is dropped too. The client's own join/leave is never sent to itself.
    """
    out: list[Publication | Presence] = []
    last = last_offset
    for event in backlog:
        if isinstance(event, Publication):
            if event.epoch != epoch or event.offset <= last:
                continue
            last = event.offset
            out.append(event)
        elif event.client.client != own_client:
            out.append(event)
    return out
