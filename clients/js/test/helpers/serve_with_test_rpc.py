"""A real Plexus server for the node tests, with test-only rpc methods.

`plexus serve` offers no way to make the server end a live subscription with
`insufficient_state` (it does so only when it loses track of a channel's
stream, e.g. a Redis outage). This embeds the same `Server` and adds an rpc
method that does it to the calling connection, so the node tests can drive
that path over a real socket.

Usage: python serve_with_test_rpc.py PORT (0 picks a free one); prints
"listening on http://127.0.0.1:PORT"; stops with 1001 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from plexus.app import Server
from plexus.config import Settings
from plexus.node import RpcCall


async def main(port: int) -> None:
    server = Server(Settings(port=port, history_backend="memory", publish_rate=0.0))

    @server.rpc("test.insufficient_state")
    async def insufficient_state(call: RpcCall) -> Any:
        # The caller's own connection ends its subscription to `channel`, as
        # the server does when it can no longer promise a gap-free stream.
        assert server.node is not None
        conn: Any = server.node.peers[call.client]
        return await conn.end_subscription(
            call.data["channel"], "insufficient_state", resubscribe=True
        )

    await server.start()
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
