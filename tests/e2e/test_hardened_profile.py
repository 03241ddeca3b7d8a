"""End-to-end: the hardened configuration of docs/security.md loads, and a server
started with it holds the bounds it promises.

The file is taken from the document itself (its first `toml` block), so the
example cannot drift from what is tested. Only what exists on a real
deployment alone is left out: the TLS files and the key set (a test secret
signs the tokens instead), and the server binds loopback on a free port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from plexus.auth import make_token
from plexus.config import load_settings
from tests.helpers import ROOT, TIMEOUT, ServerProcess, api_post

SECRET = "hardened-profile-test-secret-0123456789"
API_KEY = "hardened-profile-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
AUDIENCE, ISSUER = "plexus", "https://auth.example.com"


def hardened_config(tmp_path: Path) -> Path:
    """The example of docs/security.md, without the files only the real server has."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    for name in ("certfile", "keyfile", "jwt_jwks_file"):
        example = "\n".join(line for line in example.splitlines() if not line.startswith(name))
    config = tmp_path / "plexus.toml"
    config.write_text(example, encoding="utf-8")
    return config


def test_hardened_example_config_is_valid(tmp_path: Path) -> None:
    """The example loads, and is as strict as it says."""
    settings = load_settings(hardened_config(tmp_path), env={})
    assert settings.allowed_origins == ["https://app.example.com"]
    assert settings.allowed_hosts == ["realtime.example.com"]
    assert settings.jwt_audience == AUDIENCE
    assert settings.jwt_issuer == ISSUER
    assert all(not settings.namespace(n).anonymous for n in ("", "chat", "orders", "other"))
    assert settings.namespace("orders").private
    assert not settings.echo_endpoint
    assert (settings.subscribe_rate, settings.subscribe_burst) == (5, 100)
    assert (settings.http_request_timeout, settings.http_keepalive_timeout) == (10, 30)
    assert settings.channel_grace == 120
    # Every namespace bounds its channels, and every one with history its bytes and age.
    for name in ("", "chat", "orders", "other"):
        options = settings.namespace(name)
        assert options.max_channels > 0, name
        if options.history_size:
            assert options.history_max_bytes > 0, name
            assert options.history_ttl > 0, name
    chat = settings.namespace("chat")
    assert (chat.max_channels, chat.history_max_bytes) == (1000, 256 * 1024)


def token(user: str = "alice", **claims: Any) -> str:
    return make_token(SECRET, user=user, audience=AUDIENCE, issuer=ISSUER, **claims)


async def first_frame(
    session: aiohttp.ClientSession, url: str, *, tok: str | None = None, origin: str | None = None
) -> tuple[Any, aiohttp.ClientWebSocketResponse | None]:
    """("welcome", ws), ("close", code) or ("http", status) for a new connection."""
    params = {"token": tok} if tok is not None else None
    try:
        ws = await session.ws_connect(url, params=params, origin=origin)
    except aiohttp.WSServerHandshakeError as exc:
        return ("http", exc.status), None
    first = await ws.receive(timeout=TIMEOUT)
    if first.type is aiohttp.WSMsgType.CLOSE:
        return ("close", first.data), None
    assert first.json()["type"] == "welcome"
    return ("welcome",), ws


async def ask(ws: aiohttp.ClientWebSocketResponse, command: dict[str, Any]) -> dict[str, Any]:
    """Send `command`; its answer (pushes before it are skipped)."""
    await ws.send_json(command)
    while True:
        answer: dict[str, Any] = await ws.receive_json(timeout=TIMEOUT)
        if answer.get("id") == command["id"]:
            return answer


async def test_hardened_profile_holds_its_bounds(tmp_path: Path) -> None:
    env = {
        "PLEXUS_JWT_SECRET": SECRET,
        "PLEXUS_API_KEYS": API_KEY,
        "PLEXUS_DATA_DIR": str(tmp_path / "data"),
    }
    args = ["--config", str(hardened_config(tmp_path)), "--host", "127.0.0.1"]
    with ServerProcess(args, env=env) as server:
        async with aiohttp.ClientSession() as session:
            await check_bounds(server, session)
        log = server.output()
    assert "Traceback" not in log


async def check_bounds(server: ServerProcess, session: aiohttp.ClientSession) -> None:
    url = server.ws_url
    # Anonymous clients may connect, but neither subscribe nor publish anywhere.
    outcome, anonymous = await first_frame(session, url)
    assert outcome == ("welcome",)
    assert anonymous is not None
    for number, command in enumerate(
        [
            {"type": "subscribe", "channel": "chat:room"},
            {"type": "publish", "channel": "chat:room", "data": "hi"},
            {"type": "subscribe", "channel": "news"},
        ]
    ):
        answer = await ask(anonymous, {**command, "id": number})
        assert (answer["type"], answer["code"]) == ("error", "unauthorized"), command
    await anonymous.close()
    # Tokens must carry the audience and the issuer; browsers must come from the app.
    wrong = make_token(SECRET, user="alice", audience=AUDIENCE)
    assert (await first_frame(session, url, tok=wrong))[0] == ("close", 4001)
    assert (await first_frame(session, url, tok=token(), origin="https://evil.example"))[0] == (
        "http",
        403,
    )
    outcome, alice = await first_frame(session, url, tok=token(), origin="https://app.example.com")
    assert outcome == ("welcome",)
    assert alice is not None
    reply = await ask(alice, {"type": "subscribe", "id": "s", "channel": "chat:room"})
    assert reply["type"] == "reply", reply

    # A room keeps at most history_max_bytes (256 KiB) of payload: two of three 100 KB messages.
    for n in range(3):
        status, _ = await api_post(
            server.url,
            "/api/publish",
            {"channel": "chat:big", "data": f"{n}" * 100_000},
            headers=AUTH,
        )
        assert status == 200
    status, history = await api_post(
        server.url, "/api/history", {"channel": "chat:big"}, headers=AUTH
    )
    assert status == 200
    assert [m["offset"] for m in history["messages"]] == [2, 3]
    assert history["complete"] is False

    # At most 1000 rooms at once: chat:room and chat:big, and 998 more.
    rooms = [f"chat:r{n}" for n in range(998)]
    status, body = await api_post(
        server.url, "/api/broadcast", {"channels": rooms, "data": "open"}, headers=AUTH
    )
    assert status == 200, body
    status, body = await api_post(
        server.url, "/api/publish", {"channel": "chat:room-1001", "data": "no"}, headers=AUTH
    )
    assert (status, body["error"]["code"]) == (503, "unavailable")
    refused = await ask(alice, {"type": "subscribe", "id": "t", "channel": "chat:another"})
    assert refused.get("code") == "unavailable"
    # The rooms that exist work on.
    status, _ = await api_post(
        server.url, "/api/publish", {"channel": "chat:room", "data": "still here"}, headers=AUTH
    )
    assert status == 200
    while (push := await alice.receive_json(timeout=TIMEOUT))["type"] != "message":
        pass
    assert (push["channel"], push["data"]) == ("chat:room", "still here")
    await alice.close()
