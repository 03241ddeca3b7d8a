"""What the Redis engine writes: key names, the pub/sub payloads, and which server
holds a channel. Pure functions, no I/O.

Every key and pub/sub channel of one Plexus channel carries the channel's name
as its hash tag (`{C}`), so in a Redis Cluster they share a slot and one Lua
script may touch them all. Channel names never contain braces.

A message's stored and shipped form is its *body*: a small JSON array
`[time, client, user]`, a newline (which compact JSON never contains), and
the payload's JSON exactly as clients receive it. The pub/sub payload prefixes
the body with the kind, the offset and the epoch: `m<offset> <epoch> <body>`.
A receiving node reads the header without parsing the payload; a node whose
subscribers all speak JSON never parses it at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

import orjson

from plexus.models import UNSET, ClientInfo, Presence, Publication

MESSAGE: Final = ord("m")
JOIN: Final = ord("j")
LEAVE: Final = ord("l")
COMMAND: Final = ord("c")  # reserved for node-to-node commands


@dataclass(frozen=True, slots=True)
class Keys:
    """The names the engine uses under one prefix."""

    prefix: str

    def meta(self, channel: str) -> str:
        """Hash: epoch `e`, top offset `t`, payload bytes kept `b`."""
        return f"{self.prefix}:m:{{{channel}}}"

    def stream(self, channel: str) -> str:
        """Stream: entries `<offset>-0` with fields `x` (expiry ms, 0 never) and `d` (body)."""
        return f"{self.prefix}:h:{{{channel}}}"

    def idempotency(self, channel: str, key: str) -> str:
        """Hash: offset `o` and epoch `e` of a publish with that idempotency key."""
        return f"{self.prefix}:i:{{{channel}}}:{key}"

    def presence(self, channel: str) -> str:
        """Hash: client id -> `[user, info]` JSON."""
        return f"{self.prefix}:p:{{{channel}}}"

    def presence_expiry(self, channel: str) -> str:
        """Sorted set: client id -> expiry ms (Redis 7.0 has no per-field hash expiry)."""
        return f"{self.prefix}:pz:{{{channel}}}"

    def namespace(self, name: str) -> str:
        """Sorted set: the namespace's channels holding state on this server -> when
        their state expires (see `scripts.COUNTED`)."""
        return f"{self.prefix}:ns:{name}"

    def pubsub(self, channel: str) -> str:
        """The pub/sub channel carrying the channel's messages and joins/leaves."""
        return f"{self.prefix}.c.{{{channel}}}"

    def channel_of(self, pubsub: bytes) -> str:
        """The Plexus channel a pub/sub channel name carries."""
        return pubsub[len(self.prefix) + 4 : -1].decode()

    def node_channel(self, node: str | None) -> str:
        """A node's own pub/sub channel, or (None) the one every node listens to."""
        return f"{self.prefix}.n.{node}" if node is not None else f"{self.prefix}.all"

    def carries_channel(self, pubsub: bytes) -> bool:
        """Whether a pub/sub channel carries a Plexus channel (not node messages)."""
        return pubsub.startswith(f"{self.prefix}.c.".encode())

    @property
    def nodes(self) -> str:
        """Hash: node id -> its stats as JSON (on the first server)."""
        return f"{self.prefix}:nodes"

    @property
    def nodes_expiry(self) -> str:
        """Sorted set: node id -> when it counts as gone unless it reports again."""
        return f"{self.prefix}:nodesz"


def body(pub: Publication) -> bytes:
    """The stored and shipped form of a message (see the module docstring)."""
    return pub.header() + b"\n" + pub.raw


def publication_from_body(channel: str, offset: int, epoch: str, data: bytes) -> Publication:
    """The publication a stored or shipped body holds."""
    newline = data.index(b"\n")
    time, client, user = orjson.loads(data[:newline])
    return Publication(channel, UNSET, offset, epoch, time, client, user, raw=data[newline + 1 :])


def presence_payload(event: Presence) -> bytes:
    """The pub/sub payload of a join or leave."""
    kind = b"j" if event.kind == "join" else b"l"
    who = event.client
    return kind + orjson.dumps([who.client, who.user, who.info])


def decode(channel: str, payload: bytes) -> Publication | Presence | None:
    """The event a pub/sub payload of `channel` carries; None for what this node ignores.

    Raises:
        ValueError: the payload is malformed (another program published there).
    """
    kind = payload[0]
    if kind == MESSAGE:
        space = payload.index(b" ", 1)
        offset = int(payload[1:space])
        end = payload.index(b" ", space + 1)
        epoch = payload[space + 1 : end].decode()
        return publication_from_body(channel, offset, epoch, payload[end + 1 :])
    if kind in (JOIN, LEAVE):
        client, user, info = orjson.loads(payload[1:])
        kind_name = "join" if kind == JOIN else "leave"
        return Presence(kind_name, channel, ClientInfo(client, user, info))
    return None


def presence_entry(info: ClientInfo) -> bytes:
    """A presence hash field's value."""
    return orjson.dumps([info.user, info.info])


def client_info(client: str, value: bytes) -> ClientInfo:
    """The presence entry a hash field's value holds."""
    user, info = orjson.loads(value)
    return ClientInfo(client, user, info)


def shard_of(channel: str, shards: int) -> int:
    """Which of `shards` Redis servers holds `channel` (jump consistent hash).

    Adding a server at the end moves only about 1/N of the channels (Lamping
    and Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm", 2014);
    the moved channels start new epochs there, which recovery reports
    honestly as `recovered: false`.
    """
    if shards <= 1:
        return 0
    key = int.from_bytes(hashlib.blake2b(channel.encode(), digest_size=8).digest(), "big")
    return jump_hash(key, shards)


def jump_hash(key: int, buckets: int) -> int:
    """The bucket of a 64-bit `key` among `buckets`, as the paper's C++ code computes it."""
    bucket, jump = -1, 0
    while jump < buckets:
        bucket = jump
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        jump = int((bucket + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return bucket


def as_text(value: Any) -> str:
    """A Redis reply value as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
