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
import json
import os
import subprocess
import sys
import threading
import time
import warnings
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
from tests.integration._liveness import session_id, wait_until

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


def test_a_record_that_reconnects_gets_new_state(engine: Any) -> None:
    """forksafe keeps its per-connection state on the record; the connect event of the new
    connection a record opens after an invalidation replaces it."""
    forksafe.track(engine)
    fairy = engine.raw_connection()
    record = fairy._connection_record
    state = vars(record)[adapter_module._STATE_KEY]
    fairy.invalidate()
    fairy.close()
    fairy = engine.raw_connection()
    try:
        assert fairy._connection_record is record  # pool_size 2: the same record, reused
        new_state = vars(record)[adapter_module._STATE_KEY]
        assert new_state is not state
        assert new_state.conn_id == id(fairy.dbapi_connection)
    finally:
        fairy.close()


def test_connection_info_stays_the_applications(engine: Any, url: str) -> None:
    """``Connection.info`` is the application's dict: on a tracked engine it holds what the
    application put there and nothing else (JSON-able, equal to an untracked engine's),
    across checkouts, a reconnect, and untrack()."""
    plain = create_engine(url, pool_size=2, max_overflow=2)
    forksafe.track(engine)

    def infos(eng: Any) -> list[Any]:
        seen = []
        with eng.connect() as conn:
            seen.append(dict(conn.info))
            conn.info["tenant"] = "acme"
        with eng.connect() as conn:
            seen.append(json.loads(json.dumps(conn.info)))
            conn.invalidate()
        with eng.connect() as conn:
            seen.append(dict(conn.info))  # SQLAlchemy clears it for a new connection
            conn.info["tenant"] = "acme"
        return seen

    try:
        expected = infos(plain)
        assert expected == [{}, {"tenant": "acme"}, {}]
        assert infos(engine) == expected
        forksafe.untrack(engine)
        with engine.connect() as conn:
            assert conn.info == {"tenant": "acme"}
    finally:
        plain.dispose()


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
    state = vars(fairy._connection_record)[adapter_module._STATE_KEY]
    fairy.close()
    before = state.last
    time.sleep(0.01)
    fairy = engine.raw_connection()
    assert vars(fairy._connection_record)[adapter_module._STATE_KEY] is state
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


# -- the checkout methods in C (forksafe/_speedups.c) and in Python ---------------------------
def test_the_c_checkout_methods_are_built_and_used() -> None:
    """The install builds forksafe._speedups and tracked pools use it. Where no compiler is
    there it may be missing (forksafe then runs the Python methods): not in CI."""
    if adapter_module._speedups is None and not os.environ.get("CI"):
        pytest.skip("forksafe._speedups is not built here (no compiler?)")
    assert adapter_module._speedups is not None
    lean = adapter_module._tracked_classes(QueuePool)[0]
    assert type(vars(lean)["connect"]).__name__ == "CheckoutMethod"
    assert type(vars(lean)["_do_get"]).__name__ == "CheckoutMethod"


