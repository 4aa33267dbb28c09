"""The core guarantee, measured from the server side, with mysqlclient.

A parent holds a connection (idle in a tracked engine's pool, checked out at the moment of
fork, or a raw tracked connection). Its children end in every way a worker can end. The
parent's session must survive: same CONNECTION_ID(), answers, and the server never logged a
``Quit`` for it. Every case also runs *without* forksafe and must show the damage there,
or the protected half would prove nothing. The scenarios run in a fresh interpreter
(``scripts/driver_scenario.py``, shared with the driver matrix), three children a round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.scripts._child import mysql_session_id

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "driver_scenario.py"
ACTIONS = ["exit", "gc", "close", "dispose", "use", "sigterm"]
# This file's kinds, as driver_scenario.py names them.
SCRIPT_KIND = {"idle": "engine", "checkedout": "checkedout", "raw": "raw"}


def run_scenario(server: Any, *, kind: str, action: str, protect: bool, **extra: Any) -> dict:
    """Run the fork scenario script (mysqlclient, three children) and return its JSON report."""
    cmd = [sys.executable, str(SCRIPT), "--url", server.url(), "--kind", SCRIPT_KIND[kind],
           "--action", action, "--mode", "track" if protect else "none", "--children", "3"]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"scenario crashed: {done.stderr[-2000:]}"
    report: dict = json.loads(done.stdout)
    report["stderr"] = done.stderr[-8000:]  # what a failing child wrote, for the message
    return report


CASES = [(kind, action) for kind in ("idle", "checkedout", "raw") for action in ACTIONS
         if not (kind == "raw" and action == "dispose")]


@pytest.mark.parametrize(("kind", "action"), CASES)
def test_parent_session_survives_children(mariadb: Any, kind: str, action: str) -> None:
    """Children that exit, gc, close, dispose, use or are SIGTERMed never end the parent's session.

    Without forksafe the same children make the server log ``Quit`` for the parent's
    session and the parent's next query fails.
    """
    bare = run_scenario(mariadb, kind=kind, action=action, protect=False)
    assert mariadb.quit_logged(bare["parent_id"]), "unprotected: the children did not quit"
    assert bare["parent_error"] is not None, "unprotected: the parent's session survived"

    safe = run_scenario(mariadb, kind=kind, action=action, protect=True)
    assert safe["parent_error"] is None, safe["parent_error"]
    assert safe["after_id"] == safe["parent_id"], "the parent lost its connection"
    assert not mariadb.quit_logged(safe["parent_id"]), "a Quit reached the parent's session"
    assert safe["exit_codes"] == [0, 0, 0]
    assert safe["internal_errors"] == []
    assert all(c["internal_errors"] == [] for c in safe["children"])


@pytest.mark.parametrize("kind", ["idle", "checkedout"])
def test_child_queries_on_its_own_connection(mariadb: Any, kind: str) -> None:
    """A child's first query after fork runs on a new connection (different CONNECTION_ID()).

    Unprotected, a child with an idle pooled connection reuses the parent's session.
    """
    safe = run_scenario(mariadb, kind=kind, action="use", protect=True)
    child_ids = [c.get("inherited_id") for c in safe["children"]]
    assert all(isinstance(i, int) for i in child_ids), safe["children"]
    assert safe["parent_id"] not in child_ids
    assert len(set(child_ids)) == len(child_ids), "two children shared a session"
    if kind == "idle":
        bare = run_scenario(mariadb, kind=kind, action="use", protect=False)
        bare_ids = [c.get("inherited_id") for c in bare["children"]]
        # On the parent's one session the three children either read its id or, querying
        # it at the same moment, garble each other's replies (all three did, once)
        garbled = [c["inherited_error"] for c in bare["children"] if c.get("inherited_error")]
        assert bare["parent_id"] in bare_ids or len(garbled) >= 2, bare["children"]


def test_inherited_raw_connection_fails_fast_in_child(mariadb: Any) -> None:
    """A tracked raw connection used in the child fails at once with 2006, sending nothing."""
    safe = run_scenario(mariadb, kind="raw", action="use", protect=True)
    errors = [c.get("inherited_error", "") for c in safe["children"]]
    assert all("2006" in e for e in errors), errors
    assert safe["after_id"] == safe["parent_id"]


def test_no_descriptor_leak_over_repeated_forks(mariadb: Any) -> None:
    """Forking again and again grows neither the parent's nor the children's descriptor count."""
    report = run_scenario(mariadb, kind="idle", action="use", protect=True, forks=5)
    parent_counts = report["parent_fd_counts"]
    assert len(set(parent_counts)) == 1, parent_counts
    child_counts = [c["fd_count"] for c in report["children"]]
    assert len(child_counts) == 15
    assert max(child_counts) - min(child_counts) == 0, child_counts
    # a child holds the parent's descriptors (one of them now a dummy) plus its own new
    # connection: never more than a couple more than the parent
    assert max(child_counts) <= parent_counts[0] + 2, (child_counts, parent_counts)


THREAD_SCRIPT = Path(__file__).parent / "scripts" / "thread_fork_scenario.py"


def run_thread_scenario(server: Any, *, hold: str, fork: str, when: str = "before") -> dict:
    """Run thread_fork_scenario.py (a worker thread's connection, the main thread forks)."""
    cmd = [sys.executable, str(THREAD_SCRIPT), "--port", str(server.port), "--hold", hold,
           "--fork", fork, "--when", when]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"scenario crashed: {done.stderr[-2000:]}"
    report: dict = json.loads(done.stdout)
    report["stderr"] = done.stderr[-8000:]  # what a failing child wrote, for the message
    return report


@pytest.mark.parametrize("when", ["before", "window"])
@pytest.mark.parametrize("fork", ["os", "multiprocessing"])
@pytest.mark.parametrize(
    "hold", ["local", "process_local", "instrument", "engine", "instrumented_engine"]
)
def test_connection_held_by_another_thread_survives_fork(
    mariadb: Any, hold: str, fork: str, when: str
) -> None:
    """A connection only a worker thread references (a ``threading.local``, a per-thread
    ``ProcessLocal``, instrumented, a tracked engine's connection checked out inside a
    transaction, or an instrumented engine's checked-out connection) survives a fork made by
    the main thread, and the child sends nothing on it.

    In the child, CPython frees the other threads' state before any at-fork hook runs, so
    the connection is finalised there (mysqlclient sends COM_QUIT; a checked-out engine
    connection's pool wrapper rolls back: ``ROLLBACK`` in the worker's session, its
    transaction gone) unless forksafe holds it across the fork. The control, nothing
    tracked, shows the server's ``Quit`` and the worker's 2013.

    ``window``: the worker opens or checks out its connection after the forking thread's
    before-fork hooks ran and before the fork itself (which waits for the import lock a
    third thread holds meanwhile): forksafe had listed its holds already, and must hold
    this one too.
    """
    bare = run_thread_scenario(mariadb, hold="none", fork=fork, when=when)
    assert mariadb.quit_logged(bare["before_id"]), "control: the child did not quit"
    assert "2013" in bare.get("error", ""), bare

    safe = run_thread_scenario(mariadb, hold=hold, fork=fork, when=when)
    assert "error" not in safe, safe
    assert safe["after_id"] == safe["before_id"], safe
    assert not mariadb.quit_logged(safe["before_id"]), "a Quit reached the worker's session"
    # the worker's two queries and nothing in between (a child's ROLLBACK, say)
    assert _logged_since_first_id(mariadb, safe["before_id"]) == [SESSION_QUERY], safe
    assert safe["child_status"] == 0
    assert safe["internal_errors"] == []


SESSION_QUERY = "SELECT CONNECTION_ID()"


def _logged_since_first_id(server: Any, connection_id: int) -> list[str]:
    """What the server's general log shows session ``connection_id`` sent after its first
    ``SELECT CONNECTION_ID()``."""
    sent: list[str] = []
    for line in server.general_log().splitlines():
        fields = line.split("\t")
        # "<time>\t    12 Query\tSELECT 1" or "\t\t    12 Query\tSELECT 1"
        head = fields[-2].split() if len(fields) >= 2 else []
        if head[:1] == [str(connection_id)]:
            sent.append(" ".join([*head[1:], fields[-1].strip()]).removeprefix("Query "))
    first = sent.index(SESSION_QUERY) if SESSION_QUERY in sent else len(sent)
    return sent[first + 1:]


STALE_SCRIPT = Path(__file__).parent / "scripts" / "stale_fd_scenario.py"


def test_a_reused_descriptor_number_is_left_alone() -> None:
    """A tracked connection whose session was killed keeps reporting its old ``fileno()``;
    ``multiprocessing.Pipe()`` takes that number. forksafe must not replace the pipe in the
    child (its socket identity differs from the one recorded at track time) and says why in
    the log; the child's message reaches the parent.

    Control: replacing the descriptor by number, as forksafe did before, makes the child's
    ``send()`` fail (ENOTCONN) and the parent receive nothing.
    """
    from tests.conftest import start_mariadb

    server = start_mariadb()
    try:
        def run(mode: str) -> dict:
            cmd = [sys.executable, str(STALE_SCRIPT), "--port", str(server.port),
                   "--mode", mode]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                                  check=False)
            assert done.returncode == 0, f"scenario crashed: {done.stderr[-2000:]}"
            report: dict = json.loads(done.stdout)
            assert report["query_error"] == 2013, report
            assert report["open"], "mysqlclient no longer reports a dead connection open"
            assert report["stale_fd"] in report["pipe_fds"], "the number was not reused"
            return report

        control = run("control")
        assert control["received"] is None, control
        assert control["child_exitcode"] != 0, control

        safe = run("safe")
        assert safe["received"] is not None, safe
        assert safe["received"]["message"] == "hello from the child"
        assert safe["child_exitcode"] == 0
        assert safe["internal_errors"] == []
        skipped = [m for m in safe["received"]["log"] if "left descriptor" in m]
        assert skipped, safe["received"]["log"]
        assert "number reused" in skipped[0]
    finally:
        server.cleanup()


