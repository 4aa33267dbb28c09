"""`check_port_free` on real sockets: a listener makes a port busy, TIME_WAIT leftovers do not."""

from __future__ import annotations

import errno
import socket

import pytest

from forksafe.testing.servers import HarnessError, check_port_free


def _listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
    sock.bind((host, port))
    sock.listen()
    return sock


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_listener_makes_the_port_busy(host: str) -> None:
    """A server listening on the port (on 127.0.0.1 or on every address) is reported."""
    with _listener(host) as server:
        port = server.getsockname()[1]
        with pytest.raises(HarnessError, match=f"port {port} is in use"):
            check_port_free(port)


def test_time_wait_after_a_stopped_server_is_free() -> None:
    """A server that closed its connections and stopped leaves them in TIME_WAIT on its port
    for a minute; a plain bind fails there, the check (like the server's own bind) does not."""
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    with socket.socket() as plain, pytest.raises(OSError, match="in use") as refused:
        plain.bind(("127.0.0.1", port))  # what the check did before: a false "in use"
    assert refused.value.errno == errno.EADDRINUSE
    check_port_free(port)
    with _listener(port=port) as again:  # and a server can indeed start there now
        assert again.getsockname()[1] == port
