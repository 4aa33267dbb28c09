"""Stale and dropped connections on tracked engines, against private MariaDB servers.

Each test starts its own server (they restart it, kill its sessions, or run it with
``--wait-timeout=2``) and shows the failure without forksafe's feature next to the success
with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import MySQLdb
import pytest
from sqlalchemy import create_engine, event, exc, text

import forksafe
from forksafe.testing.proxy import FaultProxy
from tests.conftest import start_mariadb
from tests.integration import _liveness
from tests.integration._liveness import POOLED, concurrent_requests, count_pings, wait_until

pytestmark = [pytest.mark.mariadb]

# The MySQL protocol's COM_QUERY byte followed by the statement: matches the COMMIT itself,
# not "SET autocommit" at connect.
COM_QUERY_COMMIT = b"\x03COMMIT"


@pytest.fixture
def server() -> Iterator[Any]:
    """A private MariaDB with default settings, which the test may restart."""
    server = start_mariadb()
    yield server
    server.cleanup()


def test_wait_timeout_shorter_than_idle_gaps(short_timeout: Any) -> None:
    """With wait_timeout=2 and 3 s idle gaps, a tracked engine never hands out a dead
    connection (no error reaches the caller); a plain engine fails with 2006 after a gap."""
    tracked = forksafe.track(create_engine(short_timeout.url()))
    plain = create_engine(short_timeout.url())
    learned = create_engine(short_timeout.url(), pool_recycle=3600)
    forksafe.track(learned)
    tracked_ids, plain_errors = [], []
    for _ in range(3):
        with tracked.connect() as conn:
            tracked_ids.append(conn.execute(text("SELECT CONNECTION_ID()")).scalar())
        with learned.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        try:
            with plain.connect() as conn:
                conn.execute(text("SELECT 1"))
        except exc.OperationalError as err:
            plain_errors.append(err.orig.args[0])
        time.sleep(3)
    assert plain_errors, "without forksafe a connection idle past wait_timeout must fail"
    assert set(plain_errors) <= {2006, 2013}
    assert len(set(tracked_ids)) == 3, "each idle connection was replaced before use"
    assert learned.pool._recycle == 3600, "a pool_recycle the user set is never changed"


def test_hot_connections_are_never_pinged(server: Any) -> None:
    """A connection reused within idle_check pays no round trip; pool_pre_ping pays one per
    checkout."""
    tracked = forksafe.track(create_engine(server.url()), idle_check=5.0)
    pre_ping = create_engine(server.url(), pool_pre_ping=True)
    tracked_pings, pre_pings = count_pings(tracked), count_pings(pre_ping)
    for engine in (tracked, pre_ping):
        for _ in range(50):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    assert tracked_pings == []
    assert len(pre_pings) == 49  # every checkout but the first (a fresh connection)


def test_idle_connections_of_a_restarted_server_are_replaced_unpinged(server: Any) -> None:
    """Idle pooled connections whose server restarted are replaced at checkout, each seen
    dead in its socket: no ping, even past idle_check. Without forksafe the first use after
    the restart fails."""
    tracked = forksafe.track(create_engine(server.url(), pool_size=3), idle_check=0.5,
                             recycle=None)
    plain = create_engine(server.url(), pool_size=3)
    pings = count_pings(tracked)

    def fill(engine: Any) -> None:
        conns = [engine.connect() for _ in range(3)]
        for conn in conns:
            conn.execute(text("SELECT 1"))
        for conn in conns:
            conn.close()

    fill(tracked)
    fill(plain)
    server.restart()
    time.sleep(0.6)  # past idle_check: the socket check still answers first
    with pytest.raises(exc.OperationalError), plain.connect() as conn:
        conn.execute(text("SELECT 1"))
    held = [tracked.connect() for _ in range(3)]
    assert [c.execute(text("SELECT 1")).scalar() for c in held] == [1, 1, 1]
    for conn in held:
        conn.close()
    assert pings == [], "a closed socket is seen without a round trip"


def test_disconnect_errors_invalidate_the_pool_and_are_explained(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A KILLed session fails once, the failure is logged with cause and fix (once, no
    password), and the next checkout gets a working connection."""
    caplog.set_level("WARNING", logger="forksafe")
    forksafe.errors.reset_reported()
    engine = forksafe.track(create_engine(server.url()), idle_check=None, recycle=None)
    failures = 0
    for _ in range(3):
        with engine.connect() as conn:
            cid = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
            server.execute(f"KILL CONNECTION {int(cid)}")
            with pytest.raises(exc.OperationalError) as info:
                conn.execute(text("SELECT 1"))
            assert info.value.connection_invalidated
            failures += 1
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    explained = [r.getMessage() for r in caplog.records if "Likely cause" in r.getMessage()]
    assert failures == 3
    assert len(explained) == 1, explained
    assert "Fix:" in explained[0]
    forksafe.errors.reset_reported()


