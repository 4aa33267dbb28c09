"""``forksafe doctor``: check a deployment for causes of "server has gone away" and fork bugs.

Looks at whatever it is given: a database URL (the server's timeouts, packet size and
connection limit against the pool settings and worker count), a ``gunicorn.conf.py``, a
uWSGI ini file, and an app import path (engines and connections open at import). Prints the
findings most serious first, each with its fix; ``--json`` for machines. Exit status 1 when a
finding is an error, 0 otherwise (2 for bad usage). Never prints a traceback or a password.
"""

from __future__ import annotations

import argparse
import configparser
import gc
import importlib
import json
import os
import runpy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Finding", "add_arguments", "check_app", "check_gunicorn", "check_url",
           "check_uwsgi", "run"]

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
SA_POOL_SIZE, SA_MAX_OVERFLOW = 5, 10  # SQLAlchemy's QueuePool defaults


@dataclass(frozen=True)
class Finding:
    """One result: ``severity`` is ``error`` (exit 1), ``warning`` or ``info``."""

    severity: str
    check: str
    message: str
    fix: str = ""


@dataclass
class Context:
    """What the checks learn from each other (workers from a server config, etc.)."""

    workers: int | None = None
    pool_size: int = SA_POOL_SIZE
    max_overflow: int = SA_MAX_OVERFLOW
    secrets: tuple[str, ...] = ()

    def mask(self, text: str) -> str:
        """``text`` with every known password replaced, on one line."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return " ".join(str(text).split())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forksafe doctor``."""
    parser.add_argument("--url", help="database URL (SQLAlchemy form); the password is masked")
    parser.add_argument("--gunicorn", metavar="FILE", help="a gunicorn.conf.py")
    parser.add_argument("--uwsgi", metavar="FILE", help="a uWSGI .ini file")
    parser.add_argument("--app", metavar="MODULE[:ATTR]",
                        help="import this module and inspect the engines it opened")
    parser.add_argument("--workers", type=int, help="worker processes (default: from config)")
    parser.add_argument("--pool-size", type=int, default=SA_POOL_SIZE)
    parser.add_argument("--max-overflow", type=int, default=SA_MAX_OVERFLOW)
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """Run every check that was asked for, print the findings, return the exit status."""
    ctx = Context(workers=args.workers, pool_size=args.pool_size,
                  max_overflow=args.max_overflow)
    findings: list[Finding] = []
    if not (args.url or args.gunicorn or args.uwsgi or args.app):
        print("forksafe doctor: nothing to check: pass --url, --gunicorn, --uwsgi or --app",
              file=sys.stderr)
        return 2
    steps = [(args.gunicorn, check_gunicorn), (args.uwsgi, check_uwsgi),
             (args.app, check_app), (args.url, check_url)]
    for value, check in steps:  # configs first: they tell the URL check the worker count
        if not value:
            continue
        try:
            findings += check(value, ctx)
        except Exception as exc:  # a bug of ours must still be one line, not a traceback
            findings.append(Finding("error", check.__name__.removeprefix("check_"),
                                    f"the check failed: {ctx.mask(repr(exc))}",
                                    "report this as a forksafe bug"))
    # Most serious first. Ties keep the order of the steps above and, within a step, the
    # order the check reported in (each check reports in an order of its own making, never
    # that of the garbage collector): the same input always prints the same list.
    position = {id(f): i for i, f in enumerate(findings)}
    findings.sort(key=lambda f: (SEVERITY_ORDER.get(f.severity, 3), position[id(f)]))
    findings = [Finding(f.severity, f.check, ctx.mask(f.message), ctx.mask(f.fix))
                for f in findings]
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.severity.upper():7} [{f.check}] {f.message}")
            if f.fix:
                print(f"        fix: {f.fix}")
        if not findings:
            print("forksafe doctor: no findings")
    return 1 if any(f.severity == "error" for f in findings) else 0


