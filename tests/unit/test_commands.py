"""Command validation, replies and errors (plexus.protocol.commands): pure, no event loop.

The error messages are checked too: a client developer reads them to learn
which field was wrong, so each one names that field, first, in quotes.
"""

from __future__ import annotations

from typing import Any

import pytest

from plexus.exceptions import PlexusError
from plexus.protocol import commands as cmd
from plexus.protocol.codec import JSON, encode_data


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"type": "auth", "id": 1, "token": "t.o.k"}, cmd.Auth(1, "t.o.k")),
        ({"type": "subscribe", "id": 2, "channel": "chat:a"}, cmd.Subscribe(2, "chat:a")),
        (
            {"type": "subscribe", "channel": "chat:a", "token": "t", "info": None},
            cmd.Subscribe(None, "chat:a", token="t"),
        ),
        ({"type": "unsubscribe", "id": "u", "channel": "chat:a"}, cmd.Unsubscribe("u", "chat:a")),
        (
            {"type": "publish", "id": 3, "channel": "c", "data": [1]},
            cmd.Publish(3, "c", [1], b"[1]"),
        ),
        (
            {"type": "publish", "channel": "c", "data": {"b": b"\x00"}, "idempotency_key": "k-1"},
            cmd.Publish(None, "c", {"b": b"\x00"}, b'{"b":{"$bytes":"AA=="}}', "k-1"),
        ),
        ({"type": "history", "id": 4, "channel": "c"}, cmd.History(4, "c", None, 100)),
        (
            {"type": "history", "id": 4, "channel": "c", "since": {"offset": 0, "epoch": ""}},
            cmd.History(4, "c", cmd.Since(0, ""), 100),
        ),
        ({"type": "history", "channel": "c", "limit": 0}, cmd.History(None, "c", None, 0)),
        ({"type": "presence", "id": 5, "channel": "c"}, cmd.PresenceQuery(5, "c")),
        ({"type": "rpc", "id": 6, "method": "m", "data": {"a": 1}}, cmd.Rpc(6, "m", {"a": 1})),
        ({"type": "rpc", "method": "m" * 255}, cmd.Rpc(None, "m" * 255, None)),
        ({"type": "ping", "id": 7}, cmd.Ping(7)),
        ({"type": "ping", "id": "i" * 64}, cmd.Ping("i" * 64)),
        ({"type": "ping", "id": -(2**63)}, cmd.Ping(-(2**63))),
    ],
)
def test_every_command_parses_with_its_id_and_fields(message: Any, expected: cmd.Command) -> None:
    assert cmd.parse_command(message) == expected


@pytest.mark.parametrize(
    "since",
    [{"offset": 0, "epoch": "e"}, {"offset": cmd.MAX_OFFSET, "epoch": "e"}],
)
def test_since_accepts_the_whole_offset_range(since: dict[str, Any]) -> None:
    parsed = cmd.parse_command({"type": "subscribe", "channel": "c", "since": since})
    assert isinstance(parsed, cmd.Subscribe)
    assert parsed.since == cmd.Since(since["offset"], "e")


def test_info_limit_is_inclusive_and_configurable() -> None:
    def subscribe(info: str, **limit: int) -> cmd.Command:
        return cmd.parse_command({"type": "subscribe", "channel": "c", "info": info}, **limit)

    fits = "x" * 1022  # 1024 bytes as JSON, quotes included
    assert isinstance(subscribe(fits), cmd.Subscribe)
    with pytest.raises(PlexusError) as info:
        subscribe(fits + "x")
    assert (info.value.code, info.value.message) == ("too_large", '"info" is over 1024 bytes')
    with pytest.raises(PlexusError, match=r'^"info" is over 10 bytes$'):
        subscribe("x" * 9, max_info_bytes=10)


