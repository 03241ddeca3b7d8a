"""Plexus as an ASGI 3 application: mount it in FastAPI, Starlette or Django.

    from fastapi import FastAPI
    from plexus.asgi import create_app

    plexus_app = create_app(hooks="myapp.plexus_hooks")   # settings as for `plexus serve`
    app = FastAPI(lifespan=plexus_app.lifespan)           # starts and stops the node
    app.mount("/realtime", plexus_app)                     # ws://HOST/realtime/ws

Below its mount path (the scope's `root_path`) it serves the WebSocket `/ws`
and, over HTTP, `/api/*`, `/plexus.js`, `/health`, `/ready` and `/metrics`,
with the native server's code (`transports/asgi.py`, `transports/asgi_http.py`)
and the same answers. The chat demo (`/`) and the admin page (`/admin`) are a
native server's only: 404 here.

Starting and stopping. The node (engine, hub, heartbeat) starts on the ASGI
`lifespan.startup` event when this app is the server's own, and stops on
`lifespan.shutdown`. Starlette and FastAPI do not pass lifespan events to
mounted apps: give the host app `plexus_app.lifespan` (or enter
`async with plexus_app.lifespan():` in its own). Without either, the node
starts at the first request (`lazily started` in the log) and is never
stopped gracefully.

Processes. The node belongs to one process. With `uvicorn --workers N` (or
gunicorn) each worker is a node, and they share channels only through the
Redis engine; with the memory or SQLite engine a second worker is refused at
startup with one line (see `plexus.sharing`), and uvicorn stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import orjson

from plexus.app import Server
from plexus.channels import validate_channel
from plexus.config import Settings, load_settings
from plexus.connection import published
from plexus.engines.base import Engine
from plexus.exceptions import ConfigError
from plexus.node import Node, RpcHandler
from plexus.protocol.commands import check_payload, parse_idempotency_key
from plexus.sharing import claim_addresses, listening_addresses
from plexus.transports.asgi import Receive, Scope, Send, refuse, serve_websocket
from plexus.transports.asgi_http import serve_http
from plexus.transports.link import Refusal

__all__ = ["PlexusApp", "Receive", "Scope", "Send", "create_app", "mount"]

log = logging.getLogger("plexus")

# The HTTP paths served besides `/api/*` (below the mount path).
HTTP_PATHS: Final = frozenset({"/health", "/ready", "/metrics", "/plexus.js"})
_JSON: Final = [(b"content-type", b"application/json; charset=utf-8")]


def route_path(scope: Scope) -> str:
    """The request's path below the mount (`path` minus `root_path`), as Starlette reads it.

    ASGI servers and Starlette's `Mount` keep the full path in `path` and the
    mount's prefix in `root_path`; a server that already left the prefix out
    of `path` gives a path that does not start with it, used as it is.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    if not rest:
        return "/"
    return rest if rest.startswith("/") else path


