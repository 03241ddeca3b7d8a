"""The state of `plexus.client`, without I/O: subscriptions, backoff, token expiry.

`Subscription` is what `plexus.client.Client` hands to the app: an async
iterator over a channel's pushes that survives reconnects. The decisions on
what to deliver (each offset once, in order; a `lost` item where a gap cannot
be filled) live here, with the reconnect delays and the reading of a token's
expiry; the client only moves commands and answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plexus.client import Client

# `history` answers at most this many messages per request (the server's cap).
HISTORY_PAGE = 10_000

TokenSource = Callable[[], "str | Awaitable[str | None] | None"]
"""`get_token`: returns (or resolves to) a connection token, sync or async."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: attempt n waits a random time in [0, min(max, initial * 2**n)] s.

    Args:
        initial: the cap of the first attempt's delay, in seconds.
        max: the largest delay, in seconds.
        reset_after: seconds connected after which attempts count from 0 again.
    """

    initial: float = 0.5
    max: float = 20.0
    reset_after: float = 10.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The delay before reconnect attempt `attempt` (0-based): full jitter under the cap."""
        cap = min(self.max, self.initial * 2 ** min(attempt, 30))
        return float(rand() * cap)


def token_expiry(token: str | None) -> float | None:
    """The `exp` claim of a JWT (Unix seconds), or None; the signature is not checked.

    Only the server can check it; the client only wants to know when to ask
    for the next token.
    """
    if not token:
        return None
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


