"""Typed errors. Each carries the protocol error code it is reported with."""

from __future__ import annotations

from plexus.protocol.codes import CloseCode, ErrorCode


class PlexusError(Exception):
    """Base class of every error Plexus reports to a client or API caller."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message


class BadRequest(PlexusError):
    """Malformed command: not JSON, not an object, missing or ill-typed field."""

    code = ErrorCode.BAD_REQUEST


class InvalidChannel(PlexusError):
    """A channel name outside the allowed alphabet or length."""

    code = ErrorCode.INVALID_CHANNEL


class PermissionDenied(PlexusError):
    """The caller is known but not allowed to do this."""

    code = ErrorCode.PERMISSION_DENIED


class Unauthorized(PlexusError):
    """The caller must authenticate (or re-authenticate) first."""

    code = ErrorCode.UNAUTHORIZED


class TooLarge(PlexusError):
    """A field or body over its size limit."""

    code = ErrorCode.TOO_LARGE


class Unavailable(PlexusError):
    """A broker or store is down; the caller should retry later."""

    code = ErrorCode.UNAVAILABLE


class RateLimited(PlexusError):
    """Too many attempts; the caller should wait before trying again."""

    code = ErrorCode.RATE_LIMITED


class NotFound(PlexusError):
    """No handler serves the requested RPC method."""

    code = ErrorCode.NOT_FOUND


class ConfigError(Exception):
    """An invalid setting; the message names the setting and why."""


class AuthError(Exception):
    """A refused token; `close_code` is 4001 (invalid) or 4002 (expired)."""

    def __init__(self, message: str, close_code: CloseCode = CloseCode.UNAUTHORIZED) -> None:
        super().__init__(message)
        self.close_code = close_code