# -- database URL -------------------------------------------------------------------------------
def check_url(url_text: str, ctx: Context) -> list[Finding]:
    """Server settings that decide when connections die, and whether the pools fit."""
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool
    except ImportError:
        return [Finding("error", "url", "SQLAlchemy is not installed",
                        "pip install 'forksafe[sqlalchemy]'")]
    try:
        url = make_url(url_text)
    except Exception:
        return [Finding("error", "url", "the database URL cannot be parsed",
                        "use SQLAlchemy's form, e.g. mysql+pymysql://user:pw@host/db")]
    if url.password:
        ctx.secrets += (str(url.password),)
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend not in ("mysql", "mariadb", "postgresql"):
        return [Finding("warning", "url", f"{shown}: forksafe doctor knows MySQL, MariaDB and "
                        "PostgreSQL only")]
    connect_args = {"connect_timeout": 5}
    try:
        engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
        with engine.connect() as conn:
            if backend == "postgresql":
                names = ("max_connections", "superuser_reserved_connections",
                         "idle_session_timeout", "idle_in_transaction_session_timeout",
                         "tcp_keepalives_idle")
                settings = {}
                for name in names:
                    row = conn.execute(
                        text("SELECT setting, unit FROM pg_settings WHERE name = :n"), {"n": name}
                    ).first()
                    if row is not None:
                        settings[name] = (row[0], row[1])
            else:
                rows = conn.execute(text(
                    "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('wait_timeout', "
                    "'interactive_timeout', 'max_allowed_packet', 'max_connections')"
                )).all()
                settings = {str(r[0]).lower(): (r[1], None) for r in rows}
        engine.dispose()
    except Exception as exc:
        first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        return [Finding("error", "url", f"cannot connect to {shown}: {reason}",
                        "check host, port, credentials and that the server is running")]
    findings: list[Finding] = []
    if backend == "postgresql":
        findings += _pg_findings(shown, settings)
    else:
        findings += _mysql_findings(shown, settings)
    findings += _capacity_findings(shown, backend, settings, ctx)
    return findings


def _seconds(value: Any, unit: str | None) -> int:
    number = int(value)
    return number // 1000 if unit == "ms" else number


def _mysql_findings(shown: str, s: dict[str, tuple[Any, Any]]) -> list[Finding]:
    out = []
    wait = int(s["wait_timeout"][0]) if "wait_timeout" in s else None
    if wait is not None:
        severity = "warning" if wait < 600 else "info"
        out.append(Finding(
            severity, "url", f"{shown}: wait_timeout = {wait} s: the server drops connections "
            f"idle longer than that ('MySQL server has gone away', 2006/2013)",
            f"create_engine(..., pool_recycle={max(wait - 30, 1)}) or pool_pre_ping=True, "
            "or forksafe's idle-aware liveness"))
    if "interactive_timeout" in s:
        out.append(Finding("info", "url", f"{shown}: interactive_timeout = "
                           f"{s['interactive_timeout'][0]} s (applies to clients that ask for "
                           "CLIENT_INTERACTIVE only)"))
    if "max_allowed_packet" in s:
        packet = int(s["max_allowed_packet"][0])
        if packet < 16 * 1024 * 1024:
            out.append(Finding(
                "warning", "url", f"{shown}: max_allowed_packet = {packet} bytes: a larger "
                "query or row makes the server close the connection (2006)",
                "SET GLOBAL max_allowed_packet = 67108864 (and in the server config)"))
    return out


def _pg_findings(shown: str, s: dict[str, tuple[Any, Any]]) -> list[Finding]:
    out = []
    for name in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
        if name in s:
            secs = _seconds(*s[name])
            if secs > 0:
                out.append(Finding(
                    "warning", "url", f"{shown}: {name} = {secs} s: the server ends sessions "
                    "idle that long ('server closed the connection unexpectedly')",
                    f"create_engine(..., pool_recycle={max(secs - 30, 1)}) or "
                    "pool_pre_ping=True"))
    if "tcp_keepalives_idle" in s:
        out.append(Finding("info", "url", f"{shown}: tcp_keepalives_idle = "
                           f"{s['tcp_keepalives_idle'][0]} s"))
    return out


def _capacity_findings(shown: str, backend: str, s: dict[str, tuple[Any, Any]],
                       ctx: Context) -> list[Finding]:
    if "max_connections" not in s:
        return []
    limit = int(s["max_connections"][0])
    if backend == "postgresql" and "superuser_reserved_connections" in s:
        limit -= int(s["superuser_reserved_connections"][0])
    workers = ctx.workers or 1
    per_worker = ctx.pool_size + ctx.max_overflow
    need = per_worker * workers
    text = (f"{shown}: {workers} worker(s) x (pool_size {ctx.pool_size} + max_overflow "
            f"{ctx.max_overflow}) = {need} connections; the server allows {limit}")
    if need > limit:
        return [Finding("error", "url", text + ": under load, connects fail with 'Too many "
                        "connections'", "lower pool_size/max_overflow or workers, or raise "
                        "max_connections")]
    if need > 0.8 * limit:
        return [Finding("warning", "url", text + " (over 80%, and other clients need some)",
                        "leave headroom: lower the pools or raise max_connections")]
    return [Finding("info", "url", text)]


