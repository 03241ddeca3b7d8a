"""The bundled chat app in real Chromium: chat, history, presence, images, escaping, reconnect."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import RECONNECT_MS, WAIT_MS, ChatPage, OpenChat, stop_server
from tests.helpers import ROOT, TIMEOUT, ServerProcess

pytestmark = pytest.mark.browser


def png(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    """A truecolor PNG; `pixel(x, y)` gives (r, g, b)."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows.extend(pixel(x, y))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


def gradient_png() -> bytes:
    return png(240, 150, lambda x, y: (91 + x // 3, 91 + y // 2, 214 - x // 4))


def api_publish(server: ServerProcess, channel: str, data: object) -> int:
    """`POST /api/publish` from loopback (no API key configured)."""
    request = urllib.request.Request(
        server.url + "/api/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        body = json.loads(response.read())
    return int(body["offset"])


def assert_clean(*chats: ChatPage) -> None:
    for chat in chats:
        assert chat.errors == [], f"{chat.nick}: page errors {chat.errors}"
        assert chat.dialogs == [], f"{chat.nick}: dialogs {chat.dialogs}"


def test_two_pages_chat_with_each_other(open_chat: OpenChat) -> None:
    alice = open_chat("alice")
    bob = open_chat("bob")
    alice.wait_online(["alice", "bob"])
    bob.wait_online(["alice", "bob"])

    alice.send("你好世界 👋🏽 hello")
    expect(bob.messages).to_have_count(1, timeout=WAIT_MS)  # the order is then the test's
    bob.send("Привет! 🎉 مرحبا")
    for chat in (alice, bob):
        expect(chat.page.locator("[data-testid=message-text]")).to_have_text(
            ["你好世界 👋🏽 hello", "Привет! 🎉 مرحبا"], timeout=WAIT_MS
        )
        expect(chat.locator("message-author")).to_have_text(["alice", "bob"], timeout=WAIT_MS)
        expect(chat.locator("message-time").first).to_have_text(re.compile(r"\d"))
    # Own messages are shown (not filtered out) and marked as one's own.
    expect(alice.page.locator(".msg.mine [data-testid=message-text]")).to_have_text(
        ["你好世界 👋🏽 hello"]
    )
    expect(bob.page.locator(".msg.mine [data-testid=message-text]")).to_have_text(
        ["Привет! 🎉 مرحبا"]
    )

    # Typing: shown to the other page, never as a chat line.
    bob.locator("composer-input").fill("typing something")
    expect(alice.locator("typing")).to_have_text("bob is typing…", timeout=WAIT_MS)
    expect(bob.locator("typing")).to_have_text("")
    bob.locator("composer-input").press("Enter")
    expect(alice.locator("typing")).to_have_text("", timeout=WAIT_MS)
    expect(alice.messages).to_have_count(3, timeout=WAIT_MS)
    # Shift+Enter is a new line, not a send.
    alice.locator("composer-input").fill("line 1")
    alice.locator("composer-input").press("Shift+Enter")
    alice.locator("composer-input").press_sequentially("line 2")
    alice.locator("composer-input").press("Enter")
    expect(bob.page.locator("[data-testid=message-text]").last).to_have_text(
        "line 1\nline 2", timeout=WAIT_MS
    )
    assert_clean(alice, bob)


def test_third_page_sees_history_online_list_and_join_leave(open_chat: OpenChat) -> None:
    alice = open_chat("alice")
    bob = open_chat("bob")
    lines = [f"message {i} 🙂" for i in range(1, 6)]
    for i, line in enumerate(lines):
        (alice if i % 2 == 0 else bob).send(line)
        expect(alice.messages).to_have_count(i + 1, timeout=WAIT_MS)

    carol = open_chat("carol")
    expect(carol.page.locator("[data-testid=message-text]")).to_have_text(lines, timeout=WAIT_MS)
    expect(carol.locator("message-author")).to_have_text(["alice", "bob", "alice", "bob", "alice"])
    carol.wait_online(["alice", "bob", "carol"])
    expect(alice.locator("notice").filter(has_text="carol joined")).to_have_count(
        1, timeout=WAIT_MS
    )
    alice.wait_online(["alice", "bob", "carol"])
    # The typing notes in history are not chat lines.
    assert all(
        kind != "typing" for kind in carol.messages.evaluate_all("n => n.map(e => e.dataset.kind)")
    )

    carol.page.context.close()
    expect(alice.locator("notice").filter(has_text="carol left")).to_have_count(1, timeout=WAIT_MS)
    alice.wait_online(["alice", "bob"])
    bob.wait_online(["alice", "bob"])
    assert_clean(alice, bob)


def test_image_sent_by_one_page_is_shown_in_the_other(open_chat: OpenChat) -> None:
    alice = open_chat("alice")
    bob = open_chat("bob")
    bob.send("Hi Alice! 你好 👋")
    expect(alice.messages).to_have_count(1, timeout=WAIT_MS)
    alice.send("Look at this sunset 🌄 看这个")
    image = gradient_png()
    assert len(image) < 48 * 1024
    alice.locator("image-input").set_input_files(
        files=[{"name": "gradient.png", "mimeType": "image/png", "buffer": image}]
    )
    for chat in (alice, bob):
        expect(chat.locator("message-image")).to_have_count(1, timeout=WAIT_MS)
        chat.page.wait_for_function(
            "() => { const i = document.querySelector('[data-testid=message-image]');"
            " return i && i.complete && i.naturalWidth === 240 && i.naturalHeight === 150; }",
            timeout=WAIT_MS,
        )
    # The bytes arrive unchanged.
    received = bob.page.evaluate(
        """async () => {
            const img = document.querySelector('[data-testid=message-image]');
            const buf = await (await fetch(img.src)).arrayBuffer();
            return Array.from(new Uint8Array(buf));
        }"""
    )
    assert bytes(received) == image
    bob.send("Beautiful! 😍")
    expect(alice.messages).to_have_count(4, timeout=WAIT_MS)
    save_screenshots(alice)

    # An image over the frame limit is scaled down to fit, and still arrives.
    noise = png(
        300, 300, lambda x, y: ((x * 7919 + y * 104729) % 251, (x * y) % 253, (x ^ y) % 255)
    )
    assert len(noise) > 256 * 1024
    bob.locator("image-input").set_input_files(
        files=[{"name": "noise.png", "mimeType": "image/png", "buffer": noise}]
    )
    expect(alice.locator("message-image")).to_have_count(2, timeout=WAIT_MS)
    alice.page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=message-image]')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=WAIT_MS,
    )
    assert_clean(alice, bob)


@pytest.mark.parametrize("server_env", [{"PLEXUS_COMPRESSION": "on"}])
def test_chat_with_compression(open_chat: OpenChat, server_env: dict[str, str]) -> None:
    """Chromium offers permessage-deflate; with `compression = "on"` the chat runs compressed."""
    alice = open_chat("alice")
    bob = open_chat("bob")
    for chat in (alice, bob):
        extensions = chat.handshakes[-1].get("sec-websocket-extensions", "")
        assert extensions.startswith("permessage-deflate"), chat.handshakes
        assert "server_no_context_takeover" in extensions
    alice.wait_online(["alice", "bob"])
    line = "A line long enough to be compressed, and then some more words. 你好世界 👋🏽 " * 4
    alice.send(line.strip())
    expect(bob.messages).to_have_count(1, timeout=WAIT_MS)
    bob.send("short")
    for chat in (alice, bob):
        expect(chat.page.locator("[data-testid=message-text]")).to_have_text(
            [line.strip(), "short"], timeout=WAIT_MS
        )
    image = gradient_png()
    bob.locator("image-input").set_input_files(
        files=[{"name": "gradient.png", "mimeType": "image/png", "buffer": image}]
    )
    alice.page.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=message-image]');"
        " return i && i.complete && i.naturalWidth === 240; }",
        timeout=WAIT_MS,
    )
    assert_clean(alice, bob)


