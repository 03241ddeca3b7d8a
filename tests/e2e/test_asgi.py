"""End-to-end: Plexus mounted in a FastAPI app, served by a real uvicorn.

The host apps are in `tests/e2e/asgi_host.py` (Plexus at `/realtime`); each
runs in a child `uvicorn` on a loopback socket the test binds
(`UvicornProcess`). Native nodes are `plexus serve` processes, and the Redis
engine is a real redis-server (the `redis_server` fixture).
"""

from __future__ import annotations

import asyncio
import signal
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plexus.asgi import PlexusApp, Scope, create_app, mount
from plexus.exceptions import ConfigError
from plexus.protocol.codes import CloseCode
from tests.e2e.test_scale_out import node_env
from tests.helpers import TIMEOUT, RedisServer, ServerProcess, UvicornProcess, serve_refused

HOST_APP = "tests.e2e.asgi_host:fastapi_app"
KEY = "k-asgi-test-key"
MAX_MESSAGE = 4096
MAX_BODY = 8192
# Small limits, so that "too large" is cheap to reach; the same file configures
# the native server the mount is compared with.
CONFIG = f"""
api_keys = ["{KEY}"]
publish_rate = 0
max_message_size = {MAX_MESSAGE}
max_body_size = {MAX_BODY}
"""
# uvicorn closes its WebSockets with 1012 (service restart) when it shuts
# down, before the host's lifespan stops Plexus (which would say 1001): both
# tell a client to reconnect.
RECONNECT_CLOSES = {CloseCode.GOING_AWAY, 1012}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as client:
        yield client


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "plexus.toml"
    path.write_text(CONFIG)
    return path


def mounted(uvicorn: UvicornProcess) -> str:
    """The base URL of the mounted Plexus."""
    return uvicorn.url + "/realtime"


def ws_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/ws"


