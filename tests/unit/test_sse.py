"""The SSE transport's pure parts: events, the stream's head, request heads, POST bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from plexus.exceptions import BadRequest, TooLarge
from plexus.protocol.wire import JSON_SSE, SSE_PING
from plexus.transports.sse import (
    MAX_BATCH,
    MAX_NAME,
    close_event,
    encode_commands,
    parse_head,
    parse_post,
    stream_head,
)


def read_event(block: bytes) -> Any:
    """What an SSE reader makes of one event: its `data:` lines joined with newlines."""
    assert block.endswith(b"\n\n")
    lines = block[:-2].split(b"\n")
    assert all(line.startswith(b"data: ") for line in lines), block
    return orjson.loads(b"\n".join(line[6:] for line in lines))


def test_a_message_is_one_event() -> None:
    message = {"type": "message", "data": "two\nlines\r\n", "n": 1}
    event = JSON_SSE.message(message)
    assert event == b"data: " + orjson.dumps(message) + b"\n\n"
    assert read_event(event) == message


def test_json_with_raw_line_breaks_becomes_several_data_lines() -> None:
    # Whitespace between tokens may hold line breaks; a data line may not.
    payload = b'{"a":\n1,\r\n"b":\r2}'
    event = JSON_SSE.frame(payload)
    assert event.count(b"data: ") == 4
    assert read_event(event) == {"a": 1, "b": 2}


def test_the_heartbeat_is_a_comment_nothing_answers() -> None:
    assert SSE_PING == b": ping\n\n"
    assert JSON_SSE.ping == SSE_PING
    assert not JSON_SSE.checks_pong


def test_close_event() -> None:
    assert read_event(close_event(4008, "slow consumer")) == {
        "type": "close",
        "code": 4008,
        "reason": "slow consumer",
    }


def test_stream_head_is_an_event_stream_without_length() -> None:
    head = stream_head([("Access-Control-Allow-Origin", "https://a.example")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert "Content-Type: text/event-stream; charset=utf-8" in lines
    assert "Access-Control-Allow-Origin: https://a.example" in lines
    assert "Connection: close" in lines
    assert not any(
        line.lower().startswith(("content-length", "transfer-encoding")) for line in lines
    )


def test_parse_head() -> None:
    head = b"GET /sse?token=t HTTP/1.1\r\nHost: h:1\r\nOrigin:  https://a.example \r\nX-Empty:"
    assert parse_head(head) == (
        "/sse?token=t",
        [("Host", "h:1"), ("Origin", "https://a.example"), ("X-Empty", "")],
    )
    for bad in (
        b"GET /sse\r\nHost: h",
        b"GET /sse HTTP/2\r\nHost: h",
        b"GET  /sse HTTP/1.1",
        b"GET /sse HTTP/1.1\r\nno colon",
        b"GET /sse HTTP/1.1\r\n: no name",
        b"GET /sse HTTP/1.1\r\n folded: header",
    ):
        assert parse_head(bad) is None, bad


def test_parse_post() -> None:
    commands = [{"type": "ping"}]
    assert parse_post({"session": "s", "node": "n", "commands": commands}) == ("s", "n", commands)
    assert parse_post({"session": "s", "commands": []}) == ("s", None, [])
    for bad in (
        [],
        "s",
        {"commands": []},
        {"session": "", "commands": []},
        {"session": "s" * (MAX_NAME + 1), "commands": []},
        {"session": 1, "commands": []},
        {"session": "s", "node": 1, "commands": []},
        {"session": "s", "node": "n" * (MAX_NAME + 1), "commands": []},
        {"session": "s"},
        {"session": "s", "commands": {"type": "ping"}},
    ):
        with pytest.raises(BadRequest):
            parse_post(bad)
    with pytest.raises(TooLarge):
        parse_post({"session": "s", "commands": [{}] * (MAX_BATCH + 1)})


def test_commands_are_encoded_as_websocket_messages_would_carry_them() -> None:
    commands: list[Any] = [{"type": "ping", "id": 1}, "text", None, [1, 2]]
    assert encode_commands(commands) == [orjson.dumps(c) for c in commands]
    deep: Any = 0
    for _ in range(300):
        deep = [deep]
    with pytest.raises(BadRequest, match="nested too deeply"):
        encode_commands([{"type": "ping"}, deep])
