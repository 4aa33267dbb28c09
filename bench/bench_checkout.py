"""What a tracked engine costs per checkout, measured in pairs; and forksafe's reset and registry.

**Paired design.** Every engine compared is a ``QueuePool`` of one connection, and all of
them share *one* mysqlclient connection (``creator=`` returns it), so that every engine
talks to the same server thread over the same socket: the luck of one connection's
placement, which moves a loopback cycle by 20% between connections, cancels out. Batches of
``--cycles`` cycles run in ABBA order (A, B, B, A) and each group of four gives one ratio
``(B1 + B2) / (A1 + A2)``; the table shows the median of ``--pairs`` such ratios with its
interquartile range. An A/A row (plain against a second plain engine) is the noise floor
printed beside it: a difference smaller than the A/A spread is not a difference. All
comparisons are interleaved pair by pair, so drift hits them alike::

    python bench/bench_checkout.py            # starts a private MariaDB
    python bench/bench_checkout.py --url mysql+mysqldb://root@127.0.0.1:3306/test
    python bench/bench_checkout.py --quick    # a smoke run of a few seconds

Engines: plain, a second plain one (A/A), tracked with forksafe's defaults (the pid check
and a zero-timeout ``poll()`` of the socket at every checkout), the same polling only
connections whose previous checkout is at least 1 ms old (``forksafe.sqlalchemy.POLL_AFTER``),
tracked with ``idle_check=None, recycle=None``, and ``pool_pre_ping``.

Cycles: ``checkout + SELECT 1`` (``with engine.connect() as c: c.execute(...)``, the
pool's rollback on return included) and the bare pool cycle (``raw_connection().close()``
with ``pool_reset_on_return=None``: no byte to the server, the pool's CPU alone, where
forksafe's share is easiest to see).

Also printed: forksafe's per-checkout work timed by itself (the pid comparison and the
zero-timeout ``poll()`` of the socket); the time a child takes to reset with ``--engines``
tracked engines (each holding a pooled connection), after a fork no hook saw (libc
``fork``), median of 5 children; and the registry after ``--connections`` tracked
connections were opened and dropped (entries left, memory kept, by ``tracemalloc``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import select
import statistics
import struct
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import forksafe
from forksafe import sqlalchemy as adapter_module
from forksafe._registry import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import database, environment_note, print_table

SELECT_1 = text("SELECT 1")


def batch_query(engine: Any, n: int) -> float:
    """Seconds for n checkout + SELECT 1 + return cycles."""
    start = time.perf_counter()
    for _ in range(n):
        with engine.connect() as conn:
            conn.execute(SELECT_1).scalar()
    return time.perf_counter() - start


def batch_bare(engine: Any, n: int) -> float:
    """Seconds for n raw checkouts + returns (the engines have no reset on return)."""
    start = time.perf_counter()
    for _ in range(n):
        engine.raw_connection().close()
    return time.perf_counter() - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def paired_engines(url: str, shared: Any, **options: Any) -> dict[str, Any]:
    """Engines on the one shared DBAPI connection: the plain baseline first."""

    def make(**extra: Any) -> Any:
        return create_engine(url, creator=lambda: shared, pool_size=1, max_overflow=0,
                             **options, **extra)

    return {
        "plain": make(),
        "plain (A/A)": make(),
        "forksafe": forksafe.track(make()),
        POLL_1MS: forksafe.track(make()),
        "forksafe fork check only": forksafe.track(make(), idle_check=None, recycle=None),
        "pool_pre_ping": make(pool_pre_ping=True),
    }


#: the tracked engine with the socket polled only after 1 ms since the previous checkout
POLL_1MS = "forksafe, poll after 1 ms"


def timed(name: str, fn: Callable[[Any, int], float], engine: Any, n: int) -> float:
    if name != POLL_1MS:
        return fn(engine, n)
    adapter_module.POLL_AFTER = 0.001
    try:
        return fn(engine, n)
    finally:
        adapter_module.POLL_AFTER = 0.0


def run_paired(url: str, pairs: int, cycles: int) -> None:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    import MySQLdb

    def connect() -> Any:
        return MySQLdb.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                               user=u.username or "root", password=u.password or "",
                               database=u.database or "")

    kinds: list[tuple[str, Callable[[Any, int], float], dict[str, Any]]] = [
        ("checkout + SELECT 1", batch_query, paired_engines(url, connect())),
        ("bare pool cycle (no reset on return)", batch_bare,
         paired_engines(url, connect(), pool_reset_on_return=None)),
    ]
    for _, fn, group in kinds:  # first connect, dialect initialisation, first-use costs
        for engine in group.values():
            fn(engine, 20)
    ratios: dict[str, dict[str, list[float]]] = {k: {} for k, _, _ in kinds}
    seconds: dict[str, dict[str, list[float]]] = {k: {} for k, _, _ in kinds}
    for _ in range(pairs):
        for kind, fn, group in kinds:
            base = group["plain"]
            for name, engine in group.items():
                if name == "plain":
                    continue
                a1 = fn(base, cycles)
                b1 = timed(name, fn, engine, cycles)
                b2 = timed(name, fn, engine, cycles)
                a2 = fn(base, cycles)
                ratios[kind].setdefault(name, []).append((b1 + b2) / (a1 + a2))
                seconds[kind].setdefault(name, []).append((b1 + b2) / 2)
                seconds[kind].setdefault("plain", []).append((a1 + a2) / 2)
    for kind, _, group in kinds:
        plain_us = statistics.median(seconds[kind]["plain"]) / cycles * 1e6
        floor = quartiles(ratios[kind]["plain (A/A)"])
        rows = [["plain", f"{plain_us:.1f}", "1.000", "-", "-"]]
        for name in group:
            if name == "plain":
                continue
            q1, q2, q3 = quartiles(ratios[kind][name])
            us = statistics.median(seconds[kind][name]) / cycles * 1e6
            rows.append([name, f"{us:.1f}", f"{q2:.4f}", f"{q1:.4f}", f"{q3:.4f}"])
        print_table(
            f"{kind}: median of {pairs} ABBA ratios, {cycles} cycles per batch, one shared "
            f"connection (A/A floor {floor[1]:.4f}, IQR {floor[0]:.4f}-{floor[2]:.4f})",
            ["engine", "µs/cycle", "vs plain", "q1", "q3"],
            rows,
        )
    for _, _, group in kinds:
        for name, engine in group.items():
            if name.startswith("forksafe"):
                forksafe.untrack(engine)


def per_checkout_work() -> None:
    """forksafe's own per-checkout work, timed alone."""
    import socket

    a, b = socket.socketpair()
    poller = select.poll()
    poller.register(a.fileno(), select.POLLIN | select.POLLPRI)
    loops = 200_000
    empty = min(timeit.repeat("pass", number=loops, repeat=5))

    def ns(stmt: str, env: dict[str, Any]) -> float:
        best = min(timeit.repeat(stmt, globals=env, number=loops, repeat=5))
        return max(best - empty, 0.0) / loops * 1e9

    rows = [
        ["pid comparison (os.getpid() != pool pid)",
         f"{ns('getpid() != pid', {'getpid': os.getpid, 'pid': os.getpid()}):.0f}"],
        ["zero-timeout poll() of the socket", f"{ns('p.poll(0)', {'p': poller}):.0f}"],
        ["clock read (time.monotonic)",
         f"{ns('m()', {'m': time.monotonic}):.0f}"],
    ]
    a.close()
    b.close()
    print_table("forksafe's per-checkout work, timed alone", ["work", "ns"], rows)


