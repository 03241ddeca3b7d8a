"""The `plexus` command: serve, publish, subscribe, token, checkconfig, bench."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import orjson

from plexus import __version__
from plexus.exceptions import ConfigError

EXIT_USAGE = 2


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plexus",
        description="Plexus: real-time messaging for the web (WebSocket channels, history, "
        "presence).",
    )
    parser.add_argument("--version", action="version", version=f"plexus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server: /ws, the chat app at /, /health and /api/* on one port.",
    )
    serve.add_argument("--host", help="bind address [default: 127.0.0.1]")
    serve.add_argument("--port", type=int, help="bind port, 0 for any free one [default: 8000]")
    serve.add_argument(
        "--config", metavar="FILE.toml", help="TOML settings file [env: PLEXUS_CONFIG]"
    )
    serve.add_argument("--certfile", help="TLS certificate (PEM): serve wss:// and https://")
    serve.add_argument("--keyfile", help="TLS private key (PEM)")
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level [default: info]",
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="log format [default: text]")
    serve.add_argument("--data-dir", help="where SQLite history lives [default: ./plexus-data]")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port (needs engine = redis) [env: PLEXUS_WORKERS, default: 1]",
    )
    serve.add_argument(
        "--engine",
        choices=["memory", "sqlite", "redis"],
        help="where channels live: memory, sqlite (one process) or redis (many processes)"
        " [env: PLEXUS_ENGINE]",
    )
    serve.add_argument(
        "--redis-url", help="Redis server(s), comma-separated [env: PLEXUS_REDIS_URL]"
    )

    publish = commands.add_parser(
        "publish",
        help="publish a message to a channel",
        description="Publish a JSON value to a channel over WebSocket (the channel's namespace "
        "must allow client publish) or, with --api, through the HTTP API.",
    )
    publish.add_argument("channel")
    publish.add_argument("data", help='a JSON value, e.g. \'{"text": "hi"}\'')
    _client_args(publish)
    publish.add_argument("--api-key", help="API key for --api [env: PLEXUS_API_KEY]")
    publish.add_argument(
        "--api", action="store_true", help="publish through POST /api/publish instead"
    )

    subscribe = commands.add_parser(
        "subscribe",
        help="print a channel's messages as JSON lines",
        description="Subscribe to a channel and print each push as one JSON line.",
    )
    subscribe.add_argument("channel")
    _client_args(subscribe)
    subscribe.add_argument("--count", type=int, help="exit after this many messages")

    token = commands.add_parser(
        "token",
        help="print a connection or subscription JWT",
        description="Print a JWT signed with the configured secret (for development and tests).",
    )
    token.add_argument("--user", required=True, help="the `sub` claim")
    token.add_argument("--ttl", default="1h", help="lifetime: 90, 45s, 30m, 1h, 2d [default: 1h]")
    token.add_argument(
        "--channel",
        action="append",
        metavar="CHANNEL",
        help="a channel of the `channels` claim, which the server subscribes the connection"
        " to (repeat for several, e.g. --channel '#alice' --channel news)",
    )
    token.add_argument(
        "--subscription", metavar="CHANNEL", help="make a subscription token for this channel"
    )
    token.add_argument("--aud", help="the `aud` claim (the server's jwt_audience)")
    token.add_argument("--iss", help="the `iss` claim (the server's jwt_issuer)")
    token.add_argument("--info", help="JSON for the `info` claim")
    token.add_argument(
        "--secret", help="HMAC secret [env: PLEXUS_JWT_SECRET, or PLEXUS_ADMIN_SECRET with --admin]"
    )
    token.add_argument(
        "--config", metavar="FILE.toml", help="read jwt_secret (admin_secret) from this file"
    )
    token.add_argument(
        "--admin",
        action="store_true",
        help="make a login token for the admin page at /admin, signed with admin_secret",
    )
    checkconfig = commands.add_parser(
        "checkconfig",
        help="validate a configuration file and print the effective settings",
        description="Read FILE (TOML) with the PLEXUS_* environment on top, as `plexus serve`"
        " would, check every setting (key files, hooks, the data directory), and print the"
        " effective settings as TOML with secrets masked. Exit 2 with one line if one is bad.",
    )
    checkconfig.add_argument("file", metavar="FILE.toml")
    bench = commands.add_parser(
        "bench",
        help="check fan-out of a running server: throughput, latency, nothing lost",
        description="Open N subscribers on a channel, publish M messages, check that every "
        "subscriber got every message in order, and print throughput and latency as seen "
        "from here. Exit 0 if nothing was lost, 1 otherwise. For the server's CPU cost per "
        "delivery beside Node ws, use bench/ in the repository.",
    )
    bench.add_argument("--channel", default="plexus-bench", help="[default: plexus-bench]")
    bench.add_argument("--subscribers", type=int, default=100, help="[default: 100]")
    bench.add_argument("--messages", type=int, default=1000, help="[default: 1000]")
    bench.add_argument("--size", type=int, default=100, help="payload bytes [default: 100]")
    bench.add_argument(
        "--rate", type=float, default=0.0, help="messages/s; 0 = as fast as answered [default: 0]"
    )
    bench.add_argument(
        "--via",
        choices=["api", "ws"],
        default="api",
        help="publish through POST /api/publish, or over a WebSocket (needs a namespace that "
        "allows client publish, e.g. --channel chat:bench, and meets the per-connection "
        "publish rate limit) [default: api]",
    )
    bench.add_argument("--api-key", help="API key for --via api [env: PLEXUS_API_KEY]")
    bench.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _client_args(bench, timeout=30.0)
    return parser


DEFAULT_URL = "ws://127.0.0.1:8000/ws"


def _client_args(parser: argparse.ArgumentParser, timeout: float = 10.0) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("PLEXUS_URL") or DEFAULT_URL,
        help=f"the server [env: PLEXUS_URL, default: {DEFAULT_URL}]",
    )
    parser.add_argument("--token", help="connection JWT")
    parser.add_argument(
        "--timeout", type=float, default=timeout, help=f"seconds [default: {timeout:g}]"
    )


def _fail(message: str) -> int:
    print(f"plexus: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_deeply(settings: Any) -> None:
    """What `load_settings` cannot check alone: key files, hooks, namespaces' switches, data_dir.

    Raises:
        ConfigError: naming the first bad setting, in one line.
    """
    from plexus.config import check_data_dir
    from plexus.decisions import Decider
    from plexus.decisions.jwt import Authenticator

    Authenticator.from_settings(settings)
    Decider(settings)
    check_data_dir(settings)


def _serve(args: argparse.Namespace) -> int:
    from plexus.app import serve
    from plexus.config import load_settings
    from plexus.logs import setup_logging

    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "data_dir": args.data_dir,
        "workers": args.workers,
        "engine": args.engine,
        "redis_url": args.redis_url,
    }
    try:
        settings = load_settings(args.config or os.environ.get("PLEXUS_CONFIG"), None, overrides)
        _check_deeply(settings)
    except ConfigError as exc:
        return _fail(f"invalid setting: {exc}")
    setup_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from plexus.workers import Workers

        forwarded = [
            f"--{name.replace('_', '-')}={value}"
            for name, value in overrides.items()
            if value is not None and name not in ("port", "workers")
        ]
        if args.config:
            forwarded.append(f"--config={args.config}")
        return Workers(settings, forwarded).run()
    try:
        _run(serve(settings))
    except ConfigError as exc:  # what the start finds, e.g. a data_dir another process holds
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass
    return 0


def _parse_json(text: str) -> Any:
    from plexus.protocol.codec import json_loads_with_bytes

    try:
        return json_loads_with_bytes(text)
    except Exception as exc:
        raise ValueError(f"not valid JSON: {text[:80]!r} ({exc})") from None


def _api(args: argparse.Namespace, session: Any = None) -> Any:
    """The backend SDK's client for the server at `args.url` (an `AsyncPlexusApi`)."""
    from plexus.api import AsyncPlexusApi

    key = args.api_key or os.environ.get("PLEXUS_API_KEY")
    return AsyncPlexusApi(args.url, key, args.timeout, session=session)


