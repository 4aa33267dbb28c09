"""Server restart and KILL CONNECTION under load from several processes.

Three worker processes use a tracked engine with ``forksafe.retry_on_disconnect``; one uses
a plain engine without retry, in the same run, to show what the fault does without
forksafe. Checks: no wrong answer, no error reaches a forksafe worker, reads recover once
the server is back, every acknowledged write is present exactly once, nothing is
duplicated; the plain worker sees errors.
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
SECONDS = 10.0
KILLS = 10


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


def start_workers(server: Any) -> list[subprocess.Popen[str]]:
    procs = []
    for worker in range(4):
        mode = "plain" if worker == 3 else "forksafe"
        url = server.url()
        if mode == "plain":
            url = url.replace("root@", "plain@")
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--url", url, "--mode", mode, "--worker",
             str(worker), "--seconds", str(SECONDS), "--rows", str(ROWS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def collect(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
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


def test_restart_under_load(server: Any) -> None:
    """The server restarts (down ~1 s) while four processes read and write."""
    procs = start_workers(server)
    time.sleep(2.5)
    server.restart(down_for=1.0)
    fault_over = time.time()
    results = collect(procs)
    check(server, results, fault_over)


def test_kill_connection_under_load(server: Any) -> None:
    """Random sessions are KILLed (forksafe's and the plain worker's, alternately) under load.

    The killing starts once the workers' sessions exist (on a loaded machine the workers take
    a while to start) and stops after KILLS kills, leaving the workers time to show recovery.
    """
    procs = start_workers(server)
    kills: list[tuple[str, int]] = []
    last_kill = [time.time()]

    def sessions(user: str) -> list[int]:
        return [int(r[0]) for r in server.execute(
            "SELECT ID FROM information_schema.PROCESSLIST "
            f"WHERE USER = '{user}' AND ID <> CONNECTION_ID() AND DB = 'forksafe'")]

    def killer() -> None:
        deadline = time.monotonic() + 30
        while not (sessions("root") and sessions("plain")):
            if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
                return
            time.sleep(0.05)
        turn = 0
        while len(kills) < KILLS and any(p.poll() is None for p in procs):
            user = "plain" if turn % 2 else "root"
            turn += 1
            ids = sessions(user)
            if ids:
                victim = random.choice(ids)
                try:
                    server.execute(f"KILL CONNECTION {victim}")
                    kills.append((user, victim))
                    last_kill[0] = time.time()
                except Exception:  # the session may have ended on its own
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = collect(procs)
    thread.join()
    assert len(kills) >= KILLS, f"only {len(kills)} sessions were killed: {kills}"
    assert {user for user, _ in kills} == {"root", "plain"}
    check(server, results, last_kill[0])
