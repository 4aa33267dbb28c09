"""Django 5.1+ with its PostgreSQL connection pool (OPTIONS["pool"]), forked.

The parent queries through the pool (the connection goes back to the pool, idle), forks
children that query, close their connection and exit normally, then queries again. Prints
one JSON object: backend pids of parent and children, and the parent's error if any.
Exits with os._exit so the parent itself ends no session.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", default="forksafe")
    parser.add_argument("--protect", type=int, default=1)
    parser.add_argument("--children", type=int, default=3)
    args = parser.parse_args()

    import django
    from django.conf import settings

    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": args.database,
                "USER": "postgres",
                "HOST": "127.0.0.1",
                "PORT": args.port,
                "OPTIONS": {"pool": {"min_size": 1, "max_size": 4, "timeout": 5}},
            }
        },
        INSTALLED_APPS=["forksafe.django"] if args.protect else [],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection

    def backend_pid() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    parent_pid = backend_pid()
    connection.close()  # back to the pool, idle: what a request does at its end

    read_fd, write_fd = os.pipe()
    children = []
    for _ in range(args.children):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            signal.alarm(8)  # a hang in the child ends it (exit status -14), bounded
            report: dict = {}
            try:
                report["backend_pid"] = backend_pid()
                connection.close()
            except Exception as exc:
                report["error"] = f"{type(exc).__name__}: {exc}"[:300]
            import forksafe

            report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
            os.write(write_fd, (json.dumps(report) + "\n").encode())
            sys.exit(0)  # a normal exit: finalisers and atexit handlers run
        children.append(pid)
    os.close(write_fd)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    with os.fdopen(read_fd) as pipe:
        reports = [json.loads(line) for line in pipe.read().splitlines() if line]
    # No wait needed: a Terminate a child sent on the shared socket precedes, on that very
    # socket, the parent's next query, so that query fails if the session was ended.
    after, error = None, None
    try:
        after = backend_pid()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=args.port, user="postgres",
                         dbname=args.database, autocommit=True) as probe:
        alive = probe.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                              (parent_pid,)).fetchone()[0] == 1
    print(json.dumps({"parent_pid": parent_pid, "after_pid": after, "parent_error": error,
                      "parent_session_alive": alive, "children": reports,
                      "exit_codes": codes}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
