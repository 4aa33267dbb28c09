"""Run a forkserver pool over ``forkserver_app`` (preloaded) and print a JSON report.

Usage: ``forkserver_run.py URL PROTECT`` (``1`` or ``0``). The pool's workers are forked
from the forkserver process, which imported the app (and opened its connection) once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

os.environ["FORKSAFE_TEST_URL"] = sys.argv[1]
os.environ["FORKSAFE_TEST_PROTECT"] = sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the forkserver is a new interpreter: it finds the app through PYTHONPATH (a preload that
# fails to import is silently skipped, and every worker would import the app itself)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))


def main() -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["forkserver_app"])
    import forkserver_app  # the runner's own copy (its own connection); tasks name it

    with ctx.Pool(3) as pool:
        results = pool.map(forkserver_app.work, range(12), chunksize=1)
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    check = create_engine(sys.argv[1], poolclass=NullPool)
    with check.connect() as conn:
        rows = conn.execute(text("SELECT ID FROM information_schema.PROCESSLIST"))
        alive = {int(r[0]) for r in rows}
    preload_ids = {r["preload_id"] for r in results}
    print(json.dumps({
        "results": results,
        "runner_pid": os.getpid(),
        "runner_preload_id": forkserver_app.PRELOAD_ID,
        "preload_alive": {str(i): i in alive for i in preload_ids},
    }))


if __name__ == "__main__":
    main()
