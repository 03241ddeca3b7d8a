"""One long-lived pub/sub connection to one Redis server, that never goes deaf silently.

Written on asyncio's `Protocol` with hiredis's C reply parser rather than on
redis-py's `PubSub`, for three reasons that matter to a node:

* redis-py reconnects and resubscribes by itself without telling its caller,
  and every reconnect is a gap: here a reconnect reports every channel it
  carried as gapped, so the node repairs them from history.
* redis-py's `subscribe()` returns before Redis confirms; here `subscribe`
  returns only once Redis confirmed, so history read afterwards cannot miss a
  message.
* Every message of every channel a node subscribes to passes here; parsing it
  in C and handing it on synchronously (no task, no queue) keeps the
  delivering node's cost close to a single node's.

A connection that stops answering is found by a PING probe every
`probe_interval` seconds and replaced. Nothing queues here: if the node reads
slower than Redis writes, Redis buffers and eventually cuts the connection,
which is a reconnect and therefore a repaired gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection
from typing import Any, Final

import hiredis

from plexus.engines.redis.connection import RawConnection, open_connection
from plexus.exceptions import Unavailable
from plexus.supervisor import Supervisor

log = logging.getLogger("plexus.redis")

BATCH: Final = 500  # channels per SUBSCRIBE / UNSUBSCRIBE command
BACKOFF_START: Final = 0.05
BACKOFF_MAX: Final = 2.0

MessageHandler = Callable[[bytes, bytes], None]
GapHandler = Callable[[Collection[bytes]], None]


class PubSubLink:
    """Subscriptions of one node on one Redis server.

    Args:
        url: the server (`redis://`, `rediss://` or `unix://`, as redis-py parses it).
        on_message: called with (pub/sub channel, payload) for every message, on
            the event loop, synchronously.
        on_gap: called with the channels whose messages may have been lost (after a
            reconnect).
        name: a name for logs, `/health` and `CLIENT LIST`.
        timeout: seconds to wait for Redis to connect, confirm or answer a probe.
        probe_interval: seconds between PING probes.
    """

    def __init__(
        self,
        url: str,
        *,
        on_message: MessageHandler,
        on_gap: GapHandler,
        name: str,
        timeout: float = 5.0,
        probe_interval: float = 5.0,
    ) -> None:
        self.url = url
        self.on_message = on_message
        self.on_gap = on_gap
        self.name = name
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.wanted: set[bytes] = set()  # channels subscribed, or being subscribed
        self._waiting: dict[bytes, list[asyncio.Future[None]]] = {}
        self._leaving: dict[bytes, list[asyncio.Future[None]]] = {}
        self._wire: RawConnection | None = None
        self._ready = False
        self._ready_event = asyncio.Event()
        self._pong: asyncio.Future[None] | None = None
        self.reconnects = 0
        self.probes = 0  # PINGs answered
        self.connected_since = 0.0
        self.last_error = ""
        self._first = True

    # ----- state

    @property
    def up(self) -> bool:
        """True while connected and subscribed."""
        return self._ready

    def health(self) -> dict[str, Any]:
        """This link's state for `/health`."""
        state: dict[str, Any] = {
            "status": "ok" if self._ready else "down",
            "channels": len(self.wanted),
            "reconnects": self.reconnects,
            "probes": self.probes,
        }
        if self.last_error:
            state["last_error"] = self.last_error
        return state

    # ----- subscriptions

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe and wait for Redis's confirmation.

        Raises:
            Unavailable: the server is not reachable now, or did not confirm in time.
        """
        wire = self._wire
        if not self._ready or wire is None:
            raise Unavailable(f"redis {self.name} is not connected")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(channel, []).append(future)
        self.wanted.add(channel)
        wire.send(b"SUBSCRIBE", channel)
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except TimeoutError:
            self._abandon(channel, future)
            raise Unavailable(f"redis {self.name} did not confirm a subscription") from None
        except BaseException:
            self._abandon(channel, future)
            raise

    def _abandon(self, channel: bytes, future: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(channel)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self._waiting[channel]
        # The caller is told it failed: the channel must not stay subscribed
        # (nor end up so, if Redis confirms late).
        self.unsubscribe(channel)

    def unsubscribe(self, channel: bytes) -> asyncio.Future[None] | None:
        """Stop receiving `channel`; return what resolves once Redis confirmed (None when
        nothing was sent). Messages that arrive before the confirmation are still
        passed on: a caller that must not see them awaits it."""
        if channel not in self.wanted:
            return None
        self.wanted.discard(channel)
        wire = self._wire
        if not self._ready or wire is None:
            return None  # no connection: nothing to unsubscribe from
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaving.setdefault(channel, []).append(confirmed)
        wire.send(b"UNSUBSCRIBE", channel)
        return confirmed

    # ----- replies

    def reply(self, reply: Any) -> None:
        """One reply or push from Redis."""
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"message":
                try:
                    self.on_message(reply[1], reply[2])
                except Exception:
                    log.exception("redis %s: could not handle a message of %r", self.name, reply[1])
                return
            if kind == b"subscribe":
                for future in self._waiting.pop(reply[1], ()):
                    if not future.done():
                        future.set_result(None)
                return
            if kind == b"pong":
                if self._pong is not None and not self._pong.done():
                    self._pong.set_result(None)
                return
            if kind == b"unsubscribe":
                for future in self._leaving.pop(reply[1], ()):
                    if not future.done():
                        future.set_result(None)
                return
        if reply == b"PONG":  # a PING answered while subscribed to nothing
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
            return
        if isinstance(reply, hiredis.ReplyError):
            log.warning("redis %s: error on the pub/sub connection: %s", self.name, reply)
            self.last_error = str(reply)[:200]
            if self._wire is not None:
                self._wire.close()  # a fresh connection is the safe way on

    # ----- the connection's life

    def start(self, supervisor: Supervisor) -> None:
        """Keep the connection up under `supervisor` (reconnecting with backoff)."""
        supervisor.spawn(f"redis-pubsub {self.name}", self._run)

    async def close(self) -> None:
        """Drop the connection (the supervisor stops the task)."""
        self._ready = False
        if self._wire is not None:
            self._wire.close()
        self._fail_waiting("closed")

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until connected (for start-up); False if it did not happen in time."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        backoff = BACKOFF_START
        outage_logged = False
        while True:
            try:
                await self._connect_and_serve()
                backoff = BACKOFF_START
                outage_logged = False
            except (OSError, TimeoutError, Unavailable) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                if not outage_logged:
                    log.warning(
                        "redis %s: pub/sub connection failed: %s", self.name, self.last_error
                    )
                    outage_logged = True
            finally:
                self._ready = False
                self._ready_event.clear()
                if self._wire is not None:
                    self._wire.close()  # also when cancelled: the socket must not leak
                    self._wire = None
                self._fail_waiting("connection lost")
            await asyncio.sleep(backoff * (0.5 + random.random()))  # jitter: no reconnect storm
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _connect_and_serve(self) -> None:
        loop = asyncio.get_running_loop()
        wire = await open_connection(self.url, f"plexus-pubsub-{self.name}", self.timeout)
        self._wire = wire
        # From here on, what Redis sends (confirmations, messages, pongs) goes to `reply`.
        wire.on_push = self.reply
        carried = list(self.wanted)
        # Resubscribe everything this link carried, in batches, and wait for Redis.
        if carried:
            futures: list[asyncio.Future[None]] = []
            for channel in carried:
                future: asyncio.Future[None] = loop.create_future()
                self._waiting.setdefault(channel, []).append(future)
                futures.append(future)
            for start in range(0, len(carried), BATCH):
                wire.send(b"SUBSCRIBE", *carried[start : start + BATCH])
            async with asyncio.timeout(self.timeout + len(carried) / 10_000):
                await asyncio.gather(*futures)
        self._ready = True
        self._ready_event.set()
        self.connected_since = time.time()
        if self._first:
            self._first = False
        else:
            self.reconnects += 1
            log.info(
                "redis %s: pub/sub reconnected; %d channels to repair", self.name, len(carried)
            )
            if carried:
                self.on_gap(carried)
        await self._probe(wire)

    async def _probe(self, wire: RawConnection) -> None:
        """Ping every `probe_interval`; return when the connection is lost or deaf."""
        loop = asyncio.get_running_loop()
        while True:
            pong = self._pong = loop.create_future()
            wire.send(b"PING")
            await asyncio.wait(
                [pong, wire.lost], timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if wire.lost.done():
                raise OSError("connection closed by the server")
            if not pong.done():
                wire.close()
                raise TimeoutError(f"no answer to PING within {self.timeout}s (a deaf connection)")
            self.probes += 1
            await asyncio.wait([wire.lost], timeout=self.probe_interval)
            if wire.lost.done():
                raise OSError("connection closed by the server")

    def _fail_waiting(self, why: str) -> None:
        # Channels a caller waits for are dropped from `wanted` by that caller;
        # the ones carried over from the last connection stay for the next.
        waiting, self._waiting = self._waiting, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(Unavailable(f"redis {self.name}: {why}"))
        # An unsubscribe is done when its connection is gone.
        leaving, self._leaving = self._leaving, {}
        for futures in leaving.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
