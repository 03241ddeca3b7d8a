"""What a WebSocket client sends, split into messages and control frames. No I/O.

`FrameReader` is fed the bytes read from a socket after the opening handshake
and reports, in order, each whole message (text as `str`, binary as `bytes`),
each ping and pong, and the peer's close frame, to a `Receiver`. Input that
breaks RFC 6455 or RFC 7692 raises `Failure`, whose code the connection then
closes with: 1002 for a protocol error, 1007 for text that is not UTF-8, 1009
for a message over `max_size`.

It checks what websockets' sans-I/O parser checks (`Frame.parse`,
`Protocol.recv_frame`, `PerMessageDeflate.decode`), in the same order, so a
peer gets the same answer from both; `tests/unit/test_frames.py` holds it to
that with random and adversarial input. Where it differs, on purpose:

- Text must be UTF-8, checked frame by frame, so a fragmented message fails
  at its first bad fragment (websockets leaves that to its I/O layers).
- A close frame in the middle of a fragmented message is a close, as RFC 6455
  5.4 allows control frames there (websockets calls it a protocol error).
- A message may come in at most `max_fragments` frames (1009 beyond): empty
  continuation frames add no bytes, so the size limit alone does not bound
  the work a client can cause.
- `max_size` counts decompressed bytes, and a compressed frame may be a few
  bytes longer than what it inflates to (deflate's stored blocks), so only a
  compressed frame over `compress_bound(max_size)` is refused unread.

The common frame — a whole, masked, uncompressed text or binary message — is
unmasked with websockets' C `apply_mask` and handed over without building any
object; every other frame takes the general path.
"""

from __future__ import annotations

import codecs
import zlib
from typing import Any, Final, Protocol

try:  # websockets' C unmasking, as websockets.frames picks it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - built wheels carry the C extension
    from websockets.utils import apply_mask

PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
MESSAGE_TOO_BIG: Final = 1009

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_OPCODES: Final = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry), besides 3000-4999.
_CLOSE_CODES: Final = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))
_EMPTY_BLOCK: Final = b"\x00\x00\xff\xff"  # removed from the end of each compressed message
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class Failure(Exception):
    """Input that fails the connection: close with `code`, giving `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Receiver(Protocol):
    """What a `FrameReader` reports to, in the order the peer sent it."""

    def on_message(self, payload: str | bytes) -> None:
        """A whole message: `str` for text (valid UTF-8), `bytes` for binary."""

    def on_ping(self, payload: bytes) -> None:
        """A ping frame, to be answered with a pong carrying `payload`."""

    def on_pong(self, payload: bytes) -> None:
        """A pong frame."""

    def on_close(self, code: int, reason: str) -> None:
        """The peer's close frame (`code` 0: it carried none); nothing is read after it."""


