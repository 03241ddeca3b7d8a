"""End-to-end: the nginx configuration in deploy/ in front of two nodes, as documented.

Runs Debian's nginx with `deploy/nginx.conf` itself (only its ports replaced
by free ones) before two `plexus serve` nodes on one real redis-server.
Clients know only nginx's address; one node is killed mid-stream and every
client still gets every message exactly once, through the other.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_scale_out import Follower, node_env, ws_publisher
from tests.helpers import (
    ROOT,
    TIMEOUT,
    EventStream,
    RedisServer,
    ServerProcess,
    api_post,
    free_port,
    metrics,
)

CONFIG = ROOT / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("nginx is not installed (make test installs it)")
    return found


class Nginx:
    """nginx running deploy/nginx.conf with its three ports replaced."""

    def __init__(self, prefix: Path, upstreams: list[int]) -> None:
        self.prefix = prefix
        self.port = free_port()
        text = CONFIG.read_text()
        for placeholder, port in zip((8001, 8002), upstreams, strict=True):
            assert f"127.0.0.1:{placeholder} " in text
            text = text.replace(f"127.0.0.1:{placeholder} ", f"127.0.0.1:{port} ")
        assert "listen 127.0.0.1:8000;" in text
        text = text.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{self.port};")
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        command = [nginx_binary(), "-p", str(self.prefix), "-c", "nginx.conf", "-g", "daemon off;"]
        errors = (self.prefix / "stderr.log").open("wb")
        with errors:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def wait_for_nginx(session: aiohttp.ClientSession, proxy: Nginx) -> None:
    """Until nginx answers `/health` from a node."""

    async def healthy() -> bool:
        try:
            async with session.get(proxy.url + "/health") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not await healthy():
        assert asyncio.get_running_loop().time() < deadline, "nginx did not start"
        await asyncio.sleep(0.05)  # sleep-ok: waits for nginx to listen


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_nodes_behind_nginx_lose_nothing_when_one_dies(
    tmp_path: Path, redis: RedisServer
) -> None:
    env = node_env(redis, "lb")
    a = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "A"}).start()
    b = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "B"}).start()
    proxy = Nginx(tmp_path / "nginx", [a.port, b.port]).start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_nginx(session, proxy)
            ws_url = proxy.url.replace("http", "ws", 1) + "/ws"
            followers = [Follower(session, [ws_url]) for _ in range(6)]
            total = 500
            readers = [asyncio.create_task(f.run(until=total)) for f in followers]
            for follower in followers:
                await asyncio.wait_for(follower.ready.wait(), TIMEOUT)
            # least_conn spread them over both nodes.
            assert {f.nodes[0] for f in followers} == {"A", "B"}
            acked: dict[int, Any] = {}
            await ws_publisher(session, ws_url, "first", total // 2, acked)
            await asyncio.to_thread(a.kill)
            # Through nginx, API publishes keep working (they reach B).
            for n in range(total - total // 2):
                status, body = await api_post(
                    proxy.url, "/api/publish", {"channel": "chat:scale", "data": {"n": n}}
                )
                assert status == 200, body
                acked[body["offset"]] = {"n": n}
            await asyncio.wait_for(asyncio.gather(*readers), 2 * TIMEOUT)
            expected = [acked[offset] for offset in range(1, total + 1)]
            for follower in followers:
                assert follower.values == expected
                if follower.nodes[0] == "A":
                    assert follower.nodes[-1] == "B"
    finally:
        proxy.stop()
        a.kill()
        b.stop()


async def test_sse_behind_nginx_needs_no_sticky_sessions(
    tmp_path: Path, redis: RedisServer
) -> None:
    """nginx spreads requests by least connections: the POSTs of a stream held by
    one node mostly reach the other, which forwards them; nothing is lost or reordered."""
    env = node_env(redis, "lb-sse")
    a = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "A"}).start()
    b = ServerProcess(env={**env, "PLEXUS_NODE_NAME": "B"}).start()
    proxy = Nginx(tmp_path / "nginx", [a.port, b.port]).start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_nginx(session, proxy)
            stream = EventStream(session, proxy.url)
            welcome = await stream.open()
            assert welcome["node"] in ("A", "B")
            subscribe = {"type": "subscribe", "id": 0, "channel": "chat:lb-sse"}
            assert await stream.post([subscribe]) == (204, None)
            for batch in range(20):
                publishes = [
                    {"type": "publish", "id": n, "channel": "chat:lb-sse", "data": n}
                    for n in range(batch * 5 + 1, batch * 5 + 6)
                ]
                assert await stream.post(publishes) == (204, None)
            events: list[Any] = []
            # Messages come through Redis pub/sub, replies after the store
            # answered: either may come first. Read until all of both came.
            while (
                sum(e["type"] == "message" for e in events) < 100
                or sum(e["type"] == "reply" for e in events) < 101
            ):
                event = await stream.event()
                assert event is not None, "the stream ended"
                events.append(event)
            replies = [e for e in events if e["type"] == "reply"]
            assert [r["id"] for r in replies] == list(range(101))
            assert [e["data"] for e in events if e["type"] == "message"] == list(range(1, 101))
            stream.close()
            forwarded = 0.0
            for node in (a, b):
                samples = await metrics(node.url)
                forwarded += samples.get(
                    'plexus_emulation_posts_total{route="forwarded",status="204"}', 0.0
                )
            assert forwarded > 0, "every POST reached the stream's node: nothing was proven"
    finally:
        proxy.stop()
        a.stop()
        b.stop()
