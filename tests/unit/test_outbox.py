"""The bounded outbox, with a fake transport and a real (idle) event loop."""

from __future__ import annotations

import asyncio

from plexus.outbox import PONG_RUN, Flusher, Outbox


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.unsent = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.unsent += len(data)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing


async def test_frames_of_one_iteration_leave_in_one_write() -> None:
    transport = FakeTransport()
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 1000, flusher, lambda: None)
    for i in range(5):
        assert outbox.push(b"f%d" % i)
    assert transport.writes == []
    flusher.flush()
    assert transport.writes == [b"f0f1f2f3f4"]
    assert flusher.bytes_written == 10


async def test_overflow_reported_once_and_never_over_limit() -> None:
    transport = FakeTransport()
    overflows: list[int] = []
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 100, flusher, lambda: overflows.append(1))
    assert outbox.push(b"x" * 60)
    flusher.flush()  # 60 bytes now unsent in the transport
    assert outbox.push(b"y" * 40)  # exactly the limit
    assert not outbox.push(b"z")
    assert not outbox.push(b"z")
    assert overflows == [1]
    assert outbox.peak == 100
    flusher.flush()
    assert transport.writes == [b"x" * 60]  # the queue was dropped on overflow


async def test_drained_transport_is_not_mistaken_for_a_slow_consumer() -> None:
    transport = FakeTransport()
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 100, flusher, lambda: None)
    outbox.push(b"x" * 90)
    flusher.flush()
    transport.unsent = 0  # the kernel took it all
    assert outbox.push(b"y" * 50)  # a stale 90 would have refused this
    assert not outbox.overflowed


async def test_nothing_is_written_to_a_closing_transport() -> None:
    transport = FakeTransport()
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 100, flusher, lambda: None)
    outbox.push(b"late")
    transport.closing = True
    flusher.flush()
    assert transport.writes == []


async def test_past_a_run_of_pongs_the_last_one_is_replaced() -> None:
    transport = FakeTransport()
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 10_000, flusher, lambda: None)
    for i in range(PONG_RUN + 5):
        assert outbox.push_pong(b"P%02d" % i)
    # The first PONG_RUN - 1 answered each, the last place answers the latest ping.
    last = b"P%02d" % (PONG_RUN + 4)
    expected = b"".join(b"P%02d" % i for i in range(PONG_RUN - 1)) + last
    assert outbox.buffered == len(expected)
    assert outbox.push(b"data")
    assert outbox.push_pong(b"Q1")  # a new run behind other frames
    flusher.flush()
    assert transport.writes == [expected + b"data" + b"Q1"]
    assert outbox.push_pong(b"Q2")  # the last one left: a new run
    flusher.flush()
    assert transport.writes[-1] == b"Q2"


async def test_pongs_count_against_the_limit() -> None:
    transport = FakeTransport()
    overflows: list[int] = []
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 10, flusher, lambda: overflows.append(1))
    accepted = []
    for _ in range(5):  # the peer reads nothing: each pong stays in the transport
        accepted.append(outbox.push_pong(b"pong"))
        flusher.flush()
    assert accepted == [True, True, False, False, False]
    assert overflows == [1]
    assert transport.unsent == 8
