"""Wire encodings: JSON in text frames and MessagePack in binary frames.

Payloads may hold raw bytes. MessagePack carries them natively; JSON carries
them as `{"$bytes": "<base64>"}`, in both directions, so a JSON client and a
MessagePack client can exchange binary data.

A map whose only key is `$bytes` means bytes in every encoding: a MessagePack
client that sends one gets it decoded on input too, so that what JSON clients
would read as bytes is bytes for everyone. A map with other keys beside
`$bytes` is an ordinary object in every encoding.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any, Final

import msgpack
import orjson

from plexus.exceptions import BadRequest

JSON_SUBPROTOCOL: Final = "plexus.v1.json"
MSGPACK_SUBPROTOCOL: Final = "plexus.v1.msgpack"
SUBPROTOCOLS: Final = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9

_BYTES_KEY: Final = "$bytes"


def build_frame(payload: bytes, opcode: int) -> bytes:
    """Return one complete, unmasked, unfragmented server-to-client WebSocket frame.

    Written by hand (RFC 6455 section 5.2, ten lines) because fan-out sends the
    same frame to many sockets: aiohttp's writer builds a new frame per send
    and offers no way to pre-build one. The reading side stays aiohttp's.
    """
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def frame_payload(frame: bytes) -> bytes:
    """The payload of a frame made by `build_frame` (for consumers that are not sockets)."""
    length = frame[1] & 0x7F
    return frame[2 if length < 126 else 4 if length == 126 else 10 :]


def close_frame(code: int, reason: str = "") -> bytes:
    """Return a close frame carrying `code` and a UTF-8 `reason` (cut to fit 125 bytes)."""
    encoded = reason.encode("utf-8")
    if len(encoded) > 123:
        # Cut at a character boundary: a reason that is not valid UTF-8 makes
        # the client fail the connection (RFC 6455 section 8.1) and lose the code.
        encoded = encoded[:123].decode("utf-8", "ignore").encode("utf-8")
    return build_frame(struct.pack("!H", code) + encoded, OP_CLOSE)


PING_FRAME: Final = build_frame(b"", OP_PING)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _unwrap_bytes(value: Any) -> Any:
    """Replace every `{"$bytes": base64}` object inside `value` by the bytes it holds."""
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES_KEY in value:
            encoded = value[_BYTES_KEY]
            if not isinstance(encoded, str):
                raise BadRequest('"$bytes" must hold a base64 string')
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest('"$bytes" holds invalid base64') from None
        return {key: _unwrap_bytes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unwrap_bytes(item) for item in value]
    return value


def _unwrap_decoded(value: Any) -> Any:
    """`_unwrap_bytes` on a decoded message; a refusal keeps the message for its `id`."""
    try:
        return _unwrap_bytes(value)
    except BadRequest as exc:
        raise UndecodableBytes(exc.message, value) from None
    except RecursionError:
        # orjson parses up to 1024 levels, deeper than Python's stack allows
        # the recursive walk to go.
        raise UndecodableBytes("nested too deeply", value) from None


class UndecodableBytes(BadRequest):
    """A JSON message that parsed but whose `{"$bytes": ...}` objects cannot be decoded.

    Carries the parsed message as `decoded`, so that the error answer can still
    echo the command's `id` (every command with an id gets exactly one answer).
    """

    def __init__(self, message: str, decoded: Any) -> None:
        super().__init__(message)
        self.decoded = decoded


class Codec:
    """One encoding: how messages become frames and frames become messages."""

    __slots__ = ("binary", "name", "opcode")

    def __init__(self, name: str, *, binary: bool) -> None:
        self.name = name
        self.binary = binary
        self.opcode = OP_BINARY if binary else OP_TEXT

    def encode(self, message: dict[str, Any]) -> bytes:
        """Serialise one protocol message to the frame payload."""
        raise NotImplementedError

    def decode(self, payload: str | bytes) -> Any:
        """Parse one frame payload. Raises BadRequest when it is not this encoding."""
        raise NotImplementedError

    def frame(self, message: dict[str, Any]) -> bytes:
        """Encode `message` and wrap it in a ready-to-write WebSocket frame."""
        return build_frame(self.encode(message), self.opcode)


class JsonCodec(Codec):
    """JSON objects in text frames; bytes travel as `{"$bytes": base64}`."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("json", binary=False)

    def encode(self, message: dict[str, Any]) -> bytes:
        return orjson.dumps(message, default=_json_default)

    def decode(self, payload: str | bytes) -> Any:
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"not valid JSON: {exc}") from None
        # Walking the tree costs; only messages that mention the marker need it.
        marker = '"$bytes"' if isinstance(payload, str) else b'"$bytes"'
        if marker in payload:  # type: ignore[operator]
            value = _unwrap_decoded(value)
        return value


class MsgpackCodec(Codec):
    """MessagePack maps in binary frames; bytes are MessagePack bin."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("msgpack", binary=True)

    def encode(self, message: dict[str, Any]) -> bytes:
        return msgpack.packb(message, use_bin_type=True)

    def decode(self, payload: str | bytes) -> Any:
        if isinstance(payload, str):
            raise BadRequest("a plexus.v1.msgpack connection sends binary frames")
        try:
            value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            # Some of msgpack's errors carry no text (a reserved byte): name the error then.
            raise BadRequest(f"not valid MessagePack: {str(exc) or type(exc).__name__}") from None
        if b"$bytes" in payload:
            value = _unwrap_decoded(value)
        return value


JSON: Final = JsonCodec()
MSGPACK: Final = MsgpackCodec()
CODECS: Final = (JSON, MSGPACK)


def codec_for(subprotocol: str | None) -> Codec:
    """The codec a negotiated subprotocol selects (JSON when none was asked for)."""
    return MSGPACK if subprotocol == MSGPACK_SUBPROTOCOL else JSON


def encode_data(value: Any, name: str = "data") -> bytes:
    """Compact JSON of a client-given payload, checked to be sendable to every client.

    Published `data` and subscription `info` are sent again to others inside
    replies and pushes that wrap them up to four levels deep (a `history`
    reply: `{"result": {"messages": [{"data": VALUE}]}}`); orjson refuses more
    than 254 levels, so the value is encoded at that depth, inside four lists
    whose brackets are then cut off. This one encoding is both the check and
    the form every engine stores and ships: the payload is not encoded again.
    MessagePack input may also hold what JSON cannot carry (non-string map
    keys, extension types): refused here, before anything is stored.

    Raises:
        BadRequest: the value cannot be sent as JSON.
    """
    try:
        wrapped = orjson.dumps([[[[value]]]], default=_json_default)
    except (TypeError, orjson.JSONEncodeError):
        raise BadRequest(
            f'"{name}" cannot be sent as JSON: nested too deeply (over 250 levels),'
            " a non-string key or an extension type"
        ) from None
    return wrapped[4:-4]


def to_json_compatible(value: Any) -> Any:
    """Replace bytes inside `value` by `{"$bytes": base64}` objects (for the HTTP API)."""
    return orjson.loads(orjson.dumps(value, default=_json_default))


def json_loads_with_bytes(payload: bytes | str) -> Any:
    """Parse JSON text, turning `{"$bytes": base64}` objects into bytes."""
    return JSON.decode(payload)
