"""The hub (plexus.hub): local subscriptions, fan-out, and each channel's stream position.

Pure: the hub does no I/O, so every interleaving a node can meet (a message
before the channel's position is known, a gap and its repair, a subscriber
being set up while messages arrive, a delivery that trails the position a
subscriber was told) is built here one call at a time.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgpack
import orjson
import pytest

from plexus import hub as hub_module
from plexus.hub import MAX_HELD, Channel, Hub, Subscription
from plexus.models import ClientInfo, Presence, Publication, StreamPosition
from plexus.protocol.codec import OP_BINARY, OP_TEXT
from plexus.protocol.pushes import EncodedPush
from tests.helpers import parse_frame

CH = "chat:room"
EPOCH = "ep-1"


class Conn:
    """A connection as the hub sees one: it keeps every frame pushed to it."""

    def __init__(self, client_id: str, format_index: int = 0, user: str | None = None) -> None:
        self.client_id = client_id
        self.user = user
        self.format_index = format_index
        self.frames: list[bytes] = []
        self.push_frame = self.frames.append
        self.outbox = SimpleNamespace(send=self.frames.append)

    def pushes(self) -> list[dict[str, Any]]:
        """The frames received, decoded."""
        out = []
        for data in self.frames:
            frame = parse_frame(data)
            if self.format_index == 0:
                assert frame.opcode == OP_TEXT
                out.append(orjson.loads(frame.data))
            else:
                assert frame.opcode == OP_BINARY
                out.append(msgpack.unpackb(frame.data))
        return out

    def offsets(self) -> list[int]:
        """The offsets of the messages received (failing on anything else)."""
        pushes = self.pushes()
        assert all(push["type"] == "message" for push in pushes), pushes
        return [push["offset"] for push in pushes]


def pub(offset: int, epoch: str = EPOCH, channel: str = CH) -> Publication:
    return Publication(channel, {"n": offset}, offset, epoch, 1_764_129_600_000 + offset)


def join(client: str, channel: str = CH) -> Presence:
    return Presence("join", channel, ClientInfo(client, None, None))


def at(offset: int, epoch: str = EPOCH) -> StreamPosition:
    return StreamPosition(offset, epoch)


class Gaps:
    """The hub's `on_gap`: records each channel reported."""

    def __init__(self) -> None:
        self.reported: list[Channel] = []

    def __call__(self, channel: Channel) -> None:
        self.reported.append(channel)


@pytest.fixture
def gaps() -> Gaps:
    return Gaps()


@pytest.fixture
def hub(gaps: Gaps) -> Hub:
    return Hub(on_gap=gaps)


def live(hub: Hub, conn: Conn, channel: str = CH, floor: int = 0) -> Subscription:
    """A subscription whose reply is out: live events reach it from `floor` on."""
    sub = Subscription(conn, channel)
    hub.add(sub)
    sub.backlog = None
    sub.floor = floor
    return sub


def synced(hub: Hub, *conns: Conn, last: int = 0, channel: str = CH) -> Channel:
    """`channel` with live subscriptions for `conns`, in sync at `last`."""
    for conn in conns:
        live(hub, conn, channel)
    hub.sync(channel, at(last))
    found = hub.channel(channel)
    assert found is not None
    return found


# ----- the objects


def test_a_subscription_starts_being_set_up() -> None:
    conn = Conn("c-1", format_index=1)
    sub = Subscription(conn, CH, {"nick": "al"})
    assert sub.conn is conn
    assert sub.channel == CH
    assert sub.info == {"nick": "al"}
    assert sub.format_index == 1
    assert sub.floor == 0
    assert sub.backlog == []
    sub.push(b"x")
    assert conn.frames == [b"x"]
    assert Subscription(conn, CH).info is None


def test_a_channel_starts_out_of_sync() -> None:
    channel = Channel(CH)
    assert channel.name == CH
    assert channel.subs == {}
    assert channel.snapshot is None
    assert (channel.epoch, channel.last) == (None, 0)
    assert channel.held == []
    assert channel.overflowed is False


def test_a_hub_without_on_gap() -> None:
    assert Hub().on_gap is None
    hub = Hub()
    channel = synced(hub, Conn("a"), last=1)
    assert hub.dispatch(pub(5)) == 0  # a gap, reported to nobody
    assert channel.held == [pub(5)]


# ----- membership


