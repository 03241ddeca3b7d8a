"""Brokers: carry channel events between the nodes that serve subscribers."""
