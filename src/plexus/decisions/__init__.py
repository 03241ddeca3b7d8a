"""Who may connect, subscribe and publish, and what an `rpc` answers.

- `jwt`: connection and subscription tokens, verified with the server's keys.
- `calls`: the requests the application is asked and the answers it may give
  (`shared/spec/proxy.md`), without I/O.
- `proxy`: asking it over HTTP; `hooks`: asking it in Python.
- `decider`: which of the two answers each call, with timeouts, logs and metrics.
"""

from __future__ import annotations

from plexus.decisions.calls import (
    ConnectRequest,
    Credentials,
    Handshake,
    PublishRequest,
    RefreshRequest,
    Refused,
    Request,
    RpcRequest,
    SubscribeRequest,
)
from plexus.decisions.decider import Decider

__all__ = [
    "ConnectRequest",
    "Credentials",
    "Decider",
    "Handshake",
    "PublishRequest",
    "RefreshRequest",
    "Refused",
    "Request",
    "RpcRequest",
    "SubscribeRequest",
]
