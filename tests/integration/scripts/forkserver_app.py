"""The app a forkserver preloads: a SQLAlchemy engine created and used at import.

Python 3.14 made ``forkserver`` multiprocessing's default start method on Linux. With
``set_forkserver_preload(["forkserver_app"])`` the forkserver process imports this module
once, and every worker is forked from it: the engine's pooled connection is inherited, as
under gunicorn's ``preload_app``. ``FORKSAFE_TEST_URL`` is the database;
``FORKSAFE_TEST_PROTECT=1`` tracks the engine (``import forksafe`` installs the at-fork hook
in the forkserver), ``0`` leaves forksafe out entirely.
"""

from __future__ import annotations

import os

from sqlalchemy import create_engine, text

PROTECT = os.environ["FORKSAFE_TEST_PROTECT"] == "1"
engine = create_engine(os.environ["FORKSAFE_TEST_URL"], pool_size=2)
if PROTECT:
    import forksafe

    engine = forksafe.track(engine)

with engine.connect() as _conn:  # used at import: the connection stays idle in the pool
    PRELOAD_ID = int(_conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
PRELOAD_PID = os.getpid()


def work(n: int) -> dict[str, object]:
    """One task in a pool worker: which session answers, and who preloaded the app."""
    report: dict[str, object] = {"n": n, "preload_id": PRELOAD_ID, "preload_pid": PRELOAD_PID,
                                 "pid": os.getpid(), "ppid": os.getppid()}
    try:
        with engine.connect() as conn:
            report["session"] = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
            report["echo"] = int(conn.execute(text("SELECT :n"), {"n": n}).scalar_one())
    except Exception as exc:  # a shared session fails in many ways: report, do not crash
        report["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return report
