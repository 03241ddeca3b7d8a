"""Who may use the admin page: logins, signed sessions, CSRF tokens, login limits.

Nothing here does I/O; the clock is passed in. A session is a JWT (HS256)
kept in an HttpOnly cookie: `sub` (who logged in), `sid` (a random id that
log lines carry), `via` (password or token) and `exp`. It is signed with
`admin_secret` when set (so every node accepts it and it survives restarts),
else with a random key made at start (a restart logs everyone out). The CSRF
token is an HMAC of the session id under the same key: the page reads it from
a same-origin JSON answer, which no other origin can read, and sends it in a
header with every state-changing request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

import jwt

from plexus.config import Settings
from plexus.protocol.limits import TokenBucket
from plexus.tokens import make_token

SESSION_AUDIENCE: Final = "plexus-admin-session"
TOKEN_AUDIENCE: Final = "plexus-admin"  # tokens minted by `plexus token --admin`
# The one answer to every refused login, whatever was wrong.
LOGIN_REFUSED: Final = "wrong password or token"
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
MAX_LOGIN_BYTES: Final = 4096  # longer input is refused before any check

# Login attempts (right or wrong): per client address a burst of 5 then one
# per 12 s; for the whole process a burst of 30 then one per second, which
# bounds a guesser spread over many addresses (and, the price of it, may make
# the operator wait during such an attack: the page says so).
ADDRESS_RATE: Final = 1 / 12
ADDRESS_BURST: Final = 5
GLOBAL_RATE: Final = 1.0
GLOBAL_BURST: Final = 30
MAX_ADDRESSES: Final = 10_000  # addresses remembered; the oldest is forgotten beyond


@dataclass(frozen=True, slots=True)
class AdminSession:
    """A logged-in admin, from a verified session cookie."""

    user: str
    sid: str
    via: str  # "password" or "token"
    expires: float

    def who(self) -> str:
        """How log lines name the person behind an action."""
        return f"{self.user} ({self.via} login, session {self.sid[:8]})"


def make_admin_token(secret: str, user: str, ttl: float, now: float | None = None) -> str:
    """An admin login token for the admin page (signed with `admin_secret`).

    The token logs `user` in once pasted into the login form, until `ttl`
    seconds from now; the session it opens lasts `admin_session_ttl`.

    Raises:
        ValueError: `secret` is shorter than 32 bytes.
    """
    return make_token(secret, user=user, ttl=ttl, audience=TOKEN_AUDIENCE, now=now)


class Sessions:
    """Checks logins and issues and verifies session cookies and CSRF tokens.

    Args:
        settings: `admin_password`, `admin_secret`, `admin_session_ttl`.
    """

    def __init__(self, settings: Settings) -> None:
        password = settings.admin_password
        # Compared as digests: equal lengths, so the comparison time says nothing.
        self._password = hashlib.sha256(password.encode()).digest() if password else None
        secret = settings.admin_secret
        self._token_key = secret.encode() if secret else None
        self._key = self._token_key or secrets.token_bytes(32)
        self.ttl = settings.admin_session_ttl

    # ----- login

    def check_login(self, given: str, now: float) -> tuple[str, str] | None:
        """`(user, via)` when `given` is the admin password or a valid admin token, else None."""
        if len(given) > MAX_LOGIN_BYTES:
            return None
        if self._password is not None:
            digest = hashlib.sha256(given.encode()).digest()
            if hmac.compare_digest(digest, self._password):
                return "admin", "password"
        if self._token_key is not None and _JWT_SHAPE.fullmatch(given):
            user = self._verify(given, self._token_key, TOKEN_AUDIENCE, now)
            if user is not None:
                return user[0], "token"
        return None

    # ----- sessions

    def issue(self, user: str, via: str, now: float) -> tuple[str, AdminSession]:
        """A new session for `user`: the cookie value and what it says."""
        session = AdminSession(user, secrets.token_hex(16), via, now + self.ttl)
        claims = {
            "sub": user,
            "aud": SESSION_AUDIENCE,
            "sid": session.sid,
            "via": via,
            "iat": int(now),
            "exp": int(session.expires),
        }
        return jwt.encode(claims, self._key, algorithm="HS256"), session

    def verify(self, cookie: str | None, now: float) -> AdminSession | None:
        """The session a cookie value stands for, or None (missing, forged, expired)."""
        if not cookie or len(cookie) > MAX_LOGIN_BYTES or not _JWT_SHAPE.fullmatch(cookie):
            return None
        found = self._verify(cookie, self._key, SESSION_AUDIENCE, now)
        if found is None:
            return None
        user, claims = found
        sid, via = claims.get("sid"), claims.get("via")
        if not isinstance(sid, str) or not sid or via not in ("password", "token"):
            return None
        return AdminSession(user, sid, str(via), float(claims["exp"]))

    def csrf_token(self, session: AdminSession) -> str:
        """The CSRF token of `session` (the page sends it as `X-CSRF-Token`)."""
        return hmac.new(self._key, b"csrf:" + session.sid.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, session: AdminSession, given: str | None) -> bool:
        """Whether `given` is the CSRF token of `session` (constant time)."""
        if not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(session).encode())

    @staticmethod
    def _verify(
        token: str, key: bytes, audience: str, now: float
    ) -> tuple[str, dict[str, Any]] | None:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                audience=audience,
                # Times are checked below against `now` (the caller's clock).
                options={
                    "require": ["sub", "exp", "aud"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            return None
        user, expires, begins = claims.get("sub"), claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(user, str) or not user:
            return None
        if not isinstance(expires, int | float) or not isinstance(begins, int | float):
            return None
        if expires <= now or begins > now:
            return None
        return user, claims


class LoginLimiter:
    """Bounds login attempts per client address and for the whole process."""

    def __init__(self, now: float) -> None:
        self._global = TokenBucket(GLOBAL_RATE, GLOBAL_BURST, now)
        self._addresses: dict[str, TokenBucket] = {}

    def allow(self, address: str, now: float) -> bool:
        """Count one attempt from `address`; False when it must be refused unchecked."""
        bucket = self._addresses.get(address)
        if bucket is None:
            if len(self._addresses) >= MAX_ADDRESSES:
                del self._addresses[next(iter(self._addresses))]
            bucket = self._addresses[address] = TokenBucket(ADDRESS_RATE, ADDRESS_BURST, now)
        return bucket.allow(now) and self._global.allow(now)