def test_add_tells_the_first_local_subscriber(hub: Hub) -> None:
    a, b = Subscription(Conn("a"), CH), Subscription(Conn("b"), CH)
    assert hub.add(a) is True
    assert hub.add(b) is False
    assert hub.add(Subscription(Conn("c"), "chat:other")) is True
    assert hub.remove(a) is False
    assert hub.remove(b) is True
    # The channel lingers (it keeps tracking its stream): its next subscriber is first again.
    assert hub.channel(CH) is not None
    assert hub.add(Subscription(Conn("d"), CH)) is True


def test_remove_only_what_is_registered(hub: Hub) -> None:
    registered = Subscription(Conn("a"), CH)
    hub.add(registered)
    assert hub.remove(Subscription(Conn("a"), CH)) is False  # same client, another subscription
    assert hub.remove(Subscription(Conn("a"), "chat:none")) is False
    assert hub.subscriptions(CH) == [registered]
    assert hub.remove(registered) is True
    assert hub.remove(registered) is False
    assert hub.subscriptions(CH) == []


def test_drop_forgets_only_a_channel_nobody_subscribes(hub: Hub) -> None:
    sub = Subscription(Conn("a"), CH)
    hub.add(sub)
    assert hub.drop(CH) is False
    assert hub.channel(CH) is not None
    hub.remove(sub)
    assert hub.drop(CH) is True
    assert hub.channel(CH) is None
    assert hub.drop(CH) is False
    assert hub.tracked() == []


def test_what_the_hub_lists(hub: Hub) -> None:
    a, b = Subscription(Conn("a"), CH), Subscription(Conn("b"), CH)
    other = Subscription(Conn("a"), "chat:other")
    for sub in (a, b, other):
        hub.add(sub)
    assert hub.subscriber_count() == 3
    assert hub.subscriber_count(CH) == 2
    assert hub.subscriber_count("chat:none") == 0
    assert hub.subscriptions(CH) == [a, b]
    assert hub.subscriptions("chat:none") == []
    assert hub.has_channel(CH)
    assert not hub.has_channel("chat:none")
    hub.remove(other)
    # Lingering: tracked, but not listed as subscribed.
    assert not hub.has_channel("chat:other")
    assert hub.channels() == [CH]
    assert [channel.name for channel in hub.tracked()] == [CH, "chat:other"]
    assert hub.subscriber_count() == 2
    assert hub.subscriber_count("chat:other") == 0


# ----- fan-out


def test_dispatch_to_an_unknown_channel(hub: Hub) -> None:
    assert hub.dispatch(pub(1)) == 0
    assert hub.dispatch(join("x")) == 0
    assert hub.channel(CH) is None


def test_each_subscriber_gets_the_frame_of_its_codec(hub: Hub) -> None:
    conns = [Conn("j1", 0), Conn("m1", 1), Conn("j2", 0), Conn("m2", 1)]
    channel = synced(hub, *conns, last=5)
    assert hub.dispatch(pub(6)) == 4
    assert channel.last == 6
    for conn in conns:
        assert conn.frames == [EncodedPush(pub(6)).frame(conn.format_index)]
    # The binary subscriber first: each codec is still its own.
    first = [Conn("m", 1), Conn("j", 0)]
    synced(hub, *first, last=0, channel="chat:b")
    assert hub.dispatch(pub(1, channel="chat:b")) == 2
    assert first[0].frames == [EncodedPush(pub(1, channel="chat:b")).frame(1)]
    assert first[1].frames == [EncodedPush(pub(1, channel="chat:b")).frame(0)]


def test_messages_in_offset_order_are_delivered(hub: Hub, gaps: Gaps) -> None:
    a, b = Conn("a"), Conn("b", 1)
    synced(hub, a, b, last=3)
    assert [hub.dispatch(pub(n)) for n in (4, 5, 6)] == [2, 2, 2]
    assert a.offsets() == b.offsets() == [4, 5, 6]
    assert a.pushes()[0] == {
        "type": "message",
        "channel": CH,
        "data": {"n": 4},
        "offset": 4,
        "epoch": EPOCH,
        "time": 1_764_129_600_004,
    }
    assert gaps.reported == []


def test_an_old_offset_is_a_duplicate(hub: Hub, gaps: Gaps) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=5)
    assert hub.dispatch(pub(5)) == 0
    assert hub.dispatch(pub(2)) == 0
    assert a.frames == []
    assert (channel.last, channel.held) == (5, None)
    assert gaps.reported == []


