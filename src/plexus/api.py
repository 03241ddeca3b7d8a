"""The backend SDK: call a Plexus server's HTTP API from Python.

`PlexusApi` is synchronous, on the standard library alone, for Django, Flask
and scripts; `AsyncPlexusApi` is the same API on aiohttp for asyncio apps
(FastAPI, aiohttp). Both send the same requests and read the same answers: the
requests are built and the answers checked by plain functions (`_call`,
`_result`), and only the transport differs.

    from plexus.api import PlexusApi

    api = PlexusApi("http://127.0.0.1:8000", api_key="...")
    api.publish("chat:lobby", {"text": "deploy finished"})
    api.publish("#alice", {"notice": "your export is ready"})   # every tab of alice
    api.unsubscribe("chat:lobby", user="mallory")

Light: `PlexusApi` uses the standard library alone (importing this module
pulls in neither aiohttp nor PyJWT nor cryptography); `AsyncPlexusApi`
imports aiohttp when it is first used.

Payloads may hold `bytes`: they travel as `{"$bytes": base64}` and come back
as `bytes`. A payload that is not JSON (a `Decimal`, a `datetime`, a set)
raises `ApiError` (`bad_request`) naming where it is: `data.price: Decimal`.
Any refusal raises `ApiError` with the server's error code.

`publish` is safe to retry, and retries by itself: each call carries one
`idempotency_key` (a new one unless you pass yours), and a 503 or a
connection that failed is retried `retries` times with exponential backoff
and jitter. The server stores a key's message once and answers a repeat
with the first publish's offset, so a retry after an answer that was lost
on the way never publishes twice.

Redirects are never followed: the API key would go to whatever URL the
answer names. A redirect raises `ApiError` (`unavailable`, with its status):
give the client the final URL.
Tokens for your users are made with `plexus.tokens.make_token` (re-exported).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import math
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plexus.tokens import make_token

if TYPE_CHECKING:
    import aiohttp

__all__ = ["ApiError", "AsyncPlexusApi", "PlexusApi", "make_token"]

log = logging.getLogger("plexus.api")
# A library's logger: silent until the application configures logging (no
# "last resort" lines on a script's stderr for a retry that then succeeded).
log.addHandler(logging.NullHandler())
_BYTES_KEY = "$bytes"


class ApiError(Exception):
    """The server refused a call, or could not be reached.

    Attributes:
        code: the protocol error code (`unauthorized`, `invalid_channel`, ...),
            or `unavailable` when the server could not be reached or answered
            something that is not the API's JSON.
        message: the server's explanation.
        status: the HTTP status (0 when there was no HTTP answer).
    """

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    body: bytes | None


def _call(path: str, body: dict[str, Any] | None = None) -> _Call:
    if body is None:
        return _Call("GET", path, None)
    encoded = json.dumps(_jsonable(body, ""), separators=(",", ":"), ensure_ascii=False)
    return _Call("POST", path, encoded.encode("utf-8"))


def _jsonable(value: Any, path: str) -> Any:
    """`value` as plain JSON values (bytes as `{"$bytes": base64}`), or ApiError naming `path`."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError("bad_request", f"{path or 'body'}: {value} is not a JSON number")
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                where = path or "body"
                raise ApiError(
                    "bad_request", f"{where}: key {key!r} is {type(key).__name__}, not a string"
                )
            out[key] = _jsonable(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    raise ApiError(
        "bad_request", f"{path or 'body'}: {type(value).__name__} is not JSON-serialisable"
    )


def _with_bytes(value: dict[str, Any]) -> Any:
    """json.loads' object hook: a `{"$bytes": base64}` object is those bytes."""
    if len(value) == 1 and isinstance(value.get(_BYTES_KEY), str):
        try:
            return base64.b64decode(value[_BYTES_KEY], validate=True)
        except ValueError:
            return value
    return value


def _refuse_redirect(status: int, location: str | None) -> None:
    """Raise for a 3xx answer: following it would send the API key to `location`."""
    if 300 <= status < 400:
        raise ApiError(
            "unavailable",
            f"HTTP {status}: redirected to {location or '?'}; plexus.api follows no"
            " redirect (the API key would go along): use the server's own URL",
            status,
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects with every header, Authorization included: never."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> None:
        return None  # urllib then raises HTTPError with the 3xx answer


_OPENER = urllib.request.build_opener(_NoRedirect)


def _result(status: int, raw: bytes) -> dict[str, Any]:
    """The answer's JSON object, or the `ApiError` the server meant."""
    try:
        answer = json.loads(raw, object_hook=_with_bytes)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ApiError("unavailable", f"HTTP {status} with a body that is not JSON", status)
    if status != 200:
        error = answer.get("error")
        if isinstance(error, dict):
            raise ApiError(str(error.get("code")), str(error.get("message")), status)
        raise ApiError("unavailable", f"HTTP {status}", status)
    return answer


def _unsubscribe_body(channel: str, user: str | None, client: str | None) -> dict[str, Any]:
    if (user is None) == (client is None):
        raise ValueError("give exactly one of user and client")
    if user is not None:
        return {"channel": channel, "user": user}
    return {"channel": channel, "client": client}


def _disconnect_body(user: str | None, client: str | None) -> dict[str, Any]:
    if (user is None) == (client is None):
        raise ValueError("give exactly one of user and client")
    return {"user": user} if user is not None else {"client": client}


def _history_body(
    channel: str, since: Mapping[str, Any] | None, limit: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": channel}
    if since is not None:
        body["since"] = dict(since)
    if limit is not None:
        body["limit"] = limit
    return body


def _subscribe_body(channel: str, user: str | None, client: str | None) -> dict[str, Any]:
    return _unsubscribe_body(channel, user, client)


def _publish_body(channel: str, data: Any, key: str | None) -> dict[str, Any]:
    """The body of one publish call; its key stays the same across retries."""
    return {"channel": channel, "data": data, "idempotency_key": key or uuid.uuid4().hex}


def _retryable(error: ApiError) -> bool:
    """A 503, or no answer at all (refused, reset, timed out): the server may be back soon."""
    return error.code == "unavailable" and error.status in (0, 503)


class _Base:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        *,
        retries: int = 3,
        retry_delay: float = 0.25,
    ) -> None:
        if retries < 0 or not retry_delay >= 0:
            raise ValueError("retries and retry_delay must be >= 0")
        self.base = url.rstrip("/")
        if self.base.startswith(("ws://", "wss://")):
            self.base = "http" + self.base[2:].removesuffix("/ws")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay

    def _backoff(self, attempt: int, error: ApiError, channel: str) -> float | None:
        """Seconds before retry `attempt` (1-based) of a failed publish, or None: give up."""
        if attempt > self.retries or not _retryable(error):
            return None
        # Exponential with full jitter, capped: many backends retrying at once spread out.
        delay = random.uniform(0, min(10.0, self.retry_delay * 2 ** (attempt - 1)))
        log.warning(
            "publish to %s failed (%s); retry %d of %d in %.2f s",
            channel,
            error,
            attempt,
            self.retries,
            delay,
        )
        return delay


class PlexusApi(_Base):
    """Synchronous client of the HTTP API (standard library only).

    Args:
        url: the server, e.g. `http://127.0.0.1:8000` (a `ws://…/ws` URL works too).
        api_key: one of the server's `api_keys` (none needed from loopback
            when the server has none configured).
        timeout: seconds per call (per attempt, for `publish`).
        retries: times `publish` is tried again after a 503 or no answer.
        retry_delay: seconds of the first retry's backoff (it doubles, capped at 10).
    """

    def _do(self, call: _Call) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base + call.path, data=call.body, method=call.method, headers=self.headers
        )
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return _result(response.status, response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                _refuse_redirect(exc.code, exc.headers.get("Location"))
                return _result(exc.code, exc.read())
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError("unavailable", f"cannot reach {self.base}: {reason}") from exc

    def publish(self, channel: str, data: Any, *, idempotency_key: str | None = None) -> int:
        """Publish `data` to `channel`; return its offset.

        Retried after a 503 or no answer, with one `idempotency_key` for every
        attempt (yours, or a new one): the message is published once.
        """
        call = _call("/api/publish", _publish_body(channel, data, idempotency_key))
        attempt = 0
        while True:
            try:
                return int(self._do(call)["offset"])
            except ApiError as error:
                attempt += 1
                delay = self._backoff(attempt, error, channel)
                if delay is None:
                    raise
                time.sleep(delay)

    def subscribe(self, channel: str, *, user: str | None = None, client: str | None = None) -> int:
        """Subscribe `user`'s connections (or connection `client`) to `channel`; return how many.

        Each gets the `subscribed` push, on every node.
        """
        body = _subscribe_body(channel, user, client)
        return int(self._do(_call("/api/subscribe", body))["subscribed"])

    def broadcast(self, channels: list[str], data: Any) -> list[dict[str, Any]]:
        """Publish `data` to each channel; return `[{"channel", "offset"}, ...]`."""
        body = {"channels": channels, "data": data}
        results: list[dict[str, Any]] = self._do(_call("/api/broadcast", body))["results"]
        return results

    def history(
        self, channel: str, *, since: Mapping[str, Any] | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """Kept messages after `since`: `{"messages", "offset", "epoch", "complete"}`.

        `since` is the protocol's `{"offset": N, "epoch": E}` (e.g. the
        `offset` and `epoch` of an earlier answer); without it, the oldest kept.
        """
        return self._do(_call("/api/history", _history_body(channel, since, limit)))

    def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """Who is in `channel`: `{client_id: {"user", "info"}}`."""
        clients: dict[str, dict[str, Any]] = self._do(_call("/api/presence", {"channel": channel}))[
            "clients"
        ]
        return clients

    def channels(self) -> dict[str, dict[str, Any]]:
        """Active channels of the node: `{name: {"subscribers": N}}`."""
        active: dict[str, dict[str, Any]] = self._do(_call("/api/channels", {}))["channels"]
        return active

    def disconnect(self, user: str | None = None, *, client: str | None = None) -> int:
        """Close every connection of `user`, or connection `client` (4001); return how many."""
        body = _disconnect_body(user, client)
        return int(self._do(_call("/api/disconnect", body))["disconnected"])

    def unsubscribe(
        self, channel: str, *, user: str | None = None, client: str | None = None
    ) -> int:
        """End `user`'s (or connection `client`'s) subscriptions to `channel`; return how many."""
        body = _unsubscribe_body(channel, user, client)
        return int(self._do(_call("/api/unsubscribe", body))["unsubscribed"])

    def info(self) -> dict[str, Any]:
        """Version and counters of the node."""
        return self._do(_call("/api/info"))


class AsyncPlexusApi(_Base):
    """The same API for asyncio, on aiohttp; use `async with` or call `close()`.

    Args:
        url, api_key, timeout: as for `PlexusApi`.
        session: an aiohttp session to share (not closed by `close()`).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
        *,
        retries: int = 3,
        retry_delay: float = 0.25,
    ) -> None:
        super().__init__(url, api_key, timeout, retries=retries, retry_delay=retry_delay)
        self._session = session
        self._own = session is None

    async def __aenter__(self) -> AsyncPlexusApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session this client opened."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    async def _do(self, call: _Call) -> dict[str, Any]:
        import aiohttp  # here: `import plexus.api` stays light

        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                call.method,
                self.base + call.path,
                data=call.body,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as response:
                _refuse_redirect(response.status, response.headers.get("Location"))
                return _result(response.status, await response.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ApiError("unavailable", f"cannot reach {self.base}: {exc}") from exc

    async def publish(self, channel: str, data: Any, *, idempotency_key: str | None = None) -> int:
        """Publish `data` to `channel`; return its offset (retried as `PlexusApi.publish`)."""
        call = _call("/api/publish", _publish_body(channel, data, idempotency_key))
        attempt = 0
        while True:
            try:
                return int((await self._do(call))["offset"])
            except ApiError as error:
                attempt += 1
                delay = self._backoff(attempt, error, channel)
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def subscribe(
        self, channel: str, *, user: str | None = None, client: str | None = None
    ) -> int:
        """Subscribe `user`'s connections (or connection `client`) to `channel`; return how many."""
        body = _subscribe_body(channel, user, client)
        return int((await self._do(_call("/api/subscribe", body)))["subscribed"])

    async def broadcast(self, channels: list[str], data: Any) -> list[dict[str, Any]]:
        """Publish `data` to each channel; return `[{"channel", "offset"}, ...]`."""
        answer = await self._do(_call("/api/broadcast", {"channels": channels, "data": data}))
        results: list[dict[str, Any]] = answer["results"]
        return results

    async def history(
        self, channel: str, *, since: Mapping[str, Any] | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """Kept messages after `since`: `{"messages", "offset", "epoch", "complete"}`.

        `since` is the protocol's `{"offset": N, "epoch": E}` (e.g. the
        `offset` and `epoch` of an earlier answer); without it, the oldest kept.
        """
        return await self._do(_call("/api/history", _history_body(channel, since, limit)))

    async def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """Who is in `channel`: `{client_id: {"user", "info"}}`."""
        answer = await self._do(_call("/api/presence", {"channel": channel}))
        clients: dict[str, dict[str, Any]] = answer["clients"]
        return clients

    async def channels(self) -> dict[str, dict[str, Any]]:
        """Active channels of the node: `{name: {"subscribers": N}}`."""
        active: dict[str, dict[str, Any]] = (await self._do(_call("/api/channels", {})))["channels"]
        return active

    async def disconnect(self, user: str | None = None, *, client: str | None = None) -> int:
        """Close every connection of `user`, or connection `client` (4001); return how many."""
        body = _disconnect_body(user, client)
        return int((await self._do(_call("/api/disconnect", body)))["disconnected"])

    async def unsubscribe(
        self, channel: str, *, user: str | None = None, client: str | None = None
    ) -> int:
        """End `user`'s (or connection `client`'s) subscriptions to `channel`; return how many."""
        body = _unsubscribe_body(channel, user, client)
        return int((await self._do(_call("/api/unsubscribe", body)))["unsubscribed"])

    async def info(self) -> dict[str, Any]:
        """Version and counters of the node."""
        return await self._do(_call("/api/info"))
