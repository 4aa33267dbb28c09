"""A process forked inside ``transaction.atomic()``, on MariaDB.

The parent opens an atomic block and inserts row 1; then, still inside the block, it forks
a child that inserts row 2 through the ORM's connection and exits, and runs a query in a
``multiprocessing`` pool (fork) started inside the block (what a test runner does inside
a ``TestCase``). The parent then rolls its block back. Prints one JSON object: the child's
and the pool's results and which rows exist afterwards. The child's log (stderr) is the
script's stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys


class RollbackError(Exception):
    pass


def pool_query(n: int) -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT %s * 7", [n])
        return int(cur.fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--table", default="atomic_fork")
    args = parser.parse_args()

    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1", "PORT": args.port,
            "USER": "root", "PASSWORD": "", "NAME": "forksafe",
        }},
        INSTALLED_APPS=["forksafe.django"],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection, transaction

    with connection.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {args.table}")
        cur.execute(f"CREATE TABLE {args.table} (id INT PRIMARY KEY) ENGINE=InnoDB")

    report: dict = {}
    read_fd, write_fd = os.pipe()
    try:
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute(f"INSERT INTO {args.table} VALUES (1)")
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                child: dict = {}
                try:
                    with connection.cursor() as cur:
                        cur.execute(f"INSERT INTO {args.table} VALUES (2)")
                        cur.execute("SELECT CONNECTION_ID()")
                        child["connection_id"] = int(cur.fetchone()[0])
                except Exception as exc:
                    child["error"] = f"{type(exc).__name__}: {exc}"[:300]
                import forksafe

                child["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
                os.write(write_fd, json.dumps(child).encode())
                sys.stderr.flush()
                os._exit(0)
            os.close(write_fd)
            with os.fdopen(read_fd) as pipe:
                report["child"] = json.loads(pipe.read() or "{}")
            report["child_exit"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            with multiprocessing.get_context("fork").Pool(1) as pool:
                report["pool"] = pool.map(pool_query, [6])
            with connection.cursor() as cur:
                cur.execute("SELECT CONNECTION_ID()")
                report["parent_connection_id"] = int(cur.fetchone()[0])
            raise RollbackError
    except RollbackError:
        pass
    with connection.cursor() as cur:
        cur.execute(f"SELECT id FROM {args.table} ORDER BY id")
        report["rows"] = [int(r[0]) for r in cur.fetchall()]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
