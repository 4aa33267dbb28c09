"""Every driver, every way a child can end: the parent's session survives with forksafe.

For each driver (mysqlclient, PyMySQL, mysql-connector-python's C extension and pure-Python
class, MariaDB Connector/Python, aiomysql and asyncmy on a private MariaDB; psycopg2,
psycopg 3, asyncpg and pg8000 on a private PostgreSQL), through a SQLAlchemy engine (an
``AsyncEngine`` for the asyncio drivers and psycopg 3) and a raw DBAPI connection, a parent
opens a session, forks two children that each end one way (exit, garbage collection, close,
dispose, use, SIGTERM), then uses its session again.

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

#: Matrix ids of the drivers on MariaDB (the others run on PostgreSQL). ``mysqlconnector`` is
#: mysql-connector-python's C extension (``CMySQLConnection``), ``mysqlconnector-pure`` its
#: pure-Python ``MySQLConnection``.
MYSQL_DRIVERS = ("mysqldb", "pymysql", "aiomysql", "asyncmy", "mysqlconnector",
                 "mysqlconnector-pure", "mariadbconnector")
#: asyncio drivers: an ``AsyncEngine`` and raw connections, never a sync engine.
ASYNC_DRIVERS = ("asyncpg", "aiomysql", "asyncmy")
ACTIONS = ("exit", "gc", "close", "dispose", "use", "sigterm")

#: Unprotected, which endings of a child harm the parent's session (measured: MariaDB 10.11,
#: PostgreSQL 15; mysqlclient 2.3, PyMySQL 1.1, psycopg2 2.9, psycopg 3.2, asyncpg 0.30,
#: aiomysql 0.2, asyncmy 0.2, mysql-connector-python 9.7, mariadb 1.1, pg8000 1.31).
#: ``"kills"``: the server drops the session and the parent's next query fails;
#: ``"breaks"``: the parent's next query fails (or would wait for ever: the scenario bounds
#: it) while the server may still list the session. Absent: harmless.
#: mysqlclient's destructor calls mysql_close() (COM_QUIT) whatever the pid; PyMySQL's
#: ``__del__`` closes the socket silently; psycopg2 and psycopg 3 check the pid at dealloc.
#: ``close()`` and ``engine.dispose()`` send COM_QUIT / Terminate with every driver.
#: The asyncio drivers also share the parent's *event loop* state: the child's copy of the
#: loop's epoll set is the parent's, so a transport closed in the child (garbage collection,
#: SQLAlchemy invalidating an inherited connection) unregisters the parent's socket from the
#: parent's loop, and the parent's next query waits for ever.
KILLS, BREAKS = "kills", "breaks"
HARM_UNPROTECTED: dict[str, dict[str, str]] = {
    "mysqldb": dict.fromkeys(ACTIONS, KILLS),
    "pymysql": {"close": KILLS, "dispose": KILLS},
    "psycopg2": {"close": KILLS, "dispose": KILLS},
    "psycopg": {"close": KILLS, "dispose": KILLS},
    # asyncpg's __del__ aborts an unclosed connection; a query from the child's loop is
    # sent, then refused, and the parent reads the child's answer as its own
    "asyncpg": {"gc": KILLS, "close": KILLS, "dispose": KILLS, "use": BREAKS},
    # aiomysql's transport, collected in the child, unregisters the parent's socket from
    # the shared epoll set: the parent's next query never sees its answer
    "aiomysql": {"gc": BREAKS, "close": KILLS, "dispose": KILLS},
    "asyncmy": {"close": KILLS, "dispose": KILLS},
    # the C extension's destructor calls mysql_close() (COM_QUIT) whatever the pid
    "mysqlconnector": dict.fromkeys(ACTIONS, KILLS),
    # the pure-Python class closes (COM_QUIT) in __del__, which exit does not reach
    "mysqlconnector-pure": {"gc": KILLS, "close": KILLS, "dispose": KILLS},
    # MariaDB Connector/C's mysql_close() in the destructor: COM_QUIT whatever the pid
    "mariadbconnector": dict.fromkeys(ACTIONS, KILLS),
    "pg8000": {"close": KILLS, "dispose": KILLS},
}
#: Where a driver behaves differently through an engine than raw: ``(driver, kind)``.
HARM_BY_KIND: dict[tuple[str, str], dict[str, str]] = {
    # SQLAlchemy invalidates the inherited connection the child's loop cannot use: its
    # close (COM_QUIT) reaches the server
    ("aiomysql", "async"): {"gc": BREAKS, "close": KILLS, "dispose": KILLS, "use": KILLS},
    ("asyncmy", "async"): {"close": KILLS, "dispose": KILLS, "use": KILLS},
}

# SQLAlchemy 1.4 has no psycopg 3 dialect (postgresql+psycopg arrived in 2.0).
SA_HAS_PSYCOPG3 = int(sqlalchemy.__version__.split(".")[0]) >= 2
if not SA_HAS_PSYCOPG3:
    # SQLAlchemy 1.4's aiomysql and asyncmy adapters drop a connection by closing its
    # transport, without COM_QUIT: the session stays on the server, but the transport closed
    # in the child unregisters the parent's socket from the shared epoll set (measured)
    HARM_BY_KIND[("aiomysql", "async")] = {
        "gc": BREAKS, "close": KILLS, "dispose": BREAKS, "use": BREAKS,
    }
    HARM_BY_KIND[("asyncmy", "async")] = {"close": KILLS, "dispose": BREAKS}


def kinds(driver: str) -> tuple[str, ...]:
    if driver in ASYNC_DRIVERS:
        return ("async", "raw")
    if driver == "psycopg":
        return ("engine", "raw", "async") if SA_HAS_PSYCOPG3 else ("raw",)
    return ("engine", "raw")


CASES = [
    pytest.param(driver, kind, action, id=f"{driver}-{kind}-{action}")
    for driver in HARM_UNPROTECTED
    for kind in kinds(driver)
    for action in ACTIONS
    if not (kind == "raw" and action == "dispose")
]


def harm(driver: str, kind: str, action: str) -> str | None:
    """What the driver does to the parent's session, unprotected (None: nothing)."""
    table = HARM_BY_KIND.get((driver, kind), HARM_UNPROTECTED[driver])
    return table.get(action)


