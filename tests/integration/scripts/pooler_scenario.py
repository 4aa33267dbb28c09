"""One fork scenario through PgBouncer, in a fresh interpreter; prints a JSON report.

The parent opens a connection to PgBouncer (a SQLAlchemy engine whose connection sits idle
in its pool, or a raw DBAPI connection), notes its client address (the local port of its
socket: how PgBouncer's ``SHOW CLIENTS`` names it), forks children that each end one way
(``close``: close the inherited DBAPI connection; ``dispose``: ``engine.dispose()``; ``use``:
query through the inherited object), then queries again and asks PgBouncer's admin console
whether its client connection is still there.

Usage: ``pooler_scenario.py --url URL --kind engine|raw --mode track|none --action ACTION``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import forksafe

STATE: dict = {}


def client_port(dbapi_conn) -> int:
    """The local port of a DBAPI connection's socket (PgBouncer's name for the client)."""
    sock = socket.socket(fileno=os.dup(dbapi_conn.fileno()))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def raw_connect(url):
    kwargs = {"host": url.host, "port": url.port, "user": url.username, "dbname": url.database}
    if url.get_driver_name() == "psycopg2":
        import psycopg2

        conn = psycopg2.connect(**kwargs)
        conn.autocommit = True
        return conn
    import psycopg

    return psycopg.connect(**kwargs, autocommit=True)


def pooler_clients(url) -> list[int]:
    """Ports of the clients PgBouncer serves now (admin console, psycopg2's simple queries)."""
    import psycopg2

    admin = psycopg2.connect(host=url.host, port=url.port, user=url.username, dbname="pgbouncer")
    admin.autocommit = True
    try:
        cur = admin.cursor()
        cur.execute("SHOW CLIENTS")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        return [int(r["port"]) for r in rows if r["database"] != "pgbouncer"]
    finally:
        admin.close()


def query(n: int) -> tuple[int, int]:
    """``SELECT n`` through the inherited object; returns (answer, client port used)."""
    from sqlalchemy import text

    if "raw" in STATE:
        cur = STATE["raw"].cursor()
        cur.execute("SELECT %s", (n,))
        (value,) = cur.fetchone()
        cur.close()
        return int(value), client_port(STATE["raw"])
    with STATE["engine"].connect() as conn:
        value = conn.execute(text("SELECT :n"), {"n": n}).scalar_one()
        return int(value), client_port(conn.connection.dbapi_connection)


def child(action: str, write_fd: int) -> None:
    report: dict = {"pid": os.getpid()}
    try:
        if action == "use":
            try:
                value, port = query(os.getpid())
                report["inherited_port"] = port
                report["inherited_ok"] = value == os.getpid()
            except Exception as exc:
                report["inherited_error"] = f"{type(exc).__name__}: {exc}"[:300]
        elif action == "close":
            if "raw" in STATE:
                STATE["raw"].close()
            else:
                STATE["engine"].raw_connection().dbapi_connection.close()
        elif action == "dispose":
            STATE["engine"].dispose()
        else:
            raise SystemExit(f"unknown action {action}")
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"[:300]
    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    os.write(write_fd, (json.dumps(report) + "\n").encode())
    sys.exit(0)  # a normal interpreter exit: finalizers run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["engine", "raw"], required=True)
    parser.add_argument("--mode", choices=["track", "none"], required=True)
    parser.add_argument("--action", choices=["close", "dispose", "use"], required=True)
    parser.add_argument("--children", type=int, default=2)
    args = parser.parse_args()

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(args.url)
    if args.kind == "raw":
        STATE["raw"] = raw_connect(url)
        obj = STATE["raw"]
    else:
        STATE["engine"] = create_engine(args.url, pool_size=2)
        obj = STATE["engine"]
    if args.mode == "track":
        forksafe.track(obj)
    _, parent_port = query(0)

    read_fd, write_fd = os.pipe()
    pids = []
    for _ in range(args.children):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            child(args.action, write_fd)
        pids.append(pid)
    exit_codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        children = [json.loads(line) for line in pipe.read().splitlines() if line]

    after_port, error = None, None
    try:
        value, after_port = query(42)
        if value != 42:
            error = f"wrong answer {value}"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({
        "parent_port": parent_port,
        "after_port": after_port,
        "parent_error": error,
        "pooler_clients": pooler_clients(url),
        "children": children,
        "exit_codes": exit_codes,
        "internal_errors": [repr(e) for e in forksafe.internal_errors()],
    }))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
