"""The chat app in real Chromium when WebSocket is blocked: it falls back to SSE.

An init script removes `window.WebSocket` before the page's own scripts run,
as a page sees it when nothing else can be done with it; plexus.js then
connects over `GET /sse` + `POST /emulation` by itself, and the chat must work
as it does over a WebSocket. A page whose WebSocket works never touches SSE.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import RECONNECT_MS, WAIT_MS, ChatPage, OpenChat, stop_server
from tests.browser.test_chat import api_publish, assert_clean
from tests.helpers import ServerProcess

pytestmark = pytest.mark.browser

NO_WEBSOCKET = "delete window.WebSocket;"


def uses_sse(chat: ChatPage) -> None:
    """The page has no WebSocket, opened none, and talks over SSE."""
    assert chat.page.evaluate("typeof WebSocket") == "undefined"
    assert chat.websockets == []
    paths = [url.split("?")[0].rsplit("/", 1)[-1] for url in chat.requests]
    assert "sse" in paths, chat.requests
    assert "emulation" in paths, chat.requests
    expect(chat.badge).to_have_text("Connected · SSE")
    expect(chat.badge).to_have_attribute("data-transport", "sse")


def test_two_pages_chat_over_sse_with_history_and_online_list(open_chat: OpenChat) -> None:
    alice = open_chat("alice", init_script=NO_WEBSOCKET)
    bob = open_chat("bob", init_script=NO_WEBSOCKET)
    alice.wait_online(["alice", "bob"])
    bob.wait_online(["alice", "bob"])
    lines = ["你好世界 👋🏽 over SSE", "Привет! 🎉", "third", "fourth"]
    for i, line in enumerate(lines):
        (alice if i % 2 == 0 else bob).send(line)
        for chat in (alice, bob):
            expect(chat.messages).to_have_count(i + 1, timeout=WAIT_MS)
    for chat in (alice, bob):
        expect(chat.locator("message-text")).to_have_text(lines, timeout=WAIT_MS)
        expect(chat.locator("message-author")).to_have_text(["alice", "bob", "alice", "bob"])
    # Typing notes (published as one types) reach the other page over SSE too.
    bob.locator("composer-input").fill("typing over SSE")
    expect(alice.locator("typing")).to_have_text("bob is typing…", timeout=WAIT_MS)
    bob.locator("composer-input").press("Enter")
    expect(alice.messages).to_have_count(5, timeout=WAIT_MS)

    # A third page over SSE gets the history and the online list, and the
    # others see it come and go.
    carol = open_chat("carol", init_script=NO_WEBSOCKET)
    expect(carol.locator("message-text")).to_have_text([*lines, "typing over SSE"], timeout=WAIT_MS)
    carol.wait_online(["alice", "bob", "carol"])
    expect(alice.locator("notice").filter(has_text="carol joined")).to_have_count(
        1, timeout=WAIT_MS
    )
    alice.wait_online(["alice", "bob", "carol"])
    carol.page.context.close()
    expect(alice.locator("notice").filter(has_text="carol left")).to_have_count(1, timeout=WAIT_MS)
    bob.wait_online(["alice", "bob"])
    for chat in (alice, bob):
        uses_sse(chat)
    assert_clean(alice, bob)


def test_sse_pages_recover_every_message_once_in_order_after_a_restart(
    open_chat: OpenChat, server: ServerProcess, room: str
) -> None:
    alice = open_chat("alice", init_script=NO_WEBSOCKET)
    bob = open_chat("bob", init_script=NO_WEBSOCKET)
    # One at a time, each seen by the other page first: the order of messages
    # sent at once from different places is the server's to choose.
    alice.send("before restart")
    expect(bob.messages).to_have_count(1, timeout=WAIT_MS)
    bob.send("also before")
    expect(alice.messages).to_have_count(2, timeout=WAIT_MS)
    api_publish(server, f"chat:{room}", {"kind": "text", "text": "api 0", "nick": "backend"})
    for chat in (alice, bob):
        expect(chat.messages).to_have_count(3, timeout=WAIT_MS)
        uses_sse(chat)

    port = server.port
    stop_server(server)
    for chat in (alice, bob):
        expect(chat.badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)

    # Same port and data dir: SQLite history keeps the epoch. What is
    # published before the pages are back must be recovered, once each.
    server.start()
    assert server.port == port
    sent = [f"api {i}" for i in range(1, 6)]
    for text in sent:
        api_publish(server, f"chat:{room}", {"kind": "text", "text": text, "nick": "backend"})

    expected = ["before restart", "also before", "api 0", *sent]
    for chat in (alice, bob):
        chat.wait_connected(RECONNECT_MS)
        expect(chat.locator("message-text")).to_have_text(expected, timeout=WAIT_MS)
        offsets = chat.messages.evaluate_all("n => n.map(e => Number(e.dataset.offset))")
        assert offsets == sorted(set(offsets)), f"{chat.nick}: offsets {offsets}"
        assert len(offsets) == len(expected)
        expect(chat.badge).to_have_text("Connected · SSE")
    # The conversation goes on over the new sessions, both ways.
    alice.send("after restart ✅")
    expect(bob.messages).to_have_count(len(expected) + 1, timeout=WAIT_MS)
    bob.send("me too")
    for chat in (alice, bob):
        expect(chat.locator("message-text")).to_have_text(
            [*expected, "after restart ✅", "me too"], timeout=WAIT_MS
        )
    alice.wait_online(["alice", "bob"])
    for chat in (alice, bob):
        assert chat.websockets == []
    assert_clean(alice, bob)


def test_a_working_websocket_is_used_and_sse_never_asked_for(open_chat: OpenChat) -> None:
    alice = open_chat("alice")
    bob = open_chat("bob", init_script=NO_WEBSOCKET)
    alice.send("from the WebSocket page")
    expect(bob.messages).to_have_count(1, timeout=WAIT_MS)
    bob.send("from the SSE page")
    for chat in (alice, bob):
        expect(chat.locator("message-text")).to_have_text(
            ["from the WebSocket page", "from the SSE page"], timeout=WAIT_MS
        )
    expect(alice.badge).to_have_text("Connected · WebSocket")
    expect(alice.badge).to_have_attribute("data-transport", "websocket")
    assert [url.split("?")[0].rsplit("/", 1)[-1] for url in alice.websockets] == ["ws"]
    assert alice.handshakes, "no WebSocket handshake was seen"
    asked = [url for url in alice.requests if "/sse" in url or "/emulation" in url]
    assert asked == []
    uses_sse(bob)
    assert_clean(alice, bob)
