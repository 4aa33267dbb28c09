"""Behaviour under faults, as figures: a database restart and sessions killed under load.

The repro harness's app (`forksafe.testing.app`: ``GET /?n=<unique number>`` runs two
queries and answers what it read; every answer is checked against what that number must
get, so another request's rows count as a wrong answer) under uWSGI with 4 workers, in the
configurations of bench_throughput.py, plus the unprotected preloaded app as a control:

* **preload + forksafe**, **lazy-apps** (no forksafe), **NullPool** (preloaded, no
  forksafe), **pre_ping** (preloaded, no forksafe), **unprotected preload** (the bug).

Each configuration runs the same timeline on a private MariaDB: steady load from client
threads, from the moment the server first answers; from the first second one application
session is killed (``KILL CONNECTION``) every ``--kill-every`` seconds; once, the database
is restarted (down ``--down-for`` seconds). The table counts requests, wrong answers (other
requests' data), failed requests while the database was up (errors, hung or dropped
requests that did not overlap the restart: what kills and stale connections cost), per 1000
requests sent while up, those that overlapped the restart (they fail fast, so their number
says little), and the time from the database being back until the first request sent
after that succeeded::

    python bench/bench_faults.py                   # 20 s per configuration
    python bench/bench_faults.py --quick           # 5 s, two configurations

First, one table without a web server: **failed requests after a fault while idle**. For
each engine (plain, ``pool_pre_ping``, tracked by forksafe with its defaults) ``--pooled``
connections sit idle in the pool; the server closes them all (``KILL CONNECTION`` of each,
a restart, or the idle limit: a ``wait_timeout`` of 2 s the engines set on connect; the run
waits until the server no longer lists the sessions); then ``--pooled`` concurrent requests
(all checked out at once, then one ``SELECT 1`` each). Repeated ``--rounds`` times per
fault. Columns: requests, failed requests, and the liveness pings the engine sent (the
dialect's ``do_ping`` calls, counted in the client: MariaDB does not log a ping).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import random
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, ServerSpec, environment_note, print_table, serve, wait_for_workers

from forksafe.testing import checks
from forksafe.testing.load import classify_http
from forksafe.testing.servers import ServerSettings

APP = "forksafe.testing.app:application"

#: name -> (preload, forksafe, pool)
CONFIGS = {
    "preload + forksafe": (True, True, "queue"),
    "lazy-apps": (False, False, "queue"),
    "NullPool": (True, False, "null"),
    "pre_ping": (True, False, "pre_ping"),
    "unprotected preload": (True, False, "queue"),
}
QUICK = ("preload + forksafe", "pre_ping")

#: one request: (sent, answered, category), times from time.monotonic()
Request = tuple[float, float, str]


def one_request(port: int, n: int, timeout: float) -> str:
    """Send ``GET /?n=<n>`` and judge the answer with the harness's own checks."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", f"/?n={n}", headers={"Connection": "close"})
        response = conn.getresponse()
        return classify_http(n, response.status, response.read())[0]
    except (OSError, http.client.HTTPException):
        return checks.HUNG
    finally:
        conn.close()


def load(port: int, stop: threading.Event, clients: int, out: list[Request]) -> None:
    """``clients`` threads sending checked requests until ``stop`` is set."""
    numbers = itertools.count(1000)
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            with lock:
                n = next(numbers)
            sent = time.monotonic()
            category = one_request(port, n, timeout=5.0)
            with lock:
                out.append((sent, time.monotonic(), category))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def kill_sessions(server: object, stop: threading.Event, every: float, killed: list[int]) -> None:
    """Kill one random application session every ``every`` seconds (server errors skipped)."""
    rng = random.Random(6)
    while not stop.wait(every):
        try:
            rows = server.execute(  # type: ignore[attr-defined]
                "SELECT id FROM information_schema.processlist WHERE id <> CONNECTION_ID() "
                "AND user = 'root' AND command <> 'Daemon'"
            )
            if rows:
                victim = int(rng.choice(rows)[0])
                server.execute(f"KILL CONNECTION {victim}")  # type: ignore[attr-defined]
                killed.append(victim)
        except Exception:  # down for the restart, or the session ended meanwhile
            continue


