"""This node's connections, by id and by user, and what the server does to them.

A backend (the HTTP API, the admin page) acts on connections wherever they
are: `disconnect_everywhere`, `subscribe_everywhere` and
`unsubscribe_everywhere` run through the cluster (every node sharing the
engine acts on its own connections and answers), the `_here` parts on this
node's. The connections are reached through the `Peer` interface only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from plexus.cluster import Cluster
from plexus.hub import Subscriber
from plexus.protocol.codes import CloseCode


class Peer(Subscriber, Protocol):
    """A connected client as the node sees it."""

    def close(self, code: CloseCode, reason: str) -> None: ...

    async def end_subscription(
        self, channel: str, reason: str, *, resubscribe: bool = False
    ) -> bool:
        """End the subscription to `channel` on the server's initiative; False if there was none."""
        ...

    async def subscribe_server(self, channel: str) -> bool:
        """Subscribe to `channel` on the server's initiative; False if already subscribed."""
        ...


class Directory:
    """The connections of this node, and the server's actions on connections.

    Args:
        cluster: reaches the other nodes' directories.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.peers: dict[str, Peer] = {}
        self._users: dict[str, set[Peer]] = {}
        self.cluster = cluster
        cluster.register("disconnect", self._disconnect_here)
        cluster.register("unsubscribe", self._unsubscribe_here)
        cluster.register("subscribe", self._subscribe_here)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self.peers.values()))

    def __len__(self) -> int:
        return len(self.peers)

    @property
    def users(self) -> int:
        """How many users have connections here."""
        return len(self._users)

    def add(self, peer: Peer) -> None:
        """Register a connected client."""
        self.peers[peer.client_id] = peer
        if peer.user is not None:
            self._users.setdefault(peer.user, set()).add(peer)

    def remove(self, peer: Peer) -> None:
        """Forget a client (its subscriptions are ended separately)."""
        self.peers.pop(peer.client_id, None)
        if peer.user is not None:
            peers = self._users.get(peer.user)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del self._users[peer.user]

    def change_user(self, peer: Peer, old: str | None) -> None:
        """Move `peer` in the user index after re-authentication."""
        if old is not None:
            peers = self._users.get(old)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del self._users[old]
        if peer.user is not None:
            self._users.setdefault(peer.user, set()).add(peer)

    def disconnect_user(self, user: str, reason: str = "disconnected by the server") -> int:
        """Close every connection of `user` with 4001; return how many."""
        peers = list(self._users.get(user, ()))
        for peer in peers:
            peer.close(CloseCode.UNAUTHORIZED, reason)
        return len(peers)

    async def disconnect_everywhere(
        self, user: str | None = None, *, client: str | None = None
    ) -> int:
        """Close every connection of `user`, or connection `client`, on every node with
        4001; return how many. Exactly one of `user` and `client` is given."""
        if (user is None) == (client is None):
            raise ValueError("give exactly one of user and client")
        args = {"user": user} if user is not None else {"client": client}
        answers = await self.cluster.call("disconnect", args)
        return sum(n for n in answers if isinstance(n, int))

    async def _disconnect_here(self, args: dict[str, Any]) -> int:
        if args.get("client") is None:
            return self.disconnect_user(str(args["user"]))
        peer = self.peers.get(str(args["client"]))
        if peer is not None:
            peer.close(CloseCode.UNAUTHORIZED, "disconnected by the server")
        return 0 if peer is None else 1

    async def unsubscribe_everywhere(
        self, channel: str, *, user: str | None = None, client: str | None = None
    ) -> int:
        """`unsubscribe_server` on every node; return how many subscriptions ended."""
        if (user is None) == (client is None):
            raise ValueError("give exactly one of user and client")
        args = {"channel": channel, "user": user, "client": client}
        answers = await self.cluster.call("unsubscribe", args)
        return sum(n for n in answers if isinstance(n, int))

    def _peers_of(self, user: str | None, client: str | None) -> list[Peer]:
        """This node's connections of `user`, or connection `client` (exactly one is given)."""
        if (user is None) == (client is None):
            raise ValueError("give exactly one of user and client")
        if user is not None:
            return list(self._users.get(user, ()))
        peer = self.peers.get(client) if client is not None else None
        return [] if peer is None else [peer]

    async def subscribe_everywhere(
        self, channel: str, *, user: str | None = None, client: str | None = None
    ) -> int:
        """`subscribe_server` on every node; return how many subscriptions were made."""
        if (user is None) == (client is None):
            raise ValueError("give exactly one of user and client")
        answers = await self.cluster.call(
            "subscribe", {"channel": channel, "user": user, "client": client}
        )
        return sum(n for n in answers if isinstance(n, int))

    async def _subscribe_here(self, args: dict[str, Any]) -> int:
        return await self.subscribe_server(
            str(args["channel"]), user=args.get("user"), client=args.get("client")
        )

    async def subscribe_server(
        self, channel: str, *, user: str | None = None, client: str | None = None
    ) -> int:
        """Subscribe `user`'s connections (or connection `client`) of this node to `channel`.

        Exactly one of `user` and `client` is given. Each connection gets the
        subscription as from its token's `channels` claim: the `subscribed`
        push, or an `error` push without id when it may not read the channel.
        One already subscribed, or closing, is skipped.

        Returns:
            How many subscriptions were made.
        """
        peers = self._peers_of(user, client)
        made = 0
        for peer in peers:
            if await peer.subscribe_server(channel):
                made += 1
        return made

    async def _unsubscribe_here(self, args: dict[str, Any]) -> int:
        return await self.unsubscribe_server(
            str(args["channel"]), user=args.get("user"), client=args.get("client")
        )

    async def unsubscribe_server(
        self,
        channel: str,
        *,
        user: str | None = None,
        client: str | None = None,
        reason: str = "unsubscribed by the server",
    ) -> int:
        """End the subscriptions to `channel` of `user`'s connections, or of connection `client`.

        Exactly one of `user` and `client` is given. Each subscription ends
        exactly as the client's own `unsubscribe` command ends it (presence
        forgets it, the other subscribers get its `leave`), then its connection
        gets the `unsubscribed` push, queued after whatever was already waiting
        for it. The connection stays open and may subscribe again. Only this
        node's connections are reached; one that is closing or not subscribed
        to `channel` is skipped.

        Returns:
            How many subscriptions ended.
        """
        peers = self._peers_of(user, client)
        ended = 0
        for peer in peers:
            if await peer.end_subscription(channel, reason):
                ended += 1
        return ended
