"""The admin page in real Chromium: login, the overview of a known load, the live chart,
channel pages with presence and a live tail, actions, HTML shown as text, cross-origin
attempts, a phone, and two nodes on Redis."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import expect

from plexus.auth import make_token
from tests.browser.conftest import WAIT_MS, stop_server
from tests.helpers import ROOT, TIMEOUT, RedisServer, ServerProcess

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery staple"
JWT_SECRET = "a-jwt-secret-for-the-browser-tests-32b"
CLIENTS, CHANNELS = 12, ["chat:alpha", "chat:beta", "chat:gamma"]


@pytest.fixture
def server_env() -> dict[str, str]:
    return {
        "PLEXUS_ADMIN_PASSWORD": PASSWORD,
        "PLEXUS_HISTORY_BACKEND": "memory",
        "PLEXUS_JWT_SECRET": JWT_SECRET,
        "PLEXUS_PUBLISH_RATE": "0",
    }


@dataclass
class AdminPage:
    """The admin page in a browser context of its own."""

    page: Any
    url: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def locator(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    def login(self, password: str = PASSWORD) -> None:
        self.locator("login-password").fill(password)
        self.locator("login-submit").click()

    def clean(self) -> None:
        assert self.errors == [], f"page errors {self.errors}"
        assert self.dialogs == [], f"dialogs {self.dialogs}"


@pytest.fixture
def open_admin(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def factory(url: str, *, viewport: dict[str, int] | None = None) -> AdminPage:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        admin = AdminPage(page, url)
        page.on("dialog", lambda dialog: (admin.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda err: admin.errors.append(str(err)))
        page.goto(url + "/admin")
        expect(admin.locator("login-view")).to_be_visible()
        return admin

    yield factory
    for context in contexts:
        context.close()


@pytest.fixture
def load(browser: Any, server: ServerProcess) -> Iterator[Any]:
    """A page holding plain WebSocket clients; `open(n, channels, ...)` connects them."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/health")  # any page of the server's origin
    page.evaluate("() => { window.sockets = []; window.pushes = []; window.closes = []; }")

    def open_clients(
        count: int, channels: list[str], *, token: str | None = None, info: Any = None
    ) -> list[str]:
        url = server.ws_url + (f"?token={token}" if token else "")
        return list(
            page.evaluate(
                """async ([url, count, channels, info]) => {
                    const opened = [];
                    for (let i = 0; i < count; i++) {
                        opened.push(await new Promise((resolve, reject) => {
                            const ws = new WebSocket(url);
                            let id = null;
                            ws.onmessage = (e) => {
                                const m = JSON.parse(e.data);
                                if (m.type === 'welcome') {
                                    id = m.client;
                                    const channel = channels[i % channels.length];
                                    const sub = {type: 'subscribe', id: 1, channel};
                                    if (info !== null) sub.info = info;
                                    ws.send(JSON.stringify(sub));
                                } else if (m.type === 'reply' && m.id === 1) {
                                    resolve(id);
                                } else if (m.type === 'error') {
                                    reject(new Error(m.message));
                                } else {
                                    window.pushes.push(m);
                                }
                            };
                            ws.onclose = (e) => window.closes.push({client: id, code: e.code});
                            window.sockets.push(ws);
                        }));
                    }
                    return opened;
                }""",
                [url, count, channels, info],
            )
        )

    page.open_clients = open_clients
    yield page
    context.close()


@pytest.fixture(autouse=True)
def expect_waits() -> Iterator[None]:
    """Every `expect` here waits the one timeout unit (Playwright's default is 5 s)."""
    expect.set_options(timeout=WAIT_MS)
    yield
    expect.set_options(timeout=5000)


