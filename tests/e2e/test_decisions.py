"""End-to-end: the application decides (proxies and hooks, `shared/spec/proxy.md`).

A real aiohttp web app on a loopback port answers the proxy calls; the same
rules answer as a hooks module (`tests.e2e.decision_app`). Every case runs
both ways, over real sockets, with the client's cookie on the upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from plexus.app import Server
from plexus.config import NamespaceOptions, Settings, default_namespaces
from plexus.protocol.codes import CloseCode
from tests.conftest import ServerFactory
from tests.e2e import decision_app
from tests.e2e.decision_app import DecisionApp, serve_proxies
from tests.helpers import TIMEOUT, api_post, metrics

Open = Callable[..., Awaitable[aiohttp.ClientWebSocketResponse]]
ALICE = {"Cookie": "theme=dark; session=s-alice", "Accept-Language": "fr", "X-Secret": "no"}


def namespaces() -> dict[str, NamespaceOptions]:
    spaces = default_namespaces()
    spaces["room"] = NamespaceOptions(
        anonymous=False, proxy_subscribe=True, presence=True, client_info=True
    )
    spaces["wall"] = NamespaceOptions(anonymous=False, proxy_publish=True, history_size=10)
    return spaces


@pytest.fixture
def app() -> AsyncIterator[DecisionApp]:
    made = DecisionApp()
    decision_app.CURRENT = made
    yield made
    made.release()
    decision_app.CURRENT = None


@pytest.fixture(params=["proxy", "hook"])
def via(request: pytest.FixtureRequest) -> str:
    """How the application is asked: over HTTP, or in Python."""
    return str(request.param)


@pytest.fixture
async def decided(
    via: str, app: DecisionApp, make_server: ServerFactory
) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Make a server whose decisions `app` makes, through proxies or through hooks."""
    runner = await serve_proxies(app)
    port = runner.addresses[0][1]

    async def factory(**overrides: Any) -> Server:
        settings: dict[str, Any] = {"namespaces": namespaces(), "proxy_timeout": 1.0}
        if via == "proxy":
            for call in ("connect", "refresh", "subscribe", "publish", "rpc"):
                settings[f"proxy_{call}_url"] = f"http://127.0.0.1:{port}/{call}"
        else:
            settings["hooks"] = "tests.e2e.decision_app"
        settings.update(overrides)
        return await make_server(**settings)

    yield factory
    app.release()
    await runner.cleanup()


@pytest.fixture
async def open_ws() -> AsyncIterator[Open]:
    """Open raw WebSockets (headers of our choosing); all closed at the end."""
    async with aiohttp.ClientSession() as session:
        opened: list[aiohttp.ClientWebSocketResponse] = []

        async def factory(
            server: Server, headers: dict[str, str] | None = None, query: str = ""
        ) -> Any:
            ws = await session.ws_connect(server.ws_url + query, headers=headers or {})
            opened.append(ws)
            return ws

        yield factory
        for ws in opened:
            await ws.close()


async def receive(ws: aiohttp.ClientWebSocketResponse) -> Any:
    msg = await ws.receive(TIMEOUT)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return msg.json()


async def ask(ws: aiohttp.ClientWebSocketResponse, command: dict[str, Any]) -> Any:
    """Send a command with an id and return its answer (pushes before it are skipped)."""
    await ws.send_json(command)
    while True:
        message = await receive(ws)
        if message.get("id") == command["id"]:
            return message


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    """The close code and reason, when the next frame is the close (no message before it)."""
    msg = await ws.receive(TIMEOUT)
    assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
    return msg.data, msg.extra


