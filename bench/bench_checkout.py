"""What a tracked engine costs per checkout, measured in pairs; and forksafe's reset and registry.

**Paired design.** Every engine compared is a ``QueuePool`` of one connection, and all of
them share *one* mysqlclient connection (``creator=`` returns it), so that every engine
talks to the same server thread over the same socket: the luck of one connection's
placement, which moves a loopback cycle by 20% between connections, cancels out. Batches of
``--cycles`` cycles run in ABBA order (A, B, B, A) and each group of four gives one ratio
``(B1 + B2) / (A1 + A2)`` and one difference per cycle; the tables show the median of
``--pairs`` such ratios with its interquartile range, by the wall clock and by the CPU time
of the benchmark's thread (``time.thread_time``: the client's own work, which is where
forksafe's cost is, and which other processes on a shared machine disturb far less than
the wall clock). An A/A row (plain against a second plain engine, measured the same way in
the same run) is the noise floor printed beside it: a difference smaller than the A/A
spread is not one. All comparisons are interleaved pair by pair, so drift hits them alike,
in an order shuffled at each pair (the first batch after a collection runs cold; always
the same comparison's, it had put the A/A floor of the query cycle at 0.95).

What keeps the floor near 1.000: the engines are built afresh ``--rounds`` times (two
identical engine objects differ by a few percent on a bare cycle, by where their objects
happen to lie in memory; new ones each round turn that into noise the median averages out
instead of a bias), every engine runs ``--warmup`` cycles after it is built, the garbage
collector is off while batches run (it collects between pairs), and the process is pinned
to one CPU (``os.sched_setaffinity``, unless ``--no-pin``)::

    python bench/bench_checkout.py            # starts a private MariaDB
    python bench/bench_checkout.py --url mysql+mysqldb://root@127.0.0.1:3306/test
    python bench/bench_checkout.py --quick    # a smoke run of a few seconds

Engines: plain, a second plain one (A/A), tracked with forksafe's defaults (the fork check,
and a zero-timeout ``poll()`` of the socket at every checkout whose previous one is at
least ``forksafe.sqlalchemy.POLL_AFTER``, 50 µs, old; in C where ``forksafe._speedups`` is
built), the same with the checkout methods in Python (what runs where it is not), the same
polling at every checkout (``POLL_AFTER = 0``), the same never polling (``POLL_AFTER =
inf``: the liveness check's system call, in the cycle, is the difference to the defaults;
no setting of forksafe's turns it off), the same with its dialect's ``_has_events``
left to SQLAlchemy (which then looks for ``do_execute`` listeners at every statement, as it
did before forksafe answered that flag itself; SQLAlchemy 1.4 is not changed either way),
and ``pool_pre_ping``.

Cycles: ``checkout + SELECT 1`` (``with engine.connect() as c: c.execute(...)``, the
pool's rollback on return included) and the bare pool cycle (``raw_connection().close()``
with ``pool_reset_on_return=None``: no byte to the server, the pool's CPU alone, where
forksafe's share is easiest to see).

Also printed: forksafe's per-checkout work timed by itself (the read of the wipe-on-fork
mark that stands for ``os.getpid()``, the zero-timeout ``poll()`` of the socket, the clock);
the time a child takes to reset with ``--engines`` tracked engines (each holding a pooled
connection), after a fork no hook saw (libc ``fork``), median of 5 children; and the
registry after ``--connections`` tracked connections were opened and dropped (entries
left, memory kept, by ``tracemalloc``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import random
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
from sqlalchemy.pool import NullPool, QueuePool

import forksafe
from forksafe import _state
from forksafe import sqlalchemy as adapter_module
from forksafe._registry import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import database, environment_note, print_table

SELECT_1 = text("SELECT 1")


Timing = tuple[float, float]  # (wall seconds, this thread's CPU seconds)
CLOCKS = ("wall clock", "CPU time of the benchmark's thread")


def batch_query(engine: Any, n: int) -> Timing:
    """Wall and CPU seconds for n checkout + SELECT 1 + return cycles."""
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        with engine.connect() as conn:
            conn.execute(SELECT_1).scalar()
    return time.perf_counter() - start, time.thread_time() - cpu


def batch_bare(engine: Any, n: int) -> Timing:
    """Wall and CPU seconds for n raw checkouts + returns (no reset on return)."""
    connect = engine.raw_connection
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        connect().close()
    return time.perf_counter() - start, time.thread_time() - cpu


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


#: the tracked engine with the socket polled at every checkout (POLL_AFTER = 0)
POLL_EVERY = "forksafe, poll at every checkout"
#: the tracked engine with the socket never polled (POLL_AFTER = inf): what the liveness
#: check's system call costs in the cycle, read against the "forksafe" row
NO_POLL = "forksafe, socket never polled"
#: POLL_AFTER while a variant's batch runs
POLL_AFTER_OF = {POLL_EVERY: 0.0, NO_POLL: math.inf}
AA = "plain (A/A)"
#: the tracked engine with the checkout methods in Python instead of C
PY_METHODS = "forksafe, methods in Python"


#: the tracked engine with its dialect's _has_events left to SQLAlchemy (true for good once
#: forksafe's handle_error listener is added), as before forksafe answered it itself
SA_FLAG = "forksafe, dialect flag left to SQLAlchemy"


def track_with(engine: Any, **settings: Any) -> Any:
    """``track(engine)`` with attributes of forksafe.sqlalchemy set while it tracks."""
    saved = {name: getattr(adapter_module, name) for name in settings}
    for name, value in settings.items():
        setattr(adapter_module, name, value)
    try:
        return forksafe.track(engine)
    finally:
        for name, value in saved.items():
            setattr(adapter_module, name, value)


def sqlalchemy_flag(engine: Any) -> Any:
    """``track(engine)`` with the dialect's class left as it is (what SQLAlchemy 1.4 gets)."""
    return track_with(engine, _HANDLE_ERROR_ON_DIALECT=False)


