"""One fork scenario in a fresh interpreter, so that forks never happen inside pytest.

The parent opens a connection (through an engine, idle in its pool or checked out at the
moment of fork, or a raw one), records its CONNECTION_ID(), forks children that each end
or misbehave in one way, waits for them, then checks its own connection again. Prints one
JSON object; exits with os._exit so that the parent itself never sends COM_QUIT.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time

import forksafe

# Every database object lives here only, so that a child can drop the last reference.
STATE: dict = {}


def connection_id_raw(conn) -> int:
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (cid,) = cur.fetchone()
    cur.close()
    return int(cid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["idle", "checkedout", "raw"], default="idle")
    parser.add_argument("--protect", type=int, default=1)
    parser.add_argument("--action", required=True)
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--forks", type=int, default=1, help="fork rounds (fd leak check)")
    args = parser.parse_args()

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(args.url)
    if args.kind == "raw":
        kwargs = {"host": url.host, "port": url.port, "user": url.username or "root",
                  "database": url.database}
        if url.drivername.endswith("pymysql"):
            import pymysql
            STATE["raw"] = pymysql.connect(**kwargs, autocommit=True)
        else:
            import MySQLdb
            STATE["raw"] = MySQLdb.connect(**kwargs, autocommit=True)
        if args.protect:
            forksafe.track(STATE["raw"])
        parent_id = connection_id_raw(STATE["raw"])
    else:
        STATE["engine"] = create_engine(args.url, pool_size=2)
        if args.protect:
            forksafe.track(STATE["engine"])
        with STATE["engine"].connect() as c:
            parent_id = int(c.execute(text("SELECT CONNECTION_ID()")).scalar())
        if args.kind == "checkedout":
            STATE["held"] = STATE["engine"].connect()
            parent_id = int(STATE["held"].execute(text("SELECT CONNECTION_ID()")).scalar())

    read_fd, write_fd = os.pipe()
    results: list[dict] = []
    fd_counts: list[int] = []
    for _round in range(args.forks):
        pids = []
        for _ in range(args.children):
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                child(args, write_fd)  # never returns
            pids.append(pid)
        if args.action == "sigterm":
            time.sleep(0.5)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            results.append({"status": os.waitstatus_to_exitcode(status)})
        fd_counts.append(len(os.listdir("/proc/self/fd")))
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        child_reports = [json.loads(line) for line in pipe.read().splitlines() if line]
    time.sleep(0.2)  # let the server log whatever the children sent

    after_id, error = None, None
    try:
        if "raw" in STATE:
            after_id = connection_id_raw(STATE["raw"])
        elif "held" in STATE:
            after_id = int(STATE["held"].execute(text("SELECT CONNECTION_ID()")).scalar())
        else:
            with STATE["engine"].connect() as c:
                after_id = int(c.execute(text("SELECT CONNECTION_ID()")).scalar())
                assert c.execute(text("SELECT 1")).scalar() == 1
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({
        "parent_id": parent_id,
        "after_id": after_id,
        "parent_error": error,
        "children": child_reports,
        "exit_codes": [r["status"] for r in results],
        "parent_fd_counts": fd_counts,
        "internal_errors": [repr(e) for e in forksafe.internal_errors()],
    }))
    sys.stdout.flush()
    os._exit(0)


def child(args, write_fd: int) -> None:
    from sqlalchemy import text

    report: dict = {"pid": os.getpid()}

    def send() -> None:
        report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
        report["fd_count"] = len(os.listdir("/proc/self/fd"))
        os.write(write_fd, (json.dumps(report) + "\n").encode())

    try:
        action = args.action
        engine, held, raw = STATE.get("engine"), STATE.get("held"), STATE.get("raw")
        if action == "use":
            if raw is not None:
                report["child_id"] = connection_id_raw(raw)
            else:
                with engine.connect() as c:
                    report["child_id"] = int(c.execute(text("SELECT CONNECTION_ID()")).scalar())
        elif action == "close":
            if raw is not None:
                raw.close()
            elif held is not None:
                held.close()  # returns to the pool: rollback on the inherited socket
            else:
                engine.raw_connection().close()
        elif action == "dispose":
            engine.dispose()
        elif action == "gc":
            # SQLAlchemy's documented advice, then let the garbage collector run
            if engine is not None:
                engine.dispose(close=False)
            engine = held = raw = None
            STATE.clear()
            gc.collect()
        elif action == "invalidate":
            held.invalidate()
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
    if args.action in ("exit", "gc", "close", "dispose", "use", "invalidate"):
        # a normal interpreter exit: finalizers and destructors run
        sys.exit(0)


if __name__ == "__main__":
    main()
