"""plexus.asgi without a server: paths below a mount, bad arguments, the lifespan protocol.

The mounted app under a real uvicorn is tested in tests/e2e/test_asgi.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from plexus.asgi import PlexusApp, Scope, create_app, mount, route_path
from plexus.config import Settings
from plexus.exceptions import ConfigError


@pytest.mark.parametrize(
    ("path", "root", "below"),
    [
        ("/rt/ws", "/rt", "/ws"),
        ("/site/rt/api/publish", "/site/rt", "/api/publish"),
        ("/rt", "/rt", "/"),
        ("/ws", "", "/ws"),
        # A server that left the prefix out of `path` already.
        ("/ws", "/rt", "/ws"),
        # A prefix of a longer segment is not the mount.
        ("/rtx/ws", "/rt", "/rtx/ws"),
    ],
)
def test_route_path_is_the_path_below_the_mount(path: str, root: str, below: str) -> None:
    assert route_path({"path": path, "root_path": root}) == below


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_app(env={}, engine="cassandra"), "engine: must be memory, sqlite, redis"),
        (lambda: create_app(env={}, enginee="redis"), "enginee: unknown setting"),
        (lambda: create_app(env={}, engine=3), "create_app: engine must be an Engine or"),
        (lambda: create_app(Settings(), port=1), "create_app: give settings, or config_file"),
        (lambda: create_app(env={"PLEXUS_MAX_MESSAGE_SIZE": "big"}), "PLEXUS_MAX_MESSAGE_SIZE"),
        (lambda: create_app(config_file="/nonexistent/p.toml", env={}), "config: no such file"),
        (lambda: create_app(env={}, engine="redis", redis_url="http://x"), "redis_url"),
        (lambda: mount(None, create_app(env={}), "rt"), "mount: path must start with /"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(call: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


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
    await asyncio.wait_for(app(scope, receive, send), 10)
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
