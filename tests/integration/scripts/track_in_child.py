"""``forksafe.track()`` called in the child, on an engine or raw connection the parent
opened and never tracked (a pool initializer, Celery's ``worker_process_init``).

The parent uses the engine (or a raw mysqlclient connection) once, then forks; the child
calls ``forksafe.track()`` on it (``--mode track``; ``none`` is the control), runs a query
through it (engine) and then closes it (``engine.dispose()`` / ``conn.close()``), and
leaves with ``os._exit(0)``. Prints one JSON object: the parent's session id before and
after, the child's, errors, and both processes' internal errors.
"""

from __future__ import annotations

import argparse
import json
import os

import MySQLdb
from sqlalchemy import create_engine, text

import forksafe

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--kind", choices=["engine", "raw"], required=True)
parser.add_argument("--mode", choices=["none", "track"], required=True)
args = parser.parse_args()


def raw_session_id(conn: MySQLdb.connections.Connection) -> int:
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (cid,) = cur.fetchone()
    cur.close()
    return int(cid)


SESSION_ID = text("SELECT CONNECTION_ID()")
engine = create_engine(f"mysql+mysqldb://root@127.0.0.1:{args.port}/")
raw = MySQLdb.connect(host="127.0.0.1", port=args.port, user="root")
report: dict = {}
if args.kind == "engine":
    with engine.connect() as conn:
        report["before_id"] = conn.execute(SESSION_ID).scalar()
else:
    report["before_id"] = raw_session_id(raw)

read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    child: dict = {}
    try:
        if args.kind == "engine":
            if args.mode == "track":
                forksafe.track(engine)
            with engine.connect() as conn:
                child["id"] = conn.execute(SESSION_ID).scalar()
            engine.dispose()
        else:
            if args.mode == "track":
                forksafe.track(raw)
            raw.close()
    except Exception as exc:
        child["error"] = repr(exc)
    child["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    os.write(write_end, json.dumps(child).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    report["child"] = json.loads(pipe.read() or b"{}")
os.waitpid(pid, 0)
try:
    if args.kind == "engine":
        with engine.connect() as conn:
            report["after_id"] = conn.execute(SESSION_ID).scalar()
    else:
        report["after_id"] = raw_session_id(raw)
except Exception as exc:
    report["error"] = repr(exc)
report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
print(json.dumps(report), flush=True)
os._exit(0)  # the parent never says goodbye: a Quit in the server's log came from the child
