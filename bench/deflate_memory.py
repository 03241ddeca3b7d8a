"""Server memory per connection with permessage-deflate, for each compression setting.

    python -m bench.deflate_memory [--conns 2000]

Starts `plexus serve` (memory engine) once per case, opens `--conns`
connections over 30 loopback source addresses, has each send what the case
says, and reports the growth of the server's RSS per connection (measured with
100 connections already open, as `bench idle` does). The cases:

- compression off, idle; and after three small commands each;
- compression on, clients offering permessage-deflate: idle; after three
  compressed commands; after ten of 4 KB (the server keeps no state for it);
- `compression_client_takeover`, clients keeping their context: after three
  small commands, and after ten of 4 KB (which fill the inflater's 32 KB window).

Stops by itself; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from bench import servers

OFFER = "permessage-deflate; client_max_window_bits"


@dataclass
class Case:
    name: str
    env: dict[str, str]
    offer: bool = False
    commands: int = 0
    pad: int = 0  # random hex characters added to each command
    compress: bool = False
    takeover: bool = False  # the client keeps its compression context


ON = {"PLEXUS_COMPRESSION": "on"}
TAKEOVER = {**ON, "PLEXUS_COMPRESSION_CLIENT_TAKEOVER": "1"}
CASES = [
    Case("compression off, idle", {}),
    Case("compression off, 3 commands", {}, commands=3),
    Case("compression on, idle", ON, offer=True),
    Case("compression on, 3 compressed commands", ON, True, 3, compress=True),
    Case("compression on, 10 compressed 4 KB commands", ON, True, 10, 4096, compress=True),
    Case("client takeover, 3 compressed commands", TAKEOVER, True, 3, 0, True, True),
    Case("client takeover, 10 compressed 4 KB commands", TAKEOVER, True, 10, 4096, True, True),
]


def frame(payload: bytes, first: int) -> bytes:
    """A masked client frame with the all-zero key."""
    length = len(payload)
    if length < 126:
        head = bytes([first, 0x80 | length])
    else:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", length)
    return head + b"\x00\x00\x00\x00" + payload


async def read_frame(reader: asyncio.StreamReader) -> None:
    _, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    await reader.readexactly(length)


async def connect(port: int, case: Case, index: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(f"127.0.0.{2 + index % 30}", 0)
    )
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Extensions: {OFFER}\r\n" if case.offer else ""
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    await read_frame(reader)  # welcome
    stream = None
    for i in range(case.commands):
        pad = os.urandom(case.pad // 2).hex()
        payload = b'{"type":"ping","id":%d,"pad":"some words, and %s"}' % (i, pad.encode())
        if case.compress:
            if stream is None or not case.takeover:
                stream = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = (stream.compress(payload) + stream.flush(zlib.Z_SYNC_FLUSH))[:-4]
        writer.write(frame(payload, 0xC1 if case.compress else 0x81))
        await read_frame(reader)  # pong
    return writer


async def measure(case: Case, conns: int, log_dir: Path) -> float:
    server = servers.start("plexus", log_dir, env_extra=case.env)
    writers: list[asyncio.StreamWriter] = []
    try:
        writers += [await connect(server.port, case, i) for i in range(100)]
        await asyncio.sleep(0.5)
        before = server.rss_bytes()
        limit = asyncio.Semaphore(50)

        async def one(index: int) -> asyncio.StreamWriter:
            async with limit:
                return await connect(server.port, case, index)

        writers += await asyncio.gather(*(one(i) for i in range(conns)))
        await asyncio.sleep(1.0)
        return (server.rss_bytes() - before) / conns / 1024
    finally:
        for writer in writers:
            writer.close()
        server.stop()


async def main(conns: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            started = time.monotonic()
            per = await measure(case, conns, Path(tmp))
            took = time.monotonic() - started
            print(f"{case.name:48} {per:6.1f} KB per connection  ({took:.0f} s)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.deflate_memory", description=__doc__)
    parser.add_argument("--conns", type=int, default=2000, help="connections per case (2000)")
    asyncio.run(main(parser.parse_args().conns))
