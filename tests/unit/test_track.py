"""track() / untrack() bookkeeping: what is accepted, what is refused, and weak holding."""

from __future__ import annotations

import errno
import gc
import os
import socket
import sqlite3
import threading
import weakref
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import create_engine, event, pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine.default import DefaultDialect

import forksafe
from forksafe import _sockets
from forksafe._registry import REGISTRY

SA14 = int(sqlalchemy.__version__.split(".")[0]) < 2


def test_track_returns_the_engine_and_tracks_it() -> None:
    """track(engine) returns the same object and is_tracked() says so; untrack undoes it."""
    engine = create_engine("mysql+mysqldb://u@127.0.0.1/db")
    assert forksafe.track(engine) is engine
    assert forksafe.is_tracked(engine)
    assert forksafe.untrack(engine) is True
    assert not forksafe.is_tracked(engine)
    assert forksafe.untrack(engine) is False


def test_tracking_twice_installs_one_set_of_listeners() -> None:
    """A second track() of the same engine is harmless: one adapter, one listener each."""
    engine = create_engine("mysql+pymysql://u@127.0.0.1/db")
    forksafe.track(engine)
    forksafe.track(engine)
    adapter = REGISTRY.pop_engine(engine)
    assert adapter is not None
    assert REGISTRY.pop_engine(engine) is None
    adapter.detach()


def test_untrack_removes_pool_listeners() -> None:
    """After untrack(), none of forksafe's pool listeners stay on the engine."""
    engine = create_engine("postgresql+psycopg2://u@127.0.0.1/db")
    forksafe.track(engine)
    adapter = REGISTRY.pop_engine(engine)
    assert adapter is not None
    listeners = list(adapter._listeners)
    REGISTRY.add_engine(engine, adapter)
    assert all(event.contains(engine, name, fn) for name, fn in listeners)
    forksafe.untrack(engine)
    assert not any(event.contains(engine, name, fn) for name, fn in listeners)


def test_async_engine_is_tracked_through_its_sync_engine() -> None:
    """An AsyncEngine is accepted, returned as is, and its sync engine is what is tracked."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+psycopg_async://u@127.0.0.1/db")
    assert forksafe.track(engine) is engine
    assert forksafe.is_tracked(engine.sync_engine)
    assert forksafe.untrack(engine)


@pytest.mark.parametrize("obj", [object(), "mysql://u@h/db", 42, None])
def test_unsupported_objects_raise_type_error_naming_what_is_supported(obj: object) -> None:
    """Anything that is not an engine or a supported DBAPI connection is a TypeError."""
    with pytest.raises(TypeError, match="mysqlclient, PyMySQL, psycopg2, psycopg"):
        forksafe.track(obj)


class UnknownDriverDialect(SQLiteDialect_pysqlite):
    """A SQLAlchemy dialect whose driver forksafe does not know."""

    driver = "unknowndriver"
    supports_statement_cache = True


registry.register("sqlite.unknowndriver", __name__, "UnknownDriverDialect")


def test_engine_of_unsupported_driver_is_refused() -> None:
    """An engine whose driver forksafe does not know is refused with the list."""
    engine = create_engine("sqlite+unknowndriver://")
    with pytest.raises(forksafe.UnsupportedObjectError, match="unknowndriver") as info:
        forksafe.track(engine)
    assert isinstance(info.value, TypeError)
    assert "mysqldb" in str(info.value)  # the supported dialect drivers are listed
    assert "register_driver" in str(info.value)


class NoDriverDialect(DefaultDialect):
    """A third-party dialect that leaves SQLAlchemy's ``driver`` annotation unset."""

    name = "nodriver"
    supports_statement_cache = True

    if SA14:
        @classmethod
        def dbapi(cls) -> object:  # SQLAlchemy 1.4's name for import_dbapi
            return sqlite3
    else:
        @classmethod
        def import_dbapi(cls) -> object:
            return sqlite3


registry.register("nodriver", __name__, "NoDriverDialect")


def test_engine_of_a_dialect_without_a_driver_name_is_refused_clearly() -> None:
    """No ``driver`` attribute at all: the same refusal, not an AttributeError."""
    engine = create_engine("nodriver://")
    assert not hasattr(engine.dialect, "driver")
    with pytest.raises(forksafe.UnsupportedObjectError, match="driver None is not supported"):
        forksafe.track(engine)
    assert not forksafe.is_tracked(engine)


def test_error_messages_never_show_the_password() -> None:
    """The refusal names the engine by a URL with its password masked."""
    engine = create_engine("sqlite+unknowndriver:///tmp/x.db")
    engine.url = engine.url.set(password="hunter2", username="me")
    with pytest.raises(TypeError) as info:
        forksafe.track(engine)
    assert "hunter2" not in str(info.value)


def test_engines_are_held_weakly() -> None:
    """Tracking never keeps an engine alive."""
    engine = create_engine("mysql+mysqldb://u@127.0.0.1/db")
    forksafe.track(engine)
    _, engines_before = REGISTRY.snapshot()
    assert any(e is engine for e, _ in engines_before)
    del engine, engines_before
    gc.collect()
    _, engines_after = REGISTRY.snapshot()
    assert all(e.url.database != "db" or e.url.host != "127.0.0.1" for e, _ in engines_after)


