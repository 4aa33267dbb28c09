"""The ASGI scenario: gunicorn + uvicorn workers, preload_app, an AsyncEngine used at import.

The app (`forksafe.testing.asgi_app`, Starlette) creates an ``AsyncEngine`` and uses it once
in ``asyncio.run`` while gunicorn's master imports it; the master then forks four
``uvicorn_worker.UvicornWorker`` processes, each with its own event loop. Real HTTP
requests, each checking it got exactly its own answer: without forksafe the workers share
the inherited connection, which also belongs to a loop that is gone (asyncpg: "attached to
a different loop", "another operation is in progress"; psycopg: wrong answers, errors);
with forksafe (``forksafe.track`` + ``forksafe.gunicorn.post_fork``) every request of every
round is right. PostgreSQL through psycopg 3 and asyncpg, MariaDB through aiomysql.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from forksafe.testing import checks
from forksafe.testing.repro import run_round
from forksafe.testing.servers import (
    SCENARIOS,
    HarnessError,
    ServerSettings,
    check_scenario_available,
    free_port,
)
from tests.integration.test_repro import _seed

pytestmark = [pytest.mark.servers, pytest.mark.slow, pytest.mark.timeout(300)]

REQUESTS = 400
UNPROTECTED_TRIES = 3
PROTECTED_ROUNDS = 2
_numbers = itertools.count(1, 10_000)


def _round(url: str, async_driver: str, protect: bool) -> dict[str, int]:
    settings = ServerSettings(url=url, mode="engine", protect=protect, port=free_port(),
                              async_driver=async_driver)
    outcomes = run_round("gunicorn-uvicorn", settings, REQUESTS, concurrency=32, timeout=5.0,
                         first=next(_numbers))
    assert len(outcomes) == REQUESTS
    return checks.tally(o[1] for o in outcomes)


def assert_both_halves(url: str, async_driver: str) -> None:
    try:
        check_scenario_available(SCENARIOS["gunicorn-uvicorn"])
    except HarnessError as exc:
        pytest.fail(f"the dev extra includes the ASGI stack: {exc}")
    seen = []
    for _ in range(UNPROTECTED_TRIES):
        seen.append(_round(url, async_driver, protect=False))
        if checks.problems(seen[-1]):
            break
    assert checks.problems(seen[-1]) > 0, f"{async_driver} without forksafe: nothing: {seen}"
    for round_no in range(1, PROTECTED_ROUNDS + 1):
        counts = _round(url, async_driver, protect=True)
        assert counts[checks.OK] == REQUESTS, (
            f"{async_driver} with forksafe, round {round_no}: "
            f"{ {k: v for k, v in counts.items() if v} }"
        )


@pytest.mark.postgres
@pytest.mark.parametrize("async_driver", ["psycopg_async", "asyncpg"])
def test_async_engine_under_uvicorn_workers_postgres(postgres: Any, async_driver: str) -> None:
    """Corrupted without forksafe within a few rounds, clean in every round with it."""
    url = postgres.url("psycopg2")
    _seed(url)
    assert_both_halves(url, async_driver)


@pytest.mark.mariadb
def test_async_engine_under_uvicorn_workers_mariadb(mariadb: Any) -> None:
    """The same on MariaDB through aiomysql."""
    url = mariadb.url()
    _seed(url)
    assert_both_halves(url, "aiomysql")