@pytest.mark.parametrize("event", [pub(7), pub(6, epoch="ep-2")], ids=["jump", "new-epoch"])
def test_a_gap_holds_the_channel(hub: Hub, gaps: Gaps, event: Publication) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=5)
    assert hub.dispatch(event) == 0
    assert channel.held == [event]
    assert gaps.reported == [channel]  # once
    # Everything after waits behind it, in arrival order, and reports nothing more.
    assert hub.dispatch(pub(8)) == 0
    assert hub.dispatch(join("b")) == 0
    assert channel.held == [event, pub(8), join("b")]
    assert gaps.reported == [channel]
    assert a.frames == []
    assert channel.last == 5


def test_a_subscription_being_set_up_collects_its_backlog(hub: Hub) -> None:
    a, b = Conn("a"), Conn("b")
    channel = synced(hub, a, last=1)
    setting_up = Subscription(b, CH)
    hub.add(setting_up)
    assert hub.dispatch(pub(2)) == 1  # only the live one counts
    assert hub.dispatch(join("b")) == 1  # its own join too: the node filters it later
    assert hub.dispatch(join("a")) == 0
    assert setting_up.backlog == [pub(2), join("b"), join("a")]
    assert setting_up.floor == 0
    assert b.frames == []
    assert [(push["type"], push.get("offset")) for push in a.pushes()] == [
        ("message", 2),
        ("join", None),
    ]
    assert channel.last == 2


def test_the_delivery_floor(hub: Hub) -> None:
    """A subscriber told offset 7 (its reply, or its last recovered message) while
    the node has delivered 6 does not get 7 when its delivery comes, only 8 on."""
    behind, told = Conn("behind"), Conn("told")
    channel = synced(hub, behind, last=6)
    sub = live(hub, told, floor=7)
    assert hub.dispatch(pub(7)) == 1
    assert behind.offsets() == [7]
    assert told.frames == []
    assert sub.floor == 7
    assert hub.dispatch(pub(8)) == 2
    assert told.offsets() == [8]
    assert sub.floor == 8
    assert channel.last == 8


def test_delivery_raises_the_floor(hub: Hub) -> None:
    a = Conn("a")
    synced(hub, a, last=0)
    sub = hub.subscriptions(CH)[0]
    hub.dispatch(pub(1))
    assert sub.floor == 1
    hub.dispatch(pub(2))
    assert sub.floor == 2


def test_a_lingering_channel_keeps_its_position(hub: Hub, gaps: Gaps) -> None:
    conn = Conn("a")
    channel = synced(hub, conn, last=3)
    hub.remove(hub.subscriptions(CH)[0])
    assert hub.dispatch(pub(4)) == 0
    assert channel.last == 4
    assert hub.dispatch(pub(5)) == 0  # not a gap
    assert (channel.last, gaps.reported) == (5, [])
    assert conn.frames == []


def test_presence_reaches_everyone_but_its_client(hub: Hub) -> None:
    a, b, c = Conn("a"), Conn("b", 1), Conn("c")
    synced(hub, a, b, c, last=0)
    assert hub.dispatch(join("b")) == 2
    assert b.frames == []
    assert a.frames == [EncodedPush(join("b")).frame(0)]
    assert c.frames == [EncodedPush(join("b")).frame(0)]
    assert hub.dispatch(join("a")) == 2
    assert b.frames == [EncodedPush(join("a")).frame(1)]
    assert b.pushes() == [
        {"type": "join", "channel": CH, "client": "a", "user": None, "info": None}
    ]


def test_membership_changes_during_fan_out(hub: Hub) -> None:
    """A subscriber removed while a message is fanned out (a slow consumer closed by
    its own push) breaks nothing; the change holds from the next message on."""
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    synced(hub, a, b, c, last=0)
    sub_b = hub.subscriptions(CH)[1]

    def push_then_leave(frame: bytes) -> None:
        b.frames.append(frame)
        hub.remove(sub_b)

    sub_b.push = push_then_leave
    assert hub.dispatch(pub(1)) == 3
    assert hub.dispatch(pub(2)) == 2
    assert hub.dispatch(join("x")) == 2
    for conn in (a, c):
        assert [(push["type"], push.get("offset")) for push in conn.pushes()] == [
            ("message", 1),
            ("message", 2),
            ("join", None),
        ]
    assert b.offsets() == [1]
    newcomer = Conn("d")
    live(hub, newcomer)
    assert hub.dispatch(pub(3)) == 3
    assert newcomer.offsets() == [3]


# ----- the stream position: sync


