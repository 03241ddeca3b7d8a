"""Live tails of channels for the admin page: what is published while the page is open.

A tail is an internal subscriber in the hub (`Node.watch`): it gets each
message and join/leave of its channel, from every node, as the JSON push a
client would get, and keeps the last few in a small ring that the page polls.
It is nobody in presence and announces no join. The cost is bounded: at most
`MAX_TAILS` channels are tailed per node (every page open on a channel shares
its tail), each ring holds at most `TAIL_EVENTS` events and `TAIL_BYTES`
bytes, and a tail nobody polled for `TAIL_IDLE` seconds is closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Final

import orjson

from plexus.exceptions import Unavailable
from plexus.hub import Subscription
from plexus.node import Node
from plexus.protocol.codec import frame_payload
from plexus.protocol.codes import CloseCode
from plexus.protocol.wire import JSON_WS

log = logging.getLogger("plexus.admin")

MAX_TAILS: Final = 16
TAIL_EVENTS: Final = 100
TAIL_BYTES: Final = 256 * 1024
TAIL_IDLE: Final = 30.0


class Tail:
    """One tailed channel: a hub subscriber that keeps its last pushes.

    Each kept event has a sequence number, counted from 1 for this tail; `id`
    changes when a tail is made again, so a page knows to start over.
    """

    def __init__(self, channel: str, now: float) -> None:
        self.channel = channel
        self.id = secrets.token_hex(6)
        self.events: deque[tuple[int, bytes]] = deque()
        self.size = 0
        self.seq = 0
        self.dropped = 0  # events pushed out of the ring by newer ones
        self.last_poll = now
        self._client_id = f"admin-tail-{self.id}"

    # ----- what the hub needs (hub.Subscriber) and what the node may call (node.Peer)

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def user(self) -> str | None:
        return None

    @property
    def format_index(self) -> int:
        return JSON_WS.index

    @property
    def push_frame(self) -> Callable[[bytes], object]:
        return self._push

    @property
    def outbox(self) -> Tail:
        return self

    def send(self, frame: bytes) -> None:
        """What the fan-out writes at once is kept like the rest."""
        self._push(frame)

    def close(self, code: CloseCode, reason: str) -> None:
        """Nothing to close: the tail ends when nobody polls it."""

    async def end_subscription(
        self, channel: str, reason: str, *, resubscribe: bool = False
    ) -> bool:
        """The node could not repair a gap: note it in the ring and carry on."""
        note = {"type": "gap", "channel": channel, "reason": reason}
        self._keep(orjson.dumps(note))
        return False

    # ----- the ring

    def _push(self, frame: bytes) -> None:
        self._keep(frame_payload(frame))

    def _keep(self, payload: bytes) -> None:
        self.seq += 1
        self.events.append((self.seq, payload))
        self.size += len(payload)
        while len(self.events) > TAIL_EVENTS or (self.size > TAIL_BYTES and len(self.events) > 1):
            _, old = self.events.popleft()
            self.size -= len(old)
            self.dropped += 1

    def after(self, seq: int) -> list[bytes]:
        """The kept events with a sequence number above `seq`, oldest first."""
        return [payload for number, payload in self.events if number > seq]


class Tails:
    """The tails of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._tails: dict[str, tuple[Tail, Subscription]] = {}
        self._opening: dict[str, asyncio.Future[Tail]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def hidden(self) -> dict[str, int]:
        """Subscriptions per channel that are tails (not shown as subscribers)."""
        return {channel: 1 for channel in self._tails}

    async def get(self, channel: str, now: float) -> Tail:
        """The tail of `channel`, made (and subscribed) if there is none.

        Raises:
            Unavailable: `MAX_TAILS` channels are tailed already, or the
                engine refused the subscription.
        """
        found = self._tails.get(channel)
        if found is not None:
            found[0].last_poll = now
            return found[0]
        pending = self._opening.get(channel)
        if pending is not None:  # another page asked for it a moment ago
            return await asyncio.shield(pending)
        if len(self._tails) + len(self._opening) >= MAX_TAILS:
            raise Unavailable(f"{MAX_TAILS} channels are tailed already: close a channel page")
        tail = Tail(channel, now)
        sub = Subscription(tail, channel)
        future: asyncio.Future[Tail] = asyncio.get_running_loop().create_future()
        self._opening[channel] = future
        try:
            await self.node.watch(sub)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            else:
                future.cancel()
            raise
        else:
            self._tails[channel] = (tail, sub)
            future.set_result(tail)
            log.info("tailing %s for the admin page", channel)
            return tail
        finally:
            del self._opening[channel]

    async def sweep(self, now: float) -> None:
        """Close the tails nobody polled for `TAIL_IDLE` seconds."""
        idle = [name for name, (tail, _) in self._tails.items() if now - tail.last_poll > TAIL_IDLE]
        for name in idle:
            await self._close(name)

    async def close(self) -> None:
        """Close every tail."""
        for name in list(self._tails):
            await self._close(name)

    async def _close(self, name: str) -> None:
        found = self._tails.pop(name, None)
        if found is None:
            return
        try:
            await self.node.unwatch(found[1])
        except Exception:
            log.exception("closing the tail of %s failed", name)
