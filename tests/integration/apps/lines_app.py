"""A WSGI app with a tracked engine and a tracked raw MySQLdb connection, both used at import.

Each request first uses the raw connection (before any engine checkout, whose pid check
would reset the process), then the engine, and answers which sessions it got: ``raw`` is
``shared`` (the parent's session: nothing reset this worker after the fork), or
``refused NNNN`` (forksafe neutralised the inherited socket: the driver's own error).
Environment: DB_URL (SQLAlchemy URL, mysqldb), DB_KWARGS (JSON of MySQLdb.connect kwargs).
"""

from __future__ import annotations

import json
import os

import MySQLdb
from sqlalchemy import create_engine, text

import forksafe

engine = forksafe.track(create_engine(os.environ["DB_URL"], pool_size=2))
with engine.connect() as _conn:
    PARENT_ENGINE = int(_conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
raw = forksafe.track(MySQLdb.connect(**json.loads(os.environ["DB_KWARGS"])))
PARENT_RAW = raw.thread_id()


def application(environ: dict, start_response: object) -> list[bytes]:
    try:
        cur = raw.cursor()
        cur.execute("SELECT CONNECTION_ID()")
        got = int(cur.fetchone()[0])
        raw_state = "shared" if got == PARENT_RAW else f"other {got}"
    except MySQLdb.Error as exc:
        raw_state = f"refused {exc.args[0]}"
    with engine.connect() as conn:
        cid = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
    body = json.dumps({"pid": os.getpid(), "raw": raw_state, "engine_own": cid != PARENT_ENGINE})
    start_response("200 OK", [("Content-Type", "application/json")])  # type: ignore[operator]
    return [body.encode()]
