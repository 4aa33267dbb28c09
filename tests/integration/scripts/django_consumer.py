"""A Django queue consumer (the Kafka management command of the user story, with a plain
queue instead of Kafka): messages arrive with idle gaps longer than the server's
wait_timeout, and each is handled with a query.

``--mode plain``: no connection handling (the original bug). ``--mode django``: Django's own
``close_old_connections()`` around each message. ``--mode forksafe``: each message inside
``forksafe.django.unit_of_work()``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time

import django
from django.conf import settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["plain", "django", "forksafe"], required=True)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--gap", type=float, default=3.0)
    parser.add_argument("--conn-max-age", type=float, default=600)
    args = parser.parse_args()

    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.mysql", "HOST": "127.0.0.1", "PORT": args.port,
            "USER": "root", "PASSWORD": "", "NAME": "forksafe",
            "CONN_MAX_AGE": args.conn_max_age,
        }},
        INSTALLED_APPS=["forksafe.django"] if args.mode == "forksafe" else [],
        USE_TZ=True,
    )
    django.setup()
    from django.db import close_old_connections, connection

    inbox: queue.Queue[int | None] = queue.Queue()

    def producer() -> None:
        for n in range(1, args.messages + 1):
            inbox.put(n)
            time.sleep(args.gap)
        inbox.put(None)

    threading.Thread(target=producer, daemon=True).start()

    def handle(n: int) -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT %s * 7", [n])
            return int(cur.fetchone()[0])

    answers, errors = [], []
    while (n := inbox.get()) is not None:
        try:
            if args.mode == "forksafe":
                import forksafe.django

                with forksafe.django.unit_of_work():
                    answers.append(handle(n) == n * 7)
            elif args.mode == "django":
                close_old_connections()
                answers.append(handle(n) == n * 7)
                close_old_connections()
            else:
                answers.append(handle(n) == n * 7)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"mode": args.mode, "answers": answers, "errors": errors}))


if __name__ == "__main__":
    main()