async def welcomed(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    welcome = await receive(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome


# ----- connect


async def test_the_session_cookie_makes_the_user(
    decided: Callable[..., Awaitable[Server]],
    app: DecisionApp,
    open_ws: Open,
    via: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="plexus.decisions")
    server = await decided()
    ws = await open_ws(server, ALICE, "?data=hello%20there")
    welcome = await welcomed(ws)
    assert welcome["user"] == "alice"
    # Every call is logged with its name and duration.
    [logged] = [r.getMessage() for r in caplog.records if r.name == "plexus.decisions"]
    assert re.fullmatch(rf"{via} connect of {welcome['client']}: accepted in \d+\.\d ms", logged), (
        logged
    )
    # The connect answer's channels: a server-side subscription, announced.
    subscribed = await receive(ws)
    assert (subscribed["type"], subscribed["channel"]) == ("subscribed", "#alice")
    [(body, headers)] = app.calls_of("connect")
    assert body == {
        "client": welcome["client"],
        "transport": "websocket",
        "protocol": "json",
        "data": "hello there",
    }
    assert headers["cookie"] == "theme=dark; session=s-alice"
    assert headers["accept-language"] == "fr"
    assert "x-secret" not in headers, "only proxy_headers are passed on"
    # The application's info is the connection's, in presence.
    reply = await ask(ws, {"type": "subscribe", "id": 1, "channel": "room:lobby"})
    assert reply["type"] == "reply", reply
    present = await ask(ws, {"type": "presence", "id": 2, "channel": "room:lobby"})
    info = present["result"]["clients"][welcome["client"]]
    assert info == {"user": "alice", "info": {"name": "alice", "checked": True}}


async def test_no_cookie_is_refused_before_welcome(
    decided: Callable[..., Awaitable[Server]], open_ws: Open
) -> None:
    server = await decided()
    ws = await open_ws(server)
    assert await closed(ws) == (CloseCode.UNAUTHORIZED, "log in first")


async def test_a_valid_jwt_never_asks_the_application(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    from plexus.tokens import make_token

    secret = "decisions-suite-secret-0123456789abcdef"
    server = await decided(jwt_secret=secret)
    token = make_token(secret, user="carol")
    ws = await open_ws(server, {}, f"?token={token}")
    assert (await welcomed(ws))["user"] == "carol"
    assert app.calls_of("connect") == []


async def test_messages_sent_before_the_answer_wait_for_welcome(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided()
    ws = await open_ws(server, ALICE)
    # Sent at once, before the application answered: handled after `welcome`,
    # as alice (the default namespace refuses anonymous subscribers here).
    await ws.send_json({"type": "subscribe", "id": 1, "channel": "room:early"})
    assert (await welcomed(ws))["user"] == "alice"
    assert (await ask(ws, {"type": "ping", "id": 2}))["type"] == "pong"
    assert [body["channel"] for body, _ in app.calls_of("subscribe")] == ["room:early"]


# ----- subscribe, publish, rpc


async def test_subscribe_refused_with_the_apps_code_and_the_connection_stays(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided(bad_command_limit=2)
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    for n in range(4):  # more refusals than bad_command_limit: never counted as bad
        error = await ask(ws, {"type": "subscribe", "id": n, "channel": "room:secret"})
        assert error == {
            "type": "error",
            "id": n,
            "code": "permission_denied",
            "message": "members only",
        }
    assert (await ask(ws, {"type": "ping", "id": "alive"}))["type"] == "pong"
    body, headers = app.calls_of("subscribe")[0]
    assert (body["channel"], body["user"], body["since"]) == ("room:secret", "alice", None)
    assert headers["cookie"] == "theme=dark; session=s-alice"


async def test_publish_refused_and_transformed(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided(bad_command_limit=1)
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    reader = await open_ws(server, ALICE)
    await welcomed(reader)
    assert (await ask(reader, {"type": "subscribe", "id": 1, "channel": "wall:1"}))[
        "type"
    ] == "reply"
    # allow_publish is false in `wall`: the application's yes is the permission.
    for n in range(3):
        refused = await ask(
            ws, {"type": "publish", "id": f"spam{n}", "channel": "wall:1", "data": {"text": "spam"}}
        )
        assert (refused["code"], refused["message"]) == ("permission_denied", "no spam")
    reply = await ask(
        ws, {"type": "publish", "id": 2, "channel": "wall:1", "data": {"shout": "hello"}}
    )
    assert reply["result"]["offset"] == 1
    transformed = {"text": "HELLO", "by": "alice"}
    while (message := await receive(reader))["type"] != "message":
        pass
    assert (message["offset"], message["data"]) == (1, transformed)
    status, history = await api_post(server.url, "/api/history", {"channel": "wall:1"})
    assert status == 200
    assert [m["data"] for m in history["messages"]] == [transformed]
    plain = await ask(ws, {"type": "publish", "id": 3, "channel": "wall:1", "data": [1, 2]})
    assert plain["result"]["offset"] == 2  # no `data` in the answer: stored as sent


async def test_rpc_answered_by_the_application(
    decided: Callable[..., Awaitable[Server]], open_ws: Open
) -> None:
    server = await decided(bad_command_limit=1)
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    answer = await ask(ws, {"type": "rpc", "id": 1, "method": "whoami", "data": [1]})
    assert answer["result"] == {"data": {"user": "alice", "args": [1]}}
    for n in range(3):  # rpc errors never count as bad commands
        missing = await ask(ws, {"type": "rpc", "id": f"m{n}", "method": "nope"})
        assert (missing["code"], missing["message"]) == ("not_found", "no method nope")
    assert (await ask(ws, {"type": "ping", "id": "alive"}))["type"] == "pong"


async def test_a_python_handler_is_asked_before_the_application(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided()

    @server.rpc("whoami")
    async def whoami(call: Any) -> Any:
        return {"python": call.user, "info": call.info}

    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    answer = await ask(ws, {"type": "rpc", "id": 1, "method": "whoami"})
    assert answer["result"] == {"data": {"python": "alice", "info": {"name": "Alice"}}}
    assert app.calls_of("rpc") == []


# ----- the application misbehaves


async def test_a_hanging_application_is_unavailable_in_time_and_others_go_on(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open, via: str
) -> None:
    server = await decided(proxy_timeout=0.5)
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    bystander = await open_ws(server, ALICE)
    await welcomed(bystander)
    app.mode = "hang"
    started = time.monotonic()
    error = await ask(ws, {"type": "subscribe", "id": 1, "channel": "room:a"})
    assert error["code"] == "unavailable"
    assert time.monotonic() - started < 0.5 + TIMEOUT / 4
    refused = await open_ws(server, ALICE)
    code, _ = await closed(refused)
    assert code == CloseCode.TRY_AGAIN_LATER
    # Meanwhile nothing else waited: a channel the application does not decide.
    assert (await ask(bystander, {"type": "subscribe", "id": 1, "channel": "chat:x"}))[
        "type"
    ] == "reply"
    rpc = await ask(bystander, {"type": "rpc", "id": 2, "method": "whoami"})
    assert rpc["code"] == "unavailable"
    app.mode = "ok"
    answer = await ask(ws, {"type": "subscribe", "id": 3, "channel": "room:a"})
    assert answer["type"] == "reply", "the same connection works once the application is back"
    samples = await metrics(server.url)
    assert (
        samples[f'plexus_decision_calls_total{{call="subscribe",outcome="failed",via="{via}"}}']
        == 1
    )
    assert samples['plexus_decision_errors_total{call="connect",reason="timeout"}'] == 1
    assert samples['plexus_decision_seconds_count{call="connect"}'] == 3


async def test_answers_that_break_the_contract_are_unavailable(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open, via: str
) -> None:
    server = await decided(bad_command_limit=1)
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    modes = ["garbage", "status"] if via == "proxy" else ["garbage"]
    for mode in modes:
        app.mode = mode
        for n in range(2):
            error = await ask(ws, {"type": "publish", "id": n, "channel": "wall:1", "data": 1})
            assert error["code"] == "unavailable", (mode, error)
        code, _ = await closed(await open_ws(server, ALICE))
        assert code == CloseCode.TRY_AGAIN_LATER
    assert (await ask(ws, {"type": "ping", "id": "alive"}))["type"] == "pong"


# ----- refresh


async def test_refresh_extends_then_expires(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided()
    app.session_ttl = 0.3
    # The extension is 0.6 s from now, and is measured from now: the time the
    # connection takes to open (longer on a busy machine) is inside both.
    extended_from = time.monotonic()
    app.refreshes = [{"result": {"expire_at": time.time() + 0.6}}, {"result": {"expired": True}}]
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    assert (await receive(ws))["type"] == "subscribed"
    assert await closed(ws) == (CloseCode.TOKEN_EXPIRED, "session expired")
    elapsed = time.monotonic() - extended_from
    assert elapsed >= 0.6 - 0.05, "the first refresh extended the session"
    assert len(app.calls_of("refresh")) == 2
    body, headers = app.calls_of("refresh")[0]
    assert body["user"] == "alice"
    assert headers["cookie"] == "theme=dark; session=s-alice"


async def test_without_refresh_the_session_ends_at_expire_at(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open, via: str
) -> None:
    if via == "hook":
        pytest.skip("the hooks module has its on_refresh; the proxy variant leaves the URL out")
    server = await decided(proxy_refresh_url=None)
    app.session_ttl = 0.2
    ws = await open_ws(server, ALICE)
    await welcomed(ws)
    assert (await receive(ws))["type"] == "subscribed"
    assert await closed(ws) == (CloseCode.TOKEN_EXPIRED, "session expired")
    assert app.calls_of("refresh") == []


async def test_a_session_already_expired_is_refused_before_welcome(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided()
    app.session_ttl = -1
    assert await closed(await open_ws(server, ALICE)) == (
        CloseCode.TOKEN_EXPIRED,
        "session expired",
    )


# ----- the shutdown while the application thinks


async def test_shutdown_during_a_connect_call_closes_with_1001(
    decided: Callable[..., Awaitable[Server]], app: DecisionApp, open_ws: Open
) -> None:
    server = await decided()
    app.mode = "hang"
    ws = await open_ws(server, ALICE)
    await asyncio.sleep(0.1)  # sleep-ok: lets the connect call start (nothing to await)
    await server.stop()
    code, _ = await closed(ws)
    assert code == CloseCode.GOING_AWAY


# ----- an embedded server's own hooks


async def test_embedded_hooks_come_before_the_proxy_of_the_same_name(open_ws: Open) -> None:
    class Hooks:
        """Hooks as any object; on_rpc answers, the rest is left to the proxies."""

        async def on_rpc(self, request: Any) -> Any:
            return {"result": {"data": {"hooked": request.method, "user": request.user}}}

    dead = "http://127.0.0.1:9/rpc"  # nothing listens: only the hook can answer
    server = Server(
        Settings(port=0, history_backend="memory", proxy_rpc_url=dead),
        hooks=Hooks(),
    )
    async with server:
        ws = await open_ws(server)
        assert (await welcomed(ws))["user"] is None, "no connect hook nor URL: anonymous"
        answer = await ask(ws, {"type": "rpc", "id": 1, "method": "ping"})
        assert answer["result"] == {"data": {"hooked": "ping", "user": None}}
        assert server.node is not None
        assert server.node.metrics.decisions.calls == {("rpc", "hook", "accepted"): 1}
        await ws.close()