class _PythonMethodsPool(QueuePool):
    """A QueuePool class of its own, whose tracked subclasses forksafe makes with the
    checkout methods in Python (see python_methods)."""


def python_methods(engine: Any) -> Any:
    """``track(engine)`` with the checkout methods in Python, as where forksafe._speedups is
    not built (``FORKSAFE_NO_SPEEDUPS=1``), for comparison with the C ones in one run."""
    return track_with(engine, _speedups=None)


def paired_engines(url: str, shared: Any, **options: Any) -> dict[str, Any]:
    """Engines on the one shared DBAPI connection: the plain baseline first."""

    def make(**extra: Any) -> Any:
        return create_engine(url, creator=lambda: shared, pool_size=1, max_overflow=0,
                             **options, **extra)

    return {
        "plain": make(),
        AA: make(),
        "forksafe": forksafe.track(make()),
        PY_METHODS: python_methods(make(poolclass=_PythonMethodsPool)),
        POLL_EVERY: forksafe.track(make()),
        NO_POLL: forksafe.track(make()),
        SA_FLAG: sqlalchemy_flag(make()),
        "pool_pre_ping": make(pool_pre_ping=True),
    }


def timed(name: str, fn: Callable[[Any, int], Timing], engine: Any, n: int) -> Timing:
    if name not in POLL_AFTER_OF:
        return fn(engine, n)
    default = adapter_module.POLL_AFTER
    adapter_module.POLL_AFTER = POLL_AFTER_OF[name]
    try:
        return fn(engine, n)
    finally:
        adapter_module.POLL_AFTER = default


