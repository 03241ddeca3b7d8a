"""`python -m bench` refuses a bad `--durable-servers` in one clear line, starting nothing."""

from __future__ import annotations

import pytest
from bench.__main__ import parse_args


def test_durable_servers_are_chosen_among_the_three() -> None:
    args = parse_args(["durable", "--durable-servers", "plexus, plexus-sqlite"])
    assert args.durable_servers == ["plexus", "plexus-sqlite"]
    assert parse_args(["durable"]).durable_servers == ["plexus", "plexus-sqlite", "plexus-redis"]


@pytest.mark.parametrize("bad", ["plexus,mongodb", "", ",", "x" * 10_000])
def test_a_bad_durable_servers_list_is_refused(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["durable", "--durable-servers", bad])
    assert exited.value.code == 2
    assert "expected some of plexus, plexus-sqlite, plexus-redis" in capsys.readouterr().err
