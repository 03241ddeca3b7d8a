"""The backend HTTP API under `/api/*`: publish, broadcast, history, presence, admin.

Every error is JSON `{"error": {"code", "message"}}` with the protocol's error
code and a fitting HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from plexus import __version__
from plexus.channels import validate_channel
from plexus.connection import published
from plexus.exceptions import BadRequest, PermissionDenied, PlexusError, TooLarge, Unauthorized
from plexus.node import Node
from plexus.protocol.codec import json_loads_with_bytes, to_json_compatible
from plexus.protocol.codes import HTTP_STATUS, ErrorCode
from plexus.protocol.commands import (
    check_payload,
    parse_idempotency_key,
    parse_limit,
    parse_since,
)
from plexus.protocol.pushes import publication_message
from plexus.transports.openapi import OPENAPI_PATH, openapi_handler
from plexus.transports.origin import host_allowed, is_loopback_address, origin_allowed

log = logging.getLogger("plexus.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_JSON = "application/json"


class _StatusError(BadRequest):
    """A `bad_request` answered with its own HTTP status instead of 400."""

    status = 400


class UnsupportedMediaType(_StatusError):
    """A POST body that is not sent as `application/json`."""

    status = 415


class RequestTimeout(_StatusError):
    """A body that did not arrive whole within `http_request_timeout`."""

    status = 408


def error_response(code: ErrorCode, message: str, *, status: int | None = None) -> web.Response:
    """A JSON error body with `status`, by default the one that belongs to `code`."""
    return web.json_response(
        {"error": {"code": code.value, "message": message}}, status=status or HTTP_STATUS[code]
    )


def json_body(payload: dict[str, Any]) -> web.Response:
    """A JSON response whose bytes payloads are shown as `{"$bytes": base64}`."""
    return web.json_response(to_json_compatible(payload))


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body, however many reads it takes, capped at `limit` bytes.

    One `read(n)` returns what has arrived so far: a body sent in several
    TCP segments would be cut. A body that stops coming is given up after
    `timeout` seconds, so that it cannot hold the socket forever.

    Raises:
        TooLarge: the body is over `limit`.
        RequestTimeout: it did not arrive whole in time.
        BadRequest: the client went away or broke the chunked encoding.
    """
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"request body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g} s") from None
    except (ConnectionError, web.RequestPayloadError) as exc:
        # The client went away, or broke the chunked encoding: nobody to tell.
        raise BadRequest(f"request body incomplete: {exc}") from None
    return b"".join(chunks)


