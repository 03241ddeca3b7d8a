"""Assembly and lifespan: one port serving `/ws`, `/sse`, the chat app, `/health` and `/api/*`.

`Server` is also the embedding API: an asyncio application can run Plexus in
its own event loop, register RPC handlers in Python and decide connections,
subscriptions and publishes with hooks (`plexus.decisions.hooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web, web_response
from aiohttp.web_protocol import RequestHandler

from plexus import __version__
from plexus.admin import AdminSite
from plexus.config import Settings
from plexus.decisions.jwt import Authenticator
from plexus.engines import make_engine
from plexus.engines.base import Engine
from plexus.logs import quiet_malformed_requests
from plexus.metrics import CONTENT_TYPE
from plexus.node import Node, RpcHandler
from plexus.sharing import Claim, claim_data_dir
from plexus.transports.http_api import HttpApi
from plexus.transports.lean import LeanListener
from plexus.transports.link import Endpoint
from plexus.transports.origin import origin_allowed
from plexus.transports.sse import SseTransport

log = logging.getLogger("plexus")

WEB_DIR = Path(__file__).parent / "web"
# The `Server` header of every HTTP response: no Python or aiohttp version to
# look vulnerabilities up by.
SERVER_HEADER = "plexus"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".json": "application/json",
}


# Seconds aiohttp keeps reading the unread rest of a request body after its
# answer (so that closing does not reset the connection under the answer);
# aiohttp's default, named here so that a test can tell its end from ours.
LINGERING_TIME = 10.0


class _LingerEndsWithSocket(asyncio.Protocol):
    """aiohttp's handler of one socket, whose lingering read ends when the socket does.

    After answering a request whose body it did not read (a 413 for a declared
    size, a 401, 403, 415 or 408 answered first), aiohttp reads and drops the
    rest for `LINGERING_TIME`. It does not notice the peer closing meanwhile
    (aiohttp 3.14: the body's reader is woken only while a handler runs), so
    its task and buffers outlived the socket by 10 s, uncounted by
    `max_connections_per_ip`: one address posting such requests and hanging
    up kept 17,800 of them alive within 5 s (+180 MB). Once the socket is
    gone, a handler that is only lingering is stopped; a request being handled
    is left to aiohttp.
    """

    __slots__ = ("_handler",)

    def __init__(self, handler: RequestHandler) -> None:
        self._handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> None:
        self._handler.eof_received()  # None: the transport closes itself

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        handler = self._handler
        # aiohttp's own state, read before connection_lost forgets the task.
        # Were they renamed, nothing would be cancelled (aiohttp's behaviour),
        # and test_unread_bodies_of_a_client_that_hung_up_leave_nothing fails.
        task: asyncio.Task[None] | None = getattr(handler, "_task_handler", None)
        lingering = not getattr(handler, "_request_in_progress", True)
        handler.connection_lost(exc)
        if task is not None and lingering and not task.done():
            task.cancel()


# Bundled files that pages of other (allowed) origins may load as modules:
# `import` and `<script type="module">` fetch in CORS mode.
SHARED_SCRIPTS = frozenset({"plexus.js"})


def _static_routes(settings: Settings) -> list[web.AbstractRouteDef]:
    """One route per bundled file: `/` is index.html, the others keep their names."""
    routes: list[web.AbstractRouteDef] = []
    if not WEB_DIR.is_dir():
        return routes
    for path in sorted(WEB_DIR.iterdir()):
        if not path.is_file() or path.suffix not in _CONTENT_TYPES:
            continue
        body = path.read_bytes()
        content_type = _CONTENT_TYPES[path.suffix]
        shared = path.name in SHARED_SCRIPTS

        def make(
            body: bytes = body, content_type: str = content_type, shared: bool = shared
        ) -> Any:
            async def handler(request: web.Request) -> web.Response:
                headers = {"Content-Type": content_type, "Cache-Control": "no-cache"}
                if shared:
                    headers["Vary"] = "Origin"
                    origin = request.headers.get("Origin")
                    if origin is not None and origin_allowed(
                        origin,
                        request.scheme,
                        request.headers.get("Host"),
                        settings.allowed_origins,
                        settings.allowed_hosts,
                    ):
                        # The origin itself, not `*`: the answer depends on it (Vary).
                        headers["Access-Control-Allow-Origin"] = origin
                return web.Response(body=body, headers=headers)

            return handler

        routes.append(web.get(f"/{path.name}", make()))
        if path.name == "index.html":
            routes.append(web.get("/", make()))
    return routes


class Server:
    """A Plexus server bound to one port.

    Example:
        async with Server(Settings(port=0)) as server:
            print(server.url)
            await server.wait_closed()

    Args:
        settings: the server's settings (validated here).
        engine: the broker, history and presence to use instead of the settings'.
        hooks: the application's hooks (a module, or any object with
            `on_connect`, `on_subscribe`, ...), instead of the `hooks` setting.
        handle_signals: on SIGTERM, stop gracefully (every client gets 1001)
            when the process has no SIGTERM handler of its own.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        engine: Engine | None = None,
        hooks: object = None,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings or Settings()
        self.settings.validate()
        self._engine = engine
        self._hooks = hooks
        self._handle_signals = handle_signals
        self._signal_installed = False
        self._stopping: asyncio.Task[None] | None = None
        self.node: Node | None = None
        self.endpoint: Endpoint | None = None
        self.sse: SseTransport | None = None
        self.admin: AdminSite | None = None
        self._runner: web.AppRunner | None = None
        # The listening socket is ours; aiohttp gets the requests it serves.
        self._listener: asyncio.Server | None = None
        self._lean: LeanListener | None = None
        self._rpc: dict[str, RpcHandler] = {}
        self._closed = asyncio.Event()
        # What this process must not share with another (plexus.sharing).
        self.claim = Claim()
        self.port = 0
        self.started_at = 0.0

    # ----- embedding API

    def rpc(self, method: str) -> Callable[[RpcHandler], RpcHandler]:
        """Decorator: answer the `rpc` command for `method` with an async function."""

        def register(handler: RpcHandler) -> RpcHandler:
            self._rpc[method] = handler
            if self.node is not None:
                self.node.rpc_handlers[method] = handler
            return handler

        return register

    @property
    def http_factory(self) -> Callable[[], asyncio.Protocol]:
        """aiohttp's protocol factory: one protocol per HTTP connection (after `start`)."""
        server = self._runner.server if self._runner is not None else None
        if server is None:
            raise RuntimeError("the server is not started")
        return server

    @property
    def url(self) -> str:
        """The HTTP base URL, e.g. `http://127.0.0.1:8000`."""
        scheme = "https" if self.settings.tls else "http"
        host = self.settings.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint URL, e.g. `ws://127.0.0.1:8000/ws`."""
        return self.url.replace("http", "ws", 1) + "/ws"

    # ----- lifecycle

    def build_app(self) -> web.Application:
        """The aiohttp application (routes only; `start` runs it)."""
        if self.node is None or self.endpoint is None:
            raise RuntimeError("build_app() runs inside start()")
        app = web.Application(client_max_size=self.settings.max_body_size)
        # transports/lean.py takes WebSocket upgrades; aiohttp sees one only on
        # a keep-alive socket it served before, and gives it back.
        app.add_routes([web.get("/ws", self._upgrade)])
        if self.settings.echo_endpoint:
            app.add_routes([web.get("/echo", self._upgrade)])
        if self.sse is not None:  # the SSE transport: `GET /sse` is taken back like `/ws`
            app.add_routes([web.get("/sse", self._upgrade), *self.sse.routes()])
        app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/ready", self._ready),
                web.get("/metrics", self._metrics),
            ]
        )
        app.add_routes(HttpApi(self.node).routes())
        if self.settings.admin_enabled:  # else /admin is 404, like any unknown path
            self.admin = AdminSite(self.node)
            self.admin.install(app)
        app.add_routes(_static_routes(self.settings))
        return app

    def health(self) -> dict[str, Any]:
        """What `/health` answers: status, each component's state, and counters."""
        if self.node is None:
            return {"status": "degraded", "ready": False, "components": {}}
        health = self.node.health()
        stats = self.node.stats()
        return {
            "status": health["status"],
            "version": __version__,
            "node": self.node.name,
            "connections": stats["connections"],
            "uptime": round(time.time() - self.started_at, 3),
            "components": health["components"],
            "ready": health["ready"],
            "state": self.state(),
        }

    def state(self) -> dict[str, Any]:
        """What `/health` shows under `state`: entries held in memory, and asyncio tasks.

        Counts only (no names), cheap enough for every health check: what an
        operator watches for growth over months, and what the soak benchmark
        and its test compare with a baseline.
        """
        if self.node is None:
            return {}
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop: not serving
            tasks = 0
        return {
            "tasks": tasks,
            "node": self.node.state_size(),
            "engine": self.node.engine_state(),
        }

    async def _upgrade(self, request: web.Request) -> web.StreamResponse:
        if self._lean is None:
            raise web.HTTPServiceUnavailable()
        return self._lean.upgrade(request)

    async def _health(self, request: web.Request) -> web.Response:
        # 200 while the process serves, whatever its components say.
        return web.json_response(self.health())

    async def _ready(self, request: web.Request) -> web.Response:
        health = self.health()
        ready = health["ready"] and self._runner is not None
        body = {"ready": ready, "status": health["status"], "components": health["components"]}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.node is None or self.endpoint is None:
            raise web.HTTPServiceUnavailable()
        self.node.counters.bytes_out = self.endpoint.flusher.bytes_written
        return web.Response(body=self.node.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert self.settings.certfile is not None
        context.load_cert_chain(self.settings.certfile, self.settings.keyfile)
        return context

    async def start(self, *, listen: bool = True) -> None:
        """Start the stores, the broker and the listener.

        Args:
            listen: bind `host:port` and serve it. False when another server
                takes the requests (`plexus.asgi`): the node, its endpoint
                and the aiohttp application (`http_factory`) are ready, no
                socket is bound and no signal handled.
        """
        settings = self.settings
        quiet_malformed_requests()
        # aiohttp puts its default into every response it prepares, its own
        # 400s for requests it cannot parse included: no route, middleware or
        # signal sees those, so the default itself is replaced (process-wide).
        setattr(web_response, "SERVER_SOFTWARE", SERVER_HEADER)  # noqa: B010
        if self._engine is None and settings.history_backend == "sqlite":
            # One process per SQLite data_dir (plexus.sharing).
            claim_data_dir(self.claim, settings.data_dir)
        try:
            self.node = Node(settings, self._engine or make_engine(settings), hooks=self._hooks)
            self.node.rpc_handlers.update(self._rpc)
            await self.node.start()
        except BaseException:
            self.claim.release()
            raise
        self.endpoint = Endpoint(self.node, Authenticator.from_settings(settings))
        self.endpoint.start()
        self.sse = SseTransport(self.endpoint)
        self._runner = web.AppRunner(
            self.build_app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            # aiohttp's default (3630 s) let idle and half-sent requests hold sockets for an hour.
            keepalive_timeout=settings.http_keepalive_timeout,
            lingering_time=LINGERING_TIME,
        )
        await self._runner.setup()
        if not listen:
            self.started_at = time.time()
            return
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((settings.host, settings.port))
        except OSError:
            sock.close()
            await self._runner.cleanup()
            await self.node.close()
            self.claim.release()
            raise
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        # The listener counts every socket against max_connections_per_ip,
        # bounds the time to send a request head, takes WebSocket upgrades and
        # hands every other request to aiohttp.
        server = self._runner.server
        assert server is not None  # set by setup()

        def http() -> asyncio.Protocol:
            return _LingerEndsWithSocket(server())

        self._lean = LeanListener(self.endpoint, http, tls=settings.tls, sse=self.sse)
        self._listener = await asyncio.get_running_loop().create_server(
            self._lean, sock=sock, ssl=self._ssl_context(), backlog=1024
        )
        self.started_at = time.time()
        self._install_signal_handler()
        log.info(
            "listening on %s (WebSocket %s, compression %s)",
            self.url,
            self.ws_url,
            settings.compression,
        )

    def _install_signal_handler(self) -> None:
        """SIGTERM stops the server gracefully, unless the process handles it already.

        Without this an embedded server died by the default action and its
        clients saw 1006 (an abnormal close) instead of 1001 (reconnect).
        """
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application (or its server, e.g. uvicorn) has its own
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError):  # no signals on this loop or platform
            return
        self._signal_installed = True

    def _on_sigterm(self) -> None:
        log.info("SIGTERM: shutting down")
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop_in_time())

    async def _stop_in_time(self) -> None:
        try:
            await asyncio.wait_for(self.stop(), self.settings.shutdown_timeout)
        except TimeoutError:
            log.warning("shutdown took longer than %.1fs", self.settings.shutdown_timeout)
            self._closed.set()

    async def stop(self) -> None:
        """Close every connection with 1001 and stop, within `shutdown_timeout`."""
        if self._signal_installed:
            self._signal_installed = False
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        endpoint, node = self.endpoint, self.node
        if endpoint is None or node is None:
            raise RuntimeError("inconsistent server state")
        # Stop accepting first.
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await endpoint.stop()
        # Each connection ends once its peer answered the close (or was
        # dropped); leave a margin of the budget for the rest of the shutdown.
        budget = max(0.1, self.settings.shutdown_timeout - 1.0)
        try:
            await asyncio.wait_for(endpoint.wait_drained(), budget)
        except TimeoutError:
            log.warning("%d connections did not close in time", len(endpoint.connections))
        if self._lean is not None:
            # aiohttp's cleanup drops the sockets it serves; these are ours.
            self._lean.abort_all()
            self._lean = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(endpoint.wait_drained(), 0.5)
        await runner.cleanup()
        await node.close()
        self.claim.release()
        self._closed.set()
        log.info("stopped")

    async def wait_closed(self) -> None:
        """Wait until `stop` has finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(settings: Settings) -> None:
    """Run a server until SIGINT or SIGTERM, then shut down gracefully."""
    server = Server(settings, handle_signals=False)  # both signals are handled here
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    try:
        await asyncio.wait_for(server.stop(), settings.shutdown_timeout)
    except TimeoutError:
        log.warning("shutdown took longer than %.1fs", settings.shutdown_timeout)
