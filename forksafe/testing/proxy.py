"""A TCP proxy that cuts connections on cue: network faults against a real server.

Put it between a client and a real database server to reproduce what a restart or a
network cut does at one exact moment, deterministically:

* `FaultProxy.cut_after` arms a cut: the next client packet containing ``marker`` (for
  example ``b"COMMIT"``) is forwarded to the server, the server's reply is swallowed, and
  both sides are closed. The server executed the statement; the client sees a lost
  connection. That is the "was my COMMIT applied?" case a naive retry gets wrong.
* `FaultProxy.cut_all` closes every open connection at once (a network drop).

Bytes are forwarded unchanged otherwise; the server and the driver are real.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["FaultProxy"]


class _Pair:
    __slots__ = ("client", "drop_reply", "lock", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.drop_reply = False
        self.lock = threading.Lock()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target``; cut connections when told to.

    Args:
        target_host: the real server's host.
        target_port: the real server's port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._stopped = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        """Start accepting connections; returns self."""
        self._thread.start()
        return self

    def cut_after(self, marker: bytes) -> None:
        """Arm one cut: after the next client packet containing ``marker`` reaches the server.

        The match is case-insensitive. The cut happens when the server's reply arrives,
        which is swallowed.
        """
        with self._lock:
            self._marker = marker.upper()

    def cut_all(self) -> int:
        """Close every open connection now; return how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        self.cuts += len(pairs)
        return len(pairs)

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut_all()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- plumbing ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump_up, args=(pair,), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(pair,), daemon=True).start()

    def _pump_up(self, pair: _Pair) -> None:
        """Client to server; arms ``drop_reply`` when the marker goes by."""
        while True:
            try:
                data = pair.client.recv(65536)
            except OSError:
                data = b""
            if not data:
                pair.close()
                return
            with self._lock:
                marker = self._marker
                if marker is not None and marker in data.upper():
                    self._marker = None
                    with pair.lock:
                        pair.drop_reply = True
            try:
                pair.upstream.sendall(data)
            except OSError:
                pair.close()
                return

    def _pump_down(self, pair: _Pair) -> None:
        """Server to client; swallows the reply and cuts when ``drop_reply`` is armed."""
        while True:
            try:
                data = pair.upstream.recv(65536)
            except OSError:
                data = b""
            with pair.lock:
                cut = pair.drop_reply
            if cut or not data:
                if cut:
                    self.cuts += 1
                pair.close()
                with self._lock:
                    if pair in self._pairs:
                        self._pairs.remove(pair)
                return
            try:
                pair.client.sendall(data)
            except OSError:
                pair.close()
                return
