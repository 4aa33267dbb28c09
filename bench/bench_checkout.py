"""Checkout + ``SELECT 1`` cycles: plain pool, ``pool_pre_ping``, forksafe's liveness.

Three engines on one private MariaDB (or ``--url``); rounds are interleaved (plain, pre-ping,
forksafe, plain, ...) so that drift on a shared machine hits all three alike. Prints the
median µs per cycle of each and the ratios to the plain pool, from one run::

    python bench/bench_checkout.py            # starts a private MariaDB
    python bench/bench_checkout.py --url mysql+mysqldb://root@127.0.0.1:3306/test

Also prints a checkout-only cycle (no query), where forksafe's share is easiest to see.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text

import forksafe


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


def run(url: str, rounds: int, cycles: int) -> None:
    engines = {
        "plain pool": create_engine(url),
        "pool_pre_ping": create_engine(url, pool_pre_ping=True),
        "forksafe": forksafe.track(create_engine(url)),
    }
    kinds: dict[str, Callable[[Any, int], float]] = {
        "checkout + SELECT 1": cycle_query,
        "checkout only": cycle_checkout,
    }
    for engine in engines.values():  # warm up: connect, first-use costs
        cycle_query(engine, 200)
    for kind, fn in kinds.items():
        samples: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):
            for name, engine in engines.items():
                samples[name].append(fn(engine, cycles))
        base = statistics.median(samples["plain pool"])
        print(f"\n{kind}: median of {rounds} rounds x {cycles} cycles")
        print(f"  {'engine':<15}{'µs/cycle':>10}{'vs plain':>10}")
        for name, values in samples.items():
            med = statistics.median(values)
            print(f"  {name:<15}{med:>10.1f}{med / base:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: a private MariaDB)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
    if args.url:
        run(args.url, args.rounds, args.cycles)
        return
    from forksafe.testing.mariadb import MariaDB

    with MariaDB(general_log=False) as server:
        run(server.url(), args.rounds, args.cycles)


if __name__ == "__main__":
    main()