class Results:
    """Per engine and clock: the per-pair ratios to plain, the per-pair differences (s per
    cycle), and the seconds per cycle of each side."""

    def __init__(self) -> None:
        self.ratios: dict[str, tuple[list[float], list[float]]] = {}
        self.deltas: dict[str, tuple[list[float], list[float]]] = {}
        self.seconds: dict[str, tuple[list[float], list[float]]] = {}

    def add(self, name: str, cycles: int, abba: tuple[Timing, Timing, Timing, Timing]) -> None:
        a1, b1, b2, a2 = abba
        ratios = self.ratios.setdefault(name, ([], []))
        deltas = self.deltas.setdefault(name, ([], []))
        mine = self.seconds.setdefault(name, ([], []))
        plain = self.seconds.setdefault("plain", ([], []))
        for clock in (0, 1):
            a, b = a1[clock] + a2[clock], b1[clock] + b2[clock]
            ratios[clock].append(b / max(a, 1e-12))
            deltas[clock].append((b - a) / 2 / cycles)
            mine[clock].append(b / 2 / cycles)
            plain[clock].append(a / 2 / cycles)

    def floor(self, clock: int) -> tuple[float, float, float]:
        return quartiles(self.ratios[AA][clock])


def print_ratios(kind: str, names: list[str], results: Results, *, pairs: int, rounds: int,
                 cycles: int) -> None:
    """One table per clock: µs per cycle, the median difference to plain in ns per cycle,
    and the median ratio to plain with its IQR."""
    for clock, label in enumerate(CLOCKS):
        plain_us = statistics.median(results.seconds["plain"][clock]) * 1e6
        floor = results.floor(clock)
        rows = [["plain", f"{plain_us:.2f}", "-", "1.0000", "-", "-"]]
        for name in names:
            if name == "plain":
                continue
            q1, q2, q3 = quartiles(results.ratios[name][clock])
            us = statistics.median(results.seconds[name][clock]) * 1e6
            delta_ns = statistics.median(results.deltas[name][clock]) * 1e9
            rows.append([name, f"{us:.2f}", f"{delta_ns:+.0f}", f"{q2:.4f}", f"{q1:.4f}",
                         f"{q3:.4f}"])
        print_table(
            f"{kind}, {label}: median of {pairs} ABBA ratios, {cycles} cycles per batch, "
            f"{rounds} rounds of fresh engines, one shared connection (A/A floor "
            f"{floor[1]:.4f}, IQR {floor[0]:.4f}-{floor[2]:.4f})",
            ["engine", "µs/cycle", "Δ ns/cycle", "vs plain", "q1", "q3"],
            rows,
        )


def print_summary(kinds: list[str], results: dict[str, Results]) -> None:
    """forksafe's defaults against plain, beside the A/A floor, for each cycle and clock."""
    rows = []
    for kind in kinds:
        for clock, label in enumerate(CLOCKS):
            r = results[kind]
            tracked = statistics.median(r.ratios["forksafe"][clock])
            floor = statistics.median(r.ratios[AA][clock])
            delta_ns = statistics.median(r.deltas["forksafe"][clock]) * 1e9
            aa_ns = statistics.median(r.deltas[AA][clock]) * 1e9
            rows.append([kind.split(" (")[0], label.split(" of ")[0], f"{tracked:.4f}",
                         f"{floor:.4f}", f"{delta_ns:+.0f}", f"{aa_ns:+.0f}"])
    print_table("summary: forksafe's defaults against plain, beside the A/A floor",
                ["cycle", "clock", "forksafe/plain", "A/A", "Δ ns", "A/A Δ ns"], rows)


