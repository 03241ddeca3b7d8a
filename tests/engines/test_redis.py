"""The Redis engine's own cases: what the shared conformance suites cannot drive,
because Redis expires state on its own clock and spreads channels over servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from plexus.engines.base import Retention
from plexus.engines.redis.broker import RedisBroker
from plexus.exceptions import Unavailable
from plexus.models import Publication
from plexus.supervisor import Supervisor
from tests.engines.conftest import _QuietSink
from tests.helpers import TIMEOUT, RedisServer


def message(data: object, channel: str) -> Publication:
    return Publication(channel, data, 0, "", int(time.time() * 1000))


@asynccontextmanager
async def started(urls: list[str], prefix: str, grace: float = 60.0) -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(urls, prefix=prefix, timeout=TIMEOUT / 5, grace=grace)
    broker.bind(_QuietSink())
    supervisor = Supervisor()
    await broker.start(supervisor)
    try:
        yield broker
    finally:
        await broker.close()
        await supervisor.close()


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition that Redis's own clock makes true (no event to await), bounded."""
    deadline = time.monotonic() + TIMEOUT
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # sleep-ok: polls Redis's key expiry, bounded


async def test_an_expired_channel_frees_its_slot(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    limited = Retention(10, ttl=0.2, max_channels=1, namespace="ns")
    async with started([redis_server.url], redis_prefix, grace=0.1) as broker:
        await broker.publish(message("a", "ns:a"), limited)
        with pytest.raises(Unavailable):
            await broker.publish(message("b", "ns:b"), limited)

        async def forgotten() -> bool:
            # Asked of Redis directly: `position` would keep the channel alive.
            return int(redis_server.command("EXISTS", broker.keys.meta("ns:a"))) == 0

        await until(forgotten, "ns:a to expire")
        published = await broker.publish(message("b", "ns:b"), limited)
        assert published.offset == 1


async def test_the_count_holds_no_more_than_the_limit(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    limited = Retention(10, max_channels=3, namespace="ns")
    async with started([redis_server.url], redis_prefix) as broker:
        refused = 0
        for n in range(20):
            try:
                await broker.publish(message(n, f"ns:{n}"), limited)
            except Unavailable:
                refused += 1
        assert refused == 17
        for n in range(5):
            with pytest.raises(Unavailable):
                await broker.position(f"ns:sub-{n}", create=limited)
        key = broker.keys.namespace("ns")
        assert int(redis_server.command("ZCARD", key)) == 3
        # Channels kept for ever are counted for ever.
        scores = redis_server.command("ZRANGE", key, "0", "-1", "WITHSCORES")
        assert scores[1::2] == ["inf"] * 3


async def test_a_refresh_keeps_a_subscribed_channel_counted(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The node's periodic `positions` keeps a subscribed channel's state alive, and
    its count with it: the two expire together."""
    limited = Retention(0, max_channels=1, namespace="ns")
    async with started([redis_server.url], redis_prefix, grace=30) as broker:
        created = await broker.position("ns:a", create=limited)
        assert created.epoch
        key, meta = broker.keys.namespace("ns"), broker.keys.meta("ns:a")
        redis_server.command("PEXPIRE", meta, "1000")  # as if most of its grace had passed
        await broker.positions(["ns:a"])
        seconds, micros = redis_server.command("TIME")
        clock = int(seconds) * 1000 + int(micros) // 1000
        left = int(redis_server.command("PTTL", meta))
        counted_until = float(redis_server.command("ZSCORE", key, "ns:a"))
        assert 29_000 < left <= 30_000
        assert abs((counted_until - clock) - left) < 1_000
        with pytest.raises(Unavailable):
            await broker.position("ns:b", create=limited)


async def test_several_servers_share_the_limit_out(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "second") as second:
        urls = [redis_server.url, second.url]
        limited = Retention(10, max_channels=4, namespace="ns")
        async with started(urls, redis_prefix) as broker:
            kept: dict[int, int] = {0: 0, 1: 0}
            refusals: set[str] = set()
            for n in range(40):
                channel = f"ns:{n}"
                try:
                    await broker.publish(message(n, channel), limited)
                except Unavailable as refused:
                    refusals.add(refused.message)
                else:
                    kept[broker.shard(channel).index] += 1
            assert kept == {0: 2, 1: 2}
            assert refusals == {"namespace ns holds its maximum of 4 channels: try again later"}
