"""What each line of the README's quick start buys, under the real servers.

The app (apps/lines_app.py) has a tracked engine and a tracked raw MySQLdb connection, both
used at import, and uses the raw one first in every request:

* gunicorn with ``preload_app`` and no ``post_fork``: ``import forksafe`` in the app is
  enough (gunicorn forks with os.fork, so the at-fork hook resets every worker): the raw
  connection is refused in the workers, the engine gives each its own session.
* uWSGI without ``import = forksafe.uwsgi``: no hook runs after uWSGI's C fork. The tracked
  engine still gets its own session at the first checkout (the pid check), but the raw
  connection, used first, is the master's session (the harm).
* uWSGI with the line: both are protected from the first instruction of the worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mirakuru import HTTPExecutor

from forksafe.testing.mariadb import free_port

pytestmark = [pytest.mark.mariadb, pytest.mark.servers, pytest.mark.timeout(300)]

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent


def _serve(command: list[str], port: int, mariadb: Any) -> list[dict[str, Any]]:
    env = {**os.environ, "DB_URL": mariadb.url("mysqldb"),
           "DB_KWARGS": json.dumps(mariadb.connect_kwargs())}
    server = HTTPExecutor(command, url=f"http://127.0.0.1:{port}/", status="200",
                          timeout=120, envvars=env, stop_signal=signal.SIGINT)
    server.start()
    try:
        answers = []
        for _ in range(12):  # one at a time: a shared session answers sequential queries
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as resp:
                answers.append(json.loads(resp.read()))
        return answers
    finally:
        server.stop()


def _uwsgi(port: int, *extra: str) -> list[str]:
    return [str(BIN / "uwsgi"), "--http-socket", f"127.0.0.1:{port}", "--master",
            "--processes", "2", "--wsgi-file", str(APPS / "lines_app.py"),
            "--callable", "application", "--need-app", "--disable-logging", *extra]


def test_gunicorn_preload_is_covered_by_import_forksafe(mariadb: Any, tmp_path: Path) -> None:
    """gunicorn, preload_app, no post_fork in the config: every worker was reset at fork."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("preload_app = True\nworkers = 2\n")
    port = free_port()
    answers = _serve([str(BIN / "gunicorn"), "-c", str(conf), "--bind", f"127.0.0.1:{port}",
                      "--chdir", str(APPS), "lines_app:application"], port, mariadb)
    assert {a["raw"] for a in answers} == {"refused 2006"}, answers
    assert all(a["engine_own"] for a in answers), answers


def test_uwsgi_without_its_line_shares_the_raw_connection(mariadb: Any) -> None:
    """uWSGI, no `import = forksafe.uwsgi`: the engine is saved by its pid check at checkout,
    but the raw connection used first in a worker is the master's own session."""
    port = free_port()
    answers = _serve(_uwsgi(port), port, mariadb)
    assert "shared" in {a["raw"] for a in answers}, answers
    assert all(a["engine_own"] for a in answers), answers


def test_uwsgi_with_its_line_protects_from_the_first_instruction(mariadb: Any) -> None:
    """uWSGI with `import = forksafe.uwsgi`: the raw connection is refused in every worker
    and the engine gives each its own session."""
    port = free_port()
    answers = _serve(_uwsgi(port, "--import", "forksafe.uwsgi"), port, mariadb)
    assert {a["raw"] for a in answers} == {"refused 2006"}, answers
    assert all(a["engine_own"] for a in answers), answers