def reset_time(url: str, engines: int, children: int = 5) -> None:
    """ms for forksafe's reset in a child with ``engines`` tracked engines."""
    libc = ctypes.CDLL(None, use_errno=True)
    tracked = [forksafe.track(create_engine(url, pool_size=1)) for _ in range(engines)]
    for engine in tracked:
        with engine.connect() as conn:
            conn.execute(SELECT_1)
    times = []
    for _ in range(children):
        read, write = os.pipe()
        pid = int(libc.fork())  # no Python hook runs: the reset below is the whole reset
        if pid == 0:  # pragma: no cover - child
            try:
                started = time.perf_counter()
                forksafe.after_fork()
                os.write(write, struct.pack("d", time.perf_counter() - started))
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        data = os.read(read, 8)
        os.close(read)
        times.append(struct.unpack("d", data)[0] * 1000)
    for engine in tracked:
        forksafe.untrack(engine)
        engine.dispose()
    print_table(
        f"reset in a child (fork no hook saw), {engines} tracked engines with a pooled "
        f"connection each: {children} children",
        ["figure", "ms"],
        [["median", f"{statistics.median(times):.2f}"], ["max", f"{max(times):.2f}"]],
    )


def registry_memory(url: str, connections: int) -> None:
    """The registry after ``connections`` tracked connections were opened and dropped."""
    engine = forksafe.track(create_engine(url, poolclass=NullPool))
    with engine.connect() as conn:  # imports, dialect initialisation
        conn.execute(SELECT_1)
    gc.collect()
    before_entries = len(REGISTRY.snapshot()[0])
    tracemalloc.start()
    start_mem = tracemalloc.get_traced_memory()[0]
    peak_entries = 0
    for i in range(connections):
        with engine.connect() as conn:
            conn.execute(SELECT_1)
        if i % 1000 == 0:
            peak_entries = max(peak_entries, len(REGISTRY.snapshot()[0]))
    gc.collect()
    end_mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    after_entries = len(REGISTRY.snapshot()[0])
    forksafe.untrack(engine)
    engine.dispose()
    print_table(
        f"registry after {connections} tracked connections opened and dropped",
        ["figure", "value"],
        [["entries before", before_entries], ["entries after", after_entries],
         ["memory kept, KiB", f"{(end_mem - start_mem) / 1024:.1f}"]],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: a private MariaDB)")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--engines", type=int, default=100)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true",
                        help="10 pairs of 20 cycles, 10 engines, 300 connections")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.cycles, args.engines, args.connections = 10, 20, 10, 300
    print(environment_note())
    with database(args.url) as url:
        run_paired(url, args.pairs, args.cycles)
        per_checkout_work()
        reset_time(url, args.engines)
        registry_memory(url, args.connections)


if __name__ == "__main__":
    main()
