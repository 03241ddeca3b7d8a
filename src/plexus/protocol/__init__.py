"""Protocol version 1, with no I/O: codec, commands, pushes, session limits, recovery."""
