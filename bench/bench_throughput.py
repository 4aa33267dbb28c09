"""Throughput and latency of the Flask example under ``wrk``, in four configurations.

The Flask example (examples/flask_app, ``GET /products/<random id>.json``: one query per
request) under uWSGI (or ``--server gunicorn``), the same worker count in each:

* **preload + forksafe**: loaded once, then forked; the engine tracked by forksafe, a
  ``QueuePool`` without pre-ping;
* **lazy-apps**: every worker loads the app (uWSGI ``lazy-apps`` / gunicorn without
  ``preload_app``), a ``QueuePool``, no forksafe;
* **NullPool**: preloaded, a connect per request, no forksafe;
* **pre_ping**: preloaded, ``pool_pre_ping=True`` (a round trip per checkout), no forksafe.

The four servers run side by side; ``wrk`` (on loopback, ``--latency``) loads one at a
time, in interleaved rounds, and the table gives the median requests/s, p50 and p99 of the
rounds, the requests that failed (non-2xx or socket errors), and requests/s as a ratio to
preload + forksafe. ``wrk`` cannot check the bodies: correctness is bench_faults.py's job.
Failed counts non-2xx answers, connect errors and timeouts, not wrk's "read" socket errors:
uWSGI's ``http-socket`` and gunicorn's sync workers close the connection after every
answer (no keep-alive), which wrk counts as a read error on every request::

    python bench/bench_throughput.py                      # 3 rounds x 8 s each
    python bench/bench_throughput.py --quick              # 1 round x 1 s
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ServerSpec,
    database,
    environment_note,
    median,
    print_table,
    serve,
    wait_for_workers,
)

SCRIPT = Path(__file__).resolve().parent / "wrk_products.lua"

#: name -> (preload, forksafe, BENCH_POOL)
CONFIGS = {
    "preload + forksafe": (True, True, "queue"),
    "lazy-apps": (False, False, "queue"),
    "NullPool": (True, False, "null"),
    "pre_ping": (True, False, "pre_ping"),
}

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p50/p99 in ms and failed requests from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (rps and p50 and p99):
        raise ValueError("wrk printed no figures: " + " | ".join(output.splitlines()[-5:]))
    failed = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        failed += int(non2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        output)
    if sockets:  # read errors left out: see the module docstring
        failed += int(sockets.group(1)) + int(sockets.group(4))
    return {"rps": float(rps.group(1)), "p50": _ms(p50.group(1)), "p99": _ms(p99.group(1)),
            "failed": failed}


def run_wrk(base: str, seconds: int, connections: int, threads: int) -> dict[str, float]:
    """One ``wrk`` run against ``base``."""
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
        "--timeout", "5s", "-s", str(SCRIPT), base,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30,
                          check=False)
    return parse_wrk(done.stdout + done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: a private MariaDB)")
    parser.add_argument("--server", choices=("uwsgi", "gunicorn"), default="uwsgi")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 round x 1 s, 2 workers")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.workers = 1, 1, 2
    if shutil.which("wrk") is None:
        print("bench_throughput: wrk not found: apt-get install wrk (scripts/setup does)",
              file=sys.stderr)
        return 2

    print(environment_note() + f", {args.server}, {args.workers} workers, wrk -t2 "
          f"-c{args.connections} -d{args.seconds}s, {args.rounds} interleaved rounds")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    with database(args.url) as url, contextlib.ExitStack() as stack:
        bases = {}
        for name, (preload, protect, pool) in CONFIGS.items():
            spec = ServerSpec(
                server=args.server,
                app="flask_bench:application",
                workers=args.workers,
                preload=preload,
                hook=protect,
                env={"DATABASE_URL": url, "BENCH_POOL": pool,
                     "BENCH_FORKSAFE": "1" if protect else "0"},
            )
            running = stack.enter_context(serve(spec))
            wait_for_workers(running, args.workers)
            bases[name] = running.base
        for base in bases.values() if not args.quick else ():
            run_wrk(base, 2, args.connections, 2)  # warm up every worker's pool and code
        for _ in range(args.rounds):
            for name, base in bases.items():
                samples[name].append(run_wrk(base, args.seconds, args.connections, 2))

    reference = median([s["rps"] for s in samples["preload + forksafe"]])
    rows = []
    for name, runs in samples.items():
        rps = median([s["rps"] for s in runs])
        rows.append([
            name, f"{rps:.0f}", f"{median([s['p50'] for s in runs]):.2f}",
            f"{median([s['p99'] for s in runs]):.2f}", f"{sum(s['failed'] for s in runs):.0f}",
            f"{rps / reference:.3f}",
        ])
    print_table(
        f"throughput, {args.server} {args.workers} workers (medians of {args.rounds} rounds)",
        ["config", "req/s", "p50 ms", "p99 ms", "failed", "vs forksafe"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
