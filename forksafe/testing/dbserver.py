"""``python -m forksafe.testing.dbserver``: a private MariaDB to try the examples against.

Starts ``mariadbd`` in a temporary directory on 127.0.0.1 (port 3307 by default), prints the
``DATABASE_URL`` to use, and runs until Ctrl-C (or SIGTERM), then stops the server and
deletes its directory. The system's own MariaDB/MySQL, if any, is never touched.
``--postgres`` starts a private PostgreSQL instead (port 5433 by default) and prints its URL
for psycopg 3's asyncio driver (``postgresql+psycopg_async://``), as examples/fastapi_app
wants.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType
from typing import Any

__all__ = ["main"]


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run a private MariaDB until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m forksafe.testing.dbserver")
    parser.add_argument(
        "--port", type=int, default=None, help="TCP port (default 3307; 5433 with --postgres)"
    )
    parser.add_argument(
        "--postgres", action="store_true", help="a private PostgreSQL instead of MariaDB"
    )
    args = parser.parse_args(argv)
    if args.port is None:
        args.port = 5433 if args.postgres else 3307
    name = "PostgreSQL" if args.postgres else "MariaDB"

    from forksafe.testing.mariadb import MariaDB, ServerUnavailableError
    from forksafe.testing.servers import HarnessError, check_port_free

    signal.signal(signal.SIGTERM, _stop)
    server: Any = None
    try:
        try:
            check_port_free(args.port)
        except HarnessError:
            raise HarnessError(
                f"port {args.port} is in use (a dbserver already running?): stop it, or pass "
                "--port N and set DATABASE_URL to the URL it prints"
            ) from None
        if args.postgres:
            from forksafe.testing.postgres import PostgreSQL

            server = PostgreSQL(args.port)
            server.start()
            url = server.url("psycopg_async")
        else:
            server = MariaDB(args.port, general_log=False)
            server.start()
            url = server.url()
        print(f"DATABASE_URL={url}", flush=True)
        print(f"private {name} running; Ctrl-C stops it", file=sys.stderr, flush=True)
        while server.running():
            time.sleep(0.5)
        print(f"dbserver: the {name} server exited", file=sys.stderr)
        return 1
    except (HarnessError, ServerUnavailableError) as exc:
        print(f"dbserver: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