def test_forksafe_no_speedups_turns_the_c_methods_off() -> None:
    code = ("import forksafe.sqlalchemy as a; from sqlalchemy.pool import QueuePool; "
            "print(a._speedups, type(vars(a._tracked_classes(QueuePool)[0])['connect']).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "FORKSAFE_NO_SPEEDUPS": "1"}).stdout.split()
    assert out == ["None", "function"]


@pytest.fixture(params=["c", "python"])
def variant_engine(request: pytest.FixtureRequest, url: str,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An engine whose tracked pool runs the checkout methods in C or in Python: a pool
    class of its own, so that its tracked subclasses are made for this variant."""
    if request.param == "c" and adapter_module._speedups is None:
        pytest.skip("forksafe._speedups is not built here")
    if request.param == "python":
        monkeypatch.setattr(adapter_module, "_speedups", None)

    class VariantPool(QueuePool):
        pass

    # pool_timeout: a checkout of an exhausted pool fails in seconds, not half a minute
    eng = create_engine(url, poolclass=VariantPool, pool_size=2, max_overflow=0,
                        pool_timeout=5)
    forksafe.track(eng)
    kind = type(vars(type(eng.pool))["_do_get"]).__name__
    assert kind == ("CheckoutMethod" if request.param == "c" else "function")
    yield eng
    forksafe.untrack(eng)
    eng.dispose()


def test_hot_checkout_stamps_the_state_and_takes_no_slow_path(
    variant_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = session_id(variant_engine)
    fairy = variant_engine.raw_connection()
    state = vars(fairy._connection_record)[adapter_module._STATE_KEY]
    fairy.close()
    assert state.fd >= 0
    slow: list[Any] = []
    real = adapter_module.EngineAdapter._checkout_slow
    monkeypatch.setattr(adapter_module.EngineAdapter, "_checkout_slow",
                        lambda *a: slow.append(a) or real(*a))
    before = state.last
    assert session_id(variant_engine) == first
    assert state.last > before
    assert slow == []


@pytest.mark.parametrize("threshold", [3600, 3600.0, "odd"])
def test_a_threshold_of_any_type_is_honoured(
    variant_engine: Any, monkeypatch: pytest.MonkeyPatch, threshold: Any
) -> None:
    """An int threshold (recycle=3600) takes the fast path like a float; anything else
    goes to the full path, which decides (and a wrong type is reported, never raised)."""
    session_id(variant_engine)
    fairy = variant_engine.raw_connection()
    state = vars(fairy._connection_record)[adapter_module._STATE_KEY]
    fairy.close()
    state.threshold = threshold
    slow: list[Any] = []
    reported: list[BaseException] = []
    monkeypatch.setattr(_fork, "report_internal_error", lambda err, what="": reported.append(err))
    real = adapter_module.EngineAdapter._checkout_slow
    monkeypatch.setattr(adapter_module.EngineAdapter, "_checkout_slow",
                        lambda *a: slow.append(a) or real(*a))
    with variant_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert (len(slow), reported) == ((1, []) if threshold == "odd" else (0, []))


def _kill(server: Any, victim: int) -> None:
    """KILL a session and wait (bounded) until the server has ended it."""
    server.execute(f"KILL CONNECTION {victim}")
    wait_until(lambda: not server.execute(
        f"SELECT ID FROM information_schema.PROCESSLIST WHERE ID = {victim}"),
        f"the server ended session {victim} after KILL")


def test_a_session_killed_while_idle_is_replaced_before_use(
    variant_engine: Any, mysql_server: Any
) -> None:
    """The server ends an idle pooled session (KILL): its socket turns readable, and the
    next checkout hands out a new session instead of failing a request."""
    victim = session_id(variant_engine)
    _kill(mysql_server, victim)
    assert session_id(variant_engine) != victim  # no error: replaced before use


def test_poll_after_skips_the_poll_of_a_connection_used_that_recently(
    variant_engine: Any, mysql_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both variants read POLL_AFTER at each checkout: within it, the socket is not polled
    (here an hour, so the killed session is handed out and its statement fails: the
    control that the check above is the poll's doing)."""
    victim = session_id(variant_engine)
    monkeypatch.setattr(adapter_module, "POLL_AFTER", 3600.0)
    _kill(mysql_server, victim)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        session_id(variant_engine)


def test_an_interrupt_in_the_fast_path_gives_the_record_back(variant_engine: Any) -> None:
    """KeyboardInterrupt raised while forksafe looks at a record (here: reading its state)
    propagates, and the record goes back to the pool: no slot is lost."""
    session_id(variant_engine)
    fairy = variant_engine.raw_connection()
    record_class = type(fairy._connection_record)
    fairy.close()
    key = adapter_module._STATE_KEY

    def interrupted(self: Any) -> Any:
        raise KeyboardInterrupt

    # a property (a data descriptor) on the class wins over the record's own attribute
    setattr(record_class, key, property(interrupted))
    try:
        for _ in range(4):  # twice pool_size: a lost slot would exhaust the pool
            with pytest.raises(KeyboardInterrupt):
                variant_engine.raw_connection()
    finally:
        delattr(record_class, key)
    assert variant_engine.pool.checkedout() == 0
    assert session_id(variant_engine) > 0


# -- the tracked dialect's _has_events (SQLAlchemy 2.x) ---------------------------------------
needs_dialect_handle_error = pytest.mark.skipif(
    not adapter_module._HANDLE_ERROR_ON_DIALECT,
    reason="SQLAlchemy 1.4 dispatches handle_error from the engine: the dialect is unchanged",
)


def _getter(engine: Any) -> Any:
    return vars(type(engine.dialect))["_has_events"].fget


def _variant_getter(engine: Any) -> Any:
    """The _has_events getter the variant under test must use."""
    c_pool = type(vars(type(engine.pool))["_do_get"]).__name__ == "CheckoutMethod"
    return adapter_module._speedups.dialect_has_events if c_pool else (
        adapter_module._dialect_has_events)


@needs_dialect_handle_error
def test_a_tracked_dialect_has_events_only_while_an_exception_is_handled(
    variant_engine: Any,
) -> None:
    """At a statement SQLAlchemy finds no dialect listener to look for (forksafe's
    handle_error is only wanted from an except block, where SQLAlchemy dispatches it)."""
    dialect = variant_engine.dialect
    assert _getter(variant_engine) is _variant_getter(variant_engine)
    assert isinstance(dialect, type(dialect)._forksafe_base)
    seen: list[bool] = []
    sqlalchemy.event.listen(variant_engine, "before_cursor_execute",
                            lambda *args: seen.append(dialect._has_events))
    with variant_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert seen == [False]
    try:
        raise ValueError("handled")
    except ValueError:
        assert dialect._has_events is True
    assert dialect._has_events is False


@needs_dialect_handle_error
def test_errors_reach_forksafe_without_the_dialect_flag(
    variant_engine: Any, mysql_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """forksafe's handle_error still runs for a statement's error and a connect error: the
    KILLed session's error is explained, and so is a refused connection."""
    caplog.set_level("WARNING", logger="forksafe")
    forksafe.errors.reset_reported()
    with variant_engine.connect() as conn:
        victim = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        _kill(mysql_server, victim)
        with pytest.raises(sqlalchemy.exc.OperationalError) as info:
            conn.execute(text("SELECT 1"))
    assert info.value.connection_invalidated
    assert type(variant_engine.dialect)._forksafe_user_events is False  # no listener of ours
    explained = [r.getMessage() for r in caplog.records if "Likely cause" in r.getMessage()]
    assert len(explained) == 1, explained

    refused = create_engine(UNREACHABLE, poolclass=type(variant_engine.pool).__base__)
    forksafe.track(refused)
    try:
        assert _getter(refused) is _variant_getter(variant_engine)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            refused.connect()
    finally:
        forksafe.untrack(refused)
    explained = [r.getMessage() for r in caplog.records if "Likely cause" in r.getMessage()]
    assert len(explained) == 2, explained
    assert "Cannot connect to the database server" in explained[1]


@needs_dialect_handle_error
@pytest.mark.parametrize("when", ["before track", "after track"])
def test_the_applications_dialect_listeners_still_run(
    variant_engine: Any, url: str, when: str
) -> None:
    """A do_execute and a handle_error listener of the application's (on the engine, before
    or after track()) run as without forksafe, and untrack() keeps them running."""
    eng = variant_engine
    if when == "before track":
        forksafe.untrack(eng)
    executed: list[str] = []
    failed: list[BaseException] = []

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        executed.append(statement)

    sqlalchemy.event.listen(eng, "do_execute", do_execute)
    sqlalchemy.event.listen(eng, "handle_error", lambda ctx: failed.append(ctx.original_exception))
    if when == "before track":
        forksafe.track(eng)
        assert _getter(eng) is _variant_getter(eng)
    assert eng.dialect._has_events is True
    with eng.connect() as conn:
        conn.execute(text("SELECT :x"), {"x": 1})
        with pytest.raises(sqlalchemy.exc.ProgrammingError):
            conn.execute(text("SELECT * FROM no_such_table_here"), {"x": 1})
    assert executed[-2:] == ["SELECT %s", "SELECT * FROM no_such_table_here"]
    assert len(failed) == 1
    forksafe.untrack(eng)
    assert "_forksafe_base" not in vars(type(eng.dialect))
    assert eng.dialect._has_events is True
    with eng.connect() as conn:
        conn.execute(text("SELECT :x"), {"x": 2})
    assert executed[-1] == "SELECT %s"


@needs_dialect_handle_error
def test_untrack_gives_the_dialect_back_and_statements_stay_cached(url: str) -> None:
    eng = create_engine(url)
    original = type(eng.dialect)
    before = dict(vars(eng.dialect))
    forksafe.track(eng)
    assert type(eng.dialect) is not original
    assert type(eng.dialect).__name__ == original.__name__
    statement = sqlalchemy.select(sqlalchemy.literal_column("1"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # SQLAlchemy warns if a dialect class caches nothing
            with eng.connect() as conn:
                for _ in range(3):
                    assert conn.execute(statement).scalar() == 1
        assert eng.dialect._supports_statement_cache is True
        assert len(eng._compiled_cache) == 1
    finally:
        forksafe.untrack(eng)
    assert type(eng.dialect) is original
    assert eng.dialect._has_events is False  # no listener left: SQLAlchemy looks for none
    assert not any(k.startswith("_forksafe") for k in vars(eng.dialect))
    assert before.keys() <= vars(eng.dialect).keys()
    eng.dispose()


@pytest.mark.parametrize("variant", ["c", "python"])
def test_the_dialect_flag_counts_listeners_on_the_dialect_class(variant: str) -> None:
    """Listeners on the dialect's class (SQLAlchemy sets the class's _has_events) count,
    and so do the application's own on the instance."""
    if variant == "c" and adapter_module._speedups is None:
        pytest.skip("forksafe._speedups is not built here")
    getter = (adapter_module._speedups.dialect_has_events if variant == "c"
              else adapter_module._dialect_has_events)
    base = type("Dialect", (), {"_has_events": False})
    tracked = type("Dialect", (base,), {"_forksafe_base": base, "_forksafe_user_events": False})
    dialect = tracked()
    assert getter(dialect) is False
    base._has_events = True
    assert getter(dialect) is True
    base._has_events = False
    dialect._forksafe_user_events = True
    assert getter(dialect) is True


def test_track_and_untrack_while_threads_run_statements(url: str) -> None:
    """Threads run statements on an engine tracked and untracked over and over meanwhile
    (the pool's and the dialect's classes change under them): every statement answers
    right, and the dialect keeps every attribute its first connect wrote.

    SQLAlchemy does not allow a listener to be added or removed while that event is being
    dispatched in another thread (its listener lists raise "deque mutated during
    iteration"), so the pool's connections are all open before the first track() (no
    ``connect`` dispatch) and the statements do not fail (no ``handle_error`` dispatch):
    the README says to track an engine before other threads connect through it."""
    eng = create_engine(url, pool_size=3, max_overflow=0, pool_timeout=30)
    original = type(eng.dialect)
    held = [eng.connect() for _ in range(3)]  # every connection of the pool open
    for conn in held:
        conn.close()
    learned = {k: v for k, v in vars(eng.dialect).items() if not k.startswith("_")}
    stop = threading.Event()
    problems: list[BaseException | str] = []
    rounds = [0, 0, 0]

    def work(i: int) -> None:
        try:
            while not stop.is_set():
                with eng.connect() as conn:
                    if conn.execute(text("SELECT :x"), {"x": i}).scalar() != i:
                        problems.append(f"thread {i}: a wrong answer")
                rounds[i] += 1
        except BaseException as err:  # reported by the assert below
            problems.append(err)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    toggles = 0
    try:
        while (min(rounds) < 5 or toggles < 20) and not problems:
            if time.monotonic() > deadline:
                break
            forksafe.track(eng)
            forksafe.untrack(eng)
            toggles += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert problems == []
    assert min(rounds) >= 5, f"gave up after 60s: rounds {rounds}, {toggles} track/untrack"
    assert not any(thread.is_alive() for thread in threads)
    assert type(eng.dialect) is original
    assert eng.dialect._has_events is False
    now = {k: v for k, v in vars(eng.dialect).items() if not k.startswith("_")}
    assert now.keys() >= learned.keys()
    assert all(now[k] is learned[k] for k in learned)
    eng.dispose()


@needs_dialect_handle_error
def test_engines_that_share_a_dialect_restore_it_with_the_last_untrack(url: str) -> None:
    """``engine.execution_options()`` makes an engine that shares the dialect (and the
    pool): tracking both, the dialect keeps its tracked class until both are untracked."""
    eng = create_engine(url)
    original = type(eng.dialect)
    options = eng.execution_options(isolation_level="READ COMMITTED")
    assert options.dialect is eng.dialect
    forksafe.track(eng)
    forksafe.track(options)
    tracked = type(eng.dialect)
    try:
        with options.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        forksafe.untrack(eng)
        assert type(eng.dialect) is tracked
        assert eng.dialect._has_events is False
    finally:
        forksafe.untrack(options)
        forksafe.untrack(eng)
    assert type(eng.dialect) is original
    assert eng.dialect._has_events is False
    assert not any(k.startswith("_forksafe") for k in vars(eng.dialect))
    eng.dispose()
