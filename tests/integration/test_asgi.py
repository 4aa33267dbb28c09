"""The ASGI scenario: gunicorn + uvicorn workers, preload_app, an AsyncEngine used at import.

The app (`forksafe.testing.asgi_app`, Starlette) creates an ``AsyncEngine`` on psycopg 3's
async driver and uses it once in ``asyncio.run`` while gunicorn's master imports it; the
master then forks four ``uvicorn_worker.UvicornWorker`` processes, each with its own event
loop. Real HTTP requests, each checking it got exactly its own answer: without forksafe the
workers share the inherited connection (wrong answers, errors); with forksafe
(``forksafe.track`` + ``forksafe.gunicorn.post_fork``) every request of every round is
right.
"""

from __future__ import annotations

from typing import Any

import pytest

from forksafe.testing.servers import SCENARIOS, HarnessError, check_scenario_available
from tests.integration.test_repro import _seed, assert_both_halves

pytestmark = [pytest.mark.postgres, pytest.mark.servers, pytest.mark.slow, pytest.mark.timeout(300)]


def test_async_engine_under_uvicorn_workers(postgres: Any) -> None:
    """Corrupted without forksafe within a few rounds, clean in every round with it."""
    try:
        check_scenario_available(SCENARIOS["gunicorn-uvicorn"])
    except HarnessError as exc:
        pytest.fail(f"the dev extra includes the ASGI stack: {exc}")
    url = postgres.url("psycopg2")
    _seed(url)
    assert_both_halves(url, "gunicorn-uvicorn", "engine")