def test_commit_lost_is_never_repeated(server: Any) -> None:
    """The connection drops after the server committed but before the client heard: a naive
    retry applies the write twice; forksafe.retry_on_disconnect raises CommitUnknownError
    and the row exists exactly once. A drop before COMMIT is retried and applied once."""
    server.execute("CREATE TABLE forksafe.orders (id INT AUTO_INCREMENT PRIMARY KEY, "
                   "k VARCHAR(40) NOT NULL)")
    proxy = FaultProxy("127.0.0.1", server.port).start()
    url = f"mysql+mysqldb://root@127.0.0.1:{proxy.port}/forksafe"

    def count(key: str) -> int:
        return int(server.execute(f"SELECT COUNT(*) FROM forksafe.orders WHERE k = '{key}'")[0][0])

    try:
        # What the usual advice does: retry on OperationalError.
        naive_engine = create_engine(url)

        def naive(key: str) -> None:
            for _ in range(3):
                try:
                    with naive_engine.begin() as conn:
                        conn.execute(text("INSERT INTO orders (k) VALUES (:k)"), {"k": key})
                    return
                except exc.OperationalError:
                    continue

        proxy.cut_after(COM_QUERY_COMMIT)
        naive("naive")
        assert count("naive") == 2, "a naive retry repeats a write whose COMMIT landed"

        engine = forksafe.track(create_engine(url))

        @forksafe.retry_on_disconnect(attempts=3, backoff=0.01)
        def place(key: str) -> None:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO orders (k) VALUES (:k)"), {"k": key})

        proxy.cut_after(COM_QUERY_COMMIT)
        with pytest.raises(forksafe.CommitUnknownError) as info:
            place("safe")
        assert isinstance(info.value.__cause__, exc.OperationalError)
        assert count("safe") == 1

        proxy.cut_after(b"INSERT INTO orders")
        place("before-commit")
        assert count("before-commit") == 1
        assert proxy.cuts >= 3
    finally:
        proxy.stop()