def run_config(name: str, server: object, args: argparse.Namespace) -> dict[str, float]:
    """One configuration's timeline; returns its figures."""
    preload, protect, pool = CONFIGS[name]
    settings = ServerSettings(url=server.url(), mode="engine", protect=protect)  # type: ignore[attr-defined]
    spec = ServerSpec(
        server="uwsgi",
        app=APP,
        workers=args.workers,
        preload=preload,
        hook=protect,
        env={**settings.environment(), checks.ENV_POOL: pool},
        chdir=ROOT,
    )
    requests: list[Request] = []
    killed: list[int] = []
    with serve(spec) as running:
        # The load starts as soon as the server answers at all, so that the first requests
        # of every worker (where inherited connections do their damage) are counted too.
        wait_for_workers(running, 1, timeout=60, path="/health")
        port = int(running.base.rsplit(":", 1)[1])
        stop_load, stop_kills = threading.Event(), threading.Event()
        loader = threading.Thread(target=load, args=(port, stop_load, args.clients, requests))
        killer = threading.Thread(
            target=kill_sessions, args=(server, stop_kills, args.kill_every, killed)
        )
        start = time.monotonic()
        loader.start()
        time.sleep(1.0)
        killer.start()
        time.sleep(max(0.0, start + args.restart_at - time.monotonic()))
        down = time.monotonic()
        server.restart(down_for=args.down_for)  # type: ignore[attr-defined]
        back = time.monotonic()
        time.sleep(max(0.0, start + args.seconds - time.monotonic()))
        stop_kills.set()
        killer.join()
        stop_load.set()
        loader.join()

    failed = [r for r in requests if r[2] not in (checks.OK, checks.WRONG)]
    after = sorted(r for r in requests if r[0] >= back)
    first_ok = next((r for r in after if r[2] == checks.OK), None)
    return {
        "requests": len(requests),
        "wrong": sum(r[2] == checks.WRONG for r in requests),
        "failed": len(failed),
        "failed_up": sum(1 for r in failed if r[1] < down or r[0] > back),
        "recovery": (first_ok[1] - back) if first_ok else float("nan"),
        "killed": len(killed),
        "down": back - down,
    }


