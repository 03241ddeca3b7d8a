"""Server-to-client pushes, encoded once per encoding and shared by every subscriber."""

from __future__ import annotations

from typing import Any

from plexus.models import Presence, Publication
from plexus.protocol.codec import CODECS, Codec


def publication_message(pub: Publication) -> dict[str, Any]:
    """The `message` push (also the shape of each `history` entry)."""
    out: dict[str, Any] = {
        "type": "message",
        "channel": pub.channel,
        "data": pub.data,
        "offset": pub.offset,
        "epoch": pub.epoch,
        "time": pub.time,
    }
    if pub.client is not None:
        out["from"] = {"client": pub.client, "user": pub.user}
    return out


def presence_message(event: Presence) -> dict[str, Any]:
    """The `join` or `leave` push."""
    out: dict[str, Any] = {
        "type": event.kind,
        "channel": event.channel,
        "client": event.client.client,
        "user": event.client.user,
    }
    if event.kind == "join":
        out["info"] = event.client.info
    return out


class EncodedPush:
    """One event's frames, built lazily, at most once per encoding.

    Fan-out asks every subscriber's codec for its frame; the first JSON
    subscriber pays for the JSON encoding and every later one reuses it.
    """

    __slots__ = ("_frames", "event", "message")

    def __init__(self, event: Publication | Presence) -> None:
        self.event = event
        self.message = (
            publication_message(event)
            if isinstance(event, Publication)
            else presence_message(event)
        )
        self._frames: list[bytes | None] = [None] * len(CODECS)

    def frame(self, codec: Codec, index: int) -> bytes:
        """The ready-to-write frame for `codec` (whose position in CODECS is `index`)."""
        frame = self._frames[index]
        if frame is None:
            frame = codec.frame(self.message)
            self._frames[index] = frame
        return frame
