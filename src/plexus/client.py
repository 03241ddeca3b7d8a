"""An asyncio Python client for the Plexus protocol, on par with plexus.js.

It reconnects by itself (exponential backoff with full jitter), resubscribes
every subscription with `since` = the last offset and epoch it saw, and
delivers what the server replays through the same `Subscription`, each offset
once. When the server cannot replay what was missed, the subscription's stream
carries a `{"type": "lost", ...}` item at the place of the gap. Subscriptions
made by the server (a `subscribed` push, e.g. from the token's `channels`
claim) appear in `Client.subscriptions` like the app's own.

Example:
    async with Client("ws://127.0.0.1:8000/ws") as client:
        sub = await client.subscribe("chat:lobby")
        await client.publish("chat:lobby", {"text": "hi"})
        async for message in sub:
            print(message["data"])
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from plexus.client_state import (
    Backoff,
    ConnectionClosed,
    Gap,
    PlexusClientError,
    Subscription,
    SubscriptionEnded,
    TokenSource,
    token_expiry,
)
from plexus.protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, codec_for

__all__ = [
    "Backoff",
    "Client",
    "ConnectionClosed",
    "PlexusClientError",
    "Subscription",
    "SubscriptionEnded",
    "TokenSource",
    "token_expiry",
]

log = logging.getLogger("plexus.client")

WebSocket = aiohttp.ClientWebSocketResponse

# Close codes after which the same token must not be used again (4001), and
# after which a new one is needed (4002): see docs/protocol.md, "Close codes".
UNAUTHORIZED = 4001
TOKEN_EXPIRED = 4002
RATE_LIMITED = 4029


@dataclass(slots=True)
class _Waiter:
    """An answer we wait for: `on_answer` gets the reply, error or pong; `on_fail` the drop."""

    on_answer: Callable[[dict[str, Any]], None]
    on_fail: Callable[[BaseException], None]
    timer: asyncio.TimerHandle | None = None


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing an unresponsive connection failed", exc_info=task.exception())


class Client:
    """A connection to a Plexus server that reconnects by itself.

    After a drop it reconnects with exponential backoff and full jitter,
    resubscribes every subscription with `since` and recovers what was missed
    (see `Subscription`). Close codes are respected as in plexus.js: 4001
    stops (the same token must not be used again), 4002 asks `get_token` for
    a new token and reconnects (stops without `get_token`), 4029 waits
    `rate_limit_delay` more, others (1001, 4008, a network error, ...)
    reconnect with backoff. Requests made while reconnecting wait for the
    connection, within `timeout`.

    Args:
        url: the `ws://` or `wss://` endpoint, e.g. `ws://127.0.0.1:8000/ws`.
        token: an optional connection JWT (sent as `?token=`).
        encoding: "json" or "msgpack".
        timeout: seconds to wait for each reply (and for `welcome`).
        headers: extra HTTP headers for the upgrade request.
        session: a shared aiohttp session (not closed by the client).
        reconnect: False keeps a single connection: when it ends, the client
            stops (subscriptions end, requests raise `ConnectionClosed`).
        backoff: the reconnect delays.
        get_token: called (sync or async) for a connection token when there
            is none, when the current one has expired, after close 4002, and
            `refresh_before` seconds before the current token's `exp` (the
            new token is then sent with `auth` on the open connection).
        refresh_before: seconds ahead of `exp` to refresh (halfway through a
            token's life when it lives less than twice that).
        rate_limit_delay: extra seconds before reconnecting after close 4029.
        heartbeat: seconds between WebSocket pings of ours (a dead connection
            is found within 1.5 times that); None sends none.
        on_subscribed: called with each Subscription the server makes for a
            channel the app had none for, before any of its pushes is queued.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        encoding: str = "json",
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        get_token: TokenSource | None = None,
        refresh_before: float = 30.0,
        rate_limit_delay: float = 5.0,
        heartbeat: float | None = 20.0,
        on_subscribed: Callable[[Subscription], object] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.subprotocol = MSGPACK_SUBPROTOCOL if encoding == "msgpack" else JSON_SUBPROTOCOL
        self.codec = codec_for(self.subprotocol)
        self.timeout = timeout
        self.headers = headers or {}
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.get_token = get_token
        self.refresh_before = refresh_before
        self.rate_limit_delay = rate_limit_delay
        self.heartbeat = heartbeat
        self.on_subscribed = on_subscribed
        self.welcome: dict[str, Any] = {}
        self.close_code: int | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.other: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reconnects = 0  # successful reconnects so far
        # A shared session (many clients in one process) is not closed by us.
        self._session: aiohttp.ClientSession | None = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._out: asyncio.Queue[bytes] | None = None  # frames for the current connection
        self._writer: asyncio.Task[None] | None = None
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._runner: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._connected = asyncio.Event()  # a connection is open (welcome received)
        self._closed = asyncio.Event()  # the current connection ended (or none yet)
        self._stopped = asyncio.Event()  # close() or a terminal close code
        self._wake = asyncio.Event()  # retry_now()
        self._gen = 0  # bumped per connection: callbacks of older ones do nothing
        self._attempt = 0
        self._connected_at = 0.0
        self._waiting_for: dict[str, list[asyncio.Future[Subscription]]] = {}

    @property
    def client_id(self) -> str:
        """This connection's id from `welcome` (it changes on every reconnect)."""
        return str(self.welcome.get("client", ""))

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._connected.is_set()

    # ----- connecting

    async def connect(self) -> Client:
        """Open the connection and wait for `welcome`.

        This first attempt is not retried (except once after 4002 when
        `get_token` can give a new token): a failure raises
        `ConnectionClosed` (refused token: 4001/4002), `aiohttp.ClientError`,
        `OSError` or `TimeoutError`. Later drops are reconnected by themselves.
        """
        if self._runner is not None and not self._runner.done():
            return self
        self._stopped.clear()
        try:
            try:
                ws, welcome = await self._open(refresh=False)
            except ConnectionClosed as exc:
                if exc.code != TOKEN_EXPIRED or self.get_token is None:
                    raise
                ws, welcome = await self._open(refresh=True)
        except BaseException:
            await self._close_session()
            raise
        self._on_open(ws, welcome)
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="plexus-client")
        return self

    async def _open(self, *, refresh: bool) -> tuple[WebSocket, dict[str, Any]]:
        """One connection attempt, up to `welcome`."""
        if self.get_token is not None and (refresh or self._token_stale()):
            self.token = await self._ask_token()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        params = {"token": self.token} if self.token else None
        ws = await self._session.ws_connect(
            self.url,
            params=params,
            protocols=(self.subprotocol,),
            headers=self.headers,
            autoping=True,
            heartbeat=self.heartbeat,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout),
        )
        try:
            first = await ws.receive(timeout=self.timeout)
        except BaseException:
            await ws.close()
            raise
        if first.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            self.close_code = ws.close_code
            await ws.close()
            raise ConnectionClosed(self.close_code)
        welcome: dict[str, Any] = self.codec.decode(first.data)
        return ws, welcome

    def _token_stale(self) -> bool:
        if not self.token:
            return True
        exp = token_expiry(self.token)
        return exp is not None and exp <= time.time()

    async def _ask_token(self) -> str | None:
        assert self.get_token is not None
        token = self.get_token()
        if inspect.isawaitable(token):
            token = await token
        return token or None

    def _on_open(self, ws: aiohttp.ClientWebSocketResponse, welcome: dict[str, Any]) -> None:
        self._gen += 1
        self._ws = ws
        self.welcome = welcome
        self.close_code = None
        self._connected_at = time.monotonic()
        self._out = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(
            self._write(ws, self._out), name="plexus-client-writer"
        )
        self._closed.clear()
        self._connected.set()
        self._arm_refresh()
        granted = []
        for sub in list(self.subscriptions.values()):
            if sub.server:
                granted.append(sub)
            else:
                self._send_subscribe(sub)
        if granted:
            # The server may subscribe this connection again by itself (e.g.
            # from the token's `channels` claim): it does so right after
            # `welcome`, before it reads our first command. So the pong to a
            # ping tells which ones it did; only the others need our
            # subscribe, and none of ours is refused with `already_subscribed`.
            gen = self._gen

            def after_grants(_: dict[str, Any]) -> None:
                if gen != self._gen:
                    return
                for sub in granted:
                    if sub.state == "subscribing" and self.subscriptions.get(sub.channel) is sub:
                        self._send_subscribe(sub)

            self._command({"type": "ping"}, after_grants)

    async def _run(self) -> None:
        """Read the connection; when it ends, reconnect (or stop). Supervised: a crash stops."""
        try:
            while True:
                ws = self._ws
                assert ws is not None
                await self._read(ws)
                code = ws.close_code if ws.close_code is not None else 1006
                self._on_lost(code)
                if not await self._reconnect(code):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("plexus client crashed; it stops")
            self._stop(self.close_code)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                self._dispatch(self.codec.decode(msg.data))

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, out: asyncio.Queue[bytes]) -> None:
        # One writer per connection keeps commands in the order they were
        # made, also those sent from the (synchronous) dispatcher.
        try:
            while True:
                payload = await out.get()
                if self.codec.binary:
                    await ws.send_bytes(payload)
                else:
                    await ws.send_str(payload.decode("utf-8"))
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return  # closing: the reader sees the end and handles it

    def _on_lost(self, code: int) -> None:
        """The connection ended: fail what waited on it; subscriptions wait for the next."""
        self._gen += 1
        self._ws = None
        self.close_code = code
        self._connected.clear()
        self._closed.set()
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self._out = None
        self._cancel_refresh()
        for sub in self.subscriptions.values():
            if sub.state == "subscribed":
                sub.state = "subscribing"
            # A gap being read is dropped with what it held: nothing of it was
            # delivered, so the next connection reads it again.
            sub._gap = None
        pending, self._pending = self._pending, {}
        error = ConnectionClosed(code)
        for waiter in pending.values():
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.on_fail(error)
        if time.monotonic() - self._connected_at >= self.backoff.reset_after:
            self._attempt = 0

    async def _reconnect(self, code: int) -> bool:
        """Reconnect until it works (True), or stop (False) for good."""
        refresh = code == TOKEN_EXPIRED
        while not self._stopped.is_set():
            if not self.reconnect or code == UNAUTHORIZED:
                break
            if code == TOKEN_EXPIRED and self.get_token is None:
                break
            delay = self.backoff.delay(self._attempt)
            if code == RATE_LIMITED:
                delay += self.rate_limit_delay
            self._attempt += 1
            self._wake.clear()
            # The backoff delay, cut short by retry_now().
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            try:
                ws, welcome = await self._open(refresh=refresh)
            except ConnectionClosed as exc:
                code = exc.code if exc.code is not None else 1006
                refresh = refresh or code == TOKEN_EXPIRED
                continue
            except (aiohttp.ClientError, OSError, TimeoutError):
                code = 1006
                continue
            except Exception:
                # get_token failed: log it, and try again after the next delay.
                log.exception("get_token failed; retrying")
                code = 1006
                continue
            self.reconnects += 1
            self._on_open(ws, welcome)
            return True
        self._stop(code)
        return False

    def _stop(self, code: int | None) -> None:
        """Stop for good: no reconnect; subscriptions end, waiters fail."""
        self._stopped.set()
        self._connected.clear()
        self._closed.set()
        self.close_code = code
        self._cancel_refresh()
        if self._refresher is not None:
            self._refresher.cancel()
        error = ConnectionClosed(code)
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.on_fail(error)
        subs, self.subscriptions = list(self.subscriptions.values()), {}
        for sub in subs:
            sub._end(error, None)
        for futures in self._waiting_for.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    # ----- token refresh

    def _arm_refresh(self) -> None:
        self._cancel_refresh()
        exp = token_expiry(self.token)
        if self.get_token is None or exp is None:
            return
        left = exp - time.time()
        delay = max(0.0, left - min(self.refresh_before, left / 2))
        gen = self._gen
        self._refresh_timer = asyncio.get_running_loop().call_later(delay, self._start_refresh, gen)

    def _cancel_refresh(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None

    def _start_refresh(self, gen: int) -> None:
        self._refresh_timer = None
        if gen == self._gen and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(gen))

    async def _refresh(self, gen: int) -> None:
        """Ask `get_token` for the next token and send it with `auth` on this connection."""
        try:
            old = token_expiry(self.token)
            token = await self._ask_token()
            if gen != self._gen or token is None:
                return
            exp = token_expiry(token)
            if old is not None and (exp is None or exp <= old):
                # Gains nothing, and asking again at once would spin; at
                # expiry the server closes with 4002 and the reconnect asks again.
                log.warning("get_token gave no later expiry; not refreshed")
                return
            self.token = token
            await self.request({"type": "auth", "token": token})
            if gen == self._gen and self.token == token:
                self._arm_refresh()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not fatal yet: at expiry the server closes with 4002 and the
            # reconnect asks get_token again.
            log.warning("token refresh failed", exc_info=True)
        finally:
            self._refresher = None

    # ----- receiving

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        mid = message.get("id")
        if kind in ("reply", "error", "pong") and mid is not None and mid in self._pending:
            waiter = self._pending.pop(mid)
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.on_answer(message)
            return
        if kind == "error" and mid is None and message.get("code") == "already_subscribed":
            # We always send ids: an id-less `already_subscribed` is the server
            # failing to subscribe us by itself to a channel we already hold.
            return
        channel = message.get("channel")
        sub = self.subscriptions.get(channel) if isinstance(channel, str) else None
        if kind == "subscribed" and isinstance(channel, str):
            self._on_granted(channel, message)
            return
        if sub is not None:
            if kind == "message":
                sub._on_message(message)
                return
            if kind in ("join", "leave"):
                sub.queue.put_nowait(message)
                return
            if kind == "unsubscribed" and message.get("resubscribe"):
                # The server could no longer promise a gap-free stream: subscribe
                # again at once from the last offset seen, on the same Subscription.
                sub._gap = None
                self._send_subscribe(sub)
                return
            if kind == "unsubscribed":
                del self.subscriptions[channel]  # type: ignore[arg-type]
                reason = str(message.get("reason", "unsubscribed by the server"))
                sub._end(SubscriptionEnded(reason), reason)
        self.other.put_nowait(message)

    def _on_granted(self, channel: str, message: dict[str, Any]) -> None:
        """A `subscribed` push: the server subscribed this connection by itself."""
        result = {
            "channel": channel,
            "offset": message.get("offset"),
            "epoch": message.get("epoch"),
            "recovered": bool(message.get("recovered")),
        }
        sub = self.subscriptions.get(channel)
        if sub is None:
            sub = Subscription(self, channel, result)
            self.subscriptions[channel] = sub
            if self.on_subscribed is not None:
                try:
                    self.on_subscribed(sub)
                except Exception:
                    log.exception("on_subscribed failed for %s", channel)
        gap = sub._on_granted(result)
        self._notify(sub)
        if gap is not None:
            self._read_gap(sub, gap)

    # A server-made subscription starts at the channel's current offset; what
    # came between our last offset and it is read with `history`, delivered
    # before the live messages held meanwhile, each offset once.
    def _read_gap(self, sub: Subscription, gap: Gap) -> None:
        request = gap.request()

        def on_page(answer: dict[str, Any]) -> None:
            if sub._gap is not gap:
                return  # dropped meanwhile (a resubscribe, an end)
            if answer.get("type") != "reply":
                sub._end_gap(gap, complete=False)
                return
            outcome = gap.take(request, answer.get("result", {}))
            if outcome == "more":
                self._read_gap(sub, gap)
            else:
                sub._end_gap(gap, complete=outcome == "complete")

        self._command(request, on_page)

    def _notify(self, sub: Subscription) -> None:
        for future in self._waiting_for.pop(sub.channel, []):
            if not future.done():
                future.set_result(sub)

    # ----- sending

    def _enqueue(self, message: dict[str, Any]) -> None:
        if self._out is None:
            raise ConnectionClosed(self.close_code)
        self._out.put_nowait(self.codec.encode(message))

    def _command(
        self,
        message: dict[str, Any],
        on_answer: Callable[[dict[str, Any]], None],
        on_fail: Callable[[BaseException], None] = lambda _: None,
    ) -> None:
        """Send a command of the client's own; a connection that never answers is dropped."""
        cid = next(self._ids)
        gen = self._gen
        timer = asyncio.get_running_loop().call_later(self.timeout, self._abandon, gen)
        self._pending[cid] = _Waiter(on_answer, on_fail, timer)
        self._enqueue({**message, "id": cid})

    def _abandon(self, gen: int) -> None:
        """No answer in time: treat the connection as dead and reconnect."""
        ws = self._ws
        if gen == self._gen and ws is not None and not ws.closed:
            log.warning("no answer from the server in %s s; reconnecting", self.timeout)
            closing = asyncio.get_running_loop().create_task(
                ws.close(code=4000, message=b"no answer")
            )
            # The reader sees the end either way; a failing close is only logged.
            closing.add_done_callback(_log_failure)

    def _send_subscribe(self, sub: Subscription) -> None:
        command = sub._command()
        since = command.get("since")
        sub.state = "subscribing"

        def on_answer(answer: dict[str, Any]) -> None:
            registered = self.subscriptions.get(sub.channel) is sub
            if answer.get("type") == "reply":
                if not registered:
                    # Given up on meanwhile (subscribe() timed out or was
                    # cancelled): do not leave the server's subscription behind.
                    if sub.channel not in self.subscriptions and self._out is not None:
                        self._enqueue({"type": "unsubscribe", "channel": sub.channel})
                    return
                if sub.state == "subscribing":
                    sub._on_reply(answer.get("result", {}), since)
                    self._notify(sub)
                return
            code = str(answer.get("code", "internal"))
            if code == "already_subscribed" and sub.state == "subscribed":
                return  # the server subscribed us itself first (a `subscribed` push)
            if registered:
                del self.subscriptions[sub.channel]
            error = PlexusClientError(code, str(answer.get("message", "")))
            sub._end(error, code)

        self._command(command, on_answer)

    async def _wait_connected(self, timeout: float) -> None:
        if self._connected.is_set():
            return
        if self._stopped.is_set() or self._runner is None:
            raise ConnectionClosed(self.close_code)
        connected = asyncio.ensure_future(self._connected.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait(
                {connected, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            connected.cancel()
            stopped.cancel()
        if not self._connected.is_set():
            if self._stopped.is_set():
                raise ConnectionClosed(self.close_code)
            raise TimeoutError(f"not connected within {timeout} s")

    async def send(self, message: dict[str, Any]) -> None:
        """Send a raw protocol message (no reply expected) on the open connection."""
        if not self._connected.is_set():
            raise ConnectionClosed(self.close_code)
        self._enqueue(message)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a command with a fresh id and return its `result` (or raise its error).

        While reconnecting it first waits for the connection; `timeout` bounds
        the whole. A command in flight when the connection drops raises
        `ConnectionClosed` (it may or may not have been carried out).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        await self._wait_connected(self.timeout)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()

        def on_answer(answer: dict[str, Any]) -> None:
            if not future.done():
                future.set_result(answer)

        def on_fail(error: BaseException) -> None:
            if not future.done():
                future.set_exception(error)

        cid = next(self._ids)
        self._pending[cid] = _Waiter(on_answer, on_fail)
        try:
            self._enqueue({**message, "id": cid})
            answer = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        finally:
            self._pending.pop(cid, None)
        if answer["type"] == "error":
            raise PlexusClientError(answer["code"], answer.get("message", ""))
        result: dict[str, Any] = answer.get("result", {})
        return result

    # ----- commands

    async def subscribe(
        self,
        channel: str,
        *,
        since: dict[str, Any] | None = None,
        info: Any = None,
        token: str | None = None,
    ) -> Subscription:
        """Subscribe; pushes of the channel then arrive on the returned subscription.

        A channel already subscribed (by the app, or by the server) returns
        that Subscription, and its options are ignored. While reconnecting,
        the subscribe is sent once connected. Raises `PlexusClientError` when
        the server refuses, `TimeoutError` with no answer within `timeout`.
        """
        sub = self.subscriptions.get(channel)
        created = sub is None
        if sub is None:
            if self._stopped.is_set() or self._runner is None:
                raise ConnectionClosed(self.close_code)
            sub = Subscription(self, channel, {}, since=since, info=info, token=token)
            self.subscriptions[channel] = sub
            if self._connected.is_set():
                self._send_subscribe(sub)
        try:
            await asyncio.wait_for(asyncio.shield(sub._ready), self.timeout)
        except BaseException as exc:
            if created and not sub._ready.done() and self.subscriptions.get(channel) is sub:
                # Given up: forget it (a late reply is undone with `unsubscribe`).
                del self.subscriptions[channel]
                sub._end(exc if isinstance(exc, Exception) else ConnectionClosed(None), "gave up")
            raise
        return sub

    async def wait_subscription(self, channel: str, timeout: float | None = None) -> Subscription:
        """The subscription to `channel` once it is live: the app's, or one the server made."""
        sub = self.subscriptions.get(channel)
        if sub is not None and sub.state == "subscribed":
            return sub
        if self._stopped.is_set():
            raise ConnectionClosed(self.close_code)
        future: asyncio.Future[Subscription] = asyncio.get_running_loop().create_future()
        self._waiting_for.setdefault(channel, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._waiting_for.get(channel)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiting_for[channel]

    async def unsubscribe(self, channel: str) -> None:
        """End the subscription to `channel`.

        Its stream ends after every push that came before the server's answer.
        While reconnecting nothing is sent: the server dropped it with the
        connection.
        """
        sub = self.subscriptions.get(channel)
        try:
            if sub is None or self._connected.is_set():
                await self.request({"type": "unsubscribe", "channel": channel})
        finally:
            if sub is not None and self.subscriptions.get(channel) is sub:
                del self.subscriptions[channel]
                sub._end(ConnectionClosed(self.close_code), None)

    async def publish(self, channel: str, data: Any) -> int:
        """Publish `data`; return its offset once the server stored it."""
        result = await self.request({"type": "publish", "channel": channel, "data": data})
        return int(result["offset"])

    async def history(
        self, channel: str, *, limit: int | None = None, since: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The channel's stored messages, oldest first."""
        command: dict[str, Any] = {"type": "history", "channel": channel}
        if limit is not None:
            command["limit"] = limit
        if since is not None:
            command["since"] = since
        return await self.request(command)

    async def presence(self, channel: str) -> dict[str, Any]:
        """Who is subscribed to `channel`: `{client_id: {"user", "info"}}`."""
        result = await self.request({"type": "presence", "channel": channel})
        clients: dict[str, Any] = result["clients"]
        return clients

    async def rpc(self, method: str, data: Any = None) -> Any:
        """Call an application RPC method; return its `data`."""
        result = await self.request({"type": "rpc", "method": method, "data": data})
        return result.get("data")

    async def ping(self) -> None:
        """Round-trip an application-level ping."""
        await self.request({"type": "ping"})

    async def set_token(self, token: str) -> dict[str, Any]:
        """Use `token` from now on: sent with `auth` now, and on later connects."""
        self.token = token
        result = await self.request({"type": "auth", "token": token})
        if self.token == token:
            self._arm_refresh()
        return result

    def retry_now(self) -> None:
        """If a reconnect waits for its backoff delay, try now."""
        self._wake.set()

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the current connection ends; return its close code.

        With `reconnect` on, the client may then reconnect by itself.
        """
        await asyncio.wait_for(self._closed.wait(), timeout)
        return self.close_code

    async def close(self) -> None:
        """Close the connection (1000), stop reconnecting and release resources."""
        self._stopped.set()
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.close()
        runner = self._runner
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        if self._refresher is not None:
            self._refresher.cancel()
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self._ws = None
        self._out = None
        self._stop(ws.close_code if ws is not None else self.close_code)
        await self._close_session()

    async def _close_session(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
