"""Client commands: validation of decoded messages into typed commands, and replies.

Pure functions, no I/O: `parse_command` turns a decoded JSON/MessagePack value
into one of the command classes or raises a `PlexusError` carrying the
protocol error code. Unknown fields are ignored so that newer clients can talk
to older servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from plexus.channels import validate_channel
from plexus.exceptions import BadRequest, PlexusError, TooLarge
from plexus.protocol.codec import encode_data
from plexus.protocol.codes import ErrorCode

CommandId = int | str
# Commands and publications are plain (not frozen) dataclasses: a frozen one's
# __init__ sets each field through object.__setattr__, measurably slower on
# the per-message path. They are never mutated after construction.
MAX_ID_LENGTH: Final = 64
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 64
DEFAULT_HISTORY_LIMIT: Final = 100
MAX_HISTORY_LIMIT: Final = 10_000
# Offsets are stored as signed 64-bit integers (SQLite INTEGER); a larger
# `since.offset` can never match and is refused as ill-typed.
MAX_OFFSET: Final = 2**63 - 1


@dataclass(slots=True)
class Since:
    """A stream position a client has seen: recover what came after it."""

    offset: int
    epoch: str


@dataclass(slots=True)
class Command:
    """Base of every command; `id` is None when the client expects no reply."""

    id: CommandId | None


@dataclass(slots=True)
class Auth(Command):
    token: str


@dataclass(slots=True)
class Subscribe(Command):
    channel: str
    since: Since | None = None
    token: str | None = None
    info: Any = None
    has_info: bool = False


@dataclass(slots=True)
class Unsubscribe(Command):
    channel: str


@dataclass(slots=True)
class Publish(Command):
    channel: str
    data: Any
    raw: bytes = b"null"  # `data` as compact JSON: encoded once, when validated
    idempotency_key: str | None = None


@dataclass(slots=True)
class History(Command):
    channel: str
    since: Since | None = None
    limit: int = DEFAULT_HISTORY_LIMIT


@dataclass(slots=True)
class PresenceQuery(Command):
    channel: str


@dataclass(slots=True)
class Rpc(Command):
    method: str
    data: Any = None


@dataclass(slots=True)
class Ping(Command):
    pass


def command_id(message: Any) -> CommandId | None:
    """Return the message's `id` if it is a valid one, else None (never raises)."""
    if not isinstance(message, dict):
        return None
    value = message.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_ID_LENGTH):
        return value
    return None


def _channel(message: dict[str, Any]) -> str:
    value = message.get("channel")
    if not isinstance(value, str):
        raise BadRequest('"channel" must be a string')
    return validate_channel(value)


def parse_since(message: dict[str, Any]) -> Since | None:
    """The `since` position of a command or API body, or None; raises BadRequest."""
    value = message.get("since")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest('"since" must be an object {"offset": N, "epoch": E}')
    offset = value.get("offset")
    epoch = value.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise BadRequest('"since.offset" must be an integer from 0 to 2**63-1')
    if not isinstance(epoch, str):
        raise BadRequest('"since.epoch" must be a string')
    return Since(offset, epoch)


def parse_limit(message: dict[str, Any]) -> int:
    """The `limit` of a history request (default 100, capped); raises BadRequest."""
    limit = message.get("limit", DEFAULT_HISTORY_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise BadRequest('"limit" must be an integer >= 0')
    return min(limit, MAX_HISTORY_LIMIT)


def parse_idempotency_key(message: dict[str, Any]) -> str | None:
    """The `idempotency_key` of a publish: a string of 1 to 64 characters, or None."""
    key = message.get("idempotency_key")
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise BadRequest(
            f'"idempotency_key" must be a string of 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters'
        )
    return key


def _optional_str(message: dict[str, Any], key: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f'"{key}" must be a string')
    return value


def check_payload(value: Any, name: str = "data") -> bytes:
    """Raise BadRequest unless a client-given value can be sent to every client.

    Returns its compact JSON encoding (see `plexus.protocol.codec.encode_data`),
    which is the only time the value is encoded.
    """
    return encode_data(value, name)


def parse_command(message: Any, *, max_info_bytes: int = 1024) -> Command:
    """Validate one decoded client message.

    Raises:
        PlexusError: with code bad_request, unknown_type, invalid_channel or too_large.
    """
    if not isinstance(message, dict):
        raise BadRequest("a command must be an object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise BadRequest('"type" must be a string')
    raw_id = message.get("id")
    cid = command_id(message)
    if raw_id is not None and cid is None:
        raise BadRequest(f'"id" must be an integer or a string of at most {MAX_ID_LENGTH} chars')
    if kind == "publish":
        if "data" not in message:
            raise BadRequest('"publish" needs "data"')
        channel = _channel(message)
        raw = check_payload(message["data"])
        return Publish(cid, channel, message["data"], raw, parse_idempotency_key(message))
    if kind == "subscribe":
        channel = _channel(message)
        has_info = "info" in message and message["info"] is not None
        info = message.get("info")
        if has_info and len(check_payload(info, "info")) > max_info_bytes:
            raise TooLarge(f'"info" is over {max_info_bytes} bytes')
        return Subscribe(
            cid,
            channel,
            since=parse_since(message),
            token=_optional_str(message, "token"),
            info=info,
            has_info=has_info,
        )
    if kind == "unsubscribe":
        return Unsubscribe(cid, _channel(message))
    if kind == "ping":
        return Ping(cid)
    if kind == "history":
        return History(cid, _channel(message), parse_since(message), parse_limit(message))
    if kind == "presence":
        return PresenceQuery(cid, _channel(message))
    if kind == "rpc":
        method = message.get("method")
        if not isinstance(method, str) or not method or len(method) > 255:
            raise BadRequest('"method" must be a non-empty string of at most 255 chars')
        return Rpc(cid, method, message.get("data"))
    if kind == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest('"token" must be a non-empty string')
        return Auth(cid, token)
    raise PlexusError(f"unknown command type {kind[:64]!r}", ErrorCode.UNKNOWN_TYPE)


def reply(cid: CommandId, result: dict[str, Any]) -> dict[str, Any]:
    """The success answer to command `cid`."""
    return {"type": "reply", "id": cid, "result": result}


def error(cid: CommandId | None, code: str, message: str) -> dict[str, Any]:
    """The error answer to command `cid` (or to a command without a usable id)."""
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if cid is not None:
        out["id"] = cid
    return out