# -- gunicorn -----------------------------------------------------------------------------------
def check_gunicorn(path_text: str, ctx: Context) -> list[Finding]:
    """preload_app without a forksafe hook, worker count, timeouts."""
    path = Path(path_text)
    try:
        settings = runpy.run_path(str(path), run_name="__config__")
    except OSError as exc:
        return [Finding("error", "gunicorn", f"cannot read {path}: {exc.strerror}",
                        "pass the path of an existing gunicorn.conf.py")]
    except BaseException as exc:  # a config that raises, or calls sys.exit
        return [Finding("error", "gunicorn", f"{path} fails when executed: "
                        f"{type(exc).__name__}: {exc}", "fix the config file")]
    out: list[Finding] = []
    workers = settings.get("workers", 1)
    if isinstance(workers, int) and ctx.workers is None:
        ctx.workers = workers
    hook = settings.get("post_fork")
    has_hook = hook is not None and getattr(hook, "__module__", "").startswith("forksafe")
    if settings.get("preload_app"):
        if has_hook:
            out.append(Finding("info", "gunicorn", f"{path}: preload_app with forksafe's "
                               "post_fork: workers get their own connections"))
        else:
            out.append(Finding(
                "warning", "gunicorn", f"{path}: preload_app = True without forksafe's "
                "post_fork: connections the app opens while it loads are shared by every "
                "worker unless the app imports forksafe and tracks its engines",
                "add `from forksafe.gunicorn import post_fork` (or @forksafe.gunicorn.chain)"))
    timeout = settings.get("timeout", 30)
    if timeout == 0:
        out.append(Finding("warning", "gunicorn", f"{path}: timeout = 0: a worker stuck on a "
                           "dead connection is never restarted", "set timeout = 30 (or more)"))
    threads = settings.get("threads", 1)
    if isinstance(threads, int) and threads > 1:
        out.append(Finding("info", "gunicorn", f"{path}: threads = {threads}: each worker "
                           f"may check out up to {threads} connections at once; size "
                           "pool_size accordingly"))
    return out


# -- uWSGI --------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("", "1", "true", "yes", "on")


def check_uwsgi(path_text: str, ctx: Context) -> list[Finding]:
    """Loading and forking without a hook, master, lazy-apps, threads, harakiri."""
    path = Path(path_text)
    parser = configparser.RawConfigParser(strict=False, comment_prefixes=(";", "#"),
                                          inline_comment_prefixes=None)
    try:
        with path.open() as fh:
            parser.read_file(fh)
    except OSError as exc:
        return [Finding("error", "uwsgi", f"cannot read {path}: {exc.strerror}",
                        "pass the path of an existing uWSGI .ini file")]
    except configparser.Error as exc:
        return [Finding("error", "uwsgi", f"{path} is not a valid ini file: "
                        f"{str(exc).splitlines()[0]}", "fix the file's syntax")]
    if not parser.has_section("uwsgi"):
        return [Finding("error", "uwsgi", f"{path} has no [uwsgi] section",
                        "uWSGI reads options from the [uwsgi] section")]
    opts = {k.replace("_", "-"): v for k, v in parser.items("uwsgi")}
    out: list[Finding] = []
    processes = opts.get("processes") or opts.get("workers") or "1"
    if processes.isdigit() and ctx.workers is None:
        ctx.workers = int(processes)
    lazy = any(name in opts and _truthy(opts[name]) for name in ("lazy-apps", "lazy"))
    imports = " ".join(v for k, v in opts.items() if k in ("import", "shared-import"))
    hooked = "forksafe.uwsgi" in imports or any(
        name in opts and _truthy(opts[name])
        for name in ("py-call-osafterfork", "py-call-uwsgi-fork-hooks")
    )
    if lazy:
        out.append(Finding("info", "uwsgi", f"{path}: lazy-apps: every worker loads the app "
                           "after fork, so nothing is shared; it costs the app's memory and "
                           "start-up time once per worker",
                           "or load once (drop lazy-apps) with `import = forksafe.uwsgi`"))
    elif not hooked:
        out.append(Finding(
            "error", "uwsgi", f"{path}: the app is loaded once and forked, and no forksafe "
            "hook runs in the workers (uWSGI forks in C: Python's at-fork hooks do not run)",
            "add `import = forksafe.uwsgi` (or set lazy-apps = true)"))
    else:
        out.append(Finding("info", "uwsgi", f"{path}: forksafe runs in every worker after fork"))
    if not _truthy(opts.get("master")) or "master" not in opts:
        out.append(Finding(
            "warning", "uwsgi", f"{path}: no master: worker 1 is the original process, dead "
            "workers are not respawned and SIGTERM handling differs",
            "set master = true"))
    if "threads" in opts and "enable-threads" not in opts:
        out.append(Finding(
            "warning", "uwsgi", f"{path}: threads = {opts['threads']} without enable-threads: "
            "say it explicitly so threads the app itself starts also run",
            "add enable-threads = true"))
    if "harakiri" not in opts:
        out.append(Finding(
            "warning", "uwsgi", f"{path}: no harakiri: a request stuck on a dead database "
            "connection holds its worker forever", "set harakiri = 30 (seconds)"))
    return out


