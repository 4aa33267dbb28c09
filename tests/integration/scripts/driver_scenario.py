"""One fork scenario for one driver, in a fresh interpreter (forks never happen in pytest).

Every supported driver on both servers: mysqlclient, PyMySQL, mysql-connector-python (C
extension, or pure Python with ``?use_pure=true``), MariaDB Connector/Python, aiomysql,
asyncmy (MariaDB), psycopg2, psycopg 3, asyncpg, pg8000 (PostgreSQL), through a SQLAlchemy
engine whose connection sits idle in its pool at the moment of fork (``--kind engine``), an
engine with a ``Connection`` checked out across the fork (``--kind checkedout``; the child's
``close`` returns it to the pool), an ``AsyncEngine`` (``--kind async``: psycopg 3 and the
asyncio drivers) or a raw DBAPI connection (``--kind raw``; for asyncio drivers, one opened
on the parent's event loop). The parent keeps one event loop; a child runs its asyncio work
on a loop of its own (``asyncio.run``), like a uvicorn worker.

The parent opens a connection and records its server session id (``CONNECTION_ID()`` or
``pg_backend_pid()``), forks children that each end in one way, waits, then uses its own
connection again. ``--forks N`` repeats the forking N rounds (a descriptor leak check): the
report has the parent's descriptor count after each round, and each child's report its own.

How the parent protects itself: ``--mode track`` (``forksafe.track``), ``instrument``
(``forksafe.instrument()`` before anything is opened), ``audit`` (``instrument(track=False)``:
record, do not track, so children report), ``strict`` (audit plus ``configure(strict=True)``),
``scan`` (no instrumentation, ``configure(scan_at_fork=True)``), ``none``. Prints one JSON
object and leaves with ``os._exit`` so that the parent itself never says goodbye.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
import warnings

import forksafe

# Every database object lives here only, so that a child can drop the last reference.
STATE: dict = {}
# Warnings shown in this process (forksafe warns in the child's at-fork hook).
WARNINGS: list[str] = []


def record_warning(message, category, *_args, **_kwargs) -> None:
    WARNINGS.append(f"{category.__name__}: {message}")


def session_query(url) -> str:
    return "SELECT pg_backend_pid()" if url.get_backend_name() == "postgresql" else (
        "SELECT CONNECTION_ID()"
    )


ASYNC_DRIVERS = ("asyncpg", "aiomysql", "asyncmy")
# The parent's one event loop: asyncio connections belong to the loop that opened them, so the
# parent keeps using this one; a child starts its own (asyncio.run), like a uvicorn worker.
PARENT: dict = {"pid": os.getpid(), "loop": None}
PARENT_WAIT = 15.0


def run_async(coro):
    """Run ``coro`` on the parent's loop in the parent, on a new loop of its own in a child."""
    if os.getpid() != PARENT["pid"]:
        return asyncio.run(coro)
    if PARENT["loop"] is None:
        PARENT["loop"] = asyncio.new_event_loop()
    # bounded: a child that touched the parent's event loop (its epoll set is shared across
    # fork) can leave the parent waiting for ever on a socket its loop no longer watches
    return PARENT["loop"].run_until_complete(asyncio.wait_for(coro, PARENT_WAIT))


def is_async_raw(url) -> bool:
    return url.get_driver_name() in ASYNC_DRIVERS


def raw_connect(url):  # noqa: PLR0911 - one branch per driver
    driver = url.get_driver_name()
    kwargs = {"host": url.host, "port": url.port, "user": url.username}
    if driver in ASYNC_DRIVERS:
        return run_async(async_raw_connect(url))
    if driver == "mysqldb":
        import MySQLdb

        return MySQLdb.connect(**kwargs, database=url.database, autocommit=True)
    if driver == "pymysql":
        import pymysql

        return pymysql.connect(**kwargs, database=url.database, autocommit=True)
    if driver == "mysqlconnector":
        import mysql.connector

        pure = str(url.query.get("use_pure", "")).lower() in ("1", "true")
        conn = mysql.connector.connect(**kwargs, database=url.database, use_pure=pure)
        conn.autocommit = True
        return conn
    if driver == "mariadbconnector":
        import mariadb

        return mariadb.connect(**kwargs, database=url.database, autocommit=True)
    if driver == "pg8000":
        import pg8000

        conn = pg8000.connect(**kwargs, database=url.database)
        conn.autocommit = True
        return conn
    if driver == "psycopg2":
        import psycopg2

        conn = psycopg2.connect(**kwargs, dbname=url.database)
        conn.autocommit = True
        return conn
    import psycopg

    return psycopg.connect(**kwargs, dbname=url.database, autocommit=True)