def compact(value: Any) -> str:
    """JSON as the page shows it (JSON.stringify)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def api_publish(url: str, channel: str, data: Any) -> int:
    request = urllib.request.Request(
        url + "/api/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return int(json.loads(response.read())["offset"])


def api_history(url: str, channel: str) -> list[Any]:
    request = urllib.request.Request(
        url + "/api/history",
        data=json.dumps({"channel": channel}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return [m["data"] for m in json.loads(response.read())["messages"]]


class Publisher:
    """Publishes to a channel through the HTTP API every 20 ms, from a thread, until stopped."""

    def __init__(self, url: str, channel: str) -> None:
        self.url, self.channel = url, channel
        self.stopped = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(0.02):  # a steady rate, not a wait for anything
            api_publish(self.url, self.channel, {"n": self.count})
            self.count += 1

    def __enter__(self) -> Publisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(TIMEOUT)


def chart_value(admin: AdminPage, testid: str, attribute: str = "last") -> float:
    value = admin.locator(testid).get_attribute(f"data-{attribute}")
    return float(value) if value else 0.0


def save_screenshot(admin: AdminPage, name: str, *, docs: bool = False) -> None:
    """artifacts/NAME.png; docs/NAME.png too when missing or with PLEXUS_UPDATE_SCREENSHOTS=1."""
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / f"{name}.png"
    admin.page.screenshot(path=str(shot), full_page=True)
    docs_shot = ROOT / "docs" / f"{name}.png"
    if docs and (not docs_shot.exists() or os.environ.get("PLEXUS_UPDATE_SCREENSHOTS") == "1"):
        shutil.copyfile(shot, docs_shot)


# ----- login and the overview


def test_wrong_password_refused_right_one_shows_the_known_load(
    open_admin: Any, server: ServerProcess, load: Any
) -> None:
    load.open_clients(CLIENTS, CHANNELS)
    admin = open_admin(server.url)
    for wrong in ("wrong password", PASSWORD + "!"):
        admin.login(wrong)
        expect(admin.locator("login-error")).to_have_text("wrong password or token")
        expect(admin.locator("overview-view")).to_be_hidden()
    assert admin.page.context.cookies() == []
    admin.login()
    expect(admin.locator("overview-view")).to_be_visible()
    expect(admin.locator("total-connections")).to_have_text(str(CLIENTS))
    expect(admin.locator("total-subscriptions")).to_have_text(str(CLIENTS))
    expect(admin.locator("total-nodes")).to_have_text("1")
    expect(admin.locator("node-row")).to_have_count(1)
    expect(admin.locator("node-connections")).to_have_text(str(CLIENTS))
    rows = admin.locator("channel-row")
    expect(rows).to_have_count(len(CHANNELS))
    for channel in CHANNELS:
        row = admin.page.locator(f"[data-testid=channel-row][data-channel='{channel}']")
        expect(row.get_by_test_id("channel-subscribers-cell")).to_have_text(
            str(CLIENTS // len(CHANNELS))
        )
    # The cookie is HttpOnly: the page's own script cannot read it.
    (cookie,) = admin.page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (
        "plexus_admin",
        True,
        "Strict",
    )
    assert "plexus_admin" not in admin.page.evaluate("document.cookie")
    # A reload keeps the session; logging out ends it.
    admin.page.reload()
    expect(admin.locator("total-connections")).to_have_text(str(CLIENTS))
    admin.locator("logout").click()
    expect(admin.locator("login-view")).to_be_visible()
    admin.page.reload()
    expect(admin.locator("login-view")).to_be_visible()
    admin.clean()


def test_the_live_chart_moves_while_a_test_publishes(
    open_admin: Any, server: ServerProcess, load: Any
) -> None:
    load.open_clients(CLIENTS, CHANNELS)
    admin = open_admin(server.url)
    admin.login()
    chart = admin.locator("chart-deliveries")
    expect(chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d{2,})$"))
    # The clients' joins were deliveries too; then nothing moves until the test publishes.
    expect(chart).to_have_attribute("data-last", "0")
    before = chart.locator("polyline").first.get_attribute("points")
    with Publisher(server.url, "chat:alpha"):
        # 50 messages/s to 4 subscribers: ~200 deliveries/s.
        admin.page.wait_for_function(
            "() => Number(document.querySelector('[data-testid=chart-deliveries]')"
            ".dataset.last) > 50",
            timeout=WAIT_MS,
        )
        expect(chart.locator("polyline").first).not_to_have_attribute("points", before)
        expect(admin.locator("chart-latency")).to_have_attribute("data-last", re.compile(r"\d"))
        hot = admin.page.locator("[data-testid=channel-row]").first
        expect(hot).to_have_attribute("data-channel", "chat:alpha")
        # For the picture in docs/admin.md: some seconds of lines, not a dot.
        expect(chart).to_have_attribute("data-points", re.compile(r"^(1[2-9]|[2-9]\d|\d{3})$"))
        save_screenshot(admin, "admin", docs=True)
    admin.clean()


# ----- a channel's page


def test_channel_page_shows_presence_and_tails_a_message(
    open_admin: Any, server: ServerProcess, load: Any
) -> None:
    token = make_token(JWT_SECRET, user="alice")
    clients = load.open_clients(3, ["chat:room"], token=token, info={"nick": "Alice"})
    for offset in range(1, 4):
        api_publish(server.url, "chat:room", {"before": offset})
    admin = open_admin(server.url)
    admin.login()
    expect(admin.locator("overview-view")).to_be_visible()
    admin.locator("channel-link").filter(has_text="chat:room").click()
    expect(admin.locator("channel-name")).to_have_text("chat:room")
    people = admin.locator("person")
    expect(people).to_have_count(3)
    expect(admin.locator("channel-present")).to_have_text("3")
    expect(admin.locator("channel-subscribers")).to_have_text("3")
    assert sorted(people.evaluate_all("rows => rows.map(r => r.dataset.client)")) == sorted(clients)
    expect(admin.locator("person-user")).to_have_text(["alice"] * 3)
    expect(admin.locator("person-info").first).to_have_text('{"nick":"Alice"}')
    expect(admin.locator("history-row")).to_have_count(3)
    expect(admin.locator("tail-state")).to_have_attribute("data-state", "on")
    expect(admin.locator("tail-row")).to_have_count(0)
    api_publish(server.url, "chat:room", {"text": "published during the test"})
    tailed = admin.locator("tail-row").filter(has_text="published during the test")
    expect(tailed).to_have_count(1)
    expect(tailed.get_by_test_id("event-data")).to_have_text('{"text":"published during the test"}')
    save_screenshot(admin, "admin-channel")
    admin.clean()


def test_publish_and_disconnect_from_the_page(
    open_admin: Any, server: ServerProcess, load: Any
) -> None:
    kept, dropped = load.open_clients(2, ["chat:act"])
    admin = open_admin(server.url)
    admin.login()
    expect(admin.locator("overview-view")).to_be_visible()
    admin.page.goto(server.url + "/admin#/channel/chat%3Aact")
    expect(admin.locator("person")).to_have_count(2)
    # JSON is checked in the page before anything is sent.
    admin.locator("publish-data").fill("{not json")
    admin.locator("publish-submit").click()
    expect(admin.locator("publish-error")).to_contain_text("not valid JSON")
    assert api_history(server.url, "chat:act") == []
    admin.locator("publish-data").fill('{"from": "the admin page"}')
    admin.locator("publish-submit").click()
    expect(admin.locator("action-result")).to_have_text("Published to chat:act at offset 1.")
    expect(admin.locator("publish-error")).to_be_hidden()
    load.wait_for_function(
        "() => window.pushes.filter(m => m.type === 'message'"
        " && m.data.from === 'the admin page').length === 2",
        timeout=WAIT_MS,
    )
    # Disconnect one of the two clients from its row.
    admin.page.locator(f"[data-testid=person][data-client='{dropped}']").get_by_test_id(
        "person-disconnect"
    ).click()
    expect(admin.locator("action-result")).to_contain_text("Disconnected 1 connection(s)")
    load.wait_for_function(
        f"() => window.closes.some(c => c.client === '{dropped}' && c.code === 4001)",
        timeout=WAIT_MS,
    )
    expect(admin.locator("person")).to_have_count(1)
    assert load.evaluate("window.closes.length") == 1  # the other one stays
    # From the overview: disconnect by client id.
    admin.page.goto(server.url + "/admin#/")
    admin.locator("disconnect-kind").select_option("client")
    admin.locator("disconnect-name").fill(kept)
    admin.locator("disconnect-submit").click()
    expect(admin.locator("action-result")).to_contain_text("Disconnected 1 connection(s)")
    load.wait_for_function(
        f"() => window.closes.some(c => c.client === '{kept}' && c.code === 4001)",
        timeout=WAIT_MS,
    )
    admin.clean()


def test_actions_are_refused_without_the_csrf_token_or_the_session(
    open_admin: Any, server: ServerProcess
) -> None:
    admin = open_admin(server.url)
    admin.login()
    expect(admin.locator("overview-view")).to_be_visible()
    send = """async ([path, body, csrf]) => {
        const headers = {'Content-Type': 'application/json'};
        if (csrf) headers['X-CSRF-Token'] = window.plexusAdmin.state.csrf;
        const r = await fetch(path, {method: 'POST', headers, body: JSON.stringify(body)});
        return [r.status, (await r.json()).error?.code ?? null];
    }"""
    publish = {"channel": "chat:refused", "data": "no"}
    disconnect = {"client": "c-somebody"}
    assert admin.page.evaluate(send, ["/admin/api/publish", publish, False]) == [
        403,
        "permission_denied",
    ]
    assert admin.page.evaluate(send, ["/admin/api/disconnect", disconnect, False]) == [
        403,
        "permission_denied",
    ]
    assert admin.page.evaluate(send, ["/admin/api/disconnect", disconnect, True]) == [200, None]
    admin.page.context.clear_cookies()
    assert admin.page.evaluate(send, ["/admin/api/publish", publish, True]) == [
        401,
        "unauthorized",
    ]
    assert api_history(server.url, "chat:refused") == []
    admin.clean()


# ----- what users supply is text


def test_html_in_names_payloads_and_presence_is_shown_as_text(
    open_admin: Any, server: ServerProcess, load: Any
) -> None:
    evil = "<img src=x onerror=alert(1)><b>bold</b>"
    token = make_token(JWT_SECRET, user="<script>alert(2)</script>")
    load.open_clients(1, ["chat:html"], token=token, info={"nick": evil})
    api_publish(server.url, "chat:html", {"text": evil})
    admin = open_admin(server.url)
    admin.login()
    expect(admin.locator("overview-view")).to_be_visible()
    # A channel name with HTML in it: refused by the server, its message shown as text.
    admin.locator("open-name").fill('<img src=x onerror="alert(3)">')
    admin.locator("open-submit").click()
    expect(admin.locator("channel-error")).to_contain_text(
        "invalid_channel: invalid channel name '<img src=x onerror=\"alert(3)\">'"
    )
    admin.page.goto(server.url + "/admin#/channel/chat%3Ahtml")
    expect(admin.locator("person-user")).to_have_text("<script>alert(2)</script>")
    expect(admin.locator("person-info")).to_have_text(compact({"nick": evil}))
    expect(admin.locator("history-row").get_by_test_id("event-data")).to_have_text(
        compact({"text": evil})
    )
    expect(admin.locator("tail-state")).to_have_attribute("data-state", "on")
    api_publish(server.url, "chat:html", evil)
    expect(admin.locator("tail-row").get_by_test_id("event-data")).to_have_text(json.dumps(evil))
    main = admin.page.locator("main")
    assert main.locator("img, b, script").count() == 0
    admin.clean()  # no alert() ran


# ----- the cookie stays home


class EvilSite:
    """A page of another origin that makes the admin's browser post to the server."""

    def __init__(self, target: str) -> None:
        page = f"""<!doctype html><title>evil</title><body><script>
        window.attempts = [];
        const target = {json.dumps(target)};
        const body = JSON.stringify({{channel: 'chat:attack', data: 'forged'}});
        async function attack() {{
          for (const [name, init] of [
            ['no-cors text', {{method: 'POST', mode: 'no-cors', credentials: 'include', body}}],
            ['cors json', {{method: 'POST', credentials: 'include', body,
              headers: {{'Content-Type': 'application/json', 'X-CSRF-Token': 'guess'}}}}],
          ]) {{
            try {{
              const r = await fetch(target + '/admin/api/publish', init);
              window.attempts.push([name, 'sent', r.type]);
            }} catch (e) {{
              window.attempts.push([name, 'blocked', String(e)]);
            }}
          }}
          try {{
            const r = await fetch(target + '/admin/api/session', {{credentials: 'include'}});
            window.attempts.push(['read session', 'read', await r.text()]);
          }} catch (e) {{
            window.attempts.push(['read session', 'blocked', String(e)]);
          }}
          const form = document.createElement('form');
          form.method = 'POST';
          form.enctype = 'text/plain';
          form.action = target + '/admin/api/publish';
          form.target = 'sink';
          const field = document.createElement('input');
          field.name = '{{"channel": "chat:attack", "data": "form", "x": "';
          field.value = '"}}';
          form.append(field);
          document.body.append(form);
          const sink = document.createElement('iframe');
          sink.name = 'sink';
          document.body.append(sink);
          // Set after insertion: the next load is the answer to the form.
          sink.onload = () => window.attempts.push(['form', 'sent', '']);
          form.submit();
        }}
        attack();
        </script></body>""".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EvilSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # same site / another site
