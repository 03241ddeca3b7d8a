"""The frame reader (plexus.transports.frames), against websockets' own parser.

`FrameReader` must give a client the same answer as websockets' sans-I/O
`Protocol` (frames, messages, close codes) for any input, except where the
module says it differs on purpose. The hypothesis tests feed both the same
random and adversarial streams, in the same random pieces, and compare what
each reported after every piece; `Model` is websockets plus those documented
differences, written out.
"""

from __future__ import annotations

import codecs
import itertools
import os
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.exceptions import PayloadTooBig
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side, State

from plexus.transports.frames import (
    Failure,
    FrameReader,
    Inflater,
    compress_bound,
    max_fragments,
)

TAIL = b"\x00\x00\xff\xff"
Event = tuple[Any, ...]


class Recorder:
    """A receiver that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_message(self, payload: str | bytes) -> None:
        self.events.append(("message", payload))

    def on_ping(self, payload: bytes) -> None:
        self.events.append(("ping", payload))

    def on_pong(self, payload: bytes) -> None:
        self.events.append(("pong", payload))

    def on_close(self, code: int, reason: str) -> None:
        self.events.append(("close", code, reason))


class Ours:
    """A `FrameReader` and what it reported, failures included."""

    def __init__(self, max_size: int, fragments: int, deflate: tuple[int, bool] | None) -> None:
        self.recorder = Recorder()
        inflater = None if deflate is None else Inflater(deflate[0], takeover=deflate[1])
        self.reader = FrameReader(
            self.recorder, max_size=max_size, max_fragments=fragments, inflater=inflater
        )

    def feed(self, data: bytes) -> list[Event]:
        try:
            self.reader.feed(data)
        except Failure as exc:
            self.recorder.events.append(("fail", exc.code))
        return self.recorder.events


class Diverges(Exception):
    """The input reached a difference the module documents (no comparison possible)."""


class Model:
    """websockets' `Protocol` as a server, plus the reader's documented differences."""

    def __init__(
        self,
        max_size: int,
        fragments: int,
        deflate: tuple[int, bool] | None,
        sent: list[Spec],
    ) -> None:
        self.proto = Protocol(Side.SERVER, state=State.OPEN, max_size=max_size)
        self.proto.logger.disabled = True
        if deflate is not None:
            bits, takeover = deflate
            self.proto.extensions = [PerMessageDeflate(not takeover, True, bits, 15)]
        self.max_size = max_size
        self.fragments = fragments
        self.deflate = deflate
        self.sent = sent
        self.frames = 0  # frames websockets parsed
        self.events: list[Event] = []
        self.done = False
        self.parts: list[Any] | None = None
        self.utf8: codecs.IncrementalDecoder | None = None
        self.compressed = False  # the fragmented message being read is

    def feed(self, data: bytes) -> list[Event]:
        if self.done:
            return self.events
        proto = self.proto
        proto.receive_data(data)
        for frame in proto.events_received():
            self.frames += 1
            try:
                self.frame(frame)
            except Failure as exc:
                self.events.append(("fail", exc.code))
                self.done = True
            if self.done:
                return self.events
        if proto.eof_sent:
            self.done = True
            if proto.close_rcvd is not None:  # a close inside a fragmented message
                close = proto.close_rcvd
                self.events.append(("close", 0 if close.code == 1005 else close.code, close.reason))
            else:
                exc = proto.parser_exc
                if isinstance(exc, PayloadTooBig) and exc.size is not None:
                    self.check_compressed_bound(exc.size)
                assert proto.close_sent is not None
                self.events.append(("fail", proto.close_sent.code))
        return self.events

    def check_compressed_bound(self, size: int) -> None:
        """websockets refused a frame by its raw size: the reader lets compressed ones be
        a little bigger (up to `compress_bound`), so the two part ways there."""
        spec = self.sent[self.frames] if self.frames < len(self.sent) else None
        maybe_compressed = spec is not None and (spec.rsv & 4 or spec.opcode == 0)
        if self.deflate is not None and maybe_compressed and size <= compress_bound(self.max_size):
            raise Diverges

    def frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = bytes(frame.data)
        if opcode is Opcode.PING:
            self.events.append(("ping", data))
        elif opcode is Opcode.PONG:
            self.events.append(("pong", data))
        elif opcode is Opcode.CLOSE:
            close = Close.parse(data)
            self.events.append(("close", 0 if close.code == 1005 else close.code, close.reason))
            self.done = True
        elif opcode is Opcode.CONT:
            parts = self.parts
            assert parts is not None
            if len(parts) >= self.fragments:
                raise Failure(1009, "too many fragments")
            parts.append(data if self.utf8 is None else self.decode(self.utf8, data, frame.fin))
            if frame.fin:
                self.deliver(parts, self.utf8 is not None)
        elif frame.fin:
            if opcode is Opcode.TEXT:
                self.events.append(("message", self.decode(_Utf8(), data, True)))
            else:
                self.events.append(("message", data))
        else:
            self.utf8 = _Utf8() if opcode is Opcode.TEXT else None
            self.parts = [data if self.utf8 is None else self.decode(self.utf8, data, False)]

    def deliver(self, parts: list[Any], text: bool) -> None:
        self.events.append(("message", "".join(parts) if text else b"".join(parts)))
        self.parts = self.utf8 = None

    @staticmethod
    def decode(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> str:
        try:
            text: str = decoder.decode(data, final)
        except UnicodeDecodeError:
            raise Failure(1007, "invalid UTF-8") from None
        return text


_Utf8 = codecs.getincrementaldecoder("utf-8")


# ----- generating streams


@dataclass
class Spec:
    """One frame a client sends: its header fields as sent (right or wrong) and payload."""

    opcode: int
    fin: bool
    rsv: int  # 4 = RSV1, 2 = RSV2, 1 = RSV3
    masked: bool
    payload: bytes
    mask: bytes = b"\x00\x00\x00\x00"
    length_bytes: int = 0  # 0: the shortest encoding; 2 or 8: force that one

    def serialize(self) -> bytes:
        first = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        length = len(self.payload)
        encoding = self.length_bytes or (0 if length < 126 else 2 if length < 65536 else 8)
        mask_bit = 0x80 if self.masked else 0
        if encoding == 0:
            head = bytes([first, mask_bit | length])
        elif encoding == 2:
            head = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
        else:
            head = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
        if not self.masked:
            return head + self.payload
        masked = bytes(b ^ self.mask[i % 4] for i, b in enumerate(self.payload))
        return head + self.mask + masked


TEXTS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40).map(
    str.encode
)
BAD_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"ok\xf8ok", b"\xc0\xaf"]
)


@st.composite
def payloads(draw: st.DrawFn, max_size: int) -> bytes:
    kind = draw(st.sampled_from(["text"] * 4 + ["bytes", "bad", "boundary"]))
    if kind == "text":
        return draw(TEXTS)
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "bad":
        return draw(TEXTS) + draw(BAD_UTF8) + draw(TEXTS)
    size = draw(st.sampled_from([0, 1, 124, 125, 126, 127, max_size - 1, max_size, max_size + 1]))
    return b"a" * max(0, size)


@st.composite
def close_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["none", "code", "reason", "bad-code", "bad-reason", "short"]))
    code = draw(st.sampled_from([1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999]))
    if kind == "none":
        return b""
    if kind == "short":
        return b"\x03"
    if kind == "bad-code":
        code = draw(st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]))
    reason = draw(TEXTS)[:100]
    if kind == "bad-reason":
        reason = b"x" + draw(BAD_UTF8)
    return struct.pack("!H", code) + (reason if kind != "code" else b"")


class Client:
    """Builds what a client sends, compressing messages the way a real one would."""

    def __init__(self, deflate: tuple[int, bool] | None) -> None:
        self.deflate = deflate
        self.stream: Any = None

    def compress(self, data: bytes, *, first: bool, fin: bool) -> bytes:
        assert self.deflate is not None
        bits, takeover = self.deflate
        if self.stream is None or (first and not takeover):
            self.stream = zlib.compressobj(6, zlib.DEFLATED, -bits)
        out: bytes = self.stream.compress(data) + self.stream.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if fin else out


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, int, tuple[int, bool] | None, list[Spec]]:
    """A random stream: mostly well-formed messages, with every kind of mistake mixed in."""
    max_size = draw(st.sampled_from([1, 40, 125, 126, 200, 1000]))
    fragments = draw(st.sampled_from([2, 3, 64]))
    deflate = draw(st.none() | st.tuples(st.integers(9, 15), st.booleans()))
    client = Client(deflate)
    specs: list[Spec] = []
    open_message = False  # a fragmented message the stream has begun
    compressed = False
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(
            st.sampled_from(["message"] * 5 + ["fragment"] * 3 + ["control", "close"] * 2 + ["odd"])
        )
        mask = draw(st.binary(min_size=4, max_size=4))
        if kind == "control":
            opcode = draw(st.sampled_from([0x9, 0xA]))
            payload = draw(st.binary(max_size=8))
            if draw(st.integers(0, 9)) == 0:
                payload = draw(st.sampled_from([b"p" * 125, b"p" * 126]))
            specs.append(Spec(opcode, True, 0, True, payload, mask))
            continue
        if kind == "close":
            specs.append(Spec(0x8, True, 0, True, draw(close_payloads()), mask))
            continue
        if kind == "odd":
            # Whatever a broken or hostile client might send.
            specs.append(
                Spec(
                    draw(st.integers(0, 15)),
                    draw(st.booleans()),
                    draw(st.integers(0, 7)),
                    draw(st.booleans()),
                    draw(st.binary(max_size=130)),
                    mask,
                    draw(st.sampled_from([0, 0, 2, 8])),
                )
            )
            continue
        payload = draw(payloads(max_size))
        fin = kind == "message" or (open_message and draw(st.booleans()))
        opcode = 0 if open_message else draw(st.sampled_from([0x1, 0x1, 0x2]))
        if not open_message and draw(st.integers(0, 20)) == 0:
            opcode = 0  # a continuation with nothing to continue
        rsv = 0
        if deflate is not None and (compressed if open_message else draw(st.booleans())):
            how = draw(st.sampled_from(["deflate", "deflate", "deflate", "garbage", "bomb"]))
            first = not open_message
            if how == "garbage":
                payload = draw(st.binary(max_size=20))
            elif how == "bomb":
                payload = client.compress(b"\x00" * (max_size + 2000), first=first, fin=fin)
            else:
                payload = client.compress(payload, first=first, fin=fin)
            rsv = 4 if first else 0
            compressed = not fin
        elif draw(st.integers(0, 30)) == 0:
            rsv = draw(st.sampled_from([1, 2, 4]))
        specs.append(
            Spec(opcode, fin, rsv, True, payload, mask, draw(st.sampled_from([0, 0, 0, 2, 8])))
        )
        open_message = opcode in (0, 1, 2) and not fin and (opcode != 0 or open_message)
        if fin:
            compressed = False
    return max_size, fragments, deflate, specs


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given (relative) points."""
    points = sorted({int(c * len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(streams(), st.lists(st.floats(0, 1), max_size=6), st.booleans())
def test_the_reader_answers_like_websockets(
    stream: tuple[int, int, tuple[int, bool] | None, list[Spec]],
    cuts: list[float],
    truncate: bool,
) -> None:
    max_size, fragments, deflate, specs = stream
    data = b"".join(spec.serialize() for spec in specs)
    if truncate and data:
        data = data[: len(data) - 1]
    ours = Ours(max_size, fragments, deflate)
    model = Model(max_size, fragments, deflate, specs)
    for piece in pieces(data, cuts):
        try:
            expected = list(model.feed(piece))
        except Diverges:
            assume(False)
        assert ours.feed(piece) == expected


# ----- cases worth naming


def masked(payload: bytes, first: int = 0x81) -> bytes:
    """A masked frame with a fixed key, its first byte given."""
    return Spec(
        first & 0x0F, bool(first & 0x80), (first >> 4) & 7, True, payload, b"\x01\x02\x03\x04"
    ).serialize()


def test_common_frames_are_reported_in_order() -> None:
    ours = Ours(1000, 64, None)
    stream = (
        masked("héllo".encode())
        + masked(b"\x00\xff", 0x82)
        + masked(b"hi", 0x89)
        + masked(b"", 0x8A)
        + masked(b"frag", 0x01)
        + masked("ment ü".encode(), 0x80)
        + masked(struct.pack("!H", 4321) + b"bye", 0x88)
        + masked(b"after the close", 0x81)
    )
    # One byte at a time: every frame is split everywhere.
    for byte in stream:
        ours.feed(bytes([byte]))
    assert ours.recorder.events == [
        ("message", "héllo"),
        ("message", b"\x00\xff"),
        ("ping", b"hi"),
        ("pong", b""),
        ("message", "fragment ü"),
        ("close", 4321, "bye"),
    ]
    assert ours.reader.closed


def test_a_close_inside_a_fragmented_message_is_a_close() -> None:
    ours = Ours(1000, 64, None)
    assert ours.feed(masked(b"part", 0x01) + masked(b"", 0x88)) == [("close", 0, "")]


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (masked(b"\xff"), 1007),
        (masked(b"\xe2\x82", 0x01) + masked(b"x", 0x00), 1007),  # fails at the bad fragment
        (masked(b"a" * 1001), 1009),
        (masked(b"a" * 600, 0x01) + masked(b"a" * 401, 0x80), 1009),
        (masked(b"x", 0x83), 1002),  # opcode 3
        (masked(b"x", 0xC1), 1002),  # RSV1 without permessage-deflate
        (masked(b"x", 0x80), 1002),  # a continuation of nothing
        (masked(b"x", 0x09), 1002),  # a fragmented ping
        (masked(b"p" * 126, 0x89), 1002),
        (masked(b"\x03\xe8\xff", 0x88), 1007),  # close reason not UTF-8
        (masked(b"\x03\xed", 0x88), 1002),  # close code 1005
        (b"\x81\x05hello", 1002),  # not masked
    ],
)
def test_broken_input_fails_with_its_code(stream: bytes, code: int) -> None:
    ours = Ours(1000, 64, None)
    assert ours.feed(stream)[-1] == ("fail", code)
    assert ours.reader.closed
    assert ours.feed(masked(b"ignored")) == [("fail", code)]


def test_a_message_in_too_many_fragments_fails_1009() -> None:
    ours = Ours(1000, 3, None)
    stream = masked(b"a", 0x01) + masked(b"", 0x00) + masked(b"", 0x00) + masked(b"", 0x80)
    assert ours.feed(stream) == [("fail", 1009)]


def test_fragment_cap_follows_the_message_size_limit() -> None:
    assert max_fragments(64 * 1024) == 1024
    assert max_fragments(1000) == 64  # the floor
    # Autobahn 9.3/9.4 send 4 MiB in 64-byte fragments to a 16 MiB limit.
    assert max_fragments(16 * 1024 * 1024) >= 4 * 1024 * 1024 // 64


def compressed(data: bytes, bits: int = 15) -> bytes:
    stream = zlib.compressobj(9, zlib.DEFLATED, -bits)
    out: bytes = stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]


