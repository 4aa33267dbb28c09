"""A DBAPI-less driver of our own, protected through `forksafe.register_driver`.

``TinyPG`` speaks just enough of PostgreSQL's wire protocol (version 3, trust
authentication) to open a session on a real server, run one query and say goodbye with
``Terminate`` on ``close()``, the way every real driver does. forksafe knows nothing of it
until the scenario registers it.

The parent opens a session, registers the driver (``--mode``), tracks the connection, forks
one child that closes the inherited connection and exits, then uses its own session again.
Modes: ``none`` (not registered: ``track()`` refuses it), ``register`` (registered
properly), ``raising`` (registered with a socket accessor that raises, as after an API
change of the driver). Prints one JSON object; leaves with ``os._exit``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys

import forksafe


class TinyPG:
    """One PostgreSQL session over a plain socket."""

    def __init__(self, host: str, port: int, user: str, database: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.closed = False
        params = f"user\0{user}\0database\0{database}\0\0".encode()
        body = struct.pack("!I", 196608) + params  # protocol 3.0
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self._until_ready()

    def _message(self) -> tuple[bytes, bytes]:
        head = self._exactly(5)
        kind, size = head[:1], struct.unpack("!I", head[1:])[0]
        return kind, self._exactly(size - 4)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("TinyPG: the server closed the connection")
            data += chunk
        return data

    def _until_ready(self) -> list[bytes]:
        values = []
        while True:
            kind, body = self._message()
            if kind == b"E":
                raise RuntimeError(f"TinyPG: server error {body!r}")
            if kind == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                raise RuntimeError("TinyPG: only trust authentication is supported")
            if kind == b"D":  # DataRow: one column
                (length,) = struct.unpack("!i", body[2:6])
                values.append(body[6:6 + length])
            if kind == b"Z":
                return values

    def scalar(self, sql: str) -> str:
        if self.closed:
            raise ConnectionError("TinyPG: connection closed")
        body = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!I", len(body) + 4) + body)
        return self._until_ready()[0].decode()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.sendall(b"X" + struct.pack("!I", 4))  # Terminate
        finally:
            self.sock.close()


def broken_accessor(conn: TinyPG) -> socket.socket:
    return conn._socket  # type: ignore[attr-defined]  # the attribute was renamed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--database", required=True)
    parser.add_argument("--mode", choices=["none", "register", "raising"], required=True)
    args = parser.parse_args()

    conn = TinyPG(args.host, args.port, args.user, args.database)
    parent_id = int(conn.scalar("SELECT pg_backend_pid()"))
    report: dict = {"parent_id": parent_id}
    if args.mode != "none":
        forksafe.register_driver(
            "tinypg",
            [TinyPG],
            socket=(lambda c: c.sock) if args.mode == "register" else broken_accessor,
            is_closed=lambda c: c.closed,
        )
    try:
        forksafe.track(conn)
        report["tracked"] = True
    except TypeError as exc:
        report["tracked"] = False
        report["track_error"] = str(exc)
    report["names"] = sorted({info.driver for info in forksafe.connections()})

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        child: dict = {}
        try:
            conn.close()
        except Exception as exc:
            child["close_error"] = f"{type(exc).__name__}: {exc}"
        child["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
        os.write(write_fd, json.dumps(child).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report["child"] = json.loads(pipe.read())
    os.waitpid(pid, 0)

    import psycopg2

    monitor = psycopg2.connect(host=args.host, port=args.port, user=args.user,
                               dbname=args.database)
    with monitor.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s", (parent_id,))
        report["alive_on_server"] = cur.fetchone()[0] == 1
    monitor.close()
    try:
        report["after_id"] = int(conn.scalar("SELECT pg_backend_pid()"))
        report["parent_error"] = None
    except Exception as exc:
        report["parent_error"] = f"{type(exc).__name__}: {exc}"
    report["internal_errors"] = [repr(e) for e in forksafe.internal_errors()]
    print(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