def _track_with(conn: Any, socket_fd: Any) -> None:
    """Track ``conn`` with mysqlclient's driver, its socket accessor replaced."""
    import dataclasses

    from forksafe._registry import REGISTRY, ConnectionEntry
    from forksafe.drivers import DRIVERS

    base = next(d for d in DRIVERS if d.name == "mysqlclient")
    driver = dataclasses.replace(base, socket_fd=socket_fd)
    REGISTRY.add_connection(conn, ConnectionEntry(driver=driver, pid=os.getpid(),
                                                  origin="test"))


def test_a_socket_accessor_that_fails_is_never_read_as_closed(mariadb: Any) -> None:
    """A driver whose socket accessor raises in the child (an API that moved; mysqlclient
    refusing ``fileno()`` on a connection another thread was using at the fork) is never
    read as "closed": the descriptor recorded when the connection was tracked, provably
    still its socket, is neutralised (a warning says so) and the child's ``close()`` does
    not reach the parent's session. An accessor that never worked (nothing was recorded) is
    reported as an internal error, and the object is kept alive.

    Control: reading the failure as "closed" (the accessor says None in the child) lets the
    child's ``close()`` send the Quit that ends the parent's session.
    """
    import logging

    import MySQLdb

    import forksafe
    from forksafe.drivers import DRIVERS
    from tests.forking import run_in_child

    base = next(d for d in DRIVERS if d.name == "mysqlclient")
    parent = os.getpid()

    def drifted(conn: Any) -> int | None:
        if os.getpid() != parent:
            raise AttributeError("'Connection' object has no attribute 'fileno'")
        return base.socket_fd(conn)

    def closed_in_child(conn: Any) -> int | None:
        return None if os.getpid() != parent else base.socket_fd(conn)

    def always_fails(conn: Any) -> int | None:
        raise AttributeError("'Connection' object has no attribute 'fileno'")

    def in_child(conn: Any, *, close: bool, allow_errors: bool = False) -> dict:
        messages: list[str] = []  # the child's forksafe log (the handler is inherited)

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                messages.append(record.getMessage())

        def child() -> dict:
            if close:
                conn.close()
            return {"errors": [repr(e) for e in forksafe.internal_errors()], "log": messages}

        handler = Keep()
        logging.getLogger("forksafe").addHandler(handler)
        try:
            result: dict = run_in_child(child, allow_internal_errors=allow_errors)
        finally:
            logging.getLogger("forksafe").removeHandler(handler)
        return result

    control = MySQLdb.connect(**mariadb.connect_kwargs(), autocommit=True)
    _track_with(control, closed_in_child)
    control_id = mysql_session_id(control)
    in_child(control, close=True)
    assert mariadb.quit_logged(control_id), "control: the child's close() did not quit"
    with pytest.raises(MySQLdb.OperationalError):
        mysql_session_id(control)

    conn = MySQLdb.connect(**mariadb.connect_kwargs(), autocommit=True)
    _track_with(conn, drifted)
    cid = mysql_session_id(conn)
    result = in_child(conn, close=True)  # run_in_child: the child reported no internal error
    assert any("could not tell" in m and "neutralised descriptor" in m for m in result["log"])
    assert mysql_session_id(conn) == cid
    assert not mariadb.quit_logged(cid), "a Quit reached the parent's session"

    blind = MySQLdb.connect(**mariadb.connect_kwargs(), autocommit=True)
    _track_with(blind, always_fails)
    blind_id = mysql_session_id(blind)
    result = in_child(blind, close=False, allow_errors=True)
    assert any("has no attribute 'fileno'" in e for e in result["errors"]), result
    assert mysql_session_id(blind) == blind_id
    assert not mariadb.quit_logged(blind_id)
    for c in (conn, blind):
        c.close()


