"""forksafe's connect-time idle-limit probe leaves no trace on the connection.

Whatever the autocommit mode and isolation level, the transaction state after the probe is
the one before it: a snapshot is never taken early (a row committed after connect stays
visible under REPEATABLE READ), a failed probe leaves no aborted transaction, and a
transaction the application has open is never rolled back. With Django's PostgreSQL pool,
the probe runs once per server connection, counted in the server's statement log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forksafe._idle_limit import server_idle_limit
from tests.conftest import start_private

SCRIPT = Path(__file__).parent / "scripts" / "django_probe.py"
PROBE = "SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'"
DENIED = "noprobe"  # a role that may not read pg_settings


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    """A private PostgreSQL that logs every statement, with a role denied pg_settings."""
    from forksafe.testing.postgres import PostgreSQL

    server = start_private(
        lambda: PostgreSQL(options={"log_statement": "all", "idle_session_timeout": "600s"})
    )
    try:
        server.execute(f"CREATE ROLE {DENIED} LOGIN")
        server.execute(f"GRANT ALL ON SCHEMA public TO {DENIED}")
        server.execute("REVOKE ALL ON pg_catalog.pg_settings FROM PUBLIC")
        yield server
    finally:
        server.cleanup()


def run(*args: Any) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["internal_errors"] == [], report
    return report


def probes_logged(server: Any, since: int) -> int:
    return server.server_log()[since:].count(f"statement: {PROBE}")


# -- Django ----------------------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_django_pg_autocommit_off_repeatable_read_sees_later_commits(
    pg: Any, isolation: str
) -> None:
    """AUTOCOMMIT=False, REPEATABLE READ (and SERIALIZABLE): a row another session commits
    after connect is seen, as in plain Django (the probe took no snapshot), and the
    connection is idle."""
    common = ("--scenario", "visibility", "--port", pg.port, "--no-autocommit",
              "--isolation", isolation)
    plain = run(*common, "--protect", 0, "--table", "vis_plain")
    safe = run(*common, "--protect", 1, "--table", "vis_safe")
    assert plain["count"] == 1, plain
    assert plain["state_after_connect"] == "IDLE", plain
    assert safe["count"] == 1, safe
    assert safe["state_after_connect"] == "IDLE", safe


@pytest.mark.mariadb
@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_django_mariadb_autocommit_off_repeatable_read_sees_later_commits(
    mariadb: Any, isolation: str
) -> None:
    """The same on MariaDB (mysqlclient, autocommit=0, REPEATABLE READ and SERIALIZABLE)."""
    common = ("--scenario", "visibility", "--vendor", "mysql", "--port", mariadb.port,
              "--no-autocommit", "--isolation", isolation)
    plain = run(*common, "--protect", 0, "--table", "vis_plain")
    safe = run(*common, "--protect", 1, "--table", "vis_safe")
    assert (plain["count"], plain["state_after_connect"]) == (1, 0), plain
    assert (safe["count"], safe["state_after_connect"]) == (1, 0), safe


@pytest.mark.postgres
def test_django_unit_of_work_liveness_check_takes_no_snapshot(pg: Any) -> None:
    """unit_of_work()'s liveness check (Django's is_usable(): SELECT 1) on a connection idle
    past idle_check, AUTOCOMMIT=False, REPEATABLE READ: the job starts on an idle
    connection and sees a row committed after the check."""
    report = run("--scenario", "unit", "--port", pg.port, "--no-autocommit",
                 "--protect", 1, "--table", "unit_check")
    assert report["state_after_enter"] == "IDLE", report
    assert report["count"] == 1, report


@pytest.mark.postgres
@pytest.mark.parametrize("autocommit", [False, True])
def test_django_failed_probe_leaves_no_aborted_transaction(pg: Any, autocommit: bool) -> None:
    """A role that cannot read pg_settings: the probe fails (the server logs it), and the
    application's first query still works on an idle connection."""
    since = len(pg.server_log())
    args = ["--scenario", "denied", "--port", pg.port, "--user", DENIED, "--protect", 1]
    report = run(*args, *([] if autocommit else ["--no-autocommit"]))
    assert "permission denied for view pg_settings" in pg.server_log()[since:]
    assert report["first_query"] == 42, report
    assert report["state_after_connect"] == "IDLE", report


@pytest.mark.postgres
def test_django_pool_probes_once_per_server_connection(pg: Any) -> None:
    """Django's PostgreSQL pool: 20 checkouts over at most 4 server connections send at
    most one probe per server connection (the server's statement log counts them); plain
    Django sends none."""
    since = len(pg.server_log())
    report = run("--scenario", "pool", "--port", pg.port, "--protect", 1,
                 "--checkouts", 20, "--pool-size", 4)
    servers = len(set(report["backend_pids"]))
    probes = probes_logged(pg, since)
    print(f"{len(report['backend_pids'])} checkouts, {servers} server connections, "
          f"{probes} probes")
    assert servers == 4, report
    assert 1 <= probes <= servers, (probes, report)

    since = len(pg.server_log())
    run("--scenario", "pool", "--port", pg.port, "--protect", 0, "--checkouts", 20)
    assert probes_logged(pg, since) == 0  # plain Django sends none


