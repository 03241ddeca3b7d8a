"""Shared test helpers: one timeout unit, real server processes, small waits.

Every wait in the tests is bounded by a multiple of `TIMEOUT`; set
PLEXUS_TEST_TIMEOUT_FACTOR on a slow machine to scale them all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from websockets.frames import Frame, Opcode

TIMEOUT = 10.0 * float(os.environ.get("PLEXUS_TEST_TIMEOUT_FACTOR", "1"))
ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


class ServerProcess:
    """A real `plexus serve` in a child process, on an ephemeral loopback port.

    Args:
        args: extra command-line arguments for `plexus serve`.
        env: extra environment variables (e.g. PLEXUS_HISTORY_BACKEND).
        port: a fixed port (for restarts); 0 picks a free one.
    """

    def __init__(
        self, args: list[str] | None = None, env: Mapping[str, str] | None = None, port: int = 0
    ) -> None:
        self.args = list(args or [])
        self.env = dict(env or {})
        self.port = port
        self.scheme = "http"
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = TIMEOUT) -> ServerProcess:
        env = {**os.environ, "PLEXUS_LOG_LEVEL": "info", **self.env}
        self.lines = []
        self._ready.clear()
        cmd = [sys.executable, "-m", "plexus", "serve", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(ROOT),
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not self._ready.is_set():
                self.scheme = match.group(1)
                self.port = int(match.group(3))
                self._ready.set()
        self._ready.set()  # EOF: let start() report the failure

    def output(self) -> str:
        return "".join(self.lines)

    def _reap(self) -> None:
        if self._reader is not None:
            self._reader.join(TIMEOUT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = TIMEOUT) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout)
            self._reap()
        return status

    def pause(self) -> None:
        """SIGSTOP: the process stops running, its sockets stay open."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._reap()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll a condition that has no event to await (e.g. state in another process)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)  # sleep-ok: polls state that has no event, bounded


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, lower-case headers, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), TIMEOUT
    )
    return status, headers, body


def post_request(
    path: str, body: bytes, headers: Mapping[str, str] | None = None, *, host: str = "127.0.0.1"
) -> bytes:
    """A raw `POST` of a JSON body (head and body), for tests that send it in pieces."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send_in_parts(
    port: int, parts: list[bytes], pause: float = 0.05
) -> tuple[int, dict[str, str], bytes]:
    """Send a request in separate TCP segments, pausing between them; return the response.

    The pause makes the server see each part in its own read (asyncio sets
    TCP_NODELAY, so each part leaves at once).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, part in enumerate(parts):
            if index:
                await asyncio.sleep(pause)  # sleep-ok: split the request across reads
            writer.write(part)
            await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def metrics(base_url: str) -> dict[str, float]:
    """The server's `/metrics` samples: `{"name{labels}": value}`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def api_post(
    base_url: str, path: str, body: Any, *, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """POST JSON to the server's HTTP API; return (status, decoded JSON body)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url + path,
            json=body,
            headers=dict(headers or {}),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response,
    ):
        return response.status, await response.json()


