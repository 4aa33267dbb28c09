"""Property test: the registry agrees with a simple model under any sequence of operations."""

from __future__ import annotations

import gc
import weakref

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import create_engine

import forksafe
from forksafe._registry import REGISTRY


class RegistryMachine(RuleBasedStateMachine):
    """Create, track, untrack and drop engines; tracked == model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.engines: list = []
        self.tracked: set[int] = set()  # ids of tracked engines in self.engines

    @rule(driver=st.sampled_from(["mysqldb", "pymysql", "psycopg2", "psycopg"]))
    def create(self, driver: str) -> None:
        scheme = "mysql" if driver in ("mysqldb", "pymysql") else "postgresql"
        self.engines.append(create_engine(f"{scheme}+{driver}://u@127.0.0.1/db"))

    @precondition(lambda self: self.engines)
    @rule(index=st.integers(min_value=0), times=st.integers(min_value=1, max_value=3))
    def track(self, index: int, times: int) -> None:
        engine = self.engines[index % len(self.engines)]
        for _ in range(times):
            assert forksafe.track(engine) is engine
        self.tracked.add(id(engine))

    @precondition(lambda self: self.engines)
    @rule(index=st.integers(min_value=0))
    def untrack(self, index: int) -> None:
        engine = self.engines[index % len(self.engines)]
        assert forksafe.untrack(engine) is (id(engine) in self.tracked)
        self.tracked.discard(id(engine))

    @precondition(lambda self: self.engines)
    @rule(index=st.integers(min_value=0))
    def drop(self, index: int) -> None:
        engine = self.engines.pop(index % len(self.engines))
        self.tracked.discard(id(engine))
        del engine
        gc.collect()

    @invariant()
    def registry_matches_model(self) -> None:
        for engine in self.engines:
            assert forksafe.is_tracked(engine) is (id(engine) in self.tracked)
        _, engines = REGISTRY.snapshot()
        mine = {id(e) for e in self.engines}
        assert {id(e) for e, _ in engines if id(e) in mine} == self.tracked

    def teardown(self) -> None:
        for engine in self.engines:
            forksafe.untrack(engine)


TestRegistry = RegistryMachine.TestCase
TestRegistry.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


class _NoSocketDriver:
    """Enough of a `forksafe.drivers.Driver` for the registry: no socket to record."""

    name = "none"

    def socket_fd(self, conn: object) -> None:
        return None


class _Conn:
    """A weak-referenceable stand-in for a DBAPI connection."""


def test_a_second_add_gives_the_kept_entry_its_pool_record() -> None:
    """instrument() records a connection (no pool record) before the engine's pool does:
    the first entry is kept, but learns the record, so the fork hold can find the pool's
    wrapper of a checked-out connection."""
    from typing import Any

    from forksafe._registry import ConnectionEntry, Registry

    registry = Registry()
    conn, record, other = _Conn(), _Conn(), _Conn()
    driver: Any = _NoSocketDriver()
    first = ConnectionEntry(driver=driver, pid=1, origin="instrument")
    registry.add_connection(conn, first)
    registry.add_connection(conn, ConnectionEntry(driver=driver, pid=1, origin="engine",
                                                  record=weakref.ref(record)))
    kept = registry.connection_entry(conn)
    assert kept is first
    assert kept.record is not None
    assert kept.record() is record
    # a record already known is not replaced
    registry.add_connection(conn, ConnectionEntry(driver=driver, pid=1, origin="engine",
                                                  record=weakref.ref(other)))
    assert kept.record() is record
