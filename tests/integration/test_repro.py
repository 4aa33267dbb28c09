"""The reproduction harness, scenario by scenario: the bug without forksafe, none with it.

Each test starts the real server (gunicorn with ``preload_app``, uWSGI with its default
settings, or a ``multiprocessing`` pool with the fork start method) on an app whose
database object was created and used at import, sends concurrent requests that each check
they got exactly their own answer (a unique number echoed by ``SELECT`` and three seeded
rows), and asserts both halves:

* without forksafe the corruption shows: errors or wrong answers in at least one of a few
  rounds (measured here: every round of 400 requests from 32 threads showed it);
* with forksafe (``forksafe.track`` in the app, ``from forksafe.gunicorn import post_fork``
  or ``--import forksafe.uwsgi`` in the server) every request of every round is right.

Every round starts a fresh server, so each round forks anew. Forks happen in those
servers, never in pytest.
"""

from __future__ import annotations

from typing import Any

import pytest

from forksafe.testing import checks
from forksafe.testing.repro import run_round
from forksafe.testing.servers import DEFAULT_SCENARIOS, ServerSettings, free_port

pytestmark = [pytest.mark.mariadb, pytest.mark.servers, pytest.mark.slow, pytest.mark.timeout(900)]

REQUESTS = 400
CONCURRENCY = 32
UNPROTECTED_TRIES = 3
PROTECTED_ROUNDS = 3


def _seed(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    table = checks.TABLE
    with engine.begin() as conn:
        conn.execute(
            text(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, label VARCHAR(64))")
        )
        conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(
            text(f"INSERT INTO {table} (id, label) VALUES (:i, :l)"),
            [{"i": i, "l": checks.label_for(i)} for i in range(1, checks.SEED_ROWS + 1)],
        )
    engine.dispose()


@pytest.fixture(scope="module")
def seeded(mariadb: Any) -> Any:
    """The private MariaDB with the harness's table filled."""
    _seed(mariadb.url())
    return mariadb


_counter = iter(range(1, 10**9, 10_000))


def _round(url: str, scenario: str, mode: str, protect: bool) -> dict[str, int]:
    settings = ServerSettings(url=url, mode=mode, protect=protect, port=free_port())
    # The per-request bound only turns a hang into an outcome. With forksafe nothing may
    # hang, so it is generous there (a busy machine is slow, and slowness is no fault);
    # without forksafe requests stuck on a shared socket are expected, and a short bound
    # keeps those runs short.
    outcomes = run_round(
        scenario, settings, REQUESTS, concurrency=CONCURRENCY,
        timeout=60.0 if protect else 5.0, first=next(_counter)
    )
    assert len(outcomes) == REQUESTS
    return checks.tally(o[1] for o in outcomes)


def assert_both_halves(url: str, scenario: str, mode: str) -> None:
    """Unprotected reproduces within a few rounds; protected is clean in every round."""
    seen = []
    for _ in range(UNPROTECTED_TRIES):
        counts = _round(url, scenario, mode, protect=False)
        seen.append(counts)
        if checks.problems(counts):
            break
    assert checks.problems(seen[-1]) > 0, (
        f"{scenario}/{mode} without forksafe: no error and no wrong answer in "
        f"{UNPROTECTED_TRIES} rounds of {REQUESTS} requests; the test proves nothing: {seen}"
    )
    for round_no in range(1, PROTECTED_ROUNDS + 1):
        counts = _round(url, scenario, mode, protect=True)
        assert counts[checks.OK] == REQUESTS, (
            f"{scenario}/{mode} with forksafe, round {round_no}: "
            f"{ {k: v for k, v in counts.items() if v} }"
        )


@pytest.mark.parametrize("scenario", list(DEFAULT_SCENARIOS))
def test_engine_used_at_import(seeded: Any, scenario: str) -> None:
    """A SQLAlchemy engine used at import: corrupted without forksafe, clean with it.

    Covers gunicorn (sync and gthread workers, preload_app), uWSGI (master + 4 processes
    with default settings, with threads, without master) and a fork Pool.
    """
    assert_both_halves(seeded.url(), scenario, "engine")


@pytest.mark.parametrize("scenario", ["gunicorn-sync", "uwsgi-master", "multiprocessing"])
def test_raw_global_connection(seeded: Any, scenario: str) -> None:
    """A global MySQLdb connection opened at import: wrong answers without forksafe;
    with ``forksafe.ProcessLocal`` every worker uses its own connection and all is right."""
    assert_both_halves(seeded.url(), scenario, "raw")


@pytest.mark.parametrize("scenario", ["gunicorn-gthread", "uwsgi-master"])
def test_pymysql(seeded: Any, scenario: str) -> None:
    """The same with PyMySQL as the driver."""
    assert_both_halves(seeded.url(driver="pymysql"), scenario, "engine")


@pytest.mark.postgres
def test_psycopg2_on_postgresql(postgres: Any) -> None:
    """PostgreSQL through psycopg2, gunicorn sync workers: the bug, then none with forksafe."""
    url = postgres.url("psycopg2")
    _seed(url)
    assert_both_halves(url, "gunicorn-sync", "engine")
