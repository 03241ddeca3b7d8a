"""The `PresenceStore` contract, for every store in `PRESENCE_STORES` (see conftest.py).

Stores shared by nodes also expire a dead node's entries after their TTL;
that needs a second node and is tested with such a store's engine.
"""

from __future__ import annotations

from plexus.engines.base import PresenceStore
from plexus.models import ClientInfo

ALICE = ClientInfo("c-1", "alice", {"color": "red"})
BOB = ClientInfo("c-2", "bob", None)
ANON = ClientInfo("c-3", None, {"nick": "你好"})


async def test_get_unknown_channel_is_empty(presence: PresenceStore) -> None:
    assert await presence.get("chat:nobody") == {}


async def test_get_returns_exactly_the_added_clients(presence: PresenceStore) -> None:
    await presence.add("chat:a", ALICE)
    await presence.add("chat:a", BOB)
    await presence.add("chat:a", ANON)
    assert await presence.get("chat:a") == {"c-1": ALICE, "c-2": BOB, "c-3": ANON}


async def test_add_is_idempotent_and_replaces_info(presence: PresenceStore) -> None:
    await presence.add("chat:a", ALICE)
    await presence.add("chat:a", ALICE)
    renamed = ClientInfo("c-1", "alice", {"color": "blue"})
    await presence.add("chat:a", renamed)
    assert await presence.get("chat:a") == {"c-1": renamed}


async def test_remove_forgets_only_that_client(presence: PresenceStore) -> None:
    await presence.add("chat:a", ALICE)
    await presence.add("chat:a", BOB)
    await presence.remove("chat:a", "c-1")
    assert await presence.get("chat:a") == {"c-2": BOB}
    await presence.remove("chat:a", "c-2")
    assert await presence.get("chat:a") == {}


async def test_remove_absent_is_a_noop(presence: PresenceStore) -> None:
    await presence.remove("chat:never", "c-1")
    await presence.add("chat:a", ALICE)
    await presence.remove("chat:a", "c-404")
    await presence.remove("chat:a", "c-1")
    await presence.remove("chat:a", "c-1")
    assert await presence.get("chat:a") == {}
    assert await presence.get("chat:never") == {}


async def test_channels_are_independent(presence: PresenceStore) -> None:
    await presence.add("chat:a", ALICE)
    await presence.add("chat:b", ALICE)
    await presence.add("chat:b", BOB)
    await presence.remove("chat:b", "c-1")
    assert await presence.get("chat:a") == {"c-1": ALICE}
    assert await presence.get("chat:b") == {"c-2": BOB}


async def test_get_returns_a_snapshot(presence: PresenceStore) -> None:
    await presence.add("chat:a", ALICE)
    snapshot = await presence.get("chat:a")
    snapshot.clear()
    await presence.add("chat:a", BOB)
    assert snapshot == {}
    assert await presence.get("chat:a") == {"c-1": ALICE, "c-2": BOB}


async def test_health_is_ok(presence: PresenceStore) -> None:
    assert presence.health()["status"] == "ok"
