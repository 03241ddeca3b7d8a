"""Redis memory per channel and per kept message, with the Redis engine's own code.

    python -m bench.redis_memory [--channels 2000] [--messages 100] [--size 80]

Starts its own redis-server on a free loopback port, publishes through
`RedisBroker` (the script every node runs), and reads `used_memory` before and
after. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import _start_redis
from plexus.engines.base import Retention
from plexus.engines.redis.broker import RedisBroker
from plexus.models import Publication
from plexus.supervisor import Supervisor


class _Sink:
    name = "bench-memory"

    def info(self) -> dict[str, Any]:
        return {"node": self.name}

    def on_publication(self, pub: Publication) -> None:
        pass

    def on_presence(self, event: Any) -> None:
        pass

    def on_gapped(self, channels: Any) -> None:
        pass


async def measure(port: int, channels: int, messages: int, size: int) -> dict[str, float]:
    import redis

    probe = redis.Redis(port=port)
    broker = RedisBroker([f"redis://127.0.0.1:{port}/0"], prefix="mem")
    broker.bind(_Sink())
    supervisor = Supervisor()
    await broker.start(supervisor)
    try:
        retention = Retention(size=messages, ttl=3600)
        payload = {"text": "x" * size}
        base = int(probe.info("memory")["used_memory"])
        started = time.perf_counter()
        for _ in range(messages):
            await asyncio.gather(
                *(
                    broker.publish(Publication(f"chat:r{c}", payload, 0, "", 0), retention)
                    for c in range(channels)
                )
            )
        elapsed = time.perf_counter() - started
        used = int(probe.info("memory")["used_memory"]) - base
        base = int(probe.info("memory")["used_memory"])
        for c in range(channels):
            await broker.position(f"chat:empty{c}", create=retention)
        empty = int(probe.info("memory")["used_memory"]) - base
        payload_bytes = len(Publication("c", payload, 0, "", 0).raw)
        return {
            "publishes_per_s": channels * messages / elapsed,
            "bytes_per_message": used / (channels * messages),
            "payload_bytes": payload_bytes,
            "bytes_per_empty_channel": empty / channels,
        }
    finally:
        await supervisor.close()
        await broker.close()
        probe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=80)
    args = parser.parse_args()
    redis = _start_redis(Path(tempfile.mkdtemp(prefix="plexus-bench-")), 30.0)
    try:
        result = asyncio.run(measure(redis.port, args.channels, args.messages, args.size))
    finally:
        redis.stop()
    for key, value in result.items():
        print(f"{key:>26}: {value:,.1f}")


if __name__ == "__main__":
    main()
