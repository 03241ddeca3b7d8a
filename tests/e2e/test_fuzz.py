"""End-to-end fuzzing: 10,000 hostile commands against one live server process.

Hypothesis generates the commands up front, derandomized, so every run sends
the same ones: ill-typed fields, unknown fields and types, huge and malformed
numbers, deep nesting, invalid escapes (`\\ud800`), binary frames where text is
expected, random bytes, MessagePack oddities (bytes keys, extension types),
frames just under and over the size limit. They are sent one at a time, each
followed by a sentinel `ping`, so that every answer can be matched to the
command that caused it. The test holds the server to the spec:

- every command with a valid `id` gets exactly one answer with that id, a
  `reply` (`pong` for `ping`) or an `error` with a spec error code (never
  `internal`); a command without one gets at most an `error` without id;
- a connection closes only as documented: 4000 after 20 bad commands (the
  fuzzer then reconnects), 1009 for a message over 64 KiB, 1007 for a text
  frame that is not UTF-8;
- bystanders subscribed meanwhile receive every message of their channel,
  in offset order, with no gap, while an API publisher and the fuzzer itself
  publish to it;
- afterwards the process still answers `/health` and logged no ERROR nor
  traceback.

The same 10,000 messages go over SSE too (`test_fuzzed_commands_over_sse`):
each is spliced as it is into a `POST /emulation` body with its sentinel
behind it (a MessagePack one as the JSON it maps to, `$bytes` for bytes, or
as raw bytes when there is none). A body that is not JSON, or a command that
cannot be encoded again (nested over 254 levels), must be refused whole with
400 and leave no trace on the stream; a command over 64 KiB is refused with
413 and closes the stream with 1009; every other POST is answered 204 and its
answers must come on the stream exactly as on a WebSocket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from plexus.auth import make_token
from plexus.client import Client
from plexus.protocol.codec import MSGPACK_SUBPROTOCOL
from plexus.protocol.commands import command_id
from tests.helpers import TIMEOUT, EventStream, ServerProcess

TOTAL: Final = 10_000
BATCH: Final = 25  # commands per Hypothesis example
MAX_MESSAGE: Final = 64 * 1024
BAD_COMMAND_LIMIT: Final = 20
SECRET: Final = "fuzzing-secret-that-is-long-enough-0123456789"
BYSTANDER_CHANNEL: Final = "chat:bystander"
SPEC_CODES: Final = frozenset(
    {
        "bad_request",
        "unknown_type",
        "invalid_channel",
        "not_subscribed",
        "already_subscribed",
        "unauthorized",
        "permission_denied",
        "too_large",
        "rate_limited",
        "unavailable",
        "not_found",
        "internal",
    }
)
NOT_COUNTED_AS_BAD: Final = frozenset({"rate_limited", "unavailable", "internal"})
PUSHES: Final = frozenset({"message", "join", "leave", "unsubscribed"})
CONFIG: Final = """
publish_rate = 0
subscribe_rate = 0
[namespaces.secret]
private = true
allow_publish = true
presence = true
join_leave = true
history_size = 10
recovery = true
"""

# ----- what to send


@dataclass(frozen=True, slots=True)
class Fuzzed:
    """One WebSocket message to send, and what the spec says must follow."""

    codec: str  # which connection: "json" or "msgpack"
    text: bool  # a text frame (else binary)
    payload: bytes
    expect_id: int | str | None  # the id the answer must carry, None for none
    expect_close: int | None  # a close the message must cause
    kind: Any  # the decoded `type`, when there is one


def decode_like_the_spec(codec: str, text: bool, payload: bytes) -> Any:
    """The message a conforming server reads from this frame, or None if it cannot."""
    try:
        if codec == "json":
            return orjson.loads(payload)
        if text:
            return None  # a MessagePack connection sends binary frames
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None


def fuzzed(codec: str, payload: bytes, *, text: bool) -> Fuzzed:
    close = None
    if len(payload) > MAX_MESSAGE:
        close = 1009
    elif text:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            close = 1007
    message = None if close else decode_like_the_spec(codec, text, payload)
    kind = message.get("type") if isinstance(message, dict) else None
    return Fuzzed(codec, text, payload, command_id(message), close, kind)


# Sentinel ids start with "~", which generated string ids never contain.
def sentinel(number: int) -> str:
    return f"~{number}"


TOKENS: Final = [
    make_token(SECRET, user="alice"),
    make_token(SECRET, user="bob", info={"role": "x"}),
    make_token(SECRET, user="alice", ttl=-60),
    make_token("wrong-secret-that-is-long-enough-0123456789", user="alice"),
    make_token(SECRET, user="alice", channel="secret:room"),
    make_token(SECRET, user="", channel="secret:room"),
    make_token(SECRET, user="mallory", channels=["#alice", "secret:room"]),
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
    "garbage",
]
CHANNELS: Final = [
    BYSTANDER_CHANNEL,
    "chat:fuzz",
    "chat:other",
    "news",
    "#alice",
    "#bob",
    "#",
    "secret:room",
    "",
    "x" * 255,
    "x" * 256,
    "chat:ü",
    "a b",
    "chat:\u0000",
]
TYPES: Final = [
    "subscribe",
    "unsubscribe",
    "publish",
    "history",
    "presence",
    "rpc",
    "ping",
    "auth",
    "welcome",
    "reply",
    "error",
    "PUBLISH",
    "",
]
NUMBER_LITERALS: Final = [
    "1e400",
    "-1e400",
    "123456789012345678901234567890",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "1e-400",
    "-0",
    "0.0",
    "1E2",
    "NaN",
    "Infinity",
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
]
STRING_LITERALS: Final = [
    '"\\ud800"',
    '"\\udfff"',
    '"a\\ud800\\u0041"',
    '"\\ud83d\\ude00"',
    '"\\u0000"',
    '"\\uffff"',
    '"\\x41"',
    '"\\u12"',
    '"\\',
    '"tab\there"',
    '"\\/"',
]
PLACEHOLDER: Final = "\u2063PLACEHOLDER\u2063"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
# Two levels at most: Hypothesis draws each recursive value slowly, and deep
# nesting has its own generator (`deep_commands`).
json_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), st.lists(scalars, max_size=2), max_size=2),
)
valid_ids = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="~"), max_size=64),
)
invalid_ids = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(min_size=65, max_size=70),
    st.lists(st.integers(), max_size=2),
    st.just({}),
)
ids = st.one_of(valid_ids, valid_ids, invalid_ids)
channels = st.one_of(
    st.sampled_from(CHANNELS),
    st.text("abcXYZ019_-:.@#/=", min_size=1, max_size=20),
    st.text(max_size=8),
    json_values,
)
since = st.one_of(
    st.fixed_dictionaries(
        {"offset": st.integers(min_value=-2, max_value=2**64), "epoch": st.text(max_size=8)}
    ),
    json_values,
)
FIELDS: Final = {
    "channel": channels,
    "data": json_values,
    "since": since,
    "limit": st.one_of(st.integers(min_value=-5, max_value=2**64), json_values),
    "token": st.one_of(st.sampled_from(TOKENS), json_values),
    "info": json_values,
    "method": st.one_of(st.text(max_size=300), json_values),
}


FIELD_NAMES: Final = st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)


@st.composite
def hostile_commands(draw: st.DrawFn) -> dict[str, Any]:
    """A command-like object: mostly a known `type` and an id, some fields, ill-typed or not."""
    odd = draw(st.integers(0, 9)) == 0
    kind = draw(json_values if odd else st.sampled_from(TYPES))
    message: dict[str, Any] = {} if odd and draw(st.booleans()) else {"type": kind}
    if draw(st.integers(0, 7)) > 0:
        message["id"] = draw(ids)
    if kind in ("subscribe", "unsubscribe", "publish", "history", "presence"):
        message["channel"] = draw(st.sampled_from(CHANNELS))
    if kind == "publish":
        message["data"] = draw(json_values)
    for name in draw(FIELD_NAMES):
        message[name] = draw(FIELDS[name])
    if draw(st.integers(0, 4)) == 0:
        message.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return message


GOOD_CHANNELS: Final = [
    BYSTANDER_CHANNEL,
    "chat:fuzz",
    "chat:other",
    "news",
    "#alice",
    "secret:room",
]
good_since = st.fixed_dictionaries(
    {"offset": st.integers(0, 50), "epoch": st.sampled_from(["", "x", "stale-epoch"])}
)
GOOD_FIELDS: Final = {
    "subscribe": {"since": good_since, "info": json_values, "token": st.sampled_from(TOKENS)},
    "history": {"since": good_since, "limit": st.integers(0, 200)},
    "rpc": {"data": json_values},
}


@st.composite
def good_commands(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed command (that may still be refused): the real code paths run too."""
    kind = draw(st.sampled_from(TYPES[:8]))
    message: dict[str, Any] = {"type": kind, "id": draw(valid_ids)}
    if kind in ("subscribe", "unsubscribe", "publish", "history", "presence"):
        message["channel"] = draw(st.sampled_from(GOOD_CHANNELS))
    if kind == "publish":
        message["data"] = draw(json_values)
    if kind == "rpc":
        message["method"] = draw(st.text(min_size=1, max_size=20))
    if kind == "auth":
        message["token"] = draw(st.sampled_from(TOKENS))
    optional = GOOD_FIELDS.get(kind, {})
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)) if optional else ():
        message[name] = draw(optional[name])
    if draw(st.integers(0, 4)) == 0:
        message["unknown_field"] = draw(json_values)  # ignored, for newer clients
    return message


