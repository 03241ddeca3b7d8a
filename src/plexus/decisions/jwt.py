"""JWT connection and subscription tokens: verification (making them is `plexus.tokens`).

Pure: no I/O except reading the key files once, when an `Authenticator` is built.

Guarantees of `Authenticator`:

- A token is accepted only if its signature verifies with a configured key. The
  algorithm is taken from the token header but must belong to the key that verifies
  it: `HS256/HS384/HS512` only with `jwt_secret`, `RS256/RS384/RS512/PS256` only with
  an RSA public key, `ES256`/`ES384` only with a P-256/P-384 public key (from
  `jwt_public_key` or `jwt_jwks_file`). `alg: none` is never accepted. So a token
  "signed" with the public key's PEM text as an HMAC secret (the classic algorithm
  confusion attack) is refused: HMAC tokens are only ever checked against the secret.
- `aud` and `iss` are checked when `jwt_audience` / `jwt_issuer` are set; as RFC 7519
  4.1.3 requires, a token carrying an `aud` claim is refused when the server has no
  audience configured or is not named in it.
- `exp` and `nbf` are optional; when present they must be numbers and are enforced
  with `leeway` seconds of tolerance for clock skew.
- Every refusal raises one typed error with a short ASCII message fit for a close
  reason or an error reply; the token itself is never echoed back.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from plexus.decisions.calls import Credentials
from plexus.exceptions import AuthError, ConfigError, PermissionDenied
from plexus.protocol.codes import CloseCode
from plexus.tokens import HMAC_MIN_BYTES, make_token, parse_duration

if TYPE_CHECKING:
    from plexus.config import Settings

__all__ = ["Authenticator", "Credentials", "make_token", "parse_duration"]

RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256"})
EC_ALGORITHMS: Final[Mapping[str, str]] = {"secp256r1": "ES256", "secp384r1": "ES384"}
RSA_MIN_BITS: Final = 2048  # NIST SP 800-131A; PyJWT warns below it

_NO_KEYS: Final = "this server has no JWT keys configured"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class _Refused(Exception):
    """Internal: why a token is refused; `expired` tells 4002 from 4001.

    The public methods word the message for their token kind, unless `bare`.
    """

    def __init__(self, reason: str, *, expired: bool = False, bare: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired
        self.bare = bare

    def message(self, kind: str) -> str:
        """The reason, worded for a `kind` ("token" or "subscription token")."""
        if self.bare:
            return str(self)
        return f"{kind} expired" if self.expired else f"invalid {kind}: {self}"


@dataclass(frozen=True, slots=True)
class _Key:
    """A verification key and the algorithms it may verify."""

    key: PublicKey
    algorithms: frozenset[str]


class Authenticator:
    """Verifies connection and subscription JWTs against the configured keys.

    Build it once at start (`from_settings`); verification is then pure CPU work and
    safe to call from any task. See the module docstring for the guarantees.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_file: str | None = None,
        jwks_file: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0,
    ) -> None:
        """Load the keys.

        Args:
            secret: shared HMAC secret, at least 32 bytes (UTF-8).
            public_key_file: a PEM file holding an RSA or EC public key, or a
                certificate.
            jwks_file: a JSON Web Key Set file `{"keys": [...]}`; a token picks its
                key by the `kid` header. Symmetric (`oct`) keys, keys for encryption
                (`"use": "enc"`) and unsupported key types are skipped.
            audience: when set, tokens must carry it in `aud`.
            issuer: when set, tokens must carry it as `iss`.
            leeway: seconds of tolerance on `exp` and `nbf` for clock skew.

        Raises:
            ConfigError: naming the setting, for a short secret, an unreadable or
                unsupported key file, or a negative leeway.
        """
        if leeway < 0:
            raise ConfigError(f"leeway: must be >= 0, got {leeway}")
        self._secret: bytes | None = None
        if secret:  # an empty secret would sign with an empty HMAC key: treat as unset
            self._secret = secret.encode("utf-8")
            if len(self._secret) < HMAC_MIN_BYTES["HS256"]:
                raise ConfigError(
                    f"jwt_secret: must be at least {HMAC_MIN_BYTES['HS256']} bytes"
                    f" (RFC 7518 3.2), got {len(self._secret)}"
                )
        self._public_key = _load_pem(public_key_file) if public_key_file else None
        self._jwks = _load_jwks(jwks_file) if jwks_file else None
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = float(leeway)

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """An authenticator for the `jwt_*` settings, with no clock-skew leeway."""
        return cls(
            secret=settings.jwt_secret,
            public_key_file=settings.jwt_public_key,
            jwks_file=settings.jwt_jwks_file,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured, so tokens can be verified."""
        return self._secret is not None or self._public_key is not None or bool(self._jwks)

    def verify_connection(self, token: str, *, now: float | None = None) -> Credentials:
        """Verify a connection token (`?token=` or the `auth` command).

        The token must carry a non-empty string `sub`; it may carry `exp`, `nbf`,
        `info` (any JSON) and `channels` (a list of strings). A subscription token
        (one with a `channel` claim) is refused here, so it cannot stand in for a
        connection token.

        Raises:
            AuthError: close code 4002 (`TOKEN_EXPIRED`) if the token is valid but
                expired, else 4001 (`UNAUTHORIZED`).
        """
        now = time.time() if now is None else now
        try:
            claims = self._verify(token, now)
            user = claims.get("sub")
            if not isinstance(user, str) or not user:
                raise _Refused("sub claim must be a non-empty string")
            if "channel" in claims:
                raise _Refused("a subscription token cannot authenticate")
            channels = claims.get("channels", [])
            if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
                raise _Refused("channels claim must be a list of strings")
            self._check_expiry(claims, now)
        except _Refused as exc:
            code = CloseCode.TOKEN_EXPIRED if exc.expired else CloseCode.UNAUTHORIZED
            raise AuthError(exc.message("token"), code) from None
        return Credentials(
            user=user,
            expires_at=_expiry(claims),
            info=claims.get("info"),
            channels=tuple(channels),
            claims=claims,
        )

    def verify_subscription(
        self,
        token: str,
        *,
        user: str | None,
        client: str,
        channel: str,
        now: float | None = None,
    ) -> Credentials:
        """Verify a subscription token for a private channel.

        The token's `channel` claim must equal `channel`; its `sub` must equal the
        connection's `user`, or be absent or `""` when the connection is anonymous
        (`user` None); if it carries a `client` claim, that must equal `client`
        (a token bound to one connection). `exp`, `nbf`, `aud` and `iss` are checked
        as for connection tokens.

        Returns:
            Credentials with the connection's user, the token's expiry and `info`.

        Raises:
            PermissionDenied: for any refusal, expiry included: the subscription is
                refused with an error reply, the connection stays open.
        """
        now = time.time() if now is None else now
        try:
            claims = self._verify(token, now)
        except _Refused as exc:
            raise PermissionDenied(exc.message("subscription token")) from None
        if claims.get("channel") != channel:
            raise PermissionDenied("subscription token is for another channel")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise PermissionDenied("subscription token: sub claim must be a string")
        if (sub or None) != user:
            raise PermissionDenied("subscription token is for another user")
        if "client" in claims and claims["client"] != client:
            raise PermissionDenied("subscription token is for another connection")
        try:
            self._check_expiry(claims, now)
        except _Refused as exc:
            raise PermissionDenied(exc.message("subscription token")) from None
        return Credentials(
            user=user, expires_at=_expiry(claims), info=claims.get("info"), channels=()
        )

    # ----- internals

    def _verify(self, token: str, now: float) -> dict[str, Any]:
        """Return the claims of a token whose signature, aud, iss and nbf hold.

        `exp` is only type-checked here: the callers check it last (`_check_expiry`),
        so that "expired" (4002: refresh and retry) is said only of a token that
        would otherwise be accepted.
        """
        if not self.enabled:
            raise _Refused(_NO_KEYS, bare=True)
        if not isinstance(token, str) or not token:
            raise _Refused("empty")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Refused("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise _Refused("no alg in header")
        if alg.lower() == "none":
            raise _Refused("unsigned tokens (alg none) are refused")
        key = self._key_for(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                # Exactly the one algorithm the chosen key may verify: PyJWT then
                # refuses any header that does not match it.
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                # exp/nbf/iat are checked below against `now` (PyJWT reads the clock
                # itself and insists on integers, where RFC 7519 allows any number).
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise _Refused("bad signature") from None
        except jwt.InvalidAudienceError:
            raise _Refused("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _Refused("wrong issuer") from None
        except jwt.exceptions.InvalidSubjectError:
            raise _Refused("sub claim must be a string") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _Refused(f"no {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise _Refused("malformed") from None
        if self._audience is None and "aud" in claims:
            # PyJWT lets an empty `aud` ("" or []) through when no audience is
            # expected; RFC 7519 4.1.3 refuses any token that carries one.
            raise _Refused("wrong audience")
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and not _is_time(value):
                raise _Refused(f"{name} claim must be a number")
        nbf = claims.get("nbf")
        if nbf is not None and now + self._leeway < nbf:
            raise _Refused("not valid yet (nbf)")
        return claims

    def _check_expiry(self, claims: Mapping[str, Any], now: float) -> None:
        exp = claims.get("exp")
        if exp is not None and now >= exp + self._leeway:
            raise _Refused("expired", expired=True)

    def _key_for(self, alg: str, kid: Any) -> bytes | PublicKey:
        """The one key that may verify a token with header `alg` and `kid`."""
        if alg in HMAC_MIN_BYTES:
            if self._secret is None:
                raise _Refused(f"alg {alg} is not accepted by this server")
            if len(self._secret) < HMAC_MIN_BYTES[alg]:
                # PyJWT would verify but warn on every call; refusing is clearer.
                raise _Refused(f"alg {alg} needs a longer secret than this server's")
            return self._secret
        if kid is not None and not isinstance(kid, str):
            raise _Refused("kid must be a string")
        chosen: _Key | None
        if kid is not None and self._jwks:
            chosen = self._jwks.get(kid)
            if chosen is None:
                raise _Refused("unknown kid")
        elif self._public_key is not None:
            chosen = self._public_key
        elif self._jwks and len(self._jwks) == 1:
            chosen = next(iter(self._jwks.values()))
        elif self._jwks:
            raise _Refused("no kid, and the key set has several keys")
        else:
            chosen = None
        if chosen is None or alg not in chosen.algorithms:
            raise _Refused(f"alg {alg} is not accepted by this server")
        return chosen.key


def _is_time(value: object) -> bool:
    """True for a NumericDate (RFC 7519 2): a finite int or float.

    Python's JSON parser accepts NaN and Infinity, which would never expire.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _expiry(claims: Mapping[str, Any]) -> float | None:
    exp = claims.get("exp")
    return None if exp is None else float(exp)


def _algorithms_of(key: object) -> frozenset[str]:
    """The algorithms a public key may verify; empty for an unsupported key."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGORITHMS:
        return frozenset({EC_ALGORITHMS[key.curve.name]})
    return frozenset()


def _check_rsa_size(key: object, where: str) -> None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        raise ConfigError(f"{where}: RSA key of {key.key_size} bits, need >= {RSA_MIN_BITS}")


def _load_pem(path: str) -> _Key:
    """Read a PEM public key (or certificate) file, or raise ConfigError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"jwt_public_key: cannot read {path}: {exc.strerror}") from None
    key: object
    try:
        key = load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ConfigError(
                f"jwt_public_key: {path} holds no PEM public key or certificate"
            ) from None
    algorithms = _algorithms_of(key)
    if not algorithms or not isinstance(key, PublicKey):
        raise ConfigError(
            f"jwt_public_key: {path}: unsupported key type; use RSA or EC P-256/P-384"
        )
    _check_rsa_size(key, "jwt_public_key")
    return _Key(key, algorithms)


