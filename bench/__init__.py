"""Plexus benchmarks: the same load client against Plexus and a Node `ws` peer server.

Run with `python -m bench --help`; see bench/README.md for the method.
"""
