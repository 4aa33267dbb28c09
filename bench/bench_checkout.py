"""What a tracked engine costs per checkout, measured in pairs; and forksafe's reset and registry.

**Paired design.** Every engine compared is a ``QueuePool`` of one connection, and all of
them share *one* mysqlclient connection (``creator=`` returns it), so that every engine
talks to the same server thread over the same socket: the luck of one connection's
placement, which moves a loopback cycle by 20% between connections, cancels out. Batches of
``--cycles`` cycles run in ABBA order (A, B, B, A) and each group of four gives one ratio
``(B1 + B2) / (A1 + A2)``; the table shows the median of ``--pairs`` such ratios with its
interquartile range, by the wall clock and by this process's CPU time (the client's own
work, which is where forksafe's cost is; it is far less disturbed by other processes on a
shared machine than the wall clock). An A/A row (plain against a second plain engine) is
the noise floor printed beside it: a difference smaller than the A/A spread is not one. All
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


Timing = tuple[float, float]  # (wall seconds, this process's CPU seconds)


def batch_query(engine: Any, n: int) -> Timing:
    """Wall and CPU seconds for n checkout + SELECT 1 + return cycles."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        with engine.connect() as conn:
            conn.execute(SELECT_1).scalar()
    return time.perf_counter() - start, time.process_time() - cpu


def batch_bare(engine: Any, n: int) -> Timing:
    """Wall and CPU seconds for n raw checkouts + returns (no reset on return)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        engine.raw_connection().close()
    return time.perf_counter() - start, time.process_time() - cpu


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


def timed(name: str, fn: Callable[[Any, int], Timing], engine: Any, n: int) -> Timing:
    if name != POLL_1MS:
        return fn(engine, n)
    adapter_module.POLL_AFTER = 0.001
    try:
        return fn(engine, n)
    finally:
        adapter_module.POLL_AFTER = 0.0


def print_ratios(kind: str, names: list[str], pairs: int, cycles: int, *,
                 ratios: dict[str, tuple[list[float], list[float]]],
                 seconds: dict[str, tuple[list[float], list[float]]]) -> None:
    """One table per clock: µs per cycle, and the median ratio to plain with its IQR."""
    for clock, label in ((0, "wall clock"), (1, "CPU time of this process")):
        plain_us = statistics.median(seconds["plain"][clock]) * 1e6
        floor = quartiles(ratios["plain (A/A)"][clock])
        rows = [["plain", f"{plain_us:.1f}", "1.000", "-", "-"]]
        for name in names:
            if name == "plain":
                continue
            q1, q2, q3 = quartiles(ratios[name][clock])
            us = statistics.median(seconds[name][clock]) * 1e6
            rows.append([name, f"{us:.1f}", f"{q2:.4f}", f"{q1:.4f}", f"{q3:.4f}"])
        print_table(
            f"{kind}, {label}: median of {pairs} ABBA ratios, {cycles} cycles per batch, "
            f"one shared connection (A/A floor {floor[1]:.4f}, IQR "
            f"{floor[0]:.4f}-{floor[2]:.4f})",
            ["engine", "µs/cycle", "vs plain", "q1", "q3"],
            rows,
        )


def run_paired(url: str, pairs: int, cycles: int) -> None:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    import MySQLdb

    def connect() -> Any:
        return MySQLdb.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                               user=u.username or "root", password=u.password or "",
                               database=u.database or "")

    kinds: list[tuple[str, Callable[[Any, int], Timing], dict[str, Any]]] = [
        ("checkout + SELECT 1", batch_query, paired_engines(url, connect())),
        ("bare pool cycle (no reset on return)", batch_bare,
         paired_engines(url, connect(), pool_reset_on_return=None)),
    ]
    for _, fn, group in kinds:  # first connect, dialect initialisation, first-use costs
        for engine in group.values():
            fn(engine, 20)
    # [kind][engine][clock] -> per-pair ratios / per-cycle seconds; clock 0 wall, 1 CPU
    ratios: dict[str, dict[str, tuple[list[float], list[float]]]] = {k: {} for k, _, _ in kinds}
    seconds: dict[str, dict[str, tuple[list[float], list[float]]]] = {k: {} for k, _, _ in kinds}
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
                r = ratios[kind].setdefault(name, ([], []))
                t = seconds[kind].setdefault(name, ([], []))
                p = seconds[kind].setdefault("plain", ([], []))
                for clock in (0, 1):
                    r[clock].append((b1[clock] + b2[clock]) / max(a1[clock] + a2[clock], 1e-9))
                    t[clock].append((b1[clock] + b2[clock]) / 2 / cycles)
                    p[clock].append((a1[clock] + a2[clock]) / 2 / cycles)
    for kind, _, group in kinds:
        print_ratios(kind, list(group), pairs, cycles, ratios=ratios[kind],
                     seconds=seconds[kind])
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
    times: list[float] = []
    cpu_times: list[float] = []
    for _ in range(children):
        read, write = os.pipe()
        pid = int(libc.fork())  # no Python hook runs: the reset below is the whole reset
        if pid == 0:  # pragma: no cover - child
            try:
                started, cpu = time.perf_counter(), time.process_time()
                forksafe.after_fork()
                os.write(write, struct.pack("dd", time.perf_counter() - started,
                                            time.process_time() - cpu))
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        data = os.read(read, 16)
        os.close(read)
        wall, cpu_s = struct.unpack("dd", data)
        times.append(wall * 1000)
        cpu_times.append(cpu_s * 1000)
    for engine in tracked:
        forksafe.untrack(engine)
        engine.dispose()
    print_table(
        f"reset in a child (fork no hook saw), {engines} tracked engines with a pooled "
        f"connection each: {children} children",
        ["figure", "wall ms", "CPU ms"],
        [["median", f"{statistics.median(times):.2f}", f"{statistics.median(cpu_times):.2f}"],
         ["max", f"{max(times):.2f}", f"{max(cpu_times):.2f}"]],
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
