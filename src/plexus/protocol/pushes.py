"""Server-to-client pushes, built once per wire format and shared by every subscriber."""

from __future__ import annotations

from typing import Any

import orjson

from plexus.models import Presence, Publication
from plexus.protocol.codec import CODECS
from plexus.protocol.wire import FORMATS, in_use


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
    """One event's frames, built lazily: encoded at most once per codec, framed once per format.

    Fan-out asks for the frame of every subscriber's wire format; the first
    subscriber of a format pays for it (and for the codec's encoding, if no
    other format of that codec asked before) and every later one gets the
    same bytes. A compressed format reuses the uncompressed format's encoding
    and compresses it once for all its subscribers.
    """

    __slots__ = ("event", "frames", "payloads")

    def __init__(self, event: Publication | Presence) -> None:
        self.event = event
        # frames[i] is the frame for FORMATS[i], None until first asked for
        # (room for the formats of every subscriber: `WireFormat.use`).
        self.frames: list[bytes | None] = [None] * in_use()
        # payloads[i] is the message encoded by CODECS[i].
        self.payloads: list[bytes | None] = [None] * len(CODECS)

    def frame(self, index: int) -> bytes:
        """The ready-to-write frame for the wire format `FORMATS[index]`."""
        frames = self.frames
        if index >= len(frames):  # a format no subscriber had when this was made
            frames.extend([None] * (index + 1 - len(frames)))
        frame = frames[index]
        if frame is None:
            wire = FORMATS[index]
            payload = self.payloads[wire.codec_index]
            if payload is None:
                payload = self.payload(wire.codec_index)
            frame = frames[index] = wire.frame(payload)
        return frame

    def payload(self, codec_index: int) -> bytes:
        """The event encoded by the codec `CODECS[codec_index]` (no framing)."""
        payload = self.payloads[codec_index]
        if payload is None:
            event = self.event
            codec = CODECS[codec_index]
            if isinstance(event, Publication):
                if codec.binary:
                    payload = codec.encode(publication_message(event))
                else:
                    payload = publication_json(event)
            else:
                payload = codec.encode(presence_message(event))
            self.payloads[codec_index] = payload
        return payload