def test_events_wait_until_the_position_is_known(hub: Hub, gaps: Gaps) -> None:
    """Between the broker's subscribe and the position read, events are held; the
    position then tells which of them are new."""
    a = Conn("a")
    live(hub, a)
    channel = hub.channel(CH)
    assert channel is not None
    for event in (pub(4), join("x"), pub(5), pub(6)):
        assert hub.dispatch(event) == 0
    assert channel.held == [pub(4), join("x"), pub(5), pub(6)]
    assert gaps.reported == []  # not a gap: the position is not known yet
    hub.sync(CH, at(5))
    assert (channel.epoch, channel.last, channel.held) == (EPOCH, 6, None)
    # 4 and 5 are covered by the position; the join and 6 are new.
    assert [(push["type"], push.get("offset")) for push in a.pushes()] == [
        ("join", None),
        ("message", 6),
    ]
    assert gaps.reported == []


def test_sync_is_a_no_op_once_in_sync(hub: Hub) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=3)
    hub.dispatch(pub(4))
    hub.sync(CH, at(9, "ep-2"))
    assert (channel.epoch, channel.last) == (EPOCH, 4)
    assert hub.dispatch(pub(5)) == 1
    hub.sync("chat:none", at(1))
    assert hub.channel("chat:none") is None


def test_sync_finds_a_gap_in_what_waited(hub: Hub, gaps: Gaps) -> None:
    a = Conn("a")
    live(hub, a)
    channel = hub.channel(CH)
    assert channel is not None
    for event in (pub(3), pub(5), join("x"), pub(6)):
        hub.dispatch(event)
    hub.sync(CH, at(2))
    assert a.offsets() == [3]
    assert channel.last == 3
    # 4 is missing: 5 and what followed it wait for the repair.
    assert channel.held == [pub(5), join("x"), pub(6)]
    assert gaps.reported == [channel]


def test_sync_clears_an_overflow(hub: Hub) -> None:
    live(hub, Conn("a"))
    channel = hub.channel(CH)
    assert channel is not None
    channel.overflowed = True
    hub.sync(CH, at(0))
    assert channel.overflowed is False


# ----- holding, bounded


def test_held_events_are_bounded(hub: Hub) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=0)
    hub.dispatch(pub(2))  # a gap: holding starts
    for offset in range(3, MAX_HELD + 2):
        hub.dispatch(pub(offset))
    held = channel.held
    assert held is not None
    assert len(held) == MAX_HELD
    assert channel.overflowed is False
    hub.dispatch(pub(MAX_HELD + 2))
    hub.dispatch(join("x"))
    assert len(held) == MAX_HELD  # dropped: the repair finds them as a hole
    assert held[-1] == pub(MAX_HELD + 1)
    assert channel.overflowed is True


# ----- repairs: resume and rebase


def test_resume_delivers_the_repair_then_what_was_held(hub: Hub, gaps: Gaps) -> None:
    a, b = Conn("a"), Conn("b", 1)
    channel = synced(hub, a, b, last=3)
    hub.dispatch(pub(6))
    hub.dispatch(join("x"))
    hub.dispatch(pub(7))
    assert gaps.reported == [channel]
    # The repair read 4..6 (6 is held too: delivered once).
    hub.resume(channel, [pub(4), pub(5), pub(6)])
    assert channel.held is None
    assert channel.last == 7
    for conn in (a, b):
        assert [(push["type"], push.get("offset")) for push in conn.pushes()] == [
            ("message", 4),
            ("message", 5),
            ("message", 6),
            ("join", None),
            ("message", 7),
        ]
    assert gaps.reported == [channel]
    assert hub.dispatch(pub(8)) == 2


def test_resume_with_nothing_held(hub: Hub) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=3)
    channel.held = []  # a gap the broker reported, nothing arrived since
    hub.resume(channel, [pub(4)])
    assert (channel.held, channel.last) == (None, 4)
    assert a.offsets() == [4]


def test_a_repair_with_a_hole_holds_again(hub: Hub, gaps: Gaps) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=3)
    hub.dispatch(pub(8))
    hub.dispatch(pub(9))
    # The repair itself skips 6 (trimmed meanwhile, say): held again, in order.
    hub.resume(channel, [pub(4), pub(5), pub(7)])
    assert a.offsets() == [4, 5]
    assert channel.last == 5
    assert channel.held == [pub(7), pub(8), pub(9)]
    assert gaps.reported == [channel, channel]


