"""``forksafe doctor``: check a deployment for causes of "server has gone away" and fork bugs.

Looks at whatever it is given: a database URL (the server's timeouts, packet size and
connection limit against what the workers can hold), a ``gunicorn.conf.py``, a uWSGI ini
file (read as uWSGI reads it: `read_uwsgi_ini`), and an app import path (engines and
connections open at import, a Django project's aliases). The checks feed each other: a
server config says whether the app is loaded before the fork (which decides whether what it
opens at import is shared), how many workers and threads there are and the worker timeout;
the app says which pools there are and whether they are tracked. Prints the
findings most serious first, each with its fix; ``--json`` for machines. Exit status 1 when a
finding is an error, 0 otherwise (2 for bad usage). Never prints a traceback or a password.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import re
import runpy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Finding", "add_arguments", "check_app", "check_gunicorn", "check_url",
           "check_uwsgi", "read_uwsgi_ini", "run"]

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
    pool_size: int | None = None  # --pool-size / --max-overflow, when given
    max_overflow: int | None = None
    secrets: tuple[str, ...] = ()
    #: whether the server forks after loading the app (uWSGI without lazy-apps, gunicorn
    #: preload_app): only then is what the app opened at import shared; None: unknown
    forks_after_load: bool | None = None
    #: where that was learned, for messages ("uwsgi.ini: lazy-apps")
    fork_source: str = ""
    threads: int | None = None  # threads per worker, from a server config
    #: what ``threads`` counts: an asyncio / greenlet worker class (uvicorn, gevent) serves
    #: up to worker_connections requests at once on one thread
    threads_unit: str = "thread(s) per worker"
    #: the server's worker timeout (gunicorn timeout, uWSGI harakiri) and where it is set
    worker_timeout: tuple[int, str] | None = None
    #: per engine found by --app: (URL, pool_size + max_overflow or None when unbounded,
    #: connections it holds at import, tracked)
    engines: list[tuple[str, int | None, int, bool]] | None = None
    #: Django found by --app: {alias: (vendor, CONN_MAX_AGE)}
    django: dict[str, tuple[str, Any]] | None = None

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
    parser.add_argument("--uwsgi", metavar="FILE[:SECTION]",
                        help="a uWSGI .ini file (section: default uwsgi)")
    parser.add_argument("--app", metavar="MODULE[:ATTR]",
                        help="import this module and inspect the engines it opened")
    parser.add_argument("--workers", type=int, help="worker processes (default: from config)")
    parser.add_argument("--threads", type=int,
                        help="threads per worker (default: from config, else 1)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="pool_size of one worker's pool (default: the pools --app "
                        "finds, else 5)")
    parser.add_argument("--max-overflow", type=int, default=None,
                        help="max_overflow of one worker's pool (default: the pools --app "
                        "finds, else 10)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """Run every check that was asked for, print the findings, return the exit status."""
    ctx = Context(workers=args.workers, pool_size=args.pool_size,
                  max_overflow=args.max_overflow, threads=args.threads)
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
    pooler = None
    if backend == "postgresql":
        findings += _pg_findings(shown, settings, ctx)
        from forksafe._pgbouncer import pgbouncer_findings  # PgBouncer between app and server

        pooler = pgbouncer_findings(url, shown, settings, ctx)
    else:
        findings += _mysql_findings(shown, settings, ctx)
    # behind a pooler the app's connections count against its limit, not the server's
    findings += pooler if pooler is not None else _capacity_findings(shown, backend, settings,
                                                                    ctx)
    return findings


def _seconds(value: Any, unit: str | None) -> int:
    number = int(value)
    return number // 1000 if unit == "ms" else number


def _idle_finding(shown: str, name: str, secs: int, ctx: Context) -> list[Finding]:
    """The server's idle limit: what it breaks, and advice that fits what --app found."""
    what = (f"{shown}: {name} = {secs} s: the server drops connections idle longer than "
            "that ('server has gone away' 2006/2013, 'server closed the connection')")
    engines = ctx.engines or []
    out: list[Finding] = []
    if secs < 60:
        out.append(Finding(
            "warning", "url", what + "; so short that pooled connections die between "
            "requests", f"raise {name} on the server (e.g. 600, in its config file too); "
            "meanwhile tracked engines retire idle connections at 90% of it"))
    elif ctx.django:
        ages = [age for _vendor, age in ctx.django.values()]
        below = all(isinstance(age, (int, float)) and age < secs for age in ages)
        if below:
            out.append(Finding(
                "info", "url", what + f"; CONN_MAX_AGE ({', '.join(map(str, ages))}) is below "
                "it, so HTTP workers replace their connections first",
                "workers without HTTP (consumers, commands): forksafe.django.unit_of_work() "
                "around each job"))
        else:
            out.append(Finding(
                "warning" if secs < 600 else "info", "url", what,
                f"keep CONN_MAX_AGE below {secs} (None keeps connections forever); workers "
                "without HTTP (consumers, commands): forksafe.django.unit_of_work() around "
                "each job"))
    elif engines and all(tracked for _, _, _, tracked in engines):
        out.append(Finding("info", "url", what + "; the tracked engine(s) found by --app "
                           "retire idle connections before it (recycle='auto')"))
    else:
        out.append(Finding(
            "warning" if secs < 600 else "info", "url", what,
            "forksafe.track(engine) (retires idle connections before the limit, learned on "
            f"connect), or create_engine(..., pool_recycle={secs - 30})"))
    if ctx.worker_timeout is not None and ctx.worker_timeout[0] > secs:
        timeout, where = ctx.worker_timeout
        out.append(Finding(
            "warning", "url", f"{where} = {timeout} s is longer than {name} = {secs} s: a "
            f"request that keeps its connection idle longer than {secs} s (waiting on another "
            "service, a slow computation) finds it dropped mid-request, where no pool check "
            "can help", f"raise {name} above {timeout} s"
            + (f", or lower the worker timeout below {secs} s" if secs >= 60 else "")))
    return out


