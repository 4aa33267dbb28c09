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

``--when window`` makes the worker open (or check out) its connection *while the fork is
under way*: after the main thread's before-fork hooks have run (forksafe's listed what to
hold) and before the fork itself, which waits meanwhile for the import lock a third thread
holds. A hook registered before forksafe's (so it runs after it) opens that window; the
third thread lets the import lock go once the worker has its connection.

Every step waits for a signal from the other thread; nothing is timed. Prints one JSON
object: the worker's session id before and after, its error if any, the child's exit
status and this process's internal errors; then leaves with ``os._exit`` so that any
``Quit`` in the server's log for the worker's session came from the child.
"""

from __future__ import annotations

import _imp
import argparse
import json
import os
import threading

# Registered before forksafe's own hook, so it runs after it: forksafe has listed what to
# hold across this fork when the worker is told to go ahead.
fork_under_way = threading.Event()
os.register_at_fork(before=fork_under_way.set)

import MySQLdb  # noqa: E402
from _child import mysql_session_id  # noqa: E402

import forksafe  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--hold", choices=["local", "process_local", "instrument", "engine",
                                       "instrumented_engine", "none"])
parser.add_argument("--fork", choices=["os", "multiprocessing"], default="os")
parser.add_argument("--when", choices=["before", "window"], default="before")
args = parser.parse_args()

WAIT = 60.0  # bounded waits: a failure shows as an error, never a hang


def connect() -> MySQLdb.connections.Connection:
    return MySQLdb.connect(host="127.0.0.1", port=args.port, user="root", autocommit=True)


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


def open_connection() -> None:
    if args.hold in ("engine", "instrumented_engine"):
        local.sa = engine.connect()
        if args.hold == "engine":
            local.sa.begin()
    elif args.hold != "process_local":
        local.conn = connect()
        if args.hold == "local":
            forksafe.track(local.conn)
    report["before_id"] = mysql_session_id(get())


engine = None
if args.hold in ("engine", "instrumented_engine"):
    from sqlalchemy import create_engine

    engine = create_engine(f"mysql+mysqldb://root@127.0.0.1:{args.port}/", pool_size=1)
    if args.hold == "engine":
        forksafe.track(engine)
if args.when == "window":
    # Everything the worker does in the window runs once beforehand, so that it needs no
    # import then (the import lock is taken) and its pooled connection is an idle one.
    warm = connect()
    forksafe.track(warm)
    mysql_session_id(warm)
    forksafe.untrack(warm)
    warm.close()
    if engine is not None:
        with engine.connect() as conn:  # not the query the test reads the log from
            conn.exec_driver_sql("SELECT 1")
    if args.fork == "multiprocessing":
        import multiprocessing.popen_fork  # Process.start() imports it: not in the window
import_lock_held = threading.Event()
worker_ready = threading.Event()


def lock_imports() -> None:
    """Hold the import lock until the worker has its connection: os.fork() waits for it
    after its before-fork hooks ran."""
    _imp.acquire_lock()
    try:
        import_lock_held.set()
        if not worker_ready.wait(WAIT):
            report["error"] = "the worker never opened its connection in the window"
    finally:
        _imp.release_lock()


def worker() -> None:
    try:
        if args.when == "window" and not fork_under_way.wait(WAIT):
            raise RuntimeError("the main thread never started its fork")
        open_connection()
    except Exception as exc:
        report["error"] = repr(exc)
    opened.set()
    worker_ready.set()
    if not forked.wait(WAIT):
        report["error"] = "the main thread never forked"
        return
    try:
        report["after_id"] = mysql_session_id(get())
    except Exception as exc:
        report["error"] = repr(exc)
    reported.set()
    never.wait()


thread = threading.Thread(target=worker, daemon=True)
thread.start()
if args.when == "window":
    threading.Thread(target=lock_imports, daemon=True).start()
    if not import_lock_held.wait(WAIT):
        raise SystemExit("the import lock was never taken")
elif not opened.wait(WAIT):
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
