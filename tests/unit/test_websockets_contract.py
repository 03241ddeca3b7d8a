"""What the WebSocket transport relies on in websockets, beyond its documented API.

`transports/lean.py` runs the opening handshake and permessage-deflate's
negotiation through websockets' sans-I/O `ServerProtocol`, reads what it
negotiated from its attributes, and unmasks frames with its C `apply_mask`
(`transports/frames.py`). pyproject.toml pins the websockets versions these
were checked with; this file fails first if a new version changes any of it,
before a subtle break reaches a client. (The frame reader's own behaviour is
held to websockets' parser by `test_frames.py`.)
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
from collections.abc import Sequence

import pytest
from websockets import speedups
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from plexus.transports import frames, lean
from plexus.transports.lean import _Handshake

CHROME_OFFER = "permessage-deflate; client_max_window_bits"
FIREFOX_OFFER = "permessage-deflate"


def head(*extra: str, key: str | None = None) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws?token=abc HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handshake(
    request: bytes, *, takeover: bool = False, compression: bool = True
) -> tuple[ServerProtocol, Request, Response]:
    """The handshake as `LeanProtocol._upgrade` runs it."""
    extensions = (
        [
            ServerPerMessageDeflateFactory(
                server_no_context_takeover=True, client_no_context_takeover=not takeover
            )
        ]
        if compression
        else None
    )
    ws = _Handshake(subprotocols=lean._SUBPROTOCOLS, extensions=extensions)
    ws.receive_data(request)
    events = ws.events_received()
    assert len(events) == 1
    assert isinstance(events[0], Request)
    return ws, events[0], ws.accept(events[0])


def deflate_of(ws: ServerProtocol) -> PerMessageDeflate:
    (extension,) = ws.extensions
    assert isinstance(extension, PerMessageDeflate)
    return extension


def test_the_pinned_range_is_the_installed_version() -> None:
    version = importlib.metadata.version("websockets")
    assert version.split(".")[0] == "17", f"websockets {version}: check this file, then the pin"


def test_the_handshake_parses_the_head_and_accepts() -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    ws, request, response = handshake(head("Origin: http://127.0.0.1", key=key), compression=False)
    assert request.path == "/ws?token=abc"
    assert request.headers.get_all("Origin") == ["http://127.0.0.1"]
    assert request.headers.get_all("Host") == ["127.0.0.1"]
    assert response.status_code == 101
    ws.send_response(response)
    written = b"".join(ws.data_to_send())
    assert written.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    # RFC 6455's own example key and answer.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in written
    assert b"Server:" not in written  # no version for anyone to look up
    assert ws.extensions == []
    assert ws.subprotocol is None


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ("plexus.v1.msgpack", "plexus.v1.msgpack"),
        ("other, plexus.v1.json, plexus.v1.msgpack", "plexus.v1.json"),
        ("other", None),
    ],
)
def test_our_select_subprotocol_is_the_one_called(offered: str, chosen: str | None) -> None:
    ws, _, response = handshake(head(f"Sec-WebSocket-Protocol: {offered}"))
    assert response.status_code == 101
    assert ws.subprotocol == chosen
    # An override of the method, not an attribute bound per instance (a cycle).
    assert "select_subprotocol" not in vars(ws)


def test_a_refused_handshake_says_why() -> None:
    ws, _, response = handshake(head().replace(b"Version: 13", b"Version: 8"))
    assert response.status_code == 400
    assert "Sec-WebSocket-Version" in str(ws.handshake_exc)
    ws, _, response = handshake(head().replace(b"Upgrade: websocket\r\n", b"Upgrade: h2c\r\n"))
    assert response.status_code == 426
    assert ("Upgrade", "websocket") in list(response.headers.raw_items())


def test_an_unparsable_head_leaves_no_request_and_an_answer() -> None:
    ws = _Handshake(subprotocols=lean._SUBPROTOCOLS)
    ws.receive_data(b"GET /ws HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n")
    assert ws.events_received() == []
    assert b"".join(ws.data_to_send()).startswith(b"HTTP/1.1 431 ")
    assert ws.handshake_exc is not None
    ws = _Handshake(subprotocols=lean._SUBPROTOCOLS)
    ws.receive_data(b"not a request line\r\n\r\n")
    assert ws.events_received() == []
    assert ws.handshake_exc is not None
    assert b"".join(ws.data_to_send()) == b""  # no answer: the listener says 400


def response_extensions(ws: ServerProtocol, response: Response) -> Sequence[str]:
    assert response.status_code == 101
    return response.headers.get_all("Sec-WebSocket-Extensions")


def test_a_browser_offer_gets_no_context_takeover_both_ways() -> None:
    for offer in (CHROME_OFFER, FIREFOX_OFFER):
        ws, _, response = handshake(head(f"Sec-WebSocket-Extensions: {offer}"))
        assert response_extensions(ws, response) == [
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]
        deflate = deflate_of(ws)
        assert deflate.remote_no_context_takeover  # the client resets per message
        assert deflate.local_no_context_takeover
        assert (deflate.remote_max_window_bits, deflate.local_max_window_bits) == (15, 15)


def test_with_client_takeover_the_client_keeps_its_context() -> None:
    ws, _, response = handshake(head(f"Sec-WebSocket-Extensions: {CHROME_OFFER}"), takeover=True)
    assert response_extensions(ws, response) == ["permessage-deflate; server_no_context_takeover"]
    deflate = deflate_of(ws)
    assert not deflate.remote_no_context_takeover
    assert deflate.local_no_context_takeover


@pytest.mark.parametrize("bits", range(9, 16))
def test_a_window_the_client_asks_for_is_granted(bits: int) -> None:
    offer = f"permessage-deflate; server_max_window_bits={bits}; client_max_window_bits=11"
    ws, _, response = handshake(head(f"Sec-WebSocket-Extensions: {offer}"), takeover=True)
    (answer,) = response_extensions(ws, response)
    assert f"server_max_window_bits={bits}" in answer
    assert "client_max_window_bits=11" in answer
    deflate = deflate_of(ws)
    assert (deflate.local_max_window_bits, deflate.remote_max_window_bits) == (bits, 11)


def test_offers_it_cannot_take_are_declined_and_the_next_one_taken() -> None:
    # zlib cannot deflate with a 256-byte window: that offer is declined.
    offers = "permessage-deflate; server_max_window_bits=8, permessage-deflate; x-unknown"
    ws, _, response = handshake(head(f"Sec-WebSocket-Extensions: {offers}"))
    assert response_extensions(ws, response) == []
    assert ws.extensions == []
    fallback = f"permessage-deflate; server_max_window_bits=8, {FIREFOX_OFFER}"
    ws, _, response = handshake(head(f"Sec-WebSocket-Extensions: {fallback}"))
    assert len(response_extensions(ws, response)) == 1
    assert deflate_of(ws).local_max_window_bits == 15


def test_an_unknown_extension_is_ignored() -> None:
    ws, _, response = handshake(head("Sec-WebSocket-Extensions: x-webkit-deflate-frame"))
    assert response_extensions(ws, response) == []


def test_apply_mask_is_the_c_one_and_xors() -> None:
    assert frames.apply_mask is speedups.apply_mask
    data, mask = os.urandom(1000), os.urandom(4)
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert frames.apply_mask(data, mask) == expected
    assert isinstance(frames.apply_mask(b"", mask), bytes)


def test_the_subprotocol_names_are_typed_as_websockets_wants() -> None:
    assert [Subprotocol("plexus.v1.json"), Subprotocol("plexus.v1.msgpack")] == lean._SUBPROTOCOLS