def _mysql_findings(shown: str, s: dict[str, tuple[Any, Any]], ctx: Context) -> list[Finding]:
    out = []
    if "wait_timeout" in s:
        out += _idle_finding(shown, "wait_timeout", int(s["wait_timeout"][0]), ctx)
    if "interactive_timeout" in s:
        out.append(Finding("info", "url", f"{shown}: interactive_timeout = "
                           f"{s['interactive_timeout'][0]} s (applies to clients that ask for "
                           "CLIENT_INTERACTIVE only)"))
    if "max_allowed_packet" in s:
        packet = int(s["max_allowed_packet"][0])
        if packet < 16 * 1024 * 1024:
            out.append(Finding(
                "warning", "url", f"{shown}: max_allowed_packet = {packet} bytes: a larger "
                "statement makes the server close the connection (1153, or 2006 'server has "
                "gone away'); sending it again fails the same way",
                "SET GLOBAL max_allowed_packet = 67108864 (and in the server config), or "
                "send large data in chunks"))
    return out


def _pg_findings(shown: str, s: dict[str, tuple[Any, Any]], ctx: Context) -> list[Finding]:
    out = []
    for name in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
        if name in s:
            secs = _seconds(*s[name])
            if secs > 0:
                out += _idle_finding(shown, name, secs, ctx)
    if "tcp_keepalives_idle" in s:
        out.append(Finding("info", "url", f"{shown}: tcp_keepalives_idle = "
                           f"{s['tcp_keepalives_idle'][0]} s"))
    return out


def _per_worker(ctx: Context, backend: str) -> tuple[int, str]:
    """Connections one worker may hold at once, and how that was worked out."""
    threads = ctx.threads or 1
    per_thread = f"{threads} {ctx.threads_unit}"
    if ctx.pool_size is not None or ctx.max_overflow is not None:
        size = SA_POOL_SIZE if ctx.pool_size is None else ctx.pool_size
        overflow = SA_MAX_OVERFLOW if ctx.max_overflow is None else ctx.max_overflow
        return (min(size + overflow, threads),
                f"min(pool_size {size} + max_overflow {overflow}, {per_thread})")
    if ctx.engines:
        parts, total = [], 0
        for url, capacity, _held, _tracked in ctx.engines:
            total += threads if capacity is None else min(capacity, threads)
            shown = "unbounded" if capacity is None else str(capacity)
            parts.append(f"{url} pool {shown}")
        return total, f"engines ({'; '.join(parts)}), each capped by {per_thread}"
    if ctx.django:
        vendor = "postgresql" if backend == "postgresql" else "mysql"
        aliases = [a for a, (v, _age) in ctx.django.items() if v == vendor] or list(ctx.django)
        return (len(aliases) * threads,
                f"Django aliases {', '.join(aliases)} x {per_thread}")
    return (min(SA_POOL_SIZE + SA_MAX_OVERFLOW, threads),
            f"min(SQLAlchemy's default pool_size {SA_POOL_SIZE} + max_overflow "
            f"{SA_MAX_OVERFLOW}, {per_thread})")


