"""Asking the application over HTTP: one `POST` with a JSON body per call.

One aiohttp session per server, opened at the first call: its connection
pool keeps the sockets to the application alive between calls. It keeps no
cookies: a `Set-Cookie` in one user's answer must never ride along on the
next user's call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson

from plexus.protocol.codec import json_loads_with_bytes, to_json_compatible

# An answer longer than this is not read to its end: no decision needs it.
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024


class CallFailed(Exception):
    """The application could not answer: `kind` is unreachable, status or bad_answer."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class HttpProxy:
    """Posts calls to the application's URLs (the `proxy_*_url` settings)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: dict[str, Any], headers: Mapping[str, str]) -> Any:
        """POST `body` as JSON with `headers`; return the answer's parsed JSON.

        The caller bounds the time. Bytes in `body` travel as `{"$bytes": base64}`,
        and come back as bytes.

        Raises:
            CallFailed: the application is unreachable, answered non-2xx, or
                answered something that is not JSON.
        """
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True
            )
        payload = orjson.dumps(to_json_compatible(body))
        sent = {**headers, "Content-Type": "application/json"}
        try:
            async with session.post(url, data=payload, headers=sent, allow_redirects=False) as resp:
                raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, OSError) as exc:
            raise CallFailed("unreachable", f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise CallFailed("status", f"HTTP {status}")
        if len(raw) > MAX_ANSWER_BYTES:
            raise CallFailed("bad_answer", f"answer over {MAX_ANSWER_BYTES} bytes")
        try:
            return json_loads_with_bytes(raw)
        except Exception:
            raise CallFailed("bad_answer", "answer is not JSON") from None

    async def close(self) -> None:
        """Close the session and its pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
