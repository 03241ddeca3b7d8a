"""The test suite's own safeguards, checked like the code they protect."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, TIMEOUT


class Chain:
    """Cyclic garbage whose finalizer parses and leaves the next link behind.

    Its finalizer does what one that logs a traceback does on Python 3.11
    (the traceback module parses source lines); so there is always a link
    for the next collection to find, wherever that collection happens.
    """

    left = 0
    parsed = 0

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        ast.parse("x = (1 + 2) * f(a, b)[0]")
        Chain.parsed += 1
        if Chain.left > 0:
            Chain.left -= 1
            Chain()


def parse_under_collections(rounds: int = 20) -> int:
    """Parse a large module while collections run at nearly every allocation.

    Returns how many finalizers parsed meanwhile.
    """
    source = Path(ast.__file__).read_text(encoding="utf-8")
    threshold = gc.get_threshold()
    Chain.left, Chain.parsed = 10**9, 0
    Chain()
    # A collection at almost every allocation: inside the constructor without
    # the guard, and right after the guard turns the collector back on.
    gc.set_threshold(1)
    try:
        for _ in range(rounds):
            assert isinstance(ast.parse(source), ast.Module)
    finally:
        gc.set_threshold(*threshold)
        Chain.left = 0
    gc.collect()
    return Chain.parsed


def test_parse_survives_collections_that_parse() -> None:
    # tests/conftest.py pauses the collector during `ast.parse` (see there why).
    # Without it, CPython 3.11.0-3.11.7 raises SystemError here, as pytest did
    # when it parsed a failing test's source. A finalizer may also parse while
    # the guard still holds its lock (the collection that runs as the collector
    # comes back on): a lock that is not reentrant deadlocks there, as it once
    # did in a failing run. In a child process, so that a deadlock fails this
    # test only.
    script = (
        "import ast\n"
        "import tests.conftest\n"
        "from tests.unit.test_harness import parse_under_collections\n"
        "with tests.conftest._parse_lock:\n"
        "    ast.parse('x = 1')\n"
        "print(parse_under_collections())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0  # finalizers did run, and parse, between the parses
