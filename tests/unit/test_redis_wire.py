"""The Redis engine's pure parts: key names, payloads and the choice of server."""

from __future__ import annotations

from collections import Counter

import pytest

from plexus.engines.redis.wire import (
    Keys,
    as_text,
    body,
    decode,
    jump_hash,
    presence_payload,
    publication_from_body,
    shard_of,
)
from plexus.models import UNSET, ClientInfo, Presence, Publication


def test_every_key_of_a_channel_shares_its_hash_tag() -> None:
    keys = Keys("px")
    channel = "chat:room#1/a=b"
    names = [
        keys.meta(channel),
        keys.stream(channel),
        keys.idempotency(channel, "k"),
        keys.presence(channel),
        keys.presence_expiry(channel),
        keys.pubsub(channel),
    ]
    assert all(f"{{{channel}}}" in name for name in names)
    assert len(set(names)) == len(names)
    assert keys.channel_of(keys.pubsub(channel).encode()) == channel


def test_message_payload_round_trips_without_touching_the_payload() -> None:
    pub = Publication(
        "chat:a", {"text": "你好 a b", "blob": b"\x00\xff"}, 0, "", 1234, "c-1", "ann"
    )
    pub.offset, pub.epoch = 42, "e-pq"
    payload = b"m42 e-pq " + body(pub)
    event = decode("chat:a", payload)
    assert isinstance(event, Publication)
    assert event == pub
    assert event.raw == pub.raw  # shipped as it was encoded, once
    anonymous = Publication("chat:a", [1, None], 1, "e", 5)
    assert publication_from_body("chat:a", 1, "e", body(anonymous)) == anonymous


def test_a_received_payload_is_decoded_only_when_asked() -> None:
    pub = publication_from_body("c", 1, "e", b'[1,null,null]\n{"a":[1,2]}')
    assert pub._data is UNSET
    assert pub.raw == b'{"a":[1,2]}'
    assert pub.data == {"a": [1, 2]}


@pytest.mark.parametrize("kind", ["join", "leave"])
def test_presence_payload_round_trips(kind: str) -> None:
    event = Presence(kind, "chat:a", ClientInfo("c-9", None, {"name": "Zoë"}))
    assert decode("chat:a", presence_payload(event)) == event


@pytest.mark.parametrize(
    "payload",
    [
        b"m",
        b"mx 1 []\n1",
        b"m1",
        b"m1 e",
        b"m1 e [1,2]",
        b"j[1]",
        b"j{not json",
        b"m 1 e [1,null,null]\n1",  # no offset
    ],
)
def test_malformed_payloads_raise_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the broker catches exactly ValueError
        decode("c", payload)


def test_unknown_payload_kinds_are_ignored() -> None:
    assert decode("c", b"zwhatever") is None


def test_one_server_holds_everything() -> None:
    assert {shard_of(f"c{n}", 1) for n in range(100)} == {0}


def test_channels_spread_over_servers_and_stay_put() -> None:
    names = [f"chat:{n}" for n in range(20_000)]
    spread = Counter(shard_of(name, 4) for name in names)
    assert set(spread) == {0, 1, 2, 3}
    assert min(spread.values()) > 0.2 * len(names)  # roughly even
    assert [shard_of(name, 4) for name in names[:50]] == [shard_of(name, 4) for name in names[:50]]


def test_adding_a_server_moves_about_one_channel_in_n() -> None:
    names = [f"room-{n}" for n in range(20_000)]
    moved = [name for name in names if shard_of(name, 4) != shard_of(name, 5)]
    assert 0.15 < len(moved) / len(names) < 0.25
    # Those that move, move to the new server only.
    assert {shard_of(name, 5) for name in moved} == {4}


def test_as_text() -> None:
    assert as_text(b"ep-1") == "ep-1"
    assert as_text("ep-1") == "ep-1"
    assert as_text(42) == "42"


def test_jump_hash_is_the_papers() -> None:
    # Values of another implementation of the published algorithm (ClickHouse's
    # jumpConsistentHash, tests/queries/0_stateless/00580_consistent_hashing_functions).
    cases = [(1, 1, 0), (42, 57, 43), (256, 1024, 520), (3735883980, 1, 0)]
    cases += [(3735883980, 666, 361), (16045690984833335023, 255, 237)]
    assert [jump_hash(key, buckets) for key, buckets, _ in cases] == [b for *_, b in cases]


def test_channels_stay_on_the_servers_they_were_released_on() -> None:
    """A channel that moves to another server starts a new epoch there: the choice of
    server must not change from one version to the next."""
    expected = {
        "chat:lobby": [0, 0, 4, 4],
        "news": [0, 2, 4, 4],
        "#alice": [0, 2, 2, 5],
        "chat:1": [0, 2, 2, 8],
        "chat:2": [1, 1, 4, 4],
        "room-7": [1, 2, 4, 4],
        "chat:3": [1, 2, 2, 2],
    }
    assert {name: [shard_of(name, n) for n in (2, 3, 5, 10)] for name in expected} == expected
