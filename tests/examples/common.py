"""What the example apps' tests share: a browser-like HTTP client and the checks both apps pass."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.helpers import TIMEOUT


def browser() -> aiohttp.ClientSession:
    """A browser's cookie jar: keeps the app's session cookie (of an IP host, hence unsafe)."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    )


async def receive(ws: aiohttp.ClientWebSocketResponse) -> Any:
    """The next message, which must be a JSON text frame."""
    msg = await ws.receive(TIMEOUT)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return msg.json()


async def assert_team_refused(bob_ws: aiohttp.ClientWebSocketResponse) -> None:
    """Bob (not in team wonder) is refused its channel by the app, and stays connected."""
    await bob_ws.send_json({"type": "subscribe", "id": 1, "channel": "team:wonder"})
    refused = await receive(bob_ws)
    assert (refused["type"], refused["code"], refused["message"]) == (
        "error",
        "permission_denied",
        "not a member of wonder",
    )
    await bob_ws.send_json({"type": "ping", "id": 2})
    assert (await receive(bob_ws))["type"] == "pong", "the connection stays open"
