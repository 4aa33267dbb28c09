"""Checkout + ``SELECT 1`` cycles: plain pool, ``pool_pre_ping``, ``NullPool``, forksafe.

Five engines on one private MariaDB (or ``--url``): a plain ``QueuePool``, the same with
``pool_pre_ping=True``, a ``NullPool`` (a connect per checkout), and the plain pool tracked by
forksafe, with its defaults (fork check plus idle liveness) and with the fork check alone
(``idle_check=None, recycle=None``). Rounds are interleaved (each engine once per round, in
a shuffled order, on a fresh connection) so that drift on a shared machine, and the luck of
one connection's server thread, hit all of them alike. Prints
the median µs per cycle of each and the ratios to the plain pool, from one run::

    python bench/bench_checkout.py            # starts a private MariaDB
    python bench/bench_checkout.py --url mysql+mysqldb://root@127.0.0.1:3306/test
    python bench/bench_checkout.py --quick    # a smoke run of a few seconds

Also prints a checkout-only cycle (no query, but the pool's rollback on return is a round
trip), the same without reset-on-return (no byte to the server: the pool's CPU alone, where
forksafe's share is easiest to see), and forksafe's per-checkout work timed by itself: the
fork check (the checkout listener's pid comparison) and the whole checkout listener as the
pool dispatches it, as shares of the plain pool's cycles.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import forksafe
from forksafe import _fork

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import database, environment_note, print_table


def cycle_query(engine: Any, n: int) -> float:
    """µs per checkout + SELECT 1 + return, over n cycles."""
    select = text("SELECT 1")
    start = time.perf_counter()
    for _ in range(n):
        with engine.connect() as conn:
            conn.execute(select).scalar()
    return (time.perf_counter() - start) / n * 1e6


def cycle_checkout(engine: Any, n: int) -> float:
    """µs per raw checkout + return (no query), over n cycles."""
    start = time.perf_counter()
    for _ in range(n):
        engine.raw_connection().close()
    return (time.perf_counter() - start) / n * 1e6


def fork_check_ns(loops: int = 1_000_000) -> float:
    """ns for the checkout listener's fork check, ``os.getpid() != _fork.current_pid()``."""
    timer = timeit.Timer(
        "getpid() != current_pid()",
        globals={"getpid": os.getpid, "current_pid": _fork.current_pid},
    )
    empty = timeit.Timer("pass")
    best = min(timer.timeit(loops) for _ in range(5))
    base = min(empty.timeit(loops) for _ in range(5))
    return max(best - base, 0.0) / loops * 1e9


def listener_ns(engine: Any, loops: int = 200_000) -> float:
    """ns per call of the engine's checkout listeners, dispatched as the pool does."""
    fairy = engine.raw_connection()
    try:
        args = (fairy.dbapi_connection, fairy._connection_record, fairy)
        dispatch = engine.pool.dispatch.checkout
        timer = timeit.Timer("dispatch(*args)", globals={"dispatch": dispatch, "args": args})
        return min(timer.timeit(loops) for _ in range(5)) / loops * 1e9
    finally:
        fairy.close()


def make_engines(url: str, **options: Any) -> dict[str, Any]:
    """The five engines compared, with the same extra ``options``."""
    return {
        "plain pool": create_engine(url, **options),
        "pool_pre_ping": create_engine(url, pool_pre_ping=True, **options),
        "NullPool": create_engine(url, poolclass=NullPool, **options),
        "forksafe": forksafe.track(create_engine(url, **options)),
        "forksafe fork check only": forksafe.track(
            create_engine(url, **options), idle_check=None, recycle=None
        ),
    }


def run(url: str, rounds: int, cycles: int) -> None:
    engines = make_engines(url)
    no_reset = make_engines(url, pool_reset_on_return=None)
    kinds: list[tuple[str, Callable[[Any, int], float], dict[str, Any]]] = [
        ("checkout + SELECT 1", cycle_query, engines),
        ("checkout only", cycle_checkout, engines),
        # without the rollback on return no byte goes to the server: the pool's CPU alone
        ("checkout only, no reset on return", cycle_checkout, no_reset),
    ]
    plain: dict[str, float] = {}
    rng = random.Random(6)
    for kind, fn, group in kinds:
        samples: dict[str, list[float]] = {name: [] for name in group}
        for _ in range(rounds):
            # A fresh connection for every engine in every round, in a shuffled order: the
            # speed of one loopback connection depends on where the scheduler puts its
            # server thread, and would otherwise favour one engine for the whole run.
            order = list(group.items())
            rng.shuffle(order)
            for name, engine in order:
                engine.dispose()
                cycle_query(engine, 50)  # connect, first-use costs
                samples[name].append(fn(engine, cycles))
        base = plain[kind] = statistics.median(samples["plain pool"])
        print_table(
            f"{kind}: median of {rounds} rounds x {cycles} cycles",
            ["engine", "µs/cycle", "vs plain"],
            [
                [name, f"{statistics.median(v):.1f}", f"{statistics.median(v) / base:.3f}"]
                for name, v in samples.items()
            ],
        )
    check = fork_check_ns()
    listeners = {
        "fork check alone": check,
        "forksafe checkout listener, fork check only": listener_ns(
            engines["forksafe fork check only"]
        ),
        "forksafe checkout listener, defaults": listener_ns(engines["forksafe"]),
    }
    print_table(
        "forksafe's per-checkout work, timed alone, as a share of the plain pool's cycles",
        ["work", "ns", *[f"% of {kind}" for kind in plain]],
        [
            [what, f"{ns:.0f}", *[f"{ns / 1000 / us * 100:.3f}" for us in plain.values()]]
            for what, ns in listeners.items()
        ],
    )
    for engine in [*engines.values(), *no_reset.values()]:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: a private MariaDB)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 200 cycles")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.cycles = 3, 200
    print(environment_note())
    with database(args.url) as url:
        run(url, args.rounds, args.cycles)


if __name__ == "__main__":
    main()
