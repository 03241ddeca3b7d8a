"""Edges of the server: WebSocket and HTTP."""
