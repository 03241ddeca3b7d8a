"""The Python client's state without I/O: backoff, token expiry, gaps, duplicates."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from plexus.client import Client
from plexus.client_state import HISTORY_PAGE, Backoff, Gap, Subscription, token_expiry


def jwt(claims: Any) -> str:
    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(claims)}.signature"


def message(offset: int, epoch: str = "e1", channel: str = "chat:x") -> dict[str, Any]:
    return {"type": "message", "channel": channel, "data": offset, "offset": offset, "epoch": epoch}


def drain(sub: Subscription) -> list[Any]:
    items = []
    while not sub.queue.empty():
        item = sub.queue.get_nowait()
        items.append(item if item is None or item["type"] != "message" else item["offset"])
    return items


# ----- backoff


def test_backoff_caps_grow_exponentially_to_max() -> None:
    backoff = Backoff(initial=0.5, max=20.0)
    almost_one = 0.999999
    caps = [backoff.delay(n, lambda: almost_one) / almost_one for n in range(9)]
    assert caps == pytest.approx([0.5, 1, 2, 4, 8, 16, 20, 20, 20])
    assert backoff.delay(10_000, lambda: almost_one) == pytest.approx(20 * almost_one)


def test_backoff_is_full_jitter_between_zero_and_the_cap() -> None:
    backoff = Backoff(initial=1.0, max=8.0)
    assert backoff.delay(3, lambda: 0.0) == 0.0
    assert backoff.delay(3, lambda: 0.25) == 2.0
    delays = [backoff.delay(2) for _ in range(200)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100  # random, not a fixed schedule


# ----- token expiry


def test_token_expiry_reads_exp_without_checking_the_signature() -> None:
    assert token_expiry(jwt({"sub": "a", "exp": 1_700_000_000})) == 1_700_000_000
    assert token_expiry(jwt({"sub": "a", "exp": 1.5})) == 1.5
    assert token_expiry(jwt({"sub": "a"})) is None
    assert token_expiry(jwt({"exp": True})) is None
    assert token_expiry(jwt(["not", "an", "object"])) is None
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("") is None
    assert token_expiry(None) is None


# ----- gaps read from history


def page(*offsets: int, epoch: str = "e1") -> dict[str, Any]:
    return {"messages": [message(o) for o in offsets], "offset": 99, "epoch": epoch}


def test_gap_complete_in_one_page() -> None:
    gap = Gap("chat:x", {"offset": 5, "epoch": "e1"}, 8, "e1")
    request = gap.request()
    assert request == {
        "type": "history",
        "channel": "chat:x",
        "since": {"offset": 5, "epoch": "e1"},
        "limit": 3,
    }
    assert gap.take(request, page(6, 7, 8)) == "complete"
    assert [m["offset"] for m in gap.got] == [6, 7, 8]


def test_gap_longer_than_a_page_asks_again_from_the_last_message() -> None:
    end = HISTORY_PAGE + 3
    gap = Gap("chat:x", {"offset": 0, "epoch": "e1"}, end, "e1")
    first = gap.request()
    assert first["limit"] == HISTORY_PAGE
    assert gap.take(first, page(*range(1, HISTORY_PAGE + 1))) == "more"
    second = gap.request()
    assert (second["since"], second["limit"]) == ({"offset": HISTORY_PAGE, "epoch": "e1"}, 3)
    assert gap.take(second, page(*range(HISTORY_PAGE + 1, end + 1))) == "complete"
    assert [m["offset"] for m in gap.got] == list(range(1, end + 1))


@pytest.mark.parametrize(
    "answer",
    [
        page(7, 8),  # 6 was trimmed
        page(6, 7, 8, epoch="e2"),  # the stream restarted
        page(),  # no history kept
        page(6),  # fewer than asked for, and not up to the end
    ],
)
def test_gap_that_history_cannot_fill_is_lost(answer: dict[str, Any]) -> None:
    gap = Gap("chat:x", {"offset": 5, "epoch": "e1"}, 8, "e1")
    assert gap.take(gap.request(), answer) == "lost"


# ----- a subscription's stream (a loop is needed for its queue and future)


async def test_duplicates_are_dropped_and_a_new_epoch_starts_over() -> None:
    sub = Subscription(Client("ws://127.0.0.1:9/ws"), "chat:x", {})
    sub._on_reply({"channel": "chat:x", "offset": 2, "epoch": "e1", "recovered": False}, None)
    for offset in (1, 2, 3, 3, 4):
        sub._on_message(message(offset))
    assert drain(sub) == [3, 4]
    sub._on_message(message(1, epoch="e2"))
    assert drain(sub) == [1]
    assert sub.position == {"offset": 1, "epoch": "e2"}


async def test_resubscribe_not_recovered_puts_a_lost_item_where_the_gap_is() -> None:
    sub = Subscription(Client("ws://127.0.0.1:9/ws"), "chat:x", {})
    sub._on_reply({"channel": "chat:x", "offset": 2, "epoch": "e1", "recovered": False}, None)
    sub._on_message(message(3))
    since = sub.position
    assert since == {"offset": 3, "epoch": "e1"}
    sub._on_reply({"channel": "chat:x", "offset": 0, "epoch": "e2", "recovered": False}, since)
    sub._on_message(message(1, epoch="e2"))
    lost = {"type": "lost", "channel": "chat:x", "since": since, "offset": 0, "epoch": "e2"}
    assert drain(sub) == [3, lost, 1]
    assert sub.lost == [lost]


async def test_first_subscribe_with_since_reports_in_result_not_in_the_stream() -> None:
    since = {"offset": 9, "epoch": "old"}
    sub = Subscription(Client("ws://127.0.0.1:9/ws"), "chat:x", {}, since=since)
    sub._on_reply({"channel": "chat:x", "offset": 0, "epoch": "e1", "recovered": False}, since)
    assert sub.recovered is False
    assert drain(sub) == []
    assert sub.lost == []


async def test_a_server_grant_holds_live_messages_until_the_gap_is_read() -> None:
    sub = Subscription(Client("ws://127.0.0.1:9/ws"), "chat:x", {})
    sub._on_reply({"channel": "chat:x", "offset": 5, "epoch": "e1", "recovered": False}, None)
    gap = sub._on_granted({"channel": "chat:x", "offset": 7, "epoch": "e1", "recovered": False})
    assert gap is not None
    assert sub.server is True
    sub._on_message(message(8))
    assert drain(sub) == []
    assert gap.take(gap.request(), page(6, 7, 8)) == "complete"
    sub._end_gap(gap, complete=True)
    assert drain(sub) == [6, 7, 8]
    assert sub.position == {"offset": 8, "epoch": "e1"}


async def test_a_server_grant_in_another_epoch_is_lost_at_once() -> None:
    sub = Subscription(Client("ws://127.0.0.1:9/ws"), "chat:x", {})
    sub._on_reply({"channel": "chat:x", "offset": 5, "epoch": "e1", "recovered": False}, None)
    assert sub._on_granted({"channel": "chat:x", "offset": 0, "epoch": "e2"}) is None
    sub._on_message(message(1, epoch="e2"))
    items = drain(sub)
    assert [i if isinstance(i, int) else i["type"] for i in items] == ["lost", 1]
