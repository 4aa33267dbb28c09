"""``forksafe repro`` as users run it: the default run, JSON, bad input, Ctrl-C.

The command runs in a subprocess (``python -m forksafe repro``), exactly as from a shell.
Bad input must give one line on stderr that names the cause and the fix, no traceback, no
password, and leave nothing running; Ctrl-C must stop every server the command started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from forksafe.testing.servers import free_port

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]

COMMAND = [sys.executable, "-m", "forksafe", "repro"]


def _repro(*args: str, env: dict[str, str] | None = None,
           limit: float = 150) -> subprocess.CompletedProcess[str]:
    """Run the command; ``limit`` only bounds a hang (generous: a busy machine is slow)."""
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=limit,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("forksafe repro: error: ")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    return lines[0]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.mariadb
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_run_reproduces_and_is_clean() -> None:
    """``forksafe repro`` with no arguments: all six scenarios, both halves, exit 0, a table
    with a REPRODUCED and a clean line per scenario, progress on stderr. (How long it takes
    depends on the machine; nothing here asserts a duration.)"""
    done = _repro(limit=840)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for scenario in ("gunicorn-sync", "gunicorn-gthread", "uwsgi-master", "uwsgi-threads",
                     "uwsgi-nomaster", "multiprocessing"):
        row = next(line for line in lines if line.startswith(scenario))
        assert " without " in row
        with_row = lines[lines.index(row) + 1]
        assert " with " in with_row
        assert with_row.rstrip().endswith("clean"), with_row
    assert done.stdout.count("REPRODUCED") >= 4, done.stdout
    assert "every run with forksafe is clean (6 runs)" in done.stdout
    assert "[12/12]" in done.stderr


@pytest.mark.mariadb
def test_json_output_against_a_given_database(mariadb: Any) -> None:
    """``--db URL --json``: a JSON document on stdout with both halves of each run."""
    url = mariadb.url().replace("mysql+mysqldb://root@", "mysql://root@")
    done = _repro("--db", url, "--server", "multiprocessing", "--rounds", "2", "--json", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data = json.loads(done.stdout)
    assert data["exit_status"] == 0
    runs = {r["forksafe"]: r for r in data["runs"]}
    assert runs[True]["verdict"] == "clean"
    assert runs[True]["counts"]["ok"] == 800
    assert runs[False]["problems"] > 0, runs[False]
    assert runs[False]["verdict"] == "REPRODUCED"


def test_unreachable_database_is_one_line_without_the_password() -> None:
    """An unreachable --db: exit 2, one line naming the URL (password masked) and the fix."""
    line = _one_line_error(_repro("--db", f"mysql://app:s3cret@127.0.0.1:{free_port()}/x"))
    assert "s3cret" not in line
    assert "app:***@127.0.0.1" in line
    assert "leave --db out" in line


def test_not_a_url() -> None:
    """--db that is not a URL: one line with an example of one."""
    assert "mysql://user:password@host" in _one_line_error(_repro("--db", "localhost"))


def test_missing_server_binary() -> None:
    """A uWSGI scenario without uwsgi: one line saying what to install or leave out."""
    line = _one_line_error(
        _repro("--server", "uwsgi-master", env={"FORKSAFE_UWSGI": "/nonexistent/uwsgi"})
    )
    assert "/nonexistent/uwsgi" in line


def test_port_in_use() -> None:
    """--port that something listens on: one line asking for another port; nothing started."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line_error(_repro("--server", "gunicorn-sync", "--port", str(port)))
    assert f"port {port} is in use" in line


def test_unknown_scenario_and_bad_numbers() -> None:
    """Unknown --server names and non-positive sizes are rejected up front."""
    assert "choose from gunicorn-sync" in _one_line_error(_repro("--server", "apache"))
    assert "--requests must be at least 1" in _one_line_error(_repro("--requests", "0"))


@pytest.mark.mariadb
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_stops_everything_it_started() -> None:
    """SIGINT in the middle of a run: exit 130 with one line, and the private MariaDB, the
    servers and their workers are all gone."""
    # A terminal delivers Ctrl-C to a program whose SIGINT is not ignored. A test run started
    # in the background of a non-interactive shell ignores SIGINT, and a child inherits that
    # across exec (Python then installs no KeyboardInterrupt handler), so hand the child the
    # default disposition: a Python handler here becomes SIG_DFL in the exec'd child.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [*COMMAND, "--server", "uwsgi-master,gunicorn-sync", "--rounds", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert process.stderr is not None
        seen: set[int] = set()
        # Wait for the ready signal: the progress line of the second run means a server
        # with its workers is up. Bounded only against a hang (readline blocks until then).
        while True:
            line = process.stderr.readline()
            assert line, "forksafe repro ended before it started a server"
            if line.startswith("[2/"):
                break
        # then remember everything below us until mariadbd, a server and its workers are
        # there (bounded generously: a busy machine is slow, and nothing here is timed)
        deadline = time.monotonic() + 300
        while len(seen) < 4 and time.monotonic() < deadline:
            seen |= _descendants(process.pid)
            time.sleep(0.1)
        assert len(seen) >= 4, f"no server with workers appeared in 300 s: {seen}"
        process.send_signal(signal.SIGINT)
        try:
            _out, err = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail("forksafe repro did not exit within 600 s of Ctrl-C")
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "interrupted; every server it started was stopped" in err
    assert "Traceback" not in err
    deadline = time.monotonic() + 120  # a bound against a leak, not a speed requirement
    while time.monotonic() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.2)
    assert not [p for p in seen if _alive(p)], "processes left running 120 s after Ctrl-C"
