"""Actions that run on every node sharing an engine (or on one), with their answers.

A backend's `/api/disconnect` must reach a user's connections wherever they
are; with the Redis engine they may be on any node. `Cluster.call` sends the
action to every node through the engine (`Broker.send_nodes`: Redis pub/sub,
or straight back to this node for a single-node engine), each node runs it on
its own connections and answers, and the caller gets every answer (or those
that came within the timeout: a node that died meanwhile does not answer).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson

from plexus.exceptions import PlexusError

log = logging.getLogger("plexus.cluster")

Action = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_PENDING: Final = 1000  # calls in flight from this node; beyond, callers get `unavailable`


class NodeMessages(Protocol):
    """The part of a `Broker` this needs."""

    async def send_nodes(self, payload: bytes, node: str | None = None) -> int: ...


@dataclass
class _Call:
    expected: int
    future: asyncio.Future[None]
    answers: list[Any] = field(default_factory=list)


class Cluster:
    """Runs named actions on the nodes of an engine.

    Args:
        name: this node's id.
        messages: the engine's broker.
        timeout: seconds to wait for every node's answer.
    """

    def __init__(self, name: str, messages: NodeMessages, timeout: float = 5.0) -> None:
        self.name = name
        self.messages = messages
        self.timeout = timeout
        self.actions: dict[str, Action] = {}
        self._pending: dict[str, _Call] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-"
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, name: str, action: Action) -> None:
        """Let other nodes run `action` here as `name`."""
        self.actions[name] = action

    async def call(
        self,
        action: str,
        args: dict[str, Any],
        node: str | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Any]:
        """Run `action` on node `node` (None: on every node) and return the answers.

        Waits at most `timeout` seconds (default: the cluster's) for them.

        Raises:
            Unavailable: the engine cannot reach the nodes, or too many calls are in flight.
        """
        from plexus.exceptions import Unavailable

        if len(self._pending) >= MAX_PENDING:
            raise Unavailable("too many cluster calls in flight")
        call_id = f"{self._prefix}{next(self._ids)}"
        payload = orjson.dumps(
            {"t": "call", "id": call_id, "from": self.name, "a": action, "args": args}
        )
        call = _Call(0, asyncio.get_running_loop().create_future())
        self._pending[call_id] = call
        try:
            call.expected = await self.messages.send_nodes(payload, node)
            if len(call.answers) < call.expected:
                try:
                    await asyncio.wait_for(
                        call.future, self.timeout if timeout is None else timeout
                    )
                except TimeoutError:
                    log.warning(
                        "cluster %s: %d of %d nodes answered in time",
                        action,
                        len(call.answers),
                        call.expected,
                    )
            return list(call.answers)
        finally:
            self._pending.pop(call_id, None)

    def on_message(self, payload: bytes) -> None:
        """A node message arrived (see `EventSink.on_node_message`)."""
        try:
            message = orjson.loads(payload)
            kind = message["t"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("cluster: ignored a malformed node message")
            return
        if kind == "reply":
            call = self._pending.get(message.get("id"))
            if call is None:
                return  # late: its caller gave up
            call.answers.append(message.get("result"))
            if call.expected and len(call.answers) >= call.expected and not call.future.done():
                call.future.set_result(None)
        elif kind == "call":
            task = asyncio.get_running_loop().create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, message: dict[str, Any]) -> None:
        action = self.actions.get(message.get("a", ""))
        result: Any = None
        if action is None:
            log.warning("cluster: no action %r here", message.get("a"))
        else:
            try:
                result = await action(message.get("args") or {})
            except PlexusError as exc:
                log.warning("cluster %s failed here: %s", message.get("a"), exc.message)
            except Exception:
                log.exception("cluster %s failed here", message.get("a"))
        reply = orjson.dumps({"t": "reply", "id": message.get("id"), "result": result})
        try:
            await self.messages.send_nodes(reply, message.get("from"))
        except PlexusError as exc:
            log.warning("cluster: could not answer %s: %s", message.get("from"), exc.message)

    async def close(self) -> None:
        """Stop answering."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
