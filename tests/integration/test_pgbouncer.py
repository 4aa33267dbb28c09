"""PgBouncer between the app and PostgreSQL: the fork bug moves to the app-to-pooler socket.

A private PgBouncer (``forksafe.testing.pgbouncer``) runs in front of the suite's private
PostgreSQL, in session and in transaction pooling. The app only ever talks to PgBouncer, so
whatever goes wrong after fork goes wrong on the socket to the pooler; PgBouncer's own
admin console (``SHOW CLIENTS``) is the evidence of which client connections it still
serves.

* the repro (gunicorn, ``preload_app``, an engine used at import): wrong answers and errors
  without forksafe, every request right with it;
* the driver matrix (psycopg2 and psycopg 3, engine and raw connection): a child that closes
  the inherited connection or disposes the engine ends the parent's client connection at
  the pooler without forksafe; with forksafe the parent's connection is still served and
  answers, and a child that queries does so on a client connection of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forksafe.testing.pgbouncer import POOL_MODES
from tests.conftest import start_private
from tests.integration.test_repro import _seed, assert_both_halves

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).parent / "scripts" / "pooler_scenario.py"


@pytest.fixture(scope="module", params=POOL_MODES)
def bouncer(request: pytest.FixtureRequest, postgres: Any) -> Iterator[Any]:
    """A private PgBouncer in front of the private PostgreSQL, in each pooling mode."""
    from forksafe.testing.pgbouncer import PgBouncer

    server = start_private(lambda: PgBouncer(postgres, pool_mode=request.param))
    yield server
    server.cleanup()


@pytest.mark.servers
def test_repro_through_pgbouncer(bouncer: Any) -> None:
    """gunicorn sync workers, preload_app, an engine used at import, through PgBouncer:
    corrupted without forksafe, clean with it."""
    url = bouncer.url("psycopg2")
    _seed(url)
    assert_both_halves(url, "gunicorn-sync", "engine")


def run_scenario(url: str, kind: str, mode: str, action: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", url, "--kind", kind, "--mode", mode,
         "--action", action, "--children", "1" if action == "use" else "2"],
        capture_output=True, text=True, timeout=90, check=False,
    )
    why = f"scenario failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, why
    lines = done.stdout.strip().splitlines()
    assert lines, why
    report: dict[str, Any] = json.loads(lines[-1])
    return report


CASES = [
    pytest.param(driver, kind, action, id=f"{driver}-{kind}-{action}")
    for driver in ("psycopg2", "psycopg")
    for kind in ("engine", "raw")
    for action in ("close", "dispose", "use")
    if not (kind == "raw" and action == "dispose")
]


@pytest.mark.parametrize(("driver", "kind", "action"), CASES)
def test_parent_client_connection_survives(bouncer: Any, driver: str, kind: str,
                                           action: str) -> None:
    """Unprotected, a child's close/dispose ends the parent's connection to the pooler and a
    child's query runs on it; with forksafe.track the pooler still serves the parent."""
    if driver == "psycopg":
        pytest.importorskip("sqlalchemy.dialects.postgresql.psycopg")
    url = bouncer.url(driver)

    bare = run_scenario(url, kind, "none", action)
    if action == "use":
        child = bare["children"][0]
        assert child.get("inherited_port") == bare["parent_port"], (
            f"unprotected: the child was expected to query on the parent's socket: {bare}"
        )
    else:
        assert bare["parent_error"] is not None, f"unprotected: the parent survived: {bare}"

    safe = run_scenario(url, kind, "track", action)
    assert safe["parent_error"] is None, safe
    assert safe["after_port"] == safe["parent_port"], "the parent lost its connection"
    assert safe["parent_port"] in safe["pooler_clients"], "PgBouncer no longer serves it"
    assert safe["exit_codes"] == [0] * len(safe["children"]), safe
    assert safe["internal_errors"] == [], safe
    for child in safe["children"]:
        assert "error" not in child, child
        assert child["internal_errors"] == [], child
        if action == "use":
            if kind == "raw":
                assert "inherited_error" in child, child  # neutralised: fails, sends nothing
            else:
                assert child.get("inherited_ok"), child
                assert child["inherited_port"] != safe["parent_port"], child
