"""Server pushes (plexus.protocol.pushes): their shape on the wire, encoded once per codec."""

from __future__ import annotations

import msgpack
import orjson
import pytest

from plexus.models import ClientInfo, Presence, Publication
from plexus.protocol.codec import CODECS, JSON, MSGPACK, OP_BINARY, OP_TEXT
from plexus.protocol.pushes import EncodedPush, presence_message, publication_message
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
    push = EncodedPush(event)
    assert push.event is event
    expected = (
        publication_message(event) if isinstance(event, Publication) else presence_message(event)
    )
    assert push.frames == [None] * len(CODECS)  # nothing encoded before it is asked for
    as_json = push.frame(CODECS.index(JSON))
    assert push.frame(CODECS.index(JSON)) is as_json  # built once, then shared
    assert push.frames[CODECS.index(MSGPACK)] is None
    as_msgpack = push.frame(CODECS.index(MSGPACK))
    assert push.frame(CODECS.index(MSGPACK)) is as_msgpack
    text, binary = parse_frame(as_json), parse_frame(as_msgpack)
    assert (text.opcode, binary.opcode) == (OP_TEXT, OP_BINARY)
    assert JSON.decode(bytes(text.data)) == expected
    assert msgpack.unpackb(binary.data) == expected
    if isinstance(event, Publication):
        assert orjson.loads(text.data)["data"] == {"$bytes": "AP8="}
