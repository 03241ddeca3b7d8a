"""End-to-end: a few seconds of the soak (`bench/soak_load.py`) against a real `plexus serve`.

Rounds of churn (clients that join, publish and leave, half without a close
frame), one-off channels (published, subscribed and left, unknown histories
read) and the attacks of issue 10, while bystanders check every offset of
their rooms. Nothing here is timed: what is held to account is what the
server keeps. After every round it must hold exactly what it held after the
first (its `/health` state: the node's and the engine's entries, the asyncio
tasks), and once every client is gone, as many open files and tasks as before
the first one, and no subscription anywhere. `python -m bench soak` runs the
same for minutes and measures RSS too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.soak_attacks import EXPECTED
from bench.soak_load import Plan, RoundResult, Soak

from tests.helpers import TIMEOUT, ServerProcess

REQUEST_TIMEOUT = 1.0  # the server's http_request_timeout: half-sent requests end within a round
SMALL = Plan(
    rounds=3,
    warmup=1,
    clients=40,
    rooms=2,
    messages=2,
    api_messages=5,
    prefill=0,
    published=600,
    subscribed=300,
    reads=200,
    ping_flood=2_000,
    max_body_size=65_536,
)


@pytest.mark.parametrize("engine", ["sqlite", "memory"])
async def test_a_short_soak_leaves_nothing_behind(tmp_path: Path, engine: str) -> None:
    env = {
        "PLEXUS_ENGINE": engine,
        "PLEXUS_DATA_DIR": str(tmp_path / "data"),
        "PLEXUS_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "PLEXUS_HTTP_KEEPALIVE_TIMEOUT": str(REQUEST_TIMEOUT),
        "PLEXUS_MAX_BODY_SIZE": str(SMALL.max_body_size),
    }
    with ServerProcess(env=env) as server:
        soak = Soak(server.url, server.pid, SMALL, timeout=TIMEOUT, request_timeout=REQUEST_TIMEOUT)
        before = (await soak.health())["state"]
        started = await soak.start()
        rounds: list[RoundResult] = []
        try:
            for number in range(1, SMALL.rounds + 1):
                rounds.append(await soak.round(number))
        finally:
            ended = await soak.close()
        log = server.output()
    assert started.settled
    for result in rounds:
        assert result.errors == [], result.errors
        assert result.clients == SMALL.clients
        assert result.cut == SMALL.clients // 2
        assert result.oneoffs == SMALL.oneoffs
        # Every attack ran, each with its documented answer.
        assert {outcome.split(":")[0] for outcome in result.attacks} == set(EXPECTED)
    for bystander in soak.bystanders:
        assert bystander.received >= SMALL.rounds * SMALL.api_messages
        assert bystander.presence > 0  # the churn's and the flood's join/leave reached it
    # The same state after every round as after the first: nothing grows with
    # the channels, connections and attacks the rounds went through.
    reference = rounds[0].snapshot
    assert reference is not None
    assert reference.settled
    for result in rounds[1:]:
        assert result.snapshot is not None
        assert result.snapshot.settled
        assert result.snapshot.state == reference.state, result.number
        assert result.snapshot.fds == reference.fds
    # Every client gone: no socket, task or subscription left.
    assert ended.settled, ended
    assert ended.fds == soak.baseline_fds
    assert ended.state["tasks"] == before["tasks"]
    assert not any(ended.state["node"].values()), ended.state["node"]
    held = ended.state["engine"]
    assert (held["subscribed"], held["presence_channels"]) == (0, 0)
    assert held.get("pinned", 0) == 0
    # Of the thousands of channels used, the engine still knows the rooms
    # alone (they keep history): none of the one-off channels.
    for entry in ("streams", "positions", "tops"):
        assert held.get(entry, 0) <= SMALL.rooms, (entry, held)
    assert "Traceback" not in log
