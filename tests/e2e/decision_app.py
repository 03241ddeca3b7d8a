"""A small application that decides for Plexus, reachable both ways the contract allows.

`DecisionApp` holds its sessions and its rules; `serve_proxies` serves them
as HTTP proxy endpoints (a real aiohttp web app on a loopback port), and this
module's `on_*` functions are the same rules as a hooks module (`hooks =
"tests.e2e.decision_app"`), some async, some plain (run in a worker thread).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any

from aiohttp import web

from plexus.decisions.calls import Request
from tests.helpers import TIMEOUT

SESSIONS = {"s-alice": "alice", "s-bob": "bob"}


class DecisionApp:
    """The application's rules; `mode` makes it misbehave: `hang`, `status`, `garbage`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.mode = "ok"
        self.session_ttl: float | None = None  # connect answers expire_at = now + this
        self.refreshes: list[Any] = []  # answers of the next refresh calls, in order
        # End every hang (test teardown): sync hooks wait in worker threads.
        self._released = threading.Event()
        self._released_here = asyncio.Event()

    def release(self) -> None:
        self._released.set()
        self._released_here.set()

    def calls_of(self, call: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
        return [(body, headers) for name, body, headers in self.calls if name == call]

    def answer(self, call: str, body: dict[str, Any], headers: Mapping[str, str]) -> Any:
        """The rules: what the application answers to `call`."""
        self.calls.append((call, body, {k.lower(): v for k, v in headers.items()}))
        return getattr(self, call)(body, {k.lower(): v for k, v in headers.items()})

    async def hang(self) -> None:
        await asyncio.wait_for(self._released_here.wait(), TIMEOUT)

    def hang_sync(self) -> None:
        self._released.wait(TIMEOUT)

    # ----- the rules

    def connect(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        cookie = SimpleCookie(headers.get("cookie", ""))
        session = cookie.get("session")
        user = SESSIONS.get(session.value) if session is not None else None
        if user is None:
            return {"error": {"code": "unauthorized", "message": "log in first"}}
        result: dict[str, Any] = {
            "user": user,
            "info": {"name": user.title()},
            "channels": [f"#{user}"],
        }
        if self.session_ttl is not None:
            result["expire_at"] = time.time() + self.session_ttl
        return {"result": result}

    def refresh(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        return self.refreshes.pop(0) if self.refreshes else {"result": {"expired": True}}

    def subscribe(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        if body["channel"].endswith(":secret"):
            return {"error": {"code": "permission_denied", "message": "members only"}}
        return {"result": {"info": {"name": body.get("user"), "checked": True}}}

    def publish(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        data = body["data"]
        if isinstance(data, dict) and data.get("text") == "spam":
            return {"error": {"code": "permission_denied", "message": "no spam"}}
        if isinstance(data, dict) and "shout" in data:
            return {"result": {"data": {"text": data["shout"].upper(), "by": body.get("user")}}}
        return {"result": {}}

    def rpc(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        if body["method"] == "whoami":
            return {"result": {"data": {"user": body.get("user"), "args": body["data"]}}}
        return {"error": {"code": "not_found", "message": f"no method {body['method']}"}}


async def serve_proxies(app: DecisionApp) -> web.AppRunner:
    """The rules as HTTP proxy endpoints `POST /{call}` on a loopback port (`runner.port`)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        call = request.match_info["call"]
        body = await request.json()
        if app.mode == "hang":
            await app.hang()
        if app.mode == "status":
            return web.Response(status=502, text="bad gateway")
        if app.mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        return web.json_response(app.answer(call, body, request.headers))

    web_app = web.Application()
    web_app.add_routes([web.post("/{call}", handle)])
    runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner


# ----- the same rules as a hooks module

CURRENT: DecisionApp | None = None


def _app() -> DecisionApp:
    assert CURRENT is not None, "the test sets decision_app.CURRENT"
    return CURRENT


async def _async(call: str, request: Request) -> Any:
    app = _app()
    if app.mode == "hang":
        await app.hang()
    if app.mode == "garbage":
        return "not an answer"
    return app.answer(call, request.body(), request.headers)


def _sync(call: str, request: Request) -> Any:
    app = _app()
    if app.mode == "hang":
        app.hang_sync()
    if app.mode == "garbage":
        return ["not", "an", "answer"]
    return app.answer(call, request.body(), request.headers)


async def on_connect(request: Request) -> Any:
    return await _async("connect", request)


async def on_subscribe(request: Request) -> Any:
    return await _async("subscribe", request)


async def on_publish(request: Request) -> Any:
    return await _async("publish", request)


def on_refresh(request: Request) -> Any:
    return _sync("refresh", request)


def on_rpc(request: Request) -> Any:
    return _sync("rpc", request)
