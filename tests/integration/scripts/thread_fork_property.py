"""Forks while other threads open, use, hold and close connections: a seeded property run.

Worker threads each follow a sequence of steps drawn from ``random.Random(seed + n)``: open
a connection (raw, or a checkout from an engine; mysqlclient, PyMySQL, psycopg2, psycopg 3),
``track()`` it or leave it to ``instrument()``, query it (its server session id must be the
one it had when opened), hold it in the thread's ``threading.local`` for a while, close it,
or report an error through ``forksafe.errors.report``. Meanwhile the main thread forks
``--forks`` times; each child does one of: exit at once, ``gc.collect()`` and exit, open
and use a connection of its own from a tracked engine. The parent waits for each child
(bounded) and at the end every worker checks each connection it still holds.

Properties (printed as one JSON object): no child hangs or fails (each reports its own
``forksafe.internal_errors()``, which must be empty), no worker ever sees another session
id or an error on a connection it holds (the parent lost no session), and the parent's
``internal_errors()`` stays empty. ``--control`` runs the same without forksafe: the
parent then loses sessions, always the sentinel's (a thread holding one connection
throughout; see ``sentinel``), and workers' sessions or whole workers (a worker blocked on
a reply a child read) as the interleaving happens to fall. Nothing is timed: threads start
and stop on events; a wait that runs out is a failure, reported as such.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import random
import select
import signal
import threading
import time
import traceback
from typing import Any

import forksafe
from forksafe import errors

parser = argparse.ArgumentParser()
parser.add_argument("--mysql-port", type=int, required=True)
parser.add_argument("--pg-port", type=int, required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--forks", type=int, default=12)
parser.add_argument("--threads", type=int, default=4)
parser.add_argument("--control", action="store_true",
                    help="no instrument(), no track(): the same run without forksafe")
args = parser.parse_args()

WAIT = 120.0
faulthandler.enable()  # a child stuck past WAIT gets SIGABRT: its stacks go to stderr
if not args.control:
    forksafe.instrument()

from sqlalchemy import create_engine, text  # noqa: E402 - after instrument(), on purpose

MYSQL = {"host": "127.0.0.1", "port": args.mysql_port, "user": "root"}
PG = {"host": "127.0.0.1", "port": args.pg_port, "user": "postgres", "dbname": "postgres"}
DRIVERS = ["mysqldb", "pymysql", "psycopg2", "psycopg"]
# PyMySQL 1.1+ builds a TLS context for every connection, even against a server without TLS
# (the private one here). A child connecting while a parent thread was inside OpenSSL at the
# fork can hang on OpenSSL's locks, with or without forksafe (README, "What happens to
# inherited connections"): a hazard of forking threads that this run does not measure.
PYMYSQL_NO_TLS = {"ssl_disabled": True}
SESSION_SQL = {"mysql": "SELECT CONNECTION_ID()", "pg": "SELECT pg_backend_pid()"}


def family(driver: str) -> str:
    return "mysql" if driver in ("mysqldb", "pymysql") else "pg"


def raw_connect(driver: str) -> Any:
    if driver == "mysqldb":
        import MySQLdb

        return MySQLdb.connect(**MYSQL, autocommit=True)
    if driver == "pymysql":
        import pymysql

        return pymysql.connect(**MYSQL, autocommit=True, **PYMYSQL_NO_TLS)
    if driver == "psycopg2":
        import psycopg2

        conn = psycopg2.connect(**PG)
        conn.autocommit = True
        return conn
    import psycopg

    return psycopg.connect(**PG, autocommit=True)


def engine_url(driver: str) -> str:
    if family(driver) == "mysql":
        return f"mysql+{driver}://root@127.0.0.1:{args.mysql_port}/"
    return f"postgresql+{driver}://postgres@127.0.0.1:{args.pg_port}/postgres"


ENGINES: dict[str, Any] = {}
for _driver in DRIVERS:
    try:
        ENGINES[_driver] = create_engine(
            engine_url(_driver), pool_size=3, max_overflow=10,
            connect_args=PYMYSQL_NO_TLS if _driver == "pymysql" else {})
    except Exception:  # SQLAlchemy 1.4 has no psycopg 3 dialect: raw connections only
        continue


class Held:
    """One connection a worker holds, and the session it must keep."""

    def __init__(self, driver: str, kind: str, conn: Any) -> None:
        self.driver, self.kind, self.conn = driver, kind, conn
        self.session = self.query()

    def query(self) -> int:
        sql = SESSION_SQL[family(self.driver)]
        if self.kind == "engine":
            return int(self.conn.execute(text(sql)).scalar())
        cur = self.conn.cursor()
        cur.execute(sql)
        (value,) = cur.fetchone()
        cur.close()
        return int(value)

    def close(self) -> None:
        self.conn.close()


local = threading.local()
stop = threading.Event()
started = threading.Barrier(args.threads + 2)  # workers, sentinel, main
problems: list[str] = []
steps = [0] * args.threads
progress = threading.Condition()  # workers notify after each step


def worker(n: int) -> None:
    rng = random.Random(args.seed * 1000 + n)
    local.held = []
    try:
        started.wait(WAIT)
        while not stop.is_set():
            with progress:
                steps[n] += 1
                progress.notify_all()
            action = rng.choice(["open", "open", "use", "use", "close", "report"])
            if action == "open" and len(local.held) < 4:
                driver = rng.choice(DRIVERS)
                if rng.random() < 0.5 or driver not in ENGINES:
                    conn = raw_connect(driver)
                    if rng.random() < 0.5 and not args.control:
                        forksafe.track(conn)  # else instrument() tracked it
                    local.held.append(Held(driver, "raw", conn))
                else:
                    local.held.append(Held(driver, "engine", ENGINES[driver].connect()))
            elif action == "use" and local.held:
                held = rng.choice(local.held)
                now = held.query()
                if now != held.session:
                    problems.append(f"thread {n}: {held.driver} {held.kind} session "
                                    f"{held.session} became {now}")
            elif action == "close" and local.held:
                local.held.pop(rng.randrange(len(local.held))).close()
            elif action == "report":
                errors.report(ConnectionRefusedError(111, "Connection refused"))
                errors.reset_reported()
        for held in local.held:  # the end: everything still held must be the same session
            now = held.query()
            if now != held.session:
                problems.append(f"thread {n} at the end: {held.driver} {held.kind} session "
                                f"{held.session} became {now}")
    except Exception:
        problems.append(f"thread {n}: {traceback.format_exc()}")
    finally:
        with progress:
            progress.notify_all()


def sentinel() -> None:
    """Holds one raw mysqlclient connection, referenced only by this thread's
    ``threading.local``, from before the first fork to the end, using it only then: the
    deterministic case of the run. Without forksafe the first child finalises it (CPython
    frees the other threads' state in a child; mysqlclient sends COM_QUIT), so the control
    always loses this session, whatever the workers happened to hold at each fork."""
    try:
        local.held = [Held("mysqldb", "raw", raw_connect("mysqldb"))]
        started.wait(WAIT)
        stop.wait()
        (held,) = local.held
        now = held.query()
        if now != held.session:
            problems.append(f"sentinel: session {held.session} became {now}")
    except Exception:
        problems.append(f"sentinel: {traceback.format_exc()}")


def child(rng: random.Random) -> int:
    """What a child does; returns its exit status (0: fine)."""
    try:
        what = rng.choice(["exit", "gc", "use"])
        driver = rng.choice(sorted(ENGINES)) if what == "use" else ""
        os.write(2, f"child {os.getpid()}: {what} {driver}\n".encode())  # for a failure report
        if what == "gc":
            gc.collect()
        elif what == "use":
            with ENGINES[driver].connect() as conn:
                conn.execute(text("SELECT 1"))
        if forksafe.internal_errors():
            os.write(2, f"child internal errors: {forksafe.internal_errors()!r}\n".encode())
            return 3
        return 0
    except BaseException:
        os.write(2, traceback.format_exc().encode())
        return 4


def wait_child(pid: int, done_fd: int) -> int | None:
    """The child's exit status, or None if it did not finish within WAIT (then killed,
    after SIGABRT has made faulthandler write where it was stuck to the captured stderr)."""
    ready, _, _ = select.select([done_fd], [], [], WAIT)
    if not ready:
        os.kill(pid, signal.SIGABRT)
        if not select.select([done_fd], [], [], WAIT)[0]:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(args.threads)]
threads.append(threading.Thread(target=sentinel, daemon=True))
for t in threads:
    t.start()
started.wait(WAIT)
fork_rng = random.Random(args.seed)
children: list[int | None] = []
for _ in range(args.forks):
    # let the workers get some steps in between forks (a count, not a duration)
    target = sum(steps) + args.threads * fork_rng.randint(1, 4)
    with progress:
        if not progress.wait_for(lambda t=target: sum(steps) >= t or bool(problems), WAIT):
            problems.append("the workers made no progress")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os._exit(child(fork_rng))  # the write end closes on exit: the parent's signal
    os.close(write_fd)
    children.append(wait_child(pid, read_fd))
    os.close(read_fd)
stop.set()
deadline = time.monotonic() + WAIT  # one bound for all: a hung worker is reported, not waited for
for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
report = {
    "children": children,
    "problems": problems,
    "alive_threads": sum(t.is_alive() for t in threads),
    "steps": sum(steps),
    "internal_errors": [repr(e) for e in forksafe.internal_errors()],
}
print(json.dumps(report), flush=True)
os._exit(0)
