"""Load generator: worker processes holding WebSocket connections, driven by a controller.

The controller (the `python -m bench` process) stays synchronous: it sends a
command to some workers over a pipe and waits for their answers. Each worker
is a separate process running one uvloop event loop with many `WSConn`s, so
the load spreads over processes (the 20,000 open files limit is per process)
and each worker reports its own CPU time. A worker answers one command at a
time; long commands send `progress` events before their answer.

Commands (dicts with an `op`), and what they answer besides `cpu` (CPU seconds
the worker used during the command) and `t0_ns`/`t1_ns` (wall clock):
  connect   host, port, path, n, channel|None, sources, concurrency, timeout,
            stop_after_failures
            -> connected, failed, errors
  expect    count (per connection), timeout -> messages, min/max per connection,
            last_ns, latencies (array of ns, when latency)
  burst     channel, count, size, window, via (ws|http) -> published, errors, t_start_ns
  steady    channel, rate, duration, size -> published, errors
  roundtrip duration, mode (publish|ping), channel -> ops, rtts (array of ns)
  reset     latency: zero the counters, record latencies or not -> closes seen so far
  close     abort every connection
  exit      leave the loop
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import orjson

from bench.wsclient import Counters, WSConn, client_frame, connect

Reply = dict[str, Any]
# The HTTP API refuses bodies not sent as JSON (a CSRF defence).
JSON = {"Content-Type": "application/json"}
ProgressFn = Callable[[dict[int, Reply]], None]


def source_addresses(count: int, first: int = 2) -> list[str]:
    """Loopback source addresses 127.0.0.FIRST.. so many connections don't exhaust ports."""
    return [f"127.0.0.{first + i}" for i in range(count)]


def pad_for(size: int) -> str:
    """Padding that brings a `{"ts":..,"seq":..,"pad":..}` payload to about `size` bytes."""
    return "x" * max(0, size - 40)


_VOCABULARY = (
    "the a to and of I you it is in that we for on this are was with be have not "
    "at so just but can will what about do all like my your if get know one up out "
    "meeting tomorrow today lunch see great thanks ok sure sounds good morning team "
    "release deploy bug fix review please check later call now time back new build "
    "slides coffee weekend plan room link doc update done working looks nice agree"
)
_WORDS = _VOCABULARY.split()


def chat_data(seq: int) -> dict[str, Any]:
    """A chat line as the bundled chat app publishes it: a nick and 5 to 20 words.

    What compression meets in practice: short text, repeated keys, no padding.
    Seeded by `seq`, so every server is sent the same lines.
    """
    rng = random.Random(seq)
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20)))
    return {"nick": f"user{rng.randint(1, 40)}", "text": words.capitalize() + rng.choice(".!?")}


@dataclass
class PublishState:
    """Progress of one publishing command."""

    sent: int = 0
    answered: int = 0
    errors: int = 0
    first_error: str = ""

    def result(self) -> Reply:
        return {
            "published": self.answered - self.errors,
            "errors": self.errors,
            "first_error": self.first_error,
        }