# -- app import ---------------------------------------------------------------------------------
def check_app(spec: str, ctx: Context) -> list[Finding]:
    """Import the app and find engines and connections open at import time."""
    module_name = spec.split(":", 1)[0]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(module_name)
    except BaseException as exc:  # ImportError, a failing app, or sys.exit in it
        return [Finding("error", "app", f"importing {module_name} failed: "
                        f"{type(exc).__name__}: {exc}", _import_fix(exc))]
    import forksafe
    from forksafe._instrument import _scan_gc
    from forksafe.drivers import find_driver

    engine_findings: list[Finding] = []
    conn_findings: list[Finding] = []
    engines_pools: set[int] = set()
    objects = _scan_gc()
    for obj in objects:
        if find_driver(obj) is None:
            engine_findings += _engine_finding(obj, ctx, engines_pools)
    for obj in objects:
        driver = find_driver(obj)
        if driver is None or id(obj) in engines_pools:
            continue
        try:
            open_ = driver.socket_fd(obj) is not None
        except Exception:
            open_ = False
        if open_ and not forksafe.is_tracked(obj):
            conn_findings.append(Finding(
                "error", "app", f"a {driver.name} connection is open at import and not "
                "tracked: a fork shares it", "forksafe.track(conn) or forksafe.ProcessLocal"))
    # _scan_gc() lists objects in the collector's order, which shifts with whatever the
    # import allocated; report engines (their pooled connections included) before stray
    # connections, each by severity, then by text.
    out = sorted(engine_findings, key=_finding_key) + sorted(conn_findings, key=_finding_key)
    if not out:
        out.append(Finding("info", "app", f"{module_name}: no engine or connection at import"))
    gc.collect()
    return out


def _finding_key(finding: Finding) -> tuple[int, str]:
    return SEVERITY_ORDER.get(finding.severity, 3), finding.message


_DB_MODULES = ("sqlalchemy", "MySQLdb", "pymysql", "psycopg2", "psycopg")


def _import_fix(exc: BaseException) -> str:
    """The fix for an app whose import failed: a database error or anything else."""
    module = type(exc).__module__.split(".", 1)[0]
    if module in _DB_MODULES:
        return ("the app talks to its database while it loads: check that the server is up "
                "and reachable from here with the app's settings")
    return "run doctor from the directory the server runs the app from"


def _engine_finding(engine: Any, ctx: Context, pooled: set[int]) -> list[Finding]:
    """What an engine found after the import means; adds its pooled connections to pooled."""
    import forksafe
    from forksafe.drivers import unwrap
    from forksafe.sqlalchemy import _idle_records, _record_connection

    url = engine.url.render_as_string(hide_password=True)
    if engine.url.password:
        ctx.secrets += (str(engine.url.password),)
    pool = engine.pool
    held = int(getattr(pool, "checkedin", lambda: 0)()) + int(
        getattr(pool, "checkedout", lambda: 0)())
    for record in _idle_records(pool):
        conn = _record_connection(record)
        if conn is not None:
            pooled.add(id(unwrap(conn)))
    tracked = forksafe.is_tracked(engine)
    if held and not tracked:
        return [Finding(
            "error", "app", f"engine {url} has {held} connection(s) open at import and is "
            "not tracked: a fork shares them between workers",
            "engine = forksafe.track(create_engine(...)), or forksafe.instrument() first")]
    if held:
        return [Finding("info", "app", f"engine {url} has {held} connection(s) open at "
                        "import and is tracked: workers get their own")]
    if not tracked:
        return [Finding("warning", "app", f"engine {url} is not tracked (no connection open "
                        "at import yet)", "forksafe.track() it anyway")]
    return [Finding("info", "app", f"engine {url} is tracked")]
