"""A Django queue consumer whose connection is killed between two messages.

Messages are read from stdin, one number a line; each is stored as a row (the message's
work) and answered on stdout with one JSON line: the connection id that served it, the
attempts it took, or the error that lost it. The test kills the session between messages.

``--mode unit``: each message inside ``forksafe.django.unit_of_work()`` (the README's
first example). ``--mode retry``: the same, and the handler is
``@forksafe.django.retry_on_disconnect`` around ``transaction.atomic()``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["unit", "retry"], required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()

    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1", "PORT": args.port,
            "USER": "root", "PASSWORD": "", "NAME": "forksafe", "CONN_MAX_AGE": None,
        }},
        INSTALLED_APPS=["forksafe.django"],
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection, transaction

    import forksafe.django

    attempts = 0

    def work(n: int) -> int:
        with connection.cursor() as cur:
            cur.execute(f"INSERT INTO {args.table} VALUES (%s)", [n])
            cur.execute("SELECT CONNECTION_ID()")
            return int(cur.fetchone()[0])

    @forksafe.django.retry_on_disconnect(attempts=5)
    def handle_with_retry(n: int) -> int:
        nonlocal attempts
        attempts += 1
        with transaction.atomic():
            return work(n)

    with connection.cursor() as cur:
        cur.execute(f"CREATE TABLE {args.table} (n INT PRIMARY KEY) ENGINE=InnoDB")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        attempts = 0
        reply: dict = {"n": n}  # attempts: runs of the retried function (retry mode)
        try:
            with forksafe.django.unit_of_work():
                reply["connection_id"] = (
                    handle_with_retry(n) if args.mode == "retry" else work(n)
                )
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"[:300]
        reply["attempts"] = attempts
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
