"""A child forked inside ``transaction.atomic()``: what forksafe.django does, and says.

The child cannot share the parent's transaction (that would be a shared session); it gets
a connection of its own outside any atomic block, so its writes commit on their own and
survive the rollback of the parent's block. Worker pools started inside a block (a test
runner inside a ``TestCase``) keep working. The child says so, in a warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "django_atomic_fork.py"


def test_child_forked_inside_atomic_reconnects_and_warns(mariadb: Any) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(mariadb.port)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    child = report["child"]
    assert report["child_exit"] == 0, report
    assert "error" not in child, report
    assert child["internal_errors"] == [], report
    assert child["connection_id"] != report["parent_connection_id"], report
    assert report["pool"] == [42], report
    # the parent's block rolled back; the child's write, outside it, stayed
    assert report["rows"] == [2], report
    warnings = [line for line in done.stderr.splitlines()
                if "forked inside transaction.atomic()" in line]
    # the child, and the pool's worker: one warning each, naming the risk
    assert len(warnings) == 2, done.stderr[-3000:]
    assert all("commits on its own" in w and "'default'" in w for w in warnings), warnings
