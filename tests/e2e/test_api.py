"""End-to-end: every endpoint of the backend HTTP API, its errors, and its OpenAPI document.

Every response the tests receive, success or error, is validated against the
schema the OpenAPI document gives for that path, method and status, so the
document cannot drift from the handlers unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from plexus import __version__
from plexus.app import Server
from plexus.auth import make_token
from plexus.client import Client, ConnectionClosed
from plexus.config import NamespaceOptions, default_namespaces
from plexus.transports.http_api import HttpApi
from plexus.transports.openapi import OPENAPI_PATH, openapi_document
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT, post_request, read_response, send_in_parts

API_KEY = "api-key-for-the-tests-0123456789"
SECRET = "api-suite-jwt-secret-0123456789abcdef"  # >= 32 bytes, as HS256 needs
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 4096

DOC = openapi_document()
DOC_URI = "urn:plexus:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(DOC))


def pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) to `parts` inside the document."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def validator_at(json_pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{DOC_URI}#{json_pointer}"}, registry=REGISTRY)


def response_validator(path: str, method: str, status: int) -> Draft202012Validator:
    responses = DOC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path}: status {status} not documented"
    response = responses[str(status)]
    if "$ref" in response:
        where = response["$ref"].removeprefix("#")
    else:
        where = pointer("paths", path, method, "responses", str(status))
    return validator_at(where + pointer("content", "application/json", "schema"))


def request_validator(path: str) -> Draft202012Validator:
    return validator_at(
        pointer("paths", path, "post", "requestBody", "content", "application/json", "schema")
    )


# ----- calling the API


class Api:
    """Calls the server's API and validates every answer against the OpenAPI document."""

    def __init__(self, server: Server, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def call(
        self,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        method: str = "post",
        headers: dict[str, str] | None = None,
        base: str | None = None,
    ) -> tuple[int, Any]:
        """Send `body` as JSON (or `raw` bytes); return (status, JSON answer), validated."""
        kwargs: dict[str, Any] = {"headers": AUTH if headers is None else headers}
        if raw is not None:
            kwargs["data"] = raw
            kwargs["headers"] = {**kwargs["headers"], "Content-Type": "application/json"}
        elif body is not None:
            kwargs["data"] = json.dumps(body)
            kwargs["headers"] = {**kwargs["headers"], "Content-Type": "application/json"}
        url = (base or self.server.url) + path
        async with self.session.request(
            method, url, timeout=aiohttp.ClientTimeout(total=TIMEOUT), **kwargs
        ) as response:
            assert response.content_type == "application/json"
            answer = await response.json()
            status = response.status
        response_validator(path, method, status).validate(answer)
        if status >= 400:
            assert set(answer) == {"error"}
        return status, answer

    async def ok(self, path: str, body: Any = None, *, method: str = "post") -> Any:
        if body is not None:
            request_validator(path).validate(body)
        status, answer = await self.call(path, body, method=method)
        assert status == 200, answer
        return answer

    async def error(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, str]:
        status, answer = await self.call(path, body, **kwargs)
        return status, answer["error"]["code"]


def namespaces() -> dict[str, NamespaceOptions]:
    spaces = default_namespaces()
    spaces["short"] = NamespaceOptions(history_size=2, recovery=True)
    return spaces


@pytest.fixture
async def api_server(make_server: ServerFactory) -> Server:
    return await make_server(
        api_keys=[API_KEY], max_body_size=MAX_BODY, namespaces=namespaces(), jwt_secret=SECRET
    )


@pytest.fixture
async def api(api_server: Server) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(api_server, session)


async def subscriber(
    server: Server, channel: str, *, user: str | None = None, **kwargs: Any
) -> Client:
    token = None if user is None else make_token(SECRET, user=user)
    client = await Client(server.ws_url, token=token, timeout=TIMEOUT).connect()
    await client.subscribe(channel, **kwargs)
    return client


async def next_other(client: Client) -> dict[str, Any]:
    """The next push that belongs to none of the client's subscriptions (e.g. `unsubscribed`)."""
    return await asyncio.wait_for(client.other.get(), TIMEOUT)


def unsubscribed(channel: str) -> dict[str, Any]:
    return {"type": "unsubscribed", "channel": channel, "reason": "unsubscribed by the server"}


# ----- the document


def test_openapi_document_is_well_formed() -> None:
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["version"] == __version__
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    ids = []
    for path, operations in DOC["paths"].items():
        for method, operation in operations.items():
            ids.append(operation["operationId"])
            assert "200" in operation["responses"], (method, path)
            for status in operation["responses"]:
                response_validator(path, method, int(status))  # every $ref resolves
            if "requestBody" in operation:
                request_validator(path).is_valid({})  # every $ref resolves
    assert len(ids) == len(set(ids))


async def test_document_matches_the_routes(api_server: Server, api: Api) -> None:
    assert api_server.node is not None
    routes = {
        (r.method.lower(), r.path)  # type: ignore[attr-defined]
        for r in HttpApi(api_server.node).routes()
        if r.method != "*"  # type: ignore[attr-defined]  # the JSON 404/405 fallback
    }
    documented = {(m, p) for p, ops in DOC["paths"].items() for m in ops}
    assert routes == documented


async def test_openapi_json_is_served_without_a_key(api: Api) -> None:
    status, answer = await api.call(OPENAPI_PATH, method="get", headers={})
    assert status == 200
    assert answer == DOC


# ----- happy paths


async def test_publish_reaches_subscribers(api_server: Server, api: Api) -> None:
    client = await subscriber(api_server, "chat:pub")
    try:
        first = await api.ok("/api/publish", {"channel": "chat:pub", "data": {"text": "héllo"}})
        assert first["offset"] == 1
        second = await api.ok("/api/publish", {"channel": "chat:pub", "data": {"$bytes": "AAE="}})
        assert (second["offset"], second["epoch"]) == (2, first["epoch"])
        sub = client.subscriptions["chat:pub"]
        one, two = [await sub.get(TIMEOUT, kind="message") for _ in range(2)]
        assert one["data"] == {"text": "héllo"}
        assert "from" not in one
        assert two["data"] == b"\x00\x01"  # the client decodes {"$bytes": base64}
        history = await api.ok("/api/history", {"channel": "chat:pub"})
        assert [m["data"] for m in history["messages"]] == [{"text": "héllo"}, {"$bytes": "AAE="}]
    finally:
        await client.close()


async def test_publish_anywhere_even_where_clients_may_not(api: Api) -> None:
    for channel in ("news", "#alice", "a:b:c", "x" * 255):
        assert (await api.ok("/api/publish", {"channel": channel, "data": None}))["offset"] == 1


async def test_broadcast(api_server: Server, api: Api) -> None:
    client = await subscriber(api_server, "chat:b2")
    try:
        await api.ok("/api/publish", {"channel": "chat:b2", "data": 0})
        answer = await api.ok(
            "/api/broadcast", {"channels": ["chat:b1", "chat:b2", "news"], "data": [1]}
        )
        assert answer == {
            "results": [
                {"channel": "chat:b1", "offset": 1},
                {"channel": "chat:b2", "offset": 2},
                {"channel": "news", "offset": 1},
            ]
        }
        sub = client.subscriptions["chat:b2"]
        assert [(await sub.get(TIMEOUT, kind="message"))["data"] for _ in range(2)] == [0, [1]]
    finally:
        await client.close()


async def test_history(api: Api) -> None:
    empty = await api.ok("/api/history", {"channel": "chat:h"})
    assert (empty["messages"], empty["offset"], empty["complete"]) == ([], 0, True)
    for i in range(5):
        await api.ok("/api/publish", {"channel": "chat:h", "data": i})
    full = await api.ok("/api/history", {"channel": "chat:h"})
    assert [m["data"] for m in full["messages"]] == [0, 1, 2, 3, 4]
    assert [m["offset"] for m in full["messages"]] == [1, 2, 3, 4, 5]
    epoch = full["epoch"]
    page = await api.ok(
        "/api/history", {"channel": "chat:h", "since": {"offset": 2, "epoch": epoch}, "limit": 2}
    )
    assert [m["offset"] for m in page["messages"]] == [3, 4]
    assert (page["offset"], page["complete"]) == (5, True)
    other = await api.ok(
        "/api/history", {"channel": "chat:h", "since": {"offset": 2, "epoch": "gone"}}
    )
    assert other["complete"] is False
    assert (await api.ok("/api/history", {"channel": "chat:h", "limit": 0}))["messages"] == []


async def test_history_of_a_short_channel_is_incomplete(api: Api) -> None:
    for i in range(5):
        await api.ok("/api/publish", {"channel": "short:s", "data": i})
    top = await api.ok("/api/history", {"channel": "short:s"})
    assert [m["offset"] for m in top["messages"]] == [4, 5]
    since = {"offset": 1, "epoch": top["epoch"]}
    assert (await api.ok("/api/history", {"channel": "short:s", "since": since}))[
        "complete"
    ] is False


async def test_presence(api_server: Server, api: Api) -> None:
    assert await api.ok("/api/presence", {"channel": "chat:p"}) == {"clients": {}}
    client = await subscriber(api_server, "chat:p", info={"nick": "ann"})
    try:
        answer = await api.ok("/api/presence", {"channel": "chat:p"})
        assert answer == {"clients": {client.client_id: {"user": None, "info": {"nick": "ann"}}}}
    finally:
        await client.close()


async def test_channels(api_server: Server, api: Api) -> None:
    clients = [await subscriber(api_server, "chat:c") for _ in range(2)]
    try:
        for body in (None, {}):
            answer = await api.ok("/api/channels", body)
            assert answer["channels"]["chat:c"] == {"subscribers": 2}
    finally:
        for client in clients:
            await client.close()


async def test_disconnect(api: Api) -> None:
    assert await api.ok("/api/disconnect", {"user": "nobody"}) == {"disconnected": 0}
    assert await api.ok("/api/disconnect", {"client": "c-nobody"}) == {"disconnected": 0}


async def test_disconnect_one_client(api_server: Server, api: Api) -> None:
    first = await subscriber(api_server, "chat:d", user="dave")
    second = await subscriber(api_server, "chat:d", user="dave")
    try:
        answer = await api.ok("/api/disconnect", {"client": first.client_id})
        assert answer == {"disconnected": 1}
        assert await first.wait_closed(TIMEOUT) == 4001
        await second.ping()  # the same user's other connection stays
    finally:
        await first.close()
        await second.close()


async def test_unsubscribe_by_user(api_server: Server, api: Api) -> None:
    alices = [await subscriber(api_server, "chat:u", user="alice") for _ in range(2)]
    bob = await subscriber(api_server, "chat:u", user="bob")  # last: it sees no join
    try:
        for alice in alices:
            await alice.subscribe("chat:marker")
        await api.ok("/api/publish", {"channel": "chat:u", "data": "before"})
        answer = await api.ok("/api/unsubscribe", {"channel": "chat:u", "user": "alice"})
        assert answer == {"unsubscribed": 2}
        for alice in alices:
            assert await next_other(alice) == unsubscribed("chat:u")
            assert "chat:u" not in alice.subscriptions
        bob_sub = bob.subscriptions["chat:u"]
        assert (await bob_sub.get(TIMEOUT))["data"] == "before"
        leaves = [await bob_sub.get(TIMEOUT) for _ in alices]
        assert {(p["type"], p["client"], p["user"]) for p in leaves} == {
            ("leave", alice.client_id, "alice") for alice in alices
        }
        presence = await api.ok("/api/presence", {"channel": "chat:u"})
        assert list(presence["clients"]) == [bob.client_id]

        # Later messages reach bob only; the marker, published after, reaches
        # alice after anything of chat:u would have.
        await api.ok("/api/publish", {"channel": "chat:u", "data": "after"})
        assert (await bob_sub.get(TIMEOUT))["data"] == "after"
        await api.ok("/api/publish", {"channel": "chat:marker", "data": "marker"})
        for alice in alices:
            marker = await alice.subscriptions["chat:marker"].get(TIMEOUT, kind="message")
            assert marker["data"] == "marker"
            assert alice.other.empty()
        assert await api.ok("/api/unsubscribe", {"channel": "chat:u", "user": "alice"}) == {
            "unsubscribed": 0
        }

        # The connection stayed open: it may subscribe again.
        again = await alices[0].subscribe("chat:u")
        assert (await bob_sub.get(TIMEOUT))["type"] == "join"
        await api.ok("/api/publish", {"channel": "chat:u", "data": "again"})
        assert (await again.get(TIMEOUT))["data"] == "again"
        assert (await bob_sub.get(TIMEOUT))["data"] == "again"
    finally:
        for client in (*alices, bob):
            await client.close()


async def test_unsubscribe_ends_the_stream_after_queued_messages(
    api_server: Server, api: Api
) -> None:
    client = await subscriber(api_server, "chat:q", user="alice")
    try:
        sub = client.subscriptions["chat:q"]
        for i in range(3):
            await api.ok("/api/publish", {"channel": "chat:q", "data": i})
        assert await api.ok("/api/unsubscribe", {"channel": "chat:q", "user": "alice"}) == {
            "unsubscribed": 1
        }
        # The Python client ends a subscription's stream (ConnectionClosed) when
        # `unsubscribed` arrives: every message queued before came first.
        assert [(await sub.get(TIMEOUT))["data"] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ConnectionClosed):
            await sub.get(TIMEOUT)
        assert await next_other(client) == unsubscribed("chat:q")
    finally:
        await client.close()


async def test_unsubscribe_by_client(api_server: Server, api: Api) -> None:
    first = await subscriber(api_server, "chat:k", user="alice")
    second = await subscriber(api_server, "chat:k", user="alice")
    try:
        await first.subscribe("chat:marker")
        body = {"channel": "chat:k", "client": first.client_id}
        assert await api.ok("/api/unsubscribe", body) == {"unsubscribed": 1}
        assert await next_other(first) == unsubscribed("chat:k")
        leave = await second.subscriptions["chat:k"].get(TIMEOUT)
        assert (leave["type"], leave["client"]) == ("leave", first.client_id)
        # Only that connection's subscription to that channel ended.
        await api.ok("/api/publish", {"channel": "chat:k", "data": "k"})
        await api.ok("/api/publish", {"channel": "chat:marker", "data": "m"})
        assert (await second.subscriptions["chat:k"].get(TIMEOUT))["data"] == "k"
        assert (await first.subscriptions["chat:marker"].get(TIMEOUT))["data"] == "m"
        assert first.other.empty()
        for nothing in (
            body,  # not subscribed any more
            {"channel": "chat:marker", "client": second.client_id},  # not subscribed to it
            {"channel": "chat:k", "client": "c-unknown"},
            {"channel": "chat:k", "user": "nobody"},
        ):
            assert await api.ok("/api/unsubscribe", nothing) == {"unsubscribed": 0}
        assert second.other.empty()
        await first.subscribe("chat:k")
        await api.ok("/api/publish", {"channel": "chat:k", "data": "back"})
        assert (await first.subscriptions["chat:k"].get(TIMEOUT))["data"] == "back"
    finally:
        for client in (first, second):
            await client.close()


async def test_unsubscribe_refuses_bad_input(api_server: Server, api: Api) -> None:
    bystander = await subscriber(api_server, "chat:x", user="alice")
    me = bystander.client_id
    refused: list[tuple[Any, str]] = [
        # (body: bytes are sent as they are, code)
        ({"user": "alice"}, "bad_request"),
        ({"channel": None, "client": me}, "bad_request"),
        ({"channel": "bad channel", "client": me}, "invalid_channel"),
        ({"channel": "chat:ü", "user": "alice"}, "invalid_channel"),
        ({"channel": "chat:x", "user": "alice", "client": me}, "bad_request"),
        ({"channel": "chat:x", "user": None, "client": me}, "bad_request"),
        ({"channel": "chat:x"}, "bad_request"),
        ({"channel": "chat:x", "user": 5}, "bad_request"),
        ({"channel": "chat:x", "user": ""}, "bad_request"),
        ({"channel": "chat:x", "client": [me]}, "bad_request"),
        (b'{"channel": "chat:x", "user": "alice"', "bad_request"),
        (b"", "bad_request"),
        (["chat:x", "alice"], "bad_request"),
        ("chat:x", "bad_request"),
        ({"channel": "chat:x", "client": me, "pad": "x" * MAX_BODY}, "too_large"),
    ]
    try:
        for body, code in refused:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            status, found = await api.error("/api/unsubscribe", raw=raw)
            assert (status, found) == ({"too_large": 413}.get(code, 400), code), body
            if isinstance(body, dict) and code != "too_large":
                # What the server refuses, the document does not describe as valid.
                assert not request_validator("/api/unsubscribe").is_valid(body), body
        good = {"channel": "chat:x", "client": me}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert await api.error("/api/unsubscribe", good, headers=headers) == (
                401,
                "unauthorized",
            )
        # Nothing was unsubscribed: the bystander still gets the channel's messages.
        await api.ok("/api/publish", {"channel": "chat:x", "data": "still here"})
        assert (await bystander.subscriptions["chat:x"].get(TIMEOUT))["data"] == "still here"
        assert bystander.other.empty()
        assert list((await api.ok("/api/presence", {"channel": "chat:x"}))["clients"]) == [me]
    finally:
        await bystander.close()


async def test_info(api_server: Server, api: Api) -> None:
    client = await subscriber(api_server, "chat:i")
    try:
        info = await api.ok("/api/info", method="get")
        assert info["version"] == __version__
        assert (info["connections"], info["channels"], info["subscriptions"]) == (1, 1, 1)
    finally:
        await client.close()


# ----- errors


# Raw bytes: a 300-level Python structure in a test parameter breaks failure reports.
DEEP = b'{"channel": "chat:x", "data": ' + b"[" * 300 + b"]" * 300 + b"}"
BAD_BODIES: list[tuple[str, Any, str]] = [
    # (path, body (bytes are sent as they are), code)
    ("/api/publish", b"{not json", "bad_request"),
    ("/api/publish", b"", "bad_request"),
    ("/api/publish", b'{"channel": "chat:x", "data": "\\ud800"}', "bad_request"),
    ("/api/publish", b"\xff\xfe{}", "bad_request"),
    ("/api/publish", [1, 2], "bad_request"),
    ("/api/publish", "chat:x", "bad_request"),
    ("/api/publish", 5, "bad_request"),
    ("/api/publish", b"null", "bad_request"),
    ("/api/publish", {}, "bad_request"),
    ("/api/publish", {"channel": "chat:x"}, "bad_request"),
    ("/api/publish", {"data": 1}, "bad_request"),
    ("/api/publish", {"channel": 5, "data": 1}, "bad_request"),
    ("/api/publish", {"channel": None, "data": 1}, "bad_request"),
    ("/api/publish", {"channel": "bad channel", "data": 1}, "invalid_channel"),
    ("/api/publish", {"channel": "", "data": 1}, "invalid_channel"),
    ("/api/publish", {"channel": "x" * 256, "data": 1}, "invalid_channel"),
    ("/api/publish", {"channel": "chat:ü", "data": 1}, "invalid_channel"),
    ("/api/publish", {"channel": "chat:x", "data": {"$bytes": "!!"}}, "bad_request"),
    ("/api/publish", DEEP, "bad_request"),
    ("/api/broadcast", {"data": 1}, "bad_request"),
    ("/api/broadcast", {"channels": "chat:x", "data": 1}, "bad_request"),
    ("/api/broadcast", {"channels": [], "data": 1}, "bad_request"),
    ("/api/broadcast", {"channels": ["chat:x"]}, "bad_request"),
    ("/api/broadcast", {"channels": ["chat:x", 5], "data": 1}, "bad_request"),
    ("/api/broadcast", {"channels": ["chat:x", "no way"], "data": 1}, "invalid_channel"),
    ("/api/broadcast", {"channels": ["a"] * 1001, "data": 1}, "too_large"),
    ("/api/history", {}, "bad_request"),
    ("/api/history", {"channel": "?"}, "invalid_channel"),
    ("/api/history", {"channel": "chat:x", "limit": -1}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "limit": "5"}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "limit": True}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "limit": 1.5}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "since": 3}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "since": {"offset": 1}}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "since": {"offset": -1, "epoch": "e"}}, "bad_request"),
    (
        "/api/history",
        {"channel": "chat:x", "since": {"offset": 2**64, "epoch": "e"}},
        "bad_request",
    ),
    ("/api/history", {"channel": "chat:x", "since": {"offset": "1", "epoch": "e"}}, "bad_request"),
    ("/api/history", {"channel": "chat:x", "since": {"offset": 1, "epoch": 1}}, "bad_request"),
    ("/api/presence", {}, "bad_request"),
    ("/api/presence", {"channel": ["chat:x"]}, "bad_request"),
    ("/api/presence", {"channel": "bad/ch annel"}, "invalid_channel"),
    ("/api/channels", b"{oops", "bad_request"),
    ("/api/channels", [], "bad_request"),
    ("/api/disconnect", {}, "bad_request"),
    ("/api/disconnect", {"user": ""}, "bad_request"),
    ("/api/disconnect", {"user": 5}, "bad_request"),
    ("/api/disconnect", {"client": ""}, "bad_request"),
    ("/api/disconnect", {"user": "a", "client": "b"}, "bad_request"),
]