PROPERTY_SCRIPT = Path(__file__).parent / "scripts" / "thread_fork_property.py"


def run_property(mariadb: Any, postgres: Any, seed: int, *, control: bool = False) -> dict:
    cmd = [sys.executable, str(PROPERTY_SCRIPT), "--mysql-port", str(mariadb.port),
           "--pg-port", str(postgres.port), "--seed", str(seed)]
    if control:
        cmd.append("--control")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"property run crashed: {done.stderr[-3000:]}"
    report: dict = json.loads(done.stdout)
    report["stderr"] = done.stderr[-8000:]  # what a failing child wrote, for the message
    return report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forks_while_threads_use_connections_lose_nothing(
    mariadb: Any, postgres: Any, seed: int
) -> None:
    """Seeded property run (scripts/thread_fork_property.py): the main thread forks again
    and again while worker threads open, use, hold and close raw and engine connections of
    all four drivers, through track(), instrument() and error reporting. No child hangs or
    reports an internal error, no worker loses its session, nothing is reported in the
    parent. The control (seed 0 without forksafe) always loses the sentinel thread's
    session (a raw connection held in a ``threading.local`` across every fork); what else it
    loses depends on the interleaving and is not asserted."""
    report = run_property(mariadb, postgres, seed)
    assert report["children"] == [0] * len(report["children"]), report
    assert report["problems"] == [], report["problems"]
    assert report["alive_threads"] == 0
    assert report["internal_errors"] == []
    if seed == 0:
        control = run_property(mariadb, postgres, seed, control=True)
        assert any(p.startswith("sentinel:") for p in control["problems"]), control


