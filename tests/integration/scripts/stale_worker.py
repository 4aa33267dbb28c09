"""One load worker for the restart / KILL tests: reads with known answers and writes.

``--mode forksafe``: a tracked engine, every unit of work wrapped in
``forksafe.retry_on_disconnect``. ``--mode plain``: a plain engine, no retry.

Reads ``SELECT v FROM kv WHERE k = :k`` (v is always k * 7, so a wrong answer is
visible). Writes insert ``(worker, seq)`` in a transaction; a write counts as acknowledged
only when its COMMIT returned. Prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter

from sqlalchemy import create_engine, text

import forksafe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=["forksafe", "plain"], required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--stop-file", default="",
                        help="run until this file exists (--seconds is then only a cap)")
    args = parser.parse_args()

    engine = create_engine(args.url, pool_size=2)
    if args.mode == "forksafe":
        forksafe.track(engine, idle_check=1.0)

    def read(k: int) -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT v FROM kv WHERE k = :k"), {"k": k}).scalar())

    def write(seq: int) -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO writes (worker, seq) VALUES (:w, :s)"),
                         {"w": args.worker, "s": seq})

    if args.mode == "forksafe":
        retry = forksafe.retry_on_disconnect(attempts=30, backoff=0.05, max_backoff=0.5,
                                             timeout=25)
        read, write = retry(read), retry(write)

    reads_ok = wrong = 0
    errors: Counter[str] = Counter()
    acked: list[int] = []
    unknown: list[int] = []
    read_times: list[float] = []
    seq = 0
    start = time.time()
    while time.time() - start < args.seconds and not (
        args.stop_file and os.path.exists(args.stop_file)
    ):
        k = random.randrange(1, args.rows + 1)
        try:
            value = read(k)
            if value == k * 7:
                reads_ok += 1
                read_times.append(time.time())
            else:
                wrong += 1
        except Exception as exc:
            kind = forksafe.errors.classify(exc)
            errors[kind.code if kind else type(exc).__name__] += 1
        seq += 1
        try:
            write(seq)
            acked.append(seq)
        except forksafe.CommitUnknownError:
            unknown.append(seq)
        except Exception as exc:
            kind = forksafe.errors.classify(exc)
            errors[kind.code if kind else type(exc).__name__] += 1
        time.sleep(0.005)
    print(json.dumps({
        "worker": args.worker, "mode": args.mode, "reads_ok": reads_ok, "wrong": wrong,
        "errors": dict(errors), "acked": acked, "unknown": unknown,
        "last_read": max(read_times, default=0.0), "read_times": read_times,
    }))


if __name__ == "__main__":
    main()
