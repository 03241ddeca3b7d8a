"""The SQLite engine keeps every acknowledged publish across a `kill -9`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import plexus
from plexus.engines.sqlite import SqliteBroker
from plexus.models import Publication
from tests.engines.harness import keep, message
from tests.helpers import TIMEOUT

# The child publishes in waves of concurrent calls (so that group commit
# batches them) and prints "offset epoch" as soon as each publish returns.
CHILD = """
import asyncio, sys
from plexus.engines.base import Retention
from plexus.engines.sqlite import SqliteBroker
from plexus.models import Publication

RETENTION = Retention(size=int(sys.argv[2]))

async def one(broker, n):
    pub = Publication("chat:d", {"n": n, "b": bytes([n % 256])}, 0, "", 1_764_129_600_000 + n)
    await broker.publish(pub, RETENTION)
    sys.stdout.write(f"{pub.offset} {pub.epoch}\\n")
    sys.stdout.flush()

async def main():
    broker = SqliteBroker(sys.argv[1])
    await broker.start()
    n = 0
    while True:
        await asyncio.gather(*(one(broker, n + i) for i in range(8)))
        n += 8

asyncio.run(main())
"""

ACKNOWLEDGED_BEFORE_KILL = 400


def run_and_kill(data_dir: Path, size: int = 1_000_000) -> list[tuple[int, str]]:
    """Run the child until it acknowledged enough publishes, SIGKILL it, return all it printed."""
    env = dict(os.environ)
    src = str(Path(plexus.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", CHILD, str(data_dir), str(size)]
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
        # Lines the child wrote before it died are acknowledged publishes too.
        lines.extend(child.stdout.readlines())
        child.wait(TIMEOUT)
        assert child.returncode == -signal.SIGKILL
    acknowledged = []
    for line in lines:
        if line.endswith("\n"):  # a line cut by the kill was never acknowledged
            offset, epoch = line.split()
            acknowledged.append((int(offset), epoch))
    return acknowledged


async def test_acknowledged_publishes_survive_kill_9(tmp_path: Path) -> None:
    acknowledged = await asyncio.wait_for(asyncio.to_thread(run_and_kill, tmp_path), 3 * TIMEOUT)
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL
    epochs = {epoch for _, epoch in acknowledged}
    assert len(epochs) == 1
    printed = sorted(offset for offset, _ in acknowledged)
    assert printed == list(range(1, len(printed) + 1))

    broker = SqliteBroker(tmp_path)
    try:
        position = await broker.position("chat:d")
        assert position.epoch == epochs.pop()
        assert position.offset >= printed[-1]
        page = await broker.read("chat:d", since=0)
        assert page.complete
        kept = {p.offset: p.data for p in page.publications}
        for offset in printed:
            n = offset - 1  # waves are called in order, so offset n+1 carries message n
            assert kept[offset] == {"n": n, "b": bytes([n % 256])}
        following = await broker.publish(message("after", channel="chat:d"), keep(10))
        assert isinstance(following, Publication)
        assert following.offset == position.offset + 1
    finally:
        await broker.close()


async def test_a_crash_leaves_the_journal_to_the_next_open(tmp_path: Path) -> None:
    """Killed between two moves of its journal, the store moves it at the next
    open, trimmed to the retention the messages were published with."""
    size = 5
    acknowledged = await asyncio.wait_for(
        asyncio.to_thread(run_and_kill, tmp_path, size), 3 * TIMEOUT
    )
    printed = sorted(offset for offset, _ in acknowledged)
    broker = SqliteBroker(tmp_path)
    try:
        top = (await broker.position("chat:d")).offset
        assert top >= printed[-1]
        page = await broker.read("chat:d", since=0)
        assert [p.offset for p in page.publications] == list(range(top - size + 1, top + 1))
        assert [p.data for p in page.publications] == [
            {"n": n, "b": bytes([n % 256])} for n in range(top - size, top)
        ]
    finally:
        await broker.close()
