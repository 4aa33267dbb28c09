"""A worker thread's Django connection when another thread forks (MariaDB).

A worker thread uses the ORM (its own connection: Django's connections are per thread)
and waits; the main thread forks; the child runs ``gc.collect()`` and exits with
``os._exit(0)``; then the worker queries again on its connection. Prints one JSON object:
the worker's connection id before, and after (or the error). The test reads the server's
general log for a ``Quit`` from the worker's session.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protect", type=int, default=1)
    args = parser.parse_args()

    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1", "PORT": args.port,
            "USER": "root", "PASSWORD": "", "NAME": "forksafe", "CONN_MAX_AGE": None,
        }},
        INSTALLED_APPS=["forksafe.django"] if args.protect else [],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection

    report: dict = {}
    ready, go, done = threading.Event(), threading.Event(), threading.Event()

    def connection_id() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            return int(cur.fetchone()[0])

    def worker() -> None:
        try:
            report["worker_before"] = connection_id()
        finally:
            ready.set()
        go.wait(60)
        try:
            report["worker_after"] = connection_id()
        except Exception as exc:
            report["worker_error"] = f"{type(exc).__name__}: {exc}"[:300]
        done.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    if not ready.wait(60):
        raise SystemExit("the worker thread never got ready")
    pid = os.fork()
    if pid == 0:
        gc.collect()
        os._exit(0)
    report["child_exit"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    go.set()
    if not done.wait(60):
        raise SystemExit("the worker thread never finished")
    import forksafe

    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    print(json.dumps(report), flush=True)
    os._exit(0)  # the parent ends no session itself: only the child could have


if __name__ == "__main__":
    main()
