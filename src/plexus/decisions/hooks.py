"""Asking the application in Python: a module of hook functions.

`hooks = "myapp.plexus_hooks"` names a module whose `on_connect`,
`on_refresh`, `on_subscribe`, `on_publish` and `on_rpc` (any may be absent)
take the request object (`plexus.decisions.calls`) and return the answer a
proxy would: `{"result": {...}}` or `{"error": {"code", "message"}}`.
Async hooks run on the server's event loop; plain functions run in a worker
thread, so that one that waits for a database does not stall every connection.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any, Final

from plexus.exceptions import ConfigError

HOOK_NAMES: Final = {
    "connect": "on_connect",
    "refresh": "on_refresh",
    "subscribe": "on_subscribe",
    "publish": "on_publish",
    "rpc": "on_rpc",
}

Hook = Callable[[Any], Any]


def load_hooks(source: object) -> dict[str, Hook]:
    """The hooks of `source` by call name: a module, any object, or a module's dotted name.

    Raises:
        ConfigError: naming `hooks`, when the module cannot be imported, a hook
            name is bound to something that is not callable, or there is no hook.
    """
    if isinstance(source, str):
        try:
            source = importlib.import_module(source)
        except Exception as exc:  # an import runs the module: any error can come out
            raise ConfigError(
                f"hooks: cannot import {source!r}: {type(exc).__name__}: {exc}"
            ) from None
    found: dict[str, Hook] = {}
    for call, name in HOOK_NAMES.items():
        hook = getattr(source, name, None)
        if hook is None:
            continue
        if not callable(hook):
            raise ConfigError(f"hooks: {name} of {_name(source)} is not a function")
        found[call] = hook
    if not found:
        raise ConfigError(
            f"hooks: {_name(source)} defines none of {', '.join(HOOK_NAMES.values())}"
        )
    return found


def _name(source: object) -> str:
    return str(getattr(source, "__name__", type(source).__name__))


def is_async(hook: Hook) -> bool:
    """Whether calling `hook` gives a coroutine (an `async def`, or an object with one)."""
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(
        getattr(hook, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


async def run_hook(hook: Hook, request: Any) -> Any:
    """Call `hook` with `request`: awaited if async, in a worker thread if not."""
    if is_async(hook):
        return await hook(request)
    return await asyncio.to_thread(hook, request)
