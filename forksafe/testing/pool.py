"""The ``multiprocessing`` scenario: ``python -m forksafe.testing.pool`` (run by forksafe repro).

Imports `forksafe.testing.app` (so the database is created and used in this process), then
forks a ``multiprocessing`` pool with the ``fork`` start method and runs every request as a
task in the pool's workers, concurrently. Each task's answer is checked here with the same
rules as an HTTP answer. Prints one JSON line ``{"outcomes": [[n, category, message], ...],
"pids": [...]}``. Hung tasks are bounded by ``--deadline``; the pool is terminated at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any

__all__ = ["main"]


def _task(n: int) -> dict[str, Any]:
    from forksafe.testing import app

    return app.answer(n)


def main(argv: list[str] | None = None) -> int:
    """Run the pool scenario and print its outcomes as JSON."""
    parser = argparse.ArgumentParser(prog="python -m forksafe.testing.pool")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds for all tasks")
    args = parser.parse_args(argv)

    from forksafe.testing import app, checks

    app.DB.answer(0)  # used in the parent right before the fork, as at import
    context = multiprocessing.get_context("fork")
    pool = context.Pool(args.workers)
    outcomes: list[list[Any]] = []
    pids: set[int] = set()
    try:
        pending = [(n, pool.apply_async(_task, (n,))) for n in range(1, args.requests + 1)]
        end = time.monotonic() + args.deadline
        for n, result in pending:
            try:
                body = result.get(timeout=max(0.0, end - time.monotonic()))
            except multiprocessing.TimeoutError:
                outcomes.append([n, checks.HUNG, "no answer before the deadline"])
                continue
            except Exception as exc:
                outcomes.append([n, checks.classify_exception(exc), str(exc)[:300]])
                continue
            if "error" in body:
                category = body["error"]
                if category not in checks.ERROR_CATEGORIES:
                    category = checks.OTHER
                outcomes.append([n, category, str(body.get("message", ""))[:300]])
            else:
                pids.add(int(body.get("pid", 0)))
                outcomes.append([n, checks.validate_answer(n, body), ""])
    finally:
        pool.terminate()
    sys.stdout.write(json.dumps({"outcomes": outcomes, "pids": sorted(pids)}) + "\n")
    sys.stdout.flush()
    os._exit(0)  # the parent's own connection is left alone: no destructor runs at exit


if __name__ == "__main__":
    sys.exit(main())
