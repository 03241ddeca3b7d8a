"""The backend SDK stays light, and its publishes survive a server that is briefly away.

Real servers on loopback ports: an in-process one restarted on the same
port, one whose Redis stops for a moment (503), and a relay (a real TCP
forwarder) that loses the first answer after the server stored the message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexus.api import ApiError, AsyncPlexusApi, PlexusApi
from tests.conftest import ServerFactory
from tests.helpers import TIMEOUT, RedisServer, api_post


def test_importing_the_sdk_pulls_in_no_server_library() -> None:
    code = (
        "import sys, plexus.api, plexus.tokens\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules}"
        " & {'aiohttp', 'jwt', 'cryptography', 'orjson', 'msgpack', 'prometheus_client'})\n"
        "print(','.join(heavy))\n"
        "plexus.tokens.make_token('s' * 32, user='alice')\n"  # HMAC tokens: standard library
        "assert 'jwt' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert done.stdout.strip() == ""


class RetryLog(logging.Handler):
    """Sets `seen` when the SDK logs a retry (from any thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.messages.append(record.getMessage())
            self.seen.set()


@pytest.fixture
def retries() -> Iterator[RetryLog]:
    handler = RetryLog()
    logger = logging.getLogger("plexus.api")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def history(url: str, channel: str) -> list[object]:
    status, page = await api_post(url, "/api/history", {"channel": channel})
    assert status == 200, page
    return [m["data"] for m in page["messages"]]


async def test_publish_waits_out_a_restart(make_server: ServerFactory, retries: RetryLog) -> None:
    first = await make_server(history_backend="sqlite")
    api = PlexusApi(first.url, timeout=TIMEOUT, retries=50, retry_delay=0.05)
    assert await asyncio.to_thread(api.publish, "chat:sdk-restart", "before") == 1
    port = first.port
    await first.stop()
    publishing = asyncio.ensure_future(asyncio.to_thread(api.publish, "chat:sdk-restart", "during"))
    assert await asyncio.to_thread(retries.seen.wait, TIMEOUT), "it failed, and retries"
    assert "Connection refused" in retries.messages[0]
    second = await make_server(history_backend="sqlite", port=port)
    assert await asyncio.wait_for(publishing, TIMEOUT) == 2
    assert await history(second.url, "chat:sdk-restart") == ["before", "during"]


async def test_async_publish_retries_a_503_while_redis_is_down(
    make_server: ServerFactory, tmp_path: Path, retries: RetryLog
) -> None:
    with RedisServer(tmp_path / "redis", persistent=True) as redis:
        server = await make_server(engine="redis", redis_url=redis.url, redis_timeout=0.5)
        async with AsyncPlexusApi(
            server.url, timeout=TIMEOUT, retries=100, retry_delay=0.05
        ) as api:
            assert await api.publish("chat:sdk-503", "before") == 1
            redis.stop()
            publishing = asyncio.ensure_future(api.publish("chat:sdk-503", "during"))
            await asyncio.to_thread(retries.seen.wait, TIMEOUT)
            assert "503" in retries.messages[0] or "unavailable" in retries.messages[0]
            redis.start()
            assert await asyncio.wait_for(publishing, 4 * TIMEOUT) == 2
        assert await history(server.url, "chat:sdk-503") == ["before", "during"]


def test_retries_run_out(retries: RetryLog) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = PlexusApi(f"http://127.0.0.1:{port}", timeout=TIMEOUT, retries=2, retry_delay=0.01)
    with pytest.raises(ApiError) as caught:
        api.publish("chat:x", 1)
    assert (caught.value.code, caught.value.status) == ("unavailable", 0)
    assert len(retries.messages) == 2
    with pytest.raises(ApiError):  # a refusal is not retried
        PlexusApi(f"http://127.0.0.1:{port}", retries=0).publish("chat:x", 1)
    assert len(retries.messages) == 2


class LosingRelay:
    """A TCP relay to `port` that drops the server's first answer (after the server acted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        lose = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, drop: bool) -> None:
            try:
                while data := await src.read(65536):
                    if drop:
                        break  # the answer arrived: the client never sees it
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(
            pump(reader, up_writer, False), pump(up_reader, writer, lose), return_exceptions=True
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_lost_answer_is_retried_with_the_same_key_and_published_once(
    make_server: ServerFactory, retries: RetryLog
) -> None:
    server = await make_server()
    relay = LosingRelay(server.port)
    port = await relay.start()
    try:
        api = PlexusApi(f"http://127.0.0.1:{port}", timeout=TIMEOUT, retries=3, retry_delay=0.01)
        offset = await asyncio.to_thread(api.publish, "chat:sdk-lost", {"n": 1})
        assert relay.connections == 2, "the first answer was lost, the retry got one"
        assert len(retries.messages) == 1
        assert offset == 1, "the retry was answered with the first publish's offset"
        assert await history(server.url, "chat:sdk-lost") == [{"n": 1}]
        # A caller's own key is used as given: the same key is the same message.
        direct = PlexusApi(server.url, timeout=TIMEOUT)
        for _ in range(2):
            again = await asyncio.to_thread(
                direct.publish, "chat:sdk-lost", {"n": 2}, idempotency_key="k-2"
            )
            assert again == 2
        assert await history(server.url, "chat:sdk-lost") == [{"n": 1}, {"n": 2}]
    finally:
        await relay.close()
