"""What the application is asked and what it may answer: the calls of `shared/spec/proxy.md`.

Pure: no I/O. A proxy sends a request's `body()` as JSON; a hook gets the
request object itself (the same fields as attributes, and the forwarded
`headers`). Both answer `{"result": {...}}` or `{"error": {"code", "message"}}`,
which `accepted` checks, call by call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from plexus.exceptions import PlexusError
from plexus.protocol.codes import ErrorCode

CALLS: Final = ("connect", "refresh", "subscribe", "publish", "rpc")
# A connect refusal may also say the session expired: the client then gets 4002.
TOKEN_EXPIRED: Final = "token_expired"
_CODES: Final = frozenset(code.value for code in ErrorCode)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a connection is, from a verified token or the application's connect answer.

    Attributes:
        user: the `sub` claim, or the connect answer's `user`; None for anonymous.
        expires_at: when the identity expires (Unix seconds), or None for never.
        info: the `info` claim or answer (any JSON value), shown to others in
            presence and join/leave.
        channels: channels the server subscribes the connection to on connect
            (the `channels` claim or answer). Empty for subscription tokens.
        claims: every claim of the token (empty when the application decided).
        session: True when the application's connect call decided: at
            `expires_at` the refresh call is asked (a JWT instead waits for `auth`).
    """

    user: str | None
    expires_at: float | None
    info: Any
    channels: tuple[str, ...]
    # Not compared nor shown: two tokens for the same identity are the same credentials.
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    session: bool = False


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the WebSocket upgrade said that later calls pass on.

    Attributes:
        headers: the upgrade's request headers named in `proxy_headers`.
        data: the upgrade URL's `data` query parameter, if any.
    """

    headers: Mapping[str, str]
    data: str | None = None


class Refused(PlexusError):
    """The application said no: the command's error, or the connection's close.

    Not the client's fault in the protocol's sense: it never counts as a bad command.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        # A connect refusal may carry `token_expired`, which is no command error code.
        self.code = ErrorCode(code) if code in _CODES else ErrorCode.UNAUTHORIZED
        self.reason = code


class BadAnswer(Exception):
    """An answer that is not what the contract allows (logged; the call failed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """Fields every call carries. Hooks get this object; proxies its `body()` as JSON."""

    call: ClassVar[str] = ""
    client: str
    protocol: str  # json or msgpack
    user: str | None = None
    transport: str = "websocket"
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """The JSON body of the proxy call (the headers travel as HTTP headers)."""
        body: dict[str, Any] = {
            "client": self.client,
            "transport": self.transport,
            "protocol": self.protocol,
        }
        if self.user is not None:
            body["user"] = self.user
        body.update(self.extra())
        return body

    def extra(self) -> dict[str, Any]:
        """The call's own fields."""
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest(Request):
    """A WebSocket connection without a JWT: who is it?"""

    call: ClassVar[str] = "connect"
    data: str | None = None

    def extra(self) -> dict[str, Any]:
        return {} if self.data is None else {"data": self.data}


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshRequest(Request):
    """A connection the application admitted reached its `expire_at`: still valid?"""

    call: ClassVar[str] = "refresh"


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeRequest(Request):
    """May this connection subscribe to `channel`?"""

    call: ClassVar[str] = "subscribe"
    channel: str
    info: Any = None
    since: Mapping[str, Any] | None = None

    def extra(self) -> dict[str, Any]:
        return {"channel": self.channel, "info": self.info, "since": self.since}


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishRequest(Request):
    """May this connection publish `data` to `channel` (and in what form)?"""

    call: ClassVar[str] = "publish"
    channel: str
    data: Any = None

    def extra(self) -> dict[str, Any]:
        return {"channel": self.channel, "data": self.data}


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcRequest(Request):
    """What does the application answer to this `rpc`?"""

    call: ClassVar[str] = "rpc"
    method: str
    data: Any = None

    def extra(self) -> dict[str, Any]:
        return {"method": self.method, "data": self.data}


def accepted(call: str, answer: Any) -> dict[str, Any]:
    """The `result` of an answer to `call`, checked.

    Raises:
        Refused: the answer is an `error` with a code the call may give.
        BadAnswer: anything else the contract does not allow.
    """
    if not isinstance(answer, dict):
        raise BadAnswer(f"answer is {type(answer).__name__}, not an object")
    if "error" in answer:
        error = answer["error"]
        if not isinstance(error, dict):
            raise BadAnswer('"error" is not an object')
        code, message = error.get("code"), error.get("message", "refused by the application")
        allowed = _CODES | {TOKEN_EXPIRED} if call in ("connect", "refresh") else _CODES
        if not isinstance(code, str) or code not in allowed:
            raise BadAnswer(f"error code {code!r} is not one of the protocol's")
        if not isinstance(message, str):
            raise BadAnswer('"error.message" is not a string')
        raise Refused(code, message)
    result = answer.get("result")
    if not isinstance(result, dict):
        raise BadAnswer('neither "result" nor "error" is an object')
    _CHECKS[call](result)
    return result


def _expire_at(result: dict[str, Any]) -> None:
    value = result.get("expire_at")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadAnswer('"expire_at" is not a number of Unix seconds')


def _check_connect(result: dict[str, Any]) -> None:
    user = result.get("user")
    if user is not None and not isinstance(user, str):
        raise BadAnswer('"user" is not a string')
    _expire_at(result)
    channels = result.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise BadAnswer('"channels" is not a list of strings')


def _check_refresh(result: dict[str, Any]) -> None:
    expired = result.get("expired", False)
    if not isinstance(expired, bool):
        raise BadAnswer('"expired" is not a boolean')
    _expire_at(result)
    if not expired and result.get("expire_at") is None:
        raise BadAnswer('neither "expire_at" nor "expired": true')


def _nothing(result: dict[str, Any]) -> None:
    pass


_CHECKS: Final = {
    "connect": _check_connect,
    "refresh": _check_refresh,
    "subscribe": _nothing,
    "publish": _nothing,
    "rpc": _nothing,
}


def credentials_from(result: dict[str, Any]) -> Credentials:
    """The identity a connect answer gives (already checked by `accepted`)."""
    expire_at = result.get("expire_at")
    return Credentials(
        user=result.get("user") or None,
        expires_at=None if expire_at is None else float(expire_at),
        info=result.get("info"),
        channels=tuple(result.get("channels", ())),
        session=True,
    )
