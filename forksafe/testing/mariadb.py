"""A private MariaDB server in a temporary directory, on a free port.

Built on mirakuru's `TCPExecutor`, which starts the process in its own session, waits
until the port answers and stops the whole process group. We do not use pytest-mysql's
executor because it goes through ``mysqld_safe`` (which restarts a server a test killed on
purpose, and reads the system's ``my.cnf``) and leaves ``root`` on unix-socket
authentication, so TCP clients cannot log in. Here the server runs with ``--no-defaults``,
``root`` has an empty password, and tests may kill, restart and reconfigure it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from forksafe.testing._server import Client, PrivateServer

__all__ = ["MariaDB", "ServerUnavailableError", "find_binary", "free_port"]

DATABASE = "forksafe"


class ServerUnavailableError(RuntimeError):
    """A private server could not be started; the message says what to install or pass."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_binary(*names: str, extra_dirs: tuple[str, ...] = ("/usr/sbin", "/usr/bin")) -> str:
    """The first of ``names`` found on PATH or in ``extra_dirs``.

    Raises:
        ServerUnavailableError: none was found.
    """
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in extra_dirs:
            candidate = Path(directory, name)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ServerUnavailableError(
        f"{names[0]} not found: install MariaDB's server (Debian: apt-get install "
        "mariadb-server) or point forksafe at a running server with a URL"
    )


class MariaDB(PrivateServer):
    """A private ``mariadbd``: ``MariaDB().start()``, ``.url()``, ``.restart()``, ``.stop()``.

    Args:
        port: TCP port on 127.0.0.1; a free one by default.
        general_log: log every statement and every ``Quit`` to ``general_log_path``, so
            tests can prove from the server side that a session was never quit.
        options: extra ``mariadbd`` options, e.g. ``("--wait-timeout=2",)``.
        basedir: where the data directory goes; a new temporary directory by default.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        general_log: bool = True,
        options: tuple[str, ...] = (),
        basedir: str | None = None,
    ) -> None:
        self.mariadbd = find_binary("mariadbd", "mysqld")
        self.install_db = find_binary("mariadb-install-db", "mysql_install_db")
        self.owns_basedir = basedir is None
        self.basedir = Path(basedir or tempfile.mkdtemp(prefix="forksafe-mariadb-"))
        self.datadir = self.basedir / "data"
        # A tmpdir of its own: a mariadbd starting up deletes every '#sql*' file in its
        # tmpdir, which broke another private server's install running at that moment in /tmp.
        self.tmpdir = self.basedir / "tmp"
        self.socket_path = str(self.basedir / "mysqld.sock")
        self.general_log_path = self.basedir / "general.log"
        self.error_log_path = self.basedir / "error.log"
        self.port = port or free_port()
        command = [
            self.mariadbd,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--tmpdir={self.tmpdir}",
            f"--socket={self.socket_path}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.basedir / 'mysqld.pid'}",
            f"--log-error={self.error_log_path}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--max-connections=1000",
            "--innodb-buffer-pool-size=64M",
            "--innodb-flush-log-at-trx-commit=2",
        ]
        if os.geteuid() == 0:
            command.append("--user=root")
        if general_log:
            command += ["--general-log=1", f"--general-log-file={self.general_log_path}"]
        command += list(options)
        super().__init__(
            command,
            host="127.0.0.1",
            port=self.port,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> MariaDB:
        """Create the data directory on first start, start the server, create the database."""
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        if not (self.datadir / "mysql").is_dir():
            self._install()
        try:
            super().start()
        except Exception as exc:
            tail = self.error_log_tail()
            raise ServerUnavailableError(
                f"mariadbd did not start on port {self.port}: {exc}. Server log:\n{tail}"
            ) from exc
        self._wait_for_login()
        self.execute(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
        return self

    def _install(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.install_db,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--tmpdir={self.tmpdir}",  # passed on to the bootstrap server
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ServerUnavailableError(
                f"mariadb-install-db failed ({done.returncode}): {done.stderr.strip()[-800:]}"
            )

    # -- clients -----------------------------------------------------------------------------
    def url(self, driver: str = "mysqldb", database: str = DATABASE) -> str:
        """A SQLAlchemy URL for this server (``mysql+<driver>://root@127.0.0.1:PORT/DB``)."""
        return f"mysql+{driver}://root@127.0.0.1:{self.port}/{database}"

    def connect_kwargs(self, database: str = DATABASE) -> dict[str, Any]:
        """Keyword arguments for ``MySQLdb.connect`` / ``pymysql.connect``."""
        return {"host": "127.0.0.1", "port": self.port, "user": "root", "database": database}

    def connect(self, database: str = "") -> Any:
        """A new raw connection (mysqlclient if installed, else PyMySQL), autocommit on."""
        kwargs = {"host": "127.0.0.1", "port": self.port, "user": "root"}
        try:
            import MySQLdb

            conn = MySQLdb.connect(**kwargs, database=database, autocommit=True)
        except ImportError:
            import pymysql

            conn = pymysql.connect(**kwargs, database=database or None, autocommit=True)
        return conn

    # -- evidence from the server side -------------------------------------------------------
    def general_log(self) -> str:
        """The general query log so far ("" if it is off)."""
        try:
            return self.general_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def quit_logged(self, connection_id: int) -> bool:
        """Whether the server logged a ``Quit`` (COM_QUIT) from session ``connection_id``."""
        for line in self.general_log().splitlines():
            fields = line.split()
            # "<time> <time>\t    12 Quit\t" or "\t\t    12 Quit\t"
            for i in range(len(fields) - 1):
                if fields[i] == str(connection_id) and fields[i + 1] == "Quit":
                    return True
        return False

    def error_log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's error log."""
        try:
            text = self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])


class ExistingServer(Client):
    """A server given by URL (``mysql://user:pw@host:port/db``), not started by us.

    Offers the client half of `MariaDB` (``url``, ``connect_kwargs``, ``connect``,
    ``execute``); tests that must restart or inspect the server need a private one.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self._url = make_url(url)
        if not self._url.drivername.startswith(("mysql", "mariadb")):
            raise ServerUnavailableError(
                f"{self._url.render_as_string(hide_password=True)} is not a MySQL/MariaDB URL"
            )
        self.port = self._url.port or 3306
        self.database = self._url.database or DATABASE
        self.default_database = self.database

    def url(self, driver: str = "mysqldb", database: str | None = None) -> str:
        """The URL with ``driver`` and ``database`` substituted (password kept, never logged)."""
        url = self._url.set(drivername=f"mysql+{driver}", database=database or self.database)
        return url.render_as_string(hide_password=False)

    def safe_url(self) -> str:
        """The URL with its password masked, for messages."""
        return self._url.render_as_string(hide_password=True)

    def connect_kwargs(self, database: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``MySQLdb.connect`` / ``pymysql.connect``."""
        kwargs: dict[str, Any] = {
            "host": self._url.host or "127.0.0.1",
            "port": self.port,
            "user": self._url.username or "root",
            "database": database or self.database,
        }
        if self._url.password:
            kwargs["password"] = self._url.password
        return kwargs

    def connect(self, database: str = "") -> Any:
        """A new raw connection, autocommit on."""
        kwargs = self.connect_kwargs(database or self.database)
        try:
            import MySQLdb

            return MySQLdb.connect(**kwargs, autocommit=True)
        except ImportError:
            import pymysql

            return pymysql.connect(**kwargs, autocommit=True)

    def cleanup(self) -> None:
        """Nothing to stop: we did not start this server."""
