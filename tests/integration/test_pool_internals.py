"""The SQLAlchemy pool API forksafe's engine adapter leans on, pinned (SQLAlchemy 1.4 and 2.x).

A tracked engine's pool becomes an instance of a subclass of its own class that overrides
``connect``, ``_do_get`` and ``recreate`` (see forksafe/sqlalchemy.py). These tests fail
when a SQLAlchemy release moves what that relies on; scripts/test runs them on 1.4 too.
They also show what the design promises: no checkout/checkin listener, a tracked pool that
survives ``dispose()``, ``untrack()`` giving everything back, nothing raised once a record
left the queue, and a pool that is looked at, never connected, at ``track()`` time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

import forksafe
from forksafe import _fork, _state
from forksafe import sqlalchemy as adapter_module
from forksafe._registry import REGISTRY
from forksafe.drivers import unwrap
from tests.forking import run_in_child

pytestmark = [pytest.mark.mariadb]

SA2 = int(sqlalchemy.__version__.split(".")[0]) >= 2
UNREACHABLE = "mysql+mysqldb://root@127.0.0.1:9/forksafe"  # the discard port: refused


@pytest.fixture
def url(mysql_server: Any) -> str:
    return str(mysql_server.url())


@pytest.fixture
def engine(url: str) -> Iterator[Any]:
    eng = create_engine(url, pool_size=2, max_overflow=2)
    yield eng
    forksafe.untrack(eng)
    eng.dispose()


def test_private_api_is_where_forksafe_expects_it() -> None:
    """Every private name the adapter uses exists, on both SQLAlchemy lines."""
    from sqlalchemy.pool.base import Pool, _ConnectionFairy, _ConnectionRecord

    for name in ("connect", "_do_get", "recreate", "_do_return_conn"):
        assert callable(getattr(Pool, name)), name
    # Pool.connect() is nothing but _ConnectionFairy._checkout(self): a tracked pool calls
    # that directly.
    assert Pool.connect.__code__.co_names == ("_ConnectionFairy", "_checkout")
    assert callable(_ConnectionFairy._checkout)
    for cls in (QueuePool, NullPool, SingletonThreadPool, StaticPool):
        assert "_do_get" in vars(cls), cls
        assert "recreate" in vars(cls), cls
    for name in ("invalidate", "_checkin_failed", "get_connection", "info"):
        assert hasattr(_ConnectionRecord, name), name
    pool = QueuePool(lambda: None)
    assert pool._invalidate_time == 0
    # StaticPool's record is a memoized property: read from __dict__, it never connects.
    assert "connection" in vars(StaticPool)


def test_tracked_pool_is_a_subclass_that_survives_dispose_and_untrack_restores(
    engine: Any,
) -> None:
    original = type(engine.pool)
    connect_listeners = len(list(engine.pool.dispatch.connect))
    forksafe.track(engine)
    tracked_cls = type(engine.pool)
    assert tracked_cls is not original
    assert isinstance(engine.pool, original)
    assert tracked_cls.__name__ == original.__name__
    # No listener on the per-checkout path (a checkout listener forces SQLAlchemy's slow
    # checkout loop; every dispatch costs).
    assert not engine.pool.dispatch.checkout
    assert not engine.pool.dispatch.checkin
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()
    assert type(engine.pool) is tracked_cls, "recreate() keeps the tracked class"
    assert engine.pool._forksafe_adapter is not None
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert forksafe.untrack(engine)
    assert type(engine.pool) is original
    assert "_forksafe_adapter" not in vars(engine.pool)
    assert len(list(engine.pool.dispatch.connect)) == connect_listeners
    engine.dispose()
    assert type(engine.pool) is original
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_track_and_untrack_keep_every_attribute_of_the_pool(engine: Any) -> None:
    """The pool gets a dict of its own when its class changes (CPython's attribute caches
    cannot use the old class's shared layout): the same attributes, the same objects."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    pool = engine.pool
    before = dict(vars(pool))
    forksafe.track(engine)
    assert engine.pool is pool
    after = {k: v for k, v in vars(pool).items() if not k.startswith("_forksafe")}
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    forksafe.untrack(engine)
    assert vars(pool).keys() == before.keys()
    assert all(vars(pool)[k] is before[k] for k in before)


def test_info_is_cleared_when_a_record_reconnects(engine: Any) -> None:
    """forksafe keeps its per-connection state in record.info because SQLAlchemy clears
    it when a record opens a new connection."""
    forksafe.track(engine)
    fairy = engine.raw_connection()
    record = fairy._connection_record
    state = record.info[adapter_module._STATE_KEY]
    fairy.invalidate()
    fairy.close()
    fairy = engine.raw_connection()
    try:
        new_state = fairy._connection_record.info[adapter_module._STATE_KEY]
        assert new_state is not state
    finally:
        fairy.close()


def test_track_with_a_connection_checked_out_installs_no_checkin_listener(engine: Any) -> None:
    """A connection checked out at track() time is recorded when it comes back; after that
    the pool is the lean class (no per-checkin work at all)."""
    held = engine.raw_connection()
    forksafe.track(engine)
    assert not engine.pool.dispatch.checkin
    raw = unwrap(held)
    assert REGISTRY.connection_entry(raw) is None
    held.close()
    assert REGISTRY.connection_entry(raw) is not None
    lean = adapter_module._tracked_classes(type(engine.pool)._forksafe_base)[0]
    assert type(engine.pool) is lean
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def test_nothing_raises_after_the_base_do_get(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error inside forksafe's checkout work is reported, and the checkout goes on; an
    interrupt gives the record back to the pool (an overflow slot is not leaked)."""
    forksafe.track(engine, idle_check=0)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    reported: list[BaseException] = []
    monkeypatch.setattr(_fork, "report_internal_error", lambda err, what="": reported.append(err))

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter_module.EngineAdapter, "_checkout_slow", broken)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert [str(e) for e in reported] == ["boom"]

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_module.EngineAdapter, "_checkout_slow", interrupted)
    for _ in range(6):  # more than pool_size + max_overflow: a leak would exhaust the pool
        with pytest.raises(KeyboardInterrupt):
            engine.connect()
    assert engine.pool.checkedout() == 0
    monkeypatch.undo()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_checkout_after_an_unseen_fork_uses_the_new_pool(engine: Any) -> None:
    """A child that no hook reset (libc fork): its first checkout resets the process and is
    served by the engine's new pool; the orphaned pool never opens a session nor lends one."""
    forksafe.track(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    orphan = engine.pool
    orphan_size = orphan.checkedin()

    def child() -> dict[str, Any]:
        fairy = orphan.connect()  # what engine.connect() calls on the pool it last saw
        try:
            fairy.cursor().execute("SELECT 1")
            return {
                "new_pool": engine.pool is not orphan,
                "served_by_new": fairy._pool is engine.pool,
                "orphan_out": orphan.checkedout(),
                "orphan_in": orphan.checkedin(),
            }
        finally:
            fairy.close()

    result = run_in_child(child, hooks=False)
    assert result == {"new_pool": True, "served_by_new": True, "orphan_out": 0,
                      "orphan_in": orphan_size}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_hot_checkout_asks_no_pid(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the wipe-on-fork mark, a checkout in the pool's own process makes no getpid()."""
    if not isinstance(_state.fork_mark(), memoryview):
        pytest.skip("no MADV_WIPEONFORK here: every checkout asks os.getpid()")
    forksafe.track(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    asked: list[int] = []
    real = _state.own_pid
    monkeypatch.setattr(_state, "own_pid", lambda: asked.append(1) or real())
    for _ in range(5):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert asked == []


@pytest.mark.parametrize("hooks", [True, False], ids=["os.fork", "libc fork"])
def test_unseen_fork_is_caught_without_the_mark(
    engine: Any, monkeypatch: pytest.MonkeyPatch, hooks: bool
) -> None:
    """Where the kernel cannot clear a page in a child, the pool asks os.getpid() at every
    checkout, and a child still gets the new pool."""
    monkeypatch.setattr(_state, "fork_mark", lambda: bytearray(1))  # always reads 0
    monkeypatch.setattr(adapter_module, "_CLASSES", {})  # classes made with that mark
    forksafe.track(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    orphan = engine.pool

    def child() -> dict[str, Any]:
        fairy = orphan.connect()
        try:
            fairy.cursor().execute("SELECT 1")
            return {"served_by_new": fairy._pool is engine.pool is not orphan,
                    "orphan_out": orphan.checkedout()}
        finally:
            fairy.close()

    assert run_in_child(child, hooks=hooks) == {"served_by_new": True, "orphan_out": 0}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    forksafe.untrack(engine)


# -- looking at a pool never connects -----------------------------------------------------------
def test_static_pool_track_does_not_connect(url: str) -> None:
    """track() of a StaticPool engine opens no connection: the dialect's first-connect setup
    then runs as usual (server_version_info set, inspect works)."""
    eng = create_engine(url, poolclass=StaticPool)
    forksafe.track(eng)
    assert "connection" not in vars(eng.pool)
    with eng.connect() as conn:
        assert eng.dialect.server_version_info is not None
        assert inspect(conn).has_table("no_such_table") is False
        assert conn.execute(text("SELECT 1")).scalar() == 1
    forksafe.untrack(eng)
    eng.dispose()


def test_static_pool_under_instrument_does_not_connect(url: str) -> None:
    forksafe.instrument()
    try:
        eng = create_engine(url, poolclass=StaticPool)
        assert forksafe.is_tracked(eng)
        assert "connection" not in vars(eng.pool)
        with eng.connect() as conn:
            assert eng.dialect.server_version_info is not None
            assert inspect(conn).has_table("no_such_table") is False
    finally:
        forksafe.uninstrument()
    forksafe.untrack(eng)
    eng.dispose()


@pytest.mark.parametrize("poolclass", [StaticPool, QueuePool])
def test_track_on_an_unreachable_server_does_not_raise(poolclass: Any) -> None:
    eng = create_engine(UNREACHABLE, poolclass=poolclass)
    forksafe.track(eng)
    assert forksafe.is_tracked(eng)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        eng.connect()
    forksafe.untrack(eng)


@pytest.mark.postgres
@pytest.mark.skipif(not SA2, reason="SQLAlchemy 1.4 has no psycopg 3 dialect")
def test_async_static_pool_tracks_without_missing_greenlet(postgres: Any) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> int:
        forksafe.instrument()
        try:
            eng = create_async_engine(postgres.url("psycopg"), poolclass=StaticPool)
        finally:
            forksafe.uninstrument()
        forksafe.track(eng)
        try:
            async with eng.connect() as conn:
                return int((await conn.execute(text("SELECT 41 + 1"))).scalar())
        finally:
            forksafe.untrack(eng)
            await eng.dispose()

    assert asyncio.run(main()) == 42


def test_hot_checkout_touches_nothing_but_the_record(engine: Any) -> None:
    """The state forksafe keeps per connection: a timestamp updated at each checkout."""
    forksafe.track(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    fairy = engine.raw_connection()
    state = fairy._connection_record.info[adapter_module._STATE_KEY]
    fairy.close()
    before = state.last
    time.sleep(0.01)
    fairy = engine.raw_connection()
    assert fairy._connection_record.info[adapter_module._STATE_KEY] is state
    assert state.last > before
    assert isinstance(fairy._connection_record.starttime, float)  # compared with
    assert isinstance(engine.pool._invalidate_time, (int, float))  # pool invalidations
    fairy.close()


def test_instrument_puts_no_checkout_listener_on_pools(url: str) -> None:
    """Under instrument(), a pool has no checkout listener: SQLAlchemy's fast checkout path
    stays in use (a class-wide listener would take every pool off it)."""
    forksafe.instrument()
    try:
        eng = create_engine(url)
        plain_pool = QueuePool(lambda: None)
    finally:
        forksafe.uninstrument()
    try:
        assert forksafe.is_tracked(eng)
        assert not eng.pool.dispatch.checkout
        assert not plain_pool.dispatch.checkout
    finally:
        forksafe.untrack(eng)
        eng.dispose()
