"""End-to-end: attacks on a live server, each refused with its documented code.

The table `ATTACKS` holds one row per attack: the settings it needs, a
coroutine that performs it and reports what the attacker saw (an outcome tuple
such as `("close", 4001)` or `("http", 401, "unauthorized")`), and the outcome
the spec promises. Every row also checks that nothing else was affected: a
bystander subscribed to `chat:bystander` (the target of some attacks) receives
every message published before and after the attack, in order, with
consecutive offsets, so a refused attack consumed no offset either.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import plexus.app
from plexus.app import Server
from plexus.auth import make_token
from plexus.client import Client, PlexusClientError
from plexus.config import NamespaceOptions, default_namespaces
from plexus.connection import Connection
from plexus.protocol.codec import MSGPACK_SUBPROTOCOL
from tests.conftest import ServerFactory
from tests.helpers import (
    TIMEOUT,
    api_post,
    open_raw_ws,
    post_request,
    read_frame,
    read_response,
    send_in_parts,
    wait_for,
    zero_masked,
)

SECRET = "plexus-security-suite-secret-0123456789"  # >= 32 bytes, as HS256 needs
OTHER_SECRET = "an-attacker-guessed-this-secret-9876543210"
API_KEY = "key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BYSTANDER_CHANNEL = "chat:bystander"

Outcome = tuple[Any, ...]


def namespaces() -> dict[str, NamespaceOptions]:
    """The built-ins, `secret:*` (private, clients may publish) and `vault:*`.

    `vault:*` is private and keeps presence and history: there a refused
    `presence` or `history` can only be refused for being private.
    `dropbox:*` is private but lets clients publish without subscribing.
    """
    spaces = default_namespaces()
    spaces["secret"] = NamespaceOptions(private=True, allow_publish=True)
    spaces["dropbox"] = NamespaceOptions(
        private=True, allow_publish=True, publish_without_subscribe=True
    )
    spaces["vault"] = NamespaceOptions(
        private=True, allow_publish=True, presence=True, history_size=10, recovery=True
    )
    return spaces


def base_settings() -> dict[str, Any]:
    return {"jwt_secret": SECRET, "api_keys": [API_KEY], "namespaces": namespaces()}


def token(user: str = "alice", **kwargs: Any) -> str:
    return make_token(SECRET, user=user, **kwargs)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand: HMAC-SHA256 with `key`, or no signature at all."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b""
    if key is not None:
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@functools.cache
def rsa_public_pem() -> bytes:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ----- the attacker's tools


@dataclass
class Ctx:
    """What an attack gets: the server under attack and an HTTP session."""

    server: Server
    session: aiohttp.ClientSession

    async def open(
        self, tok: str | None = None, *, origin: str | None = None, host: str | None = None
    ) -> tuple[Outcome, aiohttp.ClientWebSocketResponse | None]:
        """Open a WebSocket; report ("http", status), ("close", code) or ("welcome", user).

        `host`: the Host header to send instead of the URL's (what a DNS
        rebinding page's browser sends).
        """
        params = {"token": tok} if tok is not None else None
        headers = {"Host": host} if host is not None else None
        try:
            ws = await self.session.ws_connect(
                self.server.ws_url, params=params, origin=origin, headers=headers
            )
        except aiohttp.WSServerHandshakeError as exc:
            return ("http", exc.status), None
        first = await ws.receive(timeout=TIMEOUT)
        if first.type is aiohttp.WSMsgType.CLOSE:
            return ("close", first.data), None
        assert first.type is aiohttp.WSMsgType.TEXT, first
        welcome = first.json()
        assert welcome["type"] == "welcome"
        return ("welcome", welcome["user"]), ws

    async def connect(self, tok: str | None = None) -> aiohttp.ClientWebSocketResponse:
        outcome, ws = await self.open(tok)
        assert outcome[0] == "welcome", outcome
        assert ws is not None
        return ws

    async def first_frame(
        self, tok: str | None = None, *, origin: str | None = None, host: str | None = None
    ) -> Outcome:
        outcome, ws = await self.open(tok, origin=origin, host=host)
        if ws is not None:
            await ws.close()
        return outcome

    async def event_stream(self, tok: str | None = None, *, origin: str | None = None) -> Outcome:
        """Open `GET /sse`; report ("http", status), ("close", code) or ("welcome", user)."""
        params = {"token": tok} if tok is not None else {}
        headers = {"Origin": origin} if origin is not None else {}
        async with self.session.get(
            self.server.url + "/sse",
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response:
            if response.status != 200:
                return ("http", response.status)
            first = json.loads((await response.content.readuntil(b"\n\n"))[6:])
            if first["type"] == "close":
                return ("close", first["code"])
            return ("welcome", first["user"])

    async def api(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Outcome:
        status, answer = await api_post(self.server.url, path, body, headers=headers or {})
        return ("http", status, answer["error"]["code"] if status >= 400 else answer)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """POST raw bytes with exactly `headers` (a browser's form, a rebinding page's Host).

        Reports ("http", status, error code) or ("http", 200, "ok").
        """
        async with self.session.post(
            self.server.url + path,
            data=body,
            headers=headers,
            skip_auto_headers=["Content-Type"],
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response:
            answer = await response.json(content_type=None)
            return (
                "http",
                response.status,
                answer["error"]["code"] if answer.get("error") else "ok",
            )


def sse_commands() -> bytes:
    """A POST /emulation body publishing to the bystander's channel, in a made-up session."""
    publish = {"type": "publish", "id": 1, "channel": BYSTANDER_CHANNEL, "data": "forged"}
    return json.dumps({"session": "guessed", "commands": [publish]}).encode()