async def receive(ws: aiohttp.ClientWebSocketResponse) -> Any:
    msg = await ws.receive(TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return msg.json()


class Peer:
    """A WebSocket client that keeps the messages it reads while waiting for a reply."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: Any) -> None:
        self.ws = ws
        self.welcome = welcome
        self.messages: deque[Any] = deque()

    async def reply(self, command: dict[str, Any]) -> Any:
        """Send a command and return its reply or error."""
        await self.ws.send_json(command)
        while True:
            answer = await receive(self.ws)
            if answer.get("id") == command["id"]:
                return answer
            if answer["type"] == "message":
                self.messages.append(answer)

    async def publish(self, channel: str, data: Any, id_: int) -> None:
        answer = await self.reply({"type": "publish", "id": id_, "channel": channel, "data": data})
        assert answer["type"] == "reply", answer

    async def message(self) -> Any:
        """The next `message` push (join/leave pushes skipped)."""
        while not self.messages:
            push = await receive(self.ws)
            if push["type"] == "message":
                return push
        return self.messages.popleft()


async def joined(session: aiohttp.ClientSession, base: str, channel: str) -> Peer:
    """A WebSocket to `base` subscribed to `channel`."""
    ws = await session.ws_connect(ws_url(base))
    welcome = await receive(ws)
    assert welcome["type"] == "welcome"
    peer = Peer(ws, welcome)
    answer = await peer.reply({"type": "subscribe", "id": 1, "channel": channel})
    assert answer["type"] == "reply", answer
    return peer


# ----- the ASGI protocol in-process (no uvicorn): lifespan events and mount()


async def lifespan(app: PlexusApp, *events: str) -> list[dict[str, Any]]:
    """Run the ASGI lifespan protocol with `events`; what the app sent back."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for event in events:
        inbox.put_nowait({"type": event})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await asyncio.wait_for(app(scope, receive, send), TIMEOUT)
    return sent


async def test_the_lifespan_starts_and_stops_the_node(tmp_path: Any) -> None:
    app = create_app(env={}, engine="memory", data_dir=str(tmp_path))
    sent = await lifespan(app, "lifespan.startup", "lifespan.shutdown")
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not app.started
    with pytest.raises(RuntimeError, match="plexus was stopped"):
        await app.startup()


async def test_hooks_that_cannot_load_fail_the_startup_in_one_line(tmp_path: Any) -> None:
    app = create_app(env={}, engine="memory", data_dir=str(tmp_path), hooks="no.such.hooks")
    sent = await lifespan(app, "lifespan.startup")
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("plexus: hooks: cannot import 'no.such.hooks'")
    assert "\n" not in sent[0]["message"]
    with pytest.raises(ConfigError, match="hooks: cannot import"):
        async with app.lifespan():
            pass  # pragma: no cover - the start fails


async def test_mount_sends_its_path_to_plexus_and_the_rest_to_the_host(tmp_path: Any) -> None:
    plexus_app = create_app(env={}, engine="memory", data_dir=str(tmp_path))
    seen: list[Scope] = []

    async def host(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)

    app = mount(host, plexus_app, "/rt/")
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async with plexus_app.lifespan():
        await app({"type": "http", "path": "/rtx", "root_path": ""}, receive, send)
        assert [s["path"] for s in seen] == ["/rtx"]
        scope = {"type": "http", "path": "/rt/nothing", "root_path": "", "headers": []}
        await app(scope, receive, send)
    assert len(seen) == 1
    assert sent[0]["status"] == 404
    assert b"no route /nothing" in sent[-1]["body"]


# ----- under a real uvicorn


async def test_mounted_app_serves_websocket_api_script_and_health(
    session: aiohttp.ClientSession, config: Path
) -> None:
    env = {"PLEXUS_CONFIG": str(config), "PLEXUS_ENGINE": "memory"}
    uvicorn = UvicornProcess(HOST_APP, env).start()
    try:
        base = mounted(uvicorn)
        async with session.get(uvicorn.url + "/") as resp:
            assert (resp.status, await resp.json()) == (200, {"app": "host"})
        async with session.get(base + "/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with session.get(base + "/plexus.js") as resp:
            assert resp.status == 200
            assert "javascript" in resp.headers["content-type"]
            assert (await resp.text()).startswith("// plexus.js")

        peer = await joined(session, base, "chat:mount")
        assert peer.welcome["max_message_size"] == MAX_MESSAGE
        # Over the WebSocket of the mount.
        await peer.publish("chat:mount", {"n": 1}, 2)
        assert (await peer.message())["data"] == {"n": 1}
        # Through the HTTP API of the mount, with the API key.
        async with session.post(
            base + "/api/publish",
            json={"channel": "chat:mount", "data": {"n": 2}},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            offset = (await resp.json())["offset"]
        push = await peer.message()
        assert (push["data"], push["offset"]) == ({"n": 2}, offset)
        # A view of the host app publishing in-process.
        async with session.post(
            uvicorn.url + "/announce/chat:mount", params={"text": "from a view"}
        ) as resp:
            assert resp.status == 200, await resp.text()
        assert (await peer.message())["data"] == {"text": "from a view"}

        # Lifespan: stopping uvicorn stops Plexus, closes the client, and exits.
        stopping = asyncio.get_running_loop().run_in_executor(None, uvicorn.stop)
        closed = await peer.ws.receive(TIMEOUT)
        assert closed.type is aiohttp.WSMsgType.CLOSE
        assert closed.data in RECONNECT_CLOSES
        status = await asyncio.wait_for(stopping, 2 * TIMEOUT)
    finally:
        uvicorn.kill()
    # uvicorn re-raises the SIGTERM it handled once it has shut down.
    assert status in (0, -signal.SIGTERM), uvicorn.output()
    output = uvicorn.output()
    assert "Application startup complete" in output
    assert "Application shutdown complete" in output
    assert "Traceback" not in output


async def probe(session: aiohttp.ClientSession, base: str) -> list[Any]:
    """Feed a server bad input; what it answered to each, in order."""
    seen: list[Any] = []
    auth = {"Authorization": f"Bearer {KEY}"}

    async def error_of(command: Any) -> Any:
        ws = await session.ws_connect(ws_url(base))
        try:
            assert (await receive(ws))["type"] == "welcome"
            if isinstance(command, str):
                await ws.send_str(command)
            else:
                await ws.send_json(command)
            msg = await ws.receive(TIMEOUT)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return ("close", msg.data)
            answer = msg.json()
            return (answer["type"], answer.get("code"))
        finally:
            await ws.close()

    seen.append(await error_of("{not json"))
    seen.append(await error_of("x" * (MAX_MESSAGE + 1)))
    seen.append(await error_of({"type": "subscribe", "id": 1, "channel": "bad channel!"}))
    # The default namespace is read-only for clients.
    seen.append(await error_of({"type": "publish", "id": 1, "channel": "news", "data": 1}))
    seen.append(await error_of({"type": "launch", "id": 1}))

    async def api(body: bytes, headers: dict[str, str]) -> Any:
        async with session.post(
            base + "/api/publish",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as resp:
            return (resp.status, (await resp.json())["error"]["code"])

    seen.append(await api(b"{", auth))
    seen.append(await api(b'{"channel": "chat:a", "data": 1}', {}))
    seen.append(await api(b'{"channel": "chat:a", "data": 1}', {"Authorization": "Bearer no"}))
    seen.append(await api(b'{"channel": "bad channel!", "data": 1}', auth))
    seen.append(await api(b'{"channel": "chat:a", "data": "%s"}' % (b"x" * MAX_BODY), auth))
    async with session.get(base + "/api/nothing-here") as resp:
        seen.append((resp.status, (await resp.json())["error"]["code"]))
    return seen


async def test_bad_input_through_the_mount_gets_the_native_answers(
    session: aiohttp.ClientSession, config: Path
) -> None:
    env = {"PLEXUS_CONFIG": str(config), "PLEXUS_ENGINE": "memory"}
    with ServerProcess(env=env) as native, UvicornProcess(HOST_APP, env) as uvicorn:
        expected = await probe(session, native.url)
        assert await probe(session, mounted(uvicorn)) == expected
    assert expected == [
        ("error", "bad_request"),
        ("close", CloseCode.MESSAGE_TOO_BIG),
        ("error", "invalid_channel"),
        ("error", "permission_denied"),
        ("error", "unknown_type"),
        (400, "bad_request"),
        (401, "unauthorized"),
        (401, "unauthorized"),
        (400, "invalid_channel"),
        (413, "too_large"),
        (404, "not_found"),
    ]


async def test_chat_between_the_mounted_app_and_a_native_node_on_one_redis(
    session: aiohttp.ClientSession, redis_server: RedisServer, redis_prefix: str
) -> None:
    env = node_env(redis_server, redis_prefix)
    with ServerProcess(env=env) as native, UvicornProcess(HOST_APP, env) as uvicorn:
        room = "chat:bridge"
        app_client = await joined(session, mounted(uvicorn), room)
        serve_client = await joined(session, native.url, room)
        assert app_client.welcome["node"] != serve_client.welcome["node"]
        await app_client.publish(room, "hi from the app", 2)
        assert (await serve_client.message())["data"] == "hi from the app"
        await serve_client.publish(room, "hi from serve", 2)
        assert (await app_client.message())["data"] == "hi from the app"
        assert (await app_client.message())["data"] == "hi from serve"
        await app_client.ws.close()
        await serve_client.ws.close()


async def test_uvicorn_workers_share_channels_through_redis(
    session: aiohttp.ClientSession, redis_server: RedisServer, redis_prefix: str
) -> None:
    env = node_env(redis_server, redis_prefix)
    with UvicornProcess(HOST_APP, env, workers=2) as uvicorn:
        base = mounted(uvicorn)
        # The kernel spreads connections over the two workers (each a node):
        # open clients until two nodes answered (bounded: it would take absurd
        # luck to need them all).
        clients: dict[str, Peer] = {}
        opened: list[Peer] = []
        try:
            for _ in range(40):
                peer = await joined(session, base, "chat:workers")
                opened.append(peer)
                clients.setdefault(peer.welcome["node"], peer)
                if len(clients) == 2:
                    break
            assert len(clients) == 2, "every connection landed on one worker"
            first, second = clients.values()
            await first.publish("chat:workers", "across", 2)
            assert (await second.message())["data"] == "across"
            await second.publish("chat:workers", "back", 3)
            assert (await first.message())["data"] == "across"
            assert (await first.message())["data"] == "back"
        finally:
            for peer in opened:
                await peer.ws.close()
    assert uvicorn.output().count("Application startup complete") == 2


@pytest.mark.parametrize(
    ("engine", "named"),
    [("memory", "the memory engine"), ("sqlite", "the sqlite engine")],
)
def test_a_second_worker_without_redis_is_refused_in_one_line(
    tmp_path: Path, engine: str, named: str
) -> None:
    env = {"PLEXUS_ENGINE": engine, "PLEXUS_DATA_DIR": str(tmp_path / "data")}
    uvicorn = UvicornProcess(HOST_APP, env, workers=2).launch()
    try:
        # uvicorn stops every worker when one fails to start, and exits by itself.
        uvicorn.wait(3 * TIMEOUT)
    finally:
        uvicorn.kill()
    refusals = [line for line in uvicorn.lines if line.startswith("plexus: ")]
    assert len(refusals) == 1, uvicorn.output()
    assert refusals[0].startswith("plexus: engine: another process (pid ")
    shared = "processes share channels only through the redis engine"
    assert f"with {named}, and {shared}" in refusals[0]
    assert 'set engine = "redis"' in refusals[0]
    assert "failed to start, stopping the parent process" in uvicorn.output()


async def test_a_host_without_a_router_mounts_with_plexus_asgi_mount(
    session: aiohttp.ClientSession, config: Path
) -> None:
    # Behind a proxy that serves the site under /site and strips it: uvicorn's
    # --root-path puts it back in the scope, and the mount lies below it.
    env = {"PLEXUS_CONFIG": str(config), "PLEXUS_ENGINE": "memory"}
    args = ["--root-path", "/site"]
    uvicorn = UvicornProcess("tests.e2e.asgi_host:django_like_app", env, args).start()
    try:
        async with session.get(uvicorn.url + "/other") as resp:
            assert (resp.status, await resp.text()) == (200, "host /site/other")
        base = mounted(uvicorn)
        async with session.get(base + "/health") as resp:
            assert resp.status == 200
        async with session.get(base + "/nothing") as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (404, "not_found")
        peer = await joined(session, base, "chat:plain")
        await peer.publish("chat:plain", "through mount()", 2)
        assert (await peer.message())["data"] == "through mount()"
        await peer.ws.close()
    finally:
        status = uvicorn.stop()
    assert status in (0, -signal.SIGTERM), uvicorn.output()
    # The lifespan events went to Plexus: it started before the first request.
    output = uvicorn.output()
    assert "Application startup complete" in output
    assert "Application shutdown complete" in output
    assert "lazily started" not in output


async def test_without_the_lifespan_plexus_starts_at_the_first_request(
    session: aiohttp.ClientSession, config: Path
) -> None:
    env = {"PLEXUS_CONFIG": str(config), "PLEXUS_ENGINE": "memory", "PLEXUS_LOG_LEVEL": "info"}
    with UvicornProcess("tests.e2e.asgi_host:lazy_app", env) as uvicorn:
        assert "lazily started" not in uvicorn.output()
        peer = await joined(session, mounted(uvicorn), "chat:lazy")
        await peer.publish("chat:lazy", "late", 2)
        assert (await peer.message())["data"] == "late"
        await peer.ws.close()
    assert uvicorn.output().count("plexus lazily started by a request") == 1


def test_a_native_server_on_the_mounted_apps_sqlite_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    env = {"PLEXUS_ENGINE": "sqlite", "PLEXUS_DATA_DIR": data_dir}
    with UvicornProcess(HOST_APP, env) as uvicorn:
        line = serve_refused(["--port", "0"], env)
        assert uvicorn.proc is not None
        # uvicorn without --workers serves in its own process: the pid named is its.
        assert line.startswith(
            f"plexus: data_dir: {data_dir} is in use by another process (pid {uvicorn.proc.pid})"
        )
        assert 'share channels with engine = "redis"' in line
