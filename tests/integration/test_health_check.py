"""``forksafe.connections()`` as a health check: a session the server ended is not "open".

The state comes from a zero-timeout poll of the socket (no byte sent, nothing read): a
server that ended the session (KILL, pg_terminate_backend, a restart) has hung up on it. The
control is a live session next to it, which stays ``open`` and answers queries.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import forksafe

pytestmark = [pytest.mark.timeout(300)]


def _states() -> Counter[str]:
    return Counter(i.state for i in forksafe.connections() if i.kind == "connection")


def _wait_for(predicate: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Poll until ``predicate()``; a generous bound only against a hang, not a timing."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen within {limit:.0f} s: {_states()}"
        time.sleep(0.05)


def _check(kill: Callable[[], object], victim: Any, survivor: Any) -> None:
    before = _states()
    kill()
    _wait_for(lambda: _states()["closed-by-server"] == before["closed-by-server"] + 1,
              "the ended session as closed-by-server")
    after = _states()
    assert after["open"] == before["open"] - 1, (before, after)
    cur = survivor.cursor()
    cur.execute("SELECT 1")
    assert cur.fetchone()[0] == 1
    with pytest.raises(Exception):  # noqa: B017,PT011 - the driver's own error, any of them
        victim.cursor().execute("SELECT 1")


@pytest.mark.mariadb
@pytest.mark.parametrize("driver", ["MySQLdb", "pymysql"])
def test_killed_mysql_session_is_not_listed_as_open(mariadb: Any, driver: str) -> None:
    """KILL one of two tracked sessions: connections() lists it as closed-by-server (the
    old answer was 'open'), the other as open, with no query sent on either."""
    module = pytest.importorskip(driver)
    victim = forksafe.track(module.connect(**mariadb.connect_kwargs()))
    survivor = forksafe.track(module.connect(**mariadb.connect_kwargs()))
    try:
        _check(lambda: mariadb.execute(f"KILL CONNECTION {victim.thread_id()}"),
               victim, survivor)
    finally:
        for conn in (victim, survivor):
            forksafe.untrack(conn)
            with contextlib.suppress(Exception):
                conn.close()


@pytest.mark.postgres
def test_terminated_postgres_session_is_not_listed_as_open(postgres: Any) -> None:
    """pg_terminate_backend on one of two tracked psycopg2 sessions: closed-by-server; the
    other stays open."""
    psycopg2 = pytest.importorskip("psycopg2")
    victim = forksafe.track(psycopg2.connect(**postgres.connect_kwargs()))
    survivor = forksafe.track(psycopg2.connect(**postgres.connect_kwargs()))
    victim.autocommit = survivor.autocommit = True
    try:
        _check(lambda: postgres.execute(
            f"SELECT pg_terminate_backend({victim.get_backend_pid()})"), victim, survivor)
    finally:
        for conn in (victim, survivor):
            forksafe.untrack(conn)
            with contextlib.suppress(Exception):
                conn.close()