def test_the_session_cookie_cannot_be_used_from_another_origin(
    open_admin: Any, server: ServerProcess, host: str
) -> None:
    admin = open_admin(server.url)
    admin.login()
    expect(admin.locator("overview-view")).to_be_visible()
    with EvilSite(server.url) as evil:
        attacker = admin.page.context.new_page()  # same browser, same cookie jar
        attacker.goto(f"http://{host}:{evil.port}/")
        attacker.wait_for_function("() => window.attempts.length === 4", timeout=WAIT_MS)
        attempts = {
            name: (outcome, detail)
            for name, outcome, detail in attacker.evaluate("window.attempts")
        }
    assert attempts["no-cors text"] == ("sent", "opaque")  # it left, and was refused
    assert attempts["cors json"][0] == "blocked"  # the preflight gets no CORS answer
    assert attempts["read session"][0] == "blocked"  # and no answer is readable
    assert attempts["form"][0] == "sent"
    assert api_history(server.url, "chat:attack") == []
    # The admin's own page still works with the same cookie.
    expect(admin.locator("total-nodes")).to_have_text("1")
    admin.clean()


# ----- off without a password, on a phone, two nodes


def test_admin_is_404_without_a_password(browser: Any, data_dir: Any) -> None:
    proc = ServerProcess(env={"PLEXUS_DATA_DIR": str(data_dir), "PLEXUS_ADMIN_PASSWORD": ""})
    proc.start()
    try:
        page = browser.new_page()
        response = page.goto(proc.url + "/admin")
        assert response is not None
        assert response.status == 404
        page.close()
    finally:
        stop_server(proc)