def serve_refused(args: list[str], env: Mapping[str, str] | None = None) -> str:
    """Run `plexus serve ARGS` (environment: this one plus `env`), which must refuse
    to start: exit status 2 and one line on stderr, returned."""
    result = subprocess.run(
        [sys.executable, "-m", "plexus", "serve", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A real `redis-server` on a free loopback port, started and stopped by a test.

    `persistent=True` keeps an append-only file in `directory`, so `restart()`
    brings the data back (a restart with nothing kept is a flush).
    """

    def __init__(self, directory: Path, *, persistent: bool = False, port: int = 0) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = TIMEOUT) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.directory.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                *persistence,
                "--dir", str(self.directory),
                "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == "PONG":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)  # sleep-ok: polls a starting process, bounded

    def command(self, *args: str) -> Any:
        """Run one command with a blocking socket (no client library needed)."""
        import hiredis

        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            sock.sendall(hiredis.pack_command(args))
            reader = hiredis.Reader(encoding="utf-8")
            while (reply := reader.gets()) is False:
                data = sock.recv(65536)
                if not data:
                    raise OSError("redis closed the connection")
                reader.feed(data)
            return reply

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def parse_frame(data: bytes) -> Frame:
    """Parse one server frame with the websockets library's reader (an independent check)."""
    chunks = [data]

    def read_exact(n: int) -> Any:
        buf = chunks[0]
        chunks[0] = buf[n:]
        return buf[:n]
        yield  # pragma: no cover - makes this a generator

    gen = Frame.parse(read_exact, mask=False)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        assert chunks[0] == b"", "trailing bytes after the frame"
        frame: Frame = done.value
        return frame


# ----- raw WebSocket frames, for tests that must send what a library would not


def masked(payload: bytes, opcode: int = 0x1, *, fin: bool = True) -> bytes:
    """One client-to-server frame (masked, as RFC 6455 requires)."""
    return Frame(Opcode(opcode), payload, fin).serialize(mask=True)


def zero_masked(payload: bytes, opcode: int = 0x1, *, fin: bool = True) -> bytes:
    """A masked frame of at most 125 bytes built fast, with the all-zero mask key.

    A valid mask (RFC 6455 5.3 only asks the client to pick it), and the
    payload needs no XOR: for floods of many thousands of frames.
    """
    assert len(payload) <= 125
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + bytes(4) + payload


def upgrade_request(path: str = "/ws", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server-to-client frame (unmasked): (opcode, payload)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


async def read_message(reader: asyncio.StreamReader) -> Any:
    opcode, payload = await read_frame(reader)
    assert opcode == 0x1, (opcode, payload)
    return orjson.loads(payload)


async def open_raw_ws(
    port: int, *, buffers: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw socket past the WebSocket handshake and the `welcome`.

    `buffers`: small kernel send and receive buffers (no autotuning), so that
    a flood backs up after a few kilobytes instead of megabytes.
    """
    sock = socket.socket()
    if buffers is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert (await read_message(reader))["type"] == "welcome"
    return reader, writer


# ----- the SSE transport, read raw


class EventStream:
    """A raw SSE client: `GET /sse` read event by event, commands sent as `POST /emulation`.

    `post_url`: the node the POSTs go to (default: the stream's own), for
    tests of forwarding between nodes.
    """

    def __init__(
        self, http: aiohttp.ClientSession, url: str, *, post_url: str | None = None
    ) -> None:
        self.http = http
        self.url = url
        self.post_url = post_url or url
        self.response: aiohttp.ClientResponse | None = None
        self.welcome: dict[str, Any] = {}
        self.pings = 0  # `: ping` comments read so far
        self.ended = False

    @property
    def session(self) -> str:
        """The session the stream's `welcome` named."""
        return str(self.welcome["session"])

    async def open(self, query: str = "", headers: Mapping[str, str] | None = None) -> Any:
        """Open the stream and return its first event (the `welcome`, or a `close`)."""
        self.response = await self.http.get(
            f"{self.url}/sse{query}",
            headers={"Accept": "text/event-stream", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT),
        )
        assert self.response.status == 200, await self.response.text()
        assert self.response.headers["Content-Type"].startswith("text/event-stream")
        first = await self.event()
        if first is not None and first["type"] == "welcome":
            self.welcome = first
        return first

    async def event(self, timeout: float = TIMEOUT, *, comments: bool = False) -> Any:
        """The next event's message; None at the end.

        Comments are counted in `pings`, and returned as `{"comment": TEXT}`
        with `comments=True`.
        """
        assert self.response is not None
        async with asyncio.timeout(timeout):
            while True:
                block = await self.response.content.readuntil(b"\n\n")
                if not block.endswith(b"\n\n"):
                    assert block == b"", f"the stream ended inside an event: {block!r}"
                    self.ended = True
                    return None
                lines = block[:-2].split(b"\n")
                data = [line[6:] if line.startswith(b"data: ") else line[5:] for line in lines
                        if line.startswith(b"data:")]  # fmt: skip
                if data:
                    return orjson.loads(b"\n".join(data))
                assert all(line.startswith(b":") for line in lines), block
                self.pings += 1
                if comments:
                    return {"comment": lines[0][1:].strip().decode()}

    async def until(self, predicate: Callable[[Any], bool], timeout: float = TIMEOUT) -> Any:
        """Read events until one matches; return it (fails at the end of the stream)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.event()
                assert message is not None, "the stream ended"
                if predicate(message):
                    return message

    async def post(
        self,
        commands: list[Any],
        *,
        session: str | None = None,
        node: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """POST `commands`; (status, decoded JSON body or None for 204)."""
        body = {
            "session": self.session if session is None else session,
            "node": self.welcome.get("node") if node is None else node,
            "commands": commands,
        }
        return await self.post_raw(orjson.dumps(body), headers=headers)

    async def post_raw(
        self, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """POST a body as it is (`application/json` unless `headers` say otherwise)."""
        async with self.http.post(
            self.post_url + "/emulation",
            data=body,
            headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as response:
            text = await response.read()
            return response.status, orjson.loads(text) if text else None

    def close(self) -> None:
        """Drop the stream's connection (the server sees its reader go)."""
        if self.response is not None:
            self.response.close()


class UvicornProcess:
    """An ASGI app served by a real `uvicorn` in a child process, on a loopback port.

    The test binds the listening socket (port 0: a free port, no race) and
    hands it over with `--fd`, as a supervisor does; with `workers` > 1 every
    worker inherits it. Ready once every worker's application has started.

    Args:
        app: the uvicorn app argument, e.g. `tests.e2e.asgi_host:fastapi_app`
            (a factory: `--factory` is passed).
        env: extra environment variables (PLEXUS_* settings of the app).
        args: extra uvicorn arguments.
        workers: uvicorn's `--workers`.
        cwd: the directory the app is imported from.
    """

    def __init__(
        self,
        app: str,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        *,
        workers: int = 1,
        cwd: Path = ROOT,
    ) -> None:
        self.app = app
        self.env = dict(env or {})
        self.args = list(args or [])
        self.workers = workers
        self.cwd = cwd
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._started = 0
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = TIMEOUT) -> UvicornProcess:
        """Start, and wait until every worker started its application."""
        self.launch()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("uvicorn did not start:\n" + self.output()[-4000:])
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("uvicorn exited:\n" + self.output()[-4000:])
        return self

    def launch(self) -> UvicornProcess:
        """Start the process without waiting for it."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        env = {**os.environ, **self.env}
        cmd = [
            sys.executable, "-m", "uvicorn", "--factory", self.app,
            "--fd", str(sock.fileno()), "--workers", str(self.workers),
            "--timeout-graceful-shutdown", "3", *self.args,
        ]  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=str(self.cwd),
                pass_fds=[sock.fileno()],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                # Its own process group: `kill` reaches the workers too.
                start_new_session=True,
            )
        finally:
            sock.close()  # the child holds it now
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            if "Application startup complete" in line:
                self._started += 1
                if self._started >= self.workers:
                    self._ready.set()
        self._ready.set()  # EOF: let start() report the failure

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the process to exit by itself; return its status."""
        assert self.proc is not None
        status = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(TIMEOUT)
        return status

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = TIMEOUT) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        finally:
            self.kill()
        return status

    def kill(self) -> None:
        """SIGKILL to the supervisor and its workers (the process group it leads)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)
        if self._reader is not None:
            self._reader.join(TIMEOUT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> UvicornProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