async def async_raw_connect(url):
    driver = url.get_driver_name()
    kwargs = {"host": url.host, "port": url.port, "user": url.username}
    if driver == "asyncpg":
        import asyncpg

        return await asyncpg.connect(**kwargs, database=url.database)
    if driver == "aiomysql":
        import aiomysql

        return await aiomysql.connect(**kwargs, db=url.database, autocommit=True)
    import asyncmy

    return await asyncmy.connect(**kwargs, database=url.database, autocommit=True)


async def async_raw_session(conn, query: str) -> int:
    if hasattr(conn, "fetchval"):  # asyncpg
        return int(await conn.fetchval(query))
    async with conn.cursor() as cur:
        await cur.execute(query)
        (sid,) = await cur.fetchone()
    return int(sid)


async def async_raw_close(conn) -> None:
    """The graceful close an application awaits (asyncpg close(); the MySQL drivers'
    ensure_closed(), which sends COM_QUIT; their close() only drops the transport)."""
    if hasattr(conn, "ensure_closed"):
        await conn.ensure_closed()
    else:
        await conn.close()


def monitor_url(url):
    """A sync driver on the same server, to ask it about sessions."""
    backend = url.get_backend_name()
    return url.set(drivername="postgresql+psycopg2" if backend == "postgresql"
                   else "mysql+pymysql", query={})


def session_alive(url, sid: int) -> bool:
    """Whether the server still lists session ``sid``, asked on a separate connection."""
    if url.get_backend_name() == "postgresql":
        sql = f"SELECT COUNT(*) FROM pg_stat_activity WHERE pid = {int(sid)}"
    else:
        sql = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {int(sid)}"
    monitor = raw_connect(monitor_url(url))
    try:
        return raw_session(monitor, sql) == 1
    finally:
        monitor.close()


def raw_session(conn, query: str) -> int:
    if is_async_conn(conn):
        return run_async(async_raw_session(conn, query))
    cur = conn.cursor()
    cur.execute(query)
    (sid,) = cur.fetchone()
    cur.close()
    return int(sid)


def is_async_conn(conn) -> bool:
    return type(conn).__module__.split(".")[0] in ASYNC_DRIVERS


def engine_session(engine, query: str) -> int:
    from sqlalchemy import text

    with engine.connect() as c:
        return int(c.execute(text(query)).scalar())


async def async_session(engine, query: str) -> int:
    from sqlalchemy import text

    async with engine.connect() as c:
        return int((await c.execute(text(query))).scalar())


def session_id(query: str) -> int:
    """A query through the inherited object (for ``checkedout``, the engine's pool)."""
    if "raw" in STATE:
        return raw_session(STATE["raw"], query)
    if "async" in STATE:
        return run_async(async_session(STATE["async"], query))
    return engine_session(STATE["engine"], query)


def parent_session(query: str) -> int:
    """The parent's own session: the held ``Connection`` if there is one."""
    if "held" in STATE:
        from sqlalchemy import text

        return int(STATE["held"].execute(text(query)).scalar())
    return session_id(query)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--kind", choices=["engine", "checkedout", "raw", "async"], default="engine"
    )
    parser.add_argument(
        "--mode", choices=["track", "instrument", "audit", "strict", "scan", "none"],
        default="track",
    )
    parser.add_argument("--action", required=True)
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--forks", type=int, default=1, help="fork rounds (fd leak check)")
    args = parser.parse_args()

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(args.url)
    query = session_query(url)
    warnings.showwarning = record_warning
    warnings.simplefilter("always")
    if args.mode == "instrument":
        forksafe.instrument()
    elif args.mode in ("audit", "strict"):
        forksafe.instrument(track=False)
        forksafe.configure(strict=args.mode == "strict")
    elif args.mode == "scan":
        forksafe.configure(scan_at_fork=True)
    if args.kind == "raw":
        STATE["raw"] = raw_connect(url)
        if args.mode == "track":
            forksafe.track(STATE["raw"])
    elif args.kind == "async":
        from sqlalchemy.ext.asyncio import create_async_engine

        STATE["async"] = create_async_engine(args.url, pool_size=2)
        if args.mode == "track":
            forksafe.track(STATE["async"])
    else:
        STATE["engine"] = create_engine(args.url, pool_size=2)
        if args.mode == "track":
            forksafe.track(STATE["engine"])
        if args.kind == "checkedout":
            session_id(query)  # the pool opens its connection, then it is checked out
            STATE["held"] = STATE["engine"].connect()
    parent_id = parent_session(query)

    read_fd, write_fd = os.pipe()
    exit_codes: list[int] = []
    fd_counts: list[int] = []
    for _round in range(args.forks):
        pids = []
        for _ in range(args.children):
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                child(args, url, query, write_fd)  # never returns
            pids.append(pid)
        if args.action == "sigterm":
            time.sleep(0.5)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
        exit_codes += [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        fd_counts.append(fd_count())
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        child_reports = [json.loads(line) for line in pipe.read().splitlines() if line]
    time.sleep(0.3)  # let the server log whatever the children sent

    alive = session_alive(url, parent_id)  # asked from another connection: the server's view

    after_id, error = None, None
    try:
        after_id = parent_session(query)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({
        "parent_id": parent_id,
        "alive_on_server": alive,
        "after_id": after_id,
        "parent_error": error,
        "children": child_reports,
        "exit_codes": exit_codes,
        "parent_fd_counts": fd_counts,
        "internal_errors": [repr(e) for e in forksafe.internal_errors()],
    }))
    sys.stdout.flush()
    os._exit(0)