async def trickled_publish(ctx: Ctx) -> Outcome:
    """A 3 KB publish whose body arrives in three TCP segments (what a busy network does)."""
    body = json.dumps({"channel": "chat:trickle", "data": "t" * 3000}).encode()
    request = post_request("/api/publish", body, AUTH)
    cut = len(request) - len(body)
    parts = [request[: cut + 10], request[cut + 10 : cut + 2000], request[cut + 2000 :]]
    status, _, answer = await send_in_parts(ctx.server.port, parts)
    return ("http", status, json.loads(answer).get("offset"))


def to_bystander(data: Any = "forged") -> bytes:
    return json.dumps({"channel": BYSTANDER_CHANNEL, "data": data}).encode()


def keyless(_: Path) -> dict[str, Any]:
    """The default: no API key, loopback callers only."""
    return {"api_keys": []}


async def ask(ws: aiohttp.ClientWebSocketResponse, command: dict[str, Any]) -> Outcome:
    """Send one command with an id; report ("reply",) or ("error", code) for that id."""
    cid = command.setdefault("id", 1)
    await ws.send_json(command)
    while True:
        msg = await ws.receive(timeout=TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return ("closed", msg.data)
        answer = msg.json()
        if answer.get("id") != cid:
            continue  # a push
        if answer["type"] == "error":
            return ("error", answer["code"])
        return ("reply",)


async def command_as(ctx: Ctx, tok: str | None, *commands: dict[str, Any]) -> Outcome:
    """Connect with `tok`, run `commands` in turn; the outcome of the last one."""
    ws = await ctx.connect(tok)
    outcome: Outcome = ()
    for number, command in enumerate(commands, 1):
        outcome = await ask(ws, {**command, "id": number})
    await ws.close()
    return outcome


def subscribe(channel: str, **fields: Any) -> dict[str, Any]:
    return {"type": "subscribe", "channel": channel, **fields}


# ----- the attacks


async def flood(ctx: Ctx) -> Outcome:
    """40 publishes at once with a 1/s rate and a 30-answer disconnect threshold."""
    ws = await ctx.connect()
    for i in range(40):
        await ws.send_json({"type": "publish", "id": i, "channel": "chat:flood", "data": i})
    codes: dict[int, str | None] = {}
    while True:
        msg = await ws.receive(timeout=TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        answer = msg.json()
        codes[answer["id"]] = answer.get("code")
    # Answers may come out of order (an accepted publish is answered once
    # stored); the first publish was within the burst, the next ones not.
    assert codes.pop(0) is None
    assert set(codes.values()) == {"rate_limited"}
    return ("close", msg.data, len(codes))


async def join_leave_flood(ctx: Ctx) -> Outcome:
    """40 subscribe/unsubscribe pairs with 1 KiB of info into the bystander's channel, at once.

    Each pair would push a join and a leave to every subscriber there.
    """
    ws = await ctx.connect()
    info = {"pad": "i" * 1000}
    for i in range(40):
        await ws.send_json(subscribe(BYSTANDER_CHANNEL, id=2 * i, info=info))
        await ws.send_json({"type": "unsubscribe", "id": 2 * i + 1, "channel": BYSTANDER_CHANNEL})
    codes: dict[int, str | None] = {}
    while True:
        msg = await ws.receive(timeout=TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        answer = msg.json()
        if "id" in answer:
            codes[answer["id"]] = answer.get("code")
    assert [codes.pop(i) for i in range(4)] == [None] * 4  # the burst
    assert set(codes.values()) == {"rate_limited"}
    return ("close", msg.data, len(codes))


async def connections_per_ip(ctx: Ctx) -> Outcome:
    """The bystander holds one of the three allowed connections from 127.0.0.1."""
    first, second = await ctx.connect(), await ctx.connect()
    outcome = await ctx.first_frame()
    await first.close()
    await second.close()
    return outcome


async def idle_sockets_per_ip(ctx: Ctx) -> Outcome:
    """Two sockets that never send a request hold two of the three slots, the bystander one."""
    idle = [await asyncio.open_connection("127.0.0.1", ctx.server.port) for _ in range(2)]
    try:
        return await ctx.first_frame()
    finally:
        for _, writer in idle:
            writer.close()


def server_side(server: Server, before: set[Connection]) -> Connection:
    """The server's end of the one connection opened since `before` was taken."""
    assert server.endpoint is not None
    (conn,) = server.endpoint.connections - before
    return conn


async def ping_flood(ctx: Ctx) -> Outcome:
    """20 MB of WebSocket pings from a client that reads nothing until the flood is over.

    Reports whether the server's unsent output stayed within `max_queue_bytes`
    all along, whether it answered fewer pongs than pings (coalesced), and
    whether the last pong answers the last ping.
    """
    server = ctx.server
    assert server.endpoint is not None
    before = set(server.endpoint.connections)
    reader, writer = await open_raw_ws(server.port, buffers=65536)
    conn = server_side(server, before)
    limit = server.settings.max_queue_bytes
    pings, per_write, peak = 160_000, 8_000, 0
    for start in range(0, pings, per_write):
        writer.write(
            b"".join(
                zero_masked(b"%08d" % i + b"p" * 100, 0x9) for i in range(start, start + per_write)
            )
        )
        await asyncio.wait_for(writer.drain(), TIMEOUT)
        peak = max(peak, conn.outbox.buffered)
    # A command behind the pings: once it is answered, every ping was read.
    commands = server.node.counters.commands if server.node else 0
    writer.write(zero_masked(b'{"type":"ping","id":"end"}'))
    await wait_for(lambda: server.node is not None and server.node.counters.commands > commands)
    peak = max(peak, conn.outbox.buffered)
    pongs, last = 0, b""
    while True:  # now read it all
        opcode, payload = await read_frame(reader)
        if opcode == 0xA:
            pongs, last = pongs + 1, payload
        elif opcode == 0x8 or json.loads(payload) == {"type": "pong", "id": "end"}:
            break
    writer.close()
    return ("ping flood", peak <= limit, pongs < pings, last == b"%08d" % (pings - 1) + b"p" * 100)


async def endless_fragments(ctx: Ctx) -> Outcome:
    """One message begun, then 100,000 empty continuation frames (3 million cost 13 s of CPU)."""
    reader, writer = await open_raw_ws(ctx.server.port)
    writer.write(zero_masked(b'{"type":"ping",', 0x1, fin=False))
    writer.write(zero_masked(b"", 0x0, fin=False) * 100_000 + zero_masked(b'"id":1}', 0x0))
    opcode, payload = await read_frame(reader)
    writer.close()
    if opcode == 0x8:
        return ("close", int.from_bytes(payload[:2]))
    return ("message", json.loads(payload)["type"])


async def connections_per_node(ctx: Ctx) -> Outcome:
    first = await ctx.connect()
    outcome = await ctx.first_frame()
    await first.close()
    return outcome


async def too_many_subscriptions(ctx: Ctx) -> Outcome:
    return await command_as(ctx, None, subscribe("chat:a"), subscribe("chat:b"), subscribe("a:c"))


async def oversized_chunked_body(ctx: Ctx) -> Outcome:
    """A body without Content-Length: the limit holds while reading."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"channel": "chat:x", "data": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    headers = {**AUTH, "Content-Type": "application/json"}
    async with ctx.session.post(
        ctx.server.url + "/api/publish", data=chunks(), headers=headers
    ) as response:
        return ("http", response.status, (await response.json())["error"]["code"])


def hs256_with_public_key() -> str:
    """The algorithm-confusion attack: HMAC "signed" with the server's public RSA key."""
    return forge({"alg": "HS256", "typ": "JWT"}, {"sub": "mallory"}, rsa_public_pem())


def public_key_settings(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "jwt.pub.pem"
    path.write_bytes(rsa_public_pem())
    return {"jwt_secret": None, "jwt_public_key": str(path), "api_keys": [API_KEY]}


def bound_subscription_token(channel: str, client: str) -> str:
    claims = {"sub": "alice", "channel": channel, "client": client, "exp": time.time() + 60}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def msgpack_publish(ctx: Ctx) -> Outcome:
    """MessagePack data that JSON subscribers could never be sent: a bytes map key."""
    ws = await ctx.session.ws_connect(ctx.server.ws_url, protocols=[MSGPACK_SUBPROTOCOL])
    assert msgpack.unpackb(await ws.receive_bytes(timeout=TIMEOUT))["type"] == "welcome"
    command = {"type": "publish", "id": 1, "channel": BYSTANDER_CHANNEL, "data": {b"k": 1}}
    await ws.send_bytes(msgpack.packb(command))
    answer = msgpack.unpackb(await ws.receive_bytes(timeout=TIMEOUT))
    await ws.close()
    return (answer["type"], answer["id"], answer["code"])


@dataclass(frozen=True)
class Attack:
    """One row: `run` performs the attack and reports what the attacker saw."""

    name: str
    run: Callable[[Ctx], Awaitable[Outcome]]
    expect: Outcome
    settings: Callable[[Path], dict[str, Any]] = field(default=lambda _: {})


ALICE = token("alice")
HUGE = {"offset": 2**64, "epoch": "e"}
ATTACKS = [
    # --- connection tokens: refused with a close code and no welcome
    Attack(
        "forged signature",
        lambda c: c.first_frame(make_token(OTHER_SECRET, user="alice")),
        ("close", 4001),
    ),
    Attack(
        "alg none",
        lambda c: c.first_frame(forge({"alg": "none", "typ": "JWT"}, {"sub": "alice"}, None)),
        ("close", 4001),
    ),
    Attack(
        "alg None with a valid HMAC",
        lambda c: c.first_frame(forge({"alg": "None"}, {"sub": "alice"}, SECRET.encode())),
        ("close", 4001),
    ),
    Attack("garbage token", lambda c: c.first_frame("not.a.jwt"), ("close", 4001)),
    Attack(
        "claims changed after signing",
        lambda c: c.first_frame(
            ALICE.split(".")[0]
            + "."
            + b64url(json.dumps({"sub": "admin"}).encode())
            + "."
            + ALICE.split(".")[2]
        ),
        ("close", 4001),
    ),
    Attack("expired token", lambda c: c.first_frame(token(ttl=-10)), ("close", 4002)),
    Attack(
        "subscription token used to connect",
        lambda c: c.first_frame(token(channel="secret:room")),
        ("close", 4001),
    ),
    Attack(
        "token for another audience",
        lambda c: c.first_frame(token(audience="other-app")),
        ("close", 4001),
        lambda _: {"jwt_audience": "plexus"},
    ),
    Attack(
        'token with "aud": "" on a server without an audience',
        lambda c: c.first_frame(token(audience="")),
        ("close", 4001),
    ),
    Attack(
        'token with "aud": [] on a server without an audience',
        lambda c: c.first_frame(jwt.encode({"sub": "alice", "aud": []}, SECRET, algorithm="HS256")),
        ("close", 4001),
    ),
    Attack(
        "token on a server without keys",
        lambda c: c.first_frame(ALICE),
        ("close", 4001),
        lambda _: {"jwt_secret": None},
    ),
    Attack(
        "HS256 signed with the RSA public key",
        lambda c: c.first_frame(hs256_with_public_key()),
        ("close", 4001),
        public_key_settings,
    ),
    Attack(
        "auth with a forged token on a live connection",
        lambda c: command_as(
            c, None, {"type": "auth", "token": make_token(OTHER_SECRET, user="alice")}
        ),
        ("error", "unauthorized"),
    ),
    Attack(
        "auth switching to another user",
        lambda c: command_as(c, ALICE, {"type": "auth", "token": token("bob")}),
        ("error", "permission_denied"),
    ),
    # --- personal channels
    Attack(
        "subscribe to another user's #channel",
        lambda c: command_as(c, ALICE, subscribe("#bob")),
        ("error", "permission_denied"),
    ),
    Attack(
        "anonymous subscribe to a #channel",
        lambda c: command_as(c, None, subscribe("#alice")),
        ("error", "unauthorized"),
    ),
    Attack(
        "client publish to its own #channel",
        lambda c: command_as(c, ALICE, {"type": "publish", "channel": "#alice", "data": 1}),
        ("error", "permission_denied"),
    ),
    Attack(
        "own #channel is fine",
        lambda c: command_as(c, ALICE, subscribe("#alice")),
        ("reply",),
    ),
    # --- private channels
    Attack(
        "private channel without a subscription token",
        lambda c: command_as(c, ALICE, subscribe("secret:room")),
        ("error", "permission_denied"),
    ),
    Attack(
        "private channel with a token for another channel",
        lambda c: command_as(
            c, ALICE, subscribe("secret:room", token=token(channel="secret:other"))
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "private channel with a token for another user",
        lambda c: command_as(
            c, ALICE, subscribe("secret:room", token=token("bob", channel="secret:room"))
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "private channel with a forged subscription token",
        lambda c: command_as(
            c,
            ALICE,
            subscribe(
                "secret:room", token=make_token(OTHER_SECRET, user="alice", channel="secret:room")
            ),
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "private channel with an expired subscription token",
        lambda c: command_as(
            c, ALICE, subscribe("secret:room", token=token(channel="secret:room", ttl=-10))
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "private channel with a token bound to another connection",
        lambda c: command_as(
            c, ALICE, subscribe("secret:room", token=bound_subscription_token("secret:room", "c-x"))
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "private history without subscribing",
        lambda c: command_as(c, ALICE, {"type": "history", "channel": "secret:room"}),
        ("error", "permission_denied"),
    ),
    Attack(
        "private presence without subscribing",
        lambda c: command_as(c, ALICE, {"type": "presence", "channel": "vault:room"}),
        ("error", "permission_denied"),
    ),
    Attack(
        "private history without subscribing, where history is kept",
        lambda c: command_as(c, ALICE, {"type": "history", "channel": "vault:room"}),
        ("error", "permission_denied"),
    ),
    Attack(
        "private presence once subscribed",
        lambda c: command_as(
            c,
            ALICE,
            subscribe("vault:room", token=token(channel="vault:room")),
            {"type": "presence", "channel": "vault:room"},
        ),
        ("reply",),
    ),
    Attack(
        "private history once subscribed",
        lambda c: command_as(
            c,
            ALICE,
            subscribe("vault:room", token=token(channel="vault:room")),
            {"type": "history", "channel": "vault:room"},
        ),
        ("reply",),
    ),
    Attack(
        "private presence after unsubscribing",
        lambda c: command_as(
            c,
            ALICE,
            subscribe("vault:room", token=token(channel="vault:room")),
            {"type": "unsubscribe", "channel": "vault:room"},
            {"type": "presence", "channel": "vault:room"},
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "private channel with the right subscription token",
        lambda c: command_as(
            c, ALICE, subscribe("secret:room", token=token(channel="secret:room"))
        ),
        ("reply",),
    ),
    Attack(
        "anonymous private subscription with an anonymous token",
        lambda c: command_as(
            c, None, subscribe("secret:room", token=token("", channel="secret:room"))
        ),
        ("reply",),
    ),
    # --- publish permissions
    Attack(
        "anonymous publish into a private channel",
        lambda c: command_as(c, None, {"type": "publish", "channel": "secret:room", "data": 1}),
        ("error", "permission_denied"),
    ),
    Attack(
        "publish into a private channel without subscribing to it",
        lambda c: command_as(c, ALICE, {"type": "publish", "channel": "secret:room", "data": 1}),
        ("error", "permission_denied"),
    ),
    Attack(
        "publish into a private channel after unsubscribing",
        lambda c: command_as(
            c,
            ALICE,
            subscribe("secret:room", token=token(channel="secret:room")),
            {"type": "unsubscribe", "channel": "secret:room"},
            {"type": "publish", "channel": "secret:room", "data": 1},
        ),
        ("error", "permission_denied"),
    ),
    Attack(
        "publish into a private channel once subscribed with its token",
        lambda c: command_as(
            c,
            ALICE,
            subscribe("secret:room", token=token(channel="secret:room")),
            {"type": "publish", "channel": "secret:room", "data": 1},
        ),
        ("reply",),
    ),
    Attack(
        "publish into a private namespace that allows it without subscribing",
        lambda c: command_as(c, ALICE, {"type": "publish", "channel": "dropbox:in", "data": 1}),
        ("reply",),
    ),
    Attack(
        "publish where clients may not",
        lambda c: command_as(c, ALICE, {"type": "publish", "channel": "news", "data": 1}),
        ("error", "permission_denied"),
    ),
    # --- payloads that other clients could not be sent
    Attack(
        "publish nested 300 levels deep to the bystander's channel",
        lambda c: command_as(
            c, None, {"type": "publish", "channel": BYSTANDER_CHANNEL, "data": nested(300)}
        ),
        ("error", "bad_request"),
    ),
    Attack(
        "subscribe with info nested 252 levels deep",
        lambda c: command_as(c, None, subscribe(BYSTANDER_CHANNEL, info=nested(252))),
        ("error", "bad_request"),
    ),
    Attack(
        "publish a MessagePack map with a bytes key",
        msgpack_publish,
        ("error", 1, "bad_request"),
    ),
    Attack(
        "history since an offset beyond 64 bits",
        lambda c: command_as(c, None, {"type": "history", "channel": "chat:x", "since": HUGE}),
        ("error", "bad_request"),
    ),
    Attack(
        "invalid $bytes still answered with its id",
        lambda c: command_as(
            c, None, {"type": "publish", "channel": "chat:x", "data": {"$bytes": "%%"}}
        ),
        ("error", "bad_request"),
    ),
    # --- origin check
    Attack(
        "cross-origin upgrade",
        lambda c: c.first_frame(origin="https://evil.example"),
        ("http", 403),
    ),
    Attack(
        "look-alike origin",
        lambda c: c.first_frame(origin="http://localhost.evil.example"),
        ("http", 403),
    ),
    Attack(
        "origin outside allowed_origins",
        lambda c: c.first_frame(origin="https://evil.example"),
        ("http", 403),
        lambda _: {"allowed_origins": ["https://app.example"]},
    ),
    Attack(
        "localhost origin once allowed_origins is set",
        lambda c: c.first_frame(origin="http://localhost:3000"),
        ("http", 403),
        lambda _: {"allowed_origins": ["https://app.example"]},
    ),
    Attack(
        "origin whose IDNA label does not decode",
        lambda c: c.first_frame(origin="http://xn--zz"),
        ("http", 403),
    ),
    # --- the SSE transport: the same checks as the upgrade and the API
    Attack(
        "cross-origin event stream",
        lambda c: c.event_stream(origin="https://evil.example"),
        ("http", 403),
    ),
    Attack(
        "forged token on an event stream",
        lambda c: c.event_stream(make_token(OTHER_SECRET, user="alice")),
        ("close", 4001),
    ),
    Attack(
        "CSRF: a text/plain POST /emulation (no-cors fetch)",
        lambda c: c.post("/emulation", sse_commands(), {"Content-Type": "text/plain"}),
        ("http", 415, "bad_request"),
    ),
    Attack(
        "POST /emulation from a foreign Origin",
        lambda c: c.post(
            "/emulation",
            sse_commands(),
            {"Content-Type": "application/json", "Origin": "https://evil.example"},
        ),
        ("http", 403, "permission_denied"),
    ),
    Attack(
        "POST /emulation to a guessed session",
        lambda c: c.post("/emulation", sse_commands(), {"Content-Type": "application/json"}),
        ("http", 404, "not_found"),
    ),
    Attack(
        "DNS rebinding: own origin under a foreign Host",
        lambda c: c.first_frame(
            origin=f"http://rebind.attacker.example:{c.server.port}",
            host=f"rebind.attacker.example:{c.server.port}",
        ),
        ("http", 403),
    ),
    Attack(
        "own origin under a Host listed in allowed_hosts is fine",
        lambda c: c.first_frame(
            origin=f"http://chat.example.com:{c.server.port}",
            host=f"chat.example.com:{c.server.port}",
        ),
        ("welcome", None),
        lambda _: {"allowed_hosts": ["chat.example.com"]},
    ),
    Attack(
        "IPv4-mapped loopback origin is fine",
        lambda c: c.first_frame(origin="http://[::ffff:127.0.0.1]:3000"),
        ("welcome", None),
    ),
    Attack(
        "listed origin is fine",
        lambda c: c.first_frame(origin="https://app.example"),
        ("welcome", None),
        lambda _: {"allowed_origins": ["https://app.example"]},
    ),
    # --- the HTTP API
    Attack(
        "API call without a key",
        lambda c: c.api("/api/publish", {"channel": "chat:x", "data": 1}),
        ("http", 401, "unauthorized"),
    ),
    Attack(
        "API call with a wrong key",
        lambda c: c.api(
            "/api/publish", {"channel": "chat:x", "data": 1}, {"Authorization": "Bearer nope"}
        ),
        ("http", 401, "unauthorized"),
    ),
    Attack(
        "API call with a key prefix",
        lambda c: c.api(
            "/api/disconnect", {"user": "alice"}, {"Authorization": f"Bearer {API_KEY[:-1]}"}
        ),
        ("http", 401, "unauthorized"),
    ),
    Attack(
        "API call with the key in another scheme",
        lambda c: c.api(
            "/api/disconnect", {"user": "alice"}, {"Authorization": f"Basic {API_KEY}"}
        ),
        ("http", 401, "unauthorized"),
    ),
    Attack(
        "oversized API body",
        lambda c: c.api("/api/publish", {"channel": "chat:x", "data": "x" * 2000}, AUTH),
        ("http", 413, "too_large"),
        lambda _: {"max_body_size": 1024},
    ),
    Attack(
        "an API body in three TCP segments is read whole, not cut",
        trickled_publish,
        ("http", 200, 1),
    ),
    Attack(
        "oversized chunked API body",
        oversized_chunked_body,
        ("http", 413, "too_large"),
        lambda _: {"max_body_size": 1024},
    ),
    # --- CSRF and DNS rebinding against the keyless API (a browser on the server's machine)
    Attack(
        "CSRF: a text/plain publish (no-cors fetch) to the keyless API",
        lambda c: c.post("/api/publish", to_bystander(), {"Content-Type": "text/plain"}),
        ("http", 415, "bad_request"),
        keyless,
    ),
    Attack(
        "CSRF: a form-encoded publish to the keyless API",
        lambda c: c.post(
            "/api/publish",
            b"channel=chat:bystander&data=1",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        ("http", 415, "bad_request"),
        keyless,
    ),
    Attack(
        "CSRF: a publish without Content-Type to the keyless API",
        lambda c: c.post("/api/publish", to_bystander(), {}),
        ("http", 415, "bad_request"),
        keyless,
    ),
    Attack(
        "CSRF: a JSON publish from a foreign Origin to the keyless API",
        lambda c: c.post(
            "/api/publish",
            to_bystander(),
            {"Content-Type": "application/json", "Origin": "https://evil.example"},
        ),
        ("http", 403, "permission_denied"),
        keyless,
    ),
    Attack(
        "a foreign Origin is refused even with the API key",
        lambda c: c.post(
            "/api/publish",
            to_bystander(),
            {"Content-Type": "application/json", "Origin": "https://evil.example", **AUTH},
        ),
        ("http", 403, "permission_denied"),
    ),
    Attack(
        "DNS rebinding: a keyless history read under a foreign Host",
        lambda c: c.post(
            "/api/history",
            json.dumps({"channel": BYSTANDER_CHANNEL}).encode(),
            {
                "Content-Type": "application/json",
                "Host": f"rebind.attacker.example:{c.server.port}",
                "Origin": f"http://rebind.attacker.example:{c.server.port}",
            },
        ),
        ("http", 403, "permission_denied"),
        keyless,
    ),
    Attack(
        "DNS rebinding: a keyless publish under a foreign Host, without Origin",
        lambda c: c.post(
            "/api/publish",
            to_bystander(),
            {"Content-Type": "application/json", "Host": "rebind.attacker.example"},
        ),
        ("http", 403, "permission_denied"),
        keyless,
    ),
    Attack(
        "keyless API under a Host listed in allowed_hosts is fine",
        lambda c: c.post(
            "/api/history",
            json.dumps({"channel": "chat:x"}).encode(),
            {"Content-Type": "application/json; charset=utf-8", "Host": "plexus.internal"},
        ),
        ("http", 200, "ok"),
        lambda _: {"api_keys": [], "allowed_hosts": ["plexus.internal"]},
    ),
    Attack(
        "keyless API from the server's own loopback page is fine",
        lambda c: c.post(
            "/api/history",
            json.dumps({"channel": "chat:x"}).encode(),
            {"Content-Type": "application/json", "Origin": c.server.url},
        ),
        ("http", 200, "ok"),
        keyless,
    ),
    # --- floods and limits
    Attack(
        "publish flood",
        flood,
        ("close", 4029, 31),
        lambda _: {"publish_rate": 1.0, "publish_burst": 1, "rate_limit_disconnect": 30},
    ),
    Attack(
        "ping flood from a client that does not read",
        ping_flood,
        ("ping flood", True, True, True),
        lambda _: {"max_queue_bytes": 256 * 1024},
    ),
    Attack(
        "join/leave flood",
        join_leave_flood,
        ("close", 4029, 31),
        lambda _: {"subscribe_rate": 1.0, "subscribe_burst": 4, "rate_limit_disconnect": 30},
    ),
    Attack(
        "a message in endless empty fragments",
        endless_fragments,
        ("close", 1009),
    ),
    Attack(
        "more subscriptions than max_subscriptions",
        too_many_subscriptions,
        ("error", "permission_denied"),
        lambda _: {"max_subscriptions": 2},
    ),
    Attack(
        "more connections than max_connections_per_ip",
        connections_per_ip,
        ("http", 429),
        lambda _: {"max_connections_per_ip": 3},
    ),
    Attack(
        "idle sockets that never upgrade count against max_connections_per_ip",
        idle_sockets_per_ip,
        ("http", 429),
        lambda _: {"max_connections_per_ip": 3},
    ),
    Attack(
        "more connections than max_connections",
        connections_per_node,
        ("http", 503),
        lambda _: {"max_connections": 2},
    ),
]


# ----- the bystander


class Bystander:
    """A client subscribed to `chat:bystander`; checks it gets every API message, in order."""

    def __init__(self, server: Server, client: Client) -> None:
        self.server = server
        self.client = client
        self.sent = 0
        self.last_offset: int | None = None

    @classmethod
    async def join(cls, server: Server) -> Bystander:
        client = await Client(server.ws_url, timeout=TIMEOUT).connect()
        bystander = cls(server, client)
        sub = await client.subscribe(BYSTANDER_CHANNEL)
        bystander.last_offset = sub.result["offset"]
        return bystander

    async def free_slot(self) -> None:
        """Under `max_connections_per_ip`, wait until the server saw the sockets closed so far.

        Every socket counts, from accept to close, and a client's close reaches
        the server a moment after the client moved on.
        """
        limit = self.server.settings.max_connections_per_ip
        endpoint = self.server.endpoint
        if limit and endpoint is not None:
            await wait_for(lambda: endpoint.sockets_from("127.0.0.1") < limit)

    async def check(self, count: int = 3) -> None:
        """Publish `count` messages through the API; each arrives next, with the next offset."""
        sub = self.client.subscriptions[BYSTANDER_CHANNEL]
        for _ in range(count):
            await self.free_slot()
            self.sent += 1
            status, _ = await api_post(
                self.server.url,
                "/api/publish",
                {"channel": BYSTANDER_CHANNEL, "data": {"n": self.sent}},
                headers=AUTH,
            )
            assert status == 200
            message = await sub.get(TIMEOUT, kind="message")
            assert message["data"] == {"n": self.sent}
            assert message["offset"] == (self.last_offset or 0) + 1
            self.last_offset = message["offset"]
        assert self.client.close_code is None


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def start(make_server: ServerFactory, **overrides: Any) -> tuple[Server, Bystander]:
    server = await make_server(**{**base_settings(), **overrides})
    bystander = await Bystander.join(server)
    await bystander.check(1)
    assert server.endpoint is not None
    endpoint = server.endpoint
    await wait_for(lambda: endpoint.sockets_from("127.0.0.1") == 1)  # the bystander's alone
    return server, bystander


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_attack_is_refused_and_nothing_else_affected(
    attack: Attack, make_server: ServerFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server, bystander = await start(make_server, **attack.settings(tmp_path))
    try:
        assert await attack.run(Ctx(server, session)) == attack.expect
        await bystander.check()
    finally:
        await bystander.client.close()


# ----- tokens over a connection's lifetime


def expiring_token(user: str, seconds: float, **kwargs: Any) -> tuple[str, float]:
    """A token that expires in at most `seconds` (exp is whole seconds); and its exp."""
    tok = token(user, ttl=seconds, **kwargs)
    exp = float(jwt.decode(tok, options={"verify_signature": False})["exp"])
    assert exp > time.time() + 0.5, "too close to a second boundary; use a longer ttl"
    return tok, exp


async def test_refresh_keeps_subscriptions_past_expiry(make_server: ServerFactory) -> None:
    grace = 0.5
    server, bystander = await start(make_server, token_grace=grace)
    short, exp = expiring_token("alice", 2)
    async with Client(server.ws_url, token=short, timeout=TIMEOUT) as alice:
        mine = await alice.subscribe("#alice")
        assert await alice.request({"type": "auth", "token": token("alice")}) == {"user": "alice"}
        await asyncio.sleep(max(0.0, exp + grace + 0.5 - time.time()))
        # Past the old token's expiry and grace: still open, still subscribed.
        status, _ = await api_post(
            server.url, "/api/publish", {"channel": "#alice", "data": "ping"}, headers=AUTH
        )
        assert status == 200
        assert (await mine.get(TIMEOUT, kind="message"))["data"] == "ping"
        await bystander.check()
        assert alice.close_code is None
    await bystander.client.close()


async def test_refresh_rearms_expiry_for_the_new_token(make_server: ServerFactory) -> None:
    # The refreshed token is short-lived too: its own expiry (plus grace) must
    # close the connection, and the first token's expiry must not.
    grace = 0.5
    server, bystander = await start(make_server, token_grace=grace)
    first, first_exp = expiring_token("alice", 2)
    try:
        async with Client(server.ws_url, token=first, timeout=TIMEOUT) as alice:
            second, second_exp = expiring_token("alice", 4)
            # Whole-second `exp`: the second token outlives the first by 2 s or more.
            assert second_exp >= first_exp + 2
            assert await alice.request({"type": "auth", "token": second}) == {"user": "alice"}
            try:
                code = await alice.wait_closed(second_exp - time.time() + grace + TIMEOUT)
            except TimeoutError:
                pytest.fail("still open long after the refreshed token's expiry and grace")
            closed_at = time.time()
        assert code == 4002
        # Not at the first token's deadline (first_exp + grace, 2 s earlier) ...
        assert closed_at >= second_exp + grace - 0.05
        # ... but at the second one's.
        assert closed_at < second_exp + grace + 2.0
        await bystander.check()
    finally:
        await bystander.client.close()


async def test_unrefreshed_token_closes_4002_after_grace(make_server: ServerFactory) -> None:
    grace = 0.5
    server, bystander = await start(make_server, token_grace=grace)
    short, exp = expiring_token("alice", 2)
    async with Client(server.ws_url, token=short, timeout=TIMEOUT) as alice:
        mine = await alice.subscribe("#alice")
        await api_post(server.url, "/api/publish", {"channel": "#alice", "data": 1}, headers=AUTH)
        assert (await mine.get(TIMEOUT, kind="message"))["data"] == 1
        # A refresh with an expired token is refused and changes nothing.
        with pytest.raises(PlexusClientError, match="unauthorized"):
            await alice.request({"type": "auth", "token": token("alice", ttl=-5)})
        assert await alice.wait_closed(exp - time.time() + grace + TIMEOUT) == 4002
        closed_at = time.time()
    assert closed_at >= exp + grace - 0.05  # not before the grace period ended
    assert closed_at < exp + grace + 2.0
    await bystander.check()
    await bystander.client.close()


async def test_channels_claim_makes_server_side_subscriptions(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server, bystander = await start(make_server)
    claim = ["chat:news", "#alice", "secret:room", "#bob", "no spaces allowed"]
    ws = await session.ws_connect(server.ws_url, params={"token": token(channels=claim)})
    assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
    # Each grant is announced with a `subscribed` push (where its stream starts);
    # refused ones are reported like a `subscribe` without id, in claim order.
    answers = [await ws.receive_json(timeout=TIMEOUT) for _ in range(5)]
    assert [(e["type"], e.get("channel"), e.get("code")) for e in answers] == [
        ("subscribed", "chat:news", None),
        ("subscribed", "#alice", None),
        ("subscribed", "secret:room", None),
        ("error", None, "permission_denied"),
        ("error", None, "invalid_channel"),
    ]
    for granted in answers[:3]:
        assert granted.keys() == {"type", "channel", "offset", "epoch", "recovered"}
        assert (granted["offset"], granted["recovered"]) == (0, False)
        assert "id" not in granted
    for channel in ("chat:news", "#alice", "secret:room"):
        status, _ = await api_post(
            server.url, "/api/publish", {"channel": channel, "data": channel}, headers=AUTH
        )
        assert status == 200
        message = await ws.receive_json(timeout=TIMEOUT)
        assert (message["type"], message["channel"], message["data"]) == (
            "message",
            channel,
            channel,
        )
    # They are real subscriptions: a second subscribe is refused, unsubscribe works.
    assert await ask(ws, subscribe("secret:room")) == ("error", "already_subscribed")
    assert await ask(ws, {"type": "unsubscribe", "channel": "secret:room", "id": 2}) == ("reply",)
    assert await ask(ws, {**subscribe("secret:room"), "id": 3}) == ("error", "permission_denied")
    await ws.close()
    await bystander.check()
    await bystander.client.close()


async def test_api_disconnect_closes_every_connection_of_the_user(
    make_server: ServerFactory,
) -> None:
    server, bystander = await start(make_server)
    alices = [await Client(server.ws_url, token=ALICE, timeout=TIMEOUT).connect() for _ in "ab"]
    bob = await Client(server.ws_url, token=token("bob"), timeout=TIMEOUT).connect()
    try:
        for client in (*alices, bob):
            await client.subscribe("chat:room")
        status, body = await api_post(
            server.url, "/api/disconnect", {"user": "alice"}, headers=AUTH
        )
        assert (status, body) == (200, {"disconnected": 2})
        assert [await a.wait_closed(TIMEOUT) for a in alices] == [4001, 4001]
        await bob.publish("chat:room", "still here")
        assert (await bob.subscriptions["chat:room"].get(TIMEOUT, kind="message"))[
            "data"
        ] == "still here"
        status, body = await api_post(
            server.url, "/api/disconnect", {"user": "alice"}, headers=AUTH
        )
        assert (status, body) == (200, {"disconnected": 0})
        await bystander.check()
    finally:
        for client in (*alices, bob, bystander.client):
            await client.close()


async def test_connection_limits_free_their_slots(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server, bystander = await start(make_server, max_connections_per_ip=2, max_subscriptions=1)
    ctx = Ctx(server, session)
    ws = await ctx.connect()
    assert await ctx.first_frame() == ("http", 429)
    assert await ask(ws, subscribe("chat:one")) == ("reply",)
    assert await ask(ws, {**subscribe("chat:two"), "id": 2}) == ("error", "permission_denied")
    assert await ask(ws, {"type": "unsubscribe", "channel": "chat:one", "id": 3}) == ("reply",)
    assert await ask(ws, {**subscribe("chat:two"), "id": 4}) == ("reply",)
    await ws.close()
    # The slot is freed once the server has seen the close.
    for _ in range(100):
        outcome = await ctx.first_frame()
        if outcome[0] == "welcome":
            break
        await asyncio.sleep(0.02)  # sleep-ok: retry until the freed slot is seen, bounded
    assert outcome == ("welcome", None)
    await bystander.check()
    await bystander.client.close()


async def test_unread_bodies_of_a_client_that_hung_up_leave_nothing(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests answered before their body was read (413 for the declared size,
    401 without a key), then the client hangs up: aiohttp would go on reading
    the body that never comes for its lingering time, with a task and buffers
    per request that no per-address limit counts. They end with the socket."""
    # Far beyond every wait below: only the socket's end can free them in time.
    monkeypatch.setattr(plexus.app, "LINGERING_TIME", 100 * TIMEOUT)
    server, bystander = await start(make_server, max_body_size=1024)
    assert server.endpoint is not None
    endpoint = server.endpoint
    tasks = server.state()["tasks"]
    answers = []
    for n in range(20):
        headers = {"Content-Length": "5000", **(AUTH if n % 2 else {})}
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            post_request("/api/publish", b"", headers).replace(b"Content-Length: 0\r\n", b"")
        )
        writer.write(b'{"channel": "chat:x", "data": "')  # and never the rest
        status, _, body = await read_response(reader)
        answers.append((status, json.loads(body)["error"]["code"]))
        writer.close()
    assert answers == [(401, "unauthorized"), (413, "too_large")] * 10
    await wait_for(lambda: endpoint.sockets_from("127.0.0.1") == 1)  # the bystander's
    # At most as many as before (a handler of the bystander's last API call
    # may still have been ending then); each lingering one would be one more.
    await wait_for(lambda: server.state()["tasks"] <= tasks)
    await bystander.check()
    await bystander.client.close()


async def test_a_lone_bytes_map_is_bytes_for_every_client(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """A MessagePack client's `{"$bytes": base64}` is bytes, as JSON clients would read it.

    A map with other keys beside `$bytes` stays an ordinary object for both.
    """
    server, bystander = await start(make_server)
    js = await session.ws_connect(server.ws_url)
    mp = await session.ws_connect(server.ws_url, protocols=[MSGPACK_SUBPROTOCOL])

    async def mp_next(kind: str | None = None) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = msgpack.unpackb(await mp.receive_bytes(timeout=TIMEOUT))
            if kind is None or message["type"] == kind:
                return message

    async def js_next(kind: str) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = await js.receive_json(timeout=TIMEOUT)
            if message["type"] == kind:
                return message

    assert (await js.receive_json(timeout=TIMEOUT))["type"] == "welcome"
    assert (await mp_next())["type"] == "welcome"
    await js.send_json(subscribe("chat:bytes", id=1))
    assert (await js.receive_json(timeout=TIMEOUT))["type"] == "reply"
    await mp.send_bytes(msgpack.packb(subscribe("chat:bytes", id=1)))
    assert (await mp_next())["type"] == "reply"
    for data, as_msgpack, as_json in [
        ({"$bytes": "aGk="}, b"hi", {"$bytes": "aGk="}),
        ({"$bytes": "aGk=", "x": 1}, {"$bytes": "aGk=", "x": 1}, {"$bytes": "aGk=", "x": 1}),
    ]:
        command = {"type": "publish", "channel": "chat:bytes", "data": data}
        await mp.send_bytes(msgpack.packb(command))
        assert (await mp_next("message"))["data"] == as_msgpack
        assert (await js_next("message"))["data"] == as_json
    # A malformed one is refused with its id, as from a JSON client.
    bad = {"type": "publish", "id": 9, "channel": "chat:bytes", "data": {"$bytes": 5}}
    await mp.send_bytes(msgpack.packb(bad))
    answer = await mp_next("error")
    assert (answer["id"], answer["code"]) == (9, "bad_request")
    await js.close()
    await mp.close()
    await bystander.check()
    await bystander.client.close()
