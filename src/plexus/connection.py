"""One client connection: runs its commands against the node and queues its output.

Independent of the transport: the transport hands it payloads, a `closer` and
the connection's wire format (`protocol/wire.py`), and it writes frames of that
format into its bounded `Outbox`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from plexus.channels import validate_channel
from plexus.config import NamespaceOptions
from plexus.decisions.calls import (
    TOKEN_EXPIRED,
    ConnectRequest,
    Credentials,
    Handshake,
    PublishRequest,
    RefreshRequest,
    Refused,
    Request,
    RpcRequest,
    SubscribeRequest,
    credentials_from,
)
from plexus.decisions.jwt import Authenticator
from plexus.exceptions import AuthError, PermissionDenied, PlexusError, Unavailable
from plexus.hub import Subscription
from plexus.models import Duplicate, Publication
from plexus.node import Node, RpcCall
from plexus.outbox import Flusher, Outbox, Transport
from plexus.protocol import commands as cmd
from plexus.protocol.codes import CloseCode, ErrorCode
from plexus.protocol.commands import check_payload
from plexus.protocol.pushes import EncodedPush, publication_message
from plexus.protocol.session import SessionState
from plexus.protocol.wire import WireFormat

log = logging.getLogger("plexus.connection")

# Client ids are never reused: a per-process random prefix plus a counter.
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)


def new_client_id() -> str:
    """A connection id unique across processes and restarts."""
    return f"c-{_ID_PREFIX}{next(_ids):x}"


Closer = Callable[[CloseCode, str], None]


def published(result: Publication | Duplicate) -> dict[str, Any]:
    """The result of a `publish`: where the message is, and whether it was a repeat."""
    if isinstance(result, Duplicate):
        return {"offset": result.offset, "epoch": result.epoch, "duplicate": True}
    return {"offset": result.offset, "epoch": result.epoch}


# Publishes of one connection that may be in flight at once; the next one
# waits. Bounds the memory a client can pin by publishing faster than the
# store commits.
MAX_INFLIGHT_PUBLISHES = 64
# Seconds before the refresh call is asked again when the application could
# not answer it: the connection stays open meanwhile (closing everyone
# while the application is down would only send them all to reconnect).
REFRESH_RETRY = 10.0
_ERROR_CODES = frozenset(ErrorCode)


class Connection:
    """A client's session: identity, subscriptions, limits and output."""

    __slots__ = (
        "_asking",
        "_deciding",
        "_ending",
        "_expiry_timer",
        "_inflight",
        "_publish_waiter",
        "_refreshing",
        "_subscribing",
        "auth",
        "client_id",
        "close_code",
        "closer",
        "codec",
        "credentials",
        "format_index",
        "handshake",
        "last_seen",
        "node",
        "opened_at",
        "outbox",
        "push_frame",
        "remote",
        "session",
        "state",
        "subscriptions",
        "user",
        "wire",
    )

    def __init__(
        self,
        node: Node,
        transport: Transport,
        wire: WireFormat,
        flusher: Flusher,
        *,
        closer: Closer,
        auth: Authenticator,
        credentials: Credentials | None = None,
        remote: str = "",
        handshake: Handshake | None = None,
        session: str | None = None,
        direct: bool = False,
    ) -> None:
        settings = node.settings
        self.node = node
        self.client_id = new_client_id()
        self.wire = wire
        self.codec = codec = wire.codec
        self.format_index = wire.index
        self.closer = closer
        self.auth = auth
        self.credentials = credentials
        self.user = credentials.user if credentials else None
        self.remote = remote
        # What the upgrade said that the application's calls pass on (None
        # when nothing asks the application).
        self.handshake = handshake
        # The SSE transport's session id, told in `welcome` (None on a WebSocket).
        self.session = session
        self.opened_at = time.time()
        self.last_seen = time.monotonic()
        self.close_code: int | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.outbox = Outbox(
            transport,
            settings.max_queue_bytes,
            flusher,
            self._on_overflow,
            direct=direct,
        )
        # Queue a pre-built frame (the fan-out path): the outbox's own method,
        # one call less per delivery.
        self.push_frame = self.outbox.push
        self.state = SessionState(codec, node.limits, time.monotonic())
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._inflight = 0  # pipelined publishes not answered yet
        # Resolved (and dropped) by the next answer, for whoever waits for fewer in flight.
        self._publish_waiter: asyncio.Future[None] | None = None
        self._ending: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._subscribing: set[str] | None = None  # channels whose subscribe is under way
        self._deciding = False  # `welcome` waits for the application's connect answer
        self._asking: asyncio.Task[dict[str, Any]] | None = None  # that connect call

    # ----- output

    def send(self, message: dict[str, Any]) -> None:
        """Encode and queue one message for this client only."""
        self.outbox.push(self.wire.message(message))

    def close(self, code: CloseCode, reason: str) -> None:
        """Close the connection with `code` (idempotent).

        Its subscriptions end now, not when the socket is finally gone: after
        the close frame nothing more reaches the client, and a dead peer never
        answers that frame (the transport gives up only after its close
        timeout), so presence must stop listing it at once.
        """
        if self.close_code is None:
            self.close_code = code
            self.closer(code, reason)
            if self._asking is not None:
                self._asking.cancel()  # nobody is left to welcome
            if self.subscriptions:
                self._ending = asyncio.get_running_loop().create_task(
                    self._end_subscriptions(), name=f"plexus-close-{self.client_id}"
                )

    def _on_overflow(self) -> None:
        self.node.counters.slow_consumers += 1
        log.info("slow consumer %s: over %d buffered bytes", self.client_id, self.outbox.limit)
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: output buffer full")

    # ----- opening

    def begin(self) -> None:
        """Greet the client now, unless the application decides first (then `start` does).

        A connection without a JWT is the application's to decide when it
        answers the connect call (proxy or hook).
        """
        if self.credentials is None and "connect" in self.node.decider.enabled:
            self._deciding = True
        else:
            self._greet()

    @property
    def starting(self) -> bool:
        """Whether `start` has work to do before the client's first command is handled."""
        return self._deciding or bool(self.credentials and self.credentials.channels)

    async def start(self) -> None:
        """The application's connect decision (then `welcome`), then server-side subscriptions.

        The transport awaits this before it handles the client's first
        message; messages that arrive meanwhile wait behind it, in order.
        """
        if self._deciding:
            self._deciding = False
            if not await self._decide_connect():
                return
        await self.subscribe_granted()

    def _greet(self) -> None:
        self.node.directory.add(self)
        self.send(self.welcome())
        self.watch_expiry()

    def request(self, kind: type[Request], **fields: Any) -> Any:
        """A request of `kind` to the application, with this connection's own fields."""
        handshake = self.handshake
        return kind(
            client=self.client_id,
            protocol="msgpack" if self.codec.binary else "json",
            user=self.user,
            headers=handshake.headers if handshake is not None else {},
            **fields,
        )

    async def _decide_connect(self) -> bool:
        """Ask the application who this is; False when the connection was closed instead."""
        handshake = self.handshake
        request = self.request(ConnectRequest, data=handshake.data if handshake else None)
        self._asking = asking = asyncio.ensure_future(self.node.decider.ask(request))
        try:
            result = await asking
        except asyncio.CancelledError:
            if asking.cancelled() and self.close_code is not None:
                return False  # closed meanwhile (the shutdown): `close` cancelled the call
            raise
        except Refused as exc:
            expired = exc.reason == TOKEN_EXPIRED
            code = CloseCode.TOKEN_EXPIRED if expired else CloseCode.UNAUTHORIZED
            self.close(code, exc.message)
            return False
        except Unavailable:
            self.close(CloseCode.TRY_AGAIN_LATER, "application unavailable: try again later")
            return False
        finally:
            self._asking = None
        if self.close_code is not None:
            return False
        credentials = credentials_from(result)
        if credentials.expires_at is not None and credentials.expires_at <= time.time():
            self.close(CloseCode.TOKEN_EXPIRED, "session expired")
            return False
        self.credentials = credentials
        self.user = credentials.user
        self._greet()
        return True

    def welcome(self) -> dict[str, Any]:
        """The `welcome` message sent on open."""
        from plexus import SERVER_NAME

        welcome = {
            "type": "welcome",
            "client": self.client_id,
            "user": self.user,
            "server": SERVER_NAME,
            "node": self.node.name,
            "ping_interval": self.node.settings.ping_interval,
            "max_message_size": self.node.settings.max_message_size,
        }
        if self.session is not None:
            welcome["session"] = self.session
        return welcome

    # ----- token expiry

    def watch_expiry(self) -> None:
        """Act when the identity expires.

        A token: close with 4002 once the grace period passed without `auth`.
        The application's connect answer: ask its refresh call at `expire_at`
        (4002 when it says expired, or when nothing answers refresh).
        """
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        credentials = self.credentials
        expires = credentials.expires_at if credentials else None
        if credentials is None or expires is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires - time.time())
        if credentials.session:
            self._expiry_timer = loop.call_later(delay, self._session_expired)
        else:
            delay += self.node.settings.token_grace
            self._expiry_timer = loop.call_later(delay, self._expired)

    def _session_expired(self) -> None:
        self._expiry_timer = None
        if self.close_code is not None:
            return
        if "refresh" not in self.node.decider.enabled:
            self.close(CloseCode.TOKEN_EXPIRED, "session expired")
            return
        self._refreshing = asyncio.get_running_loop().create_task(
            self._refresh(), name=f"plexus-refresh-{self.client_id}"
        )

    async def _refresh(self) -> None:
        """Ask the application whether the session goes on, and until when."""
        try:
            result = await self.node.decider.ask(self.request(RefreshRequest))
        except Refused as exc:
            expired = exc.reason == TOKEN_EXPIRED
            self.close(CloseCode.TOKEN_EXPIRED if expired else CloseCode.UNAUTHORIZED, exc.message)
            return
        except Unavailable:
            # Logged by the decider; ask again later, the connection stays.
            if self.close_code is None:
                loop = asyncio.get_running_loop()
                self._expiry_timer = loop.call_later(REFRESH_RETRY, self._session_expired)
            return
        finally:
            self._refreshing = None
        if self.close_code is not None or self.credentials is None:
            return
        expire_at = result.get("expire_at")
        if result.get("expired") or expire_at is None or expire_at <= time.time():
            self.close(CloseCode.TOKEN_EXPIRED, "session expired")
            return
        self.credentials = dataclasses.replace(self.credentials, expires_at=float(expire_at))
        self.watch_expiry()

    def _expired(self) -> None:
        self._expiry_timer = None
        expires = self.credentials.expires_at if self.credentials else None
        if expires is not None and expires <= time.time():
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    # ----- input

    async def receive(self, payload: str | bytes) -> None:
        """Handle one WebSocket message from the client."""
        waiting = self.handle(payload)
        if waiting is not None:
            await waiting

    def handle(self, payload: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Start handling one WebSocket message; return what is left to await, if anything.

        A command that needs no I/O — a ping, an invalid command, a publish
        when the history store and broker are in-process — is answered before
        this returns, with no task and no coroutine. Otherwise the returned
        coroutine does the rest; the caller awaits it before handling the
        client's next message (publishes return as soon as they are started:
        see `_pipeline`).
        """
        now = self.last_seen = time.monotonic()
        if self.close_code is not None:
            return None
        self.node.counters.commands += 1
        outcome = self.state.receive(payload, now)
        command = outcome.command
        if command is None:
            if outcome.error is not None:
                self.node.counters.errors[outcome.error["code"]] += 1
                self.send(outcome.error)
            if outcome.close is not None:
                self.close(outcome.close, "too many bad commands")
            return None
        if isinstance(command, cmd.Publish):
            space = self.node.space(command.channel)
            if not self._inflight and space.inline:
                self._publish_now(command)
                return None
            if space.options.proxy_publish:
                # One at a time, in order: pipelined, a later publish could be
                # answered by the application (and stored) before an earlier one.
                return self._after_publishes(command)
            return self._pipeline(command)
        if self._inflight:
            return self._after_publishes(command)
        if isinstance(command, cmd.Ping):
            self._pong(command)
            return None
        return self.execute(command)

    async def _after_publishes(self, command: cmd.Command) -> None:
        """Run `command` once the publishes sent before it completed, so that it sees them."""
        await self._publishes_below(1)
        await self.execute(command)

    def _pong(self, command: cmd.Ping) -> None:
        message: dict[str, Any] = {"type": "pong"}
        if command.id is not None:
            message["id"] = command.id
        self.send(message)

    def _publish_now(self, command: cmd.Publish) -> None:
        """Publish where the engine stores and delivers without I/O: no task, no coroutine."""
        try:
            self._check_publish(command.channel)
            result = self.node.publish_nowait(
                command.channel,
                command.data,
                raw=command.raw,
                client=self.client_id,
                user=self.user,
                key=command.idempotency_key,
            )
        except Exception as exc:
            self._failed(command, exc)
            return
        if command.id is not None:
            self.send(cmd.reply(command.id, published(result)))

    def _check_publish(self, channel: str) -> NamespaceOptions:
        options = self.node.check_publish(self.user, channel)
        # Writing into a private channel needs the right to read it.
        private = options.private and not options.publish_without_subscribe
        if private and channel not in self.subscriptions:
            raise PermissionDenied(f"{channel} is private: subscribe (with its token) first")
        return options

    def _pipeline(self, command: cmd.Publish) -> Coroutine[Any, Any, None] | None:
        """Start a publish without waiting for it before reading the next command.

        A store that commits in groups (SQLite) then stores a client's burst
        in one commit, and its fan-out leaves in one write per subscriber,
        instead of one commit and one write per message. Order is kept: the
        engine stores publishes in call order and completes them in that
        order. No task, coroutine or future per publish (`Node.publish_then`):
        the reply is sent from the engine's completion callback. Returns what
        the caller must await first only when too many are in flight.
        """
        if self._inflight >= MAX_INFLIGHT_PUBLISHES:
            return self._pipeline_later(command)
        try:
            self._check_publish(command.channel)
            self.node.publish_then(
                command.channel,
                command.data,
                raw=command.raw,
                client=self.client_id,
                user=self.user,
                key=command.idempotency_key,
                then=lambda outcome: self._published(command, outcome),
            )
        except Exception as exc:
            self._failed(command, exc)
        else:
            self._inflight += 1
        return None

    async def _pipeline_later(self, command: cmd.Publish) -> None:
        """`_pipeline` once fewer than `MAX_INFLIGHT_PUBLISHES` are in flight."""
        await self._publishes_below(MAX_INFLIGHT_PUBLISHES)
        self._pipeline(command)

    def _published(
        self, command: cmd.Publish, outcome: Publication | Duplicate | Exception
    ) -> None:
        """A pipelined publish completed: answer it (on the loop, in completion order)."""
        self._inflight -= 1
        waiting = self._publish_waiter
        if waiting is not None:
            self._publish_waiter = None
            if not waiting.done():
                waiting.set_result(None)
        if isinstance(outcome, Exception):
            self._failed(command, outcome)
        elif command.id is not None:
            self.send(cmd.reply(command.id, published(outcome)))

    async def _publishes_below(self, limit: int) -> None:
        """Return once fewer than `limit` pipelined publishes are in flight (1: none)."""
        while self._inflight >= limit:
            waiting = self._publish_waiter
            if waiting is None:
                waiting = self._publish_waiter = asyncio.get_running_loop().create_future()
            # Shielded: a waiter cancelled must not cancel what the others wait for.
            await asyncio.shield(waiting)

    async def execute(self, command: cmd.Command, *, granted: bool = False) -> None:
        """Run one validated command and answer it (`granted`: made by the server)."""
        try:
            if granted and isinstance(command, cmd.Subscribe):
                validate_channel(command.channel)
                await self._subscribe(command, granted=True)
                result = None
            else:
                result = await self._run(command)
        except Exception as exc:
            self._failed(command, exc, granted=granted)
        else:
            if result is not None and command.id is not None:
                self.send(cmd.reply(command.id, result))

    def _failed(self, command: cmd.Command, exc: Exception, *, granted: bool = False) -> None:
        """Answer a command that raised: its error code, or `internal` for a bug.

        A `PlexusError` whose code is not one of the protocol's (an rpc
        handler's own) is a bug too. Refusals by the application, every
        error of an `rpc`, and subscriptions the server made (`granted`) are
        not the client's protocol mistakes: they never count as bad commands.
        """
        if isinstance(exc, PlexusError) and isinstance(exc.code, str) and exc.code in _ERROR_CODES:
            code, message = ErrorCode(exc.code), exc.message
        else:
            log.error(
                "command %s of %s failed",
                type(command).__name__,
                self.client_id,
                exc_info=exc,
            )
            code, message = ErrorCode.INTERNAL, "internal error"
        counted = not (granted or isinstance(exc, Refused) or isinstance(command, cmd.Rpc))
        outcome = self.state.failed(command.id, code, message, time.monotonic(), counted=counted)
        if outcome.error is not None:
            self.node.counters.errors[outcome.error["code"]] += 1
            self.send(outcome.error)
        if outcome.close is not None:
            reason = "rate limited" if outcome.close == CloseCode.RATE_LIMITED else "bad commands"
            self.close(outcome.close, reason)

    async def _run(self, command: cmd.Command) -> dict[str, Any] | None:
        node = self.node
        if isinstance(command, cmd.Publish):
            options = self._check_publish(command.channel)
            data, raw = command.data, command.raw
            if options.proxy_publish:
                data, raw = await self._decide_publish(command)
            result = await node.publish(
                command.channel,
                data,
                raw=raw,
                client=self.client_id,
                user=self.user,
                key=command.idempotency_key,
            )
            return published(result)
        if isinstance(command, cmd.Ping):
            self._pong(command)
            return None
        if isinstance(command, cmd.Subscribe):
            await self._subscribe(command)
            return None
        if isinstance(command, cmd.Unsubscribe):
            sub = self.subscriptions.pop(command.channel, None)
            if sub is None:
                raise PlexusError(f"not subscribed to {command.channel}", ErrorCode.NOT_SUBSCRIBED)
            await node.unsubscribe(sub)
            return {}
        if isinstance(command, cmd.History):
            return await self._history(command)
        if isinstance(command, cmd.PresenceQuery):
            return await self._presence(command.channel)
        if isinstance(command, cmd.Rpc):
            return await self._rpc(command)
        if isinstance(command, cmd.Auth):
            return self._auth(command.token)
        raise PlexusError(f"unhandled command {type(command).__name__}", ErrorCode.UNKNOWN_TYPE)

    async def _decide_publish(self, command: cmd.Publish) -> tuple[Any, bytes]:
        """Ask the application; the data to store and deliver (its own, if it gave some)."""
        result = await self.node.decider.ask(
            self.request(PublishRequest, channel=command.channel, data=command.data)
        )
        if "data" not in result:
            return command.data, command.raw
        try:
            return result["data"], check_payload(result["data"])
        except PlexusError as exc:
            log.warning("publish answer for %s is not a payload: %s", command.channel, exc.message)
            raise Unavailable("the application's answer cannot be published") from None

    async def _rpc(self, command: cmd.Rpc) -> dict[str, Any]:
        """A Python handler's answer, else the application's (hook or proxy), else `not_found`."""
        node = self.node
        credentials = self.credentials
        if node.has_rpc_handler(command.method) or "rpc" not in node.decider.enabled:
            call = RpcCall(
                command.method,
                command.data,
                self.client_id,
                self.user,
                credentials.claims if credentials else {},
                credentials.info if credentials else None,
            )
            data = await node.call_rpc(call)
        else:
            request = self.request(RpcRequest, method=command.method, data=command.data)
            data = (await node.decider.ask(request)).get("data")
        # Checked here, where a failure is this command's `internal`: an answer
        # that cannot be encoded would otherwise fail the whole connection.
        try:
            check_payload(data, "rpc answer")
        except PlexusError as exc:
            raise TypeError(f"rpc {command.method!r} answered {exc.message}") from None
        return {"data": data}

    def _check_private(self, channel: str, token: str | None) -> None:
        if token is None:
            raise PermissionDenied(f"{channel} is private: subscribe needs a subscription token")
        self.auth.verify_subscription(token, user=self.user, client=self.client_id, channel=channel)

    async def subscribe_granted(self) -> None:
        """Make the server-side subscriptions listed in the token's `channels` claim.

        The signed token already grants them, so private channels need no
        subscription token; other permissions still apply. Each one is
        reported like a `subscribe` without id: silent on success, an `error`
        push without id on failure.
        """
        channels = self.credentials.channels if self.credentials else ()
        for channel in channels:
            await self.execute(cmd.Subscribe(None, channel), granted=True)

    async def subscribe_server(self, channel: str) -> bool:
        """Subscribe on the server's initiative (`/api/subscribe`); False if not made.

        Reported like a subscription of the token's `channels` claim: the
        `subscribed` push, or an `error` push without id. A connection already
        subscribed (or subscribing) to `channel`, or closing, is skipped.
        """
        if self.close_code is not None or self._deciding:
            return False
        if channel in self.subscriptions or (self._subscribing and channel in self._subscribing):
            return False
        await self.execute(cmd.Subscribe(None, channel), granted=True)
        return channel in self.subscriptions

    def _check_subscribing(self, channel: str) -> None:
        if channel in self.subscriptions or (self._subscribing and channel in self._subscribing):
            raise PlexusError(f"already subscribed to {channel}", ErrorCode.ALREADY_SUBSCRIBED)

    async def _subscribe(self, command: cmd.Subscribe, *, granted: bool = False) -> None:
        channel = command.channel
        self._check_subscribing(channel)
        limit = self.node.settings.max_subscriptions
        if len(self.subscriptions) >= limit:
            raise PermissionDenied(f"subscription limit reached ({limit} per connection)")
        options = self.node.check_read(self.user, channel)
        if command.has_info and options.client_info:
            info = command.info
        else:
            info = self.credentials.info if self.credentials else None
        if granted:
            pass  # the token, the connect answer or the backend already said yes
        elif options.private and command.token is not None:
            self._check_private(channel, command.token)
        elif options.proxy_subscribe:
            since = command.since
            result = await self.node.decider.ask(
                self.request(
                    SubscribeRequest,
                    channel=channel,
                    info=command.info if command.has_info else None,
                    since=None if since is None else {"offset": since.offset, "epoch": since.epoch},
                )
            )
            if "info" in result:
                info = result["info"]
            # The same channel may have been subscribed while the application thought.
            self._check_subscribing(channel)
        elif options.private:
            self._check_private(channel, command.token)
        subscribing = self._subscribing
        if subscribing is None:
            subscribing = self._subscribing = set()
        subscribing.add(channel)
        try:
            outcome = await self.node.subscribe(
                self,
                channel,
                since=command.since,
                info=info,
                recovery_budget=max(0, self.outbox.limit - self.outbox.buffered),
            )
        finally:
            subscribing.discard(channel)
        sub = outcome.subscription
        if self.close_code is not None:
            # Closed while subscribing: undo so nothing dangles.
            await self.node.unsubscribe(sub)
            return
        self.subscriptions[channel] = sub
        events = outcome.events
        frames = [EncodedPush(event).frame(self.format_index) for event in events]
        missed = outcome.missed
        if missed and sum(map(len, frames[:missed])) > self.outbox.limit - self.outbox.buffered:
            # Pushing them would close the client as a slow consumer, and so
            # would every retry: answer "not recovered" instead, so that it
            # reloads its state (e.g. `history` in pages it can take).
            outcome.result["recovered"] = False
            events, frames = events[missed:], frames[missed:]
        # Reply, then missed and held messages, then live: no await in between.
        if granted:
            # Made by the server: the client learns of it (and where it starts)
            # from this push, as it would from a reply.
            self.send({"type": "subscribed", **outcome.result})
        elif command.id is not None:
            self.send(cmd.reply(command.id, outcome.result))
        floor = outcome.result["offset"]
        for event, frame in zip(events, frames, strict=True):
            if isinstance(event, Publication):
                floor = event.offset
            self.push_frame(frame)
        sub.floor = floor
        sub.backlog = None

    async def end_subscription(
        self, channel: str, reason: str, *, resubscribe: bool = False
    ) -> bool:
        """End the subscription to `channel` on the server's initiative; False if there was none.

        It ends exactly as the client's own `unsubscribe` ends it; then the
        `unsubscribed` push is queued after every frame already waiting, and
        after the hub dropped the subscription, so no message of `channel`
        follows it. With `resubscribe`, the push tells the client to subscribe
        again at once with `since` (the server lost track of the channel's
        stream, see `insufficient_state`). A closing connection is skipped:
        its subscriptions are ending already and it may get nothing more.
        """
        if self.close_code is not None:
            return False
        sub = self.subscriptions.pop(channel, None)
        if sub is None:
            return False
        # Taken off the hub before anything awaits: nothing of the channel
        # may reach the client after the push.
        message: dict[str, Any] = {"type": "unsubscribed", "channel": channel, "reason": reason}
        if resubscribe:
            message["resubscribe"] = True
        await self.node.unsubscribe(sub)
        self.send(message)
        return True

    async def _history(self, command: cmd.History) -> dict[str, Any]:
        channel = command.channel
        options = self.node.check_read(self.user, channel)
        if not options.allow_history:
            raise PermissionDenied(f"history of {channel} is not available to clients")
        if options.private and channel not in self.subscriptions:
            raise PermissionDenied(f"{channel} is private: subscribe first")
        page, _ = await self.node.history_page(channel, since=command.since, limit=command.limit)
        return {
            "messages": [publication_message(p) for p in page.publications],
            "offset": page.position.offset,
            "epoch": page.position.epoch,
        }

    async def _presence(self, channel: str) -> dict[str, Any]:
        options = self.node.check_read(self.user, channel)
        if not (options.presence and options.allow_presence):
            raise PermissionDenied(f"presence of {channel} is not available")
        if options.private and channel not in self.subscriptions:
            raise PermissionDenied(f"{channel} is private: subscribe first")
        clients = await self.node.presence_of(channel)
        return {"clients": {cid: {"user": c.user, "info": c.info} for cid, c in clients.items()}}

    def _auth(self, token: str) -> dict[str, Any]:
        try:
            credentials = self.auth.verify_connection(token)
        except AuthError as exc:
            raise PlexusError(str(exc), ErrorCode.UNAUTHORIZED) from None
        if self.user is not None and credentials.user != self.user:
            raise PermissionDenied("a connection cannot change its user: reconnect instead")
        old = self.user
        self.credentials = credentials
        self.user = credentials.user
        if old != self.user:
            self.node.directory.change_user(self, old)
        self.watch_expiry()
        return {"user": self.user}

    async def cleanup(self) -> None:
        """End every subscription after the socket closed."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        # Accepted publishes still finish: stored, fanned out, answered.
        await self._publishes_below(1)
        if self._ending is not None:
            await self._ending
        await self._end_subscriptions()
        self.node.directory.remove(self)

    async def _end_subscriptions(self) -> None:
        subs = list(self.subscriptions.values())
        self.subscriptions.clear()
        for sub in subs:
            try:
                await self.node.unsubscribe(sub)
            except Exception:  # logged here: this also runs as a task started by close()
                log.exception("cleanup of %s in %s failed", self.client_id, sub.channel)
