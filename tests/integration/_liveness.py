"""Helpers shared by the liveness tests (MariaDB and PostgreSQL): count pings, fill a pool,
send concurrent requests, wait for a condition with a bound."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import exc, text

#: idle connections each engine keeps in its pool before the fault
POOLED = 4


def count_pings(engine: Any) -> list[int]:
    """Count the dialect's liveness pings on ``engine`` (the real ping still runs)."""
    pings: list[int] = []
    original = engine.dialect.do_ping

    def counting(dbapi_connection: Any) -> bool:
        pings.append(1)
        return bool(original(dbapi_connection))

    engine.dialect.do_ping = counting
    return pings


def wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f}s waiting until {what}")
        time.sleep(0.05)


def session_id(engine: Any) -> int:
    """The MySQL/MariaDB session (``CONNECTION_ID()``) of a connection checked out of
    ``engine``, used and returned."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())


def open_pooled(engine: Any, session_id_sql: str, n: int = POOLED) -> list[int]:
    """Open ``n`` connections at once, use each, return them all: ``n`` idle in the pool.
    Returns their server session ids (``session_id_sql``: the dialect's query for it)."""
    conns = [engine.connect() for _ in range(n)]
    try:
        return [int(c.execute(text(session_id_sql)).scalar()) for c in conns]
    finally:
        for conn in conns:
            conn.close()


def concurrent_requests(engine: Any, n: int = POOLED) -> int:
    """``n`` requests at once (each checks out a connection, then queries); the failures."""
    failures = 0
    conns = [engine.connect() for _ in range(n)]
    try:
        for conn in conns:
            try:
                conn.execute(text("SELECT 1")).scalar()
            except exc.OperationalError:
                failures += 1
    finally:
        for conn in conns:
            conn.close()
    return failures