def test_a_gap_while_releasing_keeps_the_rest_in_order(hub: Hub, gaps: Gaps) -> None:
    a = Conn("a")
    channel = synced(hub, a, last=1)
    hub.dispatch(pub(3))
    for event in (pub(4), pub(6), join("x"), pub(7)):
        hub.dispatch(event)
    hub.resume(channel, [pub(2)])
    assert a.offsets() == [2, 3, 4]
    assert channel.held == [pub(6), join("x"), pub(7)]
    assert gaps.reported == [channel, channel]


def test_rebase_continues_from_the_new_position(hub: Hub, gaps: Gaps) -> None:
    a, b = Conn("a"), Conn("b")
    channel = synced(hub, a, last=3)
    setting_up = Subscription(b, CH)
    hub.add(setting_up)
    hub.dispatch(pub(10, epoch="ep-2"))  # a new epoch: a gap
    hub.dispatch(pub(11, epoch="ep-2"))
    channel.overflowed = True
    stale = hub.rebase(channel, at(10, "ep-2"))
    # The live subscription must resubscribe; the one being set up keeps its
    # backlog (its own reply covers the new epoch).
    assert stale == [hub.subscriptions(CH)[0]]
    assert stale[0].conn is a
    assert (channel.epoch, channel.last, channel.held) == ("ep-2", 11, None)
    assert channel.overflowed is False
    assert a.offsets() == [11]
    assert setting_up.backlog == [pub(11, epoch="ep-2")]
    assert gaps.reported == [channel]


def test_rebase_with_nothing_live(hub: Hub) -> None:
    live(hub, Conn("a"))
    channel = hub.channel(CH)
    assert channel is not None
    hub.remove(hub.subscriptions(CH)[0])
    channel.held = None
    assert hub.rebase(channel, at(4)) == []
    assert (channel.epoch, channel.last, channel.held) == (EPOCH, 4, None)


# ----- a message alone in its loop iteration is written at once


class SplitConn(Conn):
    """A connection that tells frames written at once from frames queued."""

    def __init__(self, client_id: str) -> None:
        super().__init__(client_id)
        self.sent: list[int] = []
        self.queued: list[int] = []
        self.outbox = SimpleNamespace(send=self._sent)
        self.push_frame = self._queued

    def _sent(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.sent.append(len(self.frames))

    def _queued(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.queued.append(len(self.frames))


class Ticks:
    """Stands in for the flusher: the test ends each loop iteration by hand."""

    def __init__(self) -> None:
        self.tick = 0
        self.armed = 0

    def arm(self) -> None:
        self.armed += 1

    def end_iteration(self) -> None:
        self.tick += 1


def test_a_message_alone_in_its_iteration_is_sent_and_a_burst_queued(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "DIRECT_MIN", 2)
    ticks = Ticks()
    hub.ticker = ticks
    a, b = SplitConn("a"), SplitConn("b")
    synced(hub, a, b)
    hub.dispatch(pub(1))  # alone: written at once
    ticks.end_iteration()
    hub.dispatch(pub(2))  # a burst starts: its first message is sent, the rest queued
    hub.dispatch(pub(3))
    hub.dispatch(pub(4))
    ticks.end_iteration()
    hub.dispatch(pub(5))  # the iteration before was a burst: queued
    ticks.end_iteration()
    hub.dispatch(pub(6))  # the one before had one message: sent again
    for conn in (a, b):
        assert conn.offsets() == [1, 2, 3, 4, 5, 6]
        assert conn.sent == [1, 2, 6]
        assert conn.queued == [3, 4, 5]
    # The ticker was asked to move on once per iteration that had a message.
    assert ticks.armed == 4


def test_a_channel_with_few_subscribers_is_queued(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher's own copy then leaves in one write with its reply."""
    monkeypatch.setattr(hub_module, "DIRECT_MIN", 3)
    hub.ticker = Ticks()
    a, b = SplitConn("a"), SplitConn("b")
    synced(hub, a, b)
    hub.dispatch(pub(1))
    assert (a.sent, a.queued) == ([], [1])
    live(hub, SplitConn("c"))
    hub.ticker.end_iteration()
    hub.dispatch(pub(2))
    assert (a.sent, a.queued) == ([2], [1])


def test_without_a_ticker_every_frame_is_queued(hub: Hub) -> None:
    a = SplitConn("a")
    synced(hub, a)
    hub.dispatch(pub(1))
    hub.dispatch(pub(2))
    assert a.sent == []
    assert a.queued == [1, 2]
