"""Django's parallel test runner (``manage.py test --parallel 2``, fork) on a real project.

The project (apps/django_runner) has five test cases that record, in each forked worker, the
database and session their tests run on, and check it is the worker's own clone of the
test database; one of them has ``serialized_rollback = True``, so the parent holds an open
connection (with Django's PostgreSQL pool: an open pool) when it forks the workers. Its
runner records the parent's session at the fork and, afterwards, queries on it once.

What happens without ``"forksafe.django"``: with the pool, the workers check the parent's
pooled sessions out of the inherited pool: connected to the parent's test database, not
their clones, and shared between the workers, so tests fail. Without the pool, each worker
closes the inherited connection first thing (Django's ``setup_worker_connection()``), which
ends the parent's session on the server (MySQL ``COM_QUIT``, PostgreSQL ``Terminate``): the
tests pass, and the parent's connection is dead afterwards. With ``"forksafe.django"``:
every worker on its own clone and its own sessions, and the parent's session untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]

PROJECT = Path(__file__).parent / "apps" / "django_runner"
TIMEOUT = 120  # the last bound: a run still going is killed (returncode None)


@dataclass
class Run:
    returncode: int | None  # None: killed after TIMEOUT
    output: str
    parent: dict[str, Any]
    after: dict[str, Any] | None
    tests: list[dict[str, Any]]

    def workers(self) -> dict[int, list[dict[str, Any]]]:
        by_pid: dict[int, list[dict[str, Any]]] = {}
        for record in self.tests:
            by_pid.setdefault(record["pid"], []).append(record)
        return by_pid


def run_parallel_tests(
    server: Any, tmp_path: Path, *, db: str, pool: bool, protect: bool
) -> tuple[Run, str]:
    """``manage.py test --parallel 2`` in a subprocess (its own process group, killed whole
    after TIMEOUT); returns the run and the name of its test database."""
    tag = f"{'pool' if pool else db}_{int(protect)}"
    test_name = f"runner_{tag}"
    report = tmp_path / f"report-{tag}.jsonl"
    env = {
        **os.environ,
        "RUNNER_DB": db,
        "RUNNER_POOL": str(int(pool)),
        "RUNNER_PORT": str(server.port),
        "RUNNER_TEST_NAME": test_name,
        "RUNNER_FORKSAFE": str(int(protect)),
        "RUNNER_REPORT": str(report),
        # the parent's probe after the suite; skipped where workers may be using the very
        # session it would query (the pool without forksafe), which could hang the parent
        "RUNNER_PROBE_PARENT": "0" if pool and not protect else "1",
        # where workers share sessions, a client can wait for a reply another process read:
        # the server ends a session idle for 5 s, so such a wait ends in an error
        "RUNNER_IDLE_TIMEOUT": "5000" if pool and not protect else "",
        "PYTHONPATH": str(PROJECT),
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "test", "--parallel", "2", "--noinput", "probe"],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    returncode: int | None
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers
        output, _ = proc.communicate()
        returncode = None
    records = [json.loads(line) for line in report.read_text().splitlines()] if (
        report.exists()) else []
    parents = [r for r in records if r["role"] == "parent"]
    assert len(parents) == 1, f"the runner did not reach the fork:\n{output[-3000:]}"
    afters = [r for r in records if r["role"] == "parent-after"]
    run = Run(returncode, output, parents[0], afters[0] if afters else None,
              [r for r in records if r["role"] == "test"])
    print(f"{tag}: exit {returncode}, parent session {run.parent}, after {run.after}, "
          f"workers {sorted(run.workers())}, sessions "
          f"{ {pid: sorted({r['session'] for r in rs}) for pid, rs in run.workers().items()} }")
    return run, test_name


def assert_each_worker_on_its_own(run: Run, test_name: str) -> None:
    """Every test ran on its worker's clone, on sessions no other process had."""
    assert run.returncode == 0, run.output[-3000:]
    assert len(run.tests) == 10  # five test cases, two records each
    clones = {f"{test_name}_1", f"{test_name}_2"}
    seen: dict[int, set[int]] = {}
    for pid, records in run.workers().items():
        names = {r["settings_name"] for r in records}
        assert len(names) == 1, records
        assert names <= clones, records
        assert all(r["client_name"] in (None, r["settings_name"]) for r in records), records
        seen[pid] = {r["session"] for r in records}
    inherited = {run.parent["session"], *run.parent["pool_idle"]} - {None}
    for pid, sessions in seen.items():
        assert not sessions & inherited, (pid, sessions, run.parent)
        others = set().union(*(s for p, s in seen.items() if p != pid))
        assert not sessions & others, seen


