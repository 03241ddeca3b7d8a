"""Server pushes (plexus.protocol.pushes): their shape on the wire, built once per wire format."""

from __future__ import annotations

import zlib

import msgpack
import orjson
import pytest

from plexus.models import ClientInfo, Presence, Publication
from plexus.protocol.codec import CODECS, JSON, MSGPACK, OP_BINARY, OP_TEXT
from plexus.protocol.pushes import EncodedPush, presence_message, publication_message
from plexus.protocol.wire import FORMATS, JSON_WS, MSGPACK_WS, websocket_format
from tests.helpers import parse_frame

ALICE = ClientInfo("c-1", "alice", {"nick": "Al"})


def test_message_push_from_a_client() -> None:
    pub = Publication("chat:a", {"t": "hi"}, 42, "ep", 1764129600123, "c-1", "alice")
    assert publication_message(pub) == {
        "type": "message",
        "channel": "chat:a",
        "data": {"t": "hi"},
        "offset": 42,
        "epoch": "ep",
        "time": 1764129600123,
        "from": {"client": "c-1", "user": "alice"},
    }


def test_message_push_from_the_api_has_no_from() -> None:
    pub = Publication("chat:a", None, 1, "ep", 5)
    message = publication_message(pub)
    assert message == {
        "type": "message",
        "channel": "chat:a",
        "data": None,
        "offset": 1,
        "epoch": "ep",
        "time": 5,
    }
    # An anonymous client still says who it is.
    anonymous = publication_message(Publication("c", 1, 1, "e", 5, "c-9", None))
    assert anonymous["from"] == {"client": "c-9", "user": None}


def test_join_carries_info_and_leave_does_not() -> None:
    assert presence_message(Presence("join", "chat:a", ALICE)) == {
        "type": "join",
        "channel": "chat:a",
        "client": "c-1",
        "user": "alice",
        "info": {"nick": "Al"},
    }
    assert presence_message(Presence("leave", "chat:a", ALICE)) == {
        "type": "leave",
        "channel": "chat:a",
        "client": "c-1",
        "user": "alice",
    }
    # A join without info still says so (null), so clients can rely on the key.
    bare = presence_message(Presence("join", "c", ClientInfo("c-2", None)))
    assert bare["info"] is None


@pytest.mark.parametrize(
    "event",
    [Publication("chat:a", b"\x00\xff", 3, "ep", 9, "c-1", "alice"), Presence("join", "c", ALICE)],
)
def test_encoded_push_builds_each_frame_once(event: Publication | Presence) -> None:
    MSGPACK_WS.use()  # a server with JSON and MessagePack subscribers
    push = EncodedPush(event)
    assert push.event is event
    expected = (
        publication_message(event) if isinstance(event, Publication) else presence_message(event)
    )
    # Nothing encoded before it is asked for.
    assert set(push.frames) <= {None}
    assert push.payloads == [None] * len(CODECS)
    as_json = push.frame(JSON_WS.index)
    assert push.frame(JSON_WS.index) is as_json  # built once, then shared
    assert push.frames[MSGPACK_WS.index] is None
    assert push.payloads[CODECS.index(MSGPACK)] is None
    as_msgpack = push.frame(MSGPACK_WS.index)
    assert push.frame(MSGPACK_WS.index) is as_msgpack
    text, binary = parse_frame(as_json), parse_frame(as_msgpack)
    assert (text.opcode, binary.opcode) == (OP_TEXT, OP_BINARY)
    assert JSON.decode(bytes(text.data)) == expected
    assert msgpack.unpackb(binary.data) == expected
    if isinstance(event, Publication):
        assert orjson.loads(text.data)["data"] == {"$bytes": "AP8="}


def test_a_compressed_format_reuses_the_encoding_and_compresses_once() -> None:
    pub = Publication("chat:a", {"text": "hello " * 40}, 3, "ep", 9, "c-1", "alice")
    push = EncodedPush(pub)
    plain = push.frame(JSON_WS.index)
    payload = push.payloads[CODECS.index(JSON)]
    assert payload is not None
    deflate15 = websocket_format(JSON, 15)
    compressed = push.frame(deflate15.index)
    assert push.frame(deflate15.index) is compressed  # one compression for all its subscribers
    assert push.payloads[CODECS.index(JSON)] is payload  # the JSON was not encoded again
    # FIN, RSV1 (compressed), text; a 7-bit length.
    assert (compressed[0], compressed[1]) == (0xC1, len(compressed) - 2)
    assert len(compressed) < len(payload) / 2
    inflater = zlib.decompressobj(-15)
    assert inflater.decompress(compressed[2:] + b"\x00\x00\xff\xff") == payload
    assert parse_frame(plain).data == payload


def test_a_push_makes_room_for_the_formats_subscribers_use() -> None:
    """Fan-out indexes the frame cache unchecked: every subscriber's format must fit."""
    deflate9 = websocket_format(MSGPACK, 9)
    assert deflate9.index == len(FORMATS) - 1  # the last one registered
    pub = Publication("chat:a", {"text": "hi " * 60}, 3, "ep", 9, "c-1", "alice")
    assert len(EncodedPush(pub).frames) <= deflate9.index  # nobody uses it yet
    push = EncodedPush(pub)
    assert push.frame(deflate9.index)[0] == 0xC2  # asked for anyway: room is made
    deflate9.use()
    assert len(EncodedPush(pub).frames) == len(FORMATS)
