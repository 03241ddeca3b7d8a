"""An asyncio Python client for the Plexus protocol.

Example:
    async with Client("ws://127.0.0.1:8000/ws") as client:
        sub = await client.subscribe("chat:lobby")
        await client.publish("chat:lobby", {"text": "hi"})
        async for message in sub:
            print(message["data"])
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from plexus.protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, codec_for


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


class Subscription:
    """Pushes of one channel (`message`, `join`, `leave`), as an async iterator."""

    def __init__(self, client: Client, channel: str, result: dict[str, Any]) -> None:
        self.client = client
        self.channel = channel
        self.result = result
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    @property
    def recovered(self) -> bool:
        """Whether the server recovered every message after `since`."""
        return bool(self.result.get("recovered"))

    async def get(self, timeout: float | None = None, *, kind: str | None = None) -> dict[str, Any]:
        """The next push, waiting at most `timeout` seconds in all.

        Args:
            timeout: seconds to wait; None waits forever.
            kind: only return pushes of this `type` (e.g. "message"), skipping others.
        """
        async with asyncio.timeout(timeout):
            while True:
                item = await self.queue.get()
                if item is None:
                    raise ConnectionClosed(self.client.close_code)
                if kind is None or item.get("type") == kind:
                    return item

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    async def unsubscribe(self) -> None:
        """End this subscription."""
        await self.client.unsubscribe(self.channel)


class Client:
    """One connection to a Plexus server.

    Args:
        url: the `ws://` or `wss://` endpoint, e.g. `ws://127.0.0.1:8000/ws`.
        token: an optional connection JWT (sent as `?token=`).
        encoding: "json" or "msgpack".
        timeout: seconds to wait for each reply.
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
    ) -> None:
        self.url = url
        self.token = token
        self.subprotocol = MSGPACK_SUBPROTOCOL if encoding == "msgpack" else JSON_SUBPROTOCOL
        self.codec = codec_for(self.subprotocol)
        self.timeout = timeout
        self.headers = headers or {}
        self.welcome: dict[str, Any] = {}
        self.close_code: int | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.other: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # A shared session (many clients in one process) is not closed by us.
        self._session: aiohttp.ClientSession | None = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def client_id(self) -> str:
        """This connection's id from `welcome`."""
        return str(self.welcome.get("client", ""))

    async def connect(self) -> Client:
        """Open the connection and wait for `welcome`."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        session = self._session
        params = {"token": self.token} if self.token else None
        try:
            self._ws = await session.ws_connect(
                self.url,
                params=params,
                protocols=(self.subprotocol,),
                headers=self.headers,
                autoping=True,
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout),
            )
            first = await self._ws.receive(timeout=self.timeout)
        except BaseException:
            await self._close_session()
            raise
        if first.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            self.welcome = self.codec.decode(first.data)
        else:
            self.close_code = self._ws.close_code
            await self._close_session()
            raise ConnectionClosed(self.close_code)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    continue
                self._dispatch(self.codec.decode(msg.data))
        finally:
            self.close_code = self._ws.close_code
            error = ConnectionClosed(self.close_code)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            for sub in self.subscriptions.values():
                sub.queue.put_nowait(None)
            self._closed.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("reply", "error", "pong") and message.get("id") in self._pending:
            future = self._pending.pop(message["id"])
            if not future.done():
                future.set_result(message)
            return
        channel = message.get("channel")
        if kind in ("message", "join", "leave") and channel in self.subscriptions:
            self.subscriptions[channel].queue.put_nowait(message)
            return
        if kind == "unsubscribed" and channel in self.subscriptions:
            self.subscriptions.pop(channel).queue.put_nowait(None)
        self.other.put_nowait(message)

    async def send(self, message: dict[str, Any]) -> None:
        """Send a raw protocol message (no reply expected)."""
        if self._ws is None or self._ws.closed:
            raise ConnectionClosed(self.close_code)
        payload = self.codec.encode(message)
        if self.codec.binary:
            await self._ws.send_bytes(payload)
        else:
            await self._ws.send_str(payload.decode("utf-8"))

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a command with a fresh id and return its `result` (or raise its error)."""
        cid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[cid] = future
        await self.send({**message, "id": cid})
        try:
            answer = await asyncio.wait_for(future, self.timeout)
        finally:
            self._pending.pop(cid, None)
        if answer["type"] == "error":
            raise PlexusClientError(answer["code"], answer.get("message", ""))
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def subscribe(
        self,
        channel: str,
        *,
        since: dict[str, Any] | None = None,
        info: Any = None,
        token: str | None = None,
    ) -> Subscription:
        """Subscribe; pushes of the channel then arrive on the returned subscription."""
        command: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if since is not None:
            command["since"] = since
        if info is not None:
            command["info"] = info
        if token is not None:
            command["token"] = token
        # Register first: the pushes that follow the reply must find their queue.
        sub = Subscription(self, channel, {})
        self.subscriptions[channel] = sub
        try:
            sub.result = await self.request(command)
        except BaseException:
            if self.subscriptions.get(channel) is sub:
                del self.subscriptions[channel]
            raise
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """End the subscription to `channel`."""
        await self.request({"type": "unsubscribe", "channel": channel})
        sub = self.subscriptions.pop(channel, None)
        if sub is not None:
            sub.queue.put_nowait(None)

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

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the server closes the connection; return the close code."""
        await asyncio.wait_for(self._closed.wait(), timeout)
        return self.close_code

    async def close(self) -> None:
        """Close the connection (1000) and release resources."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
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
