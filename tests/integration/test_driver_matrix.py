"""Every driver, every way a child can end: the parent's session survives with forksafe.

For each driver (mysqlclient and PyMySQL on a private MariaDB, psycopg2 and psycopg 3 on a
private PostgreSQL), through a SQLAlchemy engine, a raw DBAPI connection and (psycopg 3) an
``AsyncEngine``, a parent opens a session, forks two children that each end one way (exit,
garbage collection, close, dispose, use, SIGTERM), then uses its session again.

Each case runs twice in a fresh interpreter (``scripts/driver_scenario.py``):

* unprotected, asserting what the driver really does: where it kills the parent's session
  the server no longer lists it and the parent gets the driver's disconnect error; where the
  driver is harmless (PyMySQL and psycopg drop a connection at garbage collection without a
  goodbye) the test asserts that too, so the table below cannot drift from the truth;
* protected by ``forksafe.track``, asserting that the server still lists the parent's
  session, the parent reads its own session id again, and a child that needs the database
  works on a new session of its own.

The evidence comes from the server: ``information_schema.PROCESSLIST`` /
``pg_stat_activity`` asked on a separate connection, and MariaDB's general log (``Quit``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).parent / "scripts" / "driver_scenario.py"

MYSQL_DRIVERS = ("mysqldb", "pymysql")
ACTIONS = ("exit", "gc", "close", "dispose", "use", "sigterm")

#: Unprotected, which endings of a child kill the parent's session (measured: MariaDB 10.11,
#: PostgreSQL 15; mysqlclient 2.3, PyMySQL 1.1, psycopg2 2.9, psycopg 3.2).
#: mysqlclient's destructor calls mysql_close() (COM_QUIT) whatever the pid; PyMySQL's
#: ``__del__`` closes the socket silently; psycopg2 and psycopg 3 check the pid at dealloc.
#: ``close()`` and ``engine.dispose()`` send COM_QUIT / Terminate with every driver.
KILLS_UNPROTECTED: dict[str, frozenset[str]] = {
    "mysqldb": frozenset(ACTIONS),
    "pymysql": frozenset({"close", "dispose"}),
    "psycopg2": frozenset({"close", "dispose"}),
    "psycopg": frozenset({"close", "dispose"}),
}

# SQLAlchemy 1.4 has no psycopg 3 dialect (postgresql+psycopg arrived in 2.0).
SA_HAS_PSYCOPG3 = int(sqlalchemy.__version__.split(".")[0]) >= 2

CASES = [
    pytest.param(driver, kind, action, id=f"{driver}-{kind}-{action}")
    for driver in ("mysqldb", "pymysql", "psycopg2", "psycopg")
    for kind in ("engine", "raw", "async")
    for action in ACTIONS
    if not (kind == "raw" and action == "dispose")
    if not (kind == "async" and driver != "psycopg")
    if SA_HAS_PSYCOPG3 or driver != "psycopg" or kind == "raw"
]


def server_for(request: pytest.FixtureRequest, driver: str) -> Any:
    """The private server that ``driver`` talks to."""
    return request.getfixturevalue("mariadb" if driver in MYSQL_DRIVERS else "postgres")


def run_scenario(url: str, kind: str, mode: str, action: str, children: int = 2) -> dict[str, Any]:
    """Run one scenario in a fresh interpreter and return its JSON report."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", url, "--kind", kind, "--mode", mode,
         "--action", action, "--children", str(children)],
        capture_output=True, text=True, timeout=90, check=False,
    )
    lines = done.stdout.strip().splitlines()
    why = f"scenario failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, why
    assert lines, why
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def quit_logged(server: Any, driver: str, session: int) -> bool | None:
    """MariaDB's general log says the session sent COM_QUIT (None: no such log)."""
    return server.quit_logged(session) if driver in MYSQL_DRIVERS else None


def assert_protected(report: dict[str, Any], server: Any, driver: str, kind: str,
                     action: str) -> None:
    """The parent's session is alive on the server and usable; children used their own."""
    parent = report["parent_id"]
    assert report["alive_on_server"], f"the server lost the parent's session: {report}"
    assert report["parent_error"] is None, report
    assert report["after_id"] == parent, report
    assert quit_logged(server, driver, parent) in (None, False), "a child sent COM_QUIT"
    assert report["exit_codes"] == [0, 0], report
    assert not report["internal_errors"], report
    for child in report["children"]:
        assert "error" not in child, child
        assert not child["internal_errors"], child
        if action == "use":
            assert child["own_id"] != parent, f"the child worked on the parent's session: {child}"
            if kind == "raw":
                # the inherited connection fails at once instead of sharing the session
                assert "inherited_error" in child, child
            else:
                # the engine's pool is fresh in the child: a session of its own
                assert child["inherited_id"] not in (None, parent), child


@pytest.mark.parametrize(("driver", "kind", "action"), CASES)
def test_parent_session_survives_every_child_ending(
    request: pytest.FixtureRequest, driver: str, kind: str, action: str
) -> None:
    """Unprotected, the driver does what the table says; with track() the parent never suffers."""
    server = server_for(request, driver)
    url = server.url(driver)  # for "async", create_async_engine picks psycopg's async dialect

    # 1. without forksafe: the driver's true behaviour (one child for "use", so that two
    # children interleaving on one socket cannot hang the scenario)
    bare = run_scenario(url, kind, "none", action, children=1 if action == "use" else 2)
    parent = bare["parent_id"]
    if action in KILLS_UNPROTECTED[driver]:
        assert not bare["alive_on_server"], f"expected the server to drop the session: {bare}"
        assert bare["parent_error"] is not None, bare
        if driver in MYSQL_DRIVERS and action != "use":
            assert server.quit_logged(parent), "expected COM_QUIT from a child in the log"
    else:
        assert bare["alive_on_server"], f"{driver} was expected to be harmless here: {bare}"
        assert bare["parent_error"] is None, bare
    if action == "use":
        # the child's queries ran on the parent's own session
        assert bare["children"][0].get("inherited_id") == parent, bare

    # 2. with forksafe.track
    protected = run_scenario(url, kind, "track", action)
    assert_protected(protected, server, driver, kind, action)
