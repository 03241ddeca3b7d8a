"""The admin page's endpoints over real HTTP: sessions, CSRF, origins, bad input, the
overview of a known load, channel pages, live tails, actions, and two nodes on Redis."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from plexus.admin import make_admin_token
from plexus.admin.session import ADDRESS_BURST
from plexus.admin.tail import MAX_TAILS, TAIL_IDLE
from plexus.app import Server
from plexus.auth import make_token
from plexus.client import Client
from plexus.config import Settings
from tests.conftest import ClientFactory, ServerFactory
from tests.e2e.test_tls import self_signed
from tests.helpers import TIMEOUT, RedisServer, ServerProcess, serve_refused, wait_for

PASSWORD = "correct horse battery staple"
SECRET = "an-admin-secret-of-at-least-32-bytes!"
JWT_SECRET = "a-jwt-secret-for-these-tests-of-32-bytes"


class AdminHttp:
    """A browser-less admin: one cookie jar, the CSRF token from the login answer."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session
        self.csrf = ""

    async def login(self, password: str = PASSWORD) -> tuple[int, Any]:
        status, body = await self.post("/admin/api/login", {"password": password}, csrf=False)
        if status == 200:
            self.csrf = body["csrf"]
        return status, body

    async def get(
        self, path: str, headers: dict[str, str] | None = None, **params: str
    ) -> tuple[int, Any]:
        async with self.session.get(
            self.base + path,
            params=params,
            headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response:
            return response.status, await response.json(content_type=None)

    async def post(
        self,
        path: str,
        body: Any,
        *,
        csrf: bool = True,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        sent = {"Content-Type": "application/json"}
        if csrf:
            sent["X-CSRF-Token"] = self.csrf
        sent.update(headers or {})  # a test's own headers win
        data = orjson.dumps(body) if raw is None else raw
        async with self.session.post(
            self.base + path,
            # A big body as a stream: aiohttp warns about one given as bytes.
            data=io.BytesIO(data) if len(data) > 65536 else data,
            headers=sent,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response:
            return response.status, await response.json(content_type=None)


def jar_session() -> aiohttp.ClientSession:
    # aiohttp keeps no cookie of a bare IP address unless told to.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    """The server of this module's tests (and of `connect`): with the admin page."""
    return await make_server(admin_password=PASSWORD, jwt_secret=JWT_SECRET)


@pytest.fixture
def admin_server(server: Server) -> Server:
    return server


@pytest.fixture
async def admin(admin_server: Server) -> AsyncIterator[AdminHttp]:
    async with jar_session() as session:
        http = AdminHttp(admin_server.url, session)
        status, _ = await http.login()
        assert status == 200
        yield http


async def wait_for_async(check: Any, timeout: float = TIMEOUT) -> None:
    """Poll an async condition: an endpoint the page itself polls (no event to await)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)  # sleep-ok: polls an endpoint, bounded by `timeout`


async def offset_of(admin: AdminHttp, channel: str) -> int:
    status, body = await admin.get("/admin/api/channel", name=channel)
    assert status == 200, body
    return int(body["offset"])


# ----- off by default, and the settings


async def test_admin_is_404_without_a_password(make_server: ServerFactory) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as session:
        for path in ("/admin", "/admin/", "/admin/admin.js", "/admin/api/session"):
            async with session.get(server.url + path) as response:
                assert response.status == 404, path
        async with session.post(server.url + "/admin/api/login", json={"password": "x"}) as r:
            assert r.status == 404


def test_a_short_admin_password_stops_the_server_with_one_line() -> None:
    assert serve_refused(["--port", "0"], {"PLEXUS_ADMIN_PASSWORD": "too-short"}) == (
        "plexus: invalid setting: admin_password: must be at least 12 characters, got 9"
    )


async def test_the_page_is_served_with_headers_that_keep_it_to_itself(admin_server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/admin", "/admin/"):
            async with session.get(admin_server.url + path) as response:
                assert response.status == 200
                assert response.content_type == "text/html"
                assert "Plexus admin" in await response.text()
                csp = response.headers["Content-Security-Policy"]
                assert "frame-ancestors 'none'" in csp
                assert "script-src 'self'" in csp
                assert response.headers["X-Frame-Options"] == "DENY"
        async with session.get(admin_server.url + "/admin/admin.js") as response:
            assert response.content_type == "text/javascript"
            script = await response.text()
        # Text goes in with textContent: nothing in the script parses HTML.
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)


# ----- logging in


async def test_wrong_passwords_get_one_answer_and_the_right_one_a_session(
    admin_server: Server,
) -> None:
    async with jar_session() as session:
        http = AdminHttp(admin_server.url, session)
        for wrong in ("nope", PASSWORD.upper(), PASSWORD + "x", "a.b.c"):
            status, body = await http.login(wrong)
            assert (status, body) == (
                401,
                {"error": {"code": "unauthorized", "message": "wrong password or token"}},
            )
        assert not session.cookie_jar.filter_cookies(admin_server.url)
        async with session.post(
            admin_server.url + "/admin/api/login", json={"password": PASSWORD}
        ) as response:
            assert response.status == 200
            cookie = response.cookies["plexus_admin"]
            body = await response.json()
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/admin"
        assert int(cookie["max-age"]) == int(Settings().admin_session_ttl)
        assert not cookie["secure"]  # plain http: a Secure cookie would never come back
        assert body["user"] == "admin"
        assert len(body["csrf"]) == 64
        http.csrf = body["csrf"]
        status, again = await http.get("/admin/api/session")
        assert (status, again["csrf"], again["node"]) == (200, body["csrf"], admin_server.node.name)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "bad_request"),
        ({"password": 5}, 400, "bad_request"),
        ([PASSWORD], 400, "bad_request"),
    ],
)
async def test_login_bad_input(admin_server: Server, body: Any, status: int, code: str) -> None:
    async with jar_session() as session:
        got, answer = await AdminHttp(admin_server.url, session).post(
            "/admin/api/login", body, csrf=False
        )
    assert (got, answer["error"]["code"]) == (status, code)


async def test_login_attempts_are_limited_and_then_not_even_checked(admin_server: Server) -> None:
    async with jar_session() as session:
        http = AdminHttp(admin_server.url, session)
        for _ in range(ADDRESS_BURST):
            assert (await http.login("wrong password"))[0] == 401
        status, body = await http.login()  # the right one, too late
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert "too many login attempts" in body["error"]["message"]
        assert (await http.get("/admin/api/session"))[0] == 401


async def test_an_admin_token_logs_in_when_only_the_secret_is_set(
    make_server: ServerFactory,
) -> None:
    server = await make_server(admin_secret=SECRET)
    async with jar_session() as session:
        http = AdminHttp(server.url, session)
        assert (await http.login("any password at all"))[0] == 401
        assert (await http.login(make_admin_token("x" * 32, "ops", 60)))[0] == 401
        status, body = await http.login(make_admin_token(SECRET, "ops-alice", 60))
        assert (status, body["user"]) == (200, "ops-alice")
        assert (await http.get("/admin/api/session"))[0] == 200


async def test_the_cookie_is_secure_over_tls(make_server: ServerFactory, tmp_path: Path) -> None:
    certfile, keyfile = self_signed(tmp_path)
    server = await make_server(
        admin_password=PASSWORD, certfile=str(certfile), keyfile=str(keyfile)
    )
    context = ssl.create_default_context(cafile=str(certfile))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(server.url + "/admin/api/login", json={"password": PASSWORD}) as response,
    ):
        assert response.status == 200
        assert response.cookies["plexus_admin"]["secure"] is True


async def test_logout_forgets_the_cookie(admin: AdminHttp) -> None:
    status, _ = await admin.post("/admin/api/logout", {})
    assert status == 200
    assert (await admin.get("/admin/api/session"))[0] == 401


# ----- what protects the session


GETS = ["/admin/api/session", "/admin/api/overview", "/admin/api/channel", "/admin/api/tail"]
POSTS = [
    ("/admin/api/publish", {"channel": "chat:x", "data": 1}),
    ("/admin/api/disconnect", {"user": "alice"}),
    ("/admin/api/unsubscribe", {"channel": "chat:x", "user": "alice"}),
    ("/admin/api/logout", {}),
]


async def test_nothing_answers_without_a_session(admin_server: Server) -> None:
    async with jar_session() as session:
        http = AdminHttp(admin_server.url, session)
        for path in GETS:
            status, body = await http.get(path, name="chat:x", channel="chat:x")
            assert (status, body["error"]["code"]) == (401, "unauthorized"), path
        for path, payload in POSTS:
            status, body = await http.post(path, payload)
            assert (status, body["error"]["code"]) == (401, "unauthorized"), path
        # A cookie made up, or signed by another process's key, is no session.
        session.cookie_jar.update_cookies({"plexus_admin": "a.b.c"})
        assert (await http.get("/admin/api/session"))[0] == 401


async def test_actions_need_the_csrf_token_the_own_origin_and_json(admin: AdminHttp) -> None:
    before = await offset_of(admin, "chat:csrf")
    publish = {"channel": "chat:csrf", "data": "should not be published"}
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"csrf": False}, 403, "permission_denied"),
        ({"headers": {"X-CSRF-Token": "0" * 64}}, 403, "permission_denied"),
        ({"headers": {"Origin": "http://127.0.0.1:1"}}, 403, "permission_denied"),
        ({"headers": {"Origin": "http://evil.example"}}, 403, "permission_denied"),
        ({"headers": {"Origin": "null"}}, 403, "permission_denied"),
        ({"headers": {"Sec-Fetch-Site": "same-site"}}, 403, "permission_denied"),
        ({"headers": {"Sec-Fetch-Site": "cross-site"}}, 403, "permission_denied"),
        ({"headers": {"Content-Type": "text/plain"}}, 415, "bad_request"),
        ({"headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415, "bad_request"),
    ]
    for options, status, code in refusals:
        got, body = await admin.post("/admin/api/publish", publish, **options)
        assert (got, body.get("error", {}).get("code")) == (status, code), (options, body)
    for path, payload in POSTS:
        got, _ = await admin.post(path, payload, csrf=False)
        assert got == 403, path
    assert await offset_of(admin, "chat:csrf") == before
    # The page's own origin, as a browser sends it, is fine.
    host = admin.base.removeprefix("http://")
    got, body = await admin.post(
        "/admin/api/publish",
        {"channel": "chat:csrf", "data": "ok"},
        headers={"Origin": admin.base, "Sec-Fetch-Site": "same-origin", "Host": host},
    )
    assert got == 200, body
    assert await offset_of(admin, "chat:csrf") == before + 1


async def test_a_rebinding_host_is_refused(admin: AdminHttp) -> None:
    status, body = await admin.get("/admin/api/session", headers={"Host": "evil.example"})
    assert (status, body["error"]["code"]) == (403, "permission_denied")
    assert "allowed_hosts" in body["error"]["message"]


# ----- actions


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"data": 1}, 400, "bad_request"),
        ({"channel": "chat:x"}, 400, "bad_request"),
        ({"channel": "<b>x</b>", "data": 1}, 400, "invalid_channel"),
        ({"channel": 5, "data": 1}, 400, "bad_request"),
        ({"channel": "chat:x", "data": "x" * 1_100_000}, 413, "too_large"),  # max_body_size
        ({"channel": "chat:x", "data": 1, "idempotency_key": ""}, 400, "bad_request"),
    ],
)
async def test_publish_refuses_what_the_api_refuses(
    admin: AdminHttp, body: dict[str, Any], status: int, code: str
) -> None:
    got, answer = await admin.post("/admin/api/publish", body)
    assert (got, answer["error"]["code"]) == (status, code)
    assert "\n" not in answer["error"]["message"]
    api_status, _ = await admin.post("/api/publish", body, csrf=False)
    assert api_status == status  # the backend API answers the same


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"", b'{"channel": "chat:x", "data": '])
async def test_publish_refuses_a_body_that_is_not_a_json_object(
    admin: AdminHttp, raw: bytes
) -> None:
    got, answer = await admin.post("/admin/api/publish", None, raw=raw)
    assert (got, answer["error"]["code"]) == (400, "bad_request")


async def test_publish_reaches_subscribers_and_is_logged_with_who(
    admin: AdminHttp, connect: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await connect()
    sub = await client.subscribe("chat:news")
    caplog.set_level(logging.INFO, logger="plexus.admin")
    status, body = await admin.post(
        "/admin/api/publish", {"channel": "chat:news", "data": {"text": "<b>hi</b>"}}
    )
    assert status == 200
    message = await sub.get(TIMEOUT, kind="message")
    assert (message["data"], message["offset"]) == ({"text": "<b>hi</b>"}, body["offset"])
    assert "from" not in message  # like /api/publish: from the server, not a client
    (line,) = [r.getMessage() for r in caplog.records if "published to" in r.getMessage()]
    assert line.startswith("admin (password login, session ")
    assert "from 127.0.0.1 published to 'chat:news'" in line


async def test_disconnect_a_user_or_one_client(
    admin_server: Server, admin: AdminHttp, connect: ClientFactory
) -> None:
    token = make_token(JWT_SECRET, user="mallory")
    first = await connect(token=token, reconnect=False)
    second = await connect(token=token, reconnect=False)
    other = await connect(reconnect=False)
    status, body = await admin.post("/admin/api/disconnect", {"client": other.client_id})
    assert (status, body) == (200, {"disconnected": 1})
    assert await other.wait_closed(TIMEOUT) == 4001
    status, body = await admin.post("/admin/api/disconnect", {"user": "mallory"})
    assert (status, body) == (200, {"disconnected": 2})
    assert await first.wait_closed(TIMEOUT) == 4001
    assert await second.wait_closed(TIMEOUT) == 4001
    status, body = await admin.post("/admin/api/disconnect", {"client": "c-nobody"})
    assert (status, body) == (200, {"disconnected": 0})
    for bad in ({}, {"user": "a", "client": "b"}, {"user": ""}, {"client": 5}):
        status, answer = await admin.post("/admin/api/disconnect", bad)
        assert (status, answer["error"]["code"]) == (400, "bad_request"), bad


async def test_unsubscribe_a_user_from_a_channel(admin: AdminHttp, connect: ClientFactory) -> None:
    client = await connect(token=make_token(JWT_SECRET, user="bob"))
    await client.subscribe("chat:room")
    status, body = await admin.post(
        "/admin/api/unsubscribe", {"channel": "chat:room", "user": "bob"}
    )
    assert (status, body) == (200, {"unsubscribed": 1})
    ended = await client.other.get()
    assert (ended["type"], ended["channel"]) == ("unsubscribed", "chat:room")
    await client.ping()  # still connected
    status, answer = await admin.post("/admin/api/unsubscribe", {"channel": "chat:room"})
    assert (status, answer["error"]["code"]) == (400, "bad_request")


# ----- the overview


async def test_overview_shows_a_known_load(admin: AdminHttp, connect: ClientFactory) -> None:
    channels = ["chat:load-0", "chat:load-1", "chat:load-2"]
    clients = [await connect() for _ in range(6)]
    for index, client in enumerate(clients):
        await client.subscribe(channels[index % 3])
    for n in range(10):
        await clients[0].publish("chat:load-0", n)

    def busiest(view: dict[str, Any]) -> dict[str, Any]:
        return {c["channel"]: c for c in view["channels"]}

    status, view = await admin.get("/admin/api/overview")
    assert status == 200
    assert view["totals"]["connections"] == 6
    assert view["totals"]["subscriptions"] == 6
    assert view["totals"]["nodes"] == 1
    (node,) = view["nodes"]
    assert (node["connections"], node["subscriptions"], node["stale"]) == (6, 6, False)
    rows = busiest(view)
    assert {name: rows[name]["subscribers"] for name in channels} == dict.fromkeys(channels, 2)
    assert rows["chat:load-0"]["messages"] == 10

    # Rates are of the last second: publish while the overview is polled.
    async def publish_steadily() -> None:
        for n in range(10**6):
            await clients[0].publish("chat:load-0", n)
            await asyncio.sleep(0.02)  # sleep-ok: a steady rate, not a wait for anything

    async def moving() -> bool:
        nonlocal view
        status, view = await admin.get("/admin/api/overview")
        assert status == 200
        hot = busiest(view)["chat:load-0"]
        series = view["series"]
        return hot["rate"] > 0 and view["totals"]["out_rate"] > 0 and series[-1]["deliveries"] > 0

    publisher = asyncio.create_task(publish_steadily())
    try:
        await wait_for_async(moving)
    finally:
        publisher.cancel()
    assert view["channels"][0]["channel"] == "chat:load-0"  # the only one with messages
    assert view["totals"]["in_rate"] > 0
    last = view["series"][-1]
    assert (last["connections"], last["subscriptions"]) == (6, 6)
    assert last["p50"] is not None  # that second's publishes, from the latency histogram
    assert last["p99"] >= last["p50"]
    # The whole kept series on demand.
    status, full = await admin.get("/admin/api/overview", full="1")
    assert status == 200
    assert len(full["series"]) >= len(view["series"])


async def test_the_overview_is_built_once_a_second_whatever_the_viewers(
    admin_server: Server, admin: AdminHttp
) -> None:
    site = admin_server.admin
    assert site is not None
    calls = 0
    snapshot = site._snapshot

    async def counted(args: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return await snapshot(args)

    admin_server.node.cluster.register("admin.snapshot", counted)
    answers = await asyncio.gather(*(admin.get("/admin/api/overview") for _ in range(20)))
    assert all(status == 200 for status, _ in answers)
    assert calls == 1


# ----- a channel's page


async def test_channel_page_shows_presence_history_and_subscribers(
    admin: AdminHttp, connect: ClientFactory
) -> None:
    channel = "chat:page"
    alice = await connect(token=make_token(JWT_SECRET, user="alice"))
    await alice.subscribe(channel, info={"nick": "<img src=x onerror=alert(1)>"})
    anonymous = await connect()
    await anonymous.subscribe(channel)
    for n in range(25):
        await alice.publish(channel, {"n": n})
    status, page = await admin.get("/admin/api/channel", name=channel)
    assert status == 200
    assert (page["channel"], page["namespace"], page["offset"]) == (channel, "chat", 25)
    assert [m["data"]["n"] for m in page["history"]] == list(range(5, 25))  # the last 20
    assert page["subscribers"] == 2
    assert page["present"] == 2
    present = {p["client"]: p for p in page["presence"]}
    assert present[alice.client_id]["user"] == "alice"
    assert present[alice.client_id]["info"] == {"nick": "<img src=x onerror=alert(1)>"}
    assert present[anonymous.client_id]["user"] is None
    assert {c["client"] for c in page["clients"]} == {alice.client_id, anonymous.client_id}
    # A namespace without presence or history: subscribers only.
    await anonymous.subscribe("plain")
    status, plain = await admin.get("/admin/api/channel", name="plain")
    assert (status, plain["presence"], plain["history"]) == (200, None, [])
    assert [c["client"] for c in plain["clients"]] == [anonymous.client_id]


@pytest.mark.parametrize("name", ["", "<b>x</b>", "a b", "x" * 256])
async def test_channel_page_refuses_a_bad_name(admin: AdminHttp, name: str) -> None:
    for path, params in (
        ("/admin/api/channel", {"name": name}),
        ("/admin/api/tail", {"channel": name}),
    ):
        status, body = await admin.get(path, **params)
        assert (status, body["error"]["code"]) == (400, "invalid_channel"), path


# ----- live tails


async def test_tail_shows_what_is_published_while_it_is_open(
    admin_server: Server, admin: AdminHttp, connect: ClientFactory
) -> None:
    channel = "chat:tailed"
    await admin.post("/admin/api/publish", {"channel": channel, "data": "before"})
    status, first = await admin.get("/admin/api/tail", channel=channel)
    assert status == 200
    assert (first["events"], first["seq"]) == ([], 0)  # nothing from before it was opened
    client = await connect(token=make_token(JWT_SECRET, user="carol"))
    await client.subscribe(channel)
    await client.publish(channel, {"text": "<script>x</script>"})
    await admin.post("/admin/api/publish", {"channel": channel, "data": "from the admin"})

    events: list[dict[str, Any]] = []
    seq = 0

    async def poll() -> bool:
        nonlocal seq
        status, answer = await admin.get(
            "/admin/api/tail", channel=channel, tail=first["tail"], after=str(seq)
        )
        assert (status, answer["tail"]) == (200, first["tail"])
        events.extend(answer["events"])
        seq = answer["seq"]
        return len([e for e in events if e["type"] == "message"]) >= 2

    await wait_for_async(poll)
    kinds = [(e["type"], e.get("user") or e.get("data")) for e in events]
    assert kinds == [
        ("join", "carol"),
        ("message", {"text": "<script>x</script>"}),
        ("message", "from the admin"),
    ]
    assert events[1]["from"]["user"] == "carol"
    # The tail is nobody: not in presence, not counted as a subscriber.
    status, page = await admin.get("/admin/api/channel", name=channel)
    assert (page["subscribers"], page["present"]) == (1, 1)
    subscribed_by = time.time()
    view: dict[str, Any] = {}

    async def sampled() -> bool:  # a sample of a second after carol subscribed
        nonlocal view
        status, view = await admin.get("/admin/api/overview")
        assert status == 200
        return bool(view["series"]) and view["series"][-1]["t"] > subscribed_by

    await wait_for_async(sampled)
    assert view["totals"]["subscriptions"] == 1
    assert view["series"][-1]["subscriptions"] == 1
    # Polling again with the last sequence number: nothing new.
    status, again = await admin.get(
        "/admin/api/tail", channel=channel, tail=first["tail"], after=str(seq)
    )
    assert again["events"] == []
    # A tail nobody polls is closed; the channel's subscription goes with it.
    site = admin_server.admin
    assert site is not None
    assert len(site.tails) == 1
    await site.tails.sweep(time.monotonic() + TAIL_IDLE + 1)
    assert len(site.tails) == 0
    assert admin_server.node.hub.subscriber_count(channel) == 1  # carol's only
    status, fresh = await admin.get("/admin/api/tail", channel=channel, tail=first["tail"])
    assert fresh["tail"] != first["tail"]  # a new tail: the page starts over


async def test_tails_are_bounded(admin: AdminHttp) -> None:
    for n in range(MAX_TAILS):
        status, _ = await admin.get("/admin/api/tail", channel=f"chat:t{n}")
        assert status == 200
    status, body = await admin.get("/admin/api/tail", channel="chat:one-too-many")
    assert (status, body["error"]["code"]) == (503, "unavailable")
    status, _ = await admin.get("/admin/api/tail", channel="chat:t0")  # open ones still answer
    assert status == 200
    status, body = await admin.get("/admin/api/tail", channel="chat:t0", after="x")
    assert (status, body["error"]["code"]) == (400, "bad_request")


# ----- two nodes on the Redis engine


async def start_node(redis: RedisServer, prefix: str, name: str) -> Server:
    settings = Settings(
        port=0,
        engine="redis",
        redis_url=redis.url,
        redis_prefix=prefix,
        redis_timeout=2.0,
        publish_rate=0,
        node_name=name,
        admin_password=PASSWORD,
        jwt_secret=JWT_SECRET,
    )
    server = Server(settings)
    await server.start()
    return server


async def test_two_nodes_on_redis_are_both_in_the_overview(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    a = await start_node(redis_server, redis_prefix, "node-a")
    b = await start_node(redis_server, redis_prefix, "node-b")
    clients: list[Client] = []
    try:
        for node, count in ((a, 2), (b, 3)):
            for _ in range(count):
                client = Client(node.ws_url, timeout=TIMEOUT, reconnect=False)
                await client.connect()
                await client.subscribe("chat:shared")
                clients.append(client)
        async with jar_session() as session:
            http = AdminHttp(a.url, session)
            assert (await http.login())[0] == 200
            view: dict[str, Any] = {}

            async def both_listed() -> bool:
                nonlocal view
                status, view = await http.get("/admin/api/overview")
                assert status == 200
                counts = {n["node"]: n["connections"] for n in view["nodes"] if not n["stale"]}
                return counts == {"node-a": 2, "node-b": 3}

            await wait_for_async(both_listed)
            assert view["totals"]["connections"] == 5
            assert view["problem"] is None
            (shared,) = [c for c in view["channels"] if c["channel"] == "chat:shared"]
            assert shared["subscribers"] == 5
            # The channel page counts every node's subscribers; the tail on node A
            # sees a message published on node B; a client on B is disconnected from A.
            status, page = await http.get("/admin/api/channel", name="chat:shared")
            assert (page["subscribers"], page["present"]) == (5, 5)
            assert {c["node"] for c in page["clients"]} == {"node-a", "node-b"}
            status, tail = await http.get("/admin/api/tail", channel="chat:shared")
            await clients[-1].publish("chat:shared", "from node b")

            async def tailed() -> bool:
                status, answer = await http.get(
                    "/admin/api/tail", channel="chat:shared", tail=tail["tail"]
                )
                assert status == 200
                return any(e.get("data") == "from node b" for e in answer["events"])

            await wait_for_async(tailed)
            status, body = await http.post(
                "/admin/api/disconnect", {"client": clients[-1].client_id}
            )
            assert (status, body) == (200, {"disconnected": 1})
            assert await clients[-1].wait_closed(TIMEOUT) == 4001
    finally:
        for client in clients:
            await client.close()
        await a.stop()
        await b.stop()


async def test_a_session_holds_on_every_worker(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    env = {
        "PLEXUS_ENGINE": "redis",
        "PLEXUS_REDIS_URL": redis_server.url,
        "PLEXUS_REDIS_PREFIX": redis_prefix,
        "PLEXUS_ADMIN_PASSWORD": PASSWORD,
    }
    with ServerProcess(args=["--workers", "2"], env=env) as master:
        await wait_for(lambda: "with 2 workers" in master.output())  # both listen
        # A new connection per request: the kernel picks a worker for each.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as session:
            http = AdminHttp(master.url, session)
            assert (await http.login())[0] == 200
            served_by = set()
            for _ in range(40):
                status, body = await http.get("/admin/api/session")
                assert status == 200, body  # whichever worker answered
                served_by.add(body["node"])
                if len(served_by) == 2:
                    break
            assert len(served_by) == 2
