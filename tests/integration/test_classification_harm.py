"""Error classification never harms a healthy connection (a real MariaDB, tracked engines).

* A duplicate key whose *data* reads "Connection refused" is an IntegrityError with code
  1062: the code decides, so the pool keeps its healthy session (the server-side session id
  is unchanged), nothing is logged as a disconnect, and ``retry_on_disconnect`` runs the
  deterministic failure once.
* An IntegrityError raised on a healthy engine inside ``except OperationalError:`` (a
  fallback after another engine lost its session) is judged on its own, not by the
  disconnect it was raised while handling: the healthy engine keeps its session.
* A SQLite trigger that raises "Connection refused: ..." (an IntegrityError, SQLite has no
  server) is the application's error: the tracked engine keeps its connection and its pool,
  exactly as an untracked one does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, Table, create_engine, exc, pool, text, types

import forksafe
from forksafe import errors
from tests.integration._liveness import session_id

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture
def table(mysql_server: Any) -> Iterator[str]:
    name = f"notes_{uuid.uuid4().hex[:8]}"
    mysql_server.execute(f"CREATE TABLE forksafe.{name} (note VARCHAR(100) PRIMARY KEY)")
    try:
        yield name
    finally:
        mysql_server.execute(f"DROP TABLE IF EXISTS forksafe.{name}")


@pytest.fixture
def quiet_reports() -> Iterator[None]:
    errors.reset_reported()
    yield
    errors.reset_reported()


@pytest.mark.mariadb
@pytest.mark.usefixtures("quiet_reports")
def test_duplicate_key_that_reads_like_a_disconnect(
    mysql_server: Any, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forksafe")
    engine = forksafe.track(create_engine(mysql_server.url("pymysql"), pool_size=1,
                                          max_overflow=0))
    note = "Connection refused by the upstream mail server"
    try:
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} VALUES (:n)"), {"n": note})
        before = session_id(engine)
        calls = []

        @forksafe.retry_on_disconnect(attempts=4, backoff=0.0)
        def insert_again() -> None:
            calls.append(1)
            with engine.begin() as conn:
                conn.execute(text(f"INSERT INTO {table} VALUES (:n)"), {"n": note})

        with pytest.raises(exc.IntegrityError) as caught:
            insert_again()
        assert caught.value.orig.args[0] == 1062
        assert len(calls) == 1, "a deterministic failure was repeated"
        assert session_id(engine) == before, "the healthy session was dropped"
        assert [r.getMessage() for r in caplog.records if r.name == "forksafe"
                and r.levelno >= logging.INFO] == []
    finally:
        engine.dispose()
        forksafe.untrack(engine)


@pytest.mark.usefixtures("quiet_reports")
@pytest.mark.mariadb
def test_integrity_error_raised_while_handling_a_disconnect(mysql_server: Any,
                                                            table: str) -> None:
    primary = forksafe.track(create_engine(mysql_server.url("pymysql"), pool_size=1))
    fallback = forksafe.track(create_engine(mysql_server.url("pymysql"), pool_size=1,
                                            max_overflow=0))
    try:
        with fallback.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} VALUES ('taken')"))
        healthy = session_id(fallback)

        def write_with_fallback(conn: Any) -> None:
            try:
                conn.execute(text("SELECT 1"))
            except exc.OperationalError:  # the primary is gone: write to the fallback
                with fallback.begin() as other:
                    other.execute(text(f"INSERT INTO {table} VALUES ('taken')"))

        with primary.connect() as conn:
            doomed = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
            mysql_server.execute(f"KILL CONNECTION {doomed}")
            with pytest.raises(exc.IntegrityError) as caught:
                write_with_fallback(conn)
        assert isinstance(caught.value.orig.__context__, exc.OperationalError)
        assert errors.classify(caught.value) is None
        assert session_id(fallback) == healthy, "the healthy engine's session was dropped"
    finally:
        for engine in (primary, fallback):
            engine.dispose()
            forksafe.untrack(engine)


def _tracked_does_as_plain(scenario: Any, plain: Any, tracked: Any, expected: dict[str, Any],
                           caplog: pytest.LogCaptureFixture) -> None:
    """``scenario(engine)`` gives ``expected`` on the untracked engine (the control) and the
    same on the tracked one, which logs nothing about it; both engines are disposed."""
    try:
        assert scenario(plain) == expected
        assert scenario(tracked) == expected
        assert not [r for r in caplog.records if r.name.startswith("forksafe")
                    and r.levelno >= logging.INFO], caplog.text
    finally:
        forksafe.untrack(tracked)
        tracked.dispose()
        plain.dispose()


def _trigger_says_connection_refused(engine: Any) -> dict[str, Any]:
    """Runs an INSERT that a trigger aborts with a disconnect's words; what the pool did."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE accounts (name TEXT)"))
        conn.execute(text(
            "CREATE TRIGGER locked BEFORE INSERT ON accounts BEGIN "
            "SELECT RAISE(ABORT, 'Connection refused: the account is locked'); END"))
    with engine.connect() as conn:
        before = conn.connection.dbapi_connection
        with pytest.raises(exc.DBAPIError) as caught:
            conn.execute(text("INSERT INTO accounts VALUES ('ann')"))
    with engine.connect() as conn:
        after = conn.connection.dbapi_connection
    return {"error": type(caught.value).__name__,
            "message": "Connection refused" in str(caught.value),
            "invalidated": caught.value.connection_invalidated,
            "same_connection": after is before,
            "pool_invalidated": engine.pool._invalidate_time != 0}


