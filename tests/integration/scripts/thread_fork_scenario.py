"""A connection held by another thread than the forking one, in a fresh interpreter.

A worker thread opens a mysqlclient connection and keeps it *only* where that thread can
see it; the main thread forks a child that does nothing but ``os._exit(0)``; then the
worker uses its connection again. ``--hold`` says where the worker keeps it:

* ``local``: a ``threading.local``, the connection passed to ``forksafe.track``;
* ``process_local``: ``forksafe.ProcessLocal(factory, per_thread=True)``;
* ``instrument``: a ``threading.local``, with ``forksafe.instrument()`` on (no track call);
* ``engine``: a ``threading.local`` holding a checked-out ``Connection`` of a tracked
  engine, inside a transaction;
* ``instrumented_engine``: the same with ``forksafe.instrument()`` on and no track call
  (instrument() records the DBAPI connection when the driver makes it, before the pool
  does);
* ``none``: a ``threading.local``, nothing tracked (the control: the child kills it).

Every step waits for a signal from the other thread; nothing is timed. Prints one JSON
object: the worker's session id before and after, its error if any, the child's exit
status and this process's internal errors; then leaves with ``os._exit`` so that any
``Quit`` in the server's log for the worker's session came from the child.
"""

from __future__ import annotations

import argparse
import json
import os
import threading

import MySQLdb

import forksafe

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--hold", choices=["local", "process_local", "instrument", "engine",
                                       "instrumented_engine", "none"])
parser.add_argument("--fork", choices=["os", "multiprocessing"], default="os")
args = parser.parse_args()

WAIT = 60.0  # bounded waits: a failure shows as an error, never a hang


def connect() -> MySQLdb.connections.Connection:
    return MySQLdb.connect(host="127.0.0.1", port=args.port, user="root", autocommit=True)


def session_id(conn: MySQLdb.connections.Connection) -> int:
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (cid,) = cur.fetchone()
    cur.close()
    return int(cid)


if args.hold in ("instrument", "instrumented_engine"):
    forksafe.instrument()
local = threading.local()
per_thread = forksafe.ProcessLocal(connect, per_thread=True)
opened = threading.Event()
forked = threading.Event()
reported = threading.Event()
never = threading.Event()  # the worker keeps its connection until the process leaves
report: dict = {}


def get() -> MySQLdb.connections.Connection:
    if args.hold == "process_local":
        return per_thread.get()
    if args.hold in ("engine", "instrumented_engine"):  # a checked-out engine connection
        return local.sa.connection.dbapi_connection
    return local.conn  # type: ignore[no-any-return]


def worker() -> None:
    try:
        if args.hold in ("engine", "instrumented_engine"):
            from sqlalchemy import create_engine

            engine = create_engine(f"mysql+mysqldb://root@127.0.0.1:{args.port}/", pool_size=1)
            if args.hold == "engine":
                forksafe.track(engine)
            local.sa = engine.connect()
            if args.hold == "engine":
                local.sa.begin()
        elif args.hold != "process_local":
            local.conn = connect()
            if args.hold == "local":
                forksafe.track(local.conn)
        report["before_id"] = session_id(get())
    except Exception as exc:
        report["error"] = repr(exc)
    opened.set()
    if not forked.wait(WAIT):
        report["error"] = "the main thread never forked"
        return
    try:
        report["after_id"] = session_id(get())
    except Exception as exc:
        report["error"] = repr(exc)
    reported.set()
    never.wait()


thread = threading.Thread(target=worker, daemon=True)
thread.start()
if not opened.wait(WAIT):
    raise SystemExit("the worker never opened its connection")

if args.fork == "os":
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    report["child_status"] = status
else:
    import multiprocessing

    process = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    process.start()
    process.join(WAIT)
    report["child_status"] = process.exitcode
forked.set()
if not reported.wait(WAIT):
    report["error"] = "the worker never used its connection again"
report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
print(json.dumps(report), flush=True)
os._exit(0)  # the parent never says goodbye: a Quit in the server's log came from the child
