"""multiprocessing's forkserver start method (the default on Linux since Python 3.14).

``set_forkserver_preload`` makes the forkserver import the app once; every pool worker is
then forked from that process and inherits the app's engine with its pooled connection.
Without forksafe the workers query on the forkserver's session (one socket shared by
several processes); with a tracked engine each worker opens its own session and the
forkserver's session stays open. Runs in a fresh interpreter (``scripts/forkserver_run.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "forkserver_run.py"


def _run(server: Any, protect: bool) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), server.url(), "1" if protect else "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_preloaded_engine_in_forkserver_workers(mariadb: Any) -> None:
    """Workers forked from a forkserver that preloaded a tracked engine use sessions of
    their own; unprotected, they use the forkserver's session."""
    bare = _run(mariadb, protect=False)
    bare_results = bare["results"]
    assert {r["preload_pid"] for r in bare_results} != {bare["runner_pid"]}, (
        "the app was imported by the forkserver, not by the runner"
    )
    assert all(r["ppid"] == r["preload_pid"] for r in bare_results), "workers forked from it"
    assert any(r.get("session") == r["preload_id"] or "error" in r for r in bare_results), (
        f"unprotected: no worker used the forkserver's session: {bare_results}"
    )

    safe = _run(mariadb, protect=True)
    results = safe["results"]
    assert [r for r in results if "error" in r] == []
    assert sorted(r["echo"] for r in results) == list(range(12))
    assert all(r["ppid"] == r["preload_pid"] for r in results)
    preload_ids = {r["preload_id"] for r in results}
    assert len(preload_ids) == 1, "one forkserver preloaded the app once"
    sessions = {r["pid"]: r["session"] for r in results}
    assert not preload_ids & set(sessions.values()), results
    assert len(set(sessions.values())) == len(sessions), "two workers shared a session"
    assert all(safe["preload_alive"].values()), "the forkserver's session was ended"