# -- the probe on raw connections ------------------------------------------------------------
def pg_connect(server: Any, driver: str, *, user: str = "postgres", autocommit: bool,
               isolation: str | None) -> Any:
    kwargs = server.connect_kwargs()
    kwargs["user"] = user
    if driver == "psycopg":
        import psycopg

        conn = psycopg.connect(**kwargs, autocommit=autocommit)
        if isolation:
            conn.isolation_level = getattr(psycopg.IsolationLevel, isolation.replace(" ", "_"))
        return conn
    import psycopg2

    conn = psycopg2.connect(**kwargs)
    conn.set_session(isolation_level=isolation, autocommit=autocommit)
    return conn


def status(conn: Any) -> int:
    return int(conn.info.transaction_status)


ISOLATIONS = [None, "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("autocommit", [False, True])
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_pg_probe_keeps_an_idle_connection_idle(
    pg: Any, driver: str, autocommit: bool, isolation: str | None
) -> None:
    """Every driver, autocommit mode and isolation level: idle before, idle after, and a
    row committed after the probe is visible."""
    table = f"raw_{driver}_{int(autocommit)}_{(isolation or 'default').replace(' ', '_')}"
    pg.execute(f"DROP TABLE IF EXISTS {table}")
    pg.execute(f"CREATE TABLE {table} (id int)")
    conn = pg_connect(pg, driver, autocommit=autocommit, isolation=isolation)
    try:
        assert status(conn) == 0
        assert server_idle_limit("postgresql", conn) == 600.0
        assert status(conn) == 0
        pg.execute(f"INSERT INTO {table} VALUES (1)")
        cur = conn.cursor()
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone()[0] == 1
    finally:
        conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_pg_probe_never_touches_the_applications_transaction(pg: Any, driver: str) -> None:
    """A transaction the application has open is neither rolled back nor aborted: the
    probe does not run on it."""
    pg.execute(f"DROP TABLE IF EXISTS app_{driver}")
    pg.execute(f"CREATE TABLE app_{driver} (id int)")
    conn = pg_connect(pg, driver, autocommit=False, isolation=None)
    try:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO app_{driver} VALUES (1)")
        assert status(conn) == 2  # INTRANS: the application's
        since = len(pg.server_log())
        assert server_idle_limit("postgresql", conn) is None
        assert probes_logged(pg, since) == 0
        assert status(conn) == 2
        conn.commit()
        assert pg.execute(f"SELECT count(*) FROM app_{driver}")[0][0] == 1
    finally:
        conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("autocommit", [False, True])
def test_pg_failed_probe_leaves_no_aborted_transaction(
    pg: Any, driver: str, autocommit: bool
) -> None:
    """pg_settings unreadable: the probe raises the driver's error and the connection is
    idle (not InFailedSqlTransaction): the next statement works."""
    conn = pg_connect(pg, driver, user=DENIED, autocommit=autocommit, isolation=None)
    try:
        with pytest.raises(Exception, match="permission denied"):
            server_idle_limit("postgresql", conn)
        assert status(conn) == 0
        cur = conn.cursor()
        cur.execute("SELECT 6 * 7")
        assert cur.fetchone()[0] == 42
    finally:
        conn.close()


@pytest.mark.mariadb
@pytest.mark.parametrize("driver", ["mysqlclient", "pymysql"])
@pytest.mark.parametrize("app_transaction", [False, True])
def test_mysql_probe_leaves_the_transaction_state_as_it_was(
    mariadb: Any, driver: str, app_transaction: bool
) -> None:
    """MariaDB, autocommit=0, REPEATABLE READ: @@in_transaction is the same before and
    after the probe, an application's open transaction keeps its uncommitted row, and
    with none open a row committed after the probe is visible."""
    table = f"my_{driver}_{int(app_transaction)}"
    mariadb.execute(f"DROP TABLE IF EXISTS forksafe.{table}")
    mariadb.execute(f"CREATE TABLE forksafe.{table} (id INT) ENGINE=InnoDB")
    if driver == "mysqlclient":
        import MySQLdb as dbapi  # noqa: N813 - either driver
    else:
        import pymysql as dbapi
    conn = dbapi.connect(**mariadb.connect_kwargs(), autocommit=False)
    try:
        cur = conn.cursor()
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")

        def in_transaction() -> int:
            cur.execute("SELECT @@in_transaction")
            return int(cur.fetchone()[0])

        if app_transaction:
            cur.execute(f"INSERT INTO {table} VALUES (7)")
        before = in_transaction()
        assert before == int(app_transaction)
        assert (server_idle_limit("mysql", conn) or 0) > 0
        assert in_transaction() == before
        if app_transaction:
            cur.execute(f"SELECT count(*) FROM {table} WHERE id = 7")
            assert cur.fetchone()[0] == 1  # the application's row, not rolled back
            conn.commit()
        else:
            mariadb.execute(f"INSERT INTO forksafe.{table} VALUES (1)")
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone()[0] == 1
    finally:
        conn.close()



@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_tracked_engine_usable_when_the_probe_fails(pg: Any, driver: str) -> None:
    """A tracked engine (recycle="auto" asks the limit on connect) for a role that cannot
    read pg_settings: the first statement of every new connection works."""
    from sqlalchemy import create_engine, text

    import forksafe

    url = pg.url(driver).replace("postgres@", f"{DENIED}@")
    engine = forksafe.track(create_engine(url))
    try:
        since = len(pg.server_log())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 6 * 7")).scalar() == 42
        assert "permission denied for view pg_settings" in pg.server_log()[since:]
    finally:
        forksafe.untrack(engine)
        engine.dispose()
