"""The report of `make mutation`: which mutants survived, and the survival rate.

Run after `mutmut run`, from the project root (`python -m tests.mutation`). It
reads mutmut's results in mutants/, writes every mutant that no test killed,
with its diff, to artifacts/mutation/report.md, and prints the counts and the
survival rate. Mutants judged equivalent (named in docs/testing.md, with the
reason) are marked so; any other survivor makes the exit status 1: kill it
with a test or judge it in docs/testing.md.

It uses mutmut's own reading of its results (mutmut is pinned to 3.8.x in
pyproject.toml): one process, instead of one `mutmut show` per mutant.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "artifacts" / "mutation" / "report.md"
JUDGED = ROOT / "docs" / "testing.md"
# Statuses where no test failed: the mutant is a survivor.
NOT_KILLED = frozenset({"survived", "no tests", "suspicious"})
# A mutant's name as mutmut prints it, e.g. plexus.outbox.xǁOutboxǁpush__mutmut_3.
MUTANT_NAME = re.compile(r"plexus\.[\w.ǁ]+__mutmut_\d+")


@dataclass(frozen=True)
class Mutant:
    name: str
    status: str
    path: Path


def load() -> list[Mutant]:
    """Every mutant mutmut ran, with its status."""
    found = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            found.append(Mutant(name, status_by_exit_code[code], path))
    return sorted(found, key=order)


def order(mutant: Mutant) -> tuple[str, str, int]:
    """File, function, then mutant number as a number (mutmut_9 before mutmut_10)."""
    function, _, number = mutant.name.rpartition("__mutmut_")
    return str(mutant.path), function, int(number)


def judged_equivalent() -> set[str]:
    """The mutants that docs/testing.md lists as equivalent."""
    return set(MUTANT_NAME.findall(JUDGED.read_text(encoding="utf-8")))


def changed_lines(mutant: Mutant) -> str:
    """The lines the mutant changes (the diff without its context)."""
    diff = get_diff_for_mutant(mutant.name, path=mutant.path)
    lines = diff.splitlines()[2:]  # the ---/+++ header
    return "\n".join(line for line in lines if line.startswith(("-", "+")))


def main() -> int:
    mutants = load()
    if not mutants:
        print("no mutation results: run `make mutation` (mutmut run) first", file=sys.stderr)
        return 2
    counts = Counter(m.status for m in mutants)
    survivors = [m for m in mutants if m.status in NOT_KILLED]
    equivalent = judged_equivalent()
    unjudged = [m for m in survivors if m.name not in equivalent]
    rate = len(survivors) / len(mutants)
    summary = (
        f"{len(mutants)} mutants: {counts['killed']} killed, {counts['timeout']} timed out,"
        f" {counts['survived']} survived, {counts['no tests']} reached by no test,"
        f" {counts['suspicious']} suspicious; survival rate {rate:.1%}"
        f" ({len(survivors) - len(unjudged)} judged equivalent in docs/testing.md,"
        f" {len(unjudged)} not judged)"
    )
    out = ["# Surviving mutants", "", summary, ""]
    for mutant in survivors:
        mark = "equivalent" if mutant.name in equivalent else "NOT JUDGED"
        out += [f"## {mutant.name} ({mutant.status}, {mark})", "", "```diff"]
        out += [changed_lines(mutant), "```", ""]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(out), encoding="utf-8")
    print(summary)
    print(f"report: {REPORT.relative_to(ROOT)}")
    if unjudged:
        print(
            f"{len(unjudged)} surviving mutants are neither killed nor judged equivalent:"
            " add a test that kills each, or list it in docs/testing.md with the reason",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
