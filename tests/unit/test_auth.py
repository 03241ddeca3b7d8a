"""JWT verification (plexus.auth): pure, no event loop, a fixed clock."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.auth import Authenticator, Credentials, make_token, parse_duration
from plexus.config import Settings
from plexus.exceptions import AuthError, ConfigError, PermissionDenied
from plexus.protocol.codes import CloseCode, ErrorCode

NOW = 1_700_000_000.0
SECRET = "k" * 32  # the shortest secret HS256 accepts (RFC 7518 3.2)
LONG_SECRET = "L" * 64  # long enough for HS512
OTHER_SECRET = "x" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS built without PyJWT, which refuses to make the bad ones."""
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(signature)


def hs256_with(key: bytes, claims: dict[str, Any]) -> str:
    """HS256 over `claims` with any bytes as the HMAC key (PyJWT refuses PEM keys)."""
    header = {"alg": "HS256", "typ": "JWT"}
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**extra: Any) -> dict[str, Any]:
    """Valid connection-token claims for alice, expiring an hour after NOW."""
    base: dict[str, Any] = {"sub": "alice", "iat": int(NOW), "exp": int(NOW) + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


@dataclass
class Keys:
    """Key material and the files the authenticators read, made once per module."""

    rsa_key: rsa.RSAPrivateKey
    rsa_other: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    ec384: ec.EllipticCurvePrivateKey
    rsa_pem: Path
    ec_pem: Path
    cert_pem: Path
    jwks: Path

    def sign(self, kind: str, payload: dict[str, Any], kid: str | None = None) -> str:
        """Sign `payload` with the key `kind` (hs256, hs512, rs256, ps256, es256, ...)."""
        headers = {"kid": kid} if kid else None
        table: dict[str, tuple[Any, str]] = {
            "hs256": (SECRET, "HS256"),
            "hs512": (LONG_SECRET, "HS512"),
            "rs256": (self.rsa_key, "RS256"),
            "rs512": (self.rsa_key, "RS512"),
            "ps256": (self.rsa_key, "PS256"),
            "es256": (self.ec_key, "ES256"),
            "es384": (self.ec384, "ES384"),
            "rs256-other": (self.rsa_other, "RS256"),
        }
        key, alg = table[kind]
        return jwt.encode(payload, key, algorithm=alg, headers=headers)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    tmp = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec384 = ec.generate_private_key(ec.SECP384R1())
    (tmp / "rsa.pem").write_bytes(pem_public(rsa_key))
    (tmp / "ec.pem").write_bytes(pem_public(ec_key))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plexus-test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(rsa_key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    jwks = {
        "keys": [
            {**jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "r1"},
            {**jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "e1"},
            # Skipped: an HMAC key must never verify tokens against a public key set.
            {"kty": "oct", "kid": "h1", "k": b64(SECRET.encode())},
            # Skipped: an encryption key.
            {
                **jwt.algorithms.RSAAlgorithm.to_jwk(rsa_other.public_key(), as_dict=True),
                "kid": "enc",
                "use": "enc",
            },
        ]
    }
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    return Keys(
        rsa_key,
        rsa_other,
        ec_key,
        ec384,
        tmp / "rsa.pem",
        tmp / "ec.pem",
        tmp / "cert.pem",
        tmp / "jwks.json",
    )


def server(keys: Keys, kind: str, **options: Any) -> Authenticator:
    """An authenticator configured with the keys of `kind`."""
    configs: dict[str, dict[str, Any]] = {
        "secret": {"secret": SECRET},
        "long-secret": {"secret": LONG_SECRET},
        "rsa": {"public_key_file": str(keys.rsa_pem)},
        "cert": {"public_key_file": str(keys.cert_pem)},
        "ec": {"public_key_file": str(keys.ec_pem)},
        "jwks": {"jwks_file": str(keys.jwks)},
        "rsa+secret": {"public_key_file": str(keys.rsa_pem), "secret": SECRET},
        "none": {},
    }
    return Authenticator(**configs[kind], **options)


# ----- accepted connection tokens


@pytest.mark.parametrize(
    ("server_kind", "token_kind", "kid"),
    [
        ("secret", "hs256", None),
        ("long-secret", "hs512", None),
        ("rsa", "rs256", None),
        ("rsa", "rs512", None),
        ("rsa", "ps256", None),
        ("cert", "rs256", None),
        ("ec", "es256", None),
        ("jwks", "rs256", "r1"),
        ("jwks", "es256", "e1"),
        ("rsa+secret", "hs256", None),
        ("rsa+secret", "rs256", None),
    ],
)
def test_valid_connection_token(keys: Keys, server_kind: str, token_kind: str, kid: str) -> None:
    auth = server(keys, server_kind)
    token = keys.sign(token_kind, claims(), kid=kid)
    assert auth.verify_connection(token, now=NOW) == Credentials(
        user="alice", expires_at=NOW + 3600, info=None, channels=()
    )


def test_info_and_channels_are_surfaced(keys: Keys) -> None:
    info = {"name": "Alice", "langs": ["fr", "中文"]}
    token = keys.sign("hs256", claims(info=info, channels=["news", "#alice"]))
    credentials = server(keys, "secret").verify_connection(token, now=NOW)
    assert credentials.info == info
    assert credentials.channels == ("news", "#alice")


def test_token_without_exp_never_expires(keys: Keys) -> None:
    token = keys.sign("hs256", claims(exp=None))
    credentials = server(keys, "secret").verify_connection(token, now=NOW + 10 * 365 * 86400)
    assert credentials.expires_at is None


def test_leeway_tolerates_clock_skew(keys: Keys) -> None:
    auth = server(keys, "secret", leeway=30)
    token = keys.sign("hs256", claims(exp=int(NOW), nbf=int(NOW) + 20))
    assert auth.verify_connection(token, now=NOW + 10).user == "alice"
    with pytest.raises(AuthError) as refused:
        auth.verify_connection(token, now=NOW + 30)
    assert refused.value.close_code == CloseCode.TOKEN_EXPIRED


def test_audience_and_issuer_when_configured(keys: Keys) -> None:
    auth = server(keys, "secret", audience="plexus", issuer="https://id.example")
    token = keys.sign("hs256", claims(aud=["other", "plexus"], iss="https://id.example"))
    assert auth.verify_connection(token, now=NOW).user == "alice"


def test_default_clock_is_now(keys: Keys) -> None:
    token = make_token(SECRET, user="bob", ttl=60)
    assert server(keys, "secret").verify_connection(token).user == "bob"


# ----- refused connection tokens

Case = tuple[str, str, Callable[[Keys], str], CloseCode]
UNAUTHORIZED = CloseCode.UNAUTHORIZED


def _confusion(keys: Keys) -> str:
    # The classic attack: HS256 with the server's *public* key as the HMAC secret.
    return hs256_with(keys.rsa_pem.read_bytes(), claims())


def _tampered(keys: Keys) -> str:
    head, _, sig = keys.sign("hs256", claims()).split(".")
    return f"{head}.{b64(json.dumps(claims(sub='mallory')).encode())}.{sig}"


REFUSED: list[Case] = [
    ("forged signature", "secret", lambda k: jwt.encode(claims(), OTHER_SECRET), UNAUTHORIZED),
    ("tampered payload", "secret", _tampered, UNAUTHORIZED),
    ("alg none", "secret", lambda k: hand_made({"alg": "none"}, claims()), UNAUTHORIZED),
    ("alg None", "secret", lambda k: hand_made({"alg": "None"}, claims()), UNAUTHORIZED),
    ("alg none on rsa", "rsa", lambda k: hand_made({"alg": "none"}, claims()), UNAUTHORIZED),
    ("no alg", "secret", lambda k: hand_made({"typ": "JWT"}, claims(), b"x"), UNAUTHORIZED),
    ("alg confusion", "rsa", _confusion, UNAUTHORIZED),
    ("alg confusion, secret too", "rsa+secret", _confusion, UNAUTHORIZED),
    ("alg confusion, cert", "cert", _confusion, UNAUTHORIZED),
    ("rs256 on hmac server", "secret", lambda k: k.sign("rs256", claims()), UNAUTHORIZED),
    ("hs256 on rsa server", "rsa", lambda k: k.sign("hs256", claims()), UNAUTHORIZED),
    ("es256 on rsa server", "rsa", lambda k: k.sign("es256", claims()), UNAUTHORIZED),
    ("es384 on p-256 server", "ec", lambda k: k.sign("es384", claims()), UNAUTHORIZED),
    ("rs256 by another key", "rsa", lambda k: k.sign("rs256-other", claims()), UNAUTHORIZED),
    ("hs512 with short secret", "secret", lambda k: k.sign("hs512", claims()), UNAUTHORIZED),
    ("jwks unknown kid", "jwks", lambda k: k.sign("rs256", claims(), kid="zz"), UNAUTHORIZED),
    ("jwks kid of other alg", "jwks", lambda k: k.sign("rs256", claims(), kid="e1"), UNAUTHORIZED),
    ("jwks no kid, 2 keys", "jwks", lambda k: k.sign("rs256", claims()), UNAUTHORIZED),
    ("jwks enc key", "jwks", lambda k: k.sign("rs256-other", claims(), kid="enc"), UNAUTHORIZED),
    ("jwks oct key", "jwks", lambda k: hs256_with(SECRET.encode(), claims()), UNAUTHORIZED),
    ("expired", "secret", lambda k: k.sign("hs256", claims(exp=int(NOW))), CloseCode.TOKEN_EXPIRED),
    ("expired rsa", "rsa", lambda k: k.sign("rs256", claims(exp=1)), CloseCode.TOKEN_EXPIRED),
    (
        "expired and forged",
        "secret",
        lambda k: jwt.encode(claims(exp=1), OTHER_SECRET),
        UNAUTHORIZED,
    ),
    ("expired, no sub", "secret", lambda k: k.sign("hs256", claims(sub=None, exp=1)), UNAUTHORIZED),
    ("not yet valid", "secret", lambda k: k.sign("hs256", claims(nbf=int(NOW) + 60)), UNAUTHORIZED),
    ("aud, none configured", "secret", lambda k: k.sign("hs256", claims(aud="x")), UNAUTHORIZED),
    (
        "empty aud, none configured",
        "secret",
        lambda k: k.sign("hs256", claims(aud="")),
        UNAUTHORIZED,
    ),
    ("aud [], none configured", "secret", lambda k: k.sign("hs256", claims(aud=[])), UNAUTHORIZED),
    (
        "aud null, none configured",
        "secret",
        lambda k: k.sign("hs256", {**claims(), "aud": None}),
        UNAUTHORIZED,
    ),
    ("missing sub", "secret", lambda k: k.sign("hs256", claims(sub=None)), UNAUTHORIZED),
    ("empty sub", "secret", lambda k: k.sign("hs256", claims(sub="")), UNAUTHORIZED),
    ("integer sub", "secret", lambda k: hs256_with(SECRET.encode(), claims(sub=7)), UNAUTHORIZED),
    ("string exp", "secret", lambda k: hs256_with(SECRET.encode(), claims(exp="x")), UNAUTHORIZED),
    (
        "boolean exp",
        "secret",
        lambda k: hs256_with(SECRET.encode(), claims(exp=True)),
        UNAUTHORIZED,
    ),
    (
        "NaN exp",
        "secret",
        lambda k: hs256_with(SECRET.encode(), claims(exp=float("nan"))),
        UNAUTHORIZED,
    ),
    ("string nbf", "secret", lambda k: hs256_with(SECRET.encode(), claims(nbf="0")), UNAUTHORIZED),
    ("channels not list", "secret", lambda k: k.sign("hs256", claims(channels="a")), UNAUTHORIZED),
    ("channels of ints", "secret", lambda k: k.sign("hs256", claims(channels=[1])), UNAUTHORIZED),
    ("subscription token", "secret", lambda k: k.sign("hs256", claims(channel="a")), UNAUTHORIZED),
    ("empty", "secret", lambda k: "", UNAUTHORIZED),
    ("garbage", "secret", lambda k: "not a token", UNAUTHORIZED),
    ("two segments", "secret", lambda k: "abc.def", UNAUTHORIZED),
    ("header not json", "secret", lambda k: b64(b"{x") + ".e30.", UNAUTHORIZED),
    ("header a list", "secret", lambda k: b64(b"[1]") + ".e30.", UNAUTHORIZED),
    (
        "payload not json",
        "secret",
        lambda k: hand_made({"alg": "HS256"}, {})[:-1] + "!",
        UNAUTHORIZED,
    ),
    ("no keys configured", "none", lambda k: k.sign("hs256", claims()), UNAUTHORIZED),
]


@pytest.mark.parametrize(
    ("server_kind", "make", "close_code"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_connection_token(
    keys: Keys, server_kind: str, make: Callable[[Keys], str], close_code: CloseCode
) -> None:
    token = make(keys)
    with pytest.raises(AuthError) as refused:
        server(keys, server_kind).verify_connection(token, now=NOW)
    assert refused.value.close_code == close_code
    message = str(refused.value)
    # The message becomes a close reason: short ASCII, and never the token itself.
    assert message.isascii()
    assert len(message.encode()) <= 100
    assert not token or token not in message


@pytest.mark.parametrize(
    ("options", "token_claims"),
    [
        ({"audience": "plexus"}, claims(aud="other")),
        ({"audience": "plexus"}, claims()),
        ({"audience": "plexus"}, claims(aud="")),
        ({"audience": "plexus"}, claims(aud=[])),
        ({"issuer": "https://id.example"}, claims(iss="https://evil.example")),
        ({"issuer": "https://id.example"}, claims()),
    ],
    ids=["wrong aud", "missing aud", "empty aud", "aud []", "wrong iss", "missing iss"],
)
def test_wrong_audience_or_issuer(
    keys: Keys, options: dict[str, str], token_claims: dict[str, Any]
) -> None:
    with pytest.raises(AuthError) as refused:
        server(keys, "secret", **options).verify_connection(
            keys.sign("hs256", token_claims), now=NOW
        )
    assert refused.value.close_code == CloseCode.UNAUTHORIZED


def test_no_keys_message(keys: Keys) -> None:
    auth = server(keys, "none")
    assert not auth.enabled
    with pytest.raises(AuthError, match="this server has no JWT keys configured"):
        auth.verify_connection(make_token(SECRET, user="alice"), now=NOW)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.text("ABCDEFabcdef0123456789-_=", max_size=40), min_size=1, max_size=5).map(
            ".".join
        ),
    )
)
def test_arbitrary_input_is_refused_with_auth_error(token: str) -> None:
    # Anything that is not a token signed with our secret gets AuthError, never another
    # exception that would surface as a 1011 internal error.
    with pytest.raises(AuthError):
        Authenticator(secret=SECRET).verify_connection(token, now=NOW)


# ----- subscription tokens


def sub_token(**extra: Any) -> str:
    payload: dict[str, Any] = {"sub": "alice", "channel": "secret:room", "exp": int(NOW) + 60}
    payload.update(extra)
    # Signed by hand: PyJWT would not sign some of the ill-typed claims tested here.
    return hs256_with(SECRET.encode(), {k: v for k, v in payload.items() if v is not None})


@pytest.mark.parametrize(
    ("user", "extra"),
    [
        ("alice", {}),
        ("alice", {"client": "c-1"}),
        ("alice", {"exp": None}),
        (None, {"sub": None}),
        (None, {"sub": ""}),
    ],
    ids=["user", "bound to client", "no exp", "anonymous, no sub", "anonymous, empty sub"],
)
def test_valid_subscription_token(keys: Keys, user: str | None, extra: dict[str, Any]) -> None:
    token = sub_token(info={"role": "mod"}, **extra)
    credentials = server(keys, "secret").verify_subscription(
        token, user=user, client="c-1", channel="secret:room", now=NOW
    )
    assert credentials.user == user
    assert credentials.info == {"role": "mod"}
    assert credentials.channels == ()
    assert credentials.expires_at == (None if "exp" in extra else NOW + 60)


def test_subscription_token_from_make_token(keys: Keys) -> None:
    token = make_token(SECRET, user="alice", channel="secret:room", now=NOW)
    credentials = server(keys, "secret").verify_subscription(
        token, user="alice", client="c-1", channel="secret:room", now=NOW
    )
    assert credentials.user == "alice"


@pytest.mark.parametrize(
    ("server_kind", "user", "token_extra", "channel", "match"),
    [
        ("secret", "alice", {}, "secret:other", "another channel"),
        ("secret", "alice", {"channel": None}, "secret:room", "another channel"),
        ("secret", "bob", {}, "secret:room", "another user"),
        ("secret", None, {}, "secret:room", "another user"),
        ("secret", "alice", {"sub": None}, "secret:room", "another user"),
        ("secret", "alice", {"sub": 5}, "secret:room", "sub claim"),
        ("secret", "alice", {"client": "c-2"}, "secret:room", "another connection"),
        ("secret", "alice", {"exp": int(NOW)}, "secret:room", "expired"),
        ("secret", "alice", {"nbf": int(NOW) + 5}, "secret:room", "not valid yet"),
        ("secret", "alice", {"exp": int(NOW), "channel": "x"}, "secret:room", "another channel"),
        ("rsa", "alice", {}, "secret:room", "not accepted"),
        ("none", "alice", {}, "secret:room", "no JWT keys"),
    ],
    ids=[
        "wrong channel",
        "no channel",
        "other user",
        "user token, anonymous connection",
        "anonymous token, user connection",
        "ill-typed sub",
        "other client",
        "expired",
        "not yet valid",
        "expired, wrong channel",
        "wrong key type",
        "no keys",
    ],
)
def test_refused_subscription_token(
    keys: Keys,
    server_kind: str,
    user: str | None,
    token_extra: dict[str, Any],
    channel: str,
    match: str,
) -> None:
    token = sub_token(**token_extra)
    with pytest.raises(PermissionDenied, match=match) as refused:
        server(keys, server_kind).verify_subscription(
            token, user=user, client="c-1", channel=channel, now=NOW
        )
    assert refused.value.code == ErrorCode.PERMISSION_DENIED


def test_forged_subscription_token(keys: Keys) -> None:
    token = jwt.encode({"sub": "alice", "channel": "secret:room"}, OTHER_SECRET)
    with pytest.raises(PermissionDenied, match="bad signature"):
        server(keys, "secret").verify_subscription(
            token, user="alice", client="c-1", channel="secret:room", now=NOW
        )


# ----- configuration


def test_from_settings(keys: Keys) -> None:
    auth = Authenticator.from_settings(
        Settings(jwt_secret=SECRET, jwt_public_key=str(keys.rsa_pem), jwt_audience="plexus")
    )
    assert auth.enabled
    token = keys.sign("rs256", claims(aud="plexus"))
    assert auth.verify_connection(token, now=NOW).user == "alice"
    assert not Authenticator.from_settings(Settings()).enabled


def _write(tmp_path: Path, name: str, data: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("make_options", "match"),
    [
        (lambda t, k: {"secret": "short"}, "jwt_secret: must be at least 32 bytes"),
        (lambda t, k: {"leeway": -1}, "leeway"),
        (lambda t, k: {"public_key_file": str(t / "missing.pem")}, "jwt_public_key: cannot read"),
        (lambda t, k: {"public_key_file": _write(t, "x.pem", "nope")}, "no PEM public key"),
        (
            lambda t, k: {"public_key_file": _write(t, "p.pem", pem_private(k.rsa_key))},
            "no PEM public key",
        ),
        (
            lambda t, k: {
                "public_key_file": _write(
                    t, "small.pem", pem_public(rsa.generate_private_key(65537, 1024))
                )
            },
            "1024 bits",
        ),
        (
            lambda t, k: {
                "public_key_file": _write(
                    t, "k1.pem", pem_public(ec.generate_private_key(ec.SECP256K1()))
                )
            },
            "unsupported key type",
        ),
        (lambda t, k: {"jwks_file": str(t / "missing.json")}, "jwt_jwks_file: cannot read"),
        (lambda t, k: {"jwks_file": _write(t, "a.json", "{")}, "not JSON"),
        (lambda t, k: {"jwks_file": _write(t, "b.json", "[]")}, "not a key set"),
        (lambda t, k: {"jwks_file": _write(t, "c.json", '{"keys": []}')}, "jwt_jwks_file"),
        (
            lambda t, k: {
                "jwks_file": _write(
                    t,
                    "dup.json",
                    json.dumps(
                        {
                            "keys": [
                                jwt.algorithms.ECAlgorithm.to_jwk(
                                    k.ec_key.public_key(), as_dict=True
                                ),
                                jwt.algorithms.ECAlgorithm.to_jwk(
                                    k.ec384.public_key(), as_dict=True
                                ),
                            ]
                        }
                    ),
                )
            },
            "two keys with kid None",
        ),
        (
            lambda t, k: {
                "jwks_file": _write(t, "d.json", json.dumps({"keys": [{"kty": "oct", "k": "AA"}]}))
            },
            "jwt_jwks_file",
        ),
    ],
    ids=[
        "short secret",
        "negative leeway",
        "missing pem",
        "not pem",
        "private key pem",
        "small rsa key",
        "secp256k1 key",
        "missing jwks",
        "jwks not json",
        "jwks not object",
        "jwks empty",
        "jwks duplicate kid",
        "jwks only oct",
    ],
)
def test_bad_configuration(
    tmp_path: Path, keys: Keys, make_options: Callable[[Path, Keys], dict[str, Any]], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Authenticator(**make_options(tmp_path, keys))


def test_empty_secret_means_no_secret() -> None:
    assert not Authenticator(secret="").enabled


def test_jwks_single_key_needs_no_kid(tmp_path: Path, keys: Keys) -> None:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(keys.ec_key.public_key(), as_dict=True)
    auth = Authenticator(jwks_file=_write(tmp_path, "one.json", json.dumps({"keys": [jwk]})))
    assert auth.verify_connection(keys.sign("es256", claims()), now=NOW).user == "alice"


def test_jwks_declared_alg_is_the_only_one(tmp_path: Path, keys: Keys) -> None:
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa_key.public_key(), as_dict=True)}
    jwk.update(kid="r1", alg="PS256")
    auth = Authenticator(jwks_file=_write(tmp_path, "ps.json", json.dumps({"keys": [jwk]})))
    assert auth.verify_connection(keys.sign("ps256", claims(), kid="r1"), now=NOW)
    with pytest.raises(AuthError, match="RS256 is not accepted"):
        auth.verify_connection(keys.sign("rs256", claims(), kid="r1"), now=NOW)


