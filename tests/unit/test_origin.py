"""The Origin and Host checks: parsing that never raises, and who is allowed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.config import Settings
from plexus.exceptions import ConfigError
from plexus.transports.origin import (
    Authority,
    host_allowed,
    is_loopback_address,
    is_loopback_host,
    origin_allowed,
    parse_authority,
    parse_origin,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", Authority("localhost", None)),
        ("LocalHost:8000", Authority("localhost", 8000)),
        ("localhost.:80", Authority("localhost", 80)),
        ("[::1]:9", Authority("::1", 9)),
        ("xn--zz", Authority("xn--zz", None)),  # compared as sent, never decoded
        ("[::1", None),
        ("[not-ip]:1", None),
        ("a:99999", None),
        ("a:", None),
        ("a:b", None),
        ("a b", None),
        ("", None),
        (".", None),
        ("é.example", None),
        ("a@b", None),
    ],
)
def test_parse_authority(value: str, expected: Authority | None) -> None:
    assert parse_authority(value) == expected


@given(st.text())
def test_parsing_never_raises(value: str) -> None:
    parse_authority(value)
    parse_origin(value)
    host_allowed(value, ["example.com"])
    origin_allowed(value, "http", value, [], [])


def test_parse_origin_implies_default_ports() -> None:
    assert parse_origin("http://a.example") == parse_origin("HTTP://a.example:80/")
    assert parse_origin("https://a.example") == parse_origin("https://a.example:443")
    assert parse_origin("https://a.example") != parse_origin("http://a.example")
    for bad in ("null", "file:///x", "ws://a", "http://", "http//a", "http://xn--zz:1x"):
        assert parse_origin(bad) is None


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack socket's IPv4 loopback peer
        ("::ffff:10.0.0.1", False),
        ("10.0.0.1", False),
        ("", False),
        (None, False),
        ("localhost", False),  # an address, not a name
    ],
)
def test_is_loopback_address(address: str | None, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback


def test_loopback_hosts() -> None:
    assert all(map(is_loopback_host, ["localhost", "127.0.0.1", "127.9.9.9", "::1"]))
    assert not any(map(is_loopback_host, ["localhost.evil.example", "evil.localhost", "10.0.0.1"]))


def test_host_allowed() -> None:
    assert host_allowed(None, [])  # not a browser
    assert host_allowed("localhost:8000", [])
    assert host_allowed("[::1]:8000", [])
    assert not host_allowed("rebind.attacker.example:8000", [])
    assert host_allowed("Chat.Example.com:443", ["chat.example.com"])
    assert not host_allowed("evil.chat.example.com", ["chat.example.com"])
    assert host_allowed("anything.example", ["*"])
    assert not host_allowed("xn--zz:x", ["*"])  # malformed stays refused


def test_own_origin_needs_a_trusted_host() -> None:
    def allowed(origin: str, host: str | None, hosts: list[str] | None = None) -> bool:
        return origin_allowed(origin, "http", host, [], hosts or [])

    assert allowed("http://localhost:3000", "rebind.example:1")  # loopback origin, any Host
    assert not allowed("http://rebind.example:1", "rebind.example:1")
    assert allowed("http://chat.example:8000", "chat.example:8000", ["chat.example"])
    assert not allowed("http://chat.example:8001", "chat.example:8000", ["chat.example"])
    assert not allowed("https://chat.example:8000", "chat.example:8000", ["chat.example"])
    assert allowed("http://chat.example", "chat.example:80", ["chat.example"])
    assert not allowed("http://chat.example", None, ["chat.example"])


def test_allowed_origins_replace_the_defaults() -> None:
    listed = ["https://app.example"]
    assert origin_allowed("https://app.example:443", "http", "x", listed, [])
    assert not origin_allowed("http://localhost:3000", "http", "localhost", listed, [])
    assert origin_allowed("https://evil.example", "http", "x", ["*"], [])
    assert origin_allowed(None, "http", "x", listed, [])


@pytest.mark.parametrize(
    ("field", "value"),
    [("allowed_origins", ["app.example"]), ("allowed_hosts", ["http://app.example"])],
)
def test_malformed_entries_are_refused_at_start(field: str, value: list[str]) -> None:
    with pytest.raises(ConfigError, match=field):
        Settings(**{field: value}).validate()