async def _publish(args: argparse.Namespace, data: Any) -> int:
    if args.api:
        from plexus.api import ApiError

        async with _api(args) as api:
            try:
                offset = await api.publish(args.channel, data)
            except ApiError as exc:
                print(f"plexus: {exc}", file=sys.stderr)
                return 1
            print(orjson.dumps({"offset": offset}).decode())
            return 0
    from plexus.client import Client, PlexusClientError

    # One publish: a dropped connection is an error to report, not to hide.
    async with Client(args.url, token=args.token, timeout=args.timeout, reconnect=False) as client:
        try:
            offset = await client.publish(args.channel, data)
        except PlexusClientError as exc:
            print(f"plexus: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    print(orjson.dumps({"offset": offset}).decode())
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from plexus import loadcheck
    from plexus.api import ApiError
    from plexus.client import ConnectionClosed, PlexusClientError

    opts = loadcheck.CheckOptions(
        url=args.url,
        channel=args.channel,
        subscribers=args.subscribers,
        messages=args.messages,
        size=args.size,
        rate=args.rate,
        token=args.token,
        timeout=args.timeout,
    )
    progress = None if args.json else (lambda text: print(f"plexus bench: {text}", flush=True))
    async with _api(args) as api:
        publish = None
        if args.via == "api":

            async def publish(data: dict[str, Any]) -> None:
                await api.publish(args.channel, data)

        try:
            result = await loadcheck.run(opts, publish=publish, progress=progress)
        except PlexusClientError as exc:
            print(f"plexus: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except ApiError as exc:
            print(f"plexus: {exc}", file=sys.stderr)
            return 1
        except ConnectionClosed as exc:
            print(f"plexus: connection closed by the server ({exc.code})", file=sys.stderr)
            return 1
    if args.json:
        print(orjson.dumps(result.as_dict()).decode())
    else:
        print(
            f"{result.subscribers} subscribers x {result.messages} messages: "
            f"{result.deliveries:,}/{result.expected:,} delivered"
            f"{'' if result.out_of_order == 0 else f', {result.out_of_order} out of order'}"
            f" in {result.wall_s:.2f} s\n"
            f"{result.deliveries_per_s:,.0f} deliveries/s, {result.publishes_per_s:,.0f} "
            f"publishes/s; latency p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
            f"max {result.max_ms:.2f} ms"
        )
    if not result.complete:
        print("plexus: some deliveries were missing or out of order", file=sys.stderr)
        return 1
    return 0


def _check_bench(args: argparse.Namespace) -> str | None:
    """What is wrong with `plexus bench`'s numbers, if anything."""
    if not 1 <= args.subscribers <= 10_000:
        return "--subscribers must be 1 to 10000 (one process holds at most that many sockets)"
    if not 1 <= args.messages <= 10_000_000:
        return "--messages must be 1 to 10000000"
    if not 0 <= args.size <= 16 * 1024 * 1024:
        return "--size must be 0 to 16 MiB"
    if not (args.rate >= 0 and args.rate < float("inf")):
        return "--rate must be 0 (as fast as possible) or a positive number"
    if not (args.timeout > 0 and args.timeout < float("inf")):
        return "--timeout must be a positive number of seconds"
    return None


async def _subscribe(args: argparse.Namespace) -> int:
    from plexus.client import Client, PlexusClientError
    from plexus.protocol.codec import to_json_compatible

    async with Client(args.url, token=args.token, timeout=args.timeout) as client:
        try:
            sub = await client.subscribe(args.channel)
        except PlexusClientError as exc:
            print(f"plexus: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        seen = 0
        async for message in sub:
            print(orjson.dumps(to_json_compatible(message)).decode(), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return 0
        print(f"plexus: connection closed ({client.close_code})", file=sys.stderr)
        return 1


def _checkconfig(args: argparse.Namespace) -> int:
    from plexus.config import load_settings, settings_toml

    try:
        settings = load_settings(args.file)
        _check_deeply(settings)
    except ConfigError as exc:
        return _fail(f"invalid setting: {exc}")
    print(f"# {args.file}: valid. Effective settings (defaults < file < PLEXUS_* env):")
    print(settings_toml(settings), end="")
    return 0


def _token(args: argparse.Namespace) -> int:
    from plexus.config import load_settings
    from plexus.tokens import make_token, parse_duration

    setting = "admin_secret" if args.admin else "jwt_secret"
    variable = f"PLEXUS_{setting.upper()}"
    secret = args.secret or os.environ.get(variable)
    if secret is None and args.config:
        try:
            secret = getattr(load_settings(args.config, env={}), setting)
        except ConfigError as exc:
            return _fail(f"invalid setting: {exc}")
    if not secret:
        return _fail(f"no secret: pass --secret, set {variable} or {setting} in --config")
    claims = (args.channel, args.info, args.subscription, args.aud, args.iss)
    if args.admin and any(value is not None for value in claims):
        return _fail(
            "--admin makes a login token: --channel, --subscription, --info, --aud and --iss"
            " do not apply"
        )
    if args.subscription is not None and args.channel:
        return _fail("--subscription makes a subscription token, which has no --channel claim")
    try:
        ttl = parse_duration(args.ttl)
        if args.admin:
            from plexus.admin.session import make_admin_token

            token = make_admin_token(secret, args.user, ttl)
        else:
            info = _parse_json(args.info) if args.info is not None else None
            token = make_token(
                secret,
                user=args.user,
                ttl=ttl,
                channel=args.subscription,
                channels=args.channel,
                info=info,
                audience=args.aud,
                issuer=args.iss,
            )
    except ValueError as exc:
        return _fail(str(exc))
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `plexus` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    if args.command == "checkconfig":
        return _checkconfig(args)
    if args.command == "bench":
        problem = _check_bench(args)
        if problem is not None:
            return _fail(problem)
    try:
        if args.command == "bench":
            return int(_run(_bench(args)))
        if args.command == "publish":
            try:
                data = _parse_json(args.data)
            except ValueError as exc:
                return _fail(str(exc))
            return int(_run(_publish(args, data)))
        return int(_run(_subscribe(args)))
    except (OSError, TimeoutError) as exc:
        return _fail(f"cannot reach {args.url}: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
