"""Plexus: a real-time messaging server for the web."""

from __future__ import annotations

__version__ = "0.1.0"
SERVER_NAME = f"plexus/{__version__}"

__all__ = ["SERVER_NAME", "__version__"]
