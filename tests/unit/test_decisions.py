"""The application's calls without I/O: answers, requests, handshakes, settings, hooks."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest

from plexus.config import Settings, load_settings
from plexus.decisions import Decider
from plexus.decisions.calls import (
    BadAnswer,
    ConnectRequest,
    PublishRequest,
    Refused,
    SubscribeRequest,
    accepted,
    credentials_from,
)
from plexus.decisions.hooks import is_async, load_hooks
from plexus.exceptions import ConfigError
from plexus.protocol.codes import ErrorCode


@pytest.mark.parametrize(
    ("call", "answer", "result"),
    [
        ("connect", {"result": {}}, {}),
        ("connect", {"result": {"user": "a", "expire_at": 5, "channels": ["#a"]}}, None),
        ("refresh", {"result": {"expire_at": 10.5}}, None),
        ("refresh", {"result": {"expired": True}}, None),
        ("subscribe", {"result": {"info": [1]}}, None),
        ("publish", {"result": {"data": None}}, None),
        ("rpc", {"result": {}, "extra": 1}, {}),
    ],
)
def test_accepted_answers(call: str, answer: Any, result: Any) -> None:
    assert accepted(call, answer) == (answer["result"] if result is None else result)


@pytest.mark.parametrize(
    ("call", "answer", "why"),
    [
        ("connect", None, "not an object"),
        ("connect", [], "not an object"),
        ("connect", {}, "neither"),
        ("connect", {"result": []}, "neither"),
        ("connect", {"result": {"user": 5}}, '"user"'),
        ("connect", {"result": {"expire_at": "soon"}}, '"expire_at"'),
        ("connect", {"result": {"expire_at": True}}, '"expire_at"'),
        ("connect", {"result": {"expire_at": float("inf")}}, '"expire_at"'),
        ("connect", {"result": {"channels": "#a"}}, '"channels"'),
        ("connect", {"result": {"channels": [1]}}, '"channels"'),
        ("refresh", {"result": {}}, "neither"),
        ("refresh", {"result": {"expired": "yes"}}, '"expired"'),
        ("subscribe", {"error": "no"}, '"error"'),
        ("subscribe", {"error": {"code": "forbidden", "message": "x"}}, "forbidden"),
        ("subscribe", {"error": {"code": "token_expired", "message": "x"}}, "token_expired"),
        ("subscribe", {"error": {"code": "permission_denied", "message": 5}}, "message"),
    ],
)
def test_answers_the_contract_does_not_allow(call: str, answer: Any, why: str) -> None:
    with pytest.raises(BadAnswer, match=why):
        accepted(call, answer)


def test_refusals_keep_the_applications_code_and_message() -> None:
    with pytest.raises(Refused) as caught:
        accepted("subscribe", {"error": {"code": "permission_denied", "message": "members only"}})
    assert (caught.value.code, caught.value.message) == (
        ErrorCode.PERMISSION_DENIED,
        "members only",
    )
    with pytest.raises(Refused) as caught:
        accepted("connect", {"error": {"code": "token_expired", "message": "log in again"}})
    assert (caught.value.reason, caught.value.code) == ("token_expired", ErrorCode.UNAUTHORIZED)
    with pytest.raises(Refused) as caught:
        accepted("rpc", {"error": {"code": "not_found"}})
    assert caught.value.message == "refused by the application"


def test_credentials_from_a_connect_answer() -> None:
    made = credentials_from({"user": "", "info": {"a": 1}, "expire_at": 7, "channels": ["x"]})
    assert (made.user, made.info, made.expires_at, made.channels, made.session) == (
        None,
        {"a": 1},
        7.0,
        ("x",),
        True,
    )


def test_request_bodies() -> None:
    base = {"client": "c-1", "protocol": "msgpack", "headers": {"Cookie": "s=1"}}
    assert ConnectRequest(**base).body() == {
        "client": "c-1",
        "transport": "websocket",
        "protocol": "msgpack",
    }
    subscribe = SubscribeRequest(**base, user="bob", channel="room:1", since={"offset": 3})
    assert subscribe.body() == {
        "client": "c-1",
        "transport": "websocket",
        "protocol": "msgpack",
        "user": "bob",
        "channel": "room:1",
        "info": None,
        "since": {"offset": 3},
    }
    assert PublishRequest(**base, channel="a", data=b"\x00").body()["data"] == b"\x00"
    assert subscribe.headers == {"Cookie": "s=1"}, "hooks read the forwarded headers"


def test_the_handshake_keeps_the_forwarded_headers_only() -> None:
    settings = Settings(proxy_connect_url="http://127.0.0.1:1/connect")
    decider = Decider(settings)
    handshake = decider.handshake(
        [
            ("Host", "x"),
            ("cookie", "a=1"),
            ("Cookie", "b=2"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2"),
            ("Sec-WebSocket-Key", "k"),
        ],
        "hello",
    )
    assert handshake is not None
    assert dict(handshake.headers) == {
        "cookie": "a=1; b=2",
        "X-Forwarded-For": "10.0.0.1, 10.0.0.2",
    }
    assert handshake.data == "hello"
    assert Decider(Settings()).handshake([("Cookie", "a=1")], None) is None, "nothing asks"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PLEXUS_PROXY_TIMEOUT": "0"}, "proxy_timeout: must be > 0"),
        ({"PLEXUS_PROXY_TIMEOUT": "soon"}, "PLEXUS_PROXY_TIMEOUT: expected a number"),
        ({"PLEXUS_PROXY_CONNECT_URL": "ftp://x/connect"}, "proxy_connect_url: 'ftp://x/connect'"),
        ({"PLEXUS_PROXY_RPC_URL": "localhost:8000/rpc"}, "proxy_rpc_url"),
        ({"PLEXUS_HOOKS": "my-app.hooks"}, "hooks: 'my-app.hooks' is not a module name"),
    ],
)
def test_bad_settings_are_one_clear_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_proxy_headers_are_checked() -> None:
    for headers, message in (
        (["Cookie", "bad header"], "proxy_headers: 'bad header' is not an HTTP header name"),
        (["Host"], "proxy_headers: Host belongs to the upgrade itself"),
    ):
        with pytest.raises(ConfigError, match=message):
            Decider(load_settings(None, {"PLEXUS_PROXY_HEADERS": ",".join(headers)}))
    settings = load_settings(None, {"PLEXUS_PROXY_HEADERS": "Cookie, X-Tenant"})
    assert settings.proxy_headers == ["Cookie", "X-Tenant"]


def test_namespace_switches_need_someone_to_ask(tmp_path: Path) -> None:
    config = tmp_path / "plexus.toml"
    config.write_text(
        '[namespaces.room]\nproxy_subscribe = true\n[personal]\nproxy_publish = "x"\n'
    )
    with pytest.raises(ConfigError, match=re.escape("personal.proxy_publish: expected a boolean")):
        load_settings(config, {})
    config.write_text("[namespaces.room]\nproxy_subscribe = true\n")
    settings = load_settings(config, {})
    with pytest.raises(
        ConfigError, match=re.escape("namespaces.room.proxy_subscribe: set proxy_subscribe_url")
    ):
        Decider(settings)
    settings.proxy_subscribe_url = "http://127.0.0.1:1/subscribe"
    Decider(settings)


def test_the_personal_table_is_over_its_defaults(tmp_path: Path) -> None:
    config = tmp_path / "plexus.toml"
    config.write_text("[personal]\nhistory_size = 500\n")
    personal = load_settings(config, {}).personal
    assert (personal.history_size, personal.recovery, personal.history_ttl) == (500, True, 86400)
    config.write_text("[personal]\nhistory_size = 0\n")
    with pytest.raises(ConfigError, match=re.escape("personal.recovery: needs history_size > 0")):
        load_settings(config, {})
    config.write_text("[personal]\nteleport = true\n")
    with pytest.raises(ConfigError, match=re.escape("personal.teleport: unknown option")):
        load_settings(config, {})


def test_hooks_are_loaded_by_name_or_object() -> None:
    found = load_hooks("tests.e2e.decision_app")
    assert set(found) == {"connect", "refresh", "subscribe", "publish", "rpc"}
    assert is_async(found["connect"])
    assert not is_async(found["rpc"])

    class Hooks:
        async def on_rpc(self, request: Any) -> Any:
            return {"result": {}}

    assert set(load_hooks(Hooks())) == {"rpc"}
    for source, message in (
        ("tests.no_such_module", "hooks: cannot import 'tests.no_such_module': ModuleNotFound"),
        ("json", "hooks: json defines none of on_connect"),
        (types.SimpleNamespace(on_connect=5), "hooks: on_connect of SimpleNamespace is not a"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_hooks(source)
