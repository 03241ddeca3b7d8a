"""The bounded outbox, with a fake transport and a real (idle) event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import cast

import pytest

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


class CountingTransport(FakeTransport):
    """Counts how often the outbox asks for the buffer size (a call per write would cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def get_write_buffer_size(self) -> int:
        self.asked += 1
        return super().get_write_buffer_size()


class RecordingLoop:
    """Stands in for the event loop: records the callbacks scheduled with call_soon."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], object]] = []

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.scheduled.append(callback)


def recording_flusher() -> tuple[Flusher, RecordingLoop]:
    loop = RecordingLoop()
    return Flusher(cast(asyncio.AbstractEventLoop, loop)), loop


async def test_frames_leave_at_the_end_of_the_loop_iteration() -> None:
    transport = FakeTransport()
    outbox = Outbox(transport, 1000, Flusher(asyncio.get_running_loop()), lambda: None)
    outbox.push(b"a")
    outbox.push(b"b")
    assert transport.writes == []
    await asyncio.sleep(0)  # sleep-ok: lets the loop run the flush it scheduled
    assert transport.writes == [b"ab"]


def test_one_flush_callback_per_iteration_for_all_outboxes() -> None:
    flusher, loop = recording_flusher()
    transports = [FakeTransport() for _ in range(3)]
    outboxes = [Outbox(t, 1000, flusher, lambda: None) for t in transports]
    for outbox in outboxes:
        outbox.push(b"x")
        outbox.push(b"y")
    assert loop.scheduled == [flusher.flush]
    flusher.flush()
    assert [t.writes for t in transports] == [[b"xy"]] * 3
    assert flusher.bytes_written == 6
    # The next iteration schedules its own flush, and the count adds up.
    outboxes[0].push(b"z")
    assert loop.scheduled == [flusher.flush, flusher.flush]
    flusher.flush()
    assert flusher.bytes_written == 7
    assert transports[0].writes == [b"xy", b"z"]


def test_flusher_skips_an_outbox_emptied_meanwhile() -> None:
    flusher, _ = recording_flusher()
    first, second = FakeTransport(), FakeTransport()
    early = Outbox(first, 1000, flusher, lambda: None)
    late = Outbox(second, 1000, flusher, lambda: None)
    early.push(b"close")
    late.push(b"data")
    early.write_now(b"!")  # flushes `early` itself, before the flusher runs
    flusher.flush()
    assert first.writes == [b"close", b"!"]
    assert second.writes == [b"data"]
    assert flusher.bytes_written == 4


def test_queue_starts_empty_and_refills_after_each_flush() -> None:
    flusher, _ = recording_flusher()
    transport = FakeTransport()
    outbox = Outbox(transport, 100, flusher, lambda: None)
    assert (outbox.peak, outbox.overflowed, outbox.buffered) == (0, False, 0)
    assert outbox.push(b"x" * 100)  # exactly the limit fits an empty outbox
    assert outbox.peak == 100
    flusher.flush()
    transport.unsent = 0
    for round_ in range(2):
        outbox.push(b"a")
        outbox.push(b"b")
        flusher.flush()
        assert transport.writes[-1] == b"ab", round_
    assert outbox.buffered == transport.unsent


def test_unsent_bytes_add_up_across_writes() -> None:
    flusher, _ = recording_flusher()
    transport = CountingTransport()
    outbox = Outbox(transport, 100, flusher, lambda: None)
    for size in (30, 30, 30):  # each flushed; the kernel takes nothing
        assert outbox.push(b"x" * size)
        flusher.flush()
    assert transport.asked == 0  # far from the limit: the transport is not asked
    assert not outbox.push(b"y" * 20)  # 90 unsent + 20 > 100
    assert outbox.overflowed


def test_queued_bytes_add_up_before_a_flush() -> None:
    flusher, _ = recording_flusher()
    outbox = Outbox(FakeTransport(), 100, flusher, lambda: None)
    for _ in range(3):
        assert outbox.push(b"x" * 30)
    assert outbox.peak == 90
    assert not outbox.push(b"x" * 30)


def test_limit_is_checked_against_a_fresh_size_once_reached() -> None:
    flusher, _ = recording_flusher()
    transport = CountingTransport()
    outbox = Outbox(transport, 100, flusher, lambda: None)
    outbox.push(b"x" * 90)
    flusher.flush()
    assert outbox.push(b"y" * 10)  # exactly the limit by the bound: not asked
    flusher.flush()
    assert transport.asked == 0
    transport.unsent = 60  # the kernel took some
    assert outbox.push(b"z" * 40)  # the bound says 140: ask, and 60 + 40 fits exactly
    assert transport.asked == 1
    assert not outbox.overflowed


def test_overflow_drops_the_queue() -> None:
    flusher, _ = recording_flusher()
    transport = FakeTransport()
    outbox = Outbox(transport, 10, flusher, lambda: None)
    outbox.push(b"x" * 8)
    assert not outbox.push(b"y" * 8)
    assert outbox.buffered == 0  # nothing queued, nothing in the transport
    flusher.flush()
    assert transport.writes == []


def test_flush_writes_the_queue_once_and_counts_it() -> None:
    flusher, _ = recording_flusher()
    transport = FakeTransport()
    outbox = Outbox(transport, 100, flusher, lambda: None)
    assert outbox.flush() == 0  # nothing queued
    outbox.push(b"ab")
    outbox.push(b"cd")
    assert outbox.flush() == 4
    assert outbox.flush() == 0
    assert transport.writes == [b"abcd"]
    flusher.flush()  # already written: nothing again
    assert transport.writes == [b"abcd"]
    # Nothing stays queued after a flush: once drained, the whole limit is free.
    transport.unsent = 0
    assert outbox.push(b"g" * 100)
    outbox.flush()
    transport.unsent = 4
    # What it wrote counts as unsent until the transport says otherwise.
    outbox.push(b"e" * 90)
    assert outbox.flush() == 90
    assert not outbox.push(b"f" * 7)  # 4 + 90 + 7 > 100


def test_flush_and_write_now_write_nothing_to_a_closing_transport() -> None:
    flusher, _ = recording_flusher()
    transport = FakeTransport()
    outbox = Outbox(transport, 100, flusher, lambda: None)
    outbox.push(b"late")
    transport.closing = True
    assert outbox.flush() == 0
    outbox.write_now(b"close")
    assert transport.writes == []
    transport.closing = False
    outbox.write_now(b"pong")
    assert transport.writes == [b"pong"]  # the queue was dropped with the closing transport


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


async def test_a_replaced_pong_is_counted_at_its_own_size() -> None:
    transport = FakeTransport()
    flusher = Flusher(asyncio.get_running_loop())
    outbox = Outbox(transport, 10_000, flusher, lambda: None)
    assert outbox.push(b"data")
    for _ in range(PONG_RUN):
        assert outbox.push_pong(b"p")
    assert outbox.buffered == 4 + PONG_RUN
    assert outbox.push_pong(b"longer pong")  # replaces the last one-byte pong
    assert outbox.buffered == 4 + PONG_RUN - 1 + 11
    assert outbox.push_pong(b"pp")
    assert outbox.buffered == 4 + PONG_RUN - 1 + 2
    flusher.flush()
    assert transport.writes == [b"data" + b"p" * (PONG_RUN - 1) + b"pp"]


# ----- send: written at once when nothing waits


def test_send_writes_at_once_when_nothing_is_queued() -> None:
    transport = FakeTransport()
    flusher, loop = recording_flusher()
    outbox = Outbox(transport, 1000, flusher, lambda: None, direct=True)
    assert outbox.send(b"a")
    assert transport.writes == [b"a"]
    assert loop.scheduled == []  # no flush needed
    assert flusher.bytes_written == 1
    outbox.push(b"b")  # queued: what is sent next waits behind it
    outbox.send(b"c")
    assert transport.writes == [b"a"]
    flusher.flush()
    assert transport.writes == [b"a", b"bc"]


def test_send_counts_against_the_limit() -> None:
    transport = FakeTransport()
    transport.unsent = 0
    overflowed: list[bool] = []
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 10, flusher, lambda: overflowed.append(True), direct=True)
    assert outbox.send(b"12345678")
    assert outbox.peak == 8
    assert not outbox.send(b"123")  # 8 unsent + 3 > 10, and the transport says 8 unsent
    assert overflowed == [True]
    assert transport.writes == [b"12345678"]
    assert not outbox.send(b"1")  # an overflowed outbox takes nothing more


def test_send_queues_where_the_outbox_may_not_write_directly() -> None:
    transport = FakeTransport()
    flusher, loop = recording_flusher()
    outbox = Outbox(transport, 1000, flusher, lambda: None)
    outbox.send(b"a")
    assert transport.writes == []
    assert len(loop.scheduled) == 1
    flusher.flush()
    assert transport.writes == [b"a"]


def test_send_writes_nothing_to_a_closing_transport() -> None:
    transport = FakeTransport()
    transport.closing = True
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1000, flusher, lambda: None, direct=True)
    assert outbox.send(b"a")
    assert transport.writes == []
    assert flusher.bytes_written == 0


def test_arm_moves_the_tick_on_once_per_iteration() -> None:
    flusher, loop = recording_flusher()
    flusher.arm()
    flusher.arm()
    assert len(loop.scheduled) == 1
    loop.scheduled.pop()()
    assert flusher.tick == 1


# ----- send: straight to the socket while the transport holds nothing


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of non-blocking sockets: ours, and the peer's."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def received(peer: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := peer.recv(1 << 20):
            data += chunk
    return data


def test_send_writes_to_the_socket_while_the_transport_holds_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    transport = FakeTransport()
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1 << 20, flusher, lambda: None, direct=True, fd=ours.fileno())
    assert outbox.send(b"one")
    assert received(peer) == b"one"
    assert transport.writes == []
    assert flusher.bytes_written == 3
    transport.unsent = 5  # the transport holds bytes not sent yet: nothing may overtake them
    outbox._unsent = 5
    outbox.send(b"two")
    assert transport.writes == [b"two"]
    assert received(peer) == b""
    transport.unsent = 0  # drained: the socket is written directly again
    outbox.send(b"three")
    assert received(peer) == b"three"
    assert transport.writes == [b"two"]


def test_what_the_transport_holds_at_the_start_goes_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    transport = FakeTransport()
    transport.unsent = 100  # say, the handshake's response
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1 << 20, flusher, lambda: None, direct=True, fd=ours.fileno())
    outbox.send(b"welcome")
    assert transport.writes == [b"welcome"]
    assert received(peer) == b""


def test_what_the_socket_does_not_take_follows_through_the_transport(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport = FakeTransport()
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1 << 24, flusher, lambda: None, direct=True, fd=ours.fileno())
    frame = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
    assert outbox.send(frame)
    assert len(transport.writes) == 1
    rest = transport.writes[0]
    assert 0 < len(rest) < len(frame)
    assert received(peer) + rest == frame
    assert outbox._unsent == len(rest)
    assert flusher.bytes_written == len(frame)


def test_a_peer_that_is_gone_costs_no_exception(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    peer.close()
    transport = FakeTransport()
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1000, flusher, lambda: None, direct=True, fd=ours.fileno())
    assert outbox.send(b"x")  # EPIPE: the transport finds out by itself
    assert transport.writes == []


def test_a_closing_transport_keeps_its_socket_untouched(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    transport = FakeTransport()
    transport.closing = True
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1000, flusher, lambda: None, direct=True, fd=ours.fileno())
    assert outbox.send(b"x")
    assert received(peer) == b""
    assert transport.writes == []


class SocketTransport(FakeTransport):
    """A transport over a socket, maybe under TLS, as `get_extra_info` tells."""

    def __init__(self, sock: socket.socket, tls: bool = False) -> None:
        super().__init__()
        self.extra = {"socket": sock, "sslcontext": object() if tls else None}
        self.asked: list[str] = []

    def get_extra_info(self, name: str) -> object:
        self.asked.append(name)
        return self.extra.get(name)


@pytest.mark.parametrize("tls", [False, True])
def test_the_socket_is_looked_up_at_the_first_send_and_never_under_tls(
    pair: tuple[socket.socket, socket.socket], tls: bool
) -> None:
    ours, peer = pair
    transport = SocketTransport(ours, tls)
    flusher, _ = recording_flusher()
    outbox = Outbox(transport, 1000, flusher, lambda: None, direct=True)
    assert transport.asked == []  # an idle connection costs no lookup
    outbox.send(b"a")
    outbox.send(b"b")
    if tls:
        assert transport.writes == [b"a", b"b"]  # the transport encrypts: only through it
        assert received(peer) == b""
    else:
        assert transport.writes == []
        assert received(peer) == b"ab"
    assert transport.asked.count("sslcontext") == 1  # looked up once
