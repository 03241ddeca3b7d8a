"""examples/flask_session: the Flask app's own login decides who talks to Plexus.

The example app runs in werkzeug's real HTTP server on a loopback port (a
thread), Plexus in-process with the example's plexus.toml pointed at it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from werkzeug.serving import BaseWSGIServer, make_server

from plexus.app import Server
from plexus.config import load_settings
from plexus.protocol.codes import CloseCode
from tests.examples.common import assert_team_refused, browser, receive
from tests.helpers import ROOT, TIMEOUT

EXAMPLE = ROOT / "examples" / "flask_session"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_session_app", EXAMPLE / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Apps:
    """The Flask app and Plexus, each on its own loopback port (the test's view of them)."""

    flask_url: str
    plexus: Server


@pytest.fixture
def flask_server() -> Iterator[tuple[BaseWSGIServer, list[str]]]:
    """The example app on a free port; its Plexus URL is filled in once Plexus runs."""
    plexus_url: list[str] = []
    example = load_example()

    class LateUrlApp:
        """Build the Flask app at the first request, when Plexus's port is known."""

        def __init__(self) -> None:
            self.app: Any = None
            self.lock = threading.Lock()

        def __call__(self, environ: Any, start_response: Any) -> Any:
            with self.lock:
                if self.app is None:
                    self.app = example.create_app(plexus_url[0], secret_key="s" * 32)
            return self.app(environ, start_response)

    server = make_server("127.0.0.1", 0, LateUrlApp(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, plexus_url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.fixture
async def apps(
    flask_server: tuple[BaseWSGIServer, list[str]], tmp_path: Path
) -> AsyncIterator[Apps]:
    server, plexus_url = flask_server
    flask_url = f"http://127.0.0.1:{server.server_port}"
    # The example's own configuration, with the ports of this test.
    config = (EXAMPLE / "plexus.toml").read_text().replace("127.0.0.1:5000", flask_url[7:])
    path = tmp_path / "plexus.toml"
    path.write_text(config)
    settings = load_settings(path, {}, {"port": 0, "history_backend": "memory"})
    plexus = Server(settings)
    await plexus.start()
    plexus_url.append(plexus.url)
    made = Apps()
    made.flask_url, made.plexus = flask_url, plexus
    try:
        yield made
    finally:
        await plexus.stop()


async def login(session: aiohttp.ClientSession, apps: Apps, user: str, password: str) -> None:
    async with session.post(
        apps.flask_url + "/login", data={"user": user, "password": password}
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_the_session_cookie_connects_and_a_view_notifies(apps: Apps) -> None:
    async with browser() as alice, browser() as bob:
        await login(alice, apps, "alice", "wonderland")
        # The WebSocket to Plexus carries the Flask session cookie, nothing else.
        ws = await alice.ws_connect(apps.plexus.ws_url)
        welcome = await receive(ws)
        assert (welcome["type"], welcome["user"]) == ("welcome", "alice")
        subscribed = await receive(ws)
        assert (subscribed["type"], subscribed["channel"]) == ("subscribed", "#alice")

        # bob, logged in through the app, notifies alice through the app's view.
        await login(bob, apps, "bob", "builder")
        async with bob.post(
            apps.flask_url + "/notify", data={"to": "alice", "text": "hello"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            offset = (await resp.json())["offset"]
        note = await receive(ws)
        assert (note["type"], note["channel"], note["offset"]) == ("message", "#alice", offset)
        assert note["data"] == {"from": "bob", "text": "hello"}

        # The subscribe proxy reads the same session: teams are the app's.
        await ws.send_json({"type": "subscribe", "id": 1, "channel": "team:wonder"})
        assert (await receive(ws))["type"] == "reply"
        bob_ws = await bob.ws_connect(apps.plexus.ws_url)
        assert (await receive(bob_ws))["user"] == "bob"
        await receive(bob_ws)  # subscribed to #bob
        await assert_team_refused(bob_ws)
        await ws.close()
        await bob_ws.close()


async def test_an_anonymous_upgrade_is_refused_by_the_app(apps: Apps) -> None:
    async with browser() as stranger:
        ws = await stranger.ws_connect(apps.plexus.ws_url)
        msg = await ws.receive(TIMEOUT)
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE,
            CloseCode.UNAUTHORIZED,
            "log in first",
        )
        async with stranger.post(apps.flask_url + "/notify", data={"to": "alice"}) as resp:
            assert resp.status == 401
        # After logout, the same browser is a stranger again.
        await login(stranger, apps, "alice", "wonderland")
        async with stranger.post(apps.flask_url + "/logout") as resp:
            assert resp.status == 200
        ws = await stranger.ws_connect(apps.plexus.ws_url)
        msg = await ws.receive(TIMEOUT)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, CloseCode.UNAUTHORIZED)
