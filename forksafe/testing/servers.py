"""The scenarios of ``forksafe repro``: real gunicorn, real uWSGI, a real ``multiprocessing`` pool.

Each server scenario is a mirakuru executor: the server starts in its own session (process
group), the executor waits until ``GET /health`` answers, and stopping it signals the whole
group, then SIGKILLs whatever is left after a grace period. `running_server` wraps that in a
context manager so that an exception or Ctrl-C in the middle of a run still stops every
process the scenario started.

The servers import `forksafe.testing.app` before they fork (gunicorn ``preload_app``, uWSGI
without ``lazy-apps``), which is what users do and what makes the bug happen. Protection is
added exactly as the README says: ``from forksafe.gunicorn import post_fork`` in a generated
gunicorn.conf.py, ``--import forksafe.uwsgi`` for uWSGI, and for the pool nothing but
``import forksafe`` (its ``os.register_at_fork`` hook) plus ``forksafe.track`` in the app.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forksafe.testing import checks
from forksafe.testing._async_drivers import ENV_ASYNC_DRIVER

__all__ = [
    "DEFAULT_SCENARIOS",
    "SCENARIOS",
    "HarnessError",
    "Scenario",
    "ServerSettings",
    "check_port_free",
    "check_scenario_available",
    "find_uwsgi",
    "run_pool",
    "running_server",
]

APP = "forksafe.testing.app:application"
ASGI_APP = "forksafe.testing.asgi_app:app"


class HarnessError(RuntimeError):
    """Bad input or a missing piece: the message is one line that says what to do."""


@dataclass(frozen=True)
class Scenario:
    """One way of forking workers after the app was loaded."""

    name: str
    title: str
    kind: str  # "gunicorn", "uwsgi" or "pool"
    threads: bool = False
    master: bool = True
    #: an ASGI app (`forksafe.testing.asgi_app`, an AsyncEngine) under uvicorn workers
    asgi: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("gunicorn-sync", "gunicorn sync workers, preload_app", "gunicorn"),
        Scenario("gunicorn-gthread", "gunicorn gthread workers, preload_app", "gunicorn", True),
        Scenario("uwsgi-master", "uWSGI master + processes (defaults)", "uwsgi"),
        Scenario("uwsgi-threads", "uWSGI master + processes + threads", "uwsgi", True),
        Scenario("uwsgi-nomaster", "uWSGI processes, no master", "uwsgi", master=False),
        Scenario("multiprocessing", "multiprocessing Pool, fork", "pool"),
        Scenario(
            "gunicorn-uvicorn", "gunicorn uvicorn workers, ASGI, preload_app", "gunicorn",
            asgi=True,
        ),
    )
}

#: what ``forksafe repro`` runs without ``--server``: all six fit in about 20 s. The ASGI
#: scenario needs an asyncio driver (``--driver psycopg2`` selects PostgreSQL, served
#: through psycopg 3's async driver) and runs when named or with ``--server all``.
DEFAULT_SCENARIOS = tuple(name for name, s in SCENARIOS.items() if not s.asgi)


@dataclass(frozen=True)
class ServerSettings:
    """Everything a scenario run needs to start its processes."""

    url: str  # SQLAlchemy URL, password included: passed by environment, never printed
    mode: str
    protect: bool
    workers: int = 4
    threads: int = 4
    port: int = 0
    db_timeout: int = 3
    startup_timeout: float = 60.0
    async_driver: str = ""  # the ASGI scenario's asyncio driver ("": the backend's default)

    def environment(self) -> dict[str, str]:
        """The app's environment (see `forksafe.testing.app`)."""
        return {
            checks.ENV_URL: self.url,
            checks.ENV_MODE: self.mode,
            checks.ENV_PROTECT: "1" if self.protect else "0",
            checks.ENV_DB_TIMEOUT: str(self.db_timeout),
            "PYTHONUNBUFFERED": "1",
            ENV_ASYNC_DRIVER: self.async_driver,
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def check_port_free(port: int) -> None:
    """Raise `HarnessError` when something listens on (or holds) 127.0.0.1:``port``.

    The probe binds with ``SO_REUSEADDR`` as the servers themselves do (mariadbd, gunicorn,
    uWSGI): closed connections of a server stopped a moment ago linger in TIME_WAIT on the
    port for a minute and must not count as "in use"; a live listener still does.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise HarnessError(
                f"port {port} is in use ({exc.strerror}): pass another --port, or leave "
                "--port out to use a free one"
            ) from None


def find_uwsgi() -> str:
    """The uwsgi binary: ``$FORKSAFE_UWSGI``, next to this Python, or on PATH."""
    override = os.environ.get("FORKSAFE_UWSGI")
    if override:
        if os.access(override, os.X_OK) and Path(override).is_file():
            return override
        raise HarnessError(
            f"FORKSAFE_UWSGI={override} is not an executable: point it at a uwsgi binary "
            "or unset it"
        )
    beside = Path(sys.executable).with_name("uwsgi")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("uwsgi")
    if found:
        return found
    raise HarnessError(
        "uwsgi not found: pip install 'forksafe[uwsgi]' (or uWSGI), or leave the uwsgi-* "
        "scenarios out with --server"
    )


def check_scenario_available(scenario: Scenario) -> None:
    """Raise `HarnessError` when the server a scenario needs is not installed."""
    if scenario.kind == "gunicorn" and importlib.util.find_spec("gunicorn") is None:
        raise HarnessError(
            "gunicorn is not installed: pip install 'forksafe[gunicorn]', or leave the "
            "gunicorn-* scenarios out with --server"
        )
    if scenario.kind == "uwsgi":
        find_uwsgi()
    if scenario.asgi:
        for module in ("uvicorn_worker", "starlette", "greenlet"):
            if importlib.util.find_spec(module) is None:
                raise HarnessError(
                    f"{scenario.name} needs {module}: pip install 'forksafe[asgi]', or leave "
                    f"{scenario.name} out with --server"
                )


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    keep = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(keep)


def _gunicorn_command(scenario: Scenario, settings: ServerSettings, workdir: Path) -> list[str]:
    conf = [
        "# generated by forksafe repro",
        f"bind = '127.0.0.1:{settings.port}'",
        f"workers = {settings.workers}",
        f"worker_class = '{_worker_class(scenario)}'",
        f"threads = {settings.threads if scenario.threads else 1}",
        "preload_app = True  # the app (and its database connection) is loaded before fork",
        "timeout = 10",
        "graceful_timeout = 2",
        "loglevel = 'warning'",
    ]
    if settings.protect:
        conf.append("from forksafe.gunicorn import post_fork  # noqa: F401")
    path = workdir / "gunicorn.conf.py"
    path.write_text("\n".join(conf) + "\n")
    return [sys.executable, "-m", "gunicorn", "-c", str(path), ASGI_APP if scenario.asgi else APP]


def _worker_class(scenario: Scenario) -> str:
    if scenario.asgi:
        return "uvicorn_worker.UvicornWorker"
    return "gthread" if scenario.threads else "sync"


def _uwsgi_command(scenario: Scenario, settings: ServerSettings) -> list[str]:
    command = [
        find_uwsgi(),
        "--http-socket",
        f"127.0.0.1:{settings.port}",
        "--module",
        APP,
        "--processes",
        str(settings.workers),
        "--need-app",
        "--disable-logging",
    ]
    if sys.prefix != sys.base_prefix:  # running from a virtualenv: give uWSGI its packages
        command += ["--home", sys.prefix]
    if scenario.master:
        command.append("--master")
    if scenario.threads:
        command += ["--threads", str(settings.threads)]
    if settings.protect:
        command += ["--import", "forksafe.uwsgi"]
    return command


@contextlib.contextmanager
def running_server(scenario: Scenario, settings: ServerSettings) -> Iterator[str]:
    """Start the scenario's server, yield its base URL, and always stop it.

    Raises:
        HarnessError: the server is missing, its port is taken, or it did not come up
            (the message carries the end of its log).
    """
    from mirakuru import HTTPExecutor
    from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError, TimeoutExpired

    if scenario.kind not in ("gunicorn", "uwsgi"):
        raise ValueError(f"{scenario.name} is not a server scenario")
    check_port_free(settings.port)
    with tempfile.TemporaryDirectory(prefix="forksafe-repro-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "server.log"
        if scenario.kind == "gunicorn":
            command = _gunicorn_command(scenario, settings, workdir)
            stop_signal = signal.SIGINT  # quick shutdown of arbiter and workers
        else:
            command = _uwsgi_command(scenario, settings)
            # with a master SIGTERM means "reload"; SIGINT stops master and workers. Without a
            # master the executor signals the whole process group, every worker included.
            stop_signal = signal.SIGINT
        base = f"http://127.0.0.1:{settings.port}"
        with log_path.open("wb") as log:
            executor = HTTPExecutor(
                command,
                url=f"{base}/health",
                method="GET",
                timeout=settings.startup_timeout,
                stop_signal=stop_signal,
                envvars=settings.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(workdir),
            )
            try:
                try:
                    executor.start()
                except AlreadyRunning:
                    raise HarnessError(
                        f"port {settings.port} is in use: pass another --port, or leave --port "
                        "out to use a free one"
                    ) from None
                except (ProcessExitedWithError, TimeoutExpired) as exc:
                    what = "exited" if isinstance(exc, ProcessExitedWithError) else "timed out"
                    raise HarnessError(
                        f"{scenario.name}: the server {what} while starting; its log: "
                        f"{_log_tail(log_path) or '(empty)'}"
                    ) from None
                yield base
            finally:
                _stop(executor)


def _stop(executor: Any) -> None:
    """Stop an executor's process group; SIGKILL after a short grace period. Never raises."""
    from mirakuru.exceptions import ProcessFinishedWithError

    if executor.process is None:
        return
    executor._timeout = 10  # the grace period: mirakuru SIGKILLs the group after it
    try:
        executor.stop()
    except ProcessFinishedWithError:
        pass  # a server exiting non-zero on stop is fine here
    except Exception:
        with contextlib.suppress(Exception):
            executor.kill()


def run_pool(settings: ServerSettings, requests: int, deadline: float) -> dict[str, Any]:
    """The ``multiprocessing`` scenario in a fresh interpreter (forks never happen here).

    Returns the JSON object `forksafe.testing.pool` prints: ``{"outcomes": [[n, category,
    message], ...], "pids": [...]}``.

    Raises:
        HarnessError: the pool runner failed without producing a result.
    """
    from mirakuru import SimpleExecutor

    command = [
        sys.executable,
        "-m",
        "forksafe.testing.pool",
        "--requests",
        str(requests),
        "--workers",
        str(settings.workers),
        "--deadline",
        str(deadline),
    ]
    with tempfile.TemporaryDirectory(prefix="forksafe-repro-") as tmp:
        err_path = Path(tmp) / "pool.log"
        with err_path.open("wb") as err:
            executor = SimpleExecutor(
                command,
                timeout=deadline + 30,
                envvars=settings.environment(),
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=tmp,
            )
            try:
                executor.start()
                process = executor.process
                assert process is not None  # start() just made it
                try:
                    out, _ = process.communicate(timeout=deadline + 20)
                except subprocess.TimeoutExpired:
                    raise HarnessError(
                        "multiprocessing: the pool runner did not finish in time; its log: "
                        f"{_log_tail(err_path) or '(empty)'}"
                    ) from None
            finally:
                _stop(executor)
        try:
            text = out.decode() if isinstance(out, bytes) else str(out)
            result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise HarnessError(
                "multiprocessing: the pool runner failed; its log: "
                f"{_log_tail(err_path) or '(empty)'}"
            ) from None
        return result