def child(args, url, query: str, write_fd: int) -> None:
    report: dict = {"pid": os.getpid()}

    def send() -> None:
        report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
        report["warnings"] = list(WARNINGS)
        report["fd_count"] = fd_count()
        os.write(write_fd, (json.dumps(report) + "\n").encode())

    try:
        action = args.action
        engine, aengine, raw = STATE.get("engine"), STATE.get("async"), STATE.get("raw")
        held = STATE.get("held")
        if action == "use" and aengine is not None:
            # one loop of the child's own (asyncio connections belong to the loop that
            # opened them): the inherited engine first, then again for a session of its own
            async def use_twice() -> None:
                try:
                    report["inherited_id"] = await async_session(aengine, query)
                except Exception as exc:
                    report["inherited_error"] = f"{type(exc).__name__}: {exc}"[:300]
                try:
                    report["own_id"] = await async_session(aengine, query)
                except Exception as exc:
                    report["own_error"] = f"{type(exc).__name__}: {exc}"[:400]

            asyncio.run(use_twice())
        elif action == "use":
            # the inherited object first, then a connection of the child's own
            try:
                report["inherited_id"] = session_id(query)
            except Exception as exc:
                report["inherited_error"] = f"{type(exc).__name__}: {exc}"[:300]
            try:
                if raw is not None and is_async_conn(raw):
                    async def own_session() -> int:
                        own = await async_raw_connect(url)
                        try:
                            return await async_raw_session(own, query)
                        finally:
                            await async_raw_close(own)

                    report["own_id"] = asyncio.run(own_session())
                elif raw is not None:
                    own = raw_connect(url)
                    report["own_id"] = raw_session(own, query)
                    own.close()
                else:
                    report["own_id"] = session_id(query)
            except Exception as exc:
                report["own_error"] = f"{type(exc).__name__}: {exc}"[:400]
        elif action == "close":
            if raw is not None and is_async_conn(raw):
                # from a loop of the child's own: the driver may refuse (the connection's
                # futures belong to the parent's loop) after it has written its goodbye
                try:
                    asyncio.run(async_raw_close(raw))
                except RuntimeError as exc:
                    report["close_error"] = f"{type(exc).__name__}: {exc}"[:300]
            elif raw is not None:
                try:
                    raw.close()
                except Exception as exc:  # pg8000: its Terminate meets the dead socket
                    report["close_error"] = f"{type(exc).__name__}: {exc}"[:300]
            elif held is not None:
                held.close()  # back to the pool: a rollback on the inherited socket
            elif aengine is not None:
                async def close_one() -> None:
                    proxied = await aengine.raw_connection()
                    await async_raw_close(proxied.driver_connection)

                asyncio.run(close_one())
            else:
                # what a library that grabs the DBAPI connection does
                engine.raw_connection().dbapi_connection.close()
        elif action == "dispose":
            if aengine is not None:
                asyncio.run(aengine.dispose())
            elif engine is not None:
                engine.dispose()
            else:
                raise SystemExit("dispose needs an engine")
        elif action == "gc":
            # SQLAlchemy's documented advice, then let the garbage collector run
            if engine is not None:
                engine.dispose(close=False)
            if aengine is not None:
                aengine.sync_engine.dispose(close=False)  # no I/O; 1.4's AsyncEngine has no close=
            engine = aengine = raw = held = None
            STATE.clear()
            gc.collect()
        elif action in ("exit", "sigterm"):
            pass
        else:
            raise SystemExit(f"unknown action {action}")
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"[:300]
    if args.action == "sigterm":
        # like gunicorn and uWSGI workers: SIGTERM ends the worker through sys.exit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        send()
        time.sleep(30)
        os._exit(3)  # not reached: the parent sends SIGTERM
    send()
    sys.exit(0)  # a normal interpreter exit: finalizers and destructors run


if __name__ == "__main__":
    main()