def test_compressed_messages_are_inflated() -> None:
    ours = Ours(1000, 64, (15, False))
    text = "ünïcode " * 20
    assert ours.feed(masked(compressed(text.encode()), 0xC1)) == [("message", text)]
    # In fragments, a control frame between them.
    payload = compressed(b"binary " * 50)
    stream = (
        masked(payload[:10], 0x42)
        + masked(b"!", 0x89)
        + masked(payload[10:], 0x80)
        + masked(b"plain", 0x81)  # a message may also go uncompressed
    )
    assert ours.feed(stream)[1:] == [
        ("ping", b"!"),
        ("message", b"binary " * 50),
        ("message", "plain"),
    ]


def test_an_incompressible_message_of_exactly_the_limit_passes() -> None:
    """`max_size` counts inflated bytes: deflate makes random data a little bigger."""
    data = os.urandom(1000)
    payload = compressed(data)
    assert 1000 < len(payload) <= compress_bound(1000)
    ours = Ours(1000, 64, (15, False))
    assert ours.feed(masked(payload, 0xC2)) == [("message", data)]
    over = Ours(999, 64, (15, False))
    assert over.feed(masked(payload, 0xC2)) == [("fail", 1009)]


def test_a_deflate_bomb_fails_1009_without_inflating_it() -> None:
    bomb = compressed(b"\x00" * 50_000_000)  # 50 MB in ~49 KB
    assert len(bomb) < 64 * 1024
    ours = Ours(64 * 1024, 1024, (15, False))
    tracemalloc.start()
    try:
        events = ours.feed(masked(bomb, 0xC2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert events == [("fail", 1009)]
    assert peak < 1024 * 1024  # what it read and at most the limit, never the 50 MB


def test_a_bomb_in_fragments_fails_1009_by_its_total() -> None:
    ours = Ours(1000, 64, (15, True))
    stream = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = stream.compress(b"a" * 600) + stream.flush(zlib.Z_SYNC_FLUSH)
    second = stream.compress(b"a" * 401) + stream.flush(zlib.Z_SYNC_FLUSH)
    assert ours.feed(masked(first, 0x41) + masked(second[:-4], 0x80)) == [("fail", 1009)]


def test_client_context_takeover_keeps_one_inflater() -> None:
    """A client that keeps its context refers back to earlier messages."""
    stream = zlib.compressobj(6, zlib.DEFLATED, -12)
    messages = [
        b'{"type":"publish","channel":"chat:lobby","data":{"text":"hi %d"}}' % i for i in range(5)
    ]
    frames = b""
    for message in messages:
        out = stream.compress(message) + stream.flush(zlib.Z_SYNC_FLUSH)
        frames += masked(out[:-4], 0xC1)
    ours = Ours(1000, 64, (12, True))
    assert ours.feed(frames) == [("message", m.decode()) for m in messages]
    # The same bytes, read as if each message stood alone, cannot be inflated.
    alone = Ours(1000, 64, (12, False))
    assert alone.feed(frames)[-1] == ("fail", 1002)


def test_a_message_ended_with_a_final_block_starts_the_next_anew() -> None:
    """RFC 7692 7.2.3.4: a message may end with a BFINAL block (a finished zlib stream)."""
    ours = Ours(1000, 64, (15, True))
    whole = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = whole.compress(b"first message") + whole.flush(zlib.Z_FINISH)
    assert ours.feed(masked(first, 0xC1)) == [("message", "first message")]
    assert ours.feed(masked(compressed(b"second one"), 0xC1))[-1] == ("message", "second one")


def test_corrupt_deflate_data_fails_1002() -> None:
    ours = Ours(1000, 64, (15, False))
    assert ours.feed(masked(b"\xff\xff\xff\xff", 0xC1)) == [("fail", 1002)]


def test_compress_bound_covers_deflate() -> None:
    for size in (0, 1, 100, 4096, 70_000):
        assert len(compressed(os.urandom(size))) <= compress_bound(size)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_a_close_code_no_peer_may_send_fails_1002(code: int) -> None:
    assert Ours(1000, 64, None).feed(masked(struct.pack("!H", code), 0x88)) == [("fail", 1002)]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, *range(1007, 1015), 3000, 4999])
def test_a_close_code_a_peer_may_send_is_a_close(code: int) -> None:
    assert Ours(1000, 64, None).feed(masked(struct.pack("!H", code), 0x88)) == [("close", code, "")]
