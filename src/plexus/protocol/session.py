"""Per-connection protocol state, with no I/O: limits, counters and the decision to close.

The transport feeds it decoded-or-not payloads and a clock; it answers with
a command to execute, an error to send, or a close code. Everything a hostile
client can do to one connection is decided here and tested without a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plexus.exceptions import PlexusError
from plexus.protocol.codec import Codec, UndecodableBytes
from plexus.protocol.codes import NOT_COUNTED_AS_BAD, CloseCode, ErrorCode
from plexus.protocol.commands import (
    Command,
    History,
    PresenceQuery,
    Publish,
    Subscribe,
    Unsubscribe,
    command_id,
    error,
    parse_command,
)
from plexus.protocol.limits import EventWindow, TokenBucket


@dataclass(slots=True, frozen=True)
class Limits:
    """The per-connection limits from the settings."""

    max_info_bytes: int = 1024
    bad_command_limit: int = 20
    bad_command_window: float = 10.0
    publish_rate: float = 20.0
    publish_burst: int = 50
    subscribe_rate: float = 20.0
    subscribe_burst: int = 300
    rate_limit_disconnect: int = 200


@dataclass(slots=True)
class Outcome:
    """What to do with one incoming payload: run `command`, or send `error` (and maybe close)."""

    command: Command | None = None
    error: dict[str, Any] | None = None
    close: CloseCode | None = None


# Commands that make other clients' work (join/leave pushes, presence updates)
# or read stores: one budget for them, apart from publishes.
_READS = (Subscribe, Unsubscribe, History, PresenceQuery)


class SessionState:
    """Validation and abuse limits of one connection.

    Publishes draw on one token bucket (`publish_rate`); subscribe,
    unsubscribe, history and presence on another (`subscribe_rate`), so that
    a client cannot flood subscribers with join/leave or the stores with
    reads. Beyond either, the command is answered `rate_limited`; more than
    `rate_limit_disconnect` such answers within the window close with 4029.
    """

    __slots__ = ("_bad", "_bucket", "_rate_limited", "_reads", "codec", "limits")

    def __init__(self, codec: Codec, limits: Limits, now: float) -> None:
        self.codec = codec
        self.limits = limits
        self._bad = EventWindow(limits.bad_command_limit, limits.bad_command_window)
        self._bucket = TokenBucket(limits.publish_rate, limits.publish_burst, now)
        # Made at the first such command (full, as it would be by then): an
        # idle connection holds one object less.
        self._reads: TokenBucket | None = None
        # "More than N rate_limited answers" closes: the (N+1)-th one.
        self._rate_limited = EventWindow(
            limits.rate_limit_disconnect + 1, limits.bad_command_window
        )

    def receive(self, payload: str | bytes, now: float) -> Outcome:
        """Decode and validate one WebSocket message."""
        message: Any = None
        try:
            message = self.codec.decode(payload)
            command = parse_command(message, max_info_bytes=self.limits.max_info_bytes)
        except PlexusError as exc:
            if isinstance(exc, UndecodableBytes):
                message = exc.decoded
            return self.failed(command_id(message), exc.code, exc.message, now)
        if isinstance(command, Publish):
            if not self._bucket.allow(now):
                return self.failed(command.id, ErrorCode.RATE_LIMITED, "publish rate exceeded", now)
        elif isinstance(command, _READS):
            reads = self._reads
            if reads is None:
                limits = self.limits
                reads = self._reads = TokenBucket(
                    limits.subscribe_rate, limits.subscribe_burst, now
                )
            if not reads.allow(now):
                message = "subscribe/unsubscribe/history/presence rate exceeded"
                return self.failed(command.id, ErrorCode.RATE_LIMITED, message, now)
        return Outcome(command=command)

    def failed(
        self, cid: Any, code: ErrorCode, message: str, now: float, *, counted: bool = True
    ) -> Outcome:
        """Account for a command that failed with `code`; return the error and any close.

        `counted=False`: not a bad command whatever the code (the application
        refused it, or an `rpc` handler answered an error).
        """
        outcome = Outcome(error=error(cid, code.value, message))
        if code is ErrorCode.RATE_LIMITED:
            if self._rate_limited.hit(now):
                outcome.close = CloseCode.RATE_LIMITED
        elif counted and code not in NOT_COUNTED_AS_BAD and self._bad.hit(now):
            outcome.close = CloseCode.BAD_REQUESTS
        return outcome
