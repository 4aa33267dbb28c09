"""What forksafe.django's connect-time probe leaves on a connection, seen by the application.

Scenarios (each prints one JSON object):

``visibility``: ``AUTOCOMMIT=False`` and REPEATABLE READ (or ``--isolation``). Django
connects; another session then commits a row; Django counts the rows. Plain Django sees it
(count 1): its transaction, and so its snapshot, starts with its first query. Reports the
driver's transaction state right after connect too.

``pool``: Django 5.1+'s PostgreSQL pool, ``--checkouts`` requests (connect, query, close:
back to the pool) over the ``--pool-size`` server connections of a full pool. Reports each
request's backend pid; the test counts the probes in the server's statement log.

``unit``: as ``visibility``, around ``unit_of_work(idle_check=0)``, whose liveness check
runs at the start of the second unit: the check takes no snapshot either.

``denied``: PostgreSQL, a role that cannot read ``pg_settings``, so the probe fails.
Reports the transaction state after connect and whether the application's first query
works.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    if args.vendor == "postgresql":
        from psycopg import IsolationLevel

        options: dict[str, Any] = {}
        if args.scenario == "visibility":
            options["isolation_level"] = IsolationLevel[args.isolation.upper().replace(" ", "_")]
        if args.scenario == "unit":
            options["isolation_level"] = IsolationLevel.REPEATABLE_READ
        if args.scenario == "pool":
            options["pool"] = {"min_size": args.pool_size, "max_size": args.pool_size,
                               "timeout": 30}
        return {
            "ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1",
            "PORT": args.port, "USER": args.user, "NAME": "forksafe", "OPTIONS": options,
            "AUTOCOMMIT": not args.no_autocommit,
            "CONN_MAX_AGE": None if args.scenario == "unit" else 0,
        }
    return {
        "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1", "PORT": args.port,
        "USER": "root", "PASSWORD": "", "NAME": "forksafe",
        "OPTIONS": {"isolation_level": args.isolation},
        "AUTOCOMMIT": not args.no_autocommit,
    }


def other_session(args: argparse.Namespace) -> Any:
    if args.vendor == "postgresql":
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=args.port, user="postgres",
                               dbname="forksafe", autocommit=True)
    import MySQLdb

    return MySQLdb.connect(host="127.0.0.1", port=args.port, user="root",
                           database="forksafe", autocommit=True)


def transaction_state(connection: Any, vendor: str) -> Any:
    """The driver's view (PostgreSQL) or the server's (MariaDB: @@in_transaction)."""
    if vendor == "postgresql":
        return connection.connection.info.transaction_status.name
    cur = connection.connection.cursor()
    cur.execute("SELECT @@in_transaction")  # reads no table: starts nothing itself
    (value,) = cur.fetchone()
    cur.close()
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True,
                        choices=["visibility", "pool", "denied", "unit"])
    parser.add_argument("--vendor", choices=["postgresql", "mysql"], default="postgresql")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--protect", type=int, default=1)
    parser.add_argument("--no-autocommit", action="store_true")
    parser.add_argument("--isolation", default="repeatable read")
    parser.add_argument("--table", default="probe_rows")
    parser.add_argument("--checkouts", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=4)
    args = parser.parse_args()

    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": settings_for(args)},
        INSTALLED_APPS=["forksafe.django"] if args.protect else [],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection

    report: dict[str, Any] = {"protect": bool(args.protect)}
    if args.scenario == "visibility":
        other = other_session(args)
        other.cursor().execute(f"DROP TABLE IF EXISTS {args.table}")
        other.cursor().execute(f"CREATE TABLE {args.table} (id INT PRIMARY KEY)")
        connection.ensure_connection()
        report["state_after_connect"] = transaction_state(connection, args.vendor)
        other.cursor().execute(f"INSERT INTO {args.table} VALUES (1)")  # commits at once
        with connection.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {args.table}")
            report["count"] = int(cur.fetchone()[0])
        connection.rollback()
        other.close()
    elif args.scenario == "unit":
        import forksafe.django

        other = other_session(args)
        other.cursor().execute(f"DROP TABLE IF EXISTS {args.table}")
        other.cursor().execute(f"CREATE TABLE {args.table} (id INT PRIMARY KEY)")
        with forksafe.django.unit_of_work(idle_check=0):  # the next one checks the connection
            with connection.cursor() as cur:
                cur.execute("SELECT 1")
            connection.commit()
        with forksafe.django.unit_of_work(idle_check=0):
            report["state_after_enter"] = transaction_state(connection, args.vendor)
            other.cursor().execute(f"INSERT INTO {args.table} VALUES (1)")
            with connection.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {args.table}")
                report["count"] = int(cur.fetchone()[0])
            connection.rollback()
        other.close()
    elif args.scenario == "pool":
        pids = []
        connection.pool.open()
        connection.pool.wait(timeout=60)  # all --pool-size server connections are open
        for _ in range(args.checkouts):
            with connection.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pids.append(int(cur.fetchone()[0]))
            connection.close()  # the end of a request: back to the pool
        report["backend_pids"] = pids
    else:
        connection.ensure_connection()
        report["state_after_connect"] = transaction_state(connection, args.vendor)
        try:
            with connection.cursor() as cur:
                cur.execute("SELECT 6 * 7")
                report["first_query"] = int(cur.fetchone()[0])
        except Exception as exc:
            report["first_query"] = f"{type(exc).__name__}: {exc}"[:300]
    import forksafe

    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    connection.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
