"""``forksafe.register_after_fork``: state forksafe does not know, rebuilt in every child
after the reset. The example is psycopg_pool's ``ConnectionPool`` against the private
PostgreSQL (its log names every disconnection with the backend pid)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import forksafe
from forksafe import _fork

pytestmark = [pytest.mark.postgres]

SCRIPT = Path(__file__).parent / "scripts" / "psycopg_pool_fork.py"


def run(server: Any, mode: str) -> dict:
    kwargs = server.connect_kwargs()
    conninfo = " ".join(f"{key}={value}" for key, value in kwargs.items())
    done = subprocess.run([sys.executable, str(SCRIPT), "--conninfo", conninfo, "--mode", mode],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report: dict = json.loads(done.stdout)
    return report


def test_a_psycopg_pool_rebuilt_after_fork(postgres: Any) -> None:
    """With instrument() and a callback that makes the child a pool of its own, the child
    queries on a backend of its own and closing the pool there ends nothing of the
    parent's. The control: the child takes the parent's pooled connection, its close()
    ends the parent's session, and the parent's next query fails."""
    bare = run(postgres, "none")
    assert bare["child"]["pid"] == bare["before_pid"], "control: the child had its own session"
    assert postgres.disconnection_logged(bare["before_pid"]), "control: nothing ended it"
    assert "error" in bare, bare

    safe = run(postgres, "protect")
    assert "error" not in safe, safe
    assert "error" not in safe["child"], safe["child"]
    assert safe["child"]["pid"] != safe["before_pid"], safe
    # the same backend answered the parent after the child closed its pool (the server
    # logs a disconnection for it only when the parent itself exits)
    assert safe["after_pid"] == safe["before_pid"], safe
    assert safe["internal_errors"] == [], safe
    assert safe["child"]["internal_errors"] == [], safe


def test_register_after_fork_is_a_decorator_and_refuses_what_it_cannot_call() -> None:
    def callback() -> None:
        pass

    try:
        assert forksafe.register_after_fork(callback) is callback
        forksafe.register_after_fork(callback)  # twice: a no-op
        assert _fork._CHILD_CALLBACKS[_fork.AFTER_RESET].count(callback) == 1
    finally:
        assert forksafe.unregister_after_fork(callback) is True
    assert forksafe.unregister_after_fork(callback) is False
    with pytest.raises(TypeError, match="needs a callable"):
        forksafe.register_after_fork(42)  # type: ignore[arg-type]