def save_screenshots(chat: ChatPage) -> None:
    """artifacts/chat.png (and a phone-width one) for people reviewing a run.

    docs/chat.png, the README's picture, is written only when missing or with
    PLEXUS_UPDATE_SCREENSHOTS=1, so that test runs leave the checkout alone.
    """
    page = chat.page
    page.locator("[data-testid=messages]").evaluate("m => m.scrollTop = m.scrollHeight")
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "chat.png"
    page.screenshot(path=str(shot))
    docs_shot = ROOT / "docs" / "chat.png"
    if docs_shot.parent.is_dir() and (
        not docs_shot.exists() or os.environ.get("PLEXUS_UPDATE_SCREENSHOTS") == "1"
    ):
        shutil.copyfile(shot, docs_shot)
    size = page.viewport_size
    page.set_viewport_size({"width": 390, "height": 780})
    page.wait_for_function(
        "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0",
        timeout=WAIT_MS,
    )
    page.locator("[data-testid=messages]").evaluate("m => m.scrollTop = m.scrollHeight")
    page.screenshot(path=str(artifacts / "chat-phone.png"))
    page.set_viewport_size(size)


def test_html_in_messages_and_nicknames_is_shown_as_text(open_chat: OpenChat) -> None:
    payload = "<img src=x onerror=alert(1)>"
    alice = open_chat("alice")
    mallory = open_chat("<b>m</b><script>alert()</script>")
    mallory.send(payload)
    mallory.send('"><svg onload=alert(3)>')
    for chat in (alice, mallory):
        expect(chat.page.locator("[data-testid=message-text]")).to_have_text(
            [payload, '"><svg onload=alert(3)>'], timeout=WAIT_MS
        )
        expect(chat.locator("message-author").first).to_have_text(
            "<b>m</b><script>alert()</script>"
        )
        assert chat.page.locator("[data-testid=messages] img").count() == 0
        assert (
            chat.page.locator("[data-testid=messages] svg, [data-testid=messages] b").count() == 0
        )
    expect(alice.locator("online-user").filter(has_text="<b>m</b>")).to_have_count(1)
    assert alice.page.locator("[data-testid=online-list] b").count() == 0
    assert_clean(alice, mallory)


