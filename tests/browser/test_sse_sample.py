"""The SSE client sample of docs/protocol.md, run as it is in Chromium against a real server."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser.conftest import WAIT_MS
from tests.browser.test_chat import api_publish
from tests.helpers import ROOT, ServerProcess

pytestmark = pytest.mark.browser


def sse_sample() -> str:
    """The first JavaScript block of the SSE section of docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("## When WebSocket is blocked: the SSE transport", 1)[1]
    found = re.search(r"```js\n(.*?)```", section, re.DOTALL)
    assert found is not None, "no JavaScript sample in the SSE section"
    return found.group(1)


def test_the_documented_sse_client_subscribes_and_receives(
    browser: Any, server: ServerProcess
) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        # What the sample logs is kept for the test to read.
        page.add_init_script("window.logged = []; console.log = (...a) => window.logged.push(a);")
        page.goto(server.url + "/health")
        sample = sse_sample().replace('"http://127.0.0.1:8000"', f'"{server.url}"')
        assert server.url in sample, "the sample no longer names the server this way"
        page.add_script_tag(content='const token = "";\n' + sample, type="module")
        page.wait_for_function(
            "() => window.logged.some(([m]) => m.type === 'reply' && m.id === 1)",
            timeout=WAIT_MS,
        )
        offset = api_publish(server, "chat:lobby", {"text": "hello"})
        page.wait_for_function(
            "(offset) => window.logged.some(([m]) => m.type === 'message' && m.offset === offset)",
            arg=offset,
            timeout=WAIT_MS,
        )
        logged = page.evaluate("window.logged")
        assert [args[0]["type"] for args in logged] == ["reply", "message"]
        assert logged[1][0]["data"] == {"text": "hello"}
    finally:
        context.close()
