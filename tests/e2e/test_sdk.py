"""The backend SDK (`plexus.api`), sync and async, against a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from plexus.api import ApiError, AsyncPlexusApi, PlexusApi
from plexus.client import Client, ConnectionClosed
from tests.helpers import TIMEOUT, ServerProcess

KEY = "k" * 40


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"PLEXUS_HISTORY_BACKEND": "memory", "PLEXUS_API_KEYS": KEY}
    with ServerProcess(env=env) as proc:
        yield proc


@pytest.fixture
def api(server: ServerProcess) -> PlexusApi:
    return PlexusApi(server.url, api_key=KEY, timeout=TIMEOUT)


def test_sync_publish_history_and_bytes(api: PlexusApi) -> None:
    first = api.publish("chat:sdk-sync", {"text": "one"})
    second = api.publish("chat:sdk-sync", {"blob": b"\x00\xff"})
    assert second == first + 1
    page = api.history("chat:sdk-sync")
    assert [m["data"] for m in page["messages"]] == [{"text": "one"}, {"blob": b"\x00\xff"}]
    assert page["offset"] == second
    since = {"offset": first, "epoch": page["epoch"]}
    later = api.history("chat:sdk-sync", since=since, limit=1)
    assert [m["offset"] for m in later["messages"]] == [second]
    assert later["complete"] is True


def test_sync_admin_calls(api: PlexusApi) -> None:
    results = api.broadcast(["chat:sdk-a", "chat:sdk-b"], {"n": 1})
    assert [r["channel"] for r in results] == ["chat:sdk-a", "chat:sdk-b"]
    assert api.presence("chat:sdk-a") == {}
    assert isinstance(api.channels(), dict)
    assert api.disconnect("nobody") == 0
    assert api.disconnect(client="c-nobody") == 0
    assert api.unsubscribe("chat:sdk-a", user="nobody") == 0
    assert "version" in api.info()


def test_a_ws_url_works_as_the_base(server: ServerProcess) -> None:
    assert PlexusApi(server.ws_url, api_key=KEY).publish("chat:sdk-ws", 1) >= 1


@pytest.mark.parametrize(
    ("call", "code", "status"),
    [
        (lambda a: a.publish("bad channel", 1), "invalid_channel", 400),
        (lambda a: a.publish("chat:big", "x" * (2 * 1024 * 1024)), "too_large", 413),
        (lambda a: a.history("chat:x", limit=-1), "bad_request", 400),
        (lambda a: a.broadcast([], 1), "bad_request", 400),
        (lambda a: a.disconnect(""), "bad_request", 400),
    ],
)
def test_sync_refusals_carry_the_server_code(
    api: PlexusApi, call: object, code: str, status: int
) -> None:
    with pytest.raises(ApiError) as caught:
        call(api)  # type: ignore[operator]
    assert (caught.value.code, caught.value.status) == (code, status)


def test_sync_wrong_or_missing_key_is_unauthorized(server: ServerProcess) -> None:
    for key in ("wrong" * 8, None):
        with pytest.raises(ApiError) as caught:
            PlexusApi(server.url, api_key=key).publish("chat:x", 1)
        assert (caught.value.code, caught.value.status) == ("unauthorized", 401)


def test_sync_unreachable_server_is_unavailable() -> None:
    with pytest.raises(ApiError) as caught:
        PlexusApi("http://127.0.0.1:9", timeout=2).publish("chat:x", 1)
    assert caught.value.code == "unavailable"
    assert caught.value.status == 0


def test_unsubscribe_and_disconnect_need_exactly_one_target(api: PlexusApi) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        api.unsubscribe("chat:x")
    with pytest.raises(ValueError, match="exactly one"):
        api.unsubscribe("chat:x", user="a", client="b")
    with pytest.raises(ValueError, match="exactly one"):
        api.disconnect()
    with pytest.raises(ValueError, match="exactly one"):
        api.disconnect("a", client="b")


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({1, 2}, "data: set is not JSON-serialisable"),
        ({"price": Decimal("9.99")}, "data.price: Decimal is not JSON-serialisable"),
        ({"items": [1, {"at": datetime.date(2026, 1, 1)}]}, "data.items[1].at: date is not"),
        ({"n": float("nan")}, "data.n: nan is not a JSON number"),
        ({1: "x"}, "data: key 1 is int, not a string"),
    ],
)
def test_unencodable_data_is_refused_before_sending(api: PlexusApi, data: Any, where: str) -> None:
    for call in (lambda: api.publish("chat:x", data), lambda: api.broadcast(["chat:x"], data)):
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.code == "bad_request"
        assert caught.value.status == 0, "refused here, never sent"
        assert caught.value.message.startswith(where)


async def test_async_publish_reaches_a_subscriber_and_unsubscribe_ends_it(
    server: ServerProcess,
) -> None:
    async with (
        AsyncPlexusApi(server.url, api_key=KEY, timeout=TIMEOUT) as api,
        Client(server.ws_url, timeout=TIMEOUT) as client,
    ):
        sub = await client.subscribe("chat:sdk-async")
        offset = await api.publish("chat:sdk-async", {"text": "hi", "raw": b"\x01"})
        message = await sub.get(TIMEOUT, kind="message")
        assert (message["offset"], message["data"]) == (offset, {"text": "hi", "raw": b"\x01"})
        assert client.client_id in await api.presence("chat:sdk-async")
        assert await api.unsubscribe("chat:sdk-async", client=client.client_id) == 1
        pushed = await asyncio.wait_for(client.other.get(), TIMEOUT)
        assert pushed["type"] == "unsubscribed"
        assert pushed["channel"] == "chat:sdk-async"
        with pytest.raises(ConnectionClosed):  # the subscription's stream ended
            await sub.get(TIMEOUT, kind="message")
        assert await api.presence("chat:sdk-async") == {}


async def test_async_refusals_and_unreachable(server: ServerProcess) -> None:
    async with AsyncPlexusApi(server.url, api_key="wrong" * 8, timeout=TIMEOUT) as api:
        with pytest.raises(ApiError) as caught:
            await api.publish("chat:x", 1)
        assert (caught.value.code, caught.value.status) == ("unauthorized", 401)
    async with AsyncPlexusApi(server.url, api_key=KEY, timeout=TIMEOUT) as api:
        with pytest.raises(ApiError) as caught:
            await api.history("bad channel")
        assert caught.value.code == "invalid_channel"
        assert (await api.info())["version"]
    async with AsyncPlexusApi("http://127.0.0.1:9", timeout=2) as api:
        with pytest.raises(ApiError) as caught:
            await api.channels()
        assert caught.value.code == "unavailable"


class Recorder(BaseHTTPRequestHandler):
    """Answers every request 200 `{}` and records its Authorization header."""

    seen: list[str | None]

    def _answer(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on an ephemeral loopback port, in a thread."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str | None]]]:
    """Another site: its URL, and the Authorization headers it was sent."""
    seen: list[str | None] = []
    handler = type("Rec", (Recorder,), {"seen": seen})
    with serve(handler) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}", seen


@pytest.fixture
def redirector(recorder: tuple[str, list[str | None]]) -> Iterator[str]:
    """A server that answers every API call with a redirect to the recorder."""
    target = recorder[0]

    class Redirect(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            code = 302 if self.command == "POST" else 307
            self.send_response(code)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serve(Redirect) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}"


def test_sync_sdk_follows_no_redirect_with_the_key(
    redirector: str, recorder: tuple[str, list[str | None]]
) -> None:
    api = PlexusApi(redirector, api_key=KEY, timeout=TIMEOUT)
    for call, status in ((lambda: api.publish("chat:x", 1), 302), (api.info, 307)):
        with pytest.raises(ApiError) as caught:
            call()
        assert (caught.value.code, caught.value.status) == ("unavailable", status)
        assert "redirect" in caught.value.message
    assert recorder[1] == []  # the other site never heard from us


async def test_async_sdk_follows_no_redirect_with_the_key(
    redirector: str, recorder: tuple[str, list[str | None]]
) -> None:
    async with AsyncPlexusApi(redirector, api_key=KEY, timeout=TIMEOUT) as api:
        for call, status in ((lambda: api.publish("chat:x", 1), 302), (api.info, 307)):
            with pytest.raises(ApiError) as caught:
                await call()
            assert (caught.value.code, caught.value.status) == ("unavailable", status)
    assert recorder[1] == []
