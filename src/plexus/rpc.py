"""What an `rpc` handler written in Python receives, and its type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class RpcCall:
    """An `rpc` command as an application handler receives it.

    Attributes:
        method, data: the command's.
        client: the connection's id. user: its user (None when anonymous).
        claims: every claim of the connection's token (empty without a JWT).
        info: the connection's `info` (the token's claim, or the connect answer's).
    """

    method: str
    data: Any
    client: str
    user: str | None
    claims: Mapping[str, Any] = field(default_factory=dict)
    info: Any = None


RpcHandler = Callable[[RpcCall], Awaitable[Any]]