EARLY_HOOK_SCRIPT = Path(__file__).parent / "scripts" / "early_hook_scenario.py"


def test_an_app_hook_that_runs_before_forksafes_disposes_safely(mariadb: Any) -> None:
    """The app registered ``os.register_at_fork(after_in_child=engine.dispose)``-style code
    before importing forksafe, so in the child it runs before forksafe's reset. Disposing
    of the tracked engine there resets the process first: nothing reaches the parent's
    session. The control, the engine untracked: ``Quit`` and the parent's 2013."""

    def run(mode: str) -> dict:
        done = subprocess.run(
            [sys.executable, str(EARLY_HOOK_SCRIPT), "--url", mariadb.url(), "--mode", mode],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        report: dict = json.loads(done.stdout)
        return report

    bare = run("none")
    assert mariadb.quit_logged(bare["before_id"]), "control: the child's dispose did not quit"
    assert "2013" in bare.get("error", ""), bare

    safe = run("track")
    assert "error" not in safe, safe
    assert safe["after_id"] == safe["before_id"], safe
    assert not mariadb.quit_logged(safe["before_id"]), "a Quit reached the parent's session"
    assert safe["child_status"] == 0
    assert safe["internal_errors"] == [], safe
    assert safe["child_internal_errors"] == [], safe


TRACK_IN_CHILD_SCRIPT = Path(__file__).parent / "scripts" / "track_in_child.py"


@pytest.mark.parametrize("kind", ["engine", "raw"])
def test_track_called_in_the_child_never_adopts_the_parents_session(
    mariadb: Any, kind: str
) -> None:
    """``forksafe.track()`` in a child (a pool initializer, Celery's
    ``worker_process_init``) on an engine or raw connection the parent opened and never
    tracked: the parent's connection it holds is neutralised, not adopted. The engine's
    query runs on a session of the child's own, and the child's dispose() / close() sends
    nothing on the parent's. The control (no track): the child shares the parent's session
    and ends it."""

    def run(mode: str) -> dict:
        done = subprocess.run(
            [sys.executable, str(TRACK_IN_CHILD_SCRIPT), "--port", str(mariadb.port),
             "--kind", kind, "--mode", mode],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        report: dict = json.loads(done.stdout)
        report["stderr"] = done.stderr[-4000:]
        return report

    bare = run("none")
    assert mariadb.quit_logged(bare["before_id"]), "control: the child did not quit"
    assert "2013" in bare.get("error", ""), bare
    if kind == "engine":
        assert bare["child"]["id"] == bare["before_id"], "control: the child had its own session"

    safe = run("track")
    assert "error" not in safe, safe
    assert "error" not in safe["child"], safe["child"]
    assert safe["after_id"] == safe["before_id"], safe
    assert not mariadb.quit_logged(safe["before_id"]), "a Quit reached the parent's session"
    if kind == "engine":
        assert safe["child"]["id"] != safe["before_id"], safe
    assert "inherited from its parent" in safe["stderr"], safe["stderr"]
    assert safe["internal_errors"] == [], safe
    assert safe["child"]["internal_errors"] == [], safe
