"""The SSE transport: the protocol over `GET /sse` and `POST /emulation`.

For networks that break WebSocket upgrades. A `GET /sse` becomes an event
stream that carries every server frame as one event (`data: <JSON>`, a blank
line; the `JSON_SSE` wire format), starting with a `welcome` that names the
stream's session and node; commands come as `POST /emulation` batches naming
them. Both run through the same `Endpoint` and `Connection` as `/ws`: the
stream is an `SseStream` link, and every limit, decision and close code is
the connection's own. Where a WebSocket would be closed with a code, the
stream gets a last `{"type":"close","code":C,"reason":R}` event and ends.

A session is this node's `SseStream`, found by a random id that only its
client learns (from `welcome`): it stands for the connection's identity, like
its token. A POST that reaches a node not holding the session is forwarded
to the node it names through the engine (`Cluster.call`: in-process for one
node, Redis pub/sub between nodes), so no sticky sessions are needed.

Bounds (per POST and per session): a body of at most `max_body_size` with at
most `MAX_BATCH` commands, each at most `max_message_size` once encoded (a
larger one closes the session with 1009, as on a WebSocket); at most
`MAX_QUEUED` commands accepted but not yet handled per session, and at most
`MAX_WAITING` POSTs waiting for room behind them (each for at most half the
cluster's timeout), beyond which a POST is refused with 429. A POST is
answered 204 once its commands are queued, in order, at the session's
connection: their answers come on the stream.

There is no resuming: a `GET /sse` always opens a new session (the `session`
query parameter is ignored), and a client that lost its stream subscribes
again with `since`, which replays what it missed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import hdrs, web
from yarl import URL

from plexus.exceptions import BadRequest, PermissionDenied, PlexusError, TooLarge
from plexus.protocol.codes import CloseCode, ErrorCode
from plexus.protocol.wire import JSON_SSE
from plexus.transports.http_api import (
    RequestTimeout,
    UnsupportedMediaType,
    error_response,
    read_body,
)
from plexus.transports.link import Endpoint, Link, Refusal
from plexus.transports.origin import origin_allowed

if TYPE_CHECKING:
    from plexus.transports.lean import LeanListener

log = logging.getLogger("plexus.sse")

STREAM_PATH: Final = "/sse"
POST_PATH: Final = "/emulation"
# Commands in one POST: the work one request can ask for at once.
MAX_BATCH: Final = 100
# Commands accepted but not yet handled, per session (a WebSocket's reader
# stops reading at 32 messages; a batch is up to 100).
MAX_QUEUED: Final = 2 * MAX_BATCH + 56
# POSTs of one session waiting for room in its queue; beyond, 429.
MAX_WAITING: Final = 4
# Longest `session` and `node` a POST may name.
MAX_NAME: Final = 128

_JSON: Final = "application/json"
_REFUSED: Final = Refusal(400, "bad_request", "not a valid HTTP request")
# How a POST ended, by the status its session's node gave.
_OUTCOMES: Final = {
    404: (ErrorCode.NOT_FOUND, "unknown or expired session: open a new event stream"),
    413: (ErrorCode.TOO_LARGE, "a command over max_message_size: the session is closed (1009)"),
    429: (ErrorCode.RATE_LIMITED, "too many commands waiting for this session"),
}


def close_event(code: int, reason: str) -> bytes:
    """The last event of a stream: what a WebSocket close frame would say."""
    return JSON_SSE.message({"type": "close", "code": int(code), "reason": reason})


def stream_head(cors: Iterable[tuple[str, str]] = ()) -> bytes:
    """The answer to `GET /sse` before its events.

    The body ends when the connection does (no length, no chunks): what every
    HTTP/1.0 and 1.1 hop passes through as it comes, and the last `close`
    event tells a clean end from a cut one.
    """
    extra = "".join(f"{name}: {value}\r\n" for name, value in cors)
    return (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/event-stream; charset=utf-8\r\n"
        "Cache-Control: no-cache, no-store, no-transform\r\n"
        # nginx: pass the events on as they come, whatever its proxy_buffering.
        "X-Accel-Buffering: no\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode("latin-1")


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]] | None:
    """The request target and the headers of a request head; None when malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers.append((name, value.strip()))
    return parts[1], headers


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def parse_post(value: Any) -> tuple[str, str | None, list[Any]]:
    """The session, node and commands of a POST body (already parsed JSON).

    Raises:
        BadRequest: not shaped like `{"session", "node", "commands": [...]}`.
        TooLarge: more than `MAX_BATCH` commands.
    """
    if not isinstance(value, dict):
        raise BadRequest('the body must be a JSON object {"session", "node", "commands"}')
    session, node, commands = value.get("session"), value.get("node"), value.get("commands")
    if not isinstance(session, str) or not 0 < len(session) <= MAX_NAME:
        raise BadRequest('"session" must be the string the stream\'s welcome gave')
    if node is not None and (not isinstance(node, str) or len(node) > MAX_NAME):
        raise BadRequest('"node" must be the string the stream\'s welcome gave')
    if not isinstance(commands, list):
        raise BadRequest('"commands" must be a list of commands')
    if len(commands) > MAX_BATCH:
        raise TooLarge(f"at most {MAX_BATCH} commands per POST")
    return session, node, commands