# ----- make_token


def test_make_token_claims() -> None:
    token = make_token(
        SECRET,
        user="alice",
        ttl=90,
        channel="secret:room",
        info={"n": 1},
        channels=["a"],
        audience="plexus",
        issuer="me",
        now=NOW,
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert jwt.decode(token, options={"verify_signature": False}) == {
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 90,
        "channel": "secret:room",
        "info": {"n": 1},
        "channels": ["a"],
        "aud": "plexus",
        "iss": "me",
    }


def test_make_token_rs256(keys: Keys) -> None:
    token = make_token(
        pem_private(keys.rsa_key), user="alice", algorithm="RS256", ttl=None, now=NOW
    )
    credentials = server(keys, "rsa").verify_connection(token, now=NOW)
    assert credentials == Credentials(user="alice", expires_at=None, info=None, channels=())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "none"}, "unsigned"),
        ({"algorithm": "XY256"}, "cannot sign with XY256"),
        ({"algorithm": "RS256", "secret": "not a pem key"}, "cannot sign with RS256"),
        ({"algorithm": "HS256", "secret": "short"}, "at least 32 bytes"),
        ({"algorithm": "HS512", "secret": SECRET}, "at least 64 bytes"),
    ],
)
def test_make_token_refuses(kwargs: dict[str, str], match: str) -> None:
    # Not kwargs.pop: the parameter dict is shared by every run of this test in
    # one process (mutmut runs the suite several times in one process).
    options = dict(kwargs)
    secret = options.pop("secret", SECRET)
    with pytest.raises(ValueError, match=match):
        make_token(secret, user="alice", **options)  # type: ignore[arg-type]


# ----- parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("0", 0.0),
        ("45s", 45.0),
        ("30m", 1800.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (" 5m ", 300.0),
        ("10 s", 10.0),
        ("1H", 3600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", " ", "h", "abc", "-5", "-1h", "1x", "1w", "1h30m", "1e3", "nan", "inf", ".5", "5.", "١٢"],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as refused:
        parse_duration(text)
    assert "e.g. 90, 45s, 30m, 1h, 2d" in str(refused.value)