class PlexusClientError(Exception):
    """An `error` answer from the server; `code` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The connection ended; `code` is the WebSocket close code (None if unknown)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed with code {code}")
        self.code = code


class SubscriptionEnded(ConnectionClosed):
    """The subscription ended while the connection stays (the server's `unsubscribed`).

    A `ConnectionClosed` for compatibility: code that catches that keeps working.
    """

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, f"subscription ended: {reason}")
        self.code = None
        self.reason = reason


@dataclass(slots=True)
class Gap:
    """What a server-made subscription missed, read from `history` page by page.

    The server subscribed us without our `since` (e.g. again after a
    reconnect, from the token's `channels` claim), so it replays nothing: the
    messages after `since` up to `offset` are read with `history`, and live
    messages that come meanwhile are held, to be delivered after them.
    """

    channel: str
    since: dict[str, Any]  # the position we had
    offset: int  # where the server's subscription starts
    epoch: Any
    got: list[dict[str, Any]] = field(default_factory=list)  # read from history so far
    held: list[dict[str, Any]] = field(default_factory=list)  # live ones that came meanwhile

    def request(self) -> dict[str, Any]:
        """The next `history` command (without id)."""
        last = self.got[-1]["offset"] if self.got else self.since["offset"]
        return {
            "type": "history",
            "channel": self.channel,
            "since": {"offset": last, "epoch": self.since["epoch"]},
            "limit": min(HISTORY_PAGE, self.offset - last),
        }

    def take(self, request: dict[str, Any], page: dict[str, Any]) -> str:
        """Add a `history` answer to `request`: "complete", "more" (ask again) or "lost"."""
        if page.get("epoch", self.epoch) != self.since["epoch"]:
            return "lost"  # the stream restarted: what we missed is gone
        messages = page.get("messages") or []
        expected = request["since"]["offset"] + 1
        for message in messages:
            offset = message.get("offset")
            if not isinstance(offset, int) or offset < expected:
                continue
            if offset != expected:
                return "lost"  # trimmed from history
            self.got.append({**message, "channel": self.channel})
            expected += 1
        if expected > self.offset:
            return "complete"
        if messages and len(messages) >= request["limit"]:
            return "more"
        return "lost"


class Subscription:
    """Pushes of one channel (`message`, `join`, `leave`), as an async iterator.

    It lives across reconnects: the client resubscribes it with `since` and
    delivers every offset once, in order. Where that was impossible the
    stream holds a `{"type": "lost", "channel", "since", "offset", "epoch"}`
    item: what came between `since` and `offset` is gone (reload state, e.g.
    with `Client.history`); the messages after it follow.

    Attributes:
        channel: the channel name.
        result: the last subscribe reply or `subscribed` push
            (`channel`, `offset`, `epoch`, `recovered`).
        server: True when the server made (or took over) this subscription.
        lost: every `lost` item so far, oldest first.
        state: "subscribing", "subscribed" or "unsubscribed".
        queue: the pushes, with None once the subscription ended.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        result: dict[str, Any],
        *,
        since: dict[str, Any] | None = None,
        info: Any = None,
        token: str | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.result = result
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.server = False
        self.lost: list[dict[str, Any]] = []
        self.state = "subscribing"
        self.end_reason: str | None = None
        self._info = info
        self._token = token
        self._offset: int | None = None
        self._epoch: Any = None
        if since is not None and isinstance(since.get("offset"), int):
            self._offset = since["offset"]
            self._epoch = since.get("epoch")
        self._ever_subscribed = False
        self._gap: Gap | None = None
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Nobody awaiting it is not an error.
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def recovered(self) -> bool:
        """Whether the server recovered every message after `since` (last reply)."""
        return bool(self.result.get("recovered"))

    @property
    def position(self) -> dict[str, Any] | None:
        """The last offset/epoch seen (`{"offset", "epoch"}`), or None before the first reply."""
        if self._offset is None:
            return None
        return {"offset": self._offset, "epoch": self._epoch}

    async def get(self, timeout: float | None = None, *, kind: str | None = None) -> dict[str, Any]:
        """The next push, waiting at most `timeout` seconds in all.

        Args:
            timeout: seconds to wait; None waits forever.
            kind: only return pushes of this `type` (e.g. "message"), skipping others.

        Raises:
            SubscriptionEnded: the server ended the subscription.
            ConnectionClosed: the client stopped (or, with `reconnect=False`,
                the connection ended).
            TimeoutError: nothing came in time.
        """
        async with asyncio.timeout(timeout):
            while True:
                item = await self.queue.get()
                if item is None:
                    self.queue.put_nowait(None)  # every later get() ends too
                    raise self._ended_error()
                if kind is None or item.get("type") == kind:
                    return item

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self.queue.get()
            if item is None:
                self.queue.put_nowait(None)
                return
            yield item

    async def unsubscribe(self) -> None:
        """End this subscription."""
        await self.client.unsubscribe(self.channel)

    # ----- driven by the client

    def _ended_error(self) -> ConnectionClosed:
        if self.end_reason is not None:
            return SubscriptionEnded(self.end_reason)
        return ConnectionClosed(self.client.close_code)

    def _command(self) -> dict[str, Any]:
        command: dict[str, Any] = {"type": "subscribe", "channel": self.channel}
        if self._info is not None:
            command["info"] = self._info
        if self._token is not None:
            command["token"] = self._token
        if self._offset is not None and self._epoch is not None:
            command["since"] = {"offset": self._offset, "epoch": self._epoch}
        return command

    def _mark_ready(self, result: dict[str, Any]) -> bool:
        """Now subscribed; returns whether it had been before (a resubscribe)."""
        self.result = result
        self.state = "subscribed"
        again = self._ever_subscribed
        self._ever_subscribed = True
        if not self._ready.done():
            self._ready.set_result(result)
        return again

    def _on_reply(self, result: dict[str, Any], since: dict[str, Any] | None) -> None:
        again = self._mark_ready(result)
        if since is not None and result.get("recovered"):
            # The missed messages follow as pushes: keep our offset so that
            # they (and only they) pass the duplicate check.
            self._epoch = result.get("epoch", self._epoch)
            return
        self._restart_at(result)
        if since is not None and again:
            self._lose(since, result)

    def _on_granted(self, result: dict[str, Any]) -> Gap | None:
        """A `subscribed` push; returns the gap to read from history, if any.

        The server made it without our `since`, so it replays nothing.
        """
        self.server = True
        self._gap = None
        since = self.position if self._epoch is not None else None
        self._mark_ready(result)
        offset = result.get("offset")
        if since is None or not isinstance(offset, int):
            self._restart_at(result)
            return None
        if result.get("epoch") != since["epoch"]:
            self._restart_at(result)
            self._lose(since, result)
            return None
        if offset <= since["offset"]:
            return None  # nothing missed
        self._gap = Gap(self.channel, since, offset, result.get("epoch"))
        return self._gap

    def _end_gap(self, gap: Gap, *, complete: bool) -> None:
        """The gap is read (`complete`) or cannot be: deliver what is known, in order."""
        if self._gap is not gap:
            return
        self._gap = None
        if complete:
            for message in gap.got:
                self._deliver(message)
        else:
            result = {"offset": gap.offset, "epoch": gap.epoch}
            self._restart_at(result)
            self._lose(gap.since, result)
        for message in gap.held:
            self._deliver(message)

    def _restart_at(self, result: dict[str, Any]) -> None:
        if isinstance(result.get("offset"), int):
            self._offset = result["offset"]
        self._epoch = result.get("epoch", self._epoch)

    def _lose(self, since: dict[str, Any], result: dict[str, Any]) -> None:
        item = {
            "type": "lost",
            "channel": self.channel,
            "since": since,
            "offset": result.get("offset"),
            "epoch": result.get("epoch"),
        }
        self.lost.append(item)
        self.queue.put_nowait(item)

    def _on_message(self, message: dict[str, Any]) -> None:
        if self._gap is not None:
            self._gap.held.append(message)  # after the gap, which is still being read
        else:
            self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        offset = message.get("offset")
        if isinstance(offset, int):
            epoch = message.get("epoch")
            same_epoch = epoch is None or self._epoch is None or epoch == self._epoch
            if same_epoch and self._offset is not None and offset <= self._offset:
                return  # seen already
            self._offset = offset
            if epoch is not None:
                self._epoch = epoch
        self.queue.put_nowait(message)

    def _end(self, error: BaseException, reason: str | None) -> None:
        if self.state == "unsubscribed":
            return
        self.state = "unsubscribed"
        self.end_reason = reason
        self._gap = None
        if not self._ready.done():
            self._ready.set_exception(error)
        self.queue.put_nowait(None)
