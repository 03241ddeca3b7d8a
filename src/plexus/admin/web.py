"""The admin page's HTTP side: its static files and its JSON endpoints under `/admin/api/`.

Every endpoint but `login` needs a session cookie; every `POST` needs the
session's CSRF token in `X-CSRF-Token`, a JSON body, and (when the browser
says where it comes from) this server's own origin. Actions go through the
same code as the backend API (`HttpApi.run_*`): the same validation, the same
errors, the same effect on every node. Each is logged with who did it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import hdrs, web

from plexus.admin.session import LOGIN_REFUSED, AdminSession, LoginLimiter, Sessions
from plexus.admin.stats import TOP_CHANNELS, ChannelRates, Sampler, merge
from plexus.admin.tail import Tails
from plexus.channels import namespace_of, validate_channel
from plexus.exceptions import BadRequest, PermissionDenied, PlexusError, RateLimited, Unauthorized
from plexus.node import Node
from plexus.protocol.codes import ErrorCode
from plexus.protocol.pushes import publication_message
from plexus.transports.http_api import (
    HttpApi,
    RequestTimeout,
    UnsupportedMediaType,
    error_response,
    json_body,
)
from plexus.transports.origin import host_allowed, parse_authority, parse_origin

log = logging.getLogger("plexus.admin")

STATIC_DIR: Final = Path(__file__).parent / "static"
COOKIE: Final = "plexus_admin"
CSRF_HEADER: Final = "X-CSRF-Token"
CACHE_TTL: Final = 1.0  # seconds an overview answer is served again to every viewer
CLUSTER_TIMEOUT: Final = 1.5  # seconds to wait for the other nodes' snapshots
HISTORY_SHOWN: Final = 20  # last messages on a channel page
HISTORY_BYTES: Final = 256 * 1024
CLIENTS_SHOWN: Final = 100  # presence entries and subscribers listed on a channel page
_STATIC: Final = {
    "index.html": "text/html; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "admin.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere and may not be framed (its buttons act).
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_API_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request, AdminSession | None], Awaitable[web.StreamResponse]]


class AdminSite:
    """The admin page of one node.

    `install` adds its routes to the server's application, and starts and
    stops its background work with it: a sampler that records this node's
    counters every second (a few integers), and the sweep of idle tails.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.api = HttpApi(node)
        self.sessions = Sessions(node.settings)
        self.limiter = LoginLimiter(time.monotonic())
        self.sampler = Sampler(node.metrics.publish_latency, time.time())
        self.rates = ChannelRates()
        self.tails = Tails(node)
        self._cache: dict[bool, tuple[float, bytes]] = {}
        self._building: dict[bool, asyncio.Future[bytes]] = {}
        self._files = {name: (STATIC_DIR / name).read_bytes() for name in _STATIC}

    # ----- wiring

    def install(self, app: web.Application) -> None:
        """Add the routes to `app`; start and stop with it."""
        app.add_routes(self.routes())
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)

    def routes(self) -> list[web.AbstractRouteDef]:
        """The route table: the page, its files and its API."""
        page = self._file("index.html")
        table: list[web.AbstractRouteDef] = [
            web.get("/admin", page),
            web.get("/admin/", page),
            web.get("/admin/admin.js", self._file("admin.js")),
            web.get("/admin/admin.css", self._file("admin.css")),
            web.post("/admin/api/login", self._guard(self.login, session=False)),
            web.post("/admin/api/logout", self._guard(self.logout)),
            web.get("/admin/api/session", self._guard(self.session)),
            web.get("/admin/api/overview", self._guard(self.overview)),
            web.get("/admin/api/channel", self._guard(self.channel)),
            web.get("/admin/api/tail", self._guard(self.tail)),
            web.post("/admin/api/publish", self._guard(self.publish)),
            web.post("/admin/api/disconnect", self._guard(self.disconnect)),
            web.post("/admin/api/unsubscribe", self._guard(self.unsubscribe)),
        ]
        return table

    async def _on_startup(self, app: web.Application) -> None:
        self.node.cluster.register("admin.snapshot", self._snapshot)
        self.node.cluster.register("admin.channel", self._channel_here)
        self.node.supervisor.spawn("admin-sampler", self._sample_loop)

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.node.supervisor.cancel("admin-sampler")
        await self.tails.close()

    def _file(self, name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body, content_type = self._files[name], _STATIC[name]

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, headers={"Content-Type": content_type, **_PAGE_HEADERS})

        return handler

    # ----- checks every API request passes

    def _check_browser(self, request: web.Request) -> None:
        """Refuse requests another site's page makes the admin's browser send.

        SameSite=Strict keeps the cookie off cross-site requests, but a page
        on another port of the same host is the same site: the Origin (or
        Sec-Fetch-Site) must say this very server. The Host must be one of its
        names (a DNS-rebinding page's requests carry the attacker's name).
        """
        headers = request.headers
        host = headers.get(hdrs.HOST)
        if not host_allowed(host, self.settings.allowed_hosts):
            raise PermissionDenied(
                "Host is not a name of this server: list it in allowed_hosts to use the admin page"
            )
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise PermissionDenied("the admin page takes requests from its own origin only")
        origin = headers.get(hdrs.ORIGIN)
        if origin is not None and not _same_origin(origin, host):
            raise PermissionDenied("the admin page takes requests from its own origin only")
        if request.method == "POST" and request.content_type != "application/json":
            raise UnsupportedMediaType(
                f"send the body as application/json (Content-Type was {request.content_type})"
            )

    def _guard(
        self, handler: Handler, *, session: bool = True
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                self._check_browser(request)
                found: AdminSession | None = None
                if session:
                    found = self.sessions.verify(request.cookies.get(COOKIE), time.time())
                    if found is None:
                        raise Unauthorized("log in first (no session, or it expired)")
                    if request.method == "POST" and not self.sessions.check_csrf(
                        found, request.headers.get(CSRF_HEADER)
                    ):
                        raise PermissionDenied(f"missing or wrong CSRF token ({CSRF_HEADER})")
                response = await handler(request, found)
            except PlexusError as exc:
                status = getattr(exc, "status", None)
                response = error_response(exc.code, exc.message, status=status)
                if isinstance(exc, RequestTimeout):
                    response.force_close()
            except Exception:
                log.exception("admin %s failed", request.path)
                response = error_response(ErrorCode.INTERNAL, "internal error")
            response.headers.update(_API_HEADERS)
            return response

        return guarded

    # ----- session

    async def login(self, request: web.Request, _: AdminSession | None) -> web.Response:
        """`POST /admin/api/login {"password"}` (the password or an admin token)."""
        remote = request.remote or "?"
        if not self.limiter.allow(remote, time.monotonic()):
            log.warning("login from %s refused unchecked (too many attempts)", remote)
            raise RateLimited("too many login attempts: wait a minute and try again")
        body = await self.api.read_json(request)
        given = body.get("password")
        if not isinstance(given, str):
            raise BadRequest('"password" must be a string')
        found = self.sessions.check_login(given, time.time())
        if found is None:
            log.warning("refused a login from %s", remote)
            raise Unauthorized(LOGIN_REFUSED)
        cookie, session = self.sessions.issue(*found, time.time())
        log.info("%s logged in from %s", session.who(), remote)
        response = web.json_response(self._session_body(session))
        response.set_cookie(
            COOKIE,
            cookie,
            path="/admin",
            max_age=int(self.sessions.ttl),
            httponly=True,
            samesite="Strict",
            secure=self.settings.tls,
        )
        return response

    async def logout(self, request: web.Request, session: AdminSession | None) -> web.Response:
        """`POST /admin/api/logout`: forget the cookie in this browser."""
        assert session is not None
        log.info("%s logged out from %s", session.who(), request.remote)
        response = web.json_response({})
        response.del_cookie(COOKIE, path="/admin")
        return response

    async def session(self, request: web.Request, session: AdminSession | None) -> web.Response:
        """`GET /admin/api/session`: who is logged in, and the CSRF token."""
        assert session is not None
        return web.json_response(self._session_body(session))

    def _session_body(self, session: AdminSession) -> dict[str, Any]:
        return {
            "user": session.user,
            "csrf": self.sessions.csrf_token(session),
            "expires": session.expires,
            "node": self.node.name,
        }

    # ----- overview

    async def _sample_loop(self) -> None:
        while True:
            # Wake at whole seconds, so every node's samples share their second.
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
            now = time.time()
            node, counters = self.node, self.node.counters
            self.sampler.take(
                now,
                connections=len(node.peers),
                subscriptions=node.hub.subscriber_count() - len(self.tails),
                published=counters.published,
                deliveries=counters.deliveries,
                slow_consumers=counters.slow_consumers,
            )
            await self.tails.sweep(time.monotonic())

    async def _snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        """This node's part of the overview (the `admin.snapshot` cluster action)."""
        info = self.node.info()
        hidden = self.tails.hidden()
        info["subscriptions"] -= len(hidden)
        info["tails"] = len(hidden)
        return {
            "info": info,
            "samples": self.sampler.rows(bool(args.get("full"))),
            "channels": self.rates.top(self.node.hub, time.monotonic(), TOP_CHANNELS, hidden),
        }

    async def overview(self, request: web.Request, _: AdminSession | None) -> web.Response:
        """`GET /admin/api/overview[?full=1]`: every node, the series, the busiest channels.

        Built at most once per `CACHE_TTL` (and once at a time), whatever
        the number of viewers; `full` adds the whole kept series.
        """
        full = request.query.get("full") == "1"
        now = time.monotonic()
        cached = self._cache.get(full)
        if cached is not None and now - cached[0] < CACHE_TTL:
            body = cached[1]
        else:
            pending = self._building.get(full)
            if pending is None:
                pending = asyncio.ensure_future(self._build_overview(full))
                self._building[full] = pending
                pending.add_done_callback(lambda _: self._building.pop(full, None))
            body = await asyncio.shield(pending)
            self._cache[full] = (time.monotonic(), body)
        return web.Response(body=body, content_type="application/json")

    async def _build_overview(self, full: bool) -> bytes:
        node = self.node
        problem = None
        try:
            answers = await node.cluster.call(
                "admin.snapshot", {"full": full}, timeout=CLUSTER_TIMEOUT
            )
        except PlexusError as exc:
            problem = f"other nodes unreachable: {exc.message}"
            answers = [await self._snapshot({"full": full})]
        snapshots = [a for a in answers if isinstance(a, dict) and "info" in a]
        try:
            registry = await node.broker.nodes()
        except PlexusError as exc:
            problem = problem or f"registry of nodes unreachable: {exc.message}"
            registry = []
        merged = merge(snapshots, registry, node.metrics.publish_latency.bounds)
        return orjson.dumps({"node": node.name, "time": time.time(), "problem": problem, **merged})

    # ----- channel page

    async def _channel_here(self, args: dict[str, Any]) -> dict[str, Any]:
        """This node's subscribers of a channel (the `admin.channel` cluster action)."""
        name = str(args.get("channel"))
        tail = 1 if name in self.tails.hidden() else 0
        subs = [s for s in self.node.hub.subscriptions(name) if s.conn.client_id in self.node.peers]
        return {
            "node": self.node.name,
            "count": len(self.node.hub.subscriptions(name)) - tail,
            "clients": [[s.conn.client_id, s.conn.user] for s in subs[:CLIENTS_SHOWN]],
        }

    async def channel(self, request: web.Request, _: AdminSession | None) -> web.Response:
        """`GET /admin/api/channel?name=NAME`: position, subscribers, presence, last messages."""
        name = validate_channel(request.query.get("name", ""))
        node = self.node
        options = node.namespace(name)
        position = await node.position(name)
        messages: list[dict[str, Any]] = []
        if options.history_size > 0 and position.offset > 0:
            page = await node.history.read(
                name,
                since=max(0, position.offset - HISTORY_SHOWN),
                limit=HISTORY_SHOWN,
                max_bytes=HISTORY_BYTES,
            )
            messages = [publication_message(p) for p in page.publications]
        try:
            answers = await node.cluster.call(
                "admin.channel", {"channel": name}, timeout=CLUSTER_TIMEOUT
            )
        except PlexusError:
            answers = [await self._channel_here({"channel": name})]
        subscribers: list[dict[str, Any]] = []
        count = 0
        for answer in answers:
            if not isinstance(answer, dict):
                continue
            count += int(answer.get("count", 0))
            subscribers.extend(
                {"client": client, "user": user, "node": answer.get("node")}
                for client, user in answer.get("clients", [])
            )
        subscribers.sort(key=lambda s: (str(s["user"]), str(s["client"])))
        presence: list[dict[str, Any]] | None = None
        present = 0
        if options.presence:
            clients = await node.presence_of(name)
            present = len(clients)
            presence = [
                {"client": c.client, "user": c.user, "info": c.info}
                for _, c in sorted(clients.items())[:CLIENTS_SHOWN]
            ]
        return json_body(
            {
                "channel": name,
                "namespace": namespace_of(name),
                "offset": position.offset,
                "epoch": position.epoch,
                "options": {
                    "presence": options.presence,
                    "join_leave": options.join_leave,
                    "history_size": options.history_size,
                    "recovery": options.recovery,
                },
                "subscribers": count,
                "clients": subscribers[:CLIENTS_SHOWN],
                "present": present,
                "presence": presence,
                "history": messages,
            }
        )

    async def tail(self, request: web.Request, _: AdminSession | None) -> web.Response:
        """`GET /admin/api/tail?channel=NAME&tail=ID&after=SEQ`: what was published since."""
        name = validate_channel(request.query.get("channel", ""))
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            raise BadRequest('"after" must be an integer') from None
        tail = await self.tails.get(name, time.monotonic())
        if request.query.get("tail") != tail.id:
            after = 0  # a new tail (or the first poll): everything it kept
        head = orjson.dumps({"tail": tail.id, "seq": tail.seq, "dropped": tail.dropped})
        events = b",".join(tail.after(after))
        # The kept pushes are JSON already: spliced in, not decoded and encoded again.
        body = head[:-1] + b',"events":[' + events + b"]}"
        return web.Response(body=body, content_type="application/json")

    # ----- actions

    async def publish(self, request: web.Request, session: AdminSession | None) -> web.Response:
        """`POST /admin/api/publish {"channel","data"}`: as `/api/publish`."""
        body = await self.api.read_json(request)
        result = await self.api.run_publish(body)
        self._audit(request, session, f"published to {body['channel']!r}: {result}")
        return web.json_response(result)

    async def disconnect(self, request: web.Request, session: AdminSession | None) -> web.Response:
        """`POST /admin/api/disconnect {"user" | "client"}`: as `/api/disconnect`."""
        body = await self.api.read_json(request)
        result = await self.api.run_disconnect(body)
        target = f"user {body['user']!r}" if "user" in body else f"client {body['client']!r}"
        self._audit(request, session, f"disconnected {target}: {result}")
        return web.json_response(result)

    async def unsubscribe(self, request: web.Request, session: AdminSession | None) -> web.Response:
        """`POST /admin/api/unsubscribe {"channel", "user" | "client"}`: as `/api/unsubscribe`."""
        body = await self.api.read_json(request)
        result = await self.api.run_unsubscribe(body)
        target = f"user {body['user']!r}" if "user" in body else f"client {body['client']!r}"
        self._audit(request, session, f"unsubscribed {target} from {body['channel']!r}: {result}")
        return web.json_response(result)

    @staticmethod
    def _audit(request: web.Request, session: AdminSession | None, what: str) -> None:
        assert session is not None
        log.info("%s from %s %s", session.who(), request.remote, what)


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` names the host (and port) the request was sent to.

    The scheme is not compared: behind a proxy that ends TLS, the page is
    https while the request reaches the server over http.
    """
    parsed = parse_origin(origin)
    if parsed is None or host is None:
        return False
    authority = parse_authority(host)
    if authority is None or authority.host != parsed.host:
        return False
    return authority.port is None or authority.port == parsed.port
