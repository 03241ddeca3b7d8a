"""`SqliteHistoryStore` keeps every acknowledged append across a `kill -9`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import plexus
from plexus.history.sqlite import SqliteHistoryStore

# The child appends in waves of concurrent calls (so that group commit
# batches them) and prints "offset epoch" as soon as each append returns.
CHILD = """
import asyncio, sys
from plexus.history.sqlite import SqliteHistoryStore

async def one(store, n):
    pub = await store.append("chat:d", {"n": n, "b": bytes([n % 256])},
                             time=1_764_129_600_000 + n, size=1_000_000, ttl=0)
    sys.stdout.write(f"{pub.offset} {pub.epoch}\\n")
    sys.stdout.flush()

async def main():
    store = SqliteHistoryStore(sys.argv[1])
    await store.start()
    n = 0
    while True:
        await asyncio.gather(*(one(store, n + i) for i in range(8)))
        n += 8

asyncio.run(main())
"""

ACKNOWLEDGED_BEFORE_KILL = 400


def run_and_kill(data_dir: Path) -> list[tuple[int, str]]:
    """Run the child until it acknowledged enough appends, SIGKILL it, return all it printed."""
    env = dict(os.environ)
    src = str(Path(plexus.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", CHILD, str(data_dir)]
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        while len(lines) < ACKNOWLEDGED_BEFORE_KILL:
            line = child.stdout.readline()
            if not line:
                raise AssertionError(f"child ended early: {child.stderr.read()}")
            lines.append(line)
        child.send_signal(signal.SIGKILL)
        # Lines the child wrote before it died are acknowledged appends too.
        lines.extend(child.stdout.readlines())
        child.wait()
        assert child.returncode == -signal.SIGKILL
    acknowledged = []
    for line in lines:
        if line.endswith("\n"):  # a line cut by the kill was never acknowledged
            offset, epoch = line.split()
            acknowledged.append((int(offset), epoch))
    return acknowledged


async def test_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    acknowledged = await asyncio.to_thread(run_and_kill, tmp_path)
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL
    epochs = {epoch for _, epoch in acknowledged}
    assert len(epochs) == 1
    printed = sorted(offset for offset, _ in acknowledged)
    assert printed == list(range(1, len(printed) + 1))

    store = SqliteHistoryStore(tmp_path)
    try:
        position = await store.position("chat:d")
        assert position.epoch == epochs.pop()
        assert position.offset >= printed[-1]
        page = await store.read("chat:d", since=0)
        assert page.complete
        kept = {p.offset: p.data for p in page.publications}
        for offset in printed:
            n = offset - 1  # waves are called in order, so offset n+1 carries message n
            assert kept[offset] == {"n": n, "b": bytes([n % 256])}
        following = await store.append("chat:d", "after", time=0, size=10, ttl=0)
        assert following.offset == position.offset + 1
    finally:
        await store.close()