def _engine_its_dialect_refers_back_to(url: str) -> weakref.ref[Any]:
    engine = create_engine(url)

    @event.listens_for(engine, "do_connect")
    def token(dialect: object, rec: object, cargs: object, cparams: dict[str, object]) -> None:
        assert engine.url is not None

    @event.listens_for(engine, "handle_error")
    def mine(ctx: object) -> None:
        assert getattr(ctx, "engine", None) is engine

    forksafe.track(engine)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:  # a pooled connection, remembered by forksafe too
            conn.exec_driver_sql("SELECT 1")
    return weakref.ref(engine)


@pytest.mark.parametrize("url", ["mysql+mysqldb://u@127.0.0.1/db", "sqlite:///{tmp}/x.db"])
def test_an_engine_its_dialect_refers_back_to_is_still_held_weakly(
    url: str, tmp_path: Any
) -> None:
    """A dialect listener that closes over its engine (the documented ``do_connect`` token
    pattern, a ``handle_error`` that compares ``ctx.engine``) must not let forksafe's
    registry keep the engine, its pool and its connections alive."""
    ref = _engine_its_dialect_refers_back_to(url.format(tmp=tmp_path))
    gc.collect()
    assert ref() is None


def _engine_of_classes_made_at_run_time(tmp: Any) -> tuple[weakref.ref[Any], ...]:
    seen: list[object] = []

    class PerTenantDialect(SQLiteDialect_pysqlite):  # e.g. made by a plugin, per tenant
        supports_statement_cache = True

        def initialize(self, connection: Any) -> None:
            seen.append(connection)  # what the class refers to: here, the engine
            super().initialize(connection)

    class PerTenantPool(pool.QueuePool):
        pass

    engine = create_engine(f"sqlite:///{tmp}/tenant.db", poolclass=PerTenantPool)
    engine.dialect.__class__ = PerTenantDialect
    forksafe.track(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    forksafe.untrack(engine)
    return weakref.ref(PerTenantDialect), weakref.ref(PerTenantPool), weakref.ref(engine)


def test_classes_made_at_run_time_are_freed_after_untrack(tmp_path: Any) -> None:
    """forksafe's subclasses of a dialect or pool class are cached only while in use: a
    class made at run time, and what it refers to, is freed once its engine is untracked."""
    refs = _engine_of_classes_made_at_run_time(tmp_path)
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]


def test_tracking_is_thread_safe() -> None:
    """Many threads tracking and untracking at once leave a consistent registry."""
    engines = [create_engine(f"mysql+mysqldb://u@127.0.0.1/db{i}") for i in range(40)]
    errors: list[BaseException] = []

    def work(chunk: list) -> None:
        try:
            for _ in range(20):
                for e in chunk:
                    forksafe.track(e)
                for e in chunk[::2]:
                    forksafe.untrack(e)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    chunks = [engines[i::4] for i in range(4)]
    threads = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for chunk in chunks:
        untracked = chunk[::2]
        for engine in chunk:
            assert forksafe.is_tracked(engine) is (engine not in untracked)
            forksafe.untrack(engine)


def test_after_fork_in_the_parent_does_nothing() -> None:
    """after_fork() in a process that was not forked is a cheap no-op returning False."""
    assert forksafe.after_fork() is False


def test_neutralise_fd_replaces_a_connected_socket_without_sending() -> None:
    """After neutralise_fd, writes through the descriptor fail and the peer receives nothing."""
    left, right = socket.socketpair()
    right.setblocking(False)
    fd = left.fileno()
    parents_copy = os.dup(fd)  # what the parent still holds after a fork
    assert _sockets.neutralise_fd(fd) is True
    with pytest.raises(OSError) as info:  # noqa: PT011 - errno is checked below
        os.write(fd, b"\x01\x00\x00\x00\x01")  # a COM_QUIT packet
    assert info.value.errno in (errno.ENOTCONN, errno.EPIPE)
    with pytest.raises(BlockingIOError):
        right.recv(16)  # nothing arrived, and the connection is still open
    os.write(parents_copy, b"ok")
    assert right.recv(16) == b"ok"
    os.close(parents_copy)
    left.close()
    right.close()


def test_neutralise_fd_leaves_non_sockets_alone() -> None:
    """A descriptor that is not a socket (reused for a file) is not touched."""
    read_fd, write_fd = os.pipe()
    try:
        assert _sockets.neutralise_fd(read_fd) is False
        assert _sockets.neutralise_fd(10_000) is False
        os.write(write_fd, b"x")
        assert os.read(read_fd, 1) == b"x"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_connections_name_engines_and_raw_connections_alike() -> None:
    """forksafe.connections() names a tracked engine by its Driver's name, as a raw
    connection of that driver is named (not SQLAlchemy's dialect driver name)."""
    engine = create_engine("mysql+mysqldb://u@127.0.0.1:1/db")  # never connects
    forksafe.track(engine)
    try:
        names = {info.driver for info in forksafe.connections() if info.kind == "engine"}
        assert "mysqlclient" in names
        assert "mysqldb" not in names
    finally:
        forksafe.untrack(engine)
