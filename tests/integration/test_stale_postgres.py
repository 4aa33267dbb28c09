"""PostgreSQL's idle_session_timeout, learned by tracked engines (psycopg2 and psycopg 3)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, exc, text

import forksafe
from tests.conftest import start_private

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
    connection before use, from the limit it learned (liveness pings are off here, so the
    learned limit alone does it): no error reaches the caller. A plain engine, and a tracked
    one with recycle=None, fail."""
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
    assert failures["unlearned"], "without the learned limit the tracked engine fails too"
    assert all("idle-session timeout" in f or "closed" in f for f in failures["plain"]), failures
    assert len(set(backends)) == 3, "each idle connection was replaced before use"
