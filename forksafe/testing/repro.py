"""``forksafe repro``: fork real workers, hammer them, count what went wrong, with and without.

For each scenario (gunicorn, uWSGI, a ``multiprocessing`` pool) and mode (a SQLAlchemy
engine, or one raw global DBAPI connection, created and used while the app loads), the
command starts the real server twice, once with the app unprotected and once protected by
forksafe as the README says, sends concurrent requests that each carry a unique number, and
checks every answer (`forksafe.testing.checks`). The table shows both runs side by side.

Without ``--db`` it starts a private MariaDB in a temporary directory (``mariadbd`` must be
installed) and removes it afterwards. With ``--db URL`` it uses that server and creates (or
refills) one table there, ``forksafe_repro_items``.

Exit status: 0 when every run with forksafe is clean; 1 when one is not; 2 on bad input or a
missing piece (one line on stderr says what to do); 130 when interrupted. Every process the
command started is stopped in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from forksafe.testing import checks
from forksafe.testing._async_drivers import ASYNC_DRIVERS, async_driver, missing_async_driver
from forksafe.testing.report import RunResult, exit_status, render_json, render_table
from forksafe.testing.servers import (
    DEFAULT_SCENARIOS,
    SCENARIOS,
    HarnessError,
    Scenario,
    ServerSettings,
    check_port_free,
    check_scenario_available,
    free_port,
    run_pool,
    running_server,
)

__all__ = ["add_arguments", "main", "run", "run_round"]

#: --driver -> (SQLAlchemy dialect+driver, module to import, pip hint)
DRIVERS: dict[str, tuple[str, str, str]] = {
    "mysqlclient": ("mysql+mysqldb", "MySQLdb", "pip install mysqlclient"),
    "pymysql": ("mysql+pymysql", "pymysql", "pip install PyMySQL"),
    "psycopg2": ("postgresql+psycopg2", "psycopg2", "pip install psycopg2-binary"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forksafe repro``."""
    names = ", ".join(SCENARIOS)
    parser.add_argument(
        "--server",
        default="default",
        metavar="NAME[,NAME...]",
        help=f"scenarios to run: {names}; 'all' for every one "
        f"(default: {', '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--mode",
        choices=[*checks.MODES, "all"],
        default="engine",
        help="engine: a SQLAlchemy engine used at import; raw: a global DBAPI connection "
        "(default: engine)",
    )
    parser.add_argument(
        "--driver",
        choices=list(DRIVERS),
        default=None,
        help="mysqlclient (default for MySQL/MariaDB), pymysql, or psycopg2 (with a "
        "postgresql:// --db)",
    )
    parser.add_argument(
        "--async-driver",
        choices=list(ASYNC_DRIVERS),
        default="",
        help="the gunicorn-uvicorn scenario's asyncio driver (default: psycopg_async on "
        "PostgreSQL, aiomysql on MySQL/MariaDB)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="database to use, e.g. mysql://user:pw@host/db or postgresql://user@host/db "
        "(default: a private MariaDB started for the run)",
    )
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--threads", type=int, default=4, help="threads per worker in threaded scenarios (4)"
    )
    parser.add_argument(
        "--requests", type=int, default=400, help="requests per run and round (default 400)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent client requests (default 32)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds per run (default 1)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds one request of a run without forksafe may take before it counts as "
        "hung (default 5); runs with forksafe allow at least 60: a slow machine is no fault",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="HTTP port for the servers (default: a free one)"
    )
    parser.add_argument(
        "--only",
        choices=["with", "without"],
        default=None,
        help="run only the protected ('with') or unprotected ('without') half",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


@dataclass
class Target:
    """The database the runs use."""

    url: str  # with the password: only ever passed to the app through its environment
    safe_url: str
    driver: str
    description: str


def _progress(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _validate(args: argparse.Namespace) -> tuple[list[Scenario], list[str]]:
    for name in ("workers", "threads", "requests", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            raise HarnessError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.timeout <= 0:
        raise HarnessError(f"--timeout must be positive, got {args.timeout}")
    if args.port and not 0 < args.port < 65536:
        raise HarnessError(f"--port must be between 1 and 65535, got {args.port}")
    wanted = [s.strip() for s in str(args.server).split(",") if s.strip()]
    if wanted in (["default"], []):
        wanted = list(DEFAULT_SCENARIOS)
    elif wanted == ["all"]:
        wanted = list(SCENARIOS)
    unknown = [w for w in wanted if w not in SCENARIOS]
    if unknown:
        raise HarnessError(
            f"unknown --server {', '.join(unknown)}: choose from {', '.join(SCENARIOS)} or 'all'"
        )
    scenarios = [SCENARIOS[w] for w in dict.fromkeys(wanted)]
    for scenario in scenarios:
        check_scenario_available(scenario)
    modes = list(checks.MODES) if args.mode == "all" else [args.mode]
    if args.port:
        check_port_free(args.port)
    return scenarios, modes


def _require(module: str, hint: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise HarnessError(f"{what} needs the {module} module: {hint}")


def _parse_db(args: argparse.Namespace) -> tuple[Any, str, str]:
    """``(url or None, backend, driver)`` from ``--db`` and ``--driver``, checked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = None
    if args.db:
        try:
            url = make_url(args.db)
        except ArgumentError:
            raise HarnessError(
                "--db is not a database URL: use e.g. mysql://user:password@host:3306/db "
                "or postgresql://user@host/db"
            ) from None
        backend = url.get_backend_name()
        if backend == "mariadb":
            backend = "mysql"
        if backend not in ("mysql", "postgresql"):
            raise HarnessError(
                f"--db {url.render_as_string(hide_password=True)}: forksafe repro speaks "
                "MySQL/MariaDB and PostgreSQL; pass a mysql:// or postgresql:// URL"
            )
    else:
        backend = "postgresql" if args.driver == "psycopg2" else "mysql"
    driver = args.driver or ("psycopg2" if backend == "postgresql" else "mysqlclient")
    if (backend == "postgresql") != (driver == "psycopg2"):
        raise HarnessError(
            f"--driver {driver} does not speak to a {backend} server: use "
            + ("psycopg2" if backend == "postgresql" else "mysqlclient or pymysql")
        )
    _dialect, module, hint = DRIVERS[driver]
    _require(module, hint, f"--driver {driver}")
    return url, backend, driver


@contextlib.contextmanager
def _database(args: argparse.Namespace) -> Iterator[Target]:
    """Connect to ``--db`` (or start a private server), check it answers, seed the table.

    The private server is MariaDB, or PostgreSQL with ``--driver psycopg2``; it is stopped
    and its directory removed on the way out, whatever happens.
    """
    _require("sqlalchemy", "pip install 'forksafe[repro]'", "forksafe repro")
    from sqlalchemy.engine import make_url

    url, backend, driver = _parse_db(args)
    server: Any = None
    try:
        if url is not None:
            description = "given by --db"
        else:
            _require("mirakuru", "pip install 'forksafe[repro]'", "a private database server")
            from forksafe.testing.mariadb import MariaDB, ServerUnavailableError

            name = "PostgreSQL" if backend == "postgresql" else "MariaDB"
            _progress(args, f"starting a private {name} ...")
            started = time.monotonic()
            try:
                if backend == "postgresql":
                    from forksafe.testing.postgres import PostgreSQL

                    server = PostgreSQL()
                else:
                    server = MariaDB(general_log=False)
                server.start()
            except ServerUnavailableError as exc:
                first = str(exc).splitlines()[0]
                raise HarnessError(f"{first} (or pass --db URL)") from None
            url = make_url(server.url())
            description = "private"
            _progress(
                args, f"  ready on port {server.port} ({time.monotonic() - started:.1f} s)"
            )
        url = url.set(drivername=DRIVERS[driver][0])
        if not url.database:
            url = url.set(database="postgres" if backend == "postgresql" else "forksafe")
        target = Target(
            url=url.render_as_string(hide_password=False),
            safe_url=url.render_as_string(hide_password=True),
            driver=driver,
            description=description,
        )
        version = _seed(target)
        target.description += f", {version}"
        yield target
    finally:
        if server is not None:
            server.cleanup()


def _seed(target: Target) -> str:
    """Create and fill the seeded table (when needed); return the server's version."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    # checks.TABLE is a constant, never input: the f-strings below carry no user data.
    table = checks.TABLE
    connect_args = checks.driver_timeout_args(target.url.split(":", 1)[0], 5)
    engine = create_engine(target.url, connect_args=connect_args, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            version = str(conn.execute(text("SELECT VERSION()")).scalar())
            conn.execute(
                text(
                    f"CREATE TABLE IF NOT EXISTS {table} "
                    "(id INTEGER PRIMARY KEY, label VARCHAR(64) NOT NULL)"
                )
            )
            select = f"SELECT id, label FROM {table} ORDER BY id"  # noqa: S608
            have = conn.execute(text(select)).all()
            want = [(i, checks.label_for(i)) for i in range(1, checks.SEED_ROWS + 1)]
            if [tuple(r) for r in have] != want:
                conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608
                conn.execute(
                    text(f"INSERT INTO {table} (id, label) VALUES (:i, :l)"),  # noqa: S608
                    [{"i": i, "l": label} for i, label in want],
                )
    except Exception as exc:
        reason = " ".join(str(getattr(exc, "orig", exc)).split())[:200]
        raise HarnessError(
            f"cannot use {target.safe_url}: {reason}. Check the URL, that the server runs "
            "and the user may create a table; or leave --db out to use a private MariaDB"
        ) from None
    finally:
        engine.dispose()
    if "mariadb" in version.lower():
        return "MariaDB " + version.split("-", maxsplit=1)[0]
    return " ".join(version.split()[:2])  # "PostgreSQL 15.8" / a MySQL version


def run_round(
    scenario: Scenario | str,
    settings: ServerSettings,
    requests: int,
    *,
    concurrency: int = 32,
    timeout: float = 5.0,
    first: int = 1,
) -> list[tuple[int, str, str]]:
    """One round of one scenario: start its processes, send the requests, stop everything.

    Args:
        scenario: a `Scenario` or its name.
        settings: database URL, mode, protection, workers, port.
        requests: how many requests (numbered ``first``, ``first + 1``, ...).
        concurrency: concurrent client requests (server scenarios).
        timeout: seconds one request may take before it counts as hung.
        first: the first request number; keep numbers unique across rounds.

    Returns:
        ``(n, category, message)`` for every request, category from
        `forksafe.testing.checks.CATEGORIES`.
    """
    if isinstance(scenario, str):
        scenario = SCENARIOS[scenario]
    deadline = max(30.0, 6 * timeout)
    if scenario.kind == "pool":
        # a pool worker stuck on a socket blocks every task queued behind it: end sooner
        data = run_pool(settings, requests, max(10.0, 2 * timeout))
        # the pool numbers its requests 1..N: shift them into this round's range
        return [(first - 1 + int(n), str(c), str(m)) for n, c, m in data["outcomes"]]
    from forksafe.testing.load import run_load

    with running_server(scenario, settings) as base:
        return run_load(base, range(first, first + requests), concurrency, timeout, deadline)


def _run_all(
    args: argparse.Namespace, target: Target, scenarios: list[Scenario], modes: list[str]
) -> list[RunResult]:
    sides = [False, True]
    if args.only == "with":
        sides = [True]
    elif args.only == "without":
        sides = [False]
    # the ASGI scenario has the engine mode only (an AsyncEngine on an asyncio driver)
    runs = sum(1 for s in scenarios for m in modes if not (s.asgi and m != "engine"))
    total = runs * len(sides) * args.rounds
    done = 0
    first = 1
    results = []
    for scenario in scenarios:
        for mode in modes:
            if scenario.asgi and mode != "engine":
                continue
            for protect in sides:
                result = RunResult(
                    scenario=scenario.name,
                    title=scenario.title,
                    mode=mode,
                    driver=async_driver(target.url, args.async_driver)
                    if scenario.asgi
                    else target.driver,
                    protected=protect,
                )
                for round_no in range(1, args.rounds + 1):
                    done += 1
                    side = "with" if protect else "without"
                    label = f"[{done}/{total}] {scenario.name:<16} {mode:<6} {side:<7} forksafe"
                    if args.rounds > 1:
                        label += f", round {round_no}/{args.rounds}"
                    settings = ServerSettings(
                        url=target.url,
                        mode=mode,
                        protect=protect,
                        workers=args.workers,
                        threads=args.threads,
                        port=args.port or free_port(),
                        db_timeout=_db_timeout(args.timeout, protect),
                        async_driver=args.async_driver,
                    )
                    started = time.monotonic()
                    outcomes = run_round(
                        scenario,
                        settings,
                        args.requests,
                        concurrency=args.concurrency,
                        timeout=_request_timeout(args.timeout, protect),
                        first=first,
                    )
                    first += args.requests
                    seconds = time.monotonic() - started
                    result.add_round(outcomes, seconds)
                    bad = sum(1 for o in outcomes if o[1] != checks.OK)
                    _progress(
                        args,
                        f"{label}: {bad} of {len(outcomes)} requests failed ({seconds:.1f} s)",
                    )
                results.append(result)
    return results


#: the least a request of a run with forksafe may take before it counts as hung: nothing
#: may hang there, so the bound is only against a real hang, never a verdict on speed
PROTECTED_TIMEOUT = 60.0


def _request_timeout(timeout: float, protect: bool) -> float:
    """Seconds a request may take before it counts as hung. Without forksafe requests stuck
    on a shared socket are expected, and ``timeout`` keeps the run short."""
    return max(timeout, PROTECTED_TIMEOUT) if protect else timeout


def _db_timeout(timeout: float, protect: bool) -> int:
    """The app's driver read/write timeout: short without forksafe (a worker stuck reading a
    shared socket fails with 2013 instead of hanging), generous with it."""
    if protect:
        return max(1, round(_request_timeout(timeout, protect) / 2))
    return max(1, round(min(timeout, 3.0)))


def _header(args: argparse.Namespace, target: Target, modes: list[str]) -> list[str]:
    rounds = f", {args.rounds} rounds" if args.rounds > 1 else ""
    return [
        f"forksafe repro: {args.requests} requests per run, {args.concurrency} at a time, "
        f"{args.workers} workers ({args.threads} threads each where threaded){rounds}",
        f"database: {target.safe_url} ({target.description}), driver {target.driver}",
        "modes: "
        + "; ".join(
            "engine = a SQLAlchemy engine used at import"
            if m == "engine"
            else "raw = a global DBAPI connection opened at import"
            for m in modes
        ),
    ]


def _usable(args: argparse.Namespace, target: Target, scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios that can run on ``target``: the ASGI one needs an asyncio driver.

    Named explicitly and not installable, it is an error; picked by ``--server all`` it is
    left out with a note.
    """
    asgi_wanted = any(s.asgi for s in scenarios)
    missing = missing_async_driver(target.url, args.async_driver) if asgi_wanted else None
    if not missing:
        return scenarios
    asgi = [s.name for s in scenarios if s.asgi]
    if any(name in str(args.server).split(",") for name in asgi):
        raise HarnessError(
            f"{', '.join(asgi)}: {missing}; or use PostgreSQL (--driver psycopg2 or a "
            "postgresql:// --db), or leave it out of --server"
        )
    _progress(args, f"leaving out {', '.join(asgi)}: {missing}")
    return [s for s in scenarios if not s.asgi]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run ``forksafe repro``; returns the exit status."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)  # stop everything on SIGTERM, as on Ctrl-C
    try:
        scenarios, modes = _validate(args)
        started = time.monotonic()
        with _database(args) as target:
            scenarios = _usable(args, target, scenarios)
            results = _run_all(args, target, scenarios, modes)
            header = _header(args, target, modes)
            settings = {
                "database": target.safe_url,
                "driver": target.driver,
                "scenarios": [s.name for s in scenarios],
                "modes": modes,
                "workers": args.workers,
                "threads": args.threads,
                "requests": args.requests,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "timeout": args.timeout,
            }
        status, reason = exit_status(results)
        if args.json:
            print(render_json(results, settings))
        else:
            print(render_table(results, header))
            print()
            print(("FAIL: " if status else "") + reason + ".")
            if any(r.verdict == "not reproduced" for r in results):
                print(
                    "not reproduced: the race did not show in this run; try more --requests, "
                    "--concurrency or --rounds."
                )
            print(f"({time.monotonic() - started:.0f} s)")
        if status:
            print(f"forksafe repro: {reason}", file=sys.stderr)
        return status
    except HarnessError as exc:
        print(f"forksafe repro: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forksafe repro: interrupted; every server it started was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """``python -m forksafe.testing.repro``: the same as ``forksafe repro``."""
    parser = argparse.ArgumentParser(prog="forksafe repro", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
