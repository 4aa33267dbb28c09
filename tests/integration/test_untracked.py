"""Connections nobody tracked: instrument(), the report after fork, strict mode.

Each case forks real children in a fresh interpreter (``scripts/driver_scenario.py``) against
the private MariaDB or PostgreSQL, and reads the parent's session from the server side.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_driver_matrix import (
    MYSQL_DRIVERS,
    SA_HAS_PSYCOPG3,
    assert_protected,
    run_scenario,
    server_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DRIVERS = ("mysqldb", "pymysql", "psycopg2", "psycopg")
DRIVER_NAMES = {"mysqldb": "mysqlclient", "pymysql": "PyMySQL", "psycopg2": "psycopg2",
                "psycopg": "psycopg"}
CASES = [
    pytest.param(driver, kind, id=f"{driver}-{kind}")
    for driver in DRIVERS
    for kind in ("engine", "raw")
    if SA_HAS_PSYCOPG3 or driver != "psycopg" or kind == "raw"
]
SITE = re.compile(r"created at \S*driver_scenario\.py:\d+")


def url_for(request: pytest.FixtureRequest, driver: str) -> tuple[Any, str]:
    server = server_for(request, driver)
    return server, server.url(driver)


@pytest.mark.parametrize(("driver", "kind"), CASES)
def test_instrument_protects_what_nobody_tracked(
    request: pytest.FixtureRequest, driver: str, kind: str
) -> None:
    """A child closing an untracked connection kills the parent's session; after
    forksafe.instrument() the same code, with no track() call, leaves it alive, silently."""
    server, url = url_for(request, driver)
    bare = run_scenario(url, kind, "none", "close")
    assert not bare["alive_on_server"], f"close() in a child should kill the session: {bare}"
    assert bare["parent_error"] is not None, bare

    report = run_scenario(url, kind, "instrument", "close")
    assert_protected(report, server, driver, kind, "close")
    assert all(not child["warnings"] for child in report["children"]), report
    used = run_scenario(url, kind, "instrument", "use")
    assert_protected(used, server, driver, kind, "use")


@pytest.mark.parametrize(("driver", "kind"), CASES)
def test_child_reports_untracked_connection_with_its_creation_site(
    request: pytest.FixtureRequest, driver: str, kind: str
) -> None:
    """instrument(track=False) records without tracking: each child warns once per inherited
    connection with file:line and what forksafe did, and the parent's session survives."""
    server, url = url_for(request, driver)
    report = run_scenario(url, kind, "audit", "close")
    assert_protected(report, server, driver, kind, "close")
    for child in report["children"]:
        warned = [w for w in child["warnings"] if w.startswith("ForkSafetyWarning")]
        assert len(warned) == 1, child["warnings"]  # an engine's pooled connection: once
        what = "SQLAlchemy engine" if kind == "engine" else f"{DRIVER_NAMES[driver]} connection"
        assert what in warned[0], warned
        assert SITE.search(warned[0]), warned
        assert "neutralised" in warned[0], warned


@pytest.mark.parametrize("driver", ["mysqldb", "psycopg2"])
def test_scan_at_fork_finds_connections_opened_without_instrumentation(
    request: pytest.FixtureRequest, driver: str
) -> None:
    """configure(scan_at_fork=True) finds a raw connection nobody tracked or instrumented,
    reports it and neutralises it: the child's close() no longer reaches the parent."""
    server, url = url_for(request, driver)
    report = run_scenario(url, "raw", "scan", "close")
    assert_protected(report, server, driver, "raw", "close")
    child = report["children"][0]
    assert any("created before forksafe.instrument()" in w for w in child["warnings"]), child


@pytest.mark.parametrize(("driver", "kind"), CASES)
def test_strict_mode_fails_at_first_use(
    request: pytest.FixtureRequest, driver: str, kind: str
) -> None:
    """configure(strict=True): using an untracked inherited connection, or opening a new one
    while it exists, raises UntrackedConnectionError in the child; the parent is unharmed.
    psycopg2's C connection class cannot carry the check: its inherited connection fails
    with psycopg2's own error, and the next connection the child opens raises."""
    server, url = url_for(request, driver)
    report = run_scenario(url, kind, "strict", "use", children=1)
    assert report["alive_on_server"], report
    assert report["parent_error"] is None, report
    child = report["children"][0]
    if driver == "psycopg2" and kind == "raw":
        assert "not connected" in child["inherited_error"], child
    else:
        assert child["inherited_error"].startswith("UntrackedConnectionError"), child
        assert SITE.search(child["inherited_error"]), child
    assert child["own_error"].startswith("UntrackedConnectionError"), child
    assert "own_id" not in child, child
    if driver in MYSQL_DRIVERS:
        assert not server.quit_logged(report["parent_id"])


MIDWAY = Path(__file__).parent / "scripts" / "instrument_fork_midway.py"


def test_a_fork_while_instrument_records_a_new_connection(mariadb: Any) -> None:
    """A worker thread's new connection is being recorded by instrument() when the main
    thread forks: the child treats it as tracked (neutralised by the reset, no warning that
    nobody tracked it), and the worker's session goes on in the parent. Recorded before it
    was tracked, the child called it a connection nobody tracked."""
    done = subprocess.run([sys.executable, str(MIDWAY), "--port", str(mariadb.port)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert "error" not in report, report
    assert isinstance(report["session"], int), report
    child = report["child"]
    assert child["internal_errors"] == [], child
    assert not any("nobody tracked" in line for line in child["log"]), child["log"]
    assert any("neutralised 1 of 1" in line for line in child["log"]), child["log"]
    assert "ForkSafetyWarning" not in done.stderr, done.stderr[-2000:]