def test_read_survives_a_restart(server: Any) -> None:
    """A read wrapped in retry_on_disconnect, started while the server is down, returns once
    the server is back; without the retry it fails. The server comes back between the
    attempts (``before_retry``), so no timer decides the order."""
    engine = forksafe.track(create_engine(server.url()))
    attempts: list[int] = []

    def restart_if_down() -> None:
        if not server.running():
            server.start()

    @forksafe.retry_on_disconnect(
        attempts=5, backoff=0.0, timeout=600, before_retry=restart_if_down
    )
    def read() -> int:
        attempts.append(1)
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT 41 + 1")).scalar())

    assert read() == 42
    attempts.clear()
    server.stop()
    with pytest.raises(exc.OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert read() == 42
    assert len(attempts) == 2, "the first attempt met the stopped server, the second the new one"
    with MySQLdb.connect(**server.connect_kwargs()) as check:
        assert check.open


# -- liveness at checkout: a session the server closed while idle ------------------------------


@pytest.fixture(scope="module")
def liveness_server() -> Iterator[Any]:
    """A private MariaDB the liveness tests kill sessions on and restart."""
    server = start_mariadb()
    yield server
    server.cleanup()


def open_pooled(engine: Any, n: int = POOLED) -> list[int]:
    return _liveness.open_pooled(engine, "SELECT CONNECTION_ID()", n)


def server_sessions(server: Any) -> set[int]:
    return {int(r[0]) for r in server.execute(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()")}


@pytest.mark.parametrize("fault", ["kill", "restart", "wait_timeout"])
def test_connections_closed_while_idle_are_replaced_without_a_round_trip(
    liveness_server: Any, fault: str
) -> None:
    """``POOLED`` connections idle in each pool; the server closes them all (``KILL``, a
    restart, or the ``wait_timeout`` the application sets on connect); then ``POOLED``
    concurrent requests. A plain engine fails every one of them; ``pool_pre_ping`` fails
    none at a ping per checkout; a tracked engine fails none and pings nothing: it saw at
    checkout, in the socket, that the server had closed the connection."""
    server = liveness_server

    def make(**options: Any) -> Any:
        engine = create_engine(server.url(), pool_size=POOLED, **options)
        if fault == "wait_timeout":
            @event.listens_for(engine, "connect")
            def short_idle_limit(dbapi_connection: Any, record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("SET SESSION wait_timeout = 2")
                cursor.close()
        return engine

    engines = {
        "plain": make(),
        "pool_pre_ping": make(pool_pre_ping=True),
        # the socket check alone: no ping after idle, no retirement by the idle limit
        "forksafe": forksafe.track(make(), idle_check=None, recycle=None),
        "forksafe defaults": forksafe.track(make()),
    }
    pings = {name: count_pings(engine) for name, engine in engines.items()}
    try:
        pooled = {name: open_pooled(engine) for name, engine in engines.items()}
        everyone = {cid for ids in pooled.values() for cid in ids}
        for ids in pooled.values():
            assert len(set(ids)) == POOLED
        if fault == "kill":
            for cid in sorted(everyone):
                server.execute(f"KILL CONNECTION {cid}")
        elif fault == "restart":
            server.restart()
        wait_until(lambda: not everyone & server_sessions(server),
                   "the server no longer lists the pooled sessions")
        failures = {name: concurrent_requests(engine) for name, engine in engines.items()}
    finally:
        for name, engine in engines.items():
            if name.startswith("forksafe"):
                forksafe.untrack(engine)
            engine.dispose()
    assert failures["plain"] == POOLED, failures
    assert failures["pool_pre_ping"] == 0, failures
    assert pings["pool_pre_ping"], "pool_pre_ping found the dead connections by pinging"
    assert failures["forksafe"] == 0, failures
    assert pings["forksafe"] == [], "the socket told forksafe, without a ping"
    assert failures["forksafe defaults"] == 0, failures


def test_hot_connections_get_no_round_trip_from_the_socket_check(liveness_server: Any) -> None:
    """Healthy connections reused at once: the socket check finds nothing to read, so
    forksafe sends nothing (no ping), where pool_pre_ping pings every checkout."""
    tracked = forksafe.track(create_engine(liveness_server.url(), pool_size=POOLED),
                             idle_check=None, recycle=None)
    pings = count_pings(tracked)
    try:
        open_pooled(tracked)
        ids = set()
        for _ in range(5):
            conns = [tracked.connect() for _ in range(POOLED)]
            for conn in conns:
                ids.add(int(conn.execute(text("SELECT CONNECTION_ID()")).scalar()))
                conn.close()
    finally:
        forksafe.untrack(tracked)
        tracked.dispose()
    assert pings == []
    assert len(ids) <= POOLED, "no healthy connection was replaced"


@pytest.mark.parametrize("how", ["track", "instrument"])
def test_auto_recycle_learns_the_limit_the_application_sets_on_connect(
    liveness_server: Any, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An application that sets ``wait_timeout`` in its own ``connect`` listener, added
    after the engine was tracked (always so under instrument(), which tracks inside
    ``create_engine``): forksafe learns the value the application set, not the server's
    default, because it asks at the connection's first checkout, after every listener."""
    caplog.set_level("DEBUG", logger="forksafe")
    if how == "instrument":
        forksafe.instrument()
        try:
            engine = create_engine(liveness_server.url())
        finally:
            forksafe.uninstrument()
        assert forksafe.is_tracked(engine)
    else:
        engine = forksafe.track(create_engine(liveness_server.url()))

    @event.listens_for(engine, "connect")
    def app_sets_its_idle_limit(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION wait_timeout = 7")
        cursor.close()

    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT @@session.wait_timeout")).scalar() == 7
    finally:
        forksafe.untrack(engine)
        engine.dispose()
    learned = [r.getMessage() for r in caplog.records if "closes connections idle" in
               r.getMessage()]
    assert learned, "forksafe logs the idle limit it learned"
    assert all("idle 7s" in m for m in learned), learned


class FreezingProxy:
    """Forwards TCP to the server; `freeze` silences every connection open at that moment
    (bytes are swallowed both ways, sockets stay open: a network cut nothing announces),
    while connections made afterwards pass."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.generation = 0
        self.sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            born = self.generation
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, born), daemon=True).start()

    def _pump(self, src: Any, dst: Any, born: int) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.generation == born:
                try:
                    dst.sendall(data)
                except OSError:
                    return


def test_silent_failure_is_caught_by_the_idle_ping_and_drops_older_connections(
    server: Any,
) -> None:
    """A cut that sends nothing (the socket check cannot see it): a connection idle past
    idle_check is pinged, the ping fails, the request gets a new connection, and the older
    pooled connections are dropped with it, unpinged. A plain engine fails."""
    proxy = FreezingProxy(server.port)
    url = f"mysql+mysqldb://root@127.0.0.1:{proxy.port}/forksafe"
    timeouts = {"connect_args": {"read_timeout": 2, "write_timeout": 2}}
    tracked = forksafe.track(create_engine(url, pool_size=3, **timeouts), idle_check=0.5,
                             recycle=None)
    plain = create_engine(url, pool_size=3, **timeouts)
    pings = count_pings(tracked)
    try:
        for engine in (tracked, plain):
            open_pooled(engine, 3)
        proxy.freeze()
        time.sleep(0.6)  # idle past idle_check (a lower bound, not a synchronisation)
        assert concurrent_requests(plain, 1) == 1, "without a ping the cut reaches the request"
        held = [tracked.connect() for _ in range(3)]
        assert [c.execute(text("SELECT 1")).scalar() for c in held] == [1, 1, 1]
        for conn in held:
            conn.close()
    finally:
        forksafe.untrack(tracked)
        for engine in (tracked, plain):
            engine.dispose()
        proxy.close()
    assert len(pings) == 1, "one failed ping dropped the older connections at once"
