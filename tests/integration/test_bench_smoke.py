"""Every benchmark script runs end to end with ``--quick`` and prints well-formed tables.

A smoke test only: the scripts start real servers (a MariaDB, gunicorn, uWSGI, wrk) and
print their figures; speed targets are reported in docs/BENCHMARKS.md, never enforced here.
What is checked: the run succeeds, each table has a header and rows of the same width, the
figures are numbers, and the rows name what the script promises to compare.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.servers, pytest.mark.mariadb,
              pytest.mark.timeout(150)]

BENCH = Path(__file__).resolve().parents[2] / "bench"

#: script -> (whether it takes --url, table title prefix -> row names it must contain)
EXPECTED: dict[str, tuple[bool, dict[str, set[str]]]] = {
    "bench_checkout.py": (True, {
        "checkout + SELECT 1": {"plain", "plain (A/A)", "forksafe", "forksafe, methods in Python",
                                "forksafe, poll at every checkout",
                                "forksafe, dialect flag left to SQLAlchemy", "pool_pre_ping"},
        "bare pool cycle": {"plain", "plain (A/A)", "forksafe"},
        "forksafe's per-checkout work": {"zero-timeout poll() of the socket"},
        "reset in a child": {"median"},
        "registry after": {"entries after", "memory kept, KiB"},
    }),
    "bench_memory.py": (True, {
        "memory and start-up, flask": {"gunicorn", "uwsgi", "lazy", "no freeze", "forksafe",
                                       "0", "50", "200"},
        "ratios": {"flask", "no freeze", "forksafe"},
    }),
    "bench_throughput.py": (True, {
        "throughput": {"preload + forksafe", "lazy-apps", "NullPool", "pre_ping"},
    }),
    "bench_faults.py": (False, {
        "after a fault while idle": {"plain", "pool_pre_ping", "forksafe"},
        "under faults": {"preload + forksafe", "pre_ping"},
    }),
}


def parse_tables(output: str) -> dict[str, list[list[str]]]:
    """``## title`` blocks: header then rows, columns split on two or more spaces."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in output.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            tables[title] = []
        elif title is not None and line.strip():
            tables[title].append(re.split(r"\s{2,}", line.strip()))
        else:
            title = None
    return tables


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_script_quick_run_prints_well_formed_tables(
    script: str, mysql_server: object
) -> None:
    """``python bench/<script> --quick`` exits 0 and prints complete tables of numbers."""
    if shutil.which("wrk") is None and script == "bench_throughput.py":
        unavailable("wrk is not installed (scripts/setup installs it)")
    takes_url, expected = EXPECTED[script]
    command = [sys.executable, str(BENCH / script), "--quick"]
    if takes_url:
        command += ["--url", mysql_server.url()]  # type: ignore[attr-defined]
    done = subprocess.run(command, capture_output=True, text=True, timeout=140, check=False)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    tables = parse_tables(done.stdout)
    for prefix, names in expected.items():
        matching = [t for t in tables if t.startswith(prefix)]
        assert matching, f"{script}: no table titled {prefix!r} in:\n{done.stdout}"
        rows = tables[matching[0]]
        header, body = rows[0], rows[1:]
        assert body, f"{script}: table {prefix!r} has no rows"
        for row in body:
            assert len(row) == len(header), f"{script}: ragged row {row} under {header}"
            numbers = [cell for cell in row[1:] if _is_number(cell)]
            assert numbers, f"{script}: row {row} carries no figure"
        assert names <= {cell for row in body for cell in row}, (
            f"{script}: table {prefix!r} lacks rows for {names}: {body}"
        )

    if script == "bench_faults.py":
        rows = tables[next(t for t in tables if t.startswith("under faults"))]
        header = rows[0]
        forksafe_row = next(r for r in rows[1:] if r[0] == "preload + forksafe")
        assert forksafe_row[header.index("wrong")] == "0", (
            f"wrong answers with forksafe under faults: {forksafe_row}"
        )