class Worker:
    """The state of one worker process: its connections and counters."""

    def __init__(self, pipe: Connection, index: int) -> None:
        self.pipe = pipe
        self.index = index
        self.counters = Counters()
        self.conns: list[WSConn] = []
        self.loop = asyncio.get_running_loop()

    def send(self, msg: Reply) -> None:
        self.pipe.send(msg)

    async def run(self) -> None:
        queue: asyncio.Queue[Reply] = asyncio.Queue()

        # A thread reads the pipe: the loop's add_reader would make the pipe
        # non-blocking, and then a large answer could fail to send.
        def reader() -> None:
            while True:
                try:
                    msg = self.pipe.recv()
                except (EOFError, OSError):
                    msg = {"op": "exit"}
                self.loop.call_soon_threadsafe(queue.put_nowait, msg)
                if msg["op"] == "exit":
                    return

        threading.Thread(target=reader, daemon=True).start()
        while True:
            cmd = await queue.get()
            op = cmd["op"]
            if op == "exit":
                self.close_all()
                return
            cpu0 = time.process_time()
            t0 = time.time_ns()
            try:
                result = await getattr(self, "op_" + op)(cmd)
                result["ok"] = True
            except Exception as exc:
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            result["cpu"] = time.process_time() - cpu0
            result["t0_ns"] = t0
            result["t1_ns"] = time.time_ns()
            result["worker"] = self.index
            self.send(result)

    def progress(self, **fields: Any) -> None:
        self.send({"event": "progress", "worker": self.index, **fields})

    async def ticker(self, fn: Callable[[], None], every: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every)
            fn()

    # -- commands ----------------------------------------------------------------------

    async def op_connect(self, cmd: Reply) -> Reply:
        host, port, n = cmd["host"], cmd["port"], cmd["n"]
        channel: str | None = cmd.get("channel")
        sources: list[str] = cmd.get("sources") or [""]
        limit = asyncio.Semaphore(cmd.get("concurrency", 64))
        give_up = cmd.get("stop_after_failures", 0)
        errors: list[str] = []
        base = len(self.conns)
        done = failed = 0

        async def one(i: int) -> WSConn | None:
            nonlocal done, failed
            async with limit:
                if give_up and failed >= give_up:
                    return None
                try:
                    conn = await connect(
                        host,
                        port,
                        self.counters,
                        path=cmd.get("path", "/ws"),
                        source=sources[(base + i) % len(sources)],
                        timeout=cmd.get("timeout", 30.0),
                        deflate=cmd.get("deflate", False),
                    )
                    if channel is not None:
                        await subscribe(conn, channel)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    failed += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc!r}")
                    return None
                done += 1
                return conn

        tick = asyncio.create_task(self.ticker(lambda: self.progress(connected=done)))
        try:
            results = await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            tick.cancel()
        ok = [c for c in results if c is not None]
        self.conns.extend(ok)
        return {"connected": len(ok), "failed": n - len(ok), "errors": errors}

    async def op_reset(self, cmd: Reply) -> Reply:
        self.counters.reset()
        self.counters.latency = bool(cmd.get("latency"))
        for conn in self.conns:
            conn.count = 0
        return {"closes": dict(self.counters.closed)}

    async def op_expect(self, cmd: Reply) -> Reply:
        """Wait until every connection has counted `count` messages (since the last reset)."""
        counters = self.counters
        live = [c for c in self.conns if not c.closed]
        counters.target = cmd["count"] * len(live)
        counters.done = self.loop.create_future()
        if counters.messages >= counters.target:
            counters.done.set_result(None)
        tick = asyncio.create_task(self.ticker(lambda: self.progress(messages=counters.messages)))
        timed_out = False
        try:
            await asyncio.wait_for(counters.done, cmd["timeout"])
        except TimeoutError:
            timed_out = True
        finally:
            tick.cancel()
        counts = [c.count for c in self.conns] or [0]
        result: Reply = {
            "messages": counters.messages,
            "target": counters.target,
            "timed_out": timed_out,
            "min": min(counts),
            "max": max(counts),
            "last_ns": counters.last_ns,
            "order_errors": counters.order_errors,
            "closes": dict(counters.closed),
            "wire_bytes": counters.wire_bytes,
        }
        if counters.latency:
            result["latencies"] = counters.latencies.tobytes()
        counters.latency = False
        return result

    async def op_burst(self, cmd: Reply) -> Reply:
        """Publish `count` messages as fast as the server answers, `window` in flight."""
        if cmd.get("via") == "http":
            return await self._burst_http(cmd)
        conn = self.conns[0]
        channel, count, window = cmd["channel"], cmd["count"], cmd.get("window", 100)
        pad = pad_for(cmd.get("size", 100))
        chat = bool(cmd.get("chat"))
        done: asyncio.Future[None] = self.loop.create_future()
        state = PublishState()

        def send_next() -> None:
            seq = state.sent
            state.sent = seq + 1
            if chat:
                data = {"ts": time.time_ns(), "seq": seq, **chat_data(seq)}
            else:
                data = {"ts": time.time_ns(), "seq": seq, "pad": pad}
            conn.send_frame(
                client_frame(
                    orjson.dumps({"type": "publish", "channel": channel, "data": data, "id": seq})
                )
            )

        def on_json(msg: Any) -> None:
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind not in ("reply", "error"):
                return
            if kind == "error":
                state.errors += 1
                state.first_error = state.first_error or str(msg)
            state.answered += 1
            if state.sent < count:
                send_next()
            elif state.answered >= count and not done.done():
                done.set_result(None)

        conn.on_json = on_json
        t_start = time.time_ns()
        for _ in range(min(window, count)):
            send_next()
        tick = asyncio.create_task(self.ticker(lambda: self.progress(published=state.sent)))
        try:
            await asyncio.wait_for(done, cmd.get("timeout", 60.0))
        finally:
            tick.cancel()
            conn.on_json = None
        return {**state.result(), "t_start_ns": t_start}

    async def _burst_http(self, cmd: Reply) -> Reply:
        import aiohttp

        url = f"http://{cmd['host']}:{cmd['port']}{cmd.get('prefix', '')}/api/publish"
        channel, count, window = cmd["channel"], cmd["count"], cmd.get("window", 100)
        pad = pad_for(cmd.get("size", 100))
        state = PublishState()
        connector = aiohttp.TCPConnector(limit=min(window, 32))
        async with aiohttp.ClientSession(connector=connector) as session:

            async def runner() -> None:
                while state.sent < count:
                    seq = state.sent
                    state.sent = seq + 1
                    body = {
                        "channel": channel,
                        "data": {"ts": time.time_ns(), "seq": seq, "pad": pad},
                    }
                    async with session.post(url, data=orjson.dumps(body), headers=JSON) as resp:
                        state.answered += 1
                        if resp.status != 200:
                            state.errors += 1
                            state.first_error = state.first_error or await resp.text()
                        else:
                            await resp.read()

            t_start = time.time_ns()
            await asyncio.wait_for(
                asyncio.gather(*(runner() for _ in range(min(window, 32)))),
                cmd.get("timeout", 60.0),
            )
        return {**state.result(), "t_start_ns": t_start}

    async def op_steady(self, cmd: Reply) -> Reply:
        """Publish at a fixed rate for `duration` seconds (absolute schedule, no drift)."""
        conn = self.conns[0]
        channel, rate, duration = cmd["channel"], cmd["rate"], cmd["duration"]
        pad = pad_for(cmd.get("size", 100))
        total = int(rate * duration)
        state = PublishState()
        answered: asyncio.Future[None] = self.loop.create_future()

        def on_json(msg: Any) -> None:
            if isinstance(msg, dict) and msg.get("type") in ("reply", "error"):
                state.answered += 1
                if msg["type"] == "error":
                    state.errors += 1
                    state.first_error = state.first_error or str(msg)
                if state.answered >= total and not answered.done():
                    answered.set_result(None)

        conn.on_json = on_json
        start = time.monotonic()
        tick = asyncio.create_task(self.ticker(lambda: self.progress(published=state.answered)))
        try:
            for seq in range(total):
                delay = start + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                data = {"ts": time.time_ns(), "seq": seq, "pad": pad}
                msg = {"type": "publish", "channel": channel, "data": data, "id": seq}
                conn.send_frame(client_frame(orjson.dumps(msg)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered, 10.0)
        finally:
            tick.cancel()
            conn.on_json = None
        return state.result()

    async def op_roundtrip(self, cmd: Reply) -> Reply:
        """Each connection sends a command, waits for its answer, and repeats."""
        duration, mode = cmd["duration"], cmd.get("mode", "publish")
        prefix = cmd.get("channel", "bench:rt")
        pad = pad_for(cmd.get("size", 100))
        rtts = array("q")
        stop_at = time.monotonic() + duration
        pending = len(self.conns)
        done: asyncio.Future[None] = self.loop.create_future()
        errors = [0]

        def make(conn: WSConn, index: int) -> Callable[[], None]:
            channel = f"{prefix}.{self.index}.{index}"
            seq = [0]
            sent_at = [0]

            def send() -> None:
                seq[0] += 1
                if mode == "ping":
                    payload = orjson.dumps({"type": "ping", "id": seq[0]})
                else:
                    data = {"ts": time.time_ns(), "seq": seq[0], "pad": pad}
                    payload = orjson.dumps(
                        {"type": "publish", "channel": channel, "data": data, "id": seq[0]}
                    )
                sent_at[0] = time.perf_counter_ns()
                conn.send_frame(client_frame(payload))

            def on_json(msg: Any) -> None:
                nonlocal pending
                if not isinstance(msg, dict) or msg.get("id") != seq[0]:
                    return
                rtts.append(time.perf_counter_ns() - sent_at[0])
                if msg.get("type") == "error":
                    errors[0] += 1
                if time.monotonic() < stop_at:
                    send()
                else:
                    pending -= 1
                    if pending == 0 and not done.done():
                        done.set_result(None)

            conn.on_json = on_json
            return send

        starters = [make(conn, i) for i, conn in enumerate(self.conns)]
        for start in starters:
            start()
        tick = asyncio.create_task(self.ticker(lambda: self.progress(ops=len(rtts))))
        try:
            await asyncio.wait_for(done, duration + 10.0)
        finally:
            tick.cancel()
            for conn in self.conns:
                conn.on_json = None
        return {"ops": len(rtts), "errors": errors[0], "rtts": rtts.tobytes()}

    async def op_close(self, cmd: Reply) -> Reply:
        n = len(self.conns)
        self.close_all()
        return {"closed": n}

    def close_all(self) -> None:
        for conn in self.conns:
            conn.abort()
        self.conns = []


async def subscribe(conn: WSConn, channel: str, timeout: float = 10.0) -> None:
    """Subscribe `conn` to `channel` and wait for the reply."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_json(msg: Any) -> None:
        if isinstance(msg, dict) and msg.get("id") == 1 and not answer.done():
            answer.set_result(msg)

    conn.on_json = on_json
    conn.send_json({"type": "subscribe", "channel": channel, "id": 1})
    try:
        msg = await asyncio.wait_for(answer, timeout)
    finally:
        conn.on_json = None
    if msg.get("type") != "reply":
        raise ConnectionError(f"subscribe refused: {msg}")
    # Only pushes of the channel follow: compressed ones are counted, not inflated.
    conn.subscribed = True


def worker_main(pipe: Connection, index: int, cpus: list[int] | None) -> None:
    """Entry point of a worker process."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass

    async def main() -> None:
        await Worker(pipe, index).run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


class LoadGen:
    """The controller's handle on a pool of worker processes."""

    def __init__(self, n_workers: int, cpus: list[int] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, i, cpus), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.pipes)

    def call(
        self,
        cmds: dict[int, Reply],
        timeout: float,
        progress: ProgressFn | None = None,
    ) -> dict[int, Reply]:
        """Send `cmds[worker]` to each worker and return their answers by worker index.

        Raises RuntimeError if a worker fails or does not answer within `timeout`.
        """
        for index, cmd in cmds.items():
            self.pipes[index].send(cmd)
        answers: dict[int, Reply] = {}
        latest: dict[int, Reply] = {}
        deadline = time.monotonic() + timeout
        waiting = {self.pipes[i]: i for i in cmds}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers {sorted(waiting.values())} did not answer in time")
            for pipe in wait(list(waiting), min(left, 0.5)):
                assert isinstance(pipe, Connection)
                try:
                    msg = pipe.recv()
                except EOFError:
                    raise RuntimeError(f"worker {waiting[pipe]} died") from None
                index = waiting[pipe]
                if msg.get("event") == "progress":
                    latest[index] = msg
                    if progress is not None:
                        progress(latest)
                    continue
                if not msg.get("ok"):
                    raise RuntimeError(f"worker {index}: {msg.get('error')}")
                answers[index] = msg
                del waiting[pipe]
        return answers

    def all(self, cmd: Reply, timeout: float, workers: Iterable[int] | None = None) -> list[Reply]:
        """Send the same command to several workers (all by default)."""
        ids = list(workers) if workers is not None else list(range(len(self)))
        return list(self.call({i: dict(cmd) for i in ids}, timeout).values())

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send({"op": "exit"})
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for pipe in self.pipes:
            pipe.close()


def split(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` near-equal non-negative integers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def ns_array(blobs: Sequence[bytes]) -> array[int]:
    """Concatenate `array('q').tobytes()` blobs from several workers."""
    out = array("q")
    for blob in blobs:
        out.frombytes(blob)
    return out


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
