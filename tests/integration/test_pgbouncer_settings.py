"""What PgBouncer's own settings change: its idle timeout, and what ``forksafe doctor`` says.

* ``client_idle_timeout``: PgBouncer closes an app connection idle that long, whatever
  PostgreSQL's ``idle_session_timeout`` says (here: off). An untracked engine fails on the
  next use, with an error `forksafe.errors` classifies as a disconnect (psycopg 3 reads
  "client_idle_timeout", psycopg2 "server closed the connection unexpectedly"). Tracked
  engines (pings off) do not: ``recycle="auto"`` learns nothing from PostgreSQL here, but
  the socket check at checkout sees the close PgBouncer sent; ``recycle=`` below
  ``client_idle_timeout`` (the value ``forksafe doctor`` prints) retires the connection
  before PgBouncer closes it.
* ``forksafe doctor --url`` recognises PgBouncer through its admin console and reports
  pool_mode, client_idle_timeout, server_idle_timeout and max_client_conn against workers x
  pool; a user the console refuses gets a finding that says so; PostgreSQL itself gets none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, exc, text

import forksafe
from tests.conftest import start_private
from tests.integration.test_doctor import by_severity, doctor

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

CLIENT_IDLE = 2  # seconds


@pytest.fixture(scope="module")
def idle_bouncer(postgres: Any) -> Iterator[Any]:
    """A PgBouncer (transaction pooling) that closes client connections idle for 2 s."""
    from forksafe.testing.pgbouncer import PgBouncer

    server = start_private(lambda: PgBouncer(
        postgres, pool_mode="transaction",
        options={"client_idle_timeout": str(CLIENT_IDLE), "max_client_conn": "50"},
    ))
    yield server
    server.cleanup()


def _idle_closings(bouncer: Any) -> int:
    """How many client connections PgBouncer has closed for client_idle_timeout so far."""
    return bouncer.log_path.read_text(errors="replace").count(
        "closing because: client_idle_timeout")


def _wait_for_idle_closings(bouncer: Any, count: int) -> None:
    """Wait (bounded) until PgBouncer's log shows ``count`` client_idle_timeout closings."""
    deadline = time.monotonic() + 30
    while _idle_closings(bouncer) < count:
        assert time.monotonic() < deadline, "PgBouncer never closed the idle connections"
        time.sleep(0.1)


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_pooler_idle_timeout(idle_bouncer: Any, driver: str) -> None:
    """A plain engine fails after PgBouncer closed its idle connection (a classified
    disconnect); tracked engines, recycle='auto' or recycle=1.8, never fail."""
    url = idle_bouncer.url(driver)
    plain = create_engine(url)
    auto = forksafe.track(create_engine(url), idle_check=None, recycle="auto")
    below = forksafe.track(create_engine(url), idle_check=None, recycle=CLIENT_IDLE * 0.9)
    engines = {"plain": plain, "auto": auto, "below": below}
    failures: dict[str, list[str]] = {name: [] for name in engines}
    try:
        for engine in engines.values():
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        for _ in range(2):
            # every engine's idle connection, closed by the pooler (not by PostgreSQL)
            _wait_for_idle_closings(idle_bouncer, _idle_closings(idle_bouncer) + len(engines))
            for name, engine in engines.items():
                try:
                    with engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                except exc.DBAPIError as err:
                    failures[name].append(str(err.orig))
                    with engine.connect() as conn:  # a new one, idle for the next round
                        conn.execute(text("SELECT 1"))
    finally:
        for engine in (auto, below):
            forksafe.untrack(engine)
        for engine in engines.values():
            engine.dispose()
    assert failures["plain"], "the control: the pooler's idle timeout must break a plain engine"
    assert all(forksafe.errors.classify(f) is not None for f in failures["plain"]), failures
    assert failures["auto"] == [], failures["auto"]
    assert failures["below"] == [], failures["below"]


def test_doctor_reports_pgbouncer_settings(idle_bouncer: Any) -> None:
    """pool_mode, client_idle_timeout with the recycle= to set, server_idle_timeout, and
    4 workers x 15 connections = 60 against max_client_conn 50: an error."""
    status, findings, out = doctor("--url", idle_bouncer.url("psycopg2"), "--workers", "4",
                                   "--pool-size", "5", "--max-overflow", "10",
                                   "--threads", "20")
    messages = [f["message"] for f in findings]
    assert any("is PgBouncer 1." in m and "pool_mode = transaction" in m for m in messages), out
    idle = [f for f in findings if "client_idle_timeout = 2 s" in f["message"]]
    assert idle, out
    assert idle[0]["severity"] == "warning"
    assert "recycle=1" in idle[0]["fix"], idle
    assert any("server_idle_timeout = 600 s" in m for m in messages), out
    assert any("prepared statement" in m for m in by_severity(findings, "warning")), out
    errors = by_severity(findings, "error")
    assert any("= 60 connections to PgBouncer; its max_client_conn is 50" in e
               for e in errors), out
    assert status == 1
    # PostgreSQL's max_connections is not compared with the app's connections behind a pooler
    assert not any("the server allows" in m for m in messages), out


def test_doctor_when_the_console_refuses(idle_bouncer: Any, postgres: Any) -> None:
    """A user PgBouncer lets in but not into its console: PgBouncer is still named, with
    what to do to let doctor read its settings."""
    from forksafe.testing.pgbouncer import PLAIN_USER

    if not postgres.execute(f"SELECT 1 FROM pg_roles WHERE rolname = '{PLAIN_USER}'"):
        postgres.execute(f"CREATE ROLE {PLAIN_USER} LOGIN")
    _status, findings, out = doctor("--url", idle_bouncer.url("psycopg2", user=PLAIN_USER))
    refused = [f for f in findings if "refused" in f["message"]]
    assert refused, out
    assert "PgBouncer" in refused[0]["message"]
    assert "stats_users" in refused[0]["fix"]


def test_doctor_on_postgresql_itself_names_no_pooler(postgres: Any) -> None:
    """Straight to PostgreSQL: no pooler finding, the server's capacity check as before."""
    _status, findings, out = doctor("--url", postgres.url("psycopg2"))
    assert not [f for f in findings if f["check"] == "pooler"], out
    assert any("the server allows" in f["message"] for f in findings), out
