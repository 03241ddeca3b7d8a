"""Settings: one typed object, filled from defaults < TOML file < `PLEXUS_*` env < CLI flags.

Every setting is documented in `docs/configuration.md`. Validation happens once,
at start, and reports the first bad setting by name with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from plexus.exceptions import ConfigError
from plexus.transports.origin import parse_authority, parse_origin

ENV_PREFIX = "PLEXUS_"
# `engine` sets the three backends at once; each name is one coherent engine.
ENGINES = {
    "memory": ("memory", "memory", "memory"),
    "sqlite": ("memory", "sqlite", "memory"),
    "redis": ("redis", "redis", "redis"),
}
ADMIN_PASSWORD_MIN = 12
ADMIN_SECRET_MIN_BYTES = 32


@dataclass(slots=True)
class NamespaceOptions:
    """What clients may do in the channels of one namespace.

    The namespace of a channel is the part of its name before the first `:`;
    a name without `:` is in the default namespace (key `""` or `default`).
    """

    anonymous: bool = True  # clients without a user may subscribe (and publish if allowed)
    allow_subscribe: bool = True
    allow_publish: bool = False  # clients may publish (the HTTP API always may)
    allow_presence: bool = True  # clients may ask `presence` (if `presence` is on)
    allow_history: bool = True  # clients may ask `history` (if history is kept)
    client_info: bool = False  # `subscribe` may carry `info` shown to others
    presence: bool = False  # keep who is subscribed
    join_leave: bool = False  # push join/leave to subscribers
    history_size: int = 0  # messages kept per channel (0 = none)
    history_ttl: float = 0.0  # seconds a message is kept (0 = no age limit)
    history_max_bytes: int = 0  # payload bytes kept per channel (0 = no limit)
    max_channels: int = 0  # channels of this namespace holding state at once (0 = no limit)
    recovery: bool = False  # `subscribe` with `since` may recover missed messages
    private: bool = False  # subscribe needs a subscription token (and publish a subscription)
    publish_without_subscribe: bool = False  # private: clients may publish without subscribing
    proxy_subscribe: bool = False  # the application decides each subscribe (proxy or hook)
    proxy_publish: bool = False  # the application decides (and may transform) each publish

    def validate(self, name: str) -> None:
        """Raise ConfigError naming the option if a value is out of range.

        `name` is the namespace's key, or `#` for the `personal` table.
        """
        where = "personal" if name == PERSONAL else f"namespaces.{name or 'default'}"
        if self.history_size < 0:
            raise ConfigError(f"{where}.history_size: must be >= 0, got {self.history_size}")
        if self.history_ttl < 0:
            raise ConfigError(f"{where}.history_ttl: must be >= 0, got {self.history_ttl}")
        for name in ("history_max_bytes", "max_channels"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.recovery and self.history_size == 0:
            raise ConfigError(f"{where}.recovery: needs history_size > 0")


def default_namespaces() -> dict[str, NamespaceOptions]:
    """The built-in namespaces: an open `chat` demo and a read-only default."""
    return {
        "": NamespaceOptions(),
        "chat": NamespaceOptions(
            anonymous=True,
            allow_publish=True,
            client_info=True,
            presence=True,
            join_leave=True,
            history_size=1000,
            history_ttl=24 * 3600.0,
            # Anyone may write here: bound what they can make the server keep
            # (at most 1000 rooms of 512 KiB each; a 64 KiB image still fits).
            history_max_bytes=512 * 1024,
            max_channels=1000,
            recovery=True,
        ),
    }


# The key of the personal channels' (`#USER`) options among the namespaces' ones.
PERSONAL = "#"


def default_personal() -> NamespaceOptions:
    """Options of `#USER` channels: notifications that wait for their user (a day, 100 each)."""
    return NamespaceOptions(
        anonymous=False,
        history_size=100,
        history_ttl=24 * 3600.0,
        recovery=True,
    )


# Request headers of the WebSocket upgrade passed on to every proxy call.
DEFAULT_PROXY_HEADERS = [
    "Cookie",
    "Authorization",
    "User-Agent",
    "X-Forwarded-For",
    "Accept-Language",
]


@dataclass(slots=True)
class Settings:
    """Every server setting, with its default. Field docs live in docs/configuration.md."""

    host: str = "127.0.0.1"
    port: int = 8000
    certfile: str | None = None
    keyfile: str | None = None
    log_level: str = "info"
    log_format: str = "text"

    ping_interval: float = 25.0
    pong_timeout: float = 10.0
    shutdown_timeout: float = 5.0
    ws_engine: str = "lean"  # retired: "lean" is the only WebSocket engine left
    compression: str = "off"  # off | on: permessage-deflate when the client offers it
    compression_client_takeover: bool = False  # clients may keep their deflate context

    max_message_size: int = 64 * 1024
    max_queue_bytes: int = 1024 * 1024
    max_info_bytes: int = 1024
    max_subscriptions: int = 256
    max_connections: int = 0  # per node, 0 = unlimited
    max_connections_per_ip: int = 0  # 0 = unlimited
    bad_command_limit: int = 20
    bad_command_window: float = 10.0
    publish_rate: float = 20.0  # per second per connection, 0 = unlimited
    publish_burst: int = 50
    # subscribe, unsubscribe, history and presence, per second per connection
    # (0 = unlimited); the burst covers a client (re)subscribing to all its
    # channels (max_subscriptions) and paging back through history at once.
    subscribe_rate: float = 20.0
    subscribe_burst: int = 300
    rate_limit_disconnect: int = 200  # rate_limited answers within bad_command_window -> 4029
    max_body_size: int = 1024 * 1024  # HTTP API request body
    http_request_timeout: float = 30.0  # seconds to send a request head, and an API body
    http_keepalive_timeout: float = 75.0  # seconds an idle HTTP connection stays open

    data_dir: str = "./plexus-data"
    engine: str = ""  # memory | sqlite | redis: sets the three below at once
    history_backend: str = "sqlite"  # sqlite | memory | redis
    broker: str = "memory"  # memory | redis
    presence_backend: str = "memory"  # memory | redis
    redis_url: str = "redis://127.0.0.1:6379/0"  # several, comma-separated: channels are sharded
    redis_prefix: str = "plexus"
    redis_timeout: float = 5.0  # seconds per Redis command
    redis_probe_interval: float = 5.0  # seconds between PINGs of each pub/sub connection
    presence_ttl: float = 60.0  # seconds a dead node's clients stay in shared presence
    node_name: str = ""
    workers: int = 1  # processes sharing the port (needs the redis engine when > 1)
    reuse_port: bool = False  # SO_REUSEPORT on the listening socket (set for --workers)
    channel_grace: float = 300.0  # seconds an idle channel's epoch and offset outlive it
    idempotency_ttl: float = 300.0  # seconds an idempotency key is remembered
    sweep_interval: float = 30.0  # seconds between passes that forget expired state

    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_jwks_file: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    token_grace: float = 30.0  # seconds a live connection has to send `auth` after expiry
    api_keys: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    # Host names (besides loopback ones) that browsers may use to reach this
    # server: the own-origin rule and the keyless API trust no other Host.
    allowed_hosts: list[str] = field(default_factory=list)

    # The application decides (shared/spec/proxy.md): its URLs, or a hooks module.
    proxy_connect_url: str | None = None
    proxy_refresh_url: str | None = None
    proxy_subscribe_url: str | None = None
    proxy_publish_url: str | None = None
    proxy_rpc_url: str | None = None
    proxy_headers: list[str] = field(default_factory=lambda: list(DEFAULT_PROXY_HEADERS))
    proxy_timeout: float = 3.0
    hooks: str | None = None  # package.module with on_connect, on_subscribe, ...

    # The admin page at /admin: off unless one of these two is set.
    admin_password: str | None = None  # at least ADMIN_PASSWORD_MIN characters
    admin_secret: str | None = None  # signs admin sessions and tokens (>= 32 bytes)
    admin_session_ttl: float = 8 * 3600.0  # seconds an admin session lasts

    echo_endpoint: bool = False  # /echo for the Autobahn conformance suite only
    namespaces: dict[str, NamespaceOptions] = field(default_factory=default_namespaces)
    personal: NamespaceOptions = field(default_factory=default_personal)

    def validate(self) -> None:
        """Raise ConfigError for the first invalid setting."""
        positive = (
            "ping_interval",
            "pong_timeout",
            "shutdown_timeout",
            "bad_command_window",
            "http_request_timeout",
            "http_keepalive_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.pong_timeout >= self.ping_interval:
            raise ConfigError(
                f"pong_timeout: must be less than ping_interval ({self.ping_interval}),"
                f" got {self.pong_timeout}"
            )
        at_least_one = (
            "max_message_size",
            "max_queue_bytes",
            "max_info_bytes",
            "max_subscriptions",
            "bad_command_limit",
            "publish_burst",
            "subscribe_burst",
            "rate_limit_disconnect",
            "max_body_size",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("publish_rate", "subscribe_rate", "max_connections", "max_connections_per_ip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be 0..65535, got {self.port}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(
                f"log_level: must be debug|info|warning|error, got {self.log_level!r}"
            )
        if self.ws_engine != "lean":
            raise ConfigError(
                f'ws_engine: the {self.ws_engine!r} engine was retired; "lean" is the only'
                " WebSocket engine (remove the setting)"
            )
        if self.compression not in ("off", "on"):
            raise ConfigError(f"compression: must be off or on, got {self.compression!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        if self.engine:
            if self.engine not in ENGINES:
                raise ConfigError(f"engine: must be {', '.join(ENGINES)}, got {self.engine!r}")
            self.broker, self.history_backend, self.presence_backend = ENGINES[self.engine]
        if self.history_backend not in ("sqlite", "memory", "redis"):
            raise ConfigError(
                f"history_backend: must be sqlite, memory or redis, got {self.history_backend!r}"
            )
        if self.broker not in ("memory", "redis"):
            raise ConfigError(f"broker: must be memory or redis, got {self.broker!r}")
        if self.presence_backend not in ("memory", "redis"):
            raise ConfigError(
                f"presence_backend: must be memory or redis, got {self.presence_backend!r}"
            )
        chosen = (self.broker, self.history_backend, self.presence_backend)
        if "redis" in chosen and chosen != ENGINES["redis"]:
            raise ConfigError(
                "broker: a redis broker, history and presence go together (history and presence"
                ' kept by one node cannot be shared by many); set engine = "redis"'
                f" (got broker={self.broker}, history_backend={self.history_backend},"
                f" presence_backend={self.presence_backend})"
            )
        if self.broker == "redis":
            self.redis_urls()  # validates
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if self.workers > 1 and self.broker != "redis":
            raise ConfigError(
                f"workers: {self.workers} processes share channels only through the redis"
                ' engine; set engine = "redis" and redis_url (or run one worker)'
            )
        for name in (
            "channel_grace",
            "idempotency_ttl",
            "sweep_interval",
            "redis_timeout",
            "redis_probe_interval",
            "presence_ttl",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("certfile: certfile and keyfile must be given together")
        for name in ("certfile", "keyfile", "jwt_public_key", "jwt_jwks_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{name}: no such file: {value}")
        for entry in self.allowed_origins:
            if entry != "*" and parse_origin(entry) is None:
                raise ConfigError(
                    f"allowed_origins: {entry!r} is not scheme://host[:port] (http or https)"
                )
        for entry in self.allowed_hosts:
            if entry != "*" and parse_authority(entry) is None:
                raise ConfigError(f"allowed_hosts: {entry!r} is not a host name")
        if self.admin_password is not None and len(self.admin_password) < ADMIN_PASSWORD_MIN:
            # The length only: the value itself is never printed.
            raise ConfigError(
                f"admin_password: must be at least {ADMIN_PASSWORD_MIN} characters,"
                f" got {len(self.admin_password)}"
            )
        if (
            self.admin_secret is not None
            and len(self.admin_secret.encode()) < ADMIN_SECRET_MIN_BYTES
        ):
            raise ConfigError(
                f"admin_secret: must be at least {ADMIN_SECRET_MIN_BYTES} bytes,"
                f" got {len(self.admin_secret.encode())}"
            )
        if self.admin_session_ttl <= 0:
            raise ConfigError(f"admin_session_ttl: must be > 0, got {self.admin_session_ttl}")
        for name, options in self.namespaces.items():
            options.validate(name)
        self.personal.validate(PERSONAL)
        if self.proxy_timeout <= 0 or self.proxy_timeout != self.proxy_timeout:
            raise ConfigError(f"proxy_timeout: must be > 0, got {self.proxy_timeout}")
        for call in ("connect", "refresh", "subscribe", "publish", "rpc"):
            name = f"proxy_{call}_url"
            url = getattr(self, name)
            if url is not None and _HTTP_URL.fullmatch(url) is None:
                raise ConfigError(f"{name}: {url!r} is not an http:// or https:// URL")
        if self.hooks is not None and _MODULE.fullmatch(self.hooks) is None:
            raise ConfigError(f"hooks: {self.hooks!r} is not a module name like package.module")

    def all_namespaces(self) -> list[tuple[str, NamespaceOptions]]:
        """Every options table with the name settings call it by (`namespaces.X`, `personal`)."""
        tables = [
            (f"namespaces.{name or 'default'}", opts) for name, opts in self.namespaces.items()
        ]
        tables.append(("personal", self.personal))
        return tables

    def redis_urls(self) -> list[str]:
        """The Redis servers of `redis_url` (comma-separated), validated."""
        urls = [url.strip() for url in self.redis_url.split(",") if url.strip()]
        if not urls:
            raise ConfigError("redis_url: no Redis URL given")
        for url in urls:
            scheme = url.partition("://")[0]
            if scheme not in ("redis", "rediss", "unix"):
                raise ConfigError(
                    f"redis_url: {url!r} must start with redis://, rediss:// or unix://"
                )
        if len(set(urls)) != len(urls):
            raise ConfigError("redis_url: the same server is listed twice")
        return urls

    @property
    def admin_enabled(self) -> bool:
        """True when `/admin` is served (a password or a secret is set)."""
        return self.admin_password is not None or self.admin_secret is not None

    @property
    def tls(self) -> bool:
        """True when the server serves wss:// and https://."""
        return self.certfile is not None

    def namespace(self, name: str) -> NamespaceOptions:
        """Options of namespace `name`; unknown namespaces get the default's."""
        found = self.namespaces.get(name)
        if found is None:
            found = self.namespaces.get("", NamespaceOptions())
        return found


