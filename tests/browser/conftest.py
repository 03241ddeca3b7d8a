"""Browser fixtures: Debian's headless Chromium driven by Playwright, against a real server.

The tests skip when /usr/bin/chromium is missing, except under CI=true, where a
missing browser is a failure (CI installs it with `make system-deps`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.helpers import TIMEOUT, ServerProcess

CHROMIUM = Path(os.environ.get("PLEXUS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
IN_CI = os.environ.get("CI") == "true"
WAIT_MS = TIMEOUT * 1000  # the one timeout unit, in Playwright's milliseconds
# A reconnect waits for its backoff delay (up to 8 s by the fourth attempt).
RECONNECT_MS = 3 * WAIT_MS


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (each page gets its own context).

    Not session-scoped: Playwright's sync API keeps an event loop running in
    this thread while it is open, and the asyncio tests that run after the
    browser modules need the thread free of it.
    """
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing under CI=true: `make system-deps` installs it")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set CI=true to require it")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield instance
        instance.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def server_env() -> dict[str, str]:
    """Extra environment for the server; parametrize a test on it to change settings."""
    return {}


@pytest.fixture
def server(data_dir: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    """A real `plexus serve` (SQLite history by default) with a per-test data dir."""
    proc = ServerProcess(env={"PLEXUS_DATA_DIR": str(data_dir), **server_env})
    proc.start()
    yield proc
    stop_server(proc)


def stop_server(proc: ServerProcess) -> None:
    """Stop the server and close its output pipe (ServerProcess.stop leaves it open)."""
    proc.stop()
    if proc.proc is not None and proc.proc.stdout is not None:
        proc.proc.stdout.close()


@pytest.fixture
def room() -> str:
    """A fresh room name per test."""
    return "room-" + uuid.uuid4().hex[:8]


@dataclass
class ChatPage:
    """One person in the chat: a page in its own browser context (own localStorage)."""

    page: Any
    nick: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # The HTTP headers of each WebSocket handshake's answer, as Chromium saw them.
    handshakes: list[dict[str, str]] = field(default_factory=list)
    # The URL of every HTTP request the page made, and of every WebSocket it opened.
    requests: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)

    def locator(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    @property
    def badge(self) -> Any:
        return self.locator("connection-badge")

    @property
    def messages(self) -> Any:
        """Chat lines (not notices)."""
        return self.page.locator("[data-testid=messages] [data-testid=message]")

    def texts(self) -> list[str]:
        return [
            t.strip() for t in self.page.locator("[data-testid=message-text]").all_text_contents()
        ]

    def send(self, text: str) -> None:
        box = self.locator("composer-input")
        box.fill(text)
        box.press("Enter")

    def wait_connected(self, timeout: float = WAIT_MS) -> None:
        expect(self.badge).to_have_attribute("data-state", "connected", timeout=timeout)

    def wait_online(self, nicks: list[str]) -> None:
        expect(self.locator("online-nick")).to_have_text(sorted(nicks), timeout=WAIT_MS)


OpenChat = Callable[..., ChatPage]


@pytest.fixture
def open_chat(browser: Any, server: ServerProcess, room: str) -> Iterator[OpenChat]:
    """Open the chat app as `nick` in `room` (and wait until its history is shown)."""
    contexts: list[Any] = []

    def factory(
        nick: str, *, viewport: dict[str, int] | None = None, init_script: str | None = None
    ) -> ChatPage:
        """`init_script` runs in the page before its own scripts (e.g. to remove WebSocket)."""
        context = browser.new_context(viewport=viewport or {"width": 1100, "height": 720})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        if init_script is not None:
            context.add_init_script(init_script)
        page = context.new_page()
        chat = ChatPage(page=page, nick=nick)
        page.on("request", lambda request: chat.requests.append(request.url))
        page.on("websocket", lambda ws: chat.websockets.append(ws.url))

        def on_dialog(dialog: Any) -> None:
            chat.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda err: chat.errors.append(str(err)))
        devtools = context.new_cdp_session(page)
        devtools.send("Network.enable")
        devtools.on(
            "Network.webSocketHandshakeResponseReceived",
            lambda event: chat.handshakes.append(
                {k.lower(): v for k, v in event["response"]["headers"].items()}
            ),
        )
        page.goto(f"{server.url}/#{room}")
        chat.locator("nick-input").fill(nick)
        chat.locator("nick-save").click()
        chat.wait_connected()
        expect(chat.locator("messages")).to_have_attribute("data-loaded", "true", timeout=WAIT_MS)
        expect(chat.locator("online-nick").filter(has_text=nick)).to_have_count(1, timeout=WAIT_MS)
        return chat

    yield factory
    for context in contexts:
        context.close()
