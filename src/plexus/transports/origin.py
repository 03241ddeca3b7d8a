"""The WebSocket upgrade's Origin check: the defence against cross-site WebSocket hijacking."""

from __future__ import annotations

from typing import Final

from yarl import URL

LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _normalise(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(origin: str | None, scheme: str, host: str, allowed: list[str]) -> bool:
    """Whether an upgrade request's `Origin` header may open a WebSocket.

    Args:
        origin: the request's Origin header, None when it has none.
        scheme: `http` or `https`: how the request reached this server.
        host: the request's Host (`host[:port]`), which names the server's own origin.
        allowed: the `allowed_origins` setting.

    No Origin header (not a browser): allowed. With `allowed` set: the origin
    must be listed exactly (`scheme://host[:port]`), or `*` allows any. Unset:
    the server's own origin and localhost/127.0.0.1/[::1] on any port.
    """
    if origin is None:
        return True
    normalised = _normalise(origin)
    if allowed:
        return "*" in allowed or normalised in {_normalise(a) for a in allowed}
    if normalised == _normalise(f"{scheme}://{host}"):
        return True
    try:
        url = URL(origin)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and (url.host or "").lower() in LOCAL_HOSTS
