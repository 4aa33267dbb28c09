"""forksafe repro's report: verdicts, exit status, the side-by-side table and the JSON."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from forksafe.testing import checks
from forksafe.testing.report import (
    CLEAN,
    FAILED,
    NOT_REPRODUCED,
    REPRODUCED,
    RunResult,
    exit_status,
    render_json,
    render_table,
)


def _result(protected: bool, outcomes: list[str], scenario: str = "gunicorn-sync") -> RunResult:
    result = RunResult(scenario, "title", "engine", "mysqlclient", protected)
    result.add_round([(i, c, f"message {c}") for i, c in enumerate(outcomes)], 1.0)
    return result


def test_verdicts() -> None:
    """With forksafe: clean or FAILED; without: REPRODUCED or 'not reproduced' (never success)."""
    assert _result(True, [checks.OK] * 3).verdict == CLEAN
    assert _result(True, [checks.OK, checks.GONE]).verdict == FAILED
    assert _result(True, [checks.OK, checks.WRONG]).verdict == FAILED
    assert _result(False, [checks.OK, checks.HUNG]).verdict == REPRODUCED
    assert _result(False, [checks.OK] * 3).verdict == NOT_REPRODUCED


def test_exit_status_is_zero_only_when_every_protected_run_is_clean() -> None:
    """A not-reproduced unprotected run does not fail the command; a dirty protected run does."""
    clean = _result(True, [checks.OK] * 2)
    status, reason = exit_status([_result(False, [checks.OK] * 2), clean])
    assert status == 0
    assert "reproduced in 0 of 1" in reason
    dirty = _result(True, [checks.OK, checks.SYNC], scenario="uwsgi-master")
    status, reason = exit_status([_result(False, [checks.SYNC]), clean, dirty])
    assert status == 1
    assert "uwsgi-master/engine (1 of 2 requests)" in reason


@given(st.lists(st.lists(st.sampled_from(checks.CATEGORIES), max_size=30), min_size=1, max_size=4))
def test_rounds_add_up(rounds: list[list[str]]) -> None:
    """Counts sum to the requests of every round; rounds with problems are counted."""
    result = RunResult("multiprocessing", "title", "raw", "pymysql", False)
    for outcomes in rounds:
        result.add_round([(i, c, "m") for i, c in enumerate(outcomes)], 0.5)
    assert result.total == sum(len(r) for r in rounds)
    assert result.problems == sum(1 for r in rounds for c in r if c != checks.OK)
    assert result.rounds == len(rounds)
    assert result.rounds_with_problems == sum(1 for r in rounds if any(c != checks.OK for c in r))
    assert all(len(v) <= 3 for v in result.samples.values())


def test_table_shows_both_runs_side_by_side() -> None:
    """One line per run, the two halves of a scenario together, counts under their column."""
    results = [
        _result(False, [checks.OK] * 5 + [checks.WRONG] * 2 + [checks.GONE]),
        _result(True, [checks.OK] * 8),
    ]
    text = render_table(results, header=["forksafe repro: test"])
    lines = text.splitlines()
    assert lines[0] == "forksafe repro: test"
    title = next(line for line in lines if line.startswith("scenario"))
    without = next(line for line in lines if " without " in line)
    with_ = next(line for line in lines if " with " in line)
    assert without.split()[:4] == ["gunicorn-sync", "engine", "without", "5"]
    assert without.split()[4:6] == ["2", "1"]  # WRONG, 2006
    assert without.rstrip().endswith(REPRODUCED)
    assert with_.split()[:2] == ["with", "8"]
    assert with_.rstrip().endswith(CLEAN)
    # the numbers sit right-aligned under their titles
    assert without.index(" 5 ") < title.index("ok") + len("ok") <= without.index(" 5 ") + 3


def test_json_report_round_trips() -> None:
    """--json gives settings, every run with its counts and verdict, and the exit status."""
    results = [_result(False, [checks.OK, checks.LOST]), _result(True, [checks.OK, checks.OK])]
    data = json.loads(render_json(results, {"requests": 2}))
    assert data["settings"] == {"requests": 2}
    assert data["exit_status"] == 0
    assert [r["verdict"] for r in data["runs"]] == [REPRODUCED, CLEAN]
    assert data["runs"][0]["counts"][checks.LOST] == 1
    assert data["runs"][0]["samples"] == {checks.LOST: ["message 2013"]}
