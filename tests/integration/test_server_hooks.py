"""forksafe's gunicorn and uWSGI hooks inside the real servers.

Each server serves tests/integration/apps/hook_app.py, whose engine is used at import (so a
connection is open before the fork). The user's own post-fork hook is registered in every
way the integrations promise to respect; it writes one file per worker recording whether
forksafe's reset had already run there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mirakuru import HTTPExecutor

from forksafe.testing.mariadb import free_port

pytestmark = [pytest.mark.mariadb, pytest.mark.servers]

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent


def hit(port: int, n: int = 40) -> list[dict]:
    """n concurrent requests; every response as JSON."""

    def one(_: int) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as resp:
            return json.loads(resp.read())

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def user_hook_files(hook_dir: Path) -> dict[int, int]:
    """pid -> forksafe resets seen by the user's hook in that worker."""
    return {int(p.name.split("-")[1]): int(p.read_text()) for p in hook_dir.glob("user-*")}


def wait_for_files(hook_dir: Path, count: int, timeout: float = 15.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        files = user_hook_files(hook_dir)
        if len(files) >= count or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


def run_uwsgi(mariadb: Any, tmp_path: Path, setup: str, master: bool) -> tuple[Any, int]:
    port = free_port()
    command = [
        str(BIN / "uwsgi"), "--http-socket", f"127.0.0.1:{port}",
        "--wsgi-file", str(APPS / "hook_app.py"), "--callable", "application",
        "--processes", "4", "--need-app", "--disable-logging", "--die-on-term",
    ]
    if master:
        command.append("--master")
    env = {**os.environ, "DB_URL": mariadb.url(), "HOOK_DIR": str(tmp_path),
           "HOOK_SETUP": setup}
    # Without a master, SIGINT to the process group ends every worker; uWSGI's original
    # process (worker 1) then exits with status 30.
    server = HTTPExecutor(command, url=f"http://127.0.0.1:{port}/", status="200", timeout=60,
                          envvars=env, stop_signal=signal.SIGINT,
                          expected_returncode=None if master else 30)
    server.start()
    return server, port


UWSGI_SETUPS = [
    ("plain", True),
    ("plain", False),
    ("before", True),
    ("before", False),
    ("decorators_before", True),
    ("decorators_after", True),
]


@pytest.mark.parametrize(("setup", "master"), UWSGI_SETUPS)
def test_uwsgi_hook_runs_first_and_keeps_user_hooks(
    mariadb: Any, tmp_path: Path, setup: str, master: bool
) -> None:
    """In every uWSGI worker forksafe resets first, and the user's own hook still runs.

    Covers master and no master, and a user hook registered before forksafe.uwsgi (by hand or
    through uwsgidecorators) or after it (uwsgidecorators). Workers use their own sessions.
    """
    server, port = run_uwsgi(mariadb, tmp_path, setup, master)
    try:
        responses = hit(port)
        files = wait_for_files(tmp_path, 4) if setup != "plain" else {}
    finally:
        server.stop()
    parent_ids = {r["parent_cid"] for r in responses}
    assert len(parent_ids) == 1
    (parent_id,) = parent_ids
    for r in responses:
        assert r["internal_errors"] == []
        if r["resets"] == 0:
            # without master, worker 1 is the process that loaded the app: it owns the session
            assert not master
            assert r["cid"] == parent_id
        else:
            assert r["resets"] == 1
            assert r["cid"] != parent_id
    if setup != "plain":
        assert len(files) == 4, files
        forked = [resets for resets in files.values() if resets]
        assert len(forked) == (4 if master else 3), files  # worker 1 without master: no fork
        assert set(forked) == {1}


def test_uwsgi_hook_replaced_by_hand_is_backed_by_the_pid_check(
    mariadb: Any, tmp_path: Path
) -> None:
    """A hook assigned to uwsgi.post_fork_hook after forksafe.uwsgi replaces forksafe's.

    The pid check at checkout still resets each worker before its first query, so workers
    never share the parent's session.
    """
    server, port = run_uwsgi(mariadb, tmp_path, "manual_after", True)
    try:
        files = wait_for_files(tmp_path, 4)
        responses = hit(port)
    finally:
        server.stop()
    assert set(files.values()) == {0}, "forksafe's hook should have been replaced"
    for r in responses:
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]
        assert r["internal_errors"] == []


GUNICORN_CONF = '''
import os
from forksafe.gunicorn import chain

preload_app = True
workers = 3
loglevel = "warning"

@chain
def post_fork(server, worker):
    from forksafe import _fork
    hook_dir = os.environ["HOOK_DIR"]
    partial = os.path.join(hook_dir, f".partial-user-{worker.pid}")
    with open(partial, "w") as fh:
        fh.write(str(_fork._STATE.resets))
    os.replace(partial, os.path.join(hook_dir, f"user-{worker.pid}"))
'''


def test_gunicorn_chained_post_fork(mariadb: Any, tmp_path: Path) -> None:
    """gunicorn accepts forksafe.gunicorn.chain(hook); every worker resets and runs the hook."""
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    env = {**os.environ, "DB_URL": mariadb.url(), "HOOK_DIR": str(hook_dir)}
    server = HTTPExecutor(
        [str(BIN / "gunicorn"), "-c", str(conf), "--bind", f"127.0.0.1:{port}",
         "--chdir", str(APPS), "hook_app:application"],
        url=f"http://127.0.0.1:{port}/", status="200", timeout=60, envvars=env,
    )
    server.start()
    try:
        responses = hit(port)
        files = wait_for_files(hook_dir, 3)
    finally:
        server.stop()
    assert len(files) == 3
    assert set(files.values()) == {1}
    for r in responses:
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]


def test_gunicorn_validates_forksafe_hooks() -> None:
    """gunicorn's own validator accepts post_fork and chain(); chain() rejects a bad arity."""
    from gunicorn.config import validate_callable

    from forksafe.gunicorn import chain, post_fork

    assert validate_callable(2)(post_fork) is post_fork
    chained = chain(lambda server, worker: None)
    assert validate_callable(2)(chained) is chained
    with pytest.raises(TypeError, match=r"exactly \(server, worker\)"):
        chain(lambda worker: None)


def test_forksafe_uwsgi_outside_uwsgi_says_what_to_do() -> None:
    """Importing forksafe.uwsgi outside uWSGI is an ImportError that points to the fix."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import forksafe.uwsgi"],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "only works inside a uWSGI worker" in done.stderr
    assert "forksafe.gunicorn" in done.stderr
