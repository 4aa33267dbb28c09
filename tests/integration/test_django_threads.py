"""forksafe.django protects every thread's connection, not only the forking thread's.

Django's connections are per thread. When one thread forks, CPython frees the other
threads' state in the child before any at-fork hook runs; a worker thread's mysqlclient
connection would be finalised there, sending ``COM_QUIT`` on the parent's session. With
``"forksafe.django"``, every connection Django opens is in forksafe's registry, held across
the fork and neutralised: the parent's worker keeps its session. Server-side evidence: the
general log's ``Quit``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "django_thread_fork.py"


def run(mariadb: Any, protect: bool) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(mariadb.port), "--protect",
         str(int(protect))],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["child_exit"] == 0, report
    return report


def test_without_forksafe_a_fork_quits_the_worker_threads_session(mariadb: Any) -> None:
    """The control: the child's exit sends Quit for the worker's session; its next query
    fails (2013 / 2006)."""
    report = run(mariadb, protect=False)
    assert mariadb.quit_logged(report["worker_before"]), report
    assert "worker_error" in report, report


def test_with_forksafe_django_the_worker_thread_keeps_its_session(mariadb: Any) -> None:
    """No Quit for the worker's session, and its next query runs on the same session."""
    report = run(mariadb, protect=True)
    assert report["internal_errors"] == [], report
    assert "worker_error" not in report, report
    assert report["worker_after"] == report["worker_before"], report
    assert not mariadb.quit_logged(report["worker_before"]), report
