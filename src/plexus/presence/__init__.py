"""Presence stores: which clients are subscribed to a channel, with their info."""
