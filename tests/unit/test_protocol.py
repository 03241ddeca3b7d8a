"""Pure protocol tests: no event loop, no socket."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from plexus.channels import namespace_of, personal_owner, validate_channel
from plexus.exceptions import PlexusError
from plexus.models import ClientInfo, HistoryPage, Presence, Publication, StreamPosition
from plexus.protocol import commands as cmd
from plexus.protocol.codec import JSON, MSGPACK, UndecodableBytes, build_frame, close_frame
from plexus.protocol.codes import CloseCode
from plexus.protocol.recovery import can_recover, merge_backlog
from plexus.protocol.session import Limits, SessionState
from plexus.transports import lean


def parse_frame(data: bytes) -> Frame:
    """Parse one server frame with the websockets library's reader (an independent check)."""
    chunks = [data]

    def read_exact(n: int) -> Any:
        buf = chunks[0]
        chunks[0] = buf[n:]
        return buf[:n]
        yield  # pragma: no cover - makes this a generator

    gen = Frame.parse(read_exact, mask=False)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        assert chunks[0] == b"", "trailing bytes after the frame"
        frame: Frame = done.value
        return frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_build_frame_matches_rfc6455_reader(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    frame = parse_frame(build_frame(payload, 0x2))
    assert frame.opcode is Opcode.BINARY
    assert frame.fin
    assert frame.data == payload


def test_close_frame_carries_code_and_reason() -> None:
    frame = parse_frame(close_frame(4008, "slow consumer"))
    assert frame.opcode is Opcode.CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4008
    assert frame.data[2:] == b"slow consumer"


def test_json_bytes_round_trip_between_codecs() -> None:
    message = {"type": "message", "data": {"blob": b"\x00\xff", "text": "你好 🎉"}}
    as_json = JSON.encode(message)
    assert b'{"$bytes":"AP8="}' in as_json
    assert JSON.decode(as_json) == message  # $bytes objects come back as bytes
    as_msgpack = MSGPACK.decode(MSGPACK.encode(message))
    assert as_msgpack == message


@pytest.mark.parametrize(
    "payload",
    ["{", "[1,2", "nul", '{"a":1}x', '{"data":{"$bytes":"@@@"}}', '{"data":{"$bytes":5}}'],
)
def test_json_decode_errors_are_bad_request(payload: str) -> None:
    with pytest.raises(PlexusError) as info:
        JSON.decode(payload)
    assert info.value.code == "bad_request"


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


def test_msgpack_rejects_text_and_garbage() -> None:
    with pytest.raises(PlexusError):
        MSGPACK.decode("{}")
    with pytest.raises(PlexusError):
        MSGPACK.decode(b"\xc1")


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
        None, "c", None
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


def test_fragment_cap_follows_the_message_size_limit() -> None:
    assert lean.max_fragments(64 * 1024) == 1024
    assert lean.max_fragments(1000) == 64  # the floor
    # Autobahn 9.3/9.4 send 4 MiB in 64-byte fragments to a 16 MiB limit.
    assert lean.max_fragments(16 * 1024 * 1024) >= 4 * 1024 * 1024 // 64