def _capacity_findings(shown: str, backend: str, s: dict[str, tuple[Any, Any]],
                       ctx: Context) -> list[Finding]:
    if "max_connections" not in s:
        return []
    limit = int(s["max_connections"][0])
    if backend == "postgresql" and "superuser_reserved_connections" in s:
        limit -= int(s["superuser_reserved_connections"][0])
    workers = ctx.workers or 1
    per_worker, how = _per_worker(ctx, backend)
    master = 0
    if ctx.forks_after_load is not False and ctx.engines:
        master = sum(held for _, _, held, _ in ctx.engines)  # kept open by the parent
    need = per_worker * workers + master
    text = (f"{shown}: {workers} worker(s) x {per_worker} connection(s) [{how}]"
            + (f" + {master} held by the master" if master else "")
            + f" = {need} connections; the server allows {limit}")
    if need > limit:
        return [Finding("error", "url", text + ": under load, connects fail with 'Too many "
                        "connections'", "lower the pools, threads or workers, or raise "
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
    preload = bool(settings.get("preload_app"))
    if ctx.forks_after_load is None:
        ctx.forks_after_load = preload
        ctx.fork_source = f"{path}: " + ("preload_app" if preload else "no preload_app")
    if not preload:
        out.append(Finding("info", "gunicorn", f"{path}: no preload_app: every worker loads "
                           "the app after fork, so nothing it opens at import is shared"))
    if preload:
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
    if isinstance(timeout, int) and timeout > 0 and ctx.worker_timeout is None:
        ctx.worker_timeout = (timeout, f"{path}: timeout")
    if timeout == 0:
        out.append(Finding("warning", "gunicorn", f"{path}: timeout = 0: a worker stuck on a "
                           "dead connection is never restarted", "set timeout = 30 (or more)"))
    out += _async_worker_class(path, settings, ctx)
    threads = settings.get("threads", 1)
    if isinstance(threads, int) and threads > 0 and ctx.threads is None:
        ctx.threads = threads
    if isinstance(threads, int) and threads > 1:
        out.append(Finding("info", "gunicorn", f"{path}: threads = {threads}: each worker "
                           f"may check out up to {threads} connections at once; size "
                           "pool_size accordingly"))
    return out


def _async_worker_class(path: Path, settings: dict[str, Any], ctx: Context) -> list[Finding]:
    """uvicorn / gevent / eventlet workers: many requests at once on one thread, so a worker
    may hold its whole pool (threads do not cap it)."""
    worker_class = str(settings.get("worker_class", "sync"))
    if not any(k in worker_class.lower() for k in ("uvicorn", "gevent", "eventlet")):
        return []
    connections = settings.get("worker_connections", 1000)
    if not isinstance(connections, int) or connections < 1:
        connections = 1000
    if ctx.threads is None:
        ctx.threads = connections
        ctx.threads_unit = f"request(s) at once per {worker_class.rsplit('.', 1)[-1]}"
    return [Finding("info", "gunicorn", f"{path}: worker_class = {worker_class}: one worker "
                    f"serves up to {connections} requests at once (worker_connections), so "
                    "it may check out its engine's whole pool")]


# -- uWSGI --------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("", "1", "true", "yes", "on")


class UwsgiIniError(Exception):
    """A uWSGI ini file that cannot be read as uWSGI would read it."""


#: uWSGI's spellings of "import this Python module" (all the same option).
_IMPORT_OPTIONS = ("import", "pyimport", "py-import", "python-import")
_SHARED_IMPORT_OPTIONS = tuple(f"shared-{name}" for name in _IMPORT_OPTIONS)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PLACEHOLDER = re.compile(r"%\(([^)]*)\)|%([dpsnec%])|\$\(([^)]*)\)")


def read_uwsgi_ini(spec: str, _depth: int = 0) -> list[tuple[str, str]]:
    """The options of a uWSGI ini file as uWSGI reads them: ``(name, value)`` in order.

    ``spec`` is ``file.ini`` or ``file.ini:section`` (default section ``uwsgi``). As uWSGI
    does: a value runs to the end of its line (``; text`` after it is part of the value, a
    comma is not a separator), every repeated option applies, ``_`` in a name is ``-``,
    ``%(option)``, ``%d``/``%p``/``%s``/``%n``/``%e``/``%c`` and ``$(ENV)`` are expanded, and
    ``ini = other.ini[:section]`` is read in place.
    """
    path_text, _, section = spec.partition(":")
    section = section or "uwsgi"
    path = Path(path_text)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UwsgiIniError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UwsgiIniError(f"{path} is not a text file") from exc
    current: str | None = None
    sections: set[str] = set()
    options: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            sections.add(current)
            continue
        if "=" not in line:
            if current is None:
                raise UwsgiIniError(f"{path} is not an ini file: a line outside any section")
            continue
        if current is None:
            raise UwsgiIniError(f"{path} is not an ini file: an option outside any section")
        if current != section:
            continue
        name, _, value = line.partition("=")
        name = name.strip().replace("_", "-").lower()
        value = _expand(value.strip(), path, options)
        if name == "ini" and _depth < 8:
            include = value  # relative to the working directory, as uWSGI reads it,
            target = include.partition(":")[0]  # else to this file's directory
            if not Path(target).is_absolute() and not Path(target).exists():
                include = str(path.parent / include)
            options += read_uwsgi_ini(include, _depth + 1)
            continue
        options.append((name, value))
    if section not in sections:
        raise UwsgiIniError(f"{path} has no [{section}] section")
    return options


def _expand(value: str, path: Path, options: list[tuple[str, str]]) -> str:
    """uWSGI's placeholders in one value (unknown ones are left as they are)."""
    resolved = path.resolve()
    magic = {"d": str(resolved.parent) + "/", "p": str(resolved), "s": resolved.name,
             "n": resolved.stem, "e": resolved.suffix, "c": resolved.parent.name, "%": "%"}

    def one(match: re.Match[str]) -> str:
        option, letter, env = match.groups()
        if option is not None:
            key = option.replace("_", "-").lower()
            found = [v for k, v in options if k == key]
            return found[-1] if found else match.group(0)
        if letter is not None:
            return magic[letter]
        return os.environ.get(env, match.group(0))

    return _PLACEHOLDER.sub(one, value)


def _forksafe_module_exists(name: str) -> bool:
    """Whether ``name`` (a forksafe module) exists, without importing it (forksafe.uwsgi
    refuses to import outside uWSGI)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_uwsgi(path_text: str, ctx: Context) -> list[Finding]:
    """Loading and forking without a hook, imports uWSGI cannot do, master, lazy-apps,
    threads, harakiri."""
    path = Path(path_text.partition(":")[0])
    try:
        options = read_uwsgi_ini(path_text)
    except UwsgiIniError as exc:
        fix = ("pass the path of an existing uWSGI .ini file" if str(exc).startswith("cannot")
               else "uWSGI reads options from the [uwsgi] section (or file.ini:section)")
        return [Finding("error", "uwsgi", str(exc), fix)]
    opts: dict[str, str] = {}
    for name, value in options:
        opts[name] = value  # the last one, for single-valued options
    out: list[Finding] = []
    processes = opts.get("processes") or opts.get("workers") or "1"
    if processes.isdigit() and ctx.workers is None:
        ctx.workers = int(processes)
    threads = opts.get("threads", "1")
    if threads.isdigit() and ctx.threads is None:
        ctx.threads = int(threads)
    lazy = any(name in opts and _truthy(opts[name]) for name in ("lazy-apps", "lazy"))
    if ctx.forks_after_load is None:
        ctx.forks_after_load = not lazy
        ctx.fork_source = f"{path}: " + ("lazy-apps" if lazy else "no lazy-apps")
    imports = [(name, value) for name, value in options
               if name in _IMPORT_OPTIONS + _SHARED_IMPORT_OPTIONS]
    for name, value in imports:
        if not _MODULE_NAME.fullmatch(value):
            out.append(Finding(
                "error", "uwsgi", f"{path}: `{name} = {value}`: uWSGI cannot import that "
                f"(it takes the whole rest of the line as one module name and logs "
                f"ModuleNotFoundError: No module named {value!r})",
                "one module per line, with no comment after it: put a comment on a line of "
                "its own"))
        elif value.partition(".")[0] == "forksafe" and not _forksafe_module_exists(value):
            out.append(Finding(
                "error", "uwsgi", f"{path}: `{name} = {value}`: forksafe has no module "
                f"{value!r}; uWSGI logs ModuleNotFoundError and goes on without it",
                "import = forksafe.uwsgi"))
    hooked = any(value == "forksafe.uwsgi" for _, value in imports) or any(
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
            "add a line `import = forksafe.uwsgi` (or set lazy-apps = true)"))
    else:
        out.append(Finding("info", "uwsgi", f"{path}: forksafe runs in every worker after fork"))
    return out + _uwsgi_hygiene(path, opts, ctx)


def _uwsgi_hygiene(path: Path, opts: dict[str, str], ctx: Context) -> list[Finding]:
    """master, enable-threads, harakiri (and the worker timeout it sets for the URL check)."""
    out: list[Finding] = []
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
    elif opts["harakiri"].isdigit() and int(opts["harakiri"]) > 0 and ctx.worker_timeout is None:
        ctx.worker_timeout = (int(opts["harakiri"]), f"{path}: harakiri")
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
            if ctx.forks_after_load is False:
                conn_findings.append(Finding(
                    "info", "app", f"a {driver.name} connection is open at import and not "
                    f"tracked; not shared here ({ctx.fork_source}: each worker imports the "
                    "app after fork), but it would be if the app were loaded before the fork",
                    "forksafe.track(conn) or forksafe.ProcessLocal"))
            else:
                conn_findings.append(Finding(
                    "error", "app", f"a {driver.name} connection is open at import and not "
                    "tracked: a fork shares it", "forksafe.track(conn) or forksafe.ProcessLocal"))
    # _scan_gc() lists objects in the collector's order, which shifts with whatever the
    # import allocated; report engines (their pooled connections included) before stray
    # connections, each by severity, then by text.
    out = sorted(engine_findings, key=_finding_key) + sorted(conn_findings, key=_finding_key)
    out += _django_findings(ctx)
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
    if ctx.engines is None:
        ctx.engines = []
    ctx.engines.append((url, _pool_capacity(pool), held, tracked))
    if held and not tracked and ctx.forks_after_load is False:
        return [Finding(
            "info", "app", f"engine {url} has {held} connection(s) open at import and is not "
            f"tracked; not shared here ({ctx.fork_source}: each worker imports the app after "
            "fork), but they would be if the app were loaded before the fork",
            "engine = forksafe.track(create_engine(...)) keeps it safe either way")]
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


def _pool_capacity(pool: Any) -> int | None:
    """The most connections ``pool`` opens at once: pool_size + max_overflow (QueuePool),
    1 (SingletonThreadPool/StaticPool per thread), None when it has no bound (NullPool, or a
    negative max_overflow)."""
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if callable(size) and isinstance(overflow, int):
        if overflow < 0:
            return None
        return int(size()) + overflow
    name = type(pool).__name__
    if name in ("StaticPool", "SingletonThreadPool", "AssertionPool"):
        return 1
    return None


def _django_findings(ctx: Context) -> list[Finding]:
    """A Django project found by the import: its aliases, for the connection budget."""
    conf = sys.modules.get("django.conf")
    if conf is None:
        return []
    try:
        settings = conf.settings
        if not settings.configured:
            return []
        databases = dict(settings.DATABASES)
    except Exception:  # settings that fail to load were reported by the import itself
        return []
    ctx.django = {}
    for alias, config in databases.items():
        engine = str(config.get("ENGINE", ""))
        ctx.django[alias] = (engine.rsplit(".", 1)[-1], config.get("CONN_MAX_AGE", 0))
    names = ", ".join(f"{alias} ({vendor}, CONN_MAX_AGE={age})"
                      for alias, (vendor, age) in ctx.django.items())
    out = [Finding("info", "app", f"Django project: database aliases {names}; each thread "
                   "of each worker holds at most one connection per alias")]
    if "forksafe.django" not in list(getattr(settings, "INSTALLED_APPS", [])):
        severity = "info" if ctx.forks_after_load is False else "warning"
        out.append(Finding(
            severity, "app", "'forksafe.django' is not in INSTALLED_APPS: connections "
            "opened before a fork (gunicorn preload_app, uWSGI without lazy-apps, Celery "
            "prefork) are shared by the workers", "add 'forksafe.django' to INSTALLED_APPS"))
    return out