def encode_commands(commands: list[Any]) -> list[bytes]:
    """Each command as the JSON a WebSocket message would carry.

    orjson reads 1024 levels of nesting but writes at most 254: a command
    deeper than that is one the server would refuse anyway (payloads may
    nest 250 levels), and the whole POST is refused.
    """
    try:
        return [orjson.dumps(command) for command in commands]
    except orjson.JSONEncodeError:
        raise BadRequest("a command is nested too deeply (over 250 levels)") from None


class SseTransport:
    """This node's event streams by session, and the handlers of their POSTs.

    Args:
        endpoint: the transport-neutral endpoint the streams' connections join.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.node = endpoint.node
        self.settings = endpoint.settings
        self.sessions: dict[str, SseStream] = {}
        # Half the cluster's answer timeout: a POST forwarded from another
        # node is answered before that node gives up on it.
        self.room_timeout = max(0.05, self.node.cluster.timeout / 2)
        self.node.cluster.register("emulation", self._forwarded)

    def routes(self) -> list[web.AbstractRouteDef]:
        """`POST /emulation` and the CORS preflights (`GET /sse` is the listener's)."""
        return [
            web.post(POST_PATH, self.emulation),
            web.options(POST_PATH, self.preflight),
            web.options(STREAM_PATH, self.preflight),
        ]

    # ----- the stream

    def open(
        self, listener: LeanListener, transport: asyncio.Transport, remote: str, head: bytes
    ) -> SseStream | None:
        """Answer `GET /sse` on `transport`; the stream, when the socket became one.

        Refusals are those of an upgrade: 403 for a foreign Origin, 503 at
        `max_connections`. A refused token gets the stream with only a
        `close` event (4001/4002), so that a browser can read the code.
        """
        endpoint = self.endpoint
        request = parse_head(head)
        if request is None:
            _refuse(transport, _REFUSED)
            return None
        target, headers = request
        origin = _first(headers, "origin")
        refusal = endpoint.admit(origin, listener.scheme, _first(headers, "host"), remote)
        if refusal is not None:
            _refuse(transport, refusal)
            return None
        try:
            query = URL(target).query
            token, data = query.get("token", ""), query.get("data")
        except ValueError:
            token, data = "", None
        credentials, refused = endpoint.verify_token(token, echo=False)
        transport.write(stream_head(_cors(origin)))
        if refused is not None:
            transport.write(close_event(refused.close_code, str(refused)[:100]))
            transport.close()
            log.info("refused token from %s: %s", remote, refused)
            return None
        stream = SseStream(self, listener, transport, remote)
        handshake = endpoint.handshake(headers, data)
        conn = endpoint.open(stream, JSON_SSE, credentials, handshake, session=stream.session)
        self.sessions[stream.session] = stream
        self.node.counters.sse_connections += 1
        if conn.starting:  # connect decision, server-side subscriptions
            stream.start()
        return stream

    def forget(self, stream: SseStream) -> None:
        """The session takes no more commands (closed, or its stream is gone)."""
        if self.sessions.get(stream.session) is stream:
            del self.sessions[stream.session]

    # ----- POST /emulation

    async def emulation(self, request: web.Request) -> web.StreamResponse:
        """`POST /emulation {"session", "node", "commands": [...]}` -> 204 (answers: the stream)."""
        origin = request.headers.get(hdrs.ORIGIN)
        route = "none"
        response: web.StreamResponse
        try:
            self._check_origin(request)
            status, route = await self._post(request)
            if status == 204:
                response = web.Response(status=204)
            else:
                code, message = _OUTCOMES.get(
                    status, (ErrorCode.UNAVAILABLE, "the session's node failed")
                )
                response = error_response(code, message, status=status)
        except RequestTimeout as exc:
            response = error_response(exc.code, exc.message, status=exc.status)
            response.force_close()  # the rest of the body may never come
        except UnsupportedMediaType as exc:
            response = error_response(exc.code, exc.message, status=exc.status)
        except PlexusError as exc:
            response = error_response(exc.code, exc.message)
        except Exception:
            log.exception("POST %s failed", POST_PATH)
            response = error_response(ErrorCode.INTERNAL, "internal error")
        self.node.counters.emulation_posts[str(response.status), route] += 1
        response.headers.extend(_cors(origin) if response.status != 403 else ())
        return response

    def _check_origin(self, request: web.Request) -> None:
        settings = self.settings
        if not origin_allowed(
            request.headers.get(hdrs.ORIGIN),
            request.scheme,
            request.headers.get(hdrs.HOST),
            settings.allowed_origins,
            settings.allowed_hosts,
        ):
            raise PermissionDenied("origin not allowed")

    async def _post(self, request: web.Request) -> tuple[int, str]:
        """Deliver a POST's commands; its status, and how it reached the session."""
        if request.content_type != _JSON:
            # What a page of another site can post without a preflight
            # (text/plain, a form) is never taken.
            raise UnsupportedMediaType(
                f"send the body as {_JSON} (Content-Type was {request.content_type})"
            )
        settings = self.settings
        body = await read_body(request, settings.max_body_size, settings.http_request_timeout)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"not valid JSON: {exc}") from None
        session, node, commands = parse_post(value)
        payloads = encode_commands(commands)
        stream = self.sessions.get(session)
        if stream is not None:
            return await stream.submit(payloads), "local"
        if node is None or node == self.node.name:
            return 404, "none"
        answers = await self.node.cluster.call(
            "emulation",
            {"session": session, "commands": [p.decode() for p in payloads]},
            node=node,
        )
        # No answer: the node is gone, or did not answer in time.
        status = answers[0] if answers and isinstance(answers[0], int) else 404
        return status, "forwarded"

    async def _forwarded(self, args: dict[str, Any]) -> int:
        """A POST another node received for a session of this one: its status."""
        stream = self.sessions.get(str(args.get("session")))
        commands = args.get("commands")
        if stream is None or not isinstance(commands, list):
            return 404
        return await stream.submit([str(command).encode() for command in commands])

    async def preflight(self, request: web.Request) -> web.Response:
        """The CORS preflight of a page of another allowed origin (its POST sends JSON)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return error_response(ErrorCode.BAD_REQUEST, "a CORS preflight names its Origin")
        try:
            self._check_origin(request)
        except PermissionDenied as exc:
            return error_response(exc.code, exc.message)
        method = "POST" if request.path == POST_PATH else "GET"
        return web.Response(
            status=204,
            headers={
                **dict(_cors(origin)),
                "Access-Control-Allow-Methods": f"{method}, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )


def _cors(origin: str | None) -> list[tuple[str, str]]:
    """The CORS headers of an answer to an allowed `origin` (the origin was checked)."""
    if origin is None:
        return [("Vary", "Origin")]
    # The origin itself, not `*`: the answer depends on it (Vary).
    return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]


def _refuse(transport: asyncio.Transport, refusal: Refusal) -> None:
    from plexus.transports.lean import http_error

    transport.write(http_error(refusal))
    transport.close()


class SseStream(Link, asyncio.Protocol):
    """One event stream: the socket side of an SSE connection, and its command queue.

    The socket only carries output (what the client sends on it after its
    request is ignored). Commands arrive in POST batches (`submit`) and are
    handled one after the other, in order, as a WebSocket's messages are:
    most at once, and those behind one that waits for I/O by a task that
    exists only meanwhile.
    """

    __slots__ = ("_pending", "_queued", "_task", "_waiting", "listener", "session", "sse")

    def __init__(
        self,
        sse: SseTransport,
        listener: LeanListener,
        transport: asyncio.Transport,
        remote: str,
    ) -> None:
        super().__init__(sse.endpoint)
        self.sse = sse
        self.listener = listener
        self.transport = transport
        self.remote = remote
        self.session = secrets.token_urlsafe(18)
        # Commands (and the close of an oversize one) waiting for the task.
        self._pending: deque[str | bytes | Callable[[], None]] = deque()
        self._queued = 0  # commands in `_pending`
        self._task: asyncio.Task[None] | None = None
        # POSTs waiting for room: their commands, and what they wait on.
        self._waiting: deque[tuple[Sequence[str | bytes], asyncio.Future[bool]]] = deque()
        listener.protocols.add(self)

    # ----- asyncio.Protocol (the listener hands the socket over after the request head)

    def data_received(self, data: bytes) -> None:
        pass  # nothing is read on a stream; commands come as POSTs

    def eof_received(self) -> bool | None:
        return None  # close: the reader is gone

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        listener.protocols.discard(self)
        listener.endpoint.socket_closed(self.remote)
        self.stop_abort_timer()
        self._stop_taking()
        listener.track(asyncio.get_running_loop().create_task(self._end()))

    # ----- commands

    def start(self) -> None:
        """Run the connection's start (connect decision, ...) before any command."""
        self._task = asyncio.get_running_loop().create_task(self._run(start=True))

    async def submit(self, commands: Sequence[str | bytes]) -> int:
        """Queue a POST's commands behind those before; the POST's HTTP status.

        204: queued. 404: the session is over. 413: a command is over
        `max_message_size` (none is queued; the session closes with 1009
        after the commands before). 429: the queue stays full.
        """
        if self.sse.sessions.get(self.session) is not self:
            return 404
        limit = self.endpoint.settings.max_message_size
        if any(len(command) > limit for command in commands):
            self._then(self._too_big)
            return 413
        if not self._waiting and self._queued + len(commands) <= MAX_QUEUED:
            self._take(commands)
            return 204
        if len(self._waiting) >= MAX_WAITING:
            return 429
        room = asyncio.get_running_loop().create_future()
        entry = (commands, room)
        self._waiting.append(entry)
        try:
            # Shielded: a timeout must not cancel `room`, which `_room` may
            # be about to resolve (its commands then were taken: 204).
            async with asyncio.timeout(self.sse.room_timeout):
                taken = await asyncio.shield(room)
        except TimeoutError:
            if room.done():
                return 204 if room.result() else 404
            self._waiting.remove(entry)
            return 429
        except asyncio.CancelledError:
            # The POST was given up (its client went away): its commands
            # are not taken later behind the back of whoever sent them.
            if not room.done():
                self._waiting.remove(entry)
                room.cancel()
            raise
        return 204 if taken else 404

    def _take(self, commands: Sequence[str | bytes]) -> None:
        """Handle `commands` now, or queue them behind the task's work."""
        conn = self.conn
        for index, command in enumerate(commands):
            if self._task is not None:
                self._pending.extend(commands[index:])
                self._queued += len(commands) - index
                return
            waiting = conn.handle(command)
            if waiting is not None:
                self._task = asyncio.get_running_loop().create_task(self._run(waiting))

    def _then(self, action: Callable[[], None]) -> None:
        """Run `action` after the commands queued before it."""
        if self._task is None:
            action()
        else:
            self._pending.append(action)

    def _too_big(self) -> None:
        self.conn.close(CloseCode.MESSAGE_TOO_BIG, "message too big")

    def _room(self) -> None:
        """Queue the waiting POSTs that now fit, first come first."""
        waiting = self._waiting
        while waiting and self._queued + len(waiting[0][0]) <= MAX_QUEUED:
            commands, room = waiting.popleft()
            self._take(commands)
            room.set_result(True)

    def _stop_taking(self) -> None:
        """The session is over: no more commands; the waiting POSTs get 404."""
        self.sse.forget(self)
        while self._waiting:
            _, room = self._waiting.popleft()
            if not room.done():
                room.set_result(False)

    async def _run(
        self, waiting: Coroutine[Any, Any, None] | None = None, *, start: bool = False
    ) -> None:
        """Finish a command that had to wait, then handle those queued behind it, in order."""
        conn = self.conn
        pending = self._pending
        try:
            if start:
                await conn.start()
            if waiting is not None:
                await waiting
            while pending:
                item = pending.popleft()
                if isinstance(item, str | bytes):
                    self._queued -= 1
                    if self._waiting:
                        self._room()
                    waiting = conn.handle(item)
                    if waiting is not None:
                        await waiting
                else:
                    item()
        except Exception:
            self.crashed()
        finally:
            self._task = None
            pending.clear()
            self._queued = 0

    # ----- the end

    def send_close(self, code: int, reason: str = "") -> None:
        """End the stream with a `close` event after everything queued.

        A slow consumer's queue was already dropped by its outbox, and its
        `close` event may never get through its full socket: the socket is
        dropped if it does not drain within CLOSE_TIMEOUT.
        """
        self._stop_taking()
        outbox = self.conn.outbox
        outbox.write_now(close_event(code, reason))
        outbox.overflowed = True  # nothing may follow the close event
        self.transport.close()
        self.drop_later()

    async def _end(self) -> None:
        """The socket is gone: let the commands under way finish, then clean up."""
        try:
            if self._task is not None:
                await asyncio.wait([self._task])
            await self.endpoint.finish(self)
        except Exception:  # nobody awaits this task: log here
            log.exception("cleanup of %s failed", self.conn.client_id)
        finally:
            self.sse.node.counters.sse_connections -= 1