class HttpApi:
    """Handlers of `/api/*`, bound to one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings

    def routes(self) -> list[web.AbstractRouteDef]:
        """The route table to add to the aiohttp application."""
        post = {
            "/api/publish": self.publish,
            "/api/broadcast": self.broadcast,
            "/api/history": self.history,
            "/api/presence": self.presence,
            "/api/channels": self.channels,
            "/api/disconnect": self.disconnect,
            "/api/subscribe": self.subscribe,
            "/api/unsubscribe": self.unsubscribe,
        }
        table: list[web.AbstractRouteDef] = [
            web.post(path, self._guard(handler)) for path, handler in post.items()
        ]
        table.append(web.get("/api/info", self._guard(self.info)))
        table.append(web.get(OPENAPI_PATH, openapi_handler))
        # Last: anything else under /api/ gets a JSON error, not aiohttp's text page.
        known = {**{path: "POST" for path in post}, "/api/info": "GET", OPENAPI_PATH: "GET"}
        table.append(web.route("*", "/api/{tail:.*}", self._fallback(known)))
        return table

    @staticmethod
    def _fallback(known: dict[str, str]) -> Handler:
        async def fallback(request: web.Request) -> web.StreamResponse:
            method = known.get(request.path)
            if method is None:
                return error_response(ErrorCode.NOT_FOUND, f"no API endpoint {request.path}")
            return web.json_response(
                {"error": {"code": "bad_request", "message": f"{request.path} takes {method}"}},
                status=405,
                headers={"Allow": method},
            )

        return fallback

    # ----- plumbing

    def _check_browser(self, request: web.Request) -> None:
        """Refuse what a browser sends on behalf of another site.

        A page elsewhere can make the victim's browser post here (CSRF: no
        preflight for a `no-cors` fetch or a form), and, by pointing its own
        name at this address, read the answers (DNS rebinding). The first
        carries its Origin, the second the attacker's name as Host; neither
        can set `Content-Type: application/json` without a CORS preflight,
        which this server never answers.
        """
        settings = self.settings
        headers = request.headers
        host = headers.get(hdrs.HOST)
        if not origin_allowed(
            headers.get(hdrs.ORIGIN),
            request.scheme,
            host,
            settings.allowed_origins,
            settings.allowed_hosts,
        ):
            raise PermissionDenied("origin not allowed")
        if not settings.api_keys and not host_allowed(host, settings.allowed_hosts):
            # Keyless, the API trusts the caller's address: a rebinding page's
            # requests come from the victim's own machine.
            raise PermissionDenied(
                "Host is not a name of this server: list it in allowed_hosts, or set api_keys"
            )
        if request.method == "POST" and request.body_exists and request.content_type != _JSON:
            raise UnsupportedMediaType(
                f"send the body as {_JSON} (Content-Type was {request.content_type})"
            )

    def _check_caller(self, request: web.Request) -> None:
        keys = self.settings.api_keys
        header = request.headers.get(hdrs.AUTHORIZATION, "")
        if keys:
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not given:
                raise Unauthorized("missing API key: send Authorization: Bearer <key>")
            # Compare against every key without an early exit (timing-safe).
            matches = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
            if not any(matches):
                raise Unauthorized("wrong API key")
        elif not is_loopback_address(request.remote):
            raise PermissionDenied("no API key configured: the API accepts loopback callers only")

    async def _read_body(self, request: web.Request) -> bytes:
        settings = self.settings
        return await read_body(request, settings.max_body_size, settings.http_request_timeout)

    async def read_json(self, request: web.Request) -> dict[str, Any]:
        """The request's body as a JSON object (`max_body_size`, `http_request_timeout`).

        Raises:
            BadRequest: the body is not a JSON object (or did not arrive whole).
            TooLarge: the body is over `max_body_size`.
        """
        return await self._json(request)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        body = await self._read_body(request)
        if not body:
            raise BadRequest("request body must be a JSON object")
        value = json_loads_with_bytes(body)
        if not isinstance(value, dict):
            raise BadRequest("request body must be a JSON object")
        return value

    def _guard(self, handler: Callable[[web.Request], Awaitable[web.Response]]) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                self._check_browser(request)
                self._check_caller(request)
                return await handler(request)
            except _StatusError as exc:
                response = error_response(exc.code, exc.message, status=exc.status)
                if isinstance(exc, RequestTimeout):
                    response.force_close()  # the rest of the body may never come
                return response
            except PlexusError as exc:
                return error_response(exc.code, exc.message)
            except Exception:
                log.exception("API %s failed", request.path)
                return error_response(ErrorCode.INTERNAL, "internal error")

        return guarded

    @staticmethod
    def _channel(body: dict[str, Any], key: str = "channel") -> str:
        value = body.get(key)
        if not isinstance(value, str):
            raise BadRequest(f'"{key}" must be a string')
        return validate_channel(value)

    @staticmethod
    def _name(body: dict[str, Any], key: str) -> str:
        """A user name or client id: a non-empty string."""
        value = body.get(key)
        if not isinstance(value, str) or not value:
            raise BadRequest(f'"{key}" must be a non-empty string')
        return value

    # ----- endpoints

    async def publish(self, request: web.Request) -> web.Response:
        """`POST /api/publish {"channel","data"}` -> `{"offset"}`."""
        return web.json_response(await self.run_publish(await self._json(request)))

    async def run_publish(self, body: dict[str, Any]) -> dict[str, Any]:
        """What `/api/publish` does with its body (the admin page's publish too)."""
        channel = self._channel(body)
        if "data" not in body:
            raise BadRequest('"data" is required')
        raw = check_payload(body["data"])
        result = await self.node.publish(
            channel, body["data"], raw=raw, key=parse_idempotency_key(body)
        )
        return published(result)

    async def broadcast(self, request: web.Request) -> web.Response:
        """`POST /api/broadcast {"channels": [...], "data"}` -> `{"results": [...]}`."""
        body = await self._json(request)
        channels = body.get("channels")
        if not isinstance(channels, list) or not channels:
            raise BadRequest('"channels" must be a non-empty list of channel names')
        if len(channels) > 1000:
            raise TooLarge("at most 1000 channels per broadcast")
        names = [self._channel({"channel": c}) for c in channels]
        if "data" not in body:
            raise BadRequest('"data" is required')
        raw = check_payload(body["data"])
        results = []
        for name in names:
            result = await self.node.publish(name, body["data"], raw=raw)
            results.append({"channel": name, "offset": result.offset})
        return web.json_response({"results": results})

    async def history(self, request: web.Request) -> web.Response:
        """`POST /api/history {"channel","since"?,"limit"?}` -> `{"messages","offset","epoch"}`."""
        body = await self._json(request)
        channel = self._channel(body)
        page, recoverable = await self.node.history_page(
            channel, since=parse_since(body), limit=parse_limit(body)
        )
        return json_body(
            {
                "messages": [publication_message(p) for p in page.publications],
                "offset": page.position.offset,
                "epoch": page.position.epoch,
                "complete": recoverable,
            }
        )

    async def presence(self, request: web.Request) -> web.Response:
        """`POST /api/presence {"channel"}` -> `{"clients": {id: {"user","info"}}}`."""
        body = await self._json(request)
        channel = self._channel(body)
        clients = await self.node.presence_of(channel)
        return json_body(
            {"clients": {cid: {"user": c.user, "info": c.info} for cid, c in clients.items()}}
        )

    async def channels(self, request: web.Request) -> web.Response:
        """`POST /api/channels` -> `{"channels": {name: {"subscribers": N}}}` (this node)."""
        if request.can_read_body:
            await self._json(request)
        hub = self.node.hub
        return web.json_response(
            {
                "channels": {
                    name: {"subscribers": hub.subscriber_count(name)} for name in hub.channels()
                }
            }
        )

    async def disconnect(self, request: web.Request) -> web.Response:
        """`POST /api/disconnect {"user" | "client"}` -> `{"disconnected": N}` (4001)."""
        return web.json_response(await self.run_disconnect(await self._json(request)))

    async def run_disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        """What `/api/disconnect` does with its body (the admin page's disconnect too)."""
        closed = await self.node.directory.disconnect_everywhere(**self._target(body))
        return {"disconnected": closed}

    def _target(self, body: dict[str, Any]) -> dict[str, str]:
        """The `user` or the `client` of a body that must name exactly one."""
        if ("user" in body) == ("client" in body):
            raise BadRequest('give exactly one of "user" and "client"')
        key = "user" if "user" in body else "client"
        return {key: self._name(body, key)}

    async def subscribe(self, request: web.Request) -> web.Response:
        """`POST /api/subscribe {"channel", "user" | "client"}` -> `{"subscribed": N}`.

        Subscribes the matching connections of every node on the server's
        initiative; each gets the `subscribed` push.
        """
        body = await self._json(request)
        channel = self._channel(body)
        made = await self.node.directory.subscribe_everywhere(channel, **self._target(body))
        return web.json_response({"subscribed": made})

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """`POST /api/unsubscribe {"channel", "user" | "client"}` -> `{"unsubscribed": N}`.

        Ends the matching subscriptions of every node; each connection gets the
        `unsubscribed` push and stays open.
        """
        return web.json_response(await self.run_unsubscribe(await self._json(request)))

    async def run_unsubscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        """What `/api/unsubscribe` does with its body (the admin page's unsubscribe too)."""
        channel = self._channel(body)
        ended = await self.node.directory.unsubscribe_everywhere(channel, **self._target(body))
        return {"unsubscribed": ended}

    async def info(self, request: web.Request) -> web.Response:
        """`GET /api/info` -> version and counters of this node, and every live node."""
        return web.json_response(
            {
                "version": __version__,
                "node": self.node.name,
                **self.node.stats(),
                "nodes": await self.node.nodes(),
            }
        )
