"""PostgreSQL's idle_session_timeout, learned by tracked engines (psycopg2 and psycopg 3)."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import create_engine, event, exc, text

import forksafe
from tests.conftest import start_private
from tests.integration import _liveness
from tests.integration._liveness import POOLED, concurrent_requests, count_pings, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def short_idle_postgres() -> Iterator[Any]:
    """A private PostgreSQL that ends any session idle for 2 seconds."""
    from forksafe.testing.postgres import PostgreSQL

    server = start_private(lambda: PostgreSQL(options={"idle_session_timeout": "2s"}))
    yield server
    server.cleanup()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_idle_session_timeout_is_learned_and_respected(
    short_idle_postgres: Any, driver: str
) -> None:
    """With idle_session_timeout=2s and 3 s gaps, a tracked engine retires each idle
    connection before use, from the limit it learned (liveness pings are off here): no error
    reaches the caller. A plain engine fails; a tracked one with recycle=None does not either
    (the socket check sees the session ended)."""
    url = short_idle_postgres.url(driver)
    tracked = forksafe.track(create_engine(url), idle_check=None, recycle="auto")
    unlearned = forksafe.track(create_engine(url), idle_check=None, recycle=None)
    plain = create_engine(url)
    backends: list[int] = []
    failures: dict[str, list[str]] = {"plain": [], "unlearned": []}
    try:
        for _ in range(3):
            with tracked.connect() as conn:
                backends.append(conn.execute(text("SELECT pg_backend_pid()")).scalar())
            for name, engine in (("plain", plain), ("unlearned", unlearned)):
                try:
                    with engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                except exc.OperationalError as err:
                    failures[name].append(str(err.orig))
            time.sleep(3)
    finally:
        for engine in (tracked, unlearned):
            forksafe.untrack(engine)
        for engine in (tracked, unlearned, plain):
            engine.dispose()
    assert failures["plain"], "without forksafe a session idle past the timeout must fail"
    # Without the learned limit, the socket check at checkout still sees that the server
    # ended the session (its goodbye is readable) and replaces it: no failure either.
    assert failures["unlearned"] == [], failures
    assert all("idle-session timeout" in f or "closed" in f for f in failures["plain"]), failures
    assert len(set(backends)) == 3, "each idle connection was replaced before use"


# -- liveness at checkout: a session the server closed while idle ------------------------------
SA2 = int(sqlalchemy.__version__.split(".")[0]) >= 2
DRIVERS = ["psycopg2", pytest.param("psycopg", marks=pytest.mark.skipif(
    not SA2, reason="SQLAlchemy 1.4 has no psycopg 3 dialect"))]


@pytest.fixture(scope="module")
def pg_liveness() -> Iterator[Any]:
    """A private PostgreSQL the liveness tests terminate sessions on and restart."""
    from forksafe.testing.postgres import PostgreSQL

    server = start_private(PostgreSQL)
    yield server
    server.cleanup()


def open_pooled(engine: Any) -> list[int]:
    return _liveness.open_pooled(engine, "SELECT pg_backend_pid()")


def backends(server: Any) -> set[int]:
    return {int(r[0]) for r in server.execute(
        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()", database="postgres")}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fault", ["terminate", "restart", "idle_session_timeout"])
def test_sessions_ended_while_idle_are_replaced_without_a_round_trip(
    pg_liveness: Any, driver: str, fault: str
) -> None:
    """``POOLED`` idle pooled connections per engine; the server ends them all
    (``pg_terminate_backend``, a restart, or an ``idle_session_timeout`` the application sets
    on connect); then ``POOLED`` concurrent requests. Plain fails each; pool_pre_ping none,
    pinging; a tracked engine none, without a ping (the server's goodbye is in the socket)."""
    server = pg_liveness

    def make(**options: Any) -> Any:
        engine = create_engine(server.url(driver), pool_size=POOLED, **options)
        if fault == "idle_session_timeout":
            @event.listens_for(engine, "connect")
            def short_idle_limit(dbapi_connection: Any, record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("SET idle_session_timeout = '2s'")
                cursor.close()
                dbapi_connection.commit()
        return engine

    engines = {
        "plain": make(),
        "pool_pre_ping": make(pool_pre_ping=True),
        "forksafe": forksafe.track(make(), idle_check=None, recycle=None),
        "forksafe defaults": forksafe.track(make()),
    }
    pings = {name: count_pings(engine) for name, engine in engines.items()}
    try:
        pooled = {name: open_pooled(engine) for name, engine in engines.items()}
        everyone = {pid for pids in pooled.values() for pid in pids}
        if fault == "terminate":
            for pid in sorted(everyone):
                server.execute(f"SELECT pg_terminate_backend({pid})", database="postgres")
        elif fault == "restart":
            server.restart()
        wait_until(lambda: not everyone & backends(server),
                   "the server no longer lists the pooled sessions")
        failures = {name: concurrent_requests(engine) for name, engine in engines.items()}
    finally:
        for name, engine in engines.items():
            if name.startswith("forksafe"):
                forksafe.untrack(engine)
            engine.dispose()
    assert failures["plain"] == POOLED, failures
    assert failures["pool_pre_ping"] == 0, failures
    assert pings["pool_pre_ping"]
    assert failures["forksafe"] == 0, failures
    assert pings["forksafe"] == [], "the socket told forksafe, without a ping"
    assert failures["forksafe defaults"] == 0, failures


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_notice_on_an_idle_connection_costs_a_ping_not_the_connection(
    pg_liveness: Any, driver: str
) -> None:
    """PostgreSQL may send an idle session something (here a NOTIFY it listens to): the
    socket is readable but the connection is fine. forksafe pings it and hands it out."""
    engine = forksafe.track(
        create_engine(pg_liveness.url(driver), pool_size=1, isolation_level="AUTOCOMMIT"),
        idle_check=None, recycle=None,
    )
    pings = count_pings(engine)
    try:
        with engine.connect() as conn:
            conn.execute(text("LISTEN forksafe_test"))
            pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar())
            fd = conn.connection.dbapi_connection.fileno()
        pg_liveness.execute("NOTIFY forksafe_test, 'hello'", database="forksafe")
        readable, _, _ = select.select([fd], [], [], 60)  # wait for the delivery
        assert readable, "the notification reached the idle connection's socket"
        with engine.connect() as conn:
            assert int(conn.execute(text("SELECT pg_backend_pid()")).scalar()) == pid
    finally:
        forksafe.untrack(engine)
        engine.dispose()
    assert len(pings) == 1


@pytest.mark.parametrize("how", ["track", "instrument"])
def test_engine_usable_when_the_idle_limit_probe_is_denied(pg_liveness: Any, how: str) -> None:
    """A role that may not read pg_settings: forksafe's probe fails, and the connection is
    left clean (its first statement works, no InFailedSqlTransaction), tracked by track()
    or by instrument()."""
    pg_liveness.execute("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
                        "'nosettings') THEN CREATE ROLE nosettings LOGIN; END IF; END $$",
                        database="postgres")
    pg_liveness.execute("REVOKE ALL ON pg_catalog.pg_settings FROM PUBLIC", database="forksafe")
    url = pg_liveness.url("psycopg2").replace("postgres@", "nosettings@")
    try:
        if how == "instrument":
            forksafe.instrument()
            try:
                engine = create_engine(url)
            finally:
                forksafe.uninstrument()
            assert forksafe.is_tracked(engine)
        else:
            engine = forksafe.track(create_engine(url))
        try:
            for _ in range(3):
                with engine.connect() as conn:
                    assert conn.execute(text("SELECT 6 * 7")).scalar() == 42
        finally:
            forksafe.untrack(engine)
            engine.dispose()
    finally:
        pg_liveness.execute("GRANT SELECT ON pg_catalog.pg_settings TO PUBLIC",
                            database="forksafe")


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_connection_returned_inside_a_transaction_keeps_it_past_idle_check(
    pg_liveness: Any, driver: str
) -> None:
    """With ``pool_reset_on_return=None`` a connection may go back to the pool inside the
    application's transaction. The idle check must not ping it: psycopg's ping turns on
    autocommit, which the driver refuses in a transaction, and the healthy connection (with
    the work in it) would be replaced, and the pool invalidated. It is handed out as it is,
    transaction and all, exactly as an untracked engine does."""
    from forksafe import sqlalchemy as adapter

    def run(track: bool) -> tuple[bool, Any, bool]:
        engine = create_engine(pg_liveness.url(driver), pool_size=1, max_overflow=0,
                               pool_reset_on_return=None)
        if track:
            forksafe.track(engine, idle_check=3600.0, recycle=None)
        try:
            raw = engine.raw_connection()
            dbapi = raw.dbapi_connection
            cur = raw.cursor()
            cur.execute("CREATE TEMP TABLE work_in_progress (x int)")
            cur.execute("INSERT INTO work_in_progress VALUES (1)")
            cur.close()
            record = raw._connection_record
            raw.close()  # back to the pool, the transaction still open
            if track:  # idle for longer than idle_check: the next checkout checks it
                vars(record)[adapter._STATE_KEY].last -= 7200.0
            raw = engine.raw_connection()
            cur = raw.cursor()
            cur.execute("SELECT x FROM work_in_progress")
            rows = cur.fetchall()
            cur.close()
            same = raw.dbapi_connection is dbapi
            raw.rollback()
            raw.close()
            return same, [tuple(r) for r in rows], engine.pool._invalidate_time != 0
        finally:
            if track:
                forksafe.untrack(engine)
            engine.dispose()

    expected = run(track=False)
    assert expected == (True, [(1,)], False)
    assert run(track=True) == expected