def max_fragments(max_message_size: int) -> int:
    """Frames one message may come in: one per 64 bytes of the size limit, at least 64.

    A message of the largest size in fragments of 64 bytes or more always fits.
    """
    return max(64, max_message_size // 64)


def compress_bound(size: int) -> int:
    """The most bytes deflate turns `size` bytes into (zlib's `deflateBound`, raw)."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 7


class Inflater:
    """permessage-deflate, the receiving side: inflates a client's compressed messages.

    With `takeover` (the client keeps its compression context from message to
    message, RFC 7692 7.2.3) the zlib stream and its window (2**bits bytes,
    plus ~7 KB of state) live as long as the connection; without it a stream
    lives for one message.
    """

    __slots__ = ("_stream", "bits", "takeover")

    def __init__(self, bits: int, *, takeover: bool) -> None:
        self.bits = bits
        self.takeover = takeover
        self._stream: Any = None

    def inflate(self, data: bytes, budget: int, *, first: bool, fin: bool) -> bytes:
        """Inflate one frame's payload, refusing more than `budget` bytes of output.

        Raises:
            Failure: 1009 over the budget, 1002 for data that is not deflate.
        """
        stream = self._stream
        if stream is None or (first and not self.takeover):
            stream = self._stream = zlib.decompressobj(-self.bits)
        try:
            out: bytes = stream.decompress(data, budget + 1)
            if fin and len(out) <= budget:
                out += stream.decompress(_EMPTY_BLOCK, budget - len(out) + 1)
        except zlib.error:
            raise Failure(PROTOCOL_ERROR, "decompression failed") from None
        if len(out) > budget:
            raise Failure(MESSAGE_TOO_BIG, "message too big")
        if fin and (stream.eof or not self.takeover):
            # A message ended with a final deflate block (RFC 7692 7.2.3.4)
            # leaves a finished stream behind: the next message starts anew.
            self._stream = None
        return out


class FrameReader:
    """Splits one client's bytes into messages and control frames (see the module doc).

    Args:
        receiver: told of each message and control frame, in order.
        max_size: the largest message, in (decompressed) bytes.
        max_fragments: the most frames one message may come in.
        inflater: set when permessage-deflate was negotiated.

    After a close frame or a `Failure`, `closed` is True and input is ignored.
    """

    __slots__ = (
        "_compressed",
        "_input",
        "_need",
        "_parts",
        "_size",
        "_utf8",
        "closed",
        "inflater",
        "max_fragments",
        "max_size",
        "receiver",
    )

    def __init__(
        self,
        receiver: Receiver,
        *,
        max_size: int,
        max_fragments: int,
        inflater: Inflater | None = None,
    ) -> None:
        self.receiver = receiver
        self.max_size = max_size
        self.max_fragments = max_fragments
        self.inflater = inflater
        self.closed = False
        # Input after the last whole frame, kept until `_need` bytes are there.
        self._input: bytearray | None = None
        self._need = 0
        # The fragmented message being read: its parts (str for text, checked
        # as they come), its size so far, whether it is compressed.
        self._parts: list[Any] | None = None
        self._size = 0
        self._utf8: codecs.IncrementalDecoder | None = None
        self._compressed = False

    def feed(self, data: bytes) -> None:
        """Parse `data`, telling the receiver of every message and control frame in it.

        Raises:
            Failure: the peer broke the protocol; what it sent before was reported.
        """
        if self.closed:
            return
        pending = self._input
        if pending is not None:
            pending += data
            if len(pending) < self._need:
                return
            data, self._input = bytes(pending), None
        try:
            self._split(data)
        except Failure:
            self.closed = True
            self._input = self._parts = self._utf8 = None
            raise

    def _split(self, data: bytes) -> None:
        end = len(data)
        pos = 0
        receiver = self.receiver
        while pos < end and not self.closed:
            if end - pos < 2:
                self._keep(data, pos, 2)
                return
            first = data[pos]
            second = data[pos + 1]
            if (first == 0x81 or first == 0x82) and second & 0x80 and self._parts is None:
                # FIN, no extension bit, text or binary, masked, not inside a
                # fragmented message: the frame of nearly every message.
                length = second & 0x7F
                start = pos + 2  # the mask's, after the head and its extended length
                if length >= 126:
                    start += 2 if length == 126 else 8
                    if end < start:
                        self._keep(data, pos, start - pos)
                        return
                    length = int.from_bytes(data[pos + 2 : start])
                if length <= self.max_size:
                    start += 4
                    stop = start + length
                    if end < stop:
                        self._keep(data, pos, stop - pos)
                        return
                    payload = apply_mask(data[start:stop], data[start - 4 : start])
                    if first == 0x81:
                        try:
                            receiver.on_message(payload.decode())
                        except UnicodeDecodeError as exc:
                            raise Failure(INVALID_DATA, f"invalid UTF-8: {exc.reason}") from None
                    else:
                        receiver.on_message(payload)
                    pos = stop
                    continue
            stop = self._frame(data, pos, first, second)
            if stop < 0:
                return
            pos = stop

    def _keep(self, data: bytes, pos: int, need: int) -> None:
        """Keep the incomplete frame at `pos` until `need` bytes of it arrived."""
        self._input = bytearray(data[pos:])
        self._need = need

    def _frame(self, data: bytes, pos: int, first: int, second: int) -> int:
        """Any frame, checked in websockets' order; return where the next one starts (-1: wait)."""
        opcode = first & 0x0F
        if opcode not in _OPCODES:
            raise Failure(PROTOCOL_ERROR, "invalid opcode")
        if not second & 0x80:
            raise Failure(PROTOCOL_ERROR, "incorrect masking")
        length = second & 0x7F
        start = pos + 2
        if length >= 126:
            start += 2 if length == 126 else 8
            if len(data) < start:
                self._keep(data, pos, start - pos)
                return -1
            length = int.from_bytes(data[pos + 2 : start])
        fragmented = self._parts is not None
        budget = self.max_size - self._size if fragmented else self.max_size
        inflater = self.inflater
        rsv1 = first & 0x40
        compressed = inflater is not None and (
            (opcode == OP_CONT and self._compressed) or (rsv1 and OP_TEXT <= opcode <= OP_BINARY)
        )
        if length > (compress_bound(budget) if compressed else budget):
            raise Failure(MESSAGE_TOO_BIG, "message too big")
        start += 4
        stop = start + length
        if len(data) < stop:
            self._keep(data, pos, stop - pos)
            return -1
        payload: bytes = apply_mask(data[start:stop], data[start - 4 : start])
        fin = first & 0x80
        if compressed:
            assert inflater is not None
            if opcode == OP_CONT:
                if rsv1:
                    raise Failure(PROTOCOL_ERROR, "RSV1 bit set in continuation frame")
                payload = inflater.inflate(payload, budget, first=False, fin=bool(fin))
            else:
                if not fin:
                    self._compressed = True
                payload = inflater.inflate(payload, budget, first=True, fin=bool(fin))
                first &= ~0x40
        if first & 0x70:
            raise Failure(PROTOCOL_ERROR, "reserved bits must be 0")
        if opcode >= OP_CLOSE:
            if length > 125:
                raise Failure(PROTOCOL_ERROR, "control frame too long")
            if not fin:
                raise Failure(PROTOCOL_ERROR, "fragmented control frame")
            self._control(opcode, payload)
        elif opcode == OP_CONT:
            if not fragmented:
                raise Failure(PROTOCOL_ERROR, "unexpected continuation frame")
            self._continue(payload, bool(fin))
        else:
            if fragmented:
                raise Failure(PROTOCOL_ERROR, "expected a continuation frame")
            if fin:
                self.receiver.on_message(_text(payload) if opcode == OP_TEXT else payload)
            else:
                self._begin(payload, opcode == OP_TEXT)
        return stop

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.receiver.on_ping(payload)
        elif opcode == OP_PONG:
            self.receiver.on_pong(payload)
        else:
            code, reason = _close(payload)
            # In the middle of a fragmented message too (RFC 6455 5.4).
            self.closed = True
            self._parts = self._utf8 = None
            self.receiver.on_close(code, reason)

    def _begin(self, payload: bytes, text: bool) -> None:
        """The first frame of a fragmented message."""
        self._size = len(payload)
        if text:
            utf8 = self._utf8 = _Utf8Decoder()
            self._parts = [_decode(utf8, payload, False)]
        else:
            self._parts = [payload]

    def _continue(self, payload: bytes, fin: bool) -> None:
        """A continuation frame: add it to the message, and deliver the message at its end."""
        parts = self._parts
        assert parts is not None
        if len(parts) >= self.max_fragments:
            raise Failure(MESSAGE_TOO_BIG, "message in too many fragments")
        self._size += len(payload)
        utf8 = self._utf8
        parts.append(payload if utf8 is None else _decode(utf8, payload, fin))
        if not fin:
            return
        self._parts = self._utf8 = None
        self._size = 0
        self._compressed = False
        if utf8 is None:
            self.receiver.on_message(b"".join(parts))
        else:
            self.receiver.on_message("".join(parts))


def _text(payload: bytes) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError as exc:
        raise Failure(INVALID_DATA, f"invalid UTF-8: {exc.reason}") from None


def _decode(decoder: codecs.IncrementalDecoder, payload: bytes, final: bool) -> str:
    try:
        text: str = decoder.decode(payload, final)
    except UnicodeDecodeError as exc:
        raise Failure(INVALID_DATA, f"invalid UTF-8: {exc.reason}") from None
    return text


def _close(payload: bytes) -> tuple[int, str]:
    """The code (0: none) and reason of a close frame's payload, checked like websockets'."""
    if not payload:
        return 0, ""
    if len(payload) < 2:
        raise Failure(PROTOCOL_ERROR, "close frame too short")
    code = int.from_bytes(payload[:2])
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        raise Failure(INVALID_DATA, f"invalid UTF-8 in the close reason: {exc.reason}") from None
    if not (code in _CLOSE_CODES or 3000 <= code < 5000):
        raise Failure(PROTOCOL_ERROR, f"invalid close code {code}")
    return code, reason
