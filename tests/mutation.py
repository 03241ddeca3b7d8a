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

import ast
import io
import re
import sys
import tokenize
from collections import Counter, defaultdict
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
# Where a mutant's name leaves its module for its function (x_name, or xǁClassǁname).
MODULE = re.compile(r"\.x[_ǁ]")
SQL_LITERAL = re.compile(r"'[^']*'")


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


def module_of(mutant: Mutant) -> str:
    """The module a mutant is in (plexus.outbox for plexus.outbox.xǁOutboxǁpush__mutmut_3)."""
    return MODULE.split(mutant.name, maxsplit=1)[0]


# The first word of an SQL statement, or of a piece of one split over lines.
# Not ALTER nor CREATE: the names they make are kept as written, and read back
# by `PRAGMA table_info` in the case they were written in.
SQL_WORDS = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "BEGIN", "COMMIT", "ROLLBACK", "PRAGMA"}
    | {"WHEN", "ELSE", "WHERE", "AND", "VALUES", "ORDER"}
)


def _strings(line: str) -> list[str]:
    """The string literals on one line of Python (which may be part of a longer statement)."""
    found = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip()).readline):
            if token.type == tokenize.STRING:
                found.append(ast.literal_eval(token.string))
    except (tokenize.TokenError, SyntaxError, ValueError):
        pass  # an unfinished statement: the strings before its end were found
    return found


def sql_case_only(mutant: Mutant, changed: str) -> bool:
    """True when the mutant only changes the letter case of SQL that SQLite reads the same.

    SQLite's keywords, and the names of tables, columns and functions, are
    case-insensitive; string literals ('running') are not, so they must be
    unchanged. Only the SQLite engine's module holds SQL.
    """
    if module_of(mutant) != "plexus.engines.sqlite":
        return False
    lines = changed.splitlines()
    removed = [line[1:] for line in lines if line.startswith("-")]
    added = [line[1:] for line in lines if line.startswith("+")]
    if len(removed) != 1 or len(added) != 1 or removed[0].lower() != added[0].lower():
        return False
    pairs = [
        (before, after)
        for before, after in zip(_strings(removed[0]), _strings(added[0]), strict=False)
        if before != after
    ]
    if not pairs:
        return False
    for before, after in pairs:
        words = before.replace("(", " ").split()
        if not words or words[0].upper() not in SQL_WORDS:
            return False
        if SQL_LITERAL.findall(before) != SQL_LITERAL.findall(after):
            return False
    return True


@dataclass
class Tally:
    """What became of one module's mutants."""

    mutants: int = 0
    killed: int = 0
    survived: int = 0  # not killed: survived, no tests, suspicious
    equivalent: int = 0  # of those, judged so

    @property
    def rate(self) -> float:
        return self.survived / self.mutants if self.mutants else 0.0


def main() -> int:
    mutants = load()
    if not mutants:
        print("no mutation results: run `make mutation` (mutmut run) first", file=sys.stderr)
        return 2
    counts = Counter(m.status for m in mutants)
    survivors = [m for m in mutants if m.status in NOT_KILLED]
    listed = judged_equivalent()
    tallies: dict[str, Tally] = defaultdict(Tally)
    for mutant in mutants:
        tally = tallies[module_of(mutant)]
        tally.mutants += 1
        tally.killed += mutant.status in ("killed", "timeout")
    judged: dict[str, str] = {}  # mutant name -> how it was judged
    entries = []
    for mutant in survivors:
        changed = changed_lines(mutant)
        if mutant.name in listed:
            judged[mutant.name] = "equivalent"
        elif sql_case_only(mutant, changed):
            judged[mutant.name] = "equivalent: SQL case"
        tally = tallies[module_of(mutant)]
        tally.survived += 1
        tally.equivalent += mutant.name in judged
        mark = judged.get(mutant.name, "NOT JUDGED")
        entries += [
            f"## {mutant.name} ({mutant.status}, {mark})",
            "",
            "```diff",
            changed,
            "```",
            "",
        ]
    unjudged = len(survivors) - len(judged)
    rate = len(survivors) / len(mutants)
    summary = (
        f"{len(mutants)} mutants: {counts['killed']} killed, {counts['timeout']} timed out,"
        f" {counts['survived']} survived, {counts['no tests']} reached by no test,"
        f" {counts['suspicious']} suspicious; survival rate {rate:.1%}"
        f" ({len(judged)} judged equivalent in docs/testing.md, {unjudged} not judged)"
    )
    table = [
        "| module | mutants | killed | survived | judged equivalent | not judged | survival rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, tally in sorted(tallies.items()):
        table.append(
            f"| {name} | {tally.mutants} | {tally.killed} | {tally.survived} | {tally.equivalent}"
            f" | {tally.survived - tally.equivalent} | {tally.rate:.1%} |"
        )
    stale = sorted(listed - {mutant.name for mutant in survivors})
    notes = []
    if stale:
        notes = [
            f"{len(stale)} mutants judged in docs/testing.md are no longer survivors"
            " (killed since, or renumbered): remove them from the table",
            "",
            *(f"- {name}" for name in stale),
            "",
        ]
    out = ["# Surviving mutants", "", summary, "", *table, "", *notes, *entries]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(out), encoding="utf-8")
    print(summary)
    print("\n".join(table))
    if stale:
        print(notes[0])
    print(f"report: {REPORT.relative_to(ROOT)}")
    if unjudged:
        print(
            f"{unjudged} surviving mutants are neither killed nor judged equivalent:"
            " add a test that kills each, or list it in docs/testing.md with the reason",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
