"""Who may talk to the server from a browser: the `Origin` and `Host` checks.

Two attacks come through a victim's browser. Cross-site WebSocket hijacking and
CSRF: a page of another site opens a WebSocket, or posts to `/api/*`, and the
browser says so in `Origin`. DNS rebinding: a page of another site points its
own name at this server's address, so that its requests are same-origin for the
browser; they then carry the attacker's name in `Host` (and in `Origin`), never
a loopback name or one the operator configured.

Everything here parses by hand and never raises: a malformed header (an IDNA
label that does not decode, a bracket left open, a port out of range) is simply
not allowed. Hosts are compared as sent (punycode, lower case), never decoded.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, NamedTuple

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# A registered name or IPv4 address as it appears in Host and Origin: letters,
# digits, '-', '_' and '.', nothing that needs decoding.
_NAME: Final = re.compile(r"[a-z0-9_.-]{1,253}")
_PORT: Final = re.compile(r"[0-9]{1,5}")


class Authority(NamedTuple):
    """A parsed `host[:port]`: lower-case host (IPv6 without brackets), port if given."""

    host: str
    port: int | None


class Origin(NamedTuple):
    """A parsed `scheme://host[:port]` (RFC 6454 serialisation)."""

    scheme: str
    host: str
    port: int  # the scheme's default when the origin names none


def parse_authority(value: str) -> Authority | None:
    """Parse a Host header or an origin's `host[:port]`; None when malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
        if not _NAME.fullmatch(host) or host.strip(".") == "":
            return None
        host = host.removesuffix(".")  # "localhost." names the same host
    if not rest:
        return Authority(host, None)
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]):
        return None
    port = int(rest[1:])
    if port > 65535:
        return None
    return Authority(host, port)


def parse_origin(value: str) -> Origin | None:
    """Parse an `Origin` header of an http(s) page; None for `null`, other schemes, garbage."""
    scheme, sep, rest = value.strip().lower().partition("://")
    if not sep or scheme not in DEFAULT_PORTS:
        return None
    authority = parse_authority(rest.removesuffix("/"))
    if authority is None:
        return None
    return Origin(scheme, authority.host, authority.port or DEFAULT_PORTS[scheme])


def is_loopback_address(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped form `::ffff:127.x.y.z`.

    A dual-stack socket reports IPv4 peers in the mapped form, which Python
    before 3.13 does not count as loopback.
    """
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_host(host: str) -> bool:
    """A host name that can only mean this machine: `localhost` or a loopback address.

    No DNS answer can make a browser send these for another site's page.
    """
    return host == "localhost" or is_loopback_address(host)


def host_allowed(host: str | None, allowed_hosts: list[str]) -> bool:
    """Whether a request's `Host` names this server: a loopback name or one of `allowed_hosts`.

    No Host header (HTTP/1.0, not a browser): allowed. `*` in `allowed_hosts`
    allows any well-formed Host. Ports are not compared.
    """
    if host is None:
        return True
    authority = parse_authority(host)
    if authority is None:
        return False
    if is_loopback_host(authority.host) or "*" in allowed_hosts:
        return True
    for entry in allowed_hosts:
        allowed = parse_authority(entry)
        if allowed is not None and allowed.host == authority.host:
            return True
    return False


def origin_allowed(
    origin: str | None,
    scheme: str,
    host: str | None,
    allowed_origins: list[str],
    allowed_hosts: list[str],
) -> bool:
    """Whether a request's `Origin` header may use this server (WebSocket or `/api/*`).

    Args:
        origin: the request's Origin header, None when it has none.
        scheme: `http` or `https`: how the request reached this server.
        host: the request's Host header (`host[:port]`), None when it has none.
        allowed_origins: the `allowed_origins` setting.
        allowed_hosts: the `allowed_hosts` setting.

    No Origin header (not a browser): allowed. With `allowed_origins` set: the
    origin must be listed (`scheme://host[:port]`, default ports implied), or
    `*` allows any. Unset: `localhost`, 127.x.y.z and `[::1]` origins on any
    port, and the server's own origin (`scheme://Host`) provided that Host is
    a loopback name or one of `allowed_hosts`: a rebinding page's origin equals
    its own Host too.
    """
    if origin is None:
        return True
    if allowed_origins and "*" in allowed_origins:
        return True
    parsed = parse_origin(origin)
    if parsed is None:
        return False
    if allowed_origins:
        return any(parse_origin(entry) == parsed for entry in allowed_origins)
    if is_loopback_host(parsed.host):
        return True
    if host is None or not host_allowed(host, allowed_hosts):
        return False
    own = parse_origin(f"{scheme}://{host}")
    return own is not None and own == parsed
