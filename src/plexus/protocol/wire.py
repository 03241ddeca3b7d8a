"""Wire formats: how one kind of connection carries protocol messages.

A format pairs a codec (JSON or MessagePack: what a message's bytes are) with
what surrounds those bytes on the wire: a WebSocket frame, a WebSocket frame
compressed with permessage-deflate (RFC 7692), or a Server-Sent Event.
Every connection has one format, and fan-out builds each push once per format
in use (`pushes.EncodedPush`), never once per subscriber: every subscriber of
a format gets the same bytes object.

Formats live in one registry, `FORMATS`, and are known by their index there
(fan-out indexes a list, which is cheaper than a dict). Register new formats
at import time, before any connection uses them: a push sizes its cache of
frames from the registry when it is made.

Compressed formats exist once per server window size (`server_max_window_bits`
9 to 15, from the client's offer). Their deflater is shared by every
connection of the format, which only works because the server never keeps its
compression context between messages (`server_no_context_takeover` is in
every response): each message is compressed on its own, so the same bytes
are valid for every client that negotiated that window.
"""

from __future__ import annotations

import zlib
from typing import Any, Final

from plexus.protocol.codec import CODECS, JSON, MSGPACK, PING_FRAME, Codec, build_frame

# Messages shorter than this are sent uncompressed on compressed connections:
# without a shared context, deflate saves under ~10% below ~100 bytes (a
# 64-byte publish reply shrinks by 3 bytes) and costs ~4 µs per message.
DEFLATE_MIN_SIZE: Final = 100
# zlib's fastest level. Chat-sized messages come out the same size at every
# level (a 263-byte push: 198 bytes at 1, 3 and 6); a 24 KB history page is
# 12% bigger than at the default 6 (4362 vs 3905 bytes) for a third of the
# CPU (34 vs 94 µs), and compression runs on the event loop, where each µs
# is latency for every connection.
DEFLATE_LEVEL: Final = 1
# The window sizes a client may ask the server to keep within (RFC 7692 7.1.2.1).
# 8 is refused by zlib's raw deflate; websockets' negotiation declines it.
DEFLATE_WINDOW_BITS: Final = range(9, 16)
_RSV1: Final = 0x40  # the "compressed message" bit of a first frame


class WireFormat:
    """One way of carrying protocol messages: a codec and the bytes around each message.

    Attributes:
        name: for logs and metrics, e.g. `json`, `msgpack+deflate15`.
        codec: what a message's own bytes are.
        index: the format's position in `FORMATS` (set by `register`).
        codec_index: the codec's position in `CODECS` (a push encodes each
            message once per codec, then frames it once per format).
        ping: what the server-wide heartbeat sends to check the peer is there
            (a WebSocket ping), or None when the transport has no such frame.
        checks_pong: whether a peer that sent nothing since the last `ping`
            is closed as dead (a WebSocket answers pings by itself; an event
            stream cannot answer its `: ping` comments, and a dead reader is
            found by the write side: the output limit, or the socket's error).
    """

    __slots__ = ("checks_pong", "codec", "codec_index", "index", "name", "ping")

    def __init__(
        self, name: str, codec: Codec, *, ping: bytes | None = None, checks_pong: bool = True
    ) -> None:
        self.name = name
        self.codec = codec
        self.codec_index = CODECS.index(codec)
        self.index = -1
        self.ping = ping
        self.checks_pong = checks_pong

    def use(self) -> None:
        """A subscriber of this format exists: pushes make room for its frames.

        Fan-out indexes a push's frame cache without checking its length.
        """
        global _in_use
        _in_use = max(_in_use, self.index + 1)

    def frame(self, payload: bytes) -> bytes:
        """Wrap one encoded message (what `codec.encode` returns) for the wire."""
        raise NotImplementedError

    def message(self, message: dict[str, Any]) -> bytes:
        """Encode `message` and wrap it: the bytes one connection is sent."""
        return self.frame(self.codec.encode(message))

    def __repr__(self) -> str:
        return f"<WireFormat {self.name}>"


class WebSocketFormat(WireFormat):
    """Each message in one unfragmented, uncompressed WebSocket frame."""

    __slots__ = ("opcode",)

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec.name, codec, ping=PING_FRAME)
        self.opcode = codec.opcode

    def frame(self, payload: bytes) -> bytes:
        return build_frame(payload, self.opcode)

    def message(self, message: dict[str, Any]) -> bytes:
        # One call less than the general case: every reply takes this path.
        return build_frame(self.codec.encode(message), self.opcode)