@pytest.mark.parametrize(
    ("path", "body", "code"), BAD_BODIES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_BODIES)]
)
async def test_bad_request(api: Api, path: str, body: Any, code: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, found = await api.error(path, raw=raw)
    assert (status, found) == ({"too_large": 413}.get(code, 400), code)
    if isinstance(body, dict):
        # What the server refuses, the document does not describe as valid.
        assert not request_validator(path).is_valid(body)
    # A refused request publishes nothing.
    assert (await api.ok("/api/history", {"channel": "chat:x"}))["offset"] == 0


POST_PATHS = [p for p, ops in DOC["paths"].items() if "post" in ops]
ALL_GUARDED = [(p, m) for p, ops in DOC["paths"].items() for m in ops if p != OPENAPI_PATH]


@pytest.mark.parametrize("path", POST_PATHS)
async def test_oversized_body(api: Api, path: str) -> None:
    body = {"channel": "chat:x", "user": "u", "data": "x" * MAX_BODY}
    assert await api.error(path, body) == (413, "too_large")
    # Without Content-Length (chunked), the limit holds while reading.

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"channel": "chat:x", "data": "'
        for _ in range(MAX_BODY // 512 + 1):
            yield b"x" * 512
        yield b'"}'

    headers = {**AUTH, "Content-Type": "application/json"}
    async with api.session.post(api.server.url + path, data=chunks(), headers=headers) as response:
        answer = await response.json()
        assert (response.status, answer["error"]["code"]) == (413, "too_large")


@pytest.mark.parametrize("path", POST_PATHS)
async def test_a_body_not_sent_as_json_is_415(api: Api, path: str) -> None:
    body = b'{"channel": "chat:x", "channels": ["chat:x"], "data": 1, "user": "u"}'
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ):
        async with api.session.post(
            api.server.url + path, data=body, headers={**AUTH, "Content-Type": content_type}
        ) as response:
            status, answer = response.status, await response.json()
        response_validator(path, "post", status).validate(answer)
        assert (status, answer["error"]["code"]) == (415, "bad_request")
    assert (await api.ok("/api/history", {"channel": "chat:x"}))["offset"] == 0


async def test_an_empty_post_needs_no_content_type(api: Api) -> None:
    async with api.session.post(api.server.url + "/api/channels", headers=AUTH) as response:
        assert response.status == 200
        assert "channels" in await response.json()


async def test_a_900_kb_body_in_pieces_is_read_whole(make_server: ServerFactory) -> None:
    server = await make_server(api_keys=[API_KEY])
    data = "b" * 900_000
    body = json.dumps({"channel": "chat:big", "data": data}).encode()
    request = post_request("/api/publish", body, AUTH)
    parts = [request[i : i + 300_000] for i in range(0, len(request), 300_000)]
    status, _, answer = await send_in_parts(server.port, parts)
    assert (status, json.loads(answer)["offset"]) == (200, 1)
    async with aiohttp.ClientSession() as session:
        history = await Api(server, session).ok("/api/history", {"channel": "chat:big"})
    assert history["messages"][0]["data"] == data


async def test_a_body_that_stops_coming_is_408(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(api_keys=[API_KEY], http_request_timeout=0.3)
    request = post_request("/api/publish", b'{"channel": "chat:x", "data": 1}', AUTH)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request[:-10])  # and never the rest
    status, headers, body = await read_response(reader)
    answer = json.loads(body)
    response_validator("/api/publish", "post", status).validate(answer)
    assert (status, answer["error"]["code"]) == (408, "bad_request")
    # Closed once aiohttp's lingering read (10 s at most) gives up on the rest.
    assert headers["connection"] == "close"
    writer.close()
    # A client that goes away in the middle of its body is not a server error.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request[:-10])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    async with aiohttp.ClientSession() as session:
        assert (await Api(server, session).ok("/api/history", {"channel": "chat:x"}))["offset"] == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("path", "method"), ALL_GUARDED)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": ""}],
    ids=["none", "wrong", "no-scheme", "empty"],
)
async def test_unauthorized(api: Api, path: str, method: str, headers: dict[str, str]) -> None:
    body = {"channel": "chat:x", "data": 1, "user": "u", "channels": ["chat:x"]}
    sent = body if method == "post" else None
    assert await api.error(path, sent, method=method, headers=headers) == (401, "unauthorized")


