"""The floor: the least a Python server can do for the benchmarks' protocol subset.

No validation, no limits, no history, no metrics, no output buffer: a uvloop
protocol that answers the handshake, `subscribe`, `publish` and `ping`, and
fans a publication out with one `os.write` per subscriber straight to its
socket. It is not a server anyone should run; it measures what the kernel
charges for one small write per delivery on this machine, so that Plexus's
steady fan-out figure can be read against the cost no server avoids.

Usage: python -m bench.peers.floor [PORT]   (0 = ephemeral; prints the
`listening on http://127.0.0.1:PORT` line the bench waits for).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import sys
import time
from typing import Any, cast

import orjson

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EPOCH = "floor000"


def frame(payload: bytes) -> bytes:
    """An unmasked text frame."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = bytes((0x81, 126)) + size.to_bytes(2)
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8)
    return head + payload


class Channel:
    __slots__ = ("offset", "subs")

    def __init__(self) -> None:
        self.offset = 0
        self.subs: list[Peer] = []


channels: dict[str, Channel] = {}
next_client = 0x100000000


class Peer(asyncio.Protocol):
    __slots__ = ("buf", "client", "direct", "fd", "open", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        global next_client
        self.transport = cast(asyncio.Transport, transport)
        self.fd = transport.get_extra_info("socket").fileno()
        self.buf = b""
        self.open = False
        self.direct = True  # write to the socket ourselves until a write is partial
        self.client = f"c-{next_client:x}"
        next_client += 1

    def send(self, data: bytes) -> None:
        if self.direct:
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return
            if sent == len(data):
                return
            self.direct = False
            data = data[sent:]
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            key = b""
            for line in buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.open = True
            welcome = {"type": "welcome", "client": self.client, "server": "floor"}
            self.send(frame(orjson.dumps(welcome)))
            buf = buf[end + 4 :]
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first, length = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 6
            if length >= 126:
                start += 2 if length == 126 else 8
                if end < start:
                    break
                length = int.from_bytes(buf[pos + 2 : start - 4])
            stop = start + length
            if end < stop:
                break
            opcode = first & 0x0F
            payload = apply_mask(buf[start:stop], buf[start - 4 : start])
            pos = stop
            if opcode == 8:
                self.transport.close()
                return
            if opcode in (1, 2):
                self.command(orjson.loads(payload))
        self.buf = buf[pos:]

    def command(self, cmd: Any) -> None:
        kind, ident = cmd.get("type"), cmd.get("id")
        if kind == "subscribe":
            ch = channels.setdefault(cmd["channel"], Channel())
            ch.subs.append(self)
            result = {"channel": cmd["channel"], "offset": ch.offset, "epoch": EPOCH}
            self.send(frame(orjson.dumps({"type": "reply", "id": ident, "result": result})))
        elif kind == "publish":
            ch = channels.setdefault(cmd["channel"], Channel())
            ch.offset += 1
            push = {
                "type": "message",
                "channel": cmd["channel"],
                "data": cmd.get("data"),
                "offset": ch.offset,
                "epoch": EPOCH,
                "time": time.time_ns() // 1_000_000,
                "from": {"client": self.client, "user": None},
            }
            out = frame(orjson.dumps(push))
            for sub in ch.subs:
                sub.send(out)
            reply = {"type": "reply", "id": ident, "result": {"offset": ch.offset}}
            self.send(frame(orjson.dumps(reply)))
        elif kind == "ping":
            self.send(frame(orjson.dumps({"type": "pong", "id": ident})))

    def connection_lost(self, exc: Exception | None) -> None:
        for ch in channels.values():
            if self in ch.subs:
                ch.subs.remove(self)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Peer, "127.0.0.1", port, backlog=4096)
    print(f"listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
