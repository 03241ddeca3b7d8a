"""End-to-end: what a newcomer tries first works (issue 12, item 7).

`make serve` and the `plexus` command in child processes, the README's
samples saved as scripts, an embedded server stopped with SIGTERM, the
browser client imported from another origin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from plexus.app import Server
from plexus.config import load_settings
from tests.conftest import ServerFactory
from tests.helpers import ROOT, TIMEOUT, ServerProcess, free_port

SECRET = "newcomer-suite-secret-0123456789abcdef"
PLEXUS = [sys.executable, "-m", "plexus"]


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a command without blocking the loop (in-process servers keep serving)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        env={**os.environ, **(env or {})},
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ----- make serve, PLEXUS_URL


def test_make_serve_honours_plexus_port_and_host(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PLEXUS_PORT": str(port),
        "PLEXUS_HOST": "127.0.0.1",
        "PLEXUS_DATA_DIR": str(tmp_path),
        "PORT": "1",  # only `make serve PORT=...` on the command line counts
    }
    proc = subprocess.Popen(
        ["make", "-s", "serve"],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make's child is ours to stop with it
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert f"listening on http://127.0.0.1:{port} " in "".join(lines), lines
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_publish_and_subscribe_read_plexus_url(make_server: ServerFactory) -> None:
    server = await make_server()
    env = {"PLEXUS_URL": server.ws_url}
    subscribing = asyncio.ensure_future(
        run(*PLEXUS, "subscribe", "chat:env", "--count", "1", env=env)
    )
    # The subscriber is there once the channel has one.
    assert server.node is not None
    while server.node.hub.subscriber_count("chat:env") == 0:
        assert not subscribing.done(), await subscribing
        await asyncio.sleep(0.02)  # sleep-ok: polls another process's progress, bounded below
    code, out, err = await run(*PLEXUS, "publish", "chat:env", '{"n": 1}', env=env)
    assert (code, err) == (0, "")
    assert '"offset":1' in out
    code, out, err = await asyncio.wait_for(subscribing, TIMEOUT)
    assert code == 0, err
    assert '"data":{"n":1}' in out
    code, out, err = await run(*PLEXUS, "publish", "news", "2", "--api", env=env)
    assert (code, out.strip()) == (0, '{"offset":1}'), err


# ----- plexus token, plexus checkconfig


async def test_token_takes_several_channels_an_audience_and_an_issuer() -> None:
    code, out, err = await run(
        *PLEXUS,
        *("token", "--user", "alice", "--secret", SECRET, "--ttl", "10m"),
        *("--channel", "#alice", "--channel", "news", "--aud", "app", "--iss", "me"),
    )
    assert code == 0, err
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"], audience="app", issuer="me")
    assert claims["channels"] == ["#alice", "news"]
    assert claims["exp"] - claims["iat"] == 600
    code, out, err = await run(
        *PLEXUS, "token", "--user", "", "--subscription", "orders:1", "--secret", SECRET
    )
    assert code == 0, err
    assert jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["channel"] == "orders:1"
    code, out, err = await run(
        *PLEXUS,
        *("token", "--user", "a", "--secret", SECRET, "--subscription", "x", "--channel", "y"),
    )
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "--subscription makes a subscription token" in err


async def test_checkconfig_prints_the_effective_settings_with_secrets_masked(
    tmp_path: Path,
) -> None:
    config = tmp_path / "plexus.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            port = 9001
            data_dir = "{tmp_path / "data"}"
            jwt_secret = "{SECRET}"
            api_keys = ["key-one", "key-two"]
            redis_url = "redis://:hunter2@127.0.0.1:6379/0"
            proxy_subscribe_url = "http://127.0.0.1:5000/plexus/subscribe"
            [namespaces.room]
            proxy_subscribe = true
            [personal]
            history_size = 500
            """
        )
    )
    code, out, err = await run(*PLEXUS, "checkconfig", str(config), env={"PLEXUS_PORT": "9002"})
    assert code == 0, err
    for secret in (SECRET, "key-one", "hunter2"):
        assert secret not in out
    printed = tomllib.loads(out)  # the output is TOML: the comments say what is unset
    expected = load_settings(config, {"PLEXUS_PORT": "9002"})
    assert printed["port"] == 9002, "the environment is on top of the file"
    assert printed["jwt_secret"] == "***"
    assert printed["api_keys"] == ["***", "***"]
    assert printed["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    assert printed["namespaces"]["room"]["proxy_subscribe"] is True
    assert printed["personal"]["history_size"] == 500
    assert printed["personal"]["recovery"] is True
    assert printed["proxy_timeout"] == expected.proxy_timeout
    assert "# certfile = (unset)" in out

    for text, message in (
        ("port = 'x'", "port: expected an integer"),
        ("[namespaces.room]\nproxy_publish = true", "namespaces.room.proxy_publish: set"),
        ('hooks = "no_such_hooks_module"', "hooks: cannot import 'no_such_hooks_module'"),
        ("proxy_timeout = -1", "proxy_timeout: must be > 0"),
        ('proxy_headers = ["Host"]', "proxy_headers: Host belongs to the upgrade itself"),
        ("[personal]\nhistory_size = -1", "personal.history_size: must be >= 0"),
    ):
        config.write_text(text + "\n")
        code, out, err = await run(*PLEXUS, "checkconfig", str(config))
        assert (code, out) == (2, ""), text
        assert err == f"plexus: invalid setting: {err.split(': ', 2)[2]}"
        assert message in err, err
        assert err.count("\n") == 1, err


# ----- README samples


def python_samples(path: Path) -> list[tuple[int, str, bool]]:
    """The ```python blocks of a Markdown file: (line, code, marked `<!-- test: run -->`)."""
    text = path.read_text(encoding="utf-8")
    samples = []
    for match in re.finditer(r"(<!-- test: run -->\n)?```python\n(.*?)```", text, re.DOTALL):
        line = text.count("\n", 0, match.start(2)) + 1
        samples.append((line, match.group(2), match.group(1) is not None))
    return samples


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_every_python_sample_is_a_valid_script(path: Path) -> None:
    for line, code, _ in python_samples(path):
        # As a module (no top-level await, which only `python -m asyncio` accepts).
        compile(code, f"{path.name}:{line}", "exec", dont_inherit=True)


def test_the_readme_samples_marked_to_run_run_against_a_server(tmp_path: Path) -> None:
    runnable = [(line, code) for line, code, run in python_samples(ROOT / "README.md") if run]
    assert len(runnable) >= 2
    env = {"PLEXUS_HISTORY_BACKEND": "memory", "PLEXUS_JWT_SECRET": SECRET}
    with ServerProcess(env=env) as server:
        for line, code in runnable:
            script = tmp_path / f"readme_{line}.py"
            script.write_text(code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"))
            done = subprocess.run(
                [sys.executable, str(script)],
                env={**os.environ, "PLEXUS_JWT_SECRET": SECRET},
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert done.returncode == 0, f"README.md line {line}:\n{done.stderr}"


# ----- an embedded server and SIGTERM


EMBEDDED = """
import asyncio, sys
from plexus.app import Server
from plexus.config import Settings

async def main():
    async with Server(Settings(port=0, history_backend="memory")) as server:
        print(server.ws_url, flush=True)
        await server.wait_closed()
    print("stopped", flush=True)

asyncio.run(main())
"""


async def test_an_embedded_server_closes_with_1001_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        EMBEDDED,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode().strip()
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            welcome = await ws.receive_json(timeout=TIMEOUT)
            assert welcome["type"] == "welcome"
            proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(TIMEOUT)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        rest, errors = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        assert proc.returncode == 0, errors.decode()
        assert rest.decode().strip() == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ----- the browser client from another origin, and refused origins in the log


async def test_plexus_js_can_be_imported_from_an_allowed_origin(
    make_server: ServerFactory,
) -> None:
    server = await make_server(allowed_origins=["https://app.example.com"])
    async with aiohttp.ClientSession() as session:

        async def get(origin: str | None) -> Any:
            headers = {} if origin is None else {"Origin": origin}
            async with session.get(server.url + "/plexus.js", headers=headers) as resp:
                assert resp.status == 200
                assert "javascript" in resp.content_type
                return resp.headers

        allowed = await get("https://app.example.com")
        assert allowed["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert allowed["Vary"] == "Origin"
        for origin in ("https://evil.example", None):
            assert "Access-Control-Allow-Origin" not in await get(origin)
        async with session.get(
            server.url + "/app.js", headers={"Origin": "https://app.example.com"}
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers, "only the browser client"


async def test_a_refused_origin_is_logged_once_at_info(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plexus")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(server.ws_url, headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403
    found = [r for r in caplog.records if "refused origin" in r.getMessage()]
    assert len(found) == 1
    assert found[0].levelno == logging.INFO
    assert "'https://evil.example'" in found[0].getMessage()