def server_for(request: pytest.FixtureRequest, driver: str) -> Any:
    """The private server that ``driver`` talks to."""
    return request.getfixturevalue("mariadb" if driver in MYSQL_DRIVERS else "postgres")


def url_for(server: Any, driver: str) -> str:
    """The SQLAlchemy URL of ``driver`` on ``server`` (the scenario's raw connections use it
    too); for "async", create_async_engine picks psycopg's async dialect."""
    if driver == "mysqlconnector-pure":
        return str(server.url("mysqlconnector")) + "?use_pure=true"
    return str(server.url(driver))


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
    url = url_for(server, driver)

    # 1. without forksafe: the driver's true behaviour (one child for "use", so that two
    # children interleaving on one socket cannot hang the scenario)
    bare = run_scenario(url, kind, "none", action, children=1 if action == "use" else 2)
    parent = bare["parent_id"]
    expected = harm(driver, kind, action)
    if expected == KILLS:
        assert not bare["alive_on_server"], f"expected the server to drop the session: {bare}"
        assert bare["parent_error"] is not None, bare
        if driver in ("mysqldb", "pymysql") and action != "use":
            assert server.quit_logged(parent), "expected COM_QUIT from a child in the log"
    elif expected == BREAKS:
        assert bare["parent_error"] is not None, f"expected the parent's session broken: {bare}"
    else:
        assert bare["alive_on_server"], f"{driver} was expected to be harmless here: {bare}"
        assert bare["parent_error"] is None, bare
    if action == "use" and driver not in ASYNC_DRIVERS:
        # the child's queries ran on the parent's own session
        assert bare["children"][0].get("inherited_id") == parent, bare

    # 2. with forksafe.track
    protected = run_scenario(url, kind, "track", action)
    assert_protected(protected, server, driver, kind, action)


@pytest.mark.parametrize("driver", list(HARM_UNPROTECTED))
def test_instrument_protects_every_driver(request: pytest.FixtureRequest, driver: str) -> None:
    """instrument() alone (no track()) protects a raw connection of every driver: it wraps
    each driver's constructors (`Driver.constructors`); a child's close() kills the
    parent's session unprotected (the "close" column above), never with instrument()."""
    server = server_for(request, driver)
    report = run_scenario(url_for(server, driver), "raw", "instrument", "close")
    assert_protected(report, server, driver, "raw", "close")
