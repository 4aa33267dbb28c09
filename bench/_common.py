"""What the benchmarks share: tables, a database, real servers with the flags a run needs.

The servers are started the way `forksafe.testing.servers` starts them (mirakuru, the server
in its own process group, SIGINT to stop, SIGKILL after a grace period, the uwsgi binary that
`find_uwsgi` finds), with the knobs a benchmark varies and the repro harness does not:
any WSGI app, the worker count, and preload (gunicorn ``preload_app`` / uWSGI without
``lazy-apps``) against lazy loading (gunicorn without ``preload_app`` / uWSGI ``lazy-apps``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from forksafe.testing.servers import _stop, find_uwsgi, free_port

__all__ = [
    "APPS_DIR",
    "EXAMPLE_DIR",
    "ROOT",
    "Running",
    "ServerSpec",
    "database",
    "memory",
    "print_table",
    "serve",
    "wait_for_workers",
]

ROOT = Path(__file__).resolve().parents[1]
APPS_DIR = ROOT / "bench" / "apps"
EXAMPLE_DIR = ROOT / "examples" / "flask_app"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``## title``, then columns separated by at least two spaces, then a blank line.

    Floats are printed with the precision the caller gave them (pass strings to control it).
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [
        i > 0 and all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))
    ]
    print(f"\n## {title}")
    for r in cells:
        line = "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(r, widths, numeric, strict=True)
        )
        print(line.rstrip())
    print(flush=True)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """Yield ``url``, or the URL of a private MariaDB started (and removed) for the run."""
    if url:
        yield url
        return
    from forksafe.testing.mariadb import MariaDB

    with MariaDB(general_log=False, options=("--max-connections=500",)) as server:
        yield server.url()


@dataclass
class ServerSpec:
    """One server to start: which, which app, how many workers, preloaded or lazy."""

    server: str  # "gunicorn" or "uwsgi"
    app: str  # "module:callable", importable from chdir or bench/apps
    workers: int
    preload: bool  # gunicorn preload_app / uWSGI without lazy-apps
    hook: bool  # add forksafe's post-fork hook (gunicorn.conf.py / --import forksafe.uwsgi)
    env: dict[str, str] = field(default_factory=dict)
    chdir: Path = EXAMPLE_DIR


@dataclass
class Running:
    """A started server: its URL, the master's pid and when it was started."""

    base: str
    pid: int
    started: float  # time.monotonic() just before the process was spawned


def _command(spec: ServerSpec, port: int, workdir: Path) -> list[str]:
    if spec.server == "gunicorn":
        conf = [
            f"bind = '127.0.0.1:{port}'",
            f"workers = {spec.workers}",
            "worker_class = 'sync'",
            f"preload_app = {spec.preload}",
            "timeout = 60",
            "graceful_timeout = 2",
            "loglevel = 'warning'",
            f"chdir = {str(spec.chdir)!r}",
            f"pythonpath = {str(APPS_DIR)!r}",
        ]
        if spec.hook:
            conf.append("from forksafe.gunicorn import post_fork, pre_fork  # noqa: F401")
        path = workdir / "gunicorn.conf.py"
        path.write_text("\n".join(conf) + "\n")
        return [sys.executable, "-m", "gunicorn", "-c", str(path), spec.app]
    command = [
        find_uwsgi(),
        "--http-socket", f"127.0.0.1:{port}",
        "--chdir", str(spec.chdir),
        "--pythonpath", str(APPS_DIR),
        "--module", spec.app,
        "--master",
        "--processes", str(spec.workers),
        "--need-app",
        "--disable-logging",
        "--listen", "128",
    ]  # fmt: skip
    if sys.prefix != sys.base_prefix:
        command += ["--home", sys.prefix]
    if not spec.preload:
        command.append("--lazy-apps")
    if spec.hook:
        command += ["--import", "forksafe.uwsgi"]
    return command


@contextlib.contextmanager
def serve(spec: ServerSpec) -> Iterator[Running]:
    """Start the server (without waiting for it) and always stop its whole process group."""
    import signal

    from mirakuru import SimpleExecutor

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="forksafe-bench-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "server.log"
        with log_path.open("wb") as log:
            executor = SimpleExecutor(
                _command(spec, port, workdir),
                timeout=120,
                stop_signal=signal.SIGINT,
                envvars={"PYTHONUNBUFFERED": "1", **spec.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(spec.chdir),
            )
            started = time.monotonic()
            executor.start()
            try:
                assert executor.process is not None
                yield Running(f"http://127.0.0.1:{port}", executor.process.pid, started)
            except Exception:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
                print("server log tail:\n  " + "\n  ".join(tail), file=sys.stderr)
                raise
            finally:
                _stop(executor)


def _pid_of(base: str, path: str) -> int | None:
    try:
        with urllib.request.urlopen(base + path, timeout=5) as response:
            body = response.read()
    except OSError:
        return None
    text = body.decode("utf-8", "replace").strip()
    if text.isdigit():
        return int(text)
    if text == "ok":  # /health: the server answers, pid unknown
        return 0
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return int(json.loads(text)["pid"])
    return None


def wait_for_workers(
    running: Running, workers: int, timeout: float = 90.0, path: str = "/_pid?hold=0.03"
) -> float:
    """Seconds from spawn until ``workers`` distinct worker pids answered ``path``.

    Requests go out from ``2 * workers`` threads at once; the bench apps hold each ``/_pid``
    answer for a few ms so that a busy worker leaves the next request to another one.

    Raises:
        TimeoutError: fewer pids answered within ``timeout`` seconds of the spawn.
    """
    seen: set[int] = set()
    lock = threading.Lock()
    done = threading.Event()
    deadline = running.started + timeout
    finished: list[float] = []

    def poll() -> None:
        while not done.is_set() and time.monotonic() < deadline:
            pid = _pid_of(running.base, path)
            if pid is None:
                time.sleep(0.02)
                continue
            with lock:
                seen.add(pid)
                if len(seen) >= workers and not done.is_set():
                    finished.append(time.monotonic())
                    done.set()

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(min(2 * workers, 32))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not finished:
        raise TimeoutError(f"only {len(seen)} of {workers} workers answered in {timeout:g} s")
    return finished[0] - running.started


_ROLLUP = re.compile(rb"^(Pss|Private_Clean|Private_Dirty):\s+(\d+) kB", re.MULTILINE)


def memory(master: int) -> tuple[float, float, int]:
    """Total USS and PSS in MiB of ``master`` and all its descendants, and the process count.

    USS is the memory only that process maps (``Private_Clean + Private_Dirty``), PSS its
    private memory plus its share of pages it shares (from ``/proc/PID/smaps_rollup``).
    """
    import psutil

    procs = [psutil.Process(master), *psutil.Process(master).children(recursive=True)]
    uss = pss = 0
    for proc in procs:
        try:
            data = Path(f"/proc/{proc.pid}/smaps_rollup").read_bytes()
        except OSError:
            continue
        for name, kb in _ROLLUP.findall(data):
            if name == b"Pss":
                pss += int(kb)
            else:
                uss += int(kb)
    return uss / 1024, pss / 1024, len(procs)


def median(values: Sequence[float]) -> float:
    """The median (a plain helper so that scripts need not import statistics)."""
    import statistics

    return statistics.median(values)


def environment_note() -> str:
    """One line naming the machine and the versions a run used."""
    import platform

    import sqlalchemy

    parts = [
        f"{os.cpu_count()} CPUs",
        f"Python {platform.python_version()}",
        f"SQLAlchemy {sqlalchemy.__version__}",
    ]
    return ", ".join(parts)
