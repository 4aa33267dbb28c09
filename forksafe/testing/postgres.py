"""A private PostgreSQL server in a temporary directory, on a free port.

Built on mirakuru's `TCPExecutor`, like `forksafe.testing.mariadb`: the server runs in the
foreground in its own session, mirakuru waits until the port answers and stops the whole
process group (SIGINT: PostgreSQL's "fast" shutdown, which does not wait for clients).

We do not use pytest-postgresql's ``PostgreSQLExecutor``: it drives ``pg_ctl`` for initdb,
status and stop in the current user's name, and PostgreSQL refuses to run as root, which is
how test suites often run in containers and CI. Here ``initdb`` and ``postgres`` run as the
``postgres`` system user (through ``setpriv``, or ``runuser``) when we are root, and
directly otherwise; the data and socket directory belong to that user.

The server logs every connection and disconnection with the backend pid
(``log_connections`` / ``log_disconnections``), so tests can prove from the server side
that a session ended, or did not.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from forksafe.testing._server import PrivateServer
from forksafe.testing.mariadb import ServerUnavailableError, free_port

__all__ = ["DATABASE", "PostgreSQL", "find_pg_binary"]

DATABASE = "forksafe"
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"


def find_pg_binary(name: str) -> str:
    """``name`` (``initdb``, ``postgres``) on PATH or in ``/usr/lib/postgresql/*/bin``.

    Raises:
        ServerUnavailableError: it is not installed.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServerUnavailableError(
        f"{name} not found: install PostgreSQL's server (Debian: apt-get install postgresql)"
    )


def _as_user_prefix() -> list[str]:
    """The command prefix that runs a program as the ``postgres`` user, if we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError as exc:
        raise ServerUnavailableError(
            "running as root, and there is no 'postgres' system user to run PostgreSQL as "
            "(PostgreSQL refuses to run as root): install the postgresql package"
        ) from exc
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups", "--"]
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", SYSTEM_USER, "--"]


class PostgreSQL(PrivateServer):
    default_database = DATABASE
    login_database = "postgres"

    """A private ``postgres``: ``PostgreSQL().start()``, ``.url()``, ``.restart()``, ``.stop()``.

    Args:
        port: TCP port on 127.0.0.1; a free one by default.
        options: extra server settings, e.g. ``{"idle_session_timeout": "2s"}``.
        basedir: where the data directory goes; a new temporary directory by default.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        options: dict[str, str] | None = None,
        basedir: str | None = None,
    ) -> None:
        self.postgres = find_pg_binary("postgres")
        self.initdb = find_pg_binary("initdb")
        self.prefix = _as_user_prefix()
        self.owns_basedir = basedir is None
        self.basedir = Path(basedir or tempfile.mkdtemp(prefix="forksafe-postgres-"))
        self.datadir = self.basedir / "data"
        self.log_path = self.basedir / "server.log"
        self.port = port or free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.basedir),
            "max_connections": "300",
            "shared_buffers": "32MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_connections": "on",
            "log_disconnections": "on",
            "log_line_prefix": "%m [%p] ",
            "logging_collector": "off",
        }
        settings.update(options or {})
        command = [*self.prefix, self.postgres, "-D", str(self.datadir), "-p", str(self.port)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        self._log_file: IO[str] | None = None
        super().__init__(
            command,
            host="127.0.0.1",
            port=self.port,
            timeout=60,
            stop_signal=2,  # SIGINT: fast shutdown (SIGTERM would wait for every client)
            expected_returncode=0,
            stdout=subprocess.DEVNULL,
            envvars={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
        )

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> PostgreSQL:
        """Run initdb on first start, start the server, create the ``forksafe`` database."""
        if not (self.datadir / "PG_VERSION").is_file():
            self._initdb()
        self._log_file = self.log_path.open("a")
        self._stderr = self._log_file
        try:
            super().start()
        except Exception as exc:
            raise ServerUnavailableError(
                f"postgres did not start on port {self.port}: {exc}. Server log:\n"
                f"{self.log_tail()}"
            ) from exc
        self._wait_for_login()
        exists = "SELECT 1 FROM pg_database WHERE datname = 'forksafe'"
        if not self.execute(exists, database="postgres"):
            self.execute(f"CREATE DATABASE {DATABASE}", database="postgres")
        return self

    def _initdb(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        if self.prefix:  # root: the server's user must own its directories
            info = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.basedir, info.pw_uid, info.pw_gid)
            self.basedir.chmod(0o700)
        cmd = [
            *self.prefix,
            self.initdb,
            f"--pgdata={self.datadir}",
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
        )
        if done.returncode != 0:
            raise ServerUnavailableError(
                f"initdb failed ({done.returncode}): {done.stderr.strip()[-800:]}"
            )

    def stop(self, stop_signal: int | None = None, expected_returncode: int | None = None) -> Any:
        """Stop the server (fast shutdown) and close its log file."""
        try:
            return super().stop(stop_signal, expected_returncode)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    # -- clients -----------------------------------------------------------------------------
    def url(self, driver: str = "psycopg2", database: str = DATABASE) -> str:
        """A SQLAlchemy URL (``postgresql+<driver>://postgres@127.0.0.1:PORT/DB``)."""
        return f"postgresql+{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect_kwargs(self, database: str = DATABASE) -> dict[str, Any]:
        """Keyword arguments for ``psycopg2.connect`` / ``psycopg.connect``."""
        return {"host": "127.0.0.1", "port": self.port, "user": SUPERUSER, "dbname": database}

    def connect(self, database: str = DATABASE) -> Any:
        """A new raw connection (psycopg 3 if installed, else psycopg2), autocommit on."""
        kwargs = self.connect_kwargs(database)
        try:
            import psycopg

            return psycopg.connect(**kwargs, autocommit=True)
        except ImportError:
            import psycopg2

            conn = psycopg2.connect(**kwargs)
            conn.autocommit = True
            return conn

    # -- evidence from the server side -------------------------------------------------------
    def server_log(self) -> str:
        """The server log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def disconnection_logged(self, backend_pid: int) -> bool:
        """Whether the server logged the end of the session served by ``backend_pid``."""
        pattern = re.compile(rf"\[{int(backend_pid)}\] .*LOG:\s+disconnection:")
        return bool(pattern.search(self.server_log()))

    def session_alive(self, backend_pid: int) -> bool:
        """Whether a session with that backend pid is in ``pg_stat_activity`` right now."""
        rows = self.execute(
            f"SELECT 1 FROM pg_stat_activity WHERE pid = {int(backend_pid)}",  # noqa: S608 - an int
            database="postgres",
        )
        return bool(rows)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        return "\n".join(self.server_log().splitlines()[-lines:]) or "(empty log)"