@pytest.mark.parametrize(
    ("message", "code", "text"),
    [
        ([], "bad_request", "a command must be an object"),
        ({"type": 5}, "bad_request", '"type" must be a string'),
        (
            {"type": "ping", "id": 1.5},
            "bad_request",
            '"id" must be an integer or a string of at most 64 chars',
        ),
        ({"type": "ping", "id": "i" * 65}, "bad_request", '"id" must be'),
        ({"type": "publish", "channel": "c"}, "bad_request", '"publish" needs "data"'),
        ({"type": "publish", "channel": 5, "data": 1}, "bad_request", '"channel" must be a string'),
        ({"type": "unsubscribe"}, "bad_request", '"channel" must be a string'),
        ({"type": "presence"}, "bad_request", '"channel" must be a string'),
        (
            {"type": "subscribe", "channel": "c", "since": []},
            "bad_request",
            '"since" must be an object {"offset": N, "epoch": E}',
        ),
        (
            {"type": "subscribe", "channel": "c", "since": {"offset": True, "epoch": "e"}},
            "bad_request",
            '"since.offset" must be an integer from 0 to 2**63-1',
        ),
        (
            {"type": "subscribe", "channel": "c", "since": {"offset": 2**63, "epoch": "e"}},
            "bad_request",
            '"since.offset" must be',
        ),
        (
            {"type": "subscribe", "channel": "c", "since": {"offset": 1, "epoch": 1}},
            "bad_request",
            '"since.epoch" must be a string',
        ),
        (
            {"type": "subscribe", "channel": "c", "token": 5},
            "bad_request",
            '"token" must be a string',
        ),
        (
            {"type": "history", "channel": "c", "limit": -1},
            "bad_request",
            '"limit" must be an integer >= 0',
        ),
        ({"type": "history", "channel": "c", "limit": "9"}, "bad_request", '"limit" must be'),
        (
            {"type": "rpc", "method": ""},
            "bad_request",
            '"method" must be a non-empty string of at most 255 chars',
        ),
        ({"type": "rpc", "method": 5}, "bad_request", '"method" must be'),
        ({"type": "rpc"}, "bad_request", '"method" must be'),
        ({"type": "rpc", "method": "m" * 256}, "bad_request", '"method" must be'),
        ({"type": "auth", "token": ""}, "bad_request", '"token" must be a non-empty string'),
        ({"type": "auth", "token": 5}, "bad_request", '"token" must be'),
        ({"type": "auth"}, "bad_request", '"token" must be'),
        (
            {"type": "publish", "channel": "c", "data": nested(252)},
            "bad_request",
            '"data" cannot be sent as JSON: nested too deeply (over 250 levels),'
            " a non-string key or an extension type",
        ),
        (
            {"type": "subscribe", "channel": "c", "info": nested(252)},
            "bad_request",
            '"info" cannot be sent as JSON',
        ),
        ({"type": "nope"}, "unknown_type", "unknown command type 'nope'"),
        ({"type": "PING"}, "unknown_type", "unknown command type 'PING'"),
        ({"type": "t" * 100}, "unknown_type", f"unknown command type {'t' * 64!r}"),
    ],
)
def test_invalid_commands_name_what_is_wrong(message: Any, code: str, text: str) -> None:
    with pytest.raises(PlexusError) as info:
        cmd.parse_command(message)
    assert info.value.code == code
    assert isinstance(info.value.message, str)
    # The message starts with the field (or the whole text) given here: a
    # client developer learns from it which field to fix.
    assert info.value.message.startswith(text), info.value.message
    if text.startswith("unknown"):
        assert info.value.message == text


def test_payload_depth_counts_the_envelope_it_is_sent_in() -> None:
    # 251 levels encode alone, but not inside the four levels of a history reply.
    assert JSON.encode({"data": nested(251)})
    cmd.check_payload(nested(248))
    with pytest.raises(PlexusError, match=r'^"data" cannot be sent'):
        cmd.check_payload(nested(251))
    with pytest.raises(PlexusError, match=r'^"info" cannot be sent'):
        cmd.check_payload(nested(251), "info")


def test_check_payload_encodes_once_and_refuses_what_json_cannot_carry() -> None:
    # The validation's encoding is the one every engine stores and ships.
    assert cmd.check_payload({"a": 1}) == b'{"a":1}'
    assert cmd.check_payload(b"\x00\x01") == b'{"$bytes":"AAE="}'
    with pytest.raises(PlexusError) as info:
        cmd.check_payload({1: "not a string key"}, "info")
    assert info.value.code == "bad_request"
    assert info.value.message.startswith('"info" cannot be sent as JSON')
    with pytest.raises(PlexusError) as info:
        encode_data({1: "not a string key"})  # a publication's payload
    assert info.value.message.startswith('"data" cannot be sent as JSON')


@pytest.mark.parametrize("key", ["", "x" * 65, 5, ["k"], {"k": 1}, True])
def test_idempotency_key_must_be_a_short_string(key: object) -> None:
    message = {"type": "publish", "channel": "c", "data": 1, "idempotency_key": key}
    with pytest.raises(PlexusError) as info:
        cmd.parse_command(message)
    assert info.value.code == "bad_request"
    assert "idempotency_key" in info.value.message
    assert cmd.parse_command({**message, "idempotency_key": "x" * 64}).idempotency_key == "x" * 64  # type: ignore[attr-defined]
    assert cmd.parse_command({**message, "idempotency_key": "k"}).idempotency_key == "k"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"id": 5}, 5),
        ({"id": "x" * 64}, "x" * 64),
        ({"id": "x" * 65}, None),
        ({"id": True}, None),
        ({"id": 1.0}, None),
        ({}, None),
        ([], None),
    ],
)
def test_command_id_is_read_without_raising(message: Any, expected: Any) -> None:
    assert cmd.command_id(message) == expected


def test_reply_and_error_shapes() -> None:
    assert cmd.reply(7, {"offset": 1}) == {"type": "reply", "id": 7, "result": {"offset": 1}}
    assert cmd.error(7, "bad_request", "why") == {
        "type": "error",
        "id": 7,
        "code": "bad_request",
        "message": "why",
    }
    # Without a usable id the error carries none (not "id": null).
    assert cmd.error(None, "bad_request", "why") == {
        "type": "error",
        "code": "bad_request",
        "message": "why",
    }
    assert cmd.error(0, "internal", "")["id"] == 0
