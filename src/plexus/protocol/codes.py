"""Error codes and WebSocket close codes of protocol version 1.

The values are the wire contract (`shared/spec/protocol.md`); clients branch on
them, so they never change meaning.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The `code` of an `error` message and of an HTTP API error body."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_CHANNEL = "invalid_channel"
    NOT_SUBSCRIBED = "not_subscribed"
    ALREADY_SUBSCRIBED = "already_subscribed"
    UNAUTHORIZED = "unauthorized"
    PERMISSION_DENIED = "permission_denied"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"
    INTERNAL = "internal"


# Errors that are the server's fault or a deliberate throttle: they never count
# towards the "repeated bad requests" limit that closes a connection with 4000.
NOT_COUNTED_AS_BAD = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL})

# HTTP status for each error code in the backend API.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.NOT_SUBSCRIBED: 400,
    ErrorCode.ALREADY_SUBSCRIBED: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class CloseCode(IntEnum):
    """WebSocket close codes. 4xxx codes tell the client whether to reconnect."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect (elsewhere)
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # the application that decides connections is unavailable
    BAD_REQUESTS = 4000  # repeated bad commands: fix the client
    UNAUTHORIZED = 4001  # do not reconnect with the same token
    TOKEN_EXPIRED = 4002  # refresh the token, then reconnect
    SLOW_CONSUMER = 4008  # reconnect and recover
    RATE_LIMITED = 4029  # reconnect after a pause