class PlexusApp:
    """The ASGI application (`create_app` makes it).

    Attributes:
        settings: the validated settings.
        server: the native `Server` whose node, endpoint and HTTP handlers
            this serves (it binds no socket of its own).
    """

    def __init__(
        self, settings: Settings, *, hooks: object = None, engine: Engine | None = None
    ) -> None:
        self.settings = settings
        self.server = Server(settings, engine=engine, hooks=hooks, handle_signals=False)
        self._shared_engine = engine is not None or settings.broker == "redis"
        self._starting: asyncio.Task[None] | None = None
        self._stopped = False

    # ----- the application's own API

    def rpc(self, method: str) -> Callable[[RpcHandler], RpcHandler]:
        """Decorator: answer the `rpc` command for `method` with an async function."""
        return self.server.rpc(method)

    @property
    def node(self) -> Node:
        """The running node (raises before the start)."""
        node = self.server.node
        if node is None or not self.started:
            raise RuntimeError("plexus is not started: see PlexusApp.lifespan")
        return node

    @property
    def started(self) -> bool:
        """Whether the node runs."""
        task = self._starting
        return (
            not self._stopped
            and task is not None
            and task.done()
            and not task.cancelled()
            and task.exception() is None
        )

    async def publish(
        self, channel: str, data: Any, *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish from the application's own code, in-process: `{"offset", "epoch"}`.

        What `POST /api/publish` does, without HTTP (starts the node if it is
        not running yet).

        Raises:
            PlexusError: `invalid_channel`, `bad_request` (data that is not
                JSON, or a bad key), `unavailable` (the engine is down).
        """
        await self.startup()
        raw = check_payload(data)
        key = parse_idempotency_key({"idempotency_key": idempotency_key})
        result = await self.node.publish(validate_channel(channel), data, raw=raw, key=key)
        return published(result)

    # ----- lifespan

    async def startup(self) -> None:
        """Start the node, once (later calls wait for the same start, or raise its error).

        Raises:
            ConfigError: the settings cannot run here (e.g. a second worker
                on the memory engine), in one line.
        """
        if self._stopped:
            raise RuntimeError("plexus was stopped")
        task = self._starting
        if task is None or (task.done() and _retryable(task)):
            task = self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(task)

    async def _start(self) -> None:
        server = self.server
        try:
            if not self._shared_engine:
                engine = self.settings.engine or (
                    "sqlite" if self.settings.history_backend == "sqlite" else "memory"
                )
                claim_addresses(server.claim, listening_addresses(), engine)
            await server.start(listen=False)
        except BaseException:
            server.claim.release()
            raise
        node = server.node
        log.info(
            "plexus started in process %d: node %s, engine %s",
            os.getpid(),
            node.name if node is not None else "?",
            self.settings.engine or self.settings.broker,
        )

    async def shutdown(self) -> None:
        """Close every connection with 1001 and stop the node (within `shutdown_timeout`)."""
        if self._stopped:
            return
        self._stopped = True
        task = self._starting
        if task is None:
            return
        with contextlib.suppress(Exception):
            await task
        if task.cancelled() or task.exception() is not None:
            return
        try:
            await asyncio.wait_for(self.server.stop(), self.settings.shutdown_timeout)
        except TimeoutError:
            log.warning("plexus shutdown took longer than %.1fs", self.settings.shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the node for as long as the host app runs.

        Pass it as the host's lifespan (`FastAPI(lifespan=plexus_app.lifespan)`,
        `Starlette(lifespan=...)`), or enter it from the host's own:
        `async with plexus_app.lifespan(): yield`.
        """
        try:
            await self.startup()
        except ConfigError as exc:
            # The host's lifespan reports a traceback: say what is wrong in one line first.
            log.error("plexus: %s", exc)
            raise
        try:
            yield
        finally:
            await self.shutdown()

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    text = f"plexus: {exc}" if isinstance(exc, ConfigError) else None
                    if text is None:
                        log.exception("plexus could not start")
                        text = f"plexus could not start: {type(exc).__name__}: {exc}"
                    await send({"type": "lifespan.startup.failed", "message": text})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ----- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._serve_lifespan(receive, send)
            return
        if kind not in ("http", "websocket"):
            return
        path = route_path(scope)
        unavailable = await self._ensure_started()
        if kind == "websocket":
            if unavailable is not None:
                await refuse(scope, send, unavailable)
            elif path != "/ws":
                await refuse(scope, send, Refusal(404, "not_found", f"no WebSocket at {path}"))
            else:
                endpoint = self.server.endpoint
                assert endpoint is not None  # set by the start
                await serve_websocket(endpoint, scope, receive, send)
            return
        if unavailable is not None:
            await _respond(send, unavailable.status, unavailable.body())
        elif path == "/ws":
            await _respond(
                send,
                426,
                orjson.dumps(
                    {"error": {"code": "bad_request", "message": "a WebSocket endpoint: upgrade"}}
                ),
                [(b"upgrade", b"websocket")],
            )
        elif path in HTTP_PATHS or path.startswith("/api/"):
            await serve_http(self.server.http_factory, scope, receive, send, path)
        else:
            await _respond(send, 404, Refusal(404, "not_found", f"no route {path}").body())

    async def _ensure_started(self) -> Refusal | None:
        """Start lazily when no lifespan did; why requests cannot be served, if so."""
        if self.started:
            return None
        if self._stopped:
            return Refusal(503, "unavailable", "plexus is shutting down")
        first = self._starting is None
        if first:
            log.warning(
                "plexus lazily started by a request: give the host app plexus_app.lifespan"
                " for a graceful shutdown"
            )
        try:
            await self.startup()
        except Exception as exc:
            if first:
                log.error("plexus could not start: %s", exc)
            return Refusal(503, "unavailable", f"plexus could not start: {exc}")
        return None


def _retryable(task: asyncio.Task[None]) -> bool:
    """Whether a finished start may be tried again: it failed, and not on the settings."""
    if task.cancelled():
        return True
    error = task.exception()
    return error is not None and not isinstance(error, ConfigError)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = _JSON + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: Settings | None = None,
    *,
    hooks: object = None,
    engine: Engine | str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> PlexusApp:
    """The ASGI application of a Plexus node.

    Args:
        settings: complete settings; when None they are loaded as `plexus
            serve` loads them: `config_file` (default: `$PLEXUS_CONFIG`), then
            the `PLEXUS_*` environment (`env`, default `os.environ`), then
            `overrides` (setting names: `engine="redis"`, `api_keys=[...]`).
        hooks: the application's hooks: a module, any object with `on_connect`,
            `on_subscribe`, ... or a module's dotted name (the `hooks` setting).
        engine: a ready engine instead of the settings' (tests, custom stores),
            not checked for sharing between processes; or, as a string, the
            `engine` setting (`engine="redis"`).

    `uvicorn --factory plexus.asgi:create_app` serves it alone, from the
    environment's settings.

    Raises:
        ConfigError: the first bad setting or argument, in one line.
    """
    if isinstance(engine, str):
        # The setting, not an engine object: `create_app(engine="redis")` reads as one.
        overrides["engine"] = engine
        engine = None
    elif engine is not None and not isinstance(engine, Engine):
        raise ConfigError(
            f"create_app: engine must be an Engine or a setting name, got {type(engine).__name__}"
        )
    if settings is None:
        path = config_file if config_file is not None else os.environ.get("PLEXUS_CONFIG")
        settings = load_settings(path or None, env, overrides)
    elif overrides or config_file is not None or env is not None:
        raise ConfigError("create_app: give settings, or config_file/env/overrides, not both")
    else:
        settings.validate()
    return PlexusApp(settings, hooks=hooks, engine=engine)


def mount(app: Any, plexus_app: PlexusApp, path: str = "/realtime") -> Any:
    """An ASGI app that sends `path` and below to `plexus_app`, everything else to `app`.

    For hosts without a router that mounts ASGI apps, e.g. Django's
    `get_asgi_application()` in `asgi.py`. Lifespan events go to
    `plexus_app` (Django refuses them), so the node starts and stops with
    the server.
    """
    prefix = path.rstrip("/")
    if not prefix.startswith("/"):
        raise ConfigError(f"mount: path must start with /, got {path!r}")

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await plexus_app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        full: str = scope.get("path", "")
        below = full[len(root) :] if root and full.startswith(root) else full
        if below == prefix or below.startswith(prefix + "/"):
            await plexus_app({**scope, "root_path": root + prefix}, receive, send)
        else:
            await app(scope, receive, send)

    return application