command_dicts = st.one_of(hostile_commands(), good_commands())


def dumps(message: Any, *, ascii_only: bool = False) -> bytes:
    return json.dumps(message, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def clamp(value: Any) -> Any:
    """`value` with integers cut to MessagePack's range (-2**63 .. 2**64-1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return max(-(2**63), min(value, 2**64 - 1))
    if isinstance(value, list):
        return [clamp(v) for v in value]
    if isinstance(value, dict):
        return {k: clamp(v) for k, v in value.items()}
    return value


def framings(message: dict[str, Any]) -> list[Fuzzed]:
    """One generated command, sent three ways: JSON in a text frame, JSON in a binary
    frame (binary where text is expected), MessagePack on a MessagePack connection."""
    payload = dumps(message, ascii_only=len(message) % 2 == 0)
    return [
        fuzzed("json", payload, text=True),
        fuzzed("json", payload, text=False),
        fuzzed("msgpack", msgpack.packb(clamp(message), use_bin_type=True), text=False),
    ]


@st.composite
def spliced_commands(draw: st.DrawFn) -> list[Fuzzed]:
    """A JSON command with a raw literal spliced in: huge or malformed numbers, escapes
    like `\ud800` that are no Unicode text, invalid escapes."""
    message = draw(command_dicts)
    literals = NUMBER_LITERALS if draw(st.booleans()) else STRING_LITERALS
    message[draw(st.sampled_from([*sorted(message), "data"]))] = PLACEHOLDER
    raw = dumps(message).replace(dumps(PLACEHOLDER), draw(st.sampled_from(literals)).encode())
    return [fuzzed("json", raw, text=True), fuzzed("json", raw, text=False)]


msgpack_scalars = st.one_of(
    scalars,
    st.binary(max_size=8),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
)
msgpack_values = st.one_of(
    msgpack_scalars,
    st.lists(msgpack_scalars, max_size=3),
    st.dictionaries(
        st.one_of(st.text(max_size=4), st.binary(max_size=4)), msgpack_scalars, max_size=3
    ),
)


@st.composite
def msgpack_commands(draw: st.DrawFn) -> list[Fuzzed]:
    """MessagePack oddities: bytes, bytes keys, extension types; text frames."""
    message: Any = draw(command_dicts)
    message["data" if draw(st.booleans()) else "info"] = draw(msgpack_values)
    if draw(st.integers(0, 9)) == 0:
        message = draw(msgpack_values)
    packed = msgpack.packb(clamp(message), use_bin_type=True)
    found = [fuzzed("msgpack", packed, text=False)]
    if draw(st.integers(0, 9)) == 0:
        found.append(
            fuzzed("msgpack", repr(message).encode("ascii", "backslashreplace"), text=True)
        )
    return found


@st.composite
def deep_commands(draw: st.DrawFn) -> list[Fuzzed]:
    """Nesting around the parsers' and encoders' limits (250, 254, 1024 levels)."""
    depth = draw(st.sampled_from([50, 248, 250, 251, 254, 255, 256, 600, 990, 1023, 1024, 1025]))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    core = draw(st.sampled_from(['{"$bytes":"AAE="}', "0", '{"$bytes":5}']))
    nested = opening * depth + core + closing * depth
    where = draw(st.sampled_from(["data", "data", "info", "since", "whole", "channel", "id"]))
    kind = "subscribe" if where == "info" else "publish"
    channel = draw(st.sampled_from(["chat:fuzz", BYSTANDER_CHANNEL]))
    cid = draw(st.integers(0, 10**6))
    if where == "whole":
        text = nested
    else:
        text = f'{{"type":"{kind}","id":{cid},"channel":"{channel}","{where}":{nested}}}'
    return [fuzzed("json", text.encode(), text=True)]


@st.composite
def raw_frames(draw: st.DrawFn) -> list[Fuzzed]:
    """Random bytes and text, and JSON values that are not objects."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return [fuzzed("json", draw(st.binary(max_size=64)), text=False)]
    if choice == 1:
        return [fuzzed("json", draw(st.text(max_size=64)).encode(), text=True)]
    if choice == 2:
        return [fuzzed("json", dumps(draw(json_values)), text=True)]
    return [fuzzed("msgpack", draw(st.binary(max_size=64)), text=False)]


def edge_frames() -> list[Fuzzed]:
    """Closes by design: sizes around the 64 KiB limit, text frames that are not UTF-8."""
    found = []
    head = b'{"type":"publish","id":1,"channel":"chat:fuzz","data":"'
    for size in (MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1, 100_000):
        for text in (True, False):
            found.append(fuzzed("json", head + b"x" * (size - len(head) - 2) + b'"}', text=text))
    for bad in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"):
        found.append(fuzzed("json", b'{"type":"ping","id":1,"x":"' + bad + b'"}', text=True))
    return found


def draw_many(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` values of `strategy`, the same on every run (Hypothesis, derandomized)."""
    found: list[Any] = []

    @settings(
        max_examples=count // BATCH + 1,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(strategy, min_size=BATCH, max_size=BATCH, unique_by=repr))
    def collect(batch: list[Any]) -> None:
        found.extend(batch)

    collect()
    return found[:count]


def generate(total: int) -> list[Fuzzed]:
    """`total` messages in a fixed mixed order: each generated command in three framings,
    spliced literals, MessagePack oddities, deep nesting, raw bytes and the edge cases."""
    found: list[Fuzzed] = []
    found += [f for m in draw_many(command_dicts, total * 20 // 100) for f in framings(m)]
    for strategy, share in (
        (spliced_commands(), 10),
        (msgpack_commands(), 10),
        (raw_frames(), 10),
        (deep_commands(), 3),
    ):
        found += [f for group in draw_many(strategy, total * share // 100) for f in group]
    edges = edge_frames()
    assert len(found) + len(edges) >= total, f"Hypothesis generated only {len(found)} messages"
    # Interleave good and bad commands (and the codecs) in a fixed order.
    shuffle = random.Random(20260101).shuffle
    shuffle(found)
    found = found[: total - len(edges)] + edges
    shuffle(found)
    return found


# ----- how to send it


@dataclass
class Stats:
    sent: int = 0
    answered: int = 0
    replies: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[int, int] = field(default_factory=dict)
    pushes: int = 0


class FuzzConnection:
    """One fuzzing connection, reopened whenever the server closes it."""

    def __init__(self, session: aiohttp.ClientSession, url: str, codec: str) -> None:
        self.session = session
        self.url = url
        self.codec = codec
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.bad = 0  # bad commands answered on this connection

    async def open(self) -> aiohttp.ClientWebSocketResponse:
        protocols = (MSGPACK_SUBPROTOCOL,) if self.codec == "msgpack" else ()
        ws = await self.session.ws_connect(self.url, protocols=protocols, max_msg_size=0)
        welcome = self.decode(await ws.receive(timeout=TIMEOUT))
        assert welcome is not None
        assert welcome["type"] == "welcome"
        self.ws, self.bad = ws, 0
        return ws

    def decode(self, msg: aiohttp.WSMessage) -> dict[str, Any] | None:
        if msg.type is aiohttp.WSMsgType.TEXT:
            assert self.codec == "json", "a MessagePack connection got a text frame"
            decoded: dict[str, Any] = orjson.loads(msg.data)
            return decoded
        if msg.type is aiohttp.WSMsgType.BINARY:
            assert self.codec == "msgpack", "a JSON connection got a binary frame"
            unpacked: dict[str, Any] = msgpack.unpackb(msg.data, raw=False)
            return unpacked
        return None

    def encode(self, message: dict[str, Any]) -> tuple[bytes, bool]:
        if self.codec == "msgpack":
            return msgpack.packb(message), False
        return orjson.dumps(message), True

    async def send(self, payload: bytes, *, text: bool) -> None:
        assert self.ws is not None
        kind = aiohttp.WSMsgType.TEXT if text else aiohttp.WSMsgType.BINARY
        await self.ws.send_frame(payload, kind)

    async def run(self, item: Fuzzed, number: int, stats: Stats) -> None:
        """Send one fuzzed message and a sentinel ping; check everything that comes back."""
        ws = self.ws or await self.open()
        await self.send(item.payload, text=item.text)
        mark = sentinel(number)
        if item.expect_close is None:
            # Not after a message that closes: data sent to a socket the server
            # already closed makes it answer with a TCP reset, which can destroy
            # the close frame before the client has read it.
            ping, text = self.encode({"type": "ping", "id": mark})
            with contextlib.suppress(ConnectionResetError):
                await self.send(ping, text=text)
        stats.sent += 1
        answers: list[dict[str, Any]] = []
        closed: int | None = None
        while True:
            msg = await ws.receive(timeout=TIMEOUT)
            message = self.decode(msg)
            if message is None:
                closed = ws.close_code if msg.type is not aiohttp.WSMsgType.CLOSE else msg.data
                break
            kind = message.get("type")
            if kind in PUSHES:
                stats.pushes += 1
                continue
            if kind == "pong" and message.get("id") == mark:
                break
            answers.append(message)
        self.check(item, answers, closed, stats)
        if closed is not None:
            self.ws = None
            await ws.close()

    def check(
        self, item: Fuzzed, answers: list[dict[str, Any]], closed: int | None, stats: Stats
    ) -> None:
        where = f"after sending {item.payload[:200]!r}"
        for answer in answers:
            assert answer.get("type") in ("reply", "error", "pong"), (where, answer)
            if answer["type"] == "error":
                code = answer.get("code")
                assert code in SPEC_CODES, (where, answer)
                assert code != "internal", (where, answer)
                stats.errors[code] = stats.errors.get(code, 0) + 1
                if code not in NOT_COUNTED_AS_BAD:
                    self.bad += 1
            else:
                stats.replies += 1
            if answer["type"] == "pong":
                assert item.kind == "ping", (where, answer)
        stats.answered += len(answers)
        if item.expect_close is not None:
            assert (closed, answers) == (item.expect_close, []), where
        elif item.expect_id is not None:
            with_id = [a for a in answers if "id" in a]
            assert [a["id"] for a in with_id] == [item.expect_id], (where, answers)
            assert len(answers) == 1, (where, answers)
        else:
            assert len(answers) <= 1, (where, answers)
            assert all("id" not in a for a in answers), (where, answers)
        if closed is not None and item.expect_close is None:
            assert closed == 4000, (where, closed)
            assert self.bad >= BAD_COMMAND_LIMIT, (where, self.bad)
        if closed is not None:
            stats.closes[closed] = stats.closes.get(closed, 0) + 1


# ----- the same over SSE


def _bytes_as_json(value: Any) -> Any:
    """`bytes` as the protocol writes them in JSON; nothing else JSON lacks has a form."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    raise TypeError(type(value).__name__)


def over_sse(item: Fuzzed) -> bytes:
    """The command an SSE client posts for `item` (only JSON travels over SSE).

    JSON goes as it is, valid or not. A MessagePack message goes as the JSON
    it maps to (bytes as `$bytes`); one with no JSON form (bytes keys,
    extension types) or none at all goes as its raw bytes, a body that is
    not JSON.
    """
    if item.codec == "json":
        return item.payload
    message = None if item.text else decode_like_the_spec("msgpack", False, item.payload)
    if message is None:
        return item.payload
    try:
        return orjson.dumps(message, default=_bytes_as_json)
    except orjson.JSONEncodeError:
        return item.payload


def post_body(session: str, node: str, command: bytes, sentinel_ping: bytes) -> bytes:
    """A `POST /emulation` body with `command` spliced in as it is, the sentinel behind it."""
    head = orjson.dumps({"session": session, "node": node})[:-1]
    return head + b',"commands":[' + command + b"," + sentinel_ping + b"]}"


def expect_post(command: bytes, body: bytes) -> tuple[int, str | None, Fuzzed]:
    """What the spec makes of `body` (carrying `command`): the POST's status and
    error code, and what its stream must show, as a `Fuzzed` for `check`."""
    nothing = Fuzzed("json", True, command, None, None, None)
    try:
        commands = orjson.loads(body)["commands"]
        # The server hands each command on as a WebSocket message would
        # carry it: one it cannot write again refuses the whole POST.
        encoded = [orjson.dumps(c) for c in commands]
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return 400, "bad_request", nothing
    assert len(commands) == 2, f"{command[:200]!r} changed the shape of the body"
    if len(encoded[0]) > MAX_MESSAGE:
        return 413, "too_large", Fuzzed("json", True, command, None, 1009, None)
    message = commands[0]
    kind = message.get("type") if isinstance(message, dict) else None
    return 204, None, Fuzzed("json", True, command, command_id(message), None, kind)


class SseFuzzConnection(FuzzConnection):
    """The fuzzing client over SSE: one POST per command, answers read from the stream.

    The stream is reopened (a new session) whenever the server ends it.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        super().__init__(session, url, "json")
        self.stream: EventStream | None = None
        self.refused: dict[int, int] = {}  # POSTs refused whole, by status

    async def open_stream(self) -> EventStream:
        stream = EventStream(self.session, self.url)
        welcome = await stream.open()
        assert welcome["type"] == "welcome", welcome
        self.stream, self.bad = stream, 0
        return stream

    async def post(self, command: bytes, number: int, stats: Stats) -> None:
        """Post one command and a sentinel ping; check the answer and the stream."""
        stream = self.stream or await self.open_stream()
        mark = sentinel(number)
        ping = orjson.dumps({"type": "ping", "id": mark})
        body = post_body(stream.session, stream.welcome["node"], command, ping)
        status, code, item = expect_post(command, body)
        where = f"after posting {command[:200]!r}"
        got, answer = await stream.post_raw(body)
        stats.sent += 1
        assert got == status, (where, got, answer)
        if status != 204:
            assert answer["error"]["code"] == code, (where, answer)
            self.refused[status] = self.refused.get(status, 0) + 1
        if status == 400:
            # Nothing of a refused POST may reach the stream: the sentinel
            # alone comes first.
            assert await stream.post([{"type": "ping", "id": mark}]) == (204, None), where
        answers, closed = await self.read_until(stream, mark, stats)
        if status == 400:
            assert (answers, closed) == ([], None), where
        self.check(item, answers, closed, stats)
        if closed is not None:
            assert await stream.event() is None, "an event after the close event"
            stream.close()
            self.stream = None

    async def read_until(
        self, stream: EventStream, mark: str, stats: Stats
    ) -> tuple[list[dict[str, Any]], int | None]:
        """The answers before the sentinel's pong, or before the close event (and its code)."""
        answers: list[dict[str, Any]] = []
        while True:
            message = await stream.event()
            assert message is not None, "the stream ended without a close event"
            kind = message.get("type")
            if kind == "close":
                return answers, int(message["code"])
            if kind in PUSHES:
                stats.pushes += 1
            elif kind == "pong" and message.get("id") == mark:
                return answers, None
            else:
                answers.append(message)


# ----- the bystanders


class Bystanders:
    """Clients on `chat:bystander`, fed by an API publisher, checked for order and gaps."""

    def __init__(self, server: ServerProcess, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.clients: list[Client] = []
        self.start_offsets: list[int] = []
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        # Stops the publisher between two publishes: cancelling it could lose
        # one in flight after its `seq` was counted.
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Bystanders:
        for encoding in ("json", "msgpack"):
            client = await Client(self.server.ws_url, encoding=encoding, timeout=TIMEOUT).connect()
            sub = await client.subscribe(BYSTANDER_CHANNEL)
            self.clients.append(client)
            self.start_offsets.append(sub.result["offset"])
        self._task = asyncio.get_running_loop().create_task(self._publish_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in self.clients:
            await client.close()

    async def publish(self) -> None:
        self.seq += 1
        async with self.session.post(
            self.server.url + "/api/publish",
            json={"channel": BYSTANDER_CHANNEL, "data": {"seq": self.seq}},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response:
            assert response.status == 200, await response.text()

    async def _publish_forever(self) -> None:
        while not self._stop.is_set():
            await self.publish()
            with contextlib.suppress(TimeoutError):
                # Paces background traffic; wakes at once when told to stop.
                await asyncio.wait_for(self._stop.wait(), 0.01)

    async def verify(self) -> int:
        """Stop publishing, send a last message, and check what each bystander got."""
        assert self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, TIMEOUT)
        await self.publish()
        last = self.seq
        for client, offset in zip(self.clients, self.start_offsets, strict=True):
            assert client.close_code is None
            sub = client.subscriptions[BYSTANDER_CHANNEL]
            seqs: list[int] = []
            while not seqs or seqs[-1] != last:
                message = await sub.get(TIMEOUT, kind="message")
                offset += 1
                assert message["offset"] == offset, "a gap or a reordering"
                if "from" not in message:  # from the API publisher, not the fuzzer
                    seqs.append(message["data"]["seq"])
            assert seqs == list(range(1, last + 1))
        return last


class SseBystander:
    """An SSE stream on `chat:bystander`, read all along (one left unread is closed 4008)."""

    def __init__(self, server: ServerProcess, session: aiohttp.ClientSession) -> None:
        self.stream = EventStream(session, server.url)
        self.messages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # everything the stream brought
        self.offset = 0
        self._seen: dict[int, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SseBystander:
        await self.stream.open()
        subscribe = {"type": "subscribe", "id": 1, "channel": BYSTANDER_CHANNEL}
        assert await self.stream.post([subscribe]) == (204, None)
        reply = await self.stream.until(lambda m: m["type"] == "reply")
        self.offset = reply["result"]["offset"]
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.stream.close()

    async def _read(self) -> None:
        while True:
            message = await self.stream.event()
            assert message is not None, "the bystander's stream ended"
            self.events.append(message)
            if message["type"] == "message":
                self.messages.append(message)
                if "from" not in message:
                    seq = message["data"]["seq"]
                    self._seen.setdefault(seq, asyncio.Event()).set()

    async def verify(self, last: int) -> None:
        """Wait for the API's message `last`; check all came in offset order, none lost."""
        assert self._task is not None
        seen = self._seen.setdefault(last, asyncio.Event())
        waiter = asyncio.ensure_future(seen.wait())
        try:
            await asyncio.wait(
                [self._task, waiter], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        assert not self._task.done(), self._task.exception()
        assert seen.is_set(), f"message {last} never came over SSE"
        offsets = [m["offset"] for m in self.messages]
        assert offsets == list(range(self.offset + 1, self.offset + 1 + len(offsets))), (
            self.offset,
            [e for e in self.events if e["type"] != "message"],
            offsets[:5],
        )
        seqs = [m["data"]["seq"] for m in self.messages if "from" not in m]
        assert seqs == list(range(1, last + 1))


# ----- the test


@pytest.fixture(scope="module")
def commands() -> list[Fuzzed]:
    return generate(TOTAL)


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "plexus.toml"
    config.write_text(CONFIG)
    env = {"PLEXUS_JWT_SECRET": SECRET, "PLEXUS_DATA_DIR": str(tmp_path / "data")}
    server = ServerProcess(["--config", str(config)], env=env).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_generated_commands_cover_the_cases(commands: list[Fuzzed]) -> None:
    assert len(commands) == TOTAL
    assert len({(c.codec, c.text, c.payload) for c in commands}) > TOTAL * 0.8
    assert sum(c.codec == "msgpack" for c in commands) > TOTAL * 0.2
    assert sum(c.codec == "json" and not c.text for c in commands) > TOTAL * 0.2
    assert sum(c.codec == "msgpack" and c.text for c in commands) > 10
    assert sum(c.expect_id is not None for c in commands) > TOTAL * 0.15
    assert {c.expect_close for c in commands} == {None, 1007, 1009}
    assert sum(b"\\ud800" in c.payload for c in commands) > 20
    assert sum(b"[" * 200 in c.payload or b'{"a":' * 200 in c.payload for c in commands) > 100


async def assert_unharmed(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    """The server survived the fuzzing: still running, healthy, and nothing logged as an error."""
    async with http.get(server.url + "/health") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ok"
    assert server.proc is not None
    assert server.proc.poll() is None
    log = server.output()
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert " CRITICAL " not in log


async def test_fuzzed_commands(
    commands: list[Fuzzed], fuzz_server: ServerProcess, http: aiohttp.ClientSession
) -> None:
    stats = Stats()
    started = time.monotonic()
    conns = {
        codec: FuzzConnection(http, fuzz_server.ws_url, codec) for codec in ("json", "msgpack")
    }
    async with Bystanders(fuzz_server, http) as bystanders:
        for number, item in enumerate(commands):
            await conns[item.codec].run(item, number, stats)
        published = await bystanders.verify()
    for conn in conns.values():
        if conn.ws is not None:
            await conn.ws.close()
    await assert_unharmed(fuzz_server, http)
    elapsed = time.monotonic() - started
    assert stats.sent == TOTAL
    assert stats.closes.get(4000, 0) > 0  # the bad-command rule was exercised
    assert stats.replies > TOTAL * 0.05  # and so were the real commands
    print(
        f"\n{stats.sent} fuzzed commands in {elapsed:.1f}s: {stats.replies} replies,"
        f" errors {dict(sorted(stats.errors.items()))}, closes {stats.closes},"
        f" {stats.pushes} pushes; bystanders got {published} API messages in order"
    )


def test_posted_commands_cover_the_cases(commands: list[Fuzzed]) -> None:
    statuses: dict[int, int] = {}
    for item in commands:
        command = over_sse(item)
        body = post_body("session", "node", command, b'{"type":"ping","id":"~0"}')
        status, _, _ = expect_post(command, body)
        statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) == TOTAL
    assert statuses[204] > TOTAL * 0.5  # most reach the session
    assert statuses[400] > TOTAL * 0.1  # many are refused whole
    assert statuses[413] >= 4  # the edge sizes over 64 KiB


async def test_fuzzed_commands_over_sse(
    commands: list[Fuzzed], fuzz_server: ServerProcess, http: aiohttp.ClientSession
) -> None:
    stats = Stats()
    started = time.monotonic()
    conn = SseFuzzConnection(http, fuzz_server.url)
    # The SSE bystander first: it subscribes before the API publisher starts,
    # so it must get every one of its messages.
    async with (
        SseBystander(fuzz_server, http) as sse_bystander,
        Bystanders(fuzz_server, http) as bystanders,
    ):
        for number, item in enumerate(commands):
            await conn.post(over_sse(item), number, stats)
        published = await bystanders.verify()
        await sse_bystander.verify(published)
    if conn.stream is not None:
        conn.stream.close()
    await assert_unharmed(fuzz_server, http)
    elapsed = time.monotonic() - started
    assert stats.sent == TOTAL
    assert stats.closes.get(4000, 0) > 0
    assert stats.closes.get(1009, 0) >= 4
    assert stats.replies > TOTAL * 0.05
    print(
        f"\n{stats.sent} fuzzed commands over SSE in {elapsed:.1f}s: {stats.replies} replies,"
        f" errors {dict(sorted(stats.errors.items()))}, closes {stats.closes},"
        f" refused POSTs {conn.refused}, {stats.pushes} pushes;"
        f" bystanders got {published} API messages in order"
    )
