"""Background tasks that cannot die silently.

Every long-running task of a server (the heartbeat, the engines' sweepers and
readers) runs under a `Supervisor`: a crash is logged once with its
traceback, the task is started again after a backoff, and `/health` shows
each task's state and restarts. A task that returns has finished its work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("plexus.supervisor")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]

BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


@dataclass(slots=True)
class _Supervised:
    name: str
    factory: TaskFactory
    task: asyncio.Task[None] | None = None
    state: str = "running"  # running | restarting | finished
    restarts: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


def cancelling() -> bool:
    """Whether the running task is being cancelled (for loops that catch errors:
    a library may turn a cancellation into one of its own exceptions)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Supervisor:
    """Runs named background tasks and restarts the ones that crash."""

    def __init__(self) -> None:
        self._tasks: dict[str, _Supervised] = {}
        self._closed = False

    def spawn(self, name: str, factory: TaskFactory) -> None:
        """Run `factory()` as the task `name`, again (after a backoff) each time it crashes.

        Raises:
            ValueError: a task of that name is already running.
        """
        if self._closed:
            raise RuntimeError("supervisor is closed")
        current = self._tasks.get(name)
        if current is not None and current.state != "finished":
            raise ValueError(f"task {name} is already running")
        entry = _Supervised(name, factory)
        self._tasks[name] = entry
        entry.task = asyncio.get_running_loop().create_task(self._run(entry), name=name)

    async def _run(self, entry: _Supervised) -> None:
        backoff = BACKOFF_START
        while True:
            started = time.monotonic()
            entry.state = "running"
            try:
                await entry.factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    # A library turned our cancellation into its own error
                    # (redis-py does): stop, as asked, instead of restarting.
                    raise asyncio.CancelledError from exc
                entry.restarts += 1
                entry.last_error = f"{type(exc).__name__}: {exc}"[:300]
                entry.last_error_at = time.time()
                log.exception("background task %s crashed; restarting", entry.name)
                if time.monotonic() - started > BACKOFF_MAX * 4:
                    backoff = BACKOFF_START  # it ran well for a while: not a crash loop
                entry.state = "restarting"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                entry.state = "finished"
                return

    def health(self) -> dict[str, Any]:
        """Each task's state, restarts and last error; status degraded while one restarts."""
        tasks = {
            name: {
                "status": entry.state,
                "restarts": entry.restarts,
                **({"last_error": entry.last_error} if entry.last_error else {}),
            }
            for name, entry in sorted(self._tasks.items())
        }
        restarting = any(entry.state == "restarting" for entry in self._tasks.values())
        return {"status": "degraded" if restarting else "ok", "tasks": tasks}

    async def cancel(self, name: str) -> None:
        """Stop the task `name` (no-op if there is none)."""
        entry = self._tasks.pop(name, None)
        if entry is not None and entry.task is not None:
            entry.task.cancel()
            await asyncio.gather(entry.task, return_exceptions=True)

    async def close(self) -> None:
        """Stop every task."""
        self._closed = True
        pending = {entry.task for entry in self._tasks.values() if entry.task is not None}
        while pending:
            for task in pending:
                task.cancel()
            # A task whose cancellation was swallowed on its way out is asked again.
            _, pending = await asyncio.wait(pending, timeout=0.5)
