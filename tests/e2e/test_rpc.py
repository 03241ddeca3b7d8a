"""End-to-end: `rpc` handlers in Python, and what their errors become on the wire."""

from __future__ import annotations

import logging
from typing import Any

import jwt
import pytest

from plexus.app import Server
from plexus.client import Client, PlexusClientError
from plexus.exceptions import PermissionDenied, PlexusError
from plexus.protocol.codes import ErrorCode
from plexus.rpc import RpcCall
from tests.conftest import ClientFactory, ServerFactory
from tests.helpers import TIMEOUT

SECRET = "rpc-suite-secret-0123456789abcdefghijkl"


class Weird(PlexusError):
    """An application error with its own code, which is no protocol error code."""


@pytest.fixture
async def rpc_server(make_server: ServerFactory) -> Server:
    server = await make_server(jwt_secret=SECRET, bad_command_limit=3)

    @server.rpc("me")
    async def me(call: RpcCall) -> Any:
        return {"user": call.user, "claims": dict(call.claims), "info": call.info}

    @server.rpc("denied")
    async def denied(call: RpcCall) -> Any:
        raise PermissionDenied("not yours")

    @server.rpc("denied-by-name")
    async def denied_by_name(call: RpcCall) -> Any:
        raise PlexusError("not yours either", "permission_denied")  # type: ignore[arg-type]

    @server.rpc("weird-code")
    async def weird_code(call: RpcCall) -> Any:
        raise Weird("my own code", "teapot")  # type: ignore[arg-type]

    @server.rpc("not-json")
    async def not_json(call: RpcCall) -> Any:
        return {"when": object()}

    @server.rpc("boom")
    async def boom(call: RpcCall) -> Any:
        raise RuntimeError("bug")

    return server


async def test_handlers_see_the_user_claims_and_info(
    rpc_server: Server, connect: ClientFactory
) -> None:
    claims = {"sub": "alice", "info": {"nick": "Al"}, "plan": "pro", "org": 7}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    client = await connect(rpc_server.ws_url, token=token)
    assert await client.rpc("me") == {"user": "alice", "claims": claims, "info": {"nick": "Al"}}
    anonymous = await connect(rpc_server.ws_url)
    assert await anonymous.rpc("me") == {"user": None, "claims": {}, "info": None}


@pytest.mark.parametrize(
    ("method", "code", "message"),
    [
        ("denied", "permission_denied", "not yours"),
        ("denied-by-name", "permission_denied", "not yours either"),
        ("weird-code", "internal", "internal error"),
        ("not-json", "internal", "internal error"),
        ("boom", "internal", "internal error"),
        ("nobody", "not_found", "no handler for rpc method 'nobody'"),
    ],
)
async def test_errors_answer_one_code_and_never_close(
    rpc_server: Server,
    connect: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    method: str,
    code: str,
    message: str,
) -> None:
    client = await connect(rpc_server.ws_url)
    # More failures than bad_command_limit (3): rpc errors are not bad commands.
    for _ in range(5):
        with pytest.raises(PlexusClientError) as info:
            await client.rpc(method)
        assert (info.value.code, info.value.message) == (code, message)
    await client.ping()
    assert client.reconnects == 0
    assert client.close_code is None
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if code == ErrorCode.INTERNAL:
        assert len(logged) == 5
        assert all("command Rpc of" in r.getMessage() for r in logged)
        assert all(r.exc_info is not None for r in logged), "logged with the traceback"
    else:
        assert logged == []


async def test_a_failed_rpc_does_not_disturb_the_next_commands(
    rpc_server: Server, connect: ClientFactory
) -> None:
    client = await connect(rpc_server.ws_url)
    sub = await client.subscribe("chat:after")
    with pytest.raises(PlexusClientError):
        await client.rpc("weird-code")
    await client.publish("chat:after", "still here")
    assert (await sub.get(TIMEOUT, kind="message"))["data"] == "still here"
    async with Client(rpc_server.ws_url, timeout=TIMEOUT) as other:
        assert (await other.rpc("me"))["user"] is None
