"""End-to-end load: many subscribers on a real server process."""

from __future__ import annotations

import asyncio

import aiohttp

from plexus.client import Client
from tests.helpers import TIMEOUT, ServerProcess, api_post


def test_thousand_subscribers_each_get_200_messages_in_order() -> None:
    subscribers, messages = 1000, 200

    async def scenario(server: ServerProcess) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [
                Client(server.ws_url, session=session, timeout=TIMEOUT * 3)
                for _ in range(subscribers)
            ]
            await asyncio.gather(*(c.connect() for c in clients))
            subs = await asyncio.gather(*(c.subscribe("chat:load") for c in clients))
            for i in range(messages):
                status, body = await api_post(
                    server.url, "/api/publish", {"channel": "chat:load", "data": i}
                )
                assert status == 200, body

            async def drain(sub_index: int) -> list[int]:
                sub = subs[sub_index]
                return [
                    (await sub.get(TIMEOUT * 3, kind="message"))["data"] for _ in range(messages)
                ]

            results = await asyncio.gather(*(drain(i) for i in range(subscribers)))
            expected = list(range(messages))
            complete = sum(r == expected for r in results)
            print(f"{complete} of {subscribers} subscribers got all {messages} messages in order")
            assert complete == subscribers
            await asyncio.gather(*(c.close() for c in clients))

    with ServerProcess(env={"PLEXUS_HISTORY_BACKEND": "memory"}) as server:
        asyncio.run(scenario(server))
