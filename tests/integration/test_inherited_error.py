"""An error on a connection the child inherited is explained as that, not as an idle
timeout: a scoped ORM session left open across the fork, against the private MariaDB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "inherited_session.py"


def test_a_session_kept_across_fork_fails_with_the_right_explanation(mariadb: Any) -> None:
    """The child's first statement on the session fails (its connection was neutralised):
    classify(), explain() and forksafe's log name the inherited connection and the fix,
    with no word of an idle limit; after ``remove()`` the child has a session of its own,
    and the parent's goes on."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--url", mariadb.url()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    child = report["child"]
    assert "error" in child, f"the inherited session's statement did not fail: {child}"
    assert child["code"] == "forksafe-inherited", child
    assert "forked" in child["explain"], child["explain"]
    assert "scoped_session.remove()" in child["explain"], child["explain"]
    assert "idle" not in child["explain"], child["explain"]
    logged = [line for line in child["log"] if "inherited from the parent" in line]
    assert logged, child["log"]
    assert not any("sat idle" in line for line in child["log"]), child["log"]
    assert child["after_remove_id"] != report["before_id"], child
    assert report["after_id"] == report["before_id"], report
    assert child["internal_errors"] == [], child
