"""Server restart and KILL CONNECTION under load from several processes.

Three worker processes use a tracked engine with ``forksafe.retry_on_disconnect``; one uses
a plain engine without retry, in the same run, to show what the fault does without
forksafe. Checks: no wrong answer, no error reaches a forksafe worker, reads recover once
the server is back, every acknowledged write is present exactly once, nothing is
duplicated; the plain worker sees errors.

No step waits for a time to pass: the fault starts once every worker's session is on the
server, and the workers stop (a stop file) once the server has received writes from each of
them after the fault, so a slow machine only makes the test longer.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_mariadb

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

WORKER = Path(__file__).parent / "scripts" / "stale_worker.py"
ROWS = 100
SECONDS = 150.0  # a cap only: the workers stop when the test creates the stop file
KILLS = 10
WRITES_AFTER = 20  # writes each worker must land after the fault before the workers stop


@pytest.fixture
def server() -> Iterator[Any]:
    """A private MariaDB with the kv (known answers) and writes tables, and a 'plain' user."""
    srv = start_mariadb()
    srv.execute("CREATE TABLE forksafe.kv (k INT PRIMARY KEY, v INT NOT NULL)")
    values = ", ".join(f"({k}, {k * 7})" for k in range(1, ROWS + 1))
    srv.execute(f"INSERT INTO forksafe.kv VALUES {values}")
    # No unique key: a duplicated write must stay visible.
    srv.execute("CREATE TABLE forksafe.writes (id INT AUTO_INCREMENT PRIMARY KEY, "
                "worker INT NOT NULL, seq INT NOT NULL)")
    srv.execute("CREATE USER plain@'%'")
    srv.execute("GRANT ALL ON forksafe.* TO plain@'%'")
    yield srv
    srv.cleanup()


def start_workers(server: Any, stop_file: Path) -> list[subprocess.Popen[str]]:
    procs = []
    for worker in range(4):
        mode = "plain" if worker == 3 else "forksafe"
        url = server.url()
        if mode == "plain":
            url = url.replace("root@", "plain@")
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--url", url, "--mode", mode, "--worker",
             str(worker), "--seconds", str(SECONDS), "--rows", str(ROWS),
             "--stop-file", str(stop_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def wait_until(condition: Any, what: str, procs: list[subprocess.Popen[str]],
               timeout: float = 120.0) -> None:
    """Poll ``condition()``; fail naming ``what`` on timeout or when a worker died."""
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            pytest.fail(f"a worker exited while waiting until {what}: "
                        f"{dead[0].communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f}s waiting until {what}")
        time.sleep(0.1)


def sessions(server: Any, user: str) -> list[int]:
    return [int(r[0]) for r in server.execute(
        "SELECT ID FROM information_schema.PROCESSLIST "
        f"WHERE USER = '{user}' AND ID <> CONNECTION_ID() AND DB = 'forksafe'")]


def last_write(server: Any) -> int:
    return int(server.execute("SELECT COALESCE(MAX(id), 0) FROM forksafe.writes")[0][0])


def every_worker_wrote_since(server: Any, mark: int, writes: int = WRITES_AFTER) -> bool:
    """Whether each of the four workers landed ``writes`` writes after row id ``mark``."""
    rows = server.execute(f"SELECT worker, COUNT(*) FROM forksafe.writes WHERE id > {mark} "
                          "GROUP BY worker")
    counts = {int(w): int(n) for w, n in rows}
    return all(counts.get(worker, 0) >= writes for worker in range(4))


def collect(procs: list[subprocess.Popen[str]], stop_file: Path) -> list[dict[str, Any]]:
    stop_file.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def check(server: Any, results: list[dict[str, Any]], fault_over: float) -> None:
    rows = server.execute("SELECT worker, seq, COUNT(*) FROM forksafe.writes "
                          "GROUP BY worker, seq")
    stored = {(int(w), int(s)): int(n) for w, s, n in rows}
    duplicated = {key: n for key, n in stored.items() if n > 1}
    assert duplicated == {}, f"writes applied more than once: {duplicated}"
    plain = [r for r in results if r["mode"] == "plain"]
    for r in results:  # shown with -s / on failure
        print(f"worker {r['worker']} {r['mode']}: reads {r['reads_ok']} wrong {r['wrong']} "
              f"acked {len(r['acked'])} unknown {len(r['unknown'])} errors {r['errors']}")
    safe = [r for r in results if r["mode"] == "forksafe"]
    for r in results:
        assert r["wrong"] == 0, r
        missing = [s for s in r["acked"] if (r["worker"], s) not in stored]
        assert missing == [], f"worker {r['worker']}: acknowledged writes missing: {missing}"
    for r in safe:
        assert r["errors"] == {}, f"an error reached a forksafe worker: {r['errors']}"
        after = [t for t in r["read_times"] if t > fault_over]
        assert len(after) > 10, "reads recover once the server is back"
    assert sum(sum(r["errors"].values()) for r in plain) > 0, (
        "without forksafe the fault must reach the caller"
    )


def test_restart_under_load(server: Any, tmp_path: Path) -> None:
    """The server restarts (down ~1 s) while four processes read and write."""
    stop_file = tmp_path / "stop"
    procs = start_workers(server, stop_file)
    try:
        wait_until(lambda: every_worker_wrote_since(server, 0, writes=1),
                   "every worker is running (has written)", procs)
        server.restart(down_for=1.0)
        fault_over = time.time()
        mark = last_write(server)
        wait_until(lambda: every_worker_wrote_since(server, mark),
                   f"every worker landed {WRITES_AFTER} writes after the restart", procs)
    finally:
        results = collect(procs, stop_file)
    check(server, results, fault_over)


def test_kill_connection_under_load(server: Any, tmp_path: Path) -> None:
    """Random sessions are KILLed (forksafe's and the plain worker's, alternately) under load.

    The killing starts once every worker has written (on a loaded machine the workers take a
    while to start) and stops after KILLS kills; the workers stop once each has landed
    writes after the last kill.
    """
    stop_file = tmp_path / "stop"
    procs = start_workers(server, stop_file)
    kills: list[tuple[str, int]] = []
    last_kill = [time.time()]

    def killer() -> None:
        turn = 0
        while len(kills) < KILLS and any(p.poll() is None for p in procs):
            user = "plain" if turn % 2 else "root"
            turn += 1
            ids = sessions(server, user)
            if ids:
                victim = random.choice(ids)
                try:
                    server.execute(f"KILL CONNECTION {victim}")
                    kills.append((user, victim))
                    last_kill[0] = time.time()
                except Exception:  # the session may have ended on its own
                    pass
            time.sleep(0.2)

    try:
        wait_until(lambda: every_worker_wrote_since(server, 0, writes=1),
                   "every worker is running (has written)", procs)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        thread.join(timeout=120)
        mark = last_write(server)
        wait_until(lambda: every_worker_wrote_since(server, mark),
                   f"every worker landed {WRITES_AFTER} writes after the last kill", procs)
    finally:
        results = collect(procs, stop_file)
    assert len(kills) >= KILLS, f"only {len(kills)} sessions were killed: {kills}"
    assert {user for user, _ in kills} == {"root", "plain"}
    check(server, results, last_kill[0])
