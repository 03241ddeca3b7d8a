"""Wire formats (plexus.protocol.wire): the registry and permessage-deflate's sending side."""

from __future__ import annotations

import os
import zlib

import orjson
import pytest

from plexus.protocol.codec import JSON, MSGPACK, OP_BINARY, OP_TEXT, PING_FRAME
from plexus.protocol.wire import (
    DEFLATE_MIN_SIZE,
    DEFLATE_WINDOW_BITS,
    FORMATS,
    JSON_WS,
    MSGPACK_WS,
    Deflater,
    WebSocketFormat,
    register,
    websocket_format,
)
from tests.helpers import parse_frame

TAIL = b"\x00\x00\xff\xff"


def split(frame: bytes) -> tuple[int, bytes]:
    """(first byte, payload) of one unmasked server frame (RSV1 allowed)."""
    length = frame[1] & 0x7F
    start = 2
    if length == 126:
        length, start = int.from_bytes(frame[2:4]), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10]), 10
    assert len(frame) == start + length
    return frame[0], frame[start:]


def inflate(payload: bytes, bits: int) -> bytes:
    """What a client with a fresh inflater of window `bits` reads (no context).

    Inflated 16 bytes at a time: zlib copies a match from its own output
    buffer when it can, and so would accept a distance beyond the window if
    given room for the whole message at once; in small steps every match
    comes from the window, as in a browser's inflater.
    """
    inflater = zlib.decompressobj(-bits)
    out, data = b"", payload + TAIL
    while chunk := inflater.decompress(data, 16):
        out += chunk
        data = inflater.unconsumed_tail
    assert not inflater.unconsumed_tail
    return out


def test_every_format_is_registered_once_at_its_index() -> None:
    assert [wire.index for wire in FORMATS] == list(range(len(FORMATS)))
    assert len({wire.name for wire in FORMATS}) == len(FORMATS)
    assert FORMATS[JSON_WS.index] is JSON_WS
    assert (JSON_WS.codec, MSGPACK_WS.codec) == (JSON, MSGPACK)
    assert websocket_format(JSON) is JSON_WS
    assert websocket_format(MSGPACK) is MSGPACK_WS
    for bits in DEFLATE_WINDOW_BITS:
        for codec in (JSON, MSGPACK):
            wire = websocket_format(codec, bits)
            assert FORMATS[wire.index] is wire
            assert wire.codec is codec
            assert wire.name == f"{codec.name}+deflate{bits}"
            assert wire.ping == PING_FRAME
    with pytest.raises(ValueError, match="registered already"):
        register(JSON_WS)
    with pytest.raises(KeyError):
        websocket_format(JSON, 8)  # declined at the negotiation


def test_plain_formats_frame_a_message_in_its_codec() -> None:
    message = {"type": "pong", "id": 1}
    text = parse_frame(JSON_WS.message(message))
    binary = parse_frame(MSGPACK_WS.message(message))
    assert (text.opcode, binary.opcode) == (OP_TEXT, OP_BINARY)
    assert JSON.decode(bytes(text.data)) == MSGPACK.decode(bytes(binary.data)) == message
    assert isinstance(JSON_WS, WebSocketFormat)


def test_small_messages_go_uncompressed() -> None:
    wire = websocket_format(JSON, 15)
    small = {"type": "reply", "id": 2, "result": {"offset": 2, "epoch": "pQ3v9wXk"}}
    assert len(JSON.encode(small)) < DEFLATE_MIN_SIZE
    assert wire.message(small) == JSON_WS.message(small)


def test_incompressible_messages_go_uncompressed() -> None:
    payload = os.urandom(4000)
    frame = Deflater(15).frame(payload, OP_BINARY)
    assert split(frame) == (0x82, payload)


@pytest.mark.parametrize("bits", DEFLATE_WINDOW_BITS)
def test_each_message_inflates_alone_within_the_window(bits: int) -> None:
    deflater = Deflater(bits)
    # Repeats at distances over 16 KiB: a window larger than the client's
    # would show as "invalid distance too far back" when it inflates.
    chunk = os.urandom(8500).hex().encode()
    payload = chunk * 2
    first = deflater.frame(payload, OP_TEXT)
    second = deflater.frame(payload, OP_TEXT)
    # Nothing of the first message is referred to by the second: the same
    # bytes again, and each inflates with a fresh inflater (no takeover).
    assert first == second
    head, compressed = split(first)
    assert head == 0xC1
    assert len(compressed) < len(payload)
    assert inflate(compressed, bits) == payload


def test_one_deflater_serves_both_codecs_of_a_window() -> None:
    message = {"type": "message", "channel": "chat:a", "data": {"text": "hi " * 50}}
    json_frame = websocket_format(JSON, 12).message(message)
    msgpack_frame = websocket_format(MSGPACK, 12).message(message)
    assert split(json_frame)[0] == 0xC1
    assert split(msgpack_frame)[0] == 0xC2
    assert orjson.loads(inflate(split(json_frame)[1], 12)) == message
    assert MSGPACK.decode(inflate(split(msgpack_frame)[1], 12)) == message
