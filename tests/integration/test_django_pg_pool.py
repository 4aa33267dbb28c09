"""Django 5.1+'s PostgreSQL connection pool (``OPTIONS["pool"]``) across a fork."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.postgres]

SCRIPT = Path(__file__).parent / "scripts" / "django_pg_pool.py"


def run(postgres: Any, protect: bool) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(postgres.port), "--protect", str(int(protect))],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict = json.loads(done.stdout)
    return report


def test_children_get_their_own_pooled_sessions(postgres: Any) -> None:
    """With "forksafe.django", each child's query runs on a backend of its own and the parent's
    pooled session stays alive; without it, children check the parent's idle session out of
    the inherited pool and query on it (a shared session), or hang on the pool.
    """
    bare = run(postgres, protect=False)
    bare_backends = [c.get("backend_pid") for c in bare["children"]]
    shared = bare_backends.count(bare["parent_pid"]) + bare_backends.count(bare["after_pid"])
    hung = sum(1 for code in bare["exit_codes"] if code != 0)
    assert shared or hung, f"unprotected run showed no sharing: {bare}"

    safe = run(postgres, protect=True)
    assert safe["exit_codes"] == [0, 0, 0]
    assert safe["parent_error"] is None
    assert safe["parent_session_alive"] is True
    parent_backends = {safe["parent_pid"], safe["after_pid"]}
    child_backends = [c["backend_pid"] for c in safe["children"]]
    assert not parent_backends & set(child_backends), safe
    assert len(set(child_backends)) == 3, safe
    assert all(c["internal_errors"] == [] for c in safe["children"])