def pin_to_one_cpu() -> str:
    """Pin this process to its last allowed CPU; say what was done."""
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None:
        return "not pinned (no sched_setaffinity here)"
    cpu = max(os.sched_getaffinity(0))
    setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def run_paired(url: str, *, pairs: int, rounds: int, cycles: int, bare_cycles: int,
               warmup: int) -> None:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    import MySQLdb

    def connect() -> Any:
        return MySQLdb.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                               user=u.username or "root", password=u.password or "",
                               database=u.database or "")

    shared = {"query": connect(), "bare": connect()}
    kinds: list[tuple[str, Callable[[Any, int], Timing], Callable[[], dict[str, Any]], int]] = [
        ("checkout + SELECT 1", batch_query, lambda: paired_engines(url, shared["query"]),
         cycles),
        ("bare pool cycle (no reset on return)", batch_bare,
         lambda: paired_engines(url, shared["bare"], pool_reset_on_return=None), bare_cycles),
    ]
    results = {kind: Results() for kind, _, _, _ in kinds}
    names: dict[str, list[str]] = {}
    rounds = max(1, min(rounds, pairs))
    rng = random.Random(10)  # the order of the comparisons in each pair: shuffled, repeatably
    done = 0
    for round_ in range(rounds):
        per_round = (pairs - done) // (rounds - round_)
        groups = [(kind, fn, build(), n) for kind, fn, build, n in kinds]
        for kind, fn, group, _ in groups:  # first connect, dialect set-up, first-use costs
            names[kind] = list(group)
            for name, engine in group.items():
                timed(name, fn, engine, warmup)
        gc.collect()
        gc.disable()
        try:
            for _ in range(per_round):
                for kind, fn, group, n in groups:
                    base = group["plain"]
                    # Untimed: the batch after a collection or the other cycle's batches
                    # runs cold, and it must not always be the same comparison's A1.
                    fn(base, max(1, n // 5))
                    order = [name for name in group if name != "plain"]
                    rng.shuffle(order)
                    for name in order:
                        engine = group[name]
                        a1 = fn(base, n)
                        b1 = timed(name, fn, engine, n)
                        b2 = timed(name, fn, engine, n)
                        a2 = fn(base, n)
                        results[kind].add(name, n, (a1, b1, b2, a2))
                gc.collect()  # between pairs, never inside a batch
        finally:
            gc.enable()
        done += per_round
        for _, _, group, _ in groups:
            for name, engine in group.items():
                if name.startswith("forksafe"):
                    forksafe.untrack(engine)
    for kind, _, _, n in kinds:
        print_ratios(kind, names[kind], results[kind], pairs=done, rounds=rounds, cycles=n)
    print_summary([kind for kind, _, _, _ in kinds], results)


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

    check = {"m": _state.fork_mark(), "pid": os.getpid(), "own": _state.OWN}
    rows = [
        ["fork check: wipe-on-fork mark and pid compared (mark[0] and pid == own.pid)",
         f"{ns('m[0] and pid == own.pid', check):.0f}"],
        ["fork check where the kernel cannot clear the mark (os.getpid() != pool pid)",
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
    parser.add_argument("--pairs", type=int, default=400, help="ABBA groups per engine")
    parser.add_argument("--rounds", type=int, default=100,
                        help="times every engine is built afresh (the pairs split among them)")
    parser.add_argument("--cycles", type=int, default=50,
                        help="checkout + SELECT 1 cycles per batch")
    parser.add_argument("--bare-cycles", type=int, default=1000,
                        help="bare pool cycles per batch (each is ~50x shorter)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="untimed cycles of each new engine")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    parser.add_argument("--engines", type=int, default=100)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true",
                        help="10 pairs in 2 rounds, short batches, 10 engines, 300 connections")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.rounds, args.cycles, args.bare_cycles = 10, 2, 20, 200
        args.warmup, args.engines, args.connections = 20, 10, 300
    print(environment_note())
    with database(args.url) as url:
        # after the server started: only this process is pinned
        print("benchmark process:", "not pinned" if args.no_pin else pin_to_one_cpu())
        run_paired(url, pairs=args.pairs, rounds=args.rounds, cycles=args.cycles,
                   bare_cycles=args.bare_cycles, warmup=args.warmup)
        per_checkout_work()
        reset_time(url, args.engines)
        registry_memory(url, args.connections)


if __name__ == "__main__":
    main()
