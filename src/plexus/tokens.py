"""Making JWTs for Plexus: connection and subscription tokens, and durations.

Light on purpose: a backend that only hands tokens to its pages (a Django or
Flask view) imports this with the standard library alone. HMAC tokens
(`HS256/384/512`, the common case) are signed here with `hmac`; RSA and EC
ones need PyJWT and `cryptography`, imported only when such a token is made.
Verification lives in `plexus.decisions.jwt`, on the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["HMAC_MIN_BYTES", "make_token", "parse_duration"]

# Minimum HMAC secret length per algorithm: the hash output size (RFC 7518 3.2).
# A shorter secret can be brute-forced offline from any one token it signed.
HMAC_MIN_BYTES: Final[Mapping[str, int]] = {"HS256": 32, "HS384": 48, "HS512": 64}
_HMAC_HASHES: Final[Mapping[str, Callable[..., Any]]] = {
    "HS256": hashlib.sha256,
    "HS384": hashlib.sha384,
    "HS512": hashlib.sha512,
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    # Strict JSON (no NaN): a token the server could not parse is worse than an error now.
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def make_token(
    secret: str,
    *,
    user: str,
    ttl: float | None = 3600,
    channel: str | None = None,
    info: Any = None,
    channels: list[str] | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """Sign a connection token (or, with `channel`, a subscription token).

    Args:
        secret: the HMAC secret, or a PEM private key for RS*/PS*/ES* algorithms.
        user: the `sub` claim (`""` for an anonymous subscription token).
        ttl: seconds until `exp` (rounded down to whole seconds); None for no `exp`.
        channel: makes a subscription token for this channel.
        info: the `info` claim (any JSON value); omitted when None.
        channels: the `channels` claim: channels to subscribe to on connect.
        audience: the `aud` claim. issuer: the `iss` claim.
        algorithm: the JWS algorithm; never `none`.
        now: the issue time (unix seconds), default the current time.

    Raises:
        ValueError: for `alg none`, an unknown algorithm, a key that does not fit
            it, an HMAC secret shorter than the algorithm needs, or claims that
            are not JSON.
    """
    if algorithm.lower() == "none":
        raise ValueError("algorithm none makes unsigned tokens; refusing")
    if algorithm in HMAC_MIN_BYTES and len(secret.encode("utf-8")) < HMAC_MIN_BYTES[algorithm]:
        raise ValueError(
            f"secret: {algorithm} needs at least {HMAC_MIN_BYTES[algorithm]} bytes (RFC 7518 3.2)"
        )
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": user, "iat": int(issued)}
    if ttl is not None:
        claims["exp"] = int(issued + ttl)
    if channel is not None:
        claims["channel"] = channel
    if info is not None:
        claims["info"] = info
    if channels is not None:
        claims["channels"] = list(channels)
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    digest = _HMAC_HASHES.get(algorithm)
    if digest is None:
        return _sign_with_pyjwt(claims, secret, algorithm)
    try:
        signing_input = f"{_b64(_json({'alg': algorithm, 'typ': 'JWT'}))}.{_b64(_json(claims))}"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot sign with {algorithm}: claims are not JSON: {exc}") from None
    signature = hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def _sign_with_pyjwt(claims: dict[str, Any], key: str, algorithm: str) -> str:
    """RSA and EC signatures: PyJWT with `cryptography`, imported now and only now."""
    import jwt

    try:
        return jwt.encode(claims, key, algorithm=algorithm)
    except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError) as exc:
        # Unknown algorithm, or a key that does not fit it (e.g. a PEM key as an
        # HMAC secret): one error type for the CLI to report.
        raise ValueError(f"cannot sign with {algorithm}: {exc}") from None


_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.ASCII)
_UNIT_SECONDS: Final[Mapping[str, float]] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration like `90`, `45s`, `30m`, `1h`, `2d` or `1.5h`.

    Raises:
        ValueError: with a message naming the accepted forms.
    """
    found = _DURATION.fullmatch(text.strip().lower())
    if found is None:
        raise ValueError(
            f"invalid duration {text!r}: expected a number of seconds, optionally"
            " followed by s, m, h or d (e.g. 90, 45s, 30m, 1h, 2d)"
        )
    return float(found.group(1)) * _UNIT_SECONDS[found.group(2)]
