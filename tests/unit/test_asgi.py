"""plexus.asgi without a server: paths below a mount, bad arguments.

The ASGI protocol in-process and the mounted app under a real uvicorn are
tested in tests/e2e/test_asgi.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from plexus.asgi import create_app, mount, route_path
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
