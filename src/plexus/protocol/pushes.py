"""Server-to-client pushes, encoded once per encoding and shared by every subscriber."""

from __future__ import annotations

from typing import Any

import orjson

from plexus.models import Presence, Publication
from plexus.protocol.codec import CODECS, build_frame


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


def publication_json(pub: Publication) -> bytes:
    """The `message` push as JSON, with the payload's stored encoding spliced in.

    The same object as `publication_message` encodes to (keys in another
    order), without decoding and encoding the payload again: a message that
    reached this node from SQLite or Redis as JSON goes out as it came.
    """
    head: dict[str, Any] = {
        "type": "message",
        "channel": pub.channel,
        "offset": pub.offset,
        "epoch": pub.epoch,
        "time": pub.time,
    }
    if pub.client is not None:
        head["from"] = {"client": pub.client, "user": pub.user}
    return b'{"data":' + pub.raw + b"," + orjson.dumps(head)[1:]


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

    __slots__ = ("event", "frames")

    def __init__(self, event: Publication | Presence) -> None:
        self.event = event
        # frames[i] is the frame for CODECS[i], None until first asked for.
        self.frames: list[bytes | None] = [None] * len(CODECS)

    def frame(self, index: int) -> bytes:
        """The ready-to-write frame for the codec `CODECS[index]`."""
        frame = self.frames[index]
        if frame is None:
            event = self.event
            codec = CODECS[index]
            if isinstance(event, Publication):
                if codec.binary:
                    frame = codec.frame(publication_message(event))
                else:
                    frame = build_frame(publication_json(event), codec.opcode)
            else:
                frame = codec.frame(presence_message(event))
            self.frames[index] = frame
        return frame