class Deflater:
    """Compresses one message at a time for every connection of one window size.

    One zlib stream, flushed with Z_FULL_FLUSH after each message: that
    flush also resets the compressor, so no message refers back to an
    earlier one and each can be inflated alone (what `server_no_context_takeover`
    promises). Reusing the stream costs ~4 µs per chat-sized message; making
    a new one per message costs up to 14 µs (it allocates ~256 KB).
    """

    __slots__ = ("_stream", "bits")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._stream: Any = None  # zlib's compress object, made at first use

    def compress(self, data: bytes) -> bytes:
        """The deflated `data`, without the 4-byte tail every message drops (RFC 7692 7.2.1)."""
        stream = self._stream
        if stream is None:
            stream = self._stream = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -self.bits)
        out: bytes = stream.compress(data) + stream.flush(zlib.Z_FULL_FLUSH)
        return out[:-4]

    def frame(self, payload: bytes, opcode: int) -> bytes:
        """One WebSocket frame of `payload`: compressed (RSV1 set) when that makes it smaller."""
        if len(payload) >= DEFLATE_MIN_SIZE:
            compressed = self.compress(payload)
            if len(compressed) < len(payload):
                return build_frame(compressed, opcode | _RSV1)
        return build_frame(payload, opcode)


class DeflateFormat(WireFormat):
    """Each message in one WebSocket frame, compressed with permessage-deflate when it pays."""

    __slots__ = ("deflater", "opcode")

    def __init__(self, codec: Codec, deflater: Deflater) -> None:
        super().__init__(f"{codec.name}+deflate{deflater.bits}", codec, ping=PING_FRAME)
        self.opcode = codec.opcode
        self.deflater = deflater

    def frame(self, payload: bytes) -> bytes:
        return self.deflater.frame(payload, self.opcode)


# The heartbeat of an event stream: a comment line, which every SSE reader skips.
SSE_PING: Final = b": ping\n\n"


class SseFormat(WireFormat):
    """Each message as one Server-Sent Event: `data: <JSON>` and a blank line (JSON only).

    The stream's heartbeat is a comment (`SSE_PING`) that nothing answers.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("json+sse", JSON, ping=SSE_PING, checks_pong=False)

    def frame(self, payload: bytes) -> bytes:
        if b"\n" in payload or b"\r" in payload:
            # JSON holds a raw line break only as whitespace between tokens
            # (orjson never writes one): one `data:` line per line, which the
            # reader joins with "\n" again, still the same JSON.
            payload = b"\ndata: ".join(payload.splitlines())
        return b"data: " + payload + b"\n\n"


FORMATS: Final[list[WireFormat]] = []
# One more than the highest index of a format any subscriber used so far:
# pushes size their frame cache to it (most servers use the first two).
_in_use = 0


def in_use() -> int:
    """How many formats (from the first) a push must have room for."""
    return _in_use


def register(wire: WireFormat) -> WireFormat:
    """Add `wire` to the registry (at import time) and return it, indexed."""
    if wire.index >= 0:
        raise ValueError(f"{wire.name} is registered already")
    wire.index = len(FORMATS)
    FORMATS.append(wire)
    return wire


JSON_WS: Final = register(WebSocketFormat(JSON))
MSGPACK_WS: Final = register(WebSocketFormat(MSGPACK))
# Before the compressed formats: a push's frame cache is as long as the
# highest index in use, and an event stream's subscribers are more common than
# those of the smaller windows.
JSON_SSE: Final = register(SseFormat())
# One deflater per window size, shared by the JSON and MessagePack formats of
# that size (a message is compressed by one of them at a time).
DEFLATERS: Final = {bits: Deflater(bits) for bits in DEFLATE_WINDOW_BITS}
# The default window (what browsers get) first: the fewer formats in use, the
# smaller each push's frame cache.
_DEFLATE_FORMATS: Final = {
    (codec.name, bits): register(DeflateFormat(codec, DEFLATERS[bits]))
    for bits in sorted(DEFLATE_WINDOW_BITS, reverse=True)
    for codec in CODECS
}


def websocket_format(codec: Codec, deflate_bits: int | None = None) -> WireFormat:
    """The format of a WebSocket connection: its codec, and its compression window if any."""
    if deflate_bits is None:
        return MSGPACK_WS if codec is MSGPACK else JSON_WS
    return _DEFLATE_FORMATS[codec.name, deflate_bits]