def _load_jwks(path: str) -> dict[str | None, _Key]:
    """Read a JWKS file into {kid: key}, or raise ConfigError.

    A key without `kid` is stored under None.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"jwt_jwks_file: cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"jwt_jwks_file: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError(f'jwt_jwks_file: {path} is not a key set {{"keys": [...]}}')
    # HMAC keys belong in jwt_secret (they must never verify with a public key
    # set), and encryption keys do not verify signatures.
    usable = [
        k
        for k in data["keys"]
        if isinstance(k, dict) and k.get("kty") != "oct" and k.get("use", "sig") == "sig"
    ]
    try:
        keyset = jwt.PyJWKSet(usable)
    except jwt.PyJWTError as exc:
        raise ConfigError(f"jwt_jwks_file: {path}: {exc}") from None
    declared = {k.get("kid"): k.get("alg") for k in usable}
    keys: dict[str | None, _Key] = {}
    for jwk in keyset:
        key = jwk.key
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            key = key.public_key()  # a set may hold private JWKs; verify with their public half
        algorithms = _algorithms_of(key)
        alg = declared.get(jwk.key_id)
        if isinstance(alg, str):
            # A JWK that names its algorithm verifies that one only (RFC 7517 4.4).
            algorithms &= {alg}
        if not algorithms or not isinstance(key, PublicKey):
            continue
        _check_rsa_size(key, f"jwt_jwks_file: key {jwk.key_id!r}")
        if jwk.key_id in keys:
            # Selection is by kid alone: a second key under one kid could never be used.
            raise ConfigError(f"jwt_jwks_file: {path}: two keys with kid {jwk.key_id!r}")
        keys[jwk.key_id] = _Key(key, algorithms)
    if not keys:
        raise ConfigError(
            f"jwt_jwks_file: {path} has no usable signature key (RSA or EC P-256/P-384)"
        )
    return keys
