"""Pure protocol tests: no event loop, no socket."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest
from websockets.frames import Opcode

from plexus.channels import namespace_of, personal_owner, validate_channel
from plexus.exceptions import PlexusError
from plexus.models import ClientInfo, HistoryPage, Presence, Publication, StreamPosition
from plexus.protocol import commands as cmd
from plexus.protocol.codec import (
    JSON,
    JSON_SUBPROTOCOL,
    MSGPACK,
    MSGPACK_SUBPROTOCOL,
    OP_BINARY,
    OP_TEXT,
    JsonCodec,
    MsgpackCodec,
    UndecodableBytes,
    build_frame,
    close_frame,
    codec_for,
    frame_payload,
    json_loads_with_bytes,
    to_json_compatible,
)
from plexus.protocol.codes import CloseCode
from plexus.protocol.limits import EventWindow, TokenBucket
from plexus.protocol.recovery import can_recover, merge_backlog
from plexus.protocol.session import Limits, SessionState
from tests.helpers import parse_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_build_frame_matches_rfc6455_reader(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    frame = parse_frame(build_frame(payload, 0x2))
    assert frame.opcode is Opcode.BINARY
    assert frame.fin
    assert frame.data == payload


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frame_payload_undoes_build_frame(size: int) -> None:
    payload = b"p" * size
    assert frame_payload(build_frame(payload, OP_TEXT)) == payload


def test_close_frame_carries_code_and_reason() -> None:
    frame = parse_frame(close_frame(4008, "slow consumer"))
    assert frame.opcode is Opcode.CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4008
    assert frame.data[2:] == b"slow consumer"


def test_close_frame_without_reason_and_with_one_too_long() -> None:
    assert parse_frame(close_frame(1000)).data == b"\x03\xe8"
    for length in (123, 124, 200):
        long = parse_frame(close_frame(4000, "x" * length))
        assert long.data[2:] == b"x" * 123  # 125 bytes: the most a control frame carries
    # Cut at a character boundary: the reason stays valid UTF-8.
    accented = parse_frame(close_frame(4000, "é" * 100))
    assert accented.data[2:].decode("utf-8") == "é" * 61


def test_codecs_name_their_encoding_and_frame_type() -> None:
    # Fresh instances too: the shared ones were built once, at import.
    for json_codec in (JSON, JsonCodec()):
        assert (json_codec.name, json_codec.binary, json_codec.opcode) == ("json", False, OP_TEXT)
    for mp_codec in (MSGPACK, MsgpackCodec()):
        assert (mp_codec.name, mp_codec.binary, mp_codec.opcode) == ("msgpack", True, OP_BINARY)
    assert codec_for(MSGPACK_SUBPROTOCOL) is MSGPACK
    for other in (None, JSON_SUBPROTOCOL, "plexus.v2.cbor"):
        assert codec_for(other) is JSON
    message = {"type": "pong", "id": 1, "data": b"\x00"}
    for codec, opcode in ((JSON, Opcode.TEXT), (MSGPACK, Opcode.BINARY)):
        frame = parse_frame(codec.frame(message))
        assert frame.opcode is opcode
        assert codec.decode(frame.data) == message


def test_json_bytes_round_trip_between_codecs() -> None:
    message = {"type": "message", "data": {"blob": b"\x00\xff", "text": "你好 🎉"}}
    as_json = JSON.encode(message)
    assert b'{"$bytes":"AP8="}' in as_json
    assert JSON.decode(as_json) == message  # $bytes objects come back as bytes
    as_msgpack = MSGPACK.decode(MSGPACK.encode(message))
    assert as_msgpack == message


@pytest.mark.parametrize(
    "value",
    [
        {"$bytes": "AAE=", "note": "kept?"},
        {"note": "kept?", "$bytes": "AAE="},
        {"$bytes": "%%", "note": 1},  # not base64, and no marker either: fine
        {"$bytes": 5, "other": None},
        {"$bytes": {"$bytes": "AAE="}, "x": 0},  # the inner one is a marker
        [{"$bytes": "AAE=", "": ""}],
    ],
)
def test_bytes_marker_with_other_keys_is_an_ordinary_object(value: Any) -> None:
    # Only an object whose single key is "$bytes" stands for bytes.
    message = {"type": "publish", "channel": "chat:x", "data": value}
    expected = value
    if isinstance(value, dict) and isinstance(value["$bytes"], dict):
        expected = {"$bytes": b"\x00\x01", "x": 0}
    as_text = orjson.dumps(message).decode()
    for payload in (as_text, as_text.encode()):  # text frames and binary frames
        assert JSON.decode(payload)["data"] == expected
        assert json_loads_with_bytes(payload)["data"] == expected
    # Delivered unchanged to both encodings, and back to JSON for the HTTP API.
    assert JSON.decode(JSON.encode(message))["data"] == expected
    assert MSGPACK.decode(MSGPACK.encode(JSON.decode(as_text)))["data"] == expected
    assert to_json_compatible(JSON.decode(as_text)) == message


def test_bytes_marker_alone_is_bytes_at_any_depth() -> None:
    decoded = JSON.decode('{"a":[{"$bytes":"AAE="},{"b":{"$bytes":""}}]}')
    assert decoded == {"a": [b"\x00\x01", {"b": b""}]}
    assert JSON.decode(b'{"$bytes":"AP8="}') == b"\x00\xff"
    # "$bytes" as a value, not a key, is text.
    assert JSON.decode('{"t":"$bytes"}') == {"t": "$bytes"}


@pytest.mark.parametrize(
    "payload",
    ["{", "[1,2", "nul", '{"a":1}x', '{"data":{"$bytes":"@@@"}}', '{"data":{"$bytes":5}}'],
)
def test_json_decode_errors_are_bad_request(payload: str) -> None:
    with pytest.raises(PlexusError) as info:
        JSON.decode(payload)
    assert info.value.code == "bad_request"


def test_json_decode_error_says_why() -> None:
    with pytest.raises(PlexusError, match=r"^not valid JSON: \w"):
        JSON.decode("{")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ('{"$bytes":5}', '"$bytes" must hold a base64 string'),
        ('{"$bytes":"@@"}', '"$bytes" holds invalid base64'),
        ("[" * 900 + '{"$bytes":"AAE="}' + "]" * 900, "nested too deeply"),
    ],
)
def test_undecodable_bytes_keep_the_command_for_its_id(data: str, text: str) -> None:
    payload = '{"type":"publish","id":7,"channel":"chat:x","data":' + data + "}"
    with pytest.raises(UndecodableBytes) as info:
        JSON.decode(payload)
    assert (info.value.code, info.value.message) == ("bad_request", text)
    assert info.value.decoded["id"] == 7


def test_a_lone_bytes_map_means_bytes_in_every_encoding() -> None:
    for codec in (JSON, MSGPACK):
        sent = codec.encode({"data": {"$bytes": "aGk="}, "other": {"$bytes": "aGk=", "x": 1}})
        assert codec.decode(sent) == {"data": b"hi", "other": {"$bytes": "aGk=", "x": 1}}


@pytest.mark.parametrize("data", [{"$bytes": 5}, {"$bytes": "@@"}])
def test_a_malformed_bytes_map_is_bad_request_in_every_encoding(data: dict[str, Any]) -> None:
    for codec in (JSON, MSGPACK):
        with pytest.raises(UndecodableBytes) as info:
            codec.decode(codec.encode({"type": "publish", "id": 3, "data": data}))
        assert info.value.code == "bad_request"
        assert info.value.decoded["id"] == 3  # the error answer still carries the id


def test_msgpack_rejects_text_garbage_and_keys_json_cannot_carry() -> None:
    with pytest.raises(PlexusError) as info:
        MSGPACK.decode("{}")
    assert info.value.message == "a plexus.v1.msgpack connection sends binary frames"
    # A reserved byte: msgpack's error has no text, so the message names the error.
    with pytest.raises(PlexusError) as info:
        MSGPACK.decode(b"\xc1")
    assert info.value.message == "not valid MessagePack: FormatError"
    # Map keys other than strings (and bytes) are refused at once, saying so.
    with pytest.raises(PlexusError, match=r"^not valid MessagePack: .*map key"):
        MSGPACK.decode(msgpack.packb({"type": "publish", 1: "x"}))
    # Strings stay strings, bytes stay bytes.
    assert MSGPACK.decode(msgpack.packb({"s": "é", "b": b"\xff"})) == {"s": "é", "b": b"\xff"}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ([], "bad_request"),
        ("x", "bad_request"),
        ({}, "bad_request"),
        ({"type": 5}, "bad_request"),
        ({"type": "nope"}, "unknown_type"),
        ({"type": "publish", "channel": "chat:a"}, "bad_request"),
        ({"type": "publish", "channel": 5, "data": 1}, "bad_request"),
        ({"type": "publish", "channel": "bad channel", "data": 1}, "invalid_channel"),
        ({"type": "publish", "channel": "", "data": 1}, "invalid_channel"),
        ({"type": "publish", "channel": "a" * 256, "data": 1}, "invalid_channel"),
        ({"type": "subscribe", "channel": "c", "since": 5}, "bad_request"),
        (
            {"type": "subscribe", "channel": "c", "since": {"offset": -1, "epoch": "e"}},
            "bad_request",
        ),
        ({"type": "subscribe", "channel": "c", "since": {"offset": 1}}, "bad_request"),
        ({"type": "subscribe", "channel": "c", "info": "x" * 2000}, "too_large"),
        ({"type": "subscribe", "channel": "c", "token": 5}, "bad_request"),
        ({"type": "history", "channel": "c", "limit": -1}, "bad_request"),
        ({"type": "history", "channel": "c", "limit": True}, "bad_request"),
        ({"type": "rpc", "method": ""}, "bad_request"),
        ({"type": "auth"}, "bad_request"),
        ({"type": "ping", "id": 1.5}, "bad_request"),
        ({"type": "ping", "id": "x" * 65}, "bad_request"),
        ({"type": "ping", "id": True}, "bad_request"),
    ],
)
def test_invalid_commands(message: Any, code: str) -> None:
    with pytest.raises(PlexusError) as info:
        cmd.parse_command(message)
    assert info.value.code == code


def test_valid_commands_parse() -> None:
    sub = cmd.parse_command(
        {
            "type": "subscribe",
            "id": "a1",
            "channel": "chat:x",
            "since": {"offset": 3, "epoch": "e"},
            "info": {"nick": "n"},
            "extra": "ignored",
        }
    )
    assert sub == cmd.Subscribe(
        "a1", "chat:x", since=cmd.Since(3, "e"), info={"nick": "n"}, has_info=True
    )
    assert cmd.parse_command({"type": "publish", "channel": "c", "data": None}) == cmd.Publish(
        None, "c", None, b"null"
    )
    history = cmd.parse_command({"type": "history", "id": 1, "channel": "c", "limit": 10**9})
    assert isinstance(history, cmd.History)
    assert history.limit == cmd.MAX_HISTORY_LIMIT


def test_channel_names() -> None:
    assert validate_channel("chat:room-1.a_b@c#d/e=f") == "chat:room-1.a_b@c#d/e=f"
    assert namespace_of("chat:lobby:x") == "chat"
    assert namespace_of("lobby") == ""
    assert personal_owner("#alice") == "alice"
    assert personal_owner("chat:#alice") is None
    for bad in ["", "a b", "é", "a\n", "x" * 256]:
        with pytest.raises(PlexusError):
            validate_channel(bad)


def test_session_closes_after_twenty_bad_commands() -> None:
    state = SessionState(JSON, Limits(), now=0.0)
    for i in range(19):
        outcome = state.receive("not json", now=float(i) * 0.1)
        assert outcome.error is not None
        assert outcome.close is None
    assert state.receive("not json", now=2.0).close is CloseCode.BAD_REQUESTS


def test_session_bad_commands_outside_window_do_not_close() -> None:
    state = SessionState(JSON, Limits(), now=0.0)
    for i in range(100):
        assert state.receive("{}", now=i * 0.6).close is None  # 17 per 10 s


def test_session_rate_limit_and_4029() -> None:
    state = SessionState(JSON, Limits(publish_rate=20, publish_burst=50), now=0.0)
    publish = '{"type":"publish","id":1,"channel":"chat:a","data":1}'
    accepted = sum(state.receive(publish, now=0.0).command is not None for _ in range(50))
    assert accepted == 50  # the burst
    limited = [state.receive(publish, now=0.0) for _ in range(200)]
    assert all(o.command is None and o.close is None for o in limited)  # 200 answers...
    assert state.receive(publish, now=0.0).close is CloseCode.RATE_LIMITED  # ...the 201st closes
    later = SessionState(JSON, Limits(publish_rate=20, publish_burst=50), now=0.0)
    for _ in range(50):
        later.receive(publish, now=0.0)
    assert later.receive(publish, now=0.0).command is None
    assert later.receive(publish, now=0.1).command is not None  # refilled at 20/s


def test_rate_limited_does_not_count_as_bad() -> None:
    state = SessionState(JSON, Limits(publish_rate=1, publish_burst=1), now=0.0)
    publish = '{"type":"publish","channel":"chat:a","data":1}'
    state.receive(publish, now=0.0)
    outcomes = [state.receive(publish, now=0.0) for _ in range(50)]
    assert all(o.error and o.error["code"] == "rate_limited" for o in outcomes)
    assert all(o.close is None for o in outcomes)


def test_session_errors_carry_the_command_id_and_a_message() -> None:
    state = SessionState(JSON, Limits(publish_rate=1, publish_burst=1), now=0.0)
    missing = state.receive('{"type":"publish","id":5,"channel":"c"}', now=0.0)
    assert missing.error == cmd.error(5, "bad_request", '"publish" needs "data"')
    bad_bytes = '{"type":"publish","id":9,"channel":"c","data":{"$bytes":"%%"}}'
    assert state.receive(bad_bytes, now=0.0).error == cmd.error(
        9, "bad_request", '"$bytes" holds invalid base64'
    )
    not_json = state.receive('{"id": 3', now=0.0).error
    assert not_json is not None
    assert "id" not in not_json
    assert not_json["message"].startswith("not valid JSON: ")
    publish = '{"type":"publish","id":"p","channel":"c","data":1}'
    assert state.receive(publish, now=0.0).command == cmd.Publish("p", "c", 1, b"1")
    limited = state.receive(publish, now=0.0)
    assert limited.error == cmd.error("p", "rate_limited", "publish rate exceeded")


def test_session_applies_its_info_limit() -> None:
    state = SessionState(JSON, Limits(max_info_bytes=10), now=0.0)
    subscribe = '{"type":"subscribe","id":1,"channel":"c","info":"%s"}'
    assert state.receive(subscribe % ("x" * 8), now=0.0).command is not None
    refused = state.receive(subscribe % ("x" * 9), now=0.0).error
    assert refused == cmd.error(1, "too_large", '"info" is over 10 bytes')


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert [bucket.allow(0.0), bucket.allow(0.0)] == [True, False]
    assert [bucket.allow(0.1), bucket.allow(0.1)] == [True, False]  # one token per 0.1 s
    assert bucket.allow(0.15) is False  # half a token
    assert bucket.allow(0.2) is True
    assert bucket.allow(100.0) is True  # a long pause refills up to the burst only
    assert bucket.allow(100.0) is False


def test_token_bucket_with_rate_zero_never_limits() -> None:
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(100))


def test_event_window_forgets_events_a_full_window_old() -> None:
    window = EventWindow(limit=2, window=10.0)
    assert window.hit(0.0) is False
    assert window.hit(10.0) is False  # the first one is exactly 10 s old: gone
    assert window.hit(19.0) is True
    for _ in range(1000):
        window.hit(19.0)
    assert window._times is not None
    assert len(window._times) == 2  # memory bounded by the limit


READS = [
    '{"type":"subscribe","channel":"chat:a","info":{"nick":"x"}}',
    '{"type":"unsubscribe","channel":"chat:a"}',
    '{"type":"history","channel":"chat:a"}',
    '{"type":"presence","channel":"chat:a"}',
]


def test_subscribe_unsubscribe_and_reads_share_their_own_bucket() -> None:
    state = SessionState(JSON, Limits(subscribe_rate=2, subscribe_burst=8), now=0.0)
    outcomes = [state.receive(READS[i % 4], now=0.0) for i in range(12)]
    assert [o.command is not None for o in outcomes] == [True] * 8 + [False] * 4
    assert {o.error["code"] for o in outcomes[8:] if o.error} == {"rate_limited"}
    # Publishes and pings draw on nothing of it.
    publish = '{"type":"publish","channel":"chat:a","data":1}'
    assert state.receive(publish, now=0.0).command is not None
    assert state.receive('{"type":"ping"}', now=0.0).command is not None
    assert state.receive(READS[0], now=0.5).command is not None  # refilled at 2/s
    assert state.receive(READS[0], now=0.5).command is None


def test_a_limited_read_is_answered_with_its_id() -> None:
    state = SessionState(JSON, Limits(subscribe_rate=1, subscribe_burst=1), now=0.0)
    assert state.receive('{"type":"subscribe","id":1,"channel":"chat:a"}', now=0.0).command
    limited = state.receive('{"type":"history","id":"h-2","channel":"chat:a"}', now=0.0)
    assert limited.command is None
    assert limited.error == cmd.error(
        "h-2", "rate_limited", "subscribe/unsubscribe/history/presence rate exceeded"
    )


def test_a_join_leave_flood_closes_4029_like_a_publish_flood() -> None:
    limits = Limits(subscribe_rate=1, subscribe_burst=2, rate_limit_disconnect=30)
    state = SessionState(JSON, limits, now=0.0)
    outcomes = [state.receive(READS[i % 2], now=i * 0.001) for i in range(33)]
    assert all(o.close is None for o in outcomes[:32])  # 2 allowed, 30 answered rate_limited
    assert outcomes[32].close is CloseCode.RATE_LIMITED


def test_a_zero_subscribe_rate_turns_the_limit_off() -> None:
    state = SessionState(JSON, Limits(subscribe_rate=0, subscribe_burst=1), now=0.0)
    assert all(state.receive(READS[i % 4], now=0.0).command for i in range(1000))


def _pub(offset: int, epoch: str = "e") -> Publication:
    return Publication("c", offset, offset, epoch, 0)


def test_recovery_decision() -> None:
    page = HistoryPage([_pub(4), _pub(5)], StreamPosition(5, "e"), complete=True)
    assert can_recover(cmd.Since(3, "e"), page)
    assert not can_recover(cmd.Since(3, "other"), page)
    assert not can_recover(cmd.Since(9, "e"), page)
    assert can_recover(cmd.Since(5, "e"), page)  # nothing missed: recovered, nothing to send
    incomplete = HistoryPage([_pub(5)], StreamPosition(5, "e"), complete=False)
    assert not can_recover(cmd.Since(3, "e"), incomplete)


def test_merge_backlog_drops_duplicates_and_own_presence() -> None:
    me = ClientInfo("c-me", None)
    other = ClientInfo("c-other", "bob")
    backlog = [
        _pub(4),
        Presence("join", "c", me),
        _pub(5),
        Presence("join", "c", other),
        _pub(5),
        _pub(6, epoch="old"),
        _pub(6),
    ]
    merged = merge_backlog(4, "e", backlog, "c-me")
    assert merged == [_pub(5), Presence("join", "c", other), _pub(6)]