_HTTP_URL = re.compile(r"https?://[^\s/?#]+(?:[/?#]\S*)?", re.IGNORECASE)
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

# Settings whose values are secrets: `plexus checkconfig` shows them masked.
SECRET_SETTINGS = frozenset({"jwt_secret", "api_keys"})
_URL_PASSWORD = re.compile(r"(://[^/@\s]*?:)[^/@\s]*@")


def _masked(name: str, value: Any) -> Any:
    if value is None or value == "" or value == []:
        return value
    if name in SECRET_SETTINGS:
        return ["***"] * len(value) if isinstance(value, list) else "***"
    if isinstance(value, str) and "://" in value:
        return _URL_PASSWORD.sub(r"\1***@", value)  # redis://:PASSWORD@host
    return value


def _toml_value(value: Any) -> str:
    # JSON's strings, numbers, booleans and lists are TOML's too (TOML has no null).
    import json

    return json.dumps(value, ensure_ascii=False)


def settings_toml(settings: Settings) -> str:
    """The settings as a TOML document, secrets masked (`plexus checkconfig`)."""
    lines: list[str] = []
    for item in dataclasses.fields(Settings):
        name = item.name
        if name in ("namespaces", "personal"):
            continue
        value = _masked(name, getattr(settings, name))
        if value is None:
            lines.append(f"# {name} = (unset)")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    tables = [
        (f"namespaces.{name or 'default'}", opts) for name, opts in settings.namespaces.items()
    ]
    tables.append(("personal", settings.personal))
    for title, options in tables:
        lines.append("")
        lines.append(f"[{title}]")
        for item in dataclasses.fields(NamespaceOptions):
            lines.append(f"{item.name} = {_toml_value(getattr(options, item.name))}")
    return "\n".join(lines) + "\n"


