"""End-to-end: /health and /ready tell the truth, and background tasks cannot die silently."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plexus.app import Server
from plexus.client import Client, PlexusClientError
from plexus.engines.sqlite.writer import Writer
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT, api_post, wait_for


async def get(server: Server, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + path, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response,
    ):
        return response.status, await response.json()


@pytest.mark.parametrize("engine", ["memory", "sqlite"])
async def test_health_lists_every_component(make_server: ServerFactory, engine: str) -> None:
    server = await make_server(engine=engine)
    status, health = await get(server, "/health")
    assert status == 200
    assert health["status"] == "ok"
    assert health["ready"] is True
    assert health["node"] == server.node.name if server.node else False
    components = health["components"]
    assert set(components) == {"broker", "history", "presence", "tasks"}
    assert all(part["status"] == "ok" for part in components.values())
    assert "heartbeat" in components["tasks"]["tasks"]
    assert components["tasks"]["tasks"]["heartbeat"] == {"status": "running", "restarts": 0}
    status, ready = await get(server, "/ready")
    assert (status, ready["ready"]) == (200, True)


class _Boom:
    """Stands in the heartbeat's connection set and breaks the loop once, like a bug would."""

    def __init__(self, owner: set[Any]) -> None:
        self.owner = owner

    @property
    def close_code(self) -> None:
        self.owner.discard(self)
        raise RuntimeError("a bug in the heartbeat")


async def test_a_crashed_heartbeat_is_logged_restarted_and_shown(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(ping_interval=0.4, pong_timeout=0.2)
    assert server.endpoint is not None
    connections: set[Any] = server.endpoint.connections
    connections.add(_Boom(connections))
    await wait_for(lambda: "a bug in the heartbeat" in caplog.text)
    record = next(r for r in caplog.records if "background task heartbeat crashed" in r.message)
    assert record.exc_info is not None  # logged once, with its traceback
    _, health = await get(server, "/health")
    assert health["components"]["tasks"]["tasks"]["heartbeat"]["restarts"] == 1
    assert (
        "a bug in the heartbeat"
        in health["components"]["tasks"]["tasks"]["heartbeat"]["last_error"]
    )
    # Restarted: a client that stops answering pings is still closed.
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws_url, autoping=False)
        assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "welcome"
        while True:
            msg = await ws.receive(timeout=TIMEOUT)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                assert msg.data == 1008
                break
            assert msg.type is aiohttp.WSMsgType.PING
        await ws.close()
    await wait_for(lambda: server.health()["status"] == "ok")


async def test_a_full_disk_makes_publishes_unavailable_and_not_ready(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SQLite's own "database or disk is full" (a page quota on the writer's
    connection): every publish answers `unavailable`, none is lost silently,
    /ready says 503 and /health names the store; room again: all is well."""
    # The page quota is set before each batch, on whichever thread runs it
    # (the writer's, or the loop's for plain appends): FULL = no page beyond
    # those in use, None = no quota.
    quota: list[str | None] = [None]
    real_run_batch = Writer.run_batch

    def run_batch(writer: Any, jobs: list[Any], **options: Any) -> list[Any]:
        conn = writer.connect()
        if quota[0] == "FULL":
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        elif quota[0] == "ROOM":
            conn.execute("PRAGMA max_page_count = 1073741823")
        result: list[Any] = real_run_batch(writer, jobs, **options)
        return result

    monkeypatch.setattr(Writer, "run_batch", run_batch)
    server = await make_server(engine="sqlite", data_dir=str(tmp_path / "data"))
    channel = "chat:disk"
    async with Client(server.ws_url, timeout=TIMEOUT) as client:
        sub = await client.subscribe(channel)
        assert await client.publish(channel, "before") == 1
        quota[0] = "FULL"
        codes = []
        for n in range(50):
            try:
                await client.publish(channel, {"n": n, "pad": "x" * 4000})
            except PlexusClientError as exc:
                codes.append(exc.code)
        refused = len(codes)
        assert refused > 0
        assert set(codes) == {"unavailable"}
        big = {"channel": channel, "data": {"pad": "y" * 40_000}}
        status, body = await api_post(server.url, "/api/publish", big)
        assert (status, body["error"]["code"]) == (503, "unavailable")
        status, ready = await get(server, "/ready")
        assert status == 503
        assert ready["components"]["history"]["status"] == "down"
        assert "full" in ready["components"]["history"]["error"]
        quota[0] = "ROOM"
        last = await client.publish(channel, "after")
        status, _ = await get(server, "/ready")
        assert status == 200
        # What was acknowledged arrived, in order, with no gap; what was refused never did.
        got = []
        while not got or got[-1]["offset"] < last:
            got.append(await sub.get(TIMEOUT, kind="message"))
        assert [m["offset"] for m in got] == list(range(1, last + 1))
        assert got[0]["data"] == "before"
        assert got[-1]["data"] == "after"
        history = await client.history(channel)
        assert [m["data"] for m in history["messages"]] == [m["data"] for m in got]
        assert refused == 50 - (last - 2)


async def test_ready_is_503_while_the_server_stops(make_server: ServerFactory) -> None:
    server = await make_server()
    assert (await get(server, "/ready"))[0] == 200
    stopping = asyncio.create_task(server.stop())
    await stopping
    with pytest.raises(aiohttp.ClientError):
        await get(server, "/ready")


@pytest.mark.parametrize("engine", ["memory", "sqlite"])
async def test_health_state_counts_what_the_server_holds(
    make_server: ServerFactory, engine: str
) -> None:
    """`state` in /health grows with a subscription and is back to its baseline after it."""
    server = await make_server(engine=engine)
    _, before = await get(server, "/health")
    state = before["state"]
    assert state["tasks"] > 0
    assert state["node"]["peers"] == 0
    assert state["engine"]["streams"] == 0
    assert state["engine"]["presence_channels"] == 0
    async with Client(server.ws_url, timeout=TIMEOUT) as client:
        await client.subscribe("chat:room")
        await client.subscribe("plain")
        if engine == "sqlite":
            # Its writer thread applies each subscription's pin after the reply
            # (queued, not awaited): wait until it has both.
            server_node = server.node
            assert server_node is not None
            await wait_for(lambda: server_node.engine_state().get("pinned") == 2)
        _, during = await get(server, "/health")
        node, held = during["state"]["node"], during["state"]["engine"]
        assert (node["peers"], node["hub_channels"], node["joined"]) == (1, 2, 2)
        assert held["presence_channels"] == 1  # chat keeps presence
        assert held["subscribed"] == 2
        # The memory engine keeps both streams; SQLite keeps the one without history
        # in memory and knows the position of the other.
        if engine == "memory":
            assert held["streams"] == 2
        else:
            assert (held["streams"], held["pinned"], held["positions"]) == (1, 2, 1)
        await client.unsubscribe("plain")
    assert server.endpoint is not None
    endpoint = server.endpoint
    await wait_for(lambda: not endpoint.connections)
    _, after = await get(server, "/health")
    node, held = after["state"]["node"], after["state"]["engine"]
    assert not any(node.values()), node
    assert (held["streams"], held["subscribed"], held["presence_channels"]) == (
        0 if engine == "sqlite" else 1,
        0,
        0,
    )
    assert after["state"]["tasks"] == state["tasks"]