@pytest.mark.usefixtures("quiet_reports")
def test_a_sqlite_trigger_that_reads_like_a_disconnect(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forksafe")
    plain = create_engine(f"sqlite:///{tmp_path / 'plain.db'}", poolclass=pool.QueuePool)
    tracked = forksafe.track(create_engine(f"sqlite:///{tmp_path / 'tracked.db'}",
                                           poolclass=pool.QueuePool))
    _tracked_does_as_plain(
        _trigger_says_connection_refused, plain, tracked,
        {"error": "IntegrityError", "message": True, "invalidated": False,
         "same_connection": True, "pool_invalidated": False}, caplog)


class _Sealed(types.TypeDecorator):
    """A column whose values another service seals: its client fails as clients do."""

    impl = types.String(100)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value == "key service down":
            raise ConnectionError("key service at 10.0.0.5:8200: Connection refused")
        return value


def _an_application_error_that_reads_like_a_disconnect(engine: Any, table: str) -> dict[str, Any]:
    sealed = Table(table, MetaData(), Column("note", _Sealed, primary_key=True))
    with engine.connect() as conn:
        before = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
        conn.execute(sealed.insert(), {"note": "first"})
        with pytest.raises(exc.StatementError) as caught:
            conn.execute(sealed.insert(), {"note": "key service down"})
        invalidated = conn.invalidated
        conn.execute(sealed.insert(), {"note": "third"})  # the application carries on
        conn.commit()
        after = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT note FROM {table} ORDER BY note")).scalars().all()
        conn.execute(text(f"DELETE FROM {table}"))
        conn.commit()
    return {"error": type(caught.value.orig).__name__,
            "connection_invalidated": caught.value.connection_invalidated,
            "invalidated": invalidated, "same_session": before == after, "rows": rows,
            "pool_invalidated": engine.pool._invalidate_time != 0}


@pytest.mark.mariadb
@pytest.mark.usefixtures("quiet_reports")
@pytest.mark.parametrize("driver", ["pymysql", "mysqldb"])
def test_an_application_error_that_reads_like_a_disconnect(
    mysql_server: Any, table: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ConnectionError that is not the driver's (a key service's client, raised while a
    parameter is bound) says "Connection refused": the database connection is fine, and
    the tracked engine keeps it and its transaction, exactly as an untracked one does."""
    caplog.set_level(logging.INFO, logger="forksafe")
    plain = create_engine(mysql_server.url(driver), pool_size=2)
    tracked = forksafe.track(create_engine(mysql_server.url(driver), pool_size=2))
    _tracked_does_as_plain(
        lambda engine: _an_application_error_that_reads_like_a_disconnect(engine, table),
        plain, tracked,
        {"error": "ConnectionError", "connection_invalidated": False, "invalidated": False,
         "same_session": True, "rows": ["first", "third"], "pool_invalidated": False}, caplog)