# SqliteHistoryStore takes a path with one of these suffixes as the database
# file itself, any other as the directory that holds it.
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def check_data_dir(settings: Settings) -> None:
    """Raise ConfigError unless SQLite history can write where `data_dir` says.

    Creates the directory if it is missing (as the store would). Checked by
    trying, since permissions alone do not tell (root writes anywhere, a path
    may run through a regular file). Other history backends use no directory.
    """
    if settings.history_backend != "sqlite":
        return
    path = Path(settings.data_dir)
    directory = path.parent if path.suffix in _DB_SUFFIXES else path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot write to {directory}: {exc.strerror or exc}") from None


_SETTING_TYPES: dict[str, Any] = {}


def _types() -> dict[str, Any]:
    if not _SETTING_TYPES:
        _SETTING_TYPES.update(get_type_hints(Settings))
    return _SETTING_TYPES


def _convert(name: str, raw: Any, kind: Any, *, from_text: bool) -> Any:
    """Convert `raw` to the setting's type, or raise ConfigError naming it."""
    text = str(raw).strip() if from_text else None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if text is not None and text.lower() in ("1", "true", "yes", "on"):
                return True
            if text is not None and text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(text) if text is not None else int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(text) if text is not None else float(raw)
        if kind == list[str]:
            if text is not None:
                return [part.strip() for part in text.split(",") if part.strip()]
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise ValueError
            return list(raw)
        if kind in (str, str | None):
            if text is not None:
                return text if text or kind is str else None
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported setting type {kind}")
    expected = {bool: "a boolean", int: "an integer", float: "a number"}.get(kind, "a string")
    if kind == list[str]:
        expected = "a list of strings (comma-separated in the environment)"
    raise ConfigError(f"{name}: expected {expected}, got {raw!r}")


