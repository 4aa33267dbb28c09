"""Error classification never harms a healthy connection (a real MariaDB, tracked engines).

* A duplicate key whose *data* reads "Connection refused" is an IntegrityError with code
  1062: the code decides, so the pool keeps its healthy session (the server-side session id
  is unchanged), nothing is logged as a disconnect, and ``retry_on_disconnect`` runs the
  deterministic failure once.
* An IntegrityError raised on a healthy engine inside ``except OperationalError:`` (a
  fallback after another engine lost its session) is judged on its own, not by the
  disconnect it was raised while handling: the healthy engine keeps its session.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, exc, text

import forksafe
from forksafe import errors
from tests.integration._liveness import session_id

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]


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
