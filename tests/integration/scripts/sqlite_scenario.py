"""One fork scenario for a SQLite file database, in a fresh interpreter.

The parent's engine holds a write transaction open across the fork (a ``Connection`` with
2000 uncommitted rows, enough to spill into the journal), with ``--journal delete`` (a
rollback journal) or ``wal``. One child ends one way (``exit``, ``gc``, ``close``,
``dispose``, ``use`` (the engine), ``use_held`` (the held ``Connection``), ``sigterm``),
then the parent commits and a fresh ``sqlite3`` connection checks the file: the rows are
there and ``PRAGMA integrity_check`` says ok.

SQLite's own documentation warns against carrying a connection across fork: the child's
copy of the connection thinks it holds the parent's locks and journal, and closing it rolls
back, deleting the parent's journal. ``--mode none`` shows that; ``--mode track`` protects
the engine with ``forksafe.track``. ``--aio`` does the same through aiosqlite and
an ``AsyncEngine``. Prints one JSON object and leaves with ``os._exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time

import forksafe

ROWS = 2000
STATE: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["none", "track"], required=True)
    parser.add_argument("--action", required=True)
    parser.add_argument("--journal", choices=["delete", "wal"], default="delete")
    parser.add_argument("--memory", action="store_true", help="a :memory: database instead")
    parser.add_argument("--aio", action="store_true", help="aiosqlite through an AsyncEngine")
    args = parser.parse_args()

    from sqlalchemy import create_engine, event, text

    workdir = tempfile.mkdtemp(prefix="forksafe-sqlite-")
    path = os.path.join(workdir, "app.db")
    if args.aio:
        from sqlalchemy.ext.asyncio import create_async_engine

        aengine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        STATE["aengine"] = aengine
        engine = aengine.sync_engine
    else:
        engine = create_engine("sqlite://" if args.memory else f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _journal(dbapi_connection, _record) -> None:
        dbapi_connection.execute(f"PRAGMA journal_mode={args.journal}")
        dbapi_connection.execute("PRAGMA cache_size=1")  # spill early: pages reach the file

    if args.mode == "track":
        forksafe.track(STATE.get("aengine", engine))
    if args.aio:
        loop = asyncio.new_event_loop()  # the parent's one loop, as an ASGI server has

        async def open_held():
            async with STATE["aengine"].begin() as conn:
                await conn.execute(text("CREATE TABLE t (x TEXT)"))
            held = await STATE["aengine"].connect()
            txn = await held.begin()
            await held.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "x" * 500}] * ROWS)
            return held, txn

        held, txn = loop.run_until_complete(open_held())
        STATE["loop"] = loop
    else:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x TEXT)"))
        held = engine.connect()
        txn = held.begin()  # explicit: SQLAlchemy 1.4 and 2.x alike
        held.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "x" * 500}] * ROWS)
    STATE.update(engine=engine, held=held, txn=txn)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        child(args, write_fd)
    os.close(write_fd)
    if args.action == "sigterm":
        with os.fdopen(read_fd) as pipe:
            report_line = pipe.readline()  # the child is ready
        os.kill(pid, signal.SIGTERM)
    else:
        with os.fdopen(read_fd) as pipe:
            report_line = pipe.readline()
    os.waitpid(pid, 0)

    report: dict = {"child": json.loads(report_line) if report_line else None}
    try:
        if args.aio:
            STATE["loop"].run_until_complete(asyncio.wait_for(txn.commit(), 30))
        else:
            txn.commit()
        report["commit_error"] = None
    except Exception as exc:
        report["commit_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if args.memory:
        with engine.connect() as conn:
            report["rows"] = conn.execute(text("SELECT COUNT(*) FROM t")).scalar()
        report["integrity"] = "ok"
    else:
        check = sqlite3.connect(path)
        try:
            report["rows"] = check.execute("SELECT COUNT(*) FROM t").fetchone()[0]
            report["integrity"] = check.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            report["rows"], report["integrity"] = None, f"{type(exc).__name__}: {exc}"
        finally:
            check.close()
    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    print(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)


def child(args, write_fd: int) -> None:
    from sqlalchemy import text

    report: dict = {"pid": os.getpid()}
    engine = STATE["engine"]
    try:
        if args.aio and args.action in ("close", "dispose", "use_held"):
            # on a loop of the child's own; aiosqlite's thread did not survive the fork, so
            # anything that reaches an inherited connection waits for ever: bounded here
            async def act():
                if args.action == "close":
                    await STATE["held"].close()
                elif args.action == "dispose":
                    await STATE["aengine"].dispose()
                else:
                    result = await STATE["held"].execute(text("SELECT COUNT(*) FROM t"))
                    report["rows_seen"] = result.scalar()

            asyncio.run(asyncio.wait_for(act(), 10))
        elif args.action == "close":
            STATE["held"].close()  # back to the pool: a rollback on the inherited connection
        elif args.action == "dispose":
            engine.dispose()
        elif args.action == "gc":
            engine.dispose(close=False)
            STATE.clear()
            engine = None
            gc.collect()
        elif args.action == "use":
            # the engine again: a connection of the child's own (on the parent's file)
            with engine.connect() as conn:
                report["rows_seen"] = conn.execute(text("SELECT COUNT(*) FROM t")).scalar()
        elif args.action == "use_held":
            # the Connection held across the fork: the parent's own transaction
            report["rows_seen"] = STATE["held"].execute(text("SELECT COUNT(*) FROM t")).scalar()
        elif args.action not in ("exit", "sigterm"):
            raise SystemExit(f"unknown action {args.action}")
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"[:300]
    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    if args.action == "sigterm":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.write(write_fd, (json.dumps(report) + "\n").encode())
    if args.action == "sigterm":
        while True:  # until the parent's SIGTERM: sys.exit, finalizers run
            time.sleep(1)
    sys.exit(0)  # a normal interpreter exit: finalizers and destructors run


if __name__ == "__main__":
    main()