def non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_without_keys_only_loopback_callers(make_server: ServerFactory) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    server = await make_server(host="0.0.0.0")
    async with aiohttp.ClientSession() as session:
        api = Api(server, session)
        local = f"http://127.0.0.1:{server.port}"
        remote = f"http://{address}:{server.port}"
        body = {"channel": "chat:x", "data": 1}
        assert (await api.call("/api/publish", body, headers={}, base=local))[0] == 200
        for path, method in ALL_GUARDED:
            sent = body if method == "post" else None
            status, answer = await api.call(path, sent, method=method, headers={}, base=remote)
            assert (status, answer["error"]["code"]) == (403, "permission_denied")
            # Forwarding headers are not believed: only the socket's peer counts.
            spoofed = {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
            status, _ = await api.call(path, sent, method=method, headers=spoofed, base=remote)
            assert status == 403
            # A key sent to a server that has none does not help.
            status, _ = await api.call(
                path, sent, method=method, headers={"Authorization": "Bearer x"}, base=remote
            )
            assert status == 403
        # The document stays public.
        assert (await api.call(OPENAPI_PATH, method="get", headers={}, base=remote))[0] == 200


async def test_an_ipv4_caller_of_a_dual_stack_server_is_loopback(
    make_server: ServerFactory,
) -> None:
    # Bound to "::", the server sees IPv4 peers as ::ffff:a.b.c.d.
    server = await make_server(host="::")
    async with aiohttp.ClientSession() as session:
        api = Api(server, session)
        for base in (f"http://127.0.0.1:{server.port}", f"http://[::1]:{server.port}"):
            status, answer = await api.call(
                "/api/publish", {"channel": "chat:x", "data": 1}, headers={}, base=base
            )
            assert status == 200, answer


async def test_unknown_paths_and_methods_get_json_errors(api_server: Server) -> None:
    server = api_server
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/api/nope", json={}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
        async with session.get(server.url + "/api/publish") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"
            assert (await response.json())["error"]["code"] == "bad_request"
        async with session.post(server.url + "/api/info") as response:
            assert response.status == 405


# ----- /api/subscribe


async def test_subscribe_by_user_and_by_client(api_server: Server, api: Api) -> None:
    token = make_token(SECRET, user="alice")
    alices = [await Client(api_server.ws_url, token=token, timeout=TIMEOUT).connect() for _ in "ab"]
    bob = await Client(
        api_server.ws_url, token=make_token(SECRET, user="bob"), timeout=TIMEOUT
    ).connect()
    try:
        assert await api.ok("/api/subscribe", {"channel": "chat:s", "user": "alice"}) == {
            "subscribed": 2
        }
        subs = [await alice.wait_subscription("chat:s", TIMEOUT) for alice in alices]
        assert all(sub.server for sub in subs)
        assert "chat:s" not in bob.subscriptions
        await api.ok("/api/publish", {"channel": "chat:s", "data": "hi"})
        for sub in subs:
            assert (await sub.get(TIMEOUT, kind="message"))["data"] == "hi"
        # Already subscribed: nothing made, nothing sent.
        assert await api.ok("/api/subscribe", {"channel": "chat:s", "user": "alice"}) == {
            "subscribed": 0
        }
        body = {"channel": "chat:t", "client": bob.client_id}
        assert await api.ok("/api/subscribe", body) == {"subscribed": 1}
        assert (await bob.wait_subscription("chat:t", TIMEOUT)).server
        for nothing in (
            {"channel": "chat:t", "client": "c-unknown"},
            {"channel": "chat:t", "user": "nobody"},
        ):
            assert await api.ok("/api/subscribe", nothing) == {"subscribed": 0}
        # A channel the user may not read: an error push to it, not counted,
        # and never a bad command of the client's (it did nothing).
        refused = {"channel": "#alice", "user": "bob"}
        for _ in range(25):  # over bad_command_limit (20)
            assert await api.ok("/api/subscribe", refused) == {"subscribed": 0}
            error = await next_other(bob)
            assert (error["type"], error["code"]) == ("error", "permission_denied")
            assert "id" not in error
        await bob.ping()
        assert bob.close_code is None
        # Its own subscription now: unsubscribe ends it like any other.
        await alices[0].unsubscribe("chat:s")
        assert "chat:s" not in alices[0].subscriptions
    finally:
        for client in (*alices, bob):
            await client.close()


async def test_subscribe_refuses_bad_input(api_server: Server, api: Api) -> None:
    refused: list[tuple[Any, str]] = [
        ({"user": "alice"}, "bad_request"),
        ({"channel": "bad channel", "user": "alice"}, "invalid_channel"),
        ({"channel": "chat:x", "user": "alice", "client": "c-1"}, "bad_request"),
        ({"channel": "chat:x"}, "bad_request"),
        ({"channel": "chat:x", "user": 5}, "bad_request"),
        ({"channel": "chat:x", "client": ""}, "bad_request"),
        (b'{"channel": "chat:x", "user": "alice"', "bad_request"),
        (["chat:x", "alice"], "bad_request"),
        ({"channel": "chat:x", "user": "alice", "pad": "x" * MAX_BODY}, "too_large"),
    ]
    for body, code in refused:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, found = await api.error("/api/subscribe", raw=raw)
        assert (status, found) == ({"too_large": 413}.get(code, 400), code), body
        if isinstance(body, dict) and code != "too_large":
            assert not request_validator("/api/subscribe").is_valid(body), body
    good = {"channel": "chat:x", "user": "alice"}
    assert await api.error("/api/subscribe", good, headers={}) == (401, "unauthorized")
