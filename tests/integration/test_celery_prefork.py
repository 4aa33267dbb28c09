"""Celery's prefork pool under a real ``celery worker``, against the private MariaDB.

The worker's main process loads tests/integration/apps/celery_app.py, whose engine opens a
session at import; billiard then forks the pool processes. Tasks report which session
their query ran on. Without forksafe the pool processes run on the main process's session
(one socket shared by all of them); with ``forksafe.track(engine)`` each has its own, and
the main process's session is never ended by a child (the server's general log).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb, pytest.mark.servers, pytest.mark.slow,
              pytest.mark.timeout(300)]

APPS = Path(__file__).parent / "apps"
WAIT = 60.0  # seconds for one task's answer: a worker that never starts fails clearly
TASKS = 16


def _client(data: Path) -> Any:
    """A client app on the worker's file broker (celery_files.py, loaded by its path)."""
    spec = importlib.util.spec_from_file_location("celery_files", APPS / "celery_files.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_app("client", str(data))


@contextmanager
def worker(mariadb: Any, tmp_path: Path, *, protect: bool, max_tasks: int) -> Iterator[Any]:
    """A running ``celery worker --pool prefork --concurrency 2`` (``max_tasks``: its
    ``--max-tasks-per-child``, 0 for none); yields a client app."""
    data = tmp_path / ("with" if protect else "without")
    for sub in ("queue", "processed", "results"):
        (data / sub).mkdir(parents=True)
    env = {**os.environ, "CELERY_DATA": str(data), "DATABASE_URL": mariadb.url(),
           "FORKSAFE": "1" if protect else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(APPS), os.environ.get("PYTHONPATH")]))}
    log = (data / "worker.log").open("w")
    recycle = ["--max-tasks-per-child", str(max_tasks)] if max_tasks else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork",
         "--concurrency", "2", *recycle, "-l", "info"],
        cwd=APPS, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield _client(data)
    finally:
        # The control's pool processes may hang on the shared socket: no warm shutdown.
        if protect:
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def run_tasks(client: Any, wait: float = WAIT) -> tuple[list[list[int]], list[str]]:
    """Send ``TASKS`` session tasks; return the answers and what went wrong with the others
    (an error, or no answer by a shared deadline of ``wait`` seconds: a pool process
    reading another's reply on a shared socket can wait for ever)."""
    import time

    from celery.exceptions import TimeoutError as NoAnswer

    results = [client.send_task("celery_app.session") for _ in range(TASKS)]
    deadline = time.monotonic() + wait
    answers: list[list[int]] = []
    failures: list[str] = []
    for result in results:
        try:
            answers.append(result.get(timeout=max(0.5, deadline - time.monotonic())))
        except NoAnswer:
            failures.append("no answer")
        except Exception as exc:  # the task's own error: a disconnect, commands out of sync
            failures.append(repr(exc))
    return answers, failures


@pytest.mark.parametrize("max_tasks", [0, 1], ids=["long-lived", "max-tasks-per-child=1"])
def test_prefork_pool_processes_get_sessions_of_their_own(
    mariadb: Any, tmp_path: Path, max_tasks: int
) -> None:
    with worker(mariadb, tmp_path, protect=False, max_tasks=max_tasks) as client:
        # a shorter deadline: a hung task is expected here, and "no answer" is no evidence
        bare, damage = run_tasks(client, wait=WAIT / 2)
    assert bare, f"control: the worker answered no task: {damage}"
    parent_ids = {parent for _, parent, _ in bare}
    shared = [answer for answer in bare if answer[2] in parent_ids]
    errors = [failure for failure in damage if failure != "no answer"]
    assert shared or errors, f"control: every task had a session of its own: {bare} {damage}"

    with worker(mariadb, tmp_path, protect=True, max_tasks=max_tasks) as client:
        safe, failures = run_tasks(client)
        assert failures == [], failures
        parent_id = safe[0][1]
        # before the worker stops (the main process's own exit ends its session)
        assert not mariadb.quit_logged(parent_id), "a pool process ended the main session"
    assert all(session != parent_id for _, _, session in safe), safe
    sessions: dict[int, set[int]] = {}
    for pid, _, session in safe:
        sessions.setdefault(pid, set()).add(session)
    owners: dict[int, int] = {}
    for pid, ids in sessions.items():
        for session in ids:
            assert owners.setdefault(session, pid) == pid, f"two processes shared {session}"
    if max_tasks == 1:
        assert len(sessions) == TASKS, "max-tasks-per-child=1: a new process for each task"
