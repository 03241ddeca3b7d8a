"""examples/fastapi_mount: Plexus mounted in a FastAPI app whose own login decides.

The example app runs as its README says, in a real uvicorn (a child process
on a loopback socket the test binds), with its own plexus.toml.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from plexus.protocol.codes import CloseCode
from tests.examples.common import assert_team_refused, browser, receive
from tests.helpers import ROOT, TIMEOUT, UvicornProcess

EXAMPLE = ROOT / "examples" / "fastapi_mount"


@pytest.fixture
def example() -> Iterator[UvicornProcess]:
    with UvicornProcess("app:create_app", {"APP_SECRET_KEY": "s" * 32}, cwd=EXAMPLE) as uvicorn:
        yield uvicorn
    assert "Application shutdown complete" in uvicorn.output()


def ws_url(example: UvicornProcess) -> str:
    return example.url.replace("http", "ws", 1) + "/realtime/ws"


async def login(session: aiohttp.ClientSession, example: UvicornProcess, user: str) -> None:
    password = {"alice": "wonderland", "bob": "builder"}[user]
    async with session.post(
        example.url + "/login", json={"user": user, "password": password}
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_the_session_cookie_connects_and_a_view_notifies(example: UvicornProcess) -> None:
    async with browser() as alice, browser() as bob:
        await login(alice, example, "alice")
        # The WebSocket to the mount carries the app's session cookie, nothing else.
        ws = await alice.ws_connect(ws_url(example))
        welcome = await receive(ws)
        assert (welcome["type"], welcome["user"]) == ("welcome", "alice")
        subscribed = await receive(ws)
        assert (subscribed["type"], subscribed["channel"]) == ("subscribed", "#alice")

        # bob, logged in through the app, notifies alice through the app's view.
        await login(bob, example, "bob")
        async with bob.post(example.url + "/notify", json={"to": "alice", "text": "hi"}) as resp:
            assert resp.status == 200, await resp.text()
            offset = (await resp.json())["offset"]
        note = await receive(ws)
        assert (note["type"], note["channel"], note["offset"]) == ("message", "#alice", offset)
        assert note["data"] == {"from": "bob", "text": "hi"}

        # App code answers an rpc, knowing the connection's user.
        await ws.send_json({"type": "rpc", "id": 1, "method": "teams", "data": None})
        answer = await receive(ws)
        assert answer == {"type": "reply", "id": 1, "result": {"data": ["builders", "wonder"]}}

        # The subscribe hook reads the same session: teams are the app's.
        await ws.send_json({"type": "subscribe", "id": 2, "channel": "team:wonder"})
        assert (await receive(ws))["type"] == "reply"
        bob_ws = await bob.ws_connect(ws_url(example))
        assert (await receive(bob_ws))["user"] == "bob"
        await receive(bob_ws)  # subscribed to #bob
        await assert_team_refused(bob_ws)
        await ws.close()
        await bob_ws.close()


async def test_an_anonymous_upgrade_is_refused_by_the_app(example: UvicornProcess) -> None:
    async with browser() as stranger:
        ws = await stranger.ws_connect(ws_url(example))
        msg = await ws.receive(TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE,
            CloseCode.UNAUTHORIZED,
            "log in first",
        )
        async with stranger.post(example.url + "/notify", json={"to": "alice", "text": "x"}) as r:
            assert r.status == 401
        # A forged cookie (alice's name, not the app's signature) is a stranger too.
        forged = {"Cookie": "session=YWxpY2U=.0123"}
        ws = await stranger.ws_connect(ws_url(example), headers=forged)
        msg = await ws.receive(TIMEOUT)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, CloseCode.UNAUTHORIZED)
        # After logout, the same browser is a stranger again.
        await login(stranger, example, "alice")
        async with stranger.post(example.url + "/logout") as resp:
            assert resp.status == 200
        ws = await stranger.ws_connect(ws_url(example))
        msg = await ws.receive(TIMEOUT)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, CloseCode.UNAUTHORIZED)
