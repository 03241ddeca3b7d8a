"""The soak's core: rounds of churn, one-off channels and attacks against one server,
while bystanders check that they receive every message of their rooms in order.

`bench/soak.py` runs it for minutes against a `plexus serve` it starts and
measures the process (RSS, open files); `tests/e2e/test_soak.py` runs a few
seconds of it in `make test`. Everything here talks to 127.0.0.0/8 only and
bounds every wait by `Soak.timeout`.

What one round does, all at once:

* **churn**: `clients` anonymous clients connect (from 127.0.0.2-9), subscribe
  to one of the `rooms` (`chat:` channels: presence, join/leave, history),
  publish `messages` each, and leave: half with a close frame, half by cutting
  the TCP connection with none (a crashed client).
* **one-off channels**: `published` channels that nobody subscribes to get a
  message through the HTTP API (mostly `/api/broadcast`, some `/api/publish`);
  `subscribed` channels of the default namespace (no history) are subscribed
  and left; `reads` unknown `chat:` channels are asked for their `history`.
  None of them may leave state behind.
* **attacks** from issue 10, once each (`bench/soak_attacks.py`): a ping
  flood from a client that reads late, a join/leave flood and a publish flood
  into a bystander's room, a message in endless empty fragments, idle and
  half-sent HTTP requests, API bodies that are oversized (declared and
  chunked), trickled, truncated or never finished. Each must get its
  documented answer.
* **bystanders**, one per room, stay connected through every round; the API
  publishes `api_messages` into each room per round. After the round each
  bystander must hold every offset of its room up to the room's top, with no
  gap, duplicate or reordering, and still be connected.

After the round, `settle` waits until only the bystanders' sockets are open in
the server process and returns the server's `/health` `state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.soak_attacks import (
    PAD,
    Attacks,
    connect,
    read_response,
    request_head,
    welcome,
)

ROOM_PREFIX = "chat:soak-"
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
BROADCAST_BATCH = 500  # channels per /api/broadcast (the API takes up to 1000)
# subscribe, unsubscribe and history draw on one bucket of `subscribe_burst`
# (300 by default): a one-off worker connection sends fewer, then closes.
WORKER_BUDGET = 290


@dataclass(frozen=True)
class Plan:
    """How much one soak does. Sizes are per round unless said otherwise."""

    rounds: int = 60
    warmup: int = 5  # rounds before the reference state and RSS are taken
    clients: int = 500  # churn clients
    rooms: int = 4  # chat rooms, one bystander each
    messages: int = 2  # publishes per churn client
    api_messages: int = 25  # API publishes per room
    prefill: int = 1000  # messages per room before the first round (history at its cap)
    published: int = 20_000  # one-off channels published through the API
    subscribed: int = 6_000  # one-off channels subscribed and left
    reads: int = 4_000  # history reads of unknown chat channels
    attacks: bool = True
    ping_flood: int = 20_000  # pings per ping flood
    max_body_size: int = 65_536  # the server's, for the oversized bodies

    @property
    def oneoffs(self) -> int:
        """One-off channels per round."""
        return self.published + self.subscribed + self.reads


FULL = Plan()
QUICK = Plan(
    rounds=6,
    warmup=1,
    clients=150,
    published=8_000,
    subscribed=2_000,
    reads=1_000,
    ping_flood=5_000,
)


def open_fds(pid: int) -> int:
    """How many file descriptors process `pid` holds (sockets, files, epoll...)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cut(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Cut the TCP connection under `ws` with no close frame, like a crashed client
    (as `drop()` in tests/e2e/test_recovery.py)."""
    sock = ws.get_extra_info("socket")
    if sock is None:
        return
    # uvloop's transport socket has no shutdown(): act on a duplicate of its
    # descriptor (options and shutdown belong to the socket, not the descriptor).
    with contextlib.suppress(OSError), socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
        dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        dup.shutdown(socket.SHUT_RDWR)


# ----- bystanders


class Bystander:
    """A client that stays subscribed to one room and checks its message offsets."""

    def __init__(self, room: str, ws: aiohttp.ClientWebSocketResponse, start: int) -> None:
        self.room = room
        self.ws = ws
        self.start = start  # the room's offset when it subscribed
        self.last = start
        self.received = 0
        self.presence = 0  # join/leave pushes
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read(), name=f"bystander {room}")

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            push = orjson.loads(msg.data)
            kind = push.get("type")
            if kind == "message" and push.get("channel") == self.room:
                offset = push["offset"]
                if offset != self.last + 1:
                    self.errors.append(f"{self.room}: offset {offset} after {self.last}")
                self.last = offset
                self.received += 1
                self._changed.set()
            elif kind in ("join", "leave"):
                self.presence += 1
            elif kind in ("unsubscribed", "error"):
                self.errors.append(f"{self.room}: {push}")
        self.errors.append(f"{self.room}: bystander closed with {self.ws.close_code}")
        self._changed.set()

    async def reach(self, top: int, timeout: float) -> None:
        """Wait until the bystander received offset `top` (or fail with an error noted)."""
        try:
            async with asyncio.timeout(timeout):
                while self.last < top and not self.task.done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            self.errors.append(f"{self.room}: at offset {self.last}, top {top}")
        if self.last != top:
            self.errors.append(f"{self.room}: bystander at {self.last}, room top {top}")
        elif self.received != top - self.start:
            self.errors.append(f"{self.room}: {self.received} received, {top - self.start} sent")

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class Snapshot:
    """The server between rounds: its `/health` state and open file descriptors."""

    state: dict[str, Any]
    fds: int
    settled: bool


@dataclass
class RoundResult:
    """What a round did and what went wrong."""

    number: int
    seconds: float = 0.0
    clients: int = 0
    cut: int = 0  # clients that left without a close frame
    messages: int = 0  # acknowledged publishes into the rooms
    oneoffs: int = 0
    attacks: Counter[str] = field(default_factory=Counter)  # "attack: outcome" -> count
    errors: list[str] = field(default_factory=list)
    snapshot: Snapshot | None = None


class Soak:
    """Drives one running server through rounds.

    Args:
        url: the server's base URL (`http://127.0.0.1:PORT`).
        pid: the server's process id (its open files are counted).
        plan: sizes.
        timeout: bound of every single wait (a round waits a few of them at most).
        request_timeout: the server's `http_request_timeout` (half-sent
            requests are closed after it).
    """

    def __init__(
        self, url: str, pid: int, plan: Plan, *, timeout: float = 10.0, request_timeout: float = 2.0
    ) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.ws_url = url.replace("http", "ws", 1) + "/ws"
        self.pid = pid
        self.plan = plan
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.rooms = [f"{ROOM_PREFIX}{k}" for k in range(plan.rooms)]
        self.bystanders: list[Bystander] = []
        self.baseline_fds = 0
        self.acked: dict[str, list[int]] = {room: [] for room in self.rooms}
        self.errors: list[str] = []
        self._sessions: list[aiohttp.ClientSession] = []
        self._api: aiohttp.ClientSession | None = None

    # ----- lifecycle

    async def start(self) -> Snapshot:
        """Count the idle server's open files, connect the bystanders, fill the rooms."""
        self.baseline_fds = open_fds(self.pid)
        # No keep-alive on API calls: each socket closes with its response, so
        # the server's open files tell what the round left behind.
        self._api = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        for source in SOURCES:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
            self._sessions.append(aiohttp.ClientSession(connector=connector))
        for room in self.rooms:
            ws = await connect(self._sessions[0], self.ws_url, self.timeout)
            await self._welcome(ws)
            reply = await self._ask(ws, {"type": "subscribe", "id": 1, "channel": room})
            self.bystanders.append(Bystander(room, ws, reply["result"]["offset"]))
        sem = asyncio.Semaphore(16)

        async def fill(n: int) -> None:
            async with sem:
                await self._api_post("/api/broadcast", {"channels": self.rooms, "data": {"n": n}})

        await asyncio.gather(*(fill(n) for n in range(self.plan.prefill)))
        return await self.settle()

    async def close(self) -> Snapshot:
        """Disconnect the bystanders; return the server's state once they are gone."""
        for bystander in self.bystanders:
            await bystander.close()
        snapshot = await self.settle(peers=0)
        for session in self._sessions:
            await session.close()
        if self._api is not None:
            await self._api.close()
        return snapshot

    # ----- one round

    async def round(self, number: int) -> RoundResult:
        """Run one round (everything at once), then wait for its traces to go away."""
        result = RoundResult(number)
        started = time.monotonic()
        work: list[Awaitable[None]] = [
            self._churn(number, result),
            self._oneoffs(number, result),
            self._api_messages(result),
        ]
        if self.plan.attacks:
            work.append(self._attacks(number, result))
        outcomes = await asyncio.gather(*work, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                result.errors.append(f"round {number}: {type(outcome).__name__}: {outcome}")
        await self._check_bystanders(result)
        result.snapshot = await self.settle()
        if not result.snapshot.settled:
            result.errors.append(
                f"round {number}: not quiet: {result.snapshot.fds} open files"
                f" (expected {self.baseline_fds + len(self.bystanders)}),"
                f" node {result.snapshot.state.get('node')}"
            )
        result.seconds = time.monotonic() - started
        self.errors.extend(result.errors)
        return result

    async def _check_bystanders(self, result: RoundResult) -> None:
        for bystander in self.bystanders:
            _, page = await self._api_post("/api/history", {"channel": bystander.room, "limit": 0})
            top = page["offset"]
            await bystander.reach(top, self.timeout)
            acked = self.acked[bystander.room]
            if acked and (min(acked) <= bystander.start or max(acked) > top):
                result.errors.append(f"{bystander.room}: acknowledged offsets outside the stream")
            if len(set(acked)) != len(acked):
                result.errors.append(f"{bystander.room}: an offset acknowledged twice")
            result.errors.extend(bystander.errors)
            bystander.errors.clear()

    async def settle(self, peers: int | None = None) -> Snapshot:
        """Wait until the server holds only the bystanders' connections (or `peers`)
        and their sockets; return its state then (`settled` False if it never did)."""
        want_peers = len(self.bystanders) if peers is None else peers
        want_fds = self.baseline_fds + want_peers
        # Half-sent requests are closed by the server after `http_request_timeout`.
        deadline = time.monotonic() + self.timeout + self.request_timeout
        while True:
            await self._sync()
            state = (await self.health())["state"]
            fds = open_fds(self.pid)
            if state["node"]["peers"] == want_peers and fds == want_fds:
                return Snapshot(state, fds, True)
            if time.monotonic() > deadline:
                return Snapshot(state, fds, False)
            await asyncio.sleep(0.05)  # sleep-ok: polls another process's state, bounded

    async def _sync(self) -> None:
        """A history read through the API: it goes through the SQLite writer's queue,
        so the subscribes and unsubscribes queued before it (not awaited by the
        server) are applied when it returns, and `/health` reports them."""
        body = orjson.dumps({"channel": "chat:soak-sync", "limit": 0})
        head = request_head(
            "POST",
            "/api/history",
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "Connection": "close",
            },
        )
        await self._closed_request(head + body)

    async def _closed_request(self, request: bytes) -> tuple[int, bytes]:
        """One request on a socket of its own, returned once the server has closed it
        (`Connection: close`: its EOF is the server's close), so it is not counted."""
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(request)
                status, body = await read_response(reader)
                await reader.read()  # until the server's FIN
            finally:
                writer.close()
        if status != 200:
            raise RuntimeError(f"{request[:20]!r} answered {status}")
        return status, body

    async def health(self) -> dict[str, Any]:
        """`GET /health` (on a socket the server has closed when this returns)."""
        _, body = await self._closed_request(
            request_head("GET", "/health", {"Connection": "close"})
        )
        health: dict[str, Any] = orjson.loads(body)
        return health

    # ----- helpers

    async def _welcome(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await welcome(ws, self.timeout)

    async def _ask(self, ws: aiohttp.ClientWebSocketResponse, command: dict[str, Any]) -> Any:
        """Send `command` and return its answer (pushes before it are skipped)."""
        await ws.send_bytes(orjson.dumps(command))
        async with asyncio.timeout(self.timeout):
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"closed ({ws.close_code}) before the answer")
                answer = orjson.loads(msg.data)
                if answer.get("id") == command["id"]:
                    if answer["type"] == "error":
                        raise RuntimeError(f"{command['type']}: {answer['code']}")
                    return answer

    async def _api_post(self, path: str, body: Any) -> tuple[int, Any]:
        assert self._api is not None
        async with self._api.post(
            self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"{path}: {response.status} {answer}")
            return response.status, answer

    # ----- churn

    async def _churn(self, number: int, result: RoundResult) -> None:
        sem = asyncio.Semaphore(64)  # handshakes in flight

        async def one(i: int) -> None:
            async with sem:
                await self._churn_client(number, i, result)

        outcomes = await asyncio.gather(
            *(one(i) for i in range(self.plan.clients)), return_exceptions=True
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            result.errors.append(f"churn: {len(failed)} clients failed, first: {failed[0]!r}")

    async def _churn_client(self, number: int, i: int, result: RoundResult) -> None:
        room = self.rooms[i % len(self.rooms)]
        session = self._sessions[i % len(self._sessions)]
        ws = await connect(session, self.ws_url, self.timeout)
        try:
            await self._welcome(ws)
            await self._ask(ws, {"type": "subscribe", "id": 0, "channel": room, "info": {"n": i}})
            for k in range(self.plan.messages):
                data = {"round": number, "client": i, "k": k, "pad": PAD}
                reply = await self._ask(
                    ws, {"type": "publish", "id": k + 1, "channel": room, "data": data}
                )
                self.acked[room].append(reply["result"]["offset"])
                result.messages += 1
            if i % 5 == 0:
                await self._ask(ws, {"type": "presence", "id": "p", "channel": room})
                await self._ask(ws, {"type": "history", "id": "h", "channel": room, "limit": 5})
            result.clients += 1
            if i % 2:
                cut(ws)
                result.cut += 1
        finally:
            await ws.close()

    # ----- one-off channels

    async def _api_messages(self, result: RoundResult) -> None:
        for n in range(self.plan.api_messages):
            for room in self.rooms:
                _, answer = await self._api_post(
                    "/api/publish", {"channel": room, "data": {"api": n, "pad": PAD}}
                )
                self.acked[room].append(answer["offset"])
                result.messages += 1

    async def _oneoffs(self, number: int, result: RoundResult) -> None:
        plan = self.plan
        names = [f"soak.pub.{number}.{i}" for i in range(plan.published)]
        singles, batched = names[::100], [n for k, n in enumerate(names) if k % 100]
        stray: list[int] = []
        for name in singles:
            _, answer = await self._api_post("/api/publish", {"channel": name, "data": 1})
            stray.append(answer["offset"])
        for start in range(0, len(batched), BROADCAST_BATCH):
            chunk = batched[start : start + BROADCAST_BATCH]
            _, answer = await self._api_post("/api/broadcast", {"channels": chunk, "data": 1})
            stray.extend(r["offset"] for r in answer["results"])
        # Nobody listens and nothing is kept: each publish starts a new stream at 1.
        if set(stray) != {1}:
            result.errors.append(f"one-off publishes kept state: offsets {sorted(set(stray))}")
        jobs: list[tuple[str, str]] = [
            ("sub", f"soak.sub.{number}.{i}") for i in range(plan.subscribed)
        ]
        jobs += [("history", f"chat:soak-unknown.{number}.{i}") for i in range(plan.reads)]
        chunks: list[list[tuple[str, str]]] = [[]]
        cost = 0
        for job in jobs:
            weight = 2 if job[0] == "sub" else 1
            if cost + weight > WORKER_BUDGET:
                chunks.append([])
                cost = 0
            chunks[-1].append(job)
            cost += weight
        sem = asyncio.Semaphore(8)

        async def worker(k: int, chunk: list[tuple[str, str]]) -> None:
            async with sem:
                await self._oneoff_worker(self._sessions[k % len(self._sessions)], chunk, result)

        await asyncio.gather(*(worker(k, c) for k, c in enumerate(chunks) if c))
        result.oneoffs += len(names) + len(jobs)

    async def _oneoff_worker(
        self, session: aiohttp.ClientSession, jobs: list[tuple[str, str]], result: RoundResult
    ) -> None:
        """Pipeline every command of `jobs` on one connection, then check every answer."""
        ws = await connect(session, self.ws_url, self.timeout)
        try:
            await self._welcome(ws)
            sent = 0
            for kind, name in jobs:
                if kind == "sub":
                    for verb in ("subscribe", "unsubscribe"):
                        await ws.send_bytes(
                            orjson.dumps({"type": verb, "id": sent, "channel": name})
                        )
                        sent += 1
                else:
                    command = {"type": "history", "id": sent, "channel": name, "limit": 10}
                    await ws.send_bytes(orjson.dumps(command))
                    sent += 1
            answered = 0
            async with asyncio.timeout(self.timeout):
                while answered < sent:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise ConnectionError(f"one-off worker closed with {ws.close_code}")
                    answer = orjson.loads(msg.data)
                    if "id" not in answer:
                        continue
                    answered += 1
                    if answer["type"] == "error":
                        result.errors.append(f"one-off: {answer['code']}: {answer['message']}")
                    elif "messages" in answer["result"] and (
                        answer["result"]["messages"] or answer["result"]["epoch"]
                    ):
                        result.errors.append(f"history of an unknown channel: {answer['result']}")
        finally:
            await ws.close()

    # ----- attacks

    async def _attacks(self, number: int, result: RoundResult) -> None:
        def acked(room: str, offset: int) -> None:
            self.acked[room].append(offset)
            result.messages += 1

        attacks = Attacks(
            self.port,
            self._sessions[-1],
            timeout=self.timeout,
            request_timeout=self.request_timeout,
            pings=self.plan.ping_flood,
            max_body_size=self.plan.max_body_size,
            acked=acked,
        )
        outcomes, errors = await attacks.run(self.rooms[number % len(self.rooms)])
        result.attacks.update(outcomes)
        result.errors.extend(errors)