def test_usable_on_a_phone(open_admin: Any, server: ServerProcess, load: Any) -> None:
    load.open_clients(4, ["chat:phone"], info={"nick": "pat"})
    admin = open_admin(server.url, viewport={"width": 390, "height": 844})
    admin.login()
    expect(admin.locator("total-connections")).to_have_text("4")
    width = admin.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"no sideways scrolling on the overview (scrollWidth {width})"
    save_screenshot(admin, "admin-phone")
    admin.locator("channel-link").filter(has_text="chat:phone").click()
    expect(admin.locator("person")).to_have_count(4)
    width = admin.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"no sideways scrolling on a channel page (scrollWidth {width})"
    admin.clean()


def test_two_nodes_on_redis_are_both_listed(
    open_admin: Any, redis_server: RedisServer, redis_prefix: str, data_dir: Any
) -> None:
    nodes = []
    for name in ("node-a", "node-b"):
        proc = ServerProcess(
            env={
                "PLEXUS_ENGINE": "redis",
                "PLEXUS_REDIS_URL": redis_server.url,
                "PLEXUS_REDIS_PREFIX": redis_prefix,
                "PLEXUS_NODE_NAME": name,
                "PLEXUS_ADMIN_PASSWORD": PASSWORD,
            }
        )
        proc.start()
        nodes.append(proc)
    try:
        admin = open_admin(nodes[0].url)
        admin.login()
        expect(admin.locator("node-name")).to_have_text(["node-a", "node-b"])
        expect(admin.locator("total-nodes")).to_have_text("2")
        admin.clean()
    finally:
        for proc in nodes:
            stop_server(proc)