def test_reconnect_after_server_restart_gets_every_message_once_in_order(
    open_chat: OpenChat, server: ServerProcess, room: str
) -> None:
    alice = open_chat("alice")
    bob = open_chat("bob")
    alice.send("before restart")
    api_publish(server, f"chat:{room}", {"kind": "text", "text": "api 0", "nick": "backend"})
    for chat in (alice, bob):
        expect(chat.messages).to_have_count(2, timeout=WAIT_MS)

    port = server.port
    stop_server(server)
    for chat in (alice, bob):
        expect(chat.badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
        expect(chat.badge).to_have_text(re.compile(r"^Reconnecting"), timeout=WAIT_MS)

    # Same port, same data dir: SQLite history keeps the epoch, so the pages recover.
    server.start()
    assert server.port == port
    sent = [f"api {i}" for i in range(1, 6)]
    for text in sent:
        api_publish(server, f"chat:{room}", {"kind": "text", "text": text, "nick": "backend"})

    expected = ["before restart", "api 0", *sent]
    for chat in (alice, bob):
        chat.wait_connected(RECONNECT_MS)
        expect(chat.page.locator("[data-testid=message-text]")).to_have_text(
            expected, timeout=WAIT_MS
        )
        expect(chat.badge).to_have_text("Connected · WebSocket")
        offsets = chat.messages.evaluate_all("n => n.map(e => Number(e.dataset.offset))")
        assert offsets == sorted(set(offsets)), f"{chat.nick}: offsets {offsets}"

    # Live traffic flows again, both ways.
    bob.send("after restart ✅")
    for chat in (alice, bob):
        expect(chat.page.locator("[data-testid=message-text]")).to_have_text(
            [*expected, "after restart ✅"], timeout=WAIT_MS
        )
    alice.wait_online(["alice", "bob"])
    assert_clean(alice, bob)


def test_entering_a_room_shows_its_last_50_messages(
    open_chat: OpenChat, server: ServerProcess, room: str
) -> None:
    channel = f"chat:{room}"
    for i in range(1, 61):
        api_publish(server, channel, {"kind": "text", "text": f"m {i}", "nick": "backend"})
        if i % 3 == 0:  # typing notes are in history too, but are no chat lines
            api_publish(server, channel, {"kind": "typing", "nick": "backend", "uid": "x"})
    chat = open_chat("reader")
    expect(chat.locator("message-text")).to_have_text(
        [f"m {i}" for i in range(11, 61)], timeout=WAIT_MS
    )
    expect(chat.locator("typing")).to_have_text("")
    assert_clean(chat)


@pytest.mark.parametrize("server_env", [{"PLEXUS_HISTORY_BACKEND": "memory"}])
def test_lost_history_after_a_memory_store_restart_reloads_the_room(
    open_chat: OpenChat, server: ServerProcess, room: str
) -> None:
    alice = open_chat("alice")
    alice.send("from the old epoch")
    expect(alice.messages).to_have_count(1, timeout=WAIT_MS)
    stop_server(server)
    expect(alice.badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    server.start()
    api_publish(server, f"chat:{room}", {"kind": "text", "text": "new epoch", "nick": "backend"})
    alice.wait_connected(RECONNECT_MS)
    expect(alice.locator("notice").filter(has_text="could not be recovered")).to_have_count(
        1, timeout=WAIT_MS
    )
    expect(alice.locator("message-text")).to_have_text(["new epoch"], timeout=WAIT_MS)
    alice.send("still chatting")
    expect(alice.locator("message-text")).to_have_text(
        ["new epoch", "still chatting"], timeout=WAIT_MS
    )
    assert_clean(alice)


def test_phone_width_layout(open_chat: OpenChat) -> None:
    phone = open_chat("pat", viewport={"width": 375, "height": 740})
    sidebar = phone.locator("sidebar")
    box = sidebar.bounding_box()
    assert box is not None
    assert box["x"] + box["width"] <= 1, "the sidebar starts hidden on a phone"
    phone.locator("menu-toggle").click()
    expect(phone.locator("room-list")).to_be_in_viewport(timeout=WAIT_MS)
    phone.locator("room-input").fill("side-room")
    phone.locator("room-join").click()
    expect(phone.locator("room-title")).to_have_text("side-room")
    phone.wait_connected()
    phone.send("from a phone 📱")
    expect(phone.locator("message-text")).to_have_text(["from a phone 📱"], timeout=WAIT_MS)
    width = phone.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"no horizontal scrolling on a phone (scrollWidth {width})"
    assert_clean(phone)


def test_nickname_is_remembered(open_chat: OpenChat, server: ServerProcess, room: str) -> None:
    chat = open_chat("remembered")
    chat.page.reload()
    chat.wait_connected()
    expect(chat.locator("nick-dialog")).not_to_be_visible()
    expect(chat.locator("my-nick")).to_have_text("remembered")
    chat.wait_online(["remembered"])
    assert_clean(chat)


def test_plexus_js_is_served_and_shipped_once() -> None:
    """clients/js/plexus.js is a symlink to the served file: one source of truth."""
    link = ROOT / "clients" / "js" / "plexus.js"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "src" / "plexus" / "web" / "plexus.js").resolve()
    assert Path(ROOT / "src" / "plexus" / "web" / "index.html").is_file()