@pytest.mark.postgres
def test_pool_without_forksafe_workers_run_on_the_parents_pooled_sessions(
    postgres: Any, tmp_path: Path
) -> None:
    """Control: with the pool and no forksafe, the workers' tests run on sessions from the
    inherited pool, connected to the parent's test database instead of the worker's clone
    (and, as a rule, the same session in both workers): the run fails."""
    run, test_name = run_parallel_tests(postgres, tmp_path, db="postgresql", pool=True,
                                        protect=False)
    assert run.parent["session"] is not None  # the parent held a pooled connection
    assert run.returncode != 0, run.output[-3000:]
    on_parents_db = [r for r in run.tests if r["client_name"] == test_name]
    assert on_parents_db, run.tests
    assert all(r["settings_name"] != test_name for r in on_parents_db)  # set to a clone
    # Which inherited session each worker gets depends on the pool's state at each fork
    # (its thread may add one in between): shown, not asserted.
    sessions = {pid: {r["session"] for r in rs} for pid, rs in run.workers().items()}
    shared = set.intersection(*sessions.values()) if len(sessions) > 1 else set()
    print(f"sessions used by both workers: {sorted(shared)}; the parent's among the "
          f"workers' sessions: {run.parent['session'] in set().union(*sessions.values())}")


@pytest.mark.postgres
def test_pool_with_forksafe_each_worker_has_its_own_clone_and_sessions(
    postgres: Any, tmp_path: Path
) -> None:
    run, test_name = run_parallel_tests(postgres, tmp_path, db="postgresql", pool=True,
                                        protect=True)
    assert run.parent["session"] is not None
    assert_each_worker_on_its_own(run, test_name)
    assert run.after == {"role": "parent-after", "pid": run.parent["pid"], "error": None}


def unprotected_parent_session_ends(server: Any, tmp_path: Path, db: str) -> None:
    run, test_name = run_parallel_tests(server, tmp_path, db=db, pool=False, protect=False)
    assert run.parent["session"] is not None  # the parent held a connection at the fork
    assert_each_worker_on_its_own(run, test_name)  # the tests themselves pass
    assert run.after is not None
    assert run.after["error"] is not None, run.after


def protected_parent_session_survives(server: Any, tmp_path: Path, db: str) -> None:
    run, test_name = run_parallel_tests(server, tmp_path, db=db, pool=False, protect=True)
    assert run.parent["session"] is not None
    assert_each_worker_on_its_own(run, test_name)
    assert run.after == {"role": "parent-after", "pid": run.parent["pid"], "error": None}


@pytest.mark.mariadb
def test_mariadb_without_forksafe_a_worker_quits_the_parents_session(
    mariadb: Any, tmp_path: Path
) -> None:
    """Control: the tests pass, but a worker's close of its inherited connection sent
    ``COM_QUIT`` on the parent's session: the parent's next query fails."""
    unprotected_parent_session_ends(mariadb, tmp_path, "mysql")


@pytest.mark.mariadb
def test_mariadb_with_forksafe_the_parents_session_survives(
    mariadb: Any, tmp_path: Path
) -> None:
    protected_parent_session_survives(mariadb, tmp_path, "mysql")


@pytest.mark.postgres
def test_postgres_without_pool_without_forksafe_a_worker_ends_the_parents_session(
    postgres: Any, tmp_path: Path
) -> None:
    """Control, PostgreSQL without the pool: the same as MariaDB (a ``Terminate``)."""
    unprotected_parent_session_ends(postgres, tmp_path, "postgresql")


@pytest.mark.postgres
def test_postgres_without_pool_with_forksafe_the_parents_session_survives(
    postgres: Any, tmp_path: Path
) -> None:
    protected_parent_session_survives(postgres, tmp_path, "postgresql")