def _options_from(where: str, table: Any, options: NamespaceOptions) -> NamespaceOptions:
    """`options` with the values of one TOML table of namespace options."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table")
    hints = get_type_hints(NamespaceOptions)
    allowed = {f.name for f in dataclasses.fields(NamespaceOptions)}
    for opt, value in table.items():
        if opt not in allowed:
            raise ConfigError(f"{where}.{opt}: unknown option")
        setattr(options, opt, _convert(f"{where}.{opt}", value, hints[opt], from_text=False))
    return options


def _namespaces_from(raw: Any) -> dict[str, NamespaceOptions]:
    if not isinstance(raw, Mapping):
        raise ConfigError("namespaces: expected a table of namespace tables")
    result = default_namespaces()
    for ns_name, table in raw.items():
        key = "" if ns_name == "default" else str(ns_name)
        result[key] = _options_from(f"namespaces.{ns_name}", table, NamespaceOptions())
    return result


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings from defaults, a TOML file, the environment and overrides.

    Args:
        config_file: a TOML file whose top-level keys are setting names and whose
            `[namespaces.NAME]` tables hold namespace options.
        env: the environment to read `PLEXUS_*` variables from (default `os.environ`).
        overrides: values from command-line flags (None values are ignored).

    Raises:
        ConfigError: naming the first invalid setting and why.
    """
    settings = Settings()
    types = _types()
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config: no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            if key == "namespaces":
                settings.namespaces = _namespaces_from(value)
            elif key == "personal":
                # Over the defaults: `[personal] history_size = 500` keeps recovery on.
                settings.personal = _options_from("personal", value, default_personal())
            elif key in types:
                setattr(settings, key, _convert(key, value, types[key], from_text=False))
            else:
                raise ConfigError(f"{key}: unknown setting in {path}")
    environ = os.environ if env is None else env
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == "PLEXUS_CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in ("namespaces", "personal") or name not in types:
            continue
        setattr(settings, name, _convert(key, value, types[name], from_text=True))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in types:
            raise ConfigError(f"{key}: unknown setting")
        setattr(settings, key, _convert(key, value, types[key], from_text=isinstance(value, str)))
    settings.validate()
    return settings
