"""One suite for every `PresenceStore`: add a factory to `BACKENDS` to cover a new one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import pytest

from plexus.models import ClientInfo
from plexus.presence.base import PresenceStore
from plexus.presence.memory import MemoryPresenceStore


class Store(PresenceStore, Protocol):
    async def start(self) -> None: ...


Factory = Callable[[], Store]

BACKENDS = [
    pytest.param(MemoryPresenceStore, id="memory"),
]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    factory: Factory = request.param
    presence = factory()
    await presence.start()
    yield presence
    await presence.close()


ALICE = ClientInfo("c-1", "alice", {"color": "red"})
BOB = ClientInfo("c-2", "bob", None)
ANON = ClientInfo("c-3", None, {"nick": "你好"})


async def test_get_unknown_channel_is_empty(store: Store) -> None:
    assert await store.get("chat:nobody") == {}


async def test_get_returns_exactly_the_added_clients(store: Store) -> None:
    await store.add("chat:a", ALICE)
    await store.add("chat:a", BOB)
    await store.add("chat:a", ANON)
    assert await store.get("chat:a") == {"c-1": ALICE, "c-2": BOB, "c-3": ANON}


async def test_add_is_idempotent_and_replaces_info(store: Store) -> None:
    await store.add("chat:a", ALICE)
    await store.add("chat:a", ALICE)
    renamed = ClientInfo("c-1", "alice", {"color": "blue"})
    await store.add("chat:a", renamed)
    assert await store.get("chat:a") == {"c-1": renamed}


async def test_remove_forgets_only_that_client(store: Store) -> None:
    await store.add("chat:a", ALICE)
    await store.add("chat:a", BOB)
    await store.remove("chat:a", "c-1")
    assert await store.get("chat:a") == {"c-2": BOB}
    await store.remove("chat:a", "c-2")
    assert await store.get("chat:a") == {}


async def test_remove_absent_is_a_noop(store: Store) -> None:
    await store.remove("chat:never", "c-1")
    await store.add("chat:a", ALICE)
    await store.remove("chat:a", "c-404")
    await store.remove("chat:a", "c-1")
    await store.remove("chat:a", "c-1")
    assert await store.get("chat:a") == {}
    assert await store.get("chat:never") == {}


async def test_channels_are_independent(store: Store) -> None:
    await store.add("chat:a", ALICE)
    await store.add("chat:b", ALICE)
    await store.add("chat:b", BOB)
    await store.remove("chat:b", "c-1")
    assert await store.get("chat:a") == {"c-1": ALICE}
    assert await store.get("chat:b") == {"c-2": BOB}


async def test_get_returns_a_snapshot(store: Store) -> None:
    await store.add("chat:a", ALICE)
    snapshot = await store.get("chat:a")
    snapshot.clear()
    await store.add("chat:a", BOB)
    assert snapshot == {}
    assert await store.get("chat:a") == {"c-1": ALICE, "c-2": BOB}
