"""JWT tokens: kept importable here; the code lives in `plexus.decisions.jwt` (verifying)
and `plexus.tokens` (making them)."""

from __future__ import annotations

from plexus.decisions.calls import Credentials
from plexus.decisions.jwt import Authenticator
from plexus.tokens import HMAC_MIN_BYTES, make_token, parse_duration

__all__ = ["HMAC_MIN_BYTES", "Authenticator", "Credentials", "make_token", "parse_duration"]
