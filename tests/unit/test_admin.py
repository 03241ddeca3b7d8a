"""The admin page's pure parts: sessions, CSRF, login limits, samples, rates, merging, tails."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jwt
import orjson
import pytest

from plexus.admin.session import (
    ADDRESS_BURST,
    GLOBAL_BURST,
    LOGIN_REFUSED,
    SESSION_AUDIENCE,
    LoginLimiter,
    Sessions,
    make_admin_token,
)
from plexus.admin.stats import RECENT_SAMPLES, SAMPLES_KEPT, ChannelRates, Sampler, merge
from plexus.admin.tail import TAIL_BYTES, TAIL_EVENTS, Tail
from plexus.config import Settings
from plexus.exceptions import ConfigError
from plexus.hub import Hub, Subscription
from plexus.metrics import LatencyHistogram
from plexus.models import Publication, StreamPosition
from plexus.protocol.codec import OP_TEXT, build_frame

PASSWORD = "correct horse battery"
SECRET = "s" * 32
NOW = 1_800_000_000.0


def sessions(**settings: object) -> Sessions:
    values: dict[str, object] = {"admin_password": PASSWORD, **settings}
    config = Settings(**values)  # type: ignore[arg-type]
    config.validate()
    return Sessions(config)


# ----- settings


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (
            {"admin_password": "short-11ch"},
            "admin_password: must be at least 12 characters, got 10",
        ),
        ({"admin_secret": "x" * 31}, "admin_secret: must be at least 32 bytes, got 31"),
        ({"admin_password": PASSWORD, "admin_session_ttl": 0.0}, "admin_session_ttl: must be > 0"),
    ],
)
def test_admin_settings_are_checked(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(**settings).validate()  # type: ignore[arg-type]
    assert needle in str(caught.value)
    assert "short-11ch" not in str(caught.value)  # the password itself is never printed


def test_admin_is_off_unless_a_password_or_a_secret_is_set() -> None:
    assert not Settings().admin_enabled
    assert Settings(admin_password=PASSWORD).admin_enabled
    assert Settings(admin_secret=SECRET).admin_enabled


# ----- logins and sessions


def test_the_password_logs_in_and_anything_else_does_not() -> None:
    admin = sessions()
    assert admin.check_login(PASSWORD, NOW) == ("admin", "password")
    for wrong in ("", PASSWORD[:-1], PASSWORD + " ", PASSWORD.upper(), "x" * 10_000):
        assert admin.check_login(wrong, NOW) is None
    assert LOGIN_REFUSED == "wrong password or token"


def test_admin_tokens_log_in_only_with_the_secret_and_before_expiry() -> None:
    admin = sessions(admin_password=None, admin_secret=SECRET)
    token = make_admin_token(SECRET, "alice", 600, now=NOW)
    assert admin.check_login(token, NOW + 1) == ("alice", "token")
    assert admin.check_login(token, NOW + 601) is None  # expired
    assert admin.check_login(make_admin_token("t" * 32, "alice", 600, now=NOW), NOW) is None
    # A session cookie is not a login token, nor the other way round.
    cookie, _ = admin.issue("alice", "token", NOW)
    assert admin.check_login(cookie, NOW) is None
    assert admin.verify(token, NOW) is None
    # Without the secret, tokens are not accepted at all.
    assert sessions().check_login(token, NOW) is None
    with pytest.raises(ValueError, match="32 bytes"):
        make_admin_token("short", "alice", 600)


def test_a_session_verifies_until_it_expires_and_not_when_forged() -> None:
    admin = sessions(admin_session_ttl=3600.0)
    cookie, session = admin.issue("admin", "password", NOW)
    found = admin.verify(cookie, NOW + 3599)
    assert found == session
    assert found.who().startswith("admin (password login, session ")
    assert admin.verify(cookie, NOW + 3600) is None
    assert admin.verify(None, NOW) is None
    assert admin.verify("", NOW) is None
    assert admin.verify("not a token", NOW) is None
    # Another process's key (no admin_secret: a random key per process).
    assert sessions().verify(cookie, NOW) is None
    # Claims changed without the key, or the algorithm swapped for none.
    forged = jwt.encode(
        {"sub": "admin", "aud": SESSION_AUDIENCE, "sid": "x", "via": "password", "exp": NOW + 60},
        "k" * 32,
        algorithm="HS256",
    )
    assert admin.verify(forged, NOW) is None
    head, body, _ = cookie.split(".")
    assert admin.verify(f"{head}.{body}.", NOW) is None


def test_sessions_signed_with_the_secret_hold_across_processes() -> None:
    cookie, session = sessions(admin_secret=SECRET).issue("admin", "password", NOW)
    other = sessions(admin_secret=SECRET)  # another node, or after a restart
    assert other.verify(cookie, NOW) == session
    assert other.check_csrf(session, sessions(admin_secret=SECRET).csrf_token(session))


def test_csrf_token_belongs_to_its_session() -> None:
    admin = sessions()
    _, one = admin.issue("admin", "password", NOW)
    _, two = admin.issue("admin", "password", NOW)
    token = admin.csrf_token(one)
    assert admin.check_csrf(one, token)
    assert not admin.check_csrf(two, token)
    assert not admin.check_csrf(one, None)
    assert not admin.check_csrf(one, "")
    assert not admin.check_csrf(one, token[:-1])


def test_login_attempts_are_limited_per_address_and_globally() -> None:
    limiter = LoginLimiter(NOW)
    assert all(limiter.allow("10.0.0.1", NOW) for _ in range(ADDRESS_BURST))
    assert not limiter.allow("10.0.0.1", NOW)
    assert limiter.allow("10.0.0.2", NOW)  # another address has its own budget
    assert limiter.allow("10.0.0.1", NOW + 12.5)  # one attempt per 12 s comes back
    assert not limiter.allow("10.0.0.1", NOW + 12.5)
    # Many addresses: the process-wide bucket stops them.
    spread = LoginLimiter(NOW)
    allowed = sum(spread.allow(f"10.1.0.{i}", NOW) for i in range(GLOBAL_BURST + 20))
    assert allowed == GLOBAL_BURST


# ----- samples


def test_sampler_turns_counters_into_rates_and_latency_counts() -> None:
    histogram = LatencyHistogram("t", "t", bounds=(0.001, 0.01))
    sampler = Sampler(histogram, NOW)
    take: Callable[..., object] = sampler.take
    common = {"connections": 5, "subscriptions": 7, "slow_consumers": 0}
    assert take(NOW + 1, published=10, deliveries=100, **common) is None  # the baseline
    histogram.observe(0.0005)
    histogram.observe(0.005)
    sample = sampler.take(
        NOW + 3, connections=6, subscriptions=8, published=30, deliveries=500, slow_consumers=2
    )
    assert sample is not None
    assert (sample.t, sample.connections, sample.subscriptions) == (int(NOW) + 3, 6, 8)
    assert (sample.published, sample.deliveries) == (10.0, 200.0)  # over 2 s
    assert (sample.slow_consumers, sample.latency) == (2, (1, 1, 0))
    # A tick in the same second again is skipped.
    assert take(NOW + 3.5, published=30, deliveries=500, **common) is None
    assert sampler.rows(full=True) == [sample.row()]


def test_sampler_keeps_ten_minutes_and_sends_the_last_few() -> None:
    sampler = Sampler(LatencyHistogram("t", "t"), NOW)
    for second in range(SAMPLES_KEPT + 11):
        sampler.take(
            NOW + second,
            connections=second,
            subscriptions=0,
            published=0,
            deliveries=0,
            slow_consumers=0,
        )
    assert len(sampler.rows(full=True)) == SAMPLES_KEPT
    recent = sampler.rows(full=False)
    assert [row[1] for row in recent] == list(range(SAMPLES_KEPT + 11))[-RECENT_SAMPLES:]


def test_sampler_starts_over_when_the_clock_is_set_back() -> None:
    sampler = Sampler(LatencyHistogram("t", "t"), NOW)
    counts = {"subscriptions": 0, "published": 0, "deliveries": 0, "slow_consumers": 0}
    for second in range(3):
        sampler.take(NOW + second, connections=second, **counts)
    assert len(sampler.rows(full=True)) == 2
    assert sampler.take(NOW - 3600, connections=9, **counts) is None  # a new baseline
    found = sampler.take(NOW - 3599, connections=9, **counts)
    assert found is not None
    assert sampler.rows(full=True) == [found.row()]


class Conn:
    """A hub subscriber that keeps the frames it is given."""

    def __init__(self, client_id: str) -> None:
        self._id = client_id
        self.frames: list[bytes] = []

    @property
    def client_id(self) -> str:
        return self._id

    @property
    def user(self) -> str | None:
        return None

    @property
    def format_index(self) -> int:
        return 0  # JSON in WebSocket frames

    @property
    def push_frame(self) -> Callable[[bytes], object]:
        return self.frames.append

    @property
    def outbox(self) -> Any:
        return SimpleNamespace(send=self.frames.append)


def subscribed_hub(counts: dict[str, int]) -> Hub:
    """A hub with `counts[name]` subscribers per channel, in sync at offset 0."""
    hub = Hub()
    for name, subscribers in counts.items():
        for index in range(subscribers):
            sub = Subscription(Conn(f"{name}-{index}"), name)
            sub.backlog = None
            hub.add(sub)
        hub.sync(name, StreamPosition(0, "e"))
    return hub


def publish(hub: Hub, channel: str, times: int) -> None:
    for _ in range(times):
        found = hub.channel(channel)
        assert found is not None
        hub.dispatch(Publication(channel, {}, found.last + 1, "e", 0, raw=b"{}"))


def test_hub_counts_messages_per_channel_not_deliveries() -> None:
    hub = subscribed_hub({"a": 3, "b": 1})
    publish(hub, "a", 4)
    found = hub.channel("a")
    assert found is not None
    assert found.messages == 4  # not 12: one per message, whoever gets it
    # A duplicate (a repair already delivered it) is not counted again.
    hub.dispatch(Publication("a", {}, 2, "e", 0, raw=b"{}"))
    assert found.messages == 4


def test_channel_rates_between_looks_a_second_apart() -> None:
    hub = subscribed_hub({"hot": 2, "warm": 5, "cold": 1})
    rates = ChannelRates()
    first = rates.top(hub, 100.0, 10, {})
    assert [row[0] for row in first] == ["warm", "hot", "cold"]  # no rate yet: by subscribers
    assert all(row[3] == 0.0 for row in first)
    publish(hub, "hot", 30)
    publish(hub, "warm", 4)
    # Half a second later: measured over that, the baseline stays.
    assert rates.top(hub, 100.5, 10, {})[0] == ["hot", 2, 30, 60.0]
    later = rates.top(hub, 102.0, 2, {"hot": 1})
    assert later == [["hot", 1, 30, 15.0], ["warm", 5, 4, 2.0]]  # the tail is not a subscriber
    publish(hub, "cold", 1)
    assert rates.top(hub, 103.0, 10, {})[0] == ["cold", 1, 1, 1.0]


def test_merge_adds_nodes_up_by_second_and_lists_silent_nodes_as_stale() -> None:
    bounds = (0.001, 0.01)

    def answer(node: str, rows: list[list[object]], channels: list[list[object]]) -> dict:
        info = {"node": node, "connections": rows[-1][1], "subscriptions": rows[-1][2]}
        return {"info": {**info, "slow_consumers": 1}, "samples": rows, "channels": channels}

    a = answer(
        "a",
        [[10, 3, 3, 1.0, 10.0, 0, [1, 0, 0]], [11, 4, 4, 2.0, 20.0, 0, [2, 0, 0]]],
        [["chat:x", 2, 50, 5.0], ["chat:y", 1, 9, 0.0]],
    )
    b = answer("b", [[10, 5, 6, 3.0, 30.0, 1, [0, 2, 0]]], [["chat:x", 3, 50, 4.0]])
    registry = [{"node": "a"}, {"node": "b"}, {"node": "c", "connections": 9}]
    view = merge([a, b], registry, bounds)
    assert [n["node"] for n in view["nodes"]] == ["a", "b", "c"]
    assert [n["stale"] for n in view["nodes"]] == [False, False, True]
    assert view["totals"]["connections"] == 9  # the stale node's are not counted
    assert view["totals"]["nodes"] == 3
    assert view["totals"]["in_rate"] == 5.0  # each node's latest second
    # Second 11 is left out: node b has not reported it yet.
    assert [p["t"] for p in view["series"]] == [10]
    point = view["series"][0]
    assert (point["connections"], point["subscriptions"], point["deliveries"]) == (8, 9, 40.0)
    assert point["slow_consumers"] == 1
    # 1 of 3 in (0, 1 ms], 2 in (1, 10 ms]: rank 1.5 is a quarter into the second bucket.
    assert point["p50"] == pytest.approx(3.25)
    assert view["channels"][0] == {
        "channel": "chat:x",
        "subscribers": 5,
        "messages": 50,
        "rate": 5.0,
    }


# ----- tails


def test_tail_keeps_payloads_and_stays_bounded() -> None:
    tail = Tail("chat:x", NOW)
    assert tail.client_id.startswith("admin-tail-")
    tail.push_frame(build_frame(b'{"n":1}', OP_TEXT))
    tail.push_frame(build_frame(b'{"n":2}', OP_TEXT))
    assert tail.after(0) == [b'{"n":1}', b'{"n":2}']
    assert tail.after(1) == [b'{"n":2}']
    assert tail.after(2) == []
    for n in range(TAIL_EVENTS + 5):
        tail.push_frame(build_frame(orjson.dumps({"n": n}), OP_TEXT))
    assert len(tail.events) == TAIL_EVENTS
    assert tail.dropped == 7
    assert tail.after(tail.seq - 1) == [orjson.dumps({"n": TAIL_EVENTS + 4})]
    big = b'"' + b"x" * 70_000 + b'"'
    for _ in range(5):
        tail.push_frame(build_frame(big, OP_TEXT))
    assert tail.size <= TAIL_BYTES
    assert tail.after(0)[-1] == big


def test_a_tail_notes_a_gap_it_was_told_of() -> None:
    tail = Tail("chat:x", NOW)
    # A coroutine that awaits nothing: run to its end without an event loop.
    with pytest.raises(StopIteration) as done:
        tail.end_subscription("chat:x", "insufficient_state", resubscribe=True).send(None)
    assert done.value.value is False
    assert orjson.loads(tail.after(0)[0]) == {
        "type": "gap",
        "channel": "chat:x",
        "reason": "insufficient_state",
    }