def _idle_engine(server: Any, fault: str, pooled: int, **options: Any) -> Any:
    from sqlalchemy import create_engine, event

    engine = create_engine(server.url(), pool_size=pooled, **options)
    if fault == "idle limit":
        @event.listens_for(engine, "connect")
        def short_limit(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION wait_timeout = 2")
            cursor.close()
    return engine


def _count_pings(engine: Any) -> list[int]:
    pings: list[int] = []
    original = engine.dialect.do_ping

    def counting(conn: Any) -> Any:
        pings.append(1)
        return original(conn)

    engine.dialect.do_ping = counting
    return pings


def _fill(engine: Any, pooled: int) -> set[int]:
    from sqlalchemy import text

    conns = [engine.connect() for _ in range(pooled)]
    ids = {int(c.execute(text("SELECT CONNECTION_ID()")).scalar()) for c in conns}
    for conn in conns:
        conn.close()
    return ids


def _requests(engine: Any, pooled: int) -> int:
    """``pooled`` concurrent requests; how many failed."""
    from sqlalchemy import exc, text

    failed = 0
    conns = [engine.connect() for _ in range(pooled)]
    for conn in conns:
        try:
            conn.execute(text("SELECT 1")).scalar()
        except exc.OperationalError:
            failed += 1
    for conn in conns:
        conn.close()
    return failed


def _close_sessions(server: Any, fault: str, ids: set[int]) -> None:
    """Apply ``fault``; return once the server no longer lists any of ``ids``."""
    if fault == "KILL":
        for cid in sorted(ids):
            server.execute(f"KILL CONNECTION {cid}")
    elif fault == "restart":
        server.restart()
    deadline = time.monotonic() + 120
    while ids & {int(r[0]) for r in server.execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()")}:
        if time.monotonic() > deadline:
            raise RuntimeError(f"after {fault}, the server still lists the pooled sessions")
        time.sleep(0.05)


def idle_faults(server: Any, rounds: int, pooled: int) -> list[list[object]]:
    """Rows of the failed-requests-after-an-idle-fault table."""
    import forksafe

    rows: list[list[object]] = []
    for fault in ("KILL", "restart", "idle limit"):
        totals = {name: [0, 0, 0] for name in ("plain", "pool_pre_ping", "forksafe")}
        for _ in range(rounds):
            engines = {
                "plain": _idle_engine(server, fault, pooled),
                "pool_pre_ping": _idle_engine(server, fault, pooled, pool_pre_ping=True),
                "forksafe": forksafe.track(_idle_engine(server, fault, pooled)),
            }
            pings = {name: _count_pings(engine) for name, engine in engines.items()}
            ids: set[int] = set()
            for engine in engines.values():
                ids |= _fill(engine, pooled)
            _close_sessions(server, fault, ids)
            for name, engine in engines.items():
                totals[name][0] += pooled
                totals[name][1] += _requests(engine, pooled)
                totals[name][2] += len(pings[name])
                forksafe.untrack(engine)
                engine.dispose()
        rows += [[name, fault, *figures] for name, figures in totals.items()]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s, two configurations")
    parser.add_argument("--seconds", type=float, default=20.0, help="per configuration")
    parser.add_argument("--restart-at", type=float, default=8.0, help="seconds into the run")
    parser.add_argument("--down-for", type=float, default=1.0)
    parser.add_argument("--kill-every", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--rounds", type=int, default=5, help="idle faults: rounds per fault")
    parser.add_argument("--pooled", type=int, default=8, help="idle faults: pooled connections")
    args = parser.parse_args()
    names = list(QUICK) if args.quick else args.configs.split(",")
    if args.quick:
        args.seconds, args.restart_at, args.rounds, args.pooled = 5.0, 2.5, 1, 4
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"bench_faults: unknown config {unknown[0]!r}: pick from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2

    from forksafe.testing.mariadb import MariaDB
    from forksafe.testing.repro import _seed

    print(environment_note() + f", uWSGI {args.workers} workers, {args.clients} clients, "
          f"{args.seconds:g} s each: a KILL every {args.kill_every:g} s from 1 s, a restart "
          f"at {args.restart_at:g} s (down {args.down_for:g} s + start-up)")
    results = {}
    with MariaDB(general_log=False) as server:
        print_table(
            f"after a fault while idle: {args.pooled} pooled connections closed by the server, "
            f"then {args.pooled} concurrent requests, {args.rounds} rounds",
            ["engine", "fault", "requests", "failed", "pings"],
            idle_faults(server, args.rounds, args.pooled),
        )
        _seed(SimpleNamespace(url=server.url(), safe_url=server.url(), description=""))
        for name in names:
            results[name] = run_config(name, server, args)
    print_table(
        "under faults: wrong answers, failed requests, recovery after the restart",
        ["config", "requests", "wrong", "failed while up", "per 1000 while up",
         "failed in restart", "kills", "first ok after back s"],
        [
            [name, r["requests"], r["wrong"], r["failed_up"],
             f"{r['failed_up'] / max(r['requests'] - r['failed'] + r['failed_up'], 1) * 1000:.2f}",
             r["failed"] - r["failed_up"], r["killed"], f"{r['recovery']:.3f}"]
            for name, r in results.items()
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
