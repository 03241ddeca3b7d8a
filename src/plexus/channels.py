"""Channel names and namespaces (pure functions)."""

from __future__ import annotations

import re
from typing import Final

from plexus.exceptions import InvalidChannel

MAX_CHANNEL_LENGTH: Final = 255
_VALID: Final = re.compile(r"[A-Za-z0-9_\-:.@#/=]{1,255}")
PERSONAL_PREFIX: Final = "#"


def validate_channel(name: str) -> str:
    """Return `name` if it is a valid channel name, else raise InvalidChannel.

    Valid: 1 to 255 characters of `A-Z a-z 0-9 _ - : . @ # / =`.
    """
    if _VALID.fullmatch(name) is None:
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise InvalidChannel(
            f"invalid channel name {shown!r}: 1-255 characters of A-Z a-z 0-9 _ - : . @ # / ="
        )
    return name


def namespace_of(channel: str) -> str:
    """The namespace: the part before the first `:`, or `""` (the default namespace)."""
    head, sep, _ = channel.partition(":")
    return head if sep else ""


def personal_owner(channel: str) -> str | None:
    """The user a `#USER` personal channel belongs to, or None for other channels."""
    if channel.startswith(PERSONAL_PREFIX) and len(channel) > 1:
        return channel[1:]
    return None
