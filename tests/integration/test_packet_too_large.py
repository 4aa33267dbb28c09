"""A statement over ``max_allowed_packet`` against a real MariaDB (``--max-allowed-packet=1M``).

The server closes the connection and the client sees ``2006 Server has gone away``, exactly
as after an idle timeout. A tracked engine learns the server's ``max_allowed_packet`` when it
learns its idle limit, so forksafe names packet size as the cause (with its fix), and
``retry_on_disconnect`` does not send the same 2 MB again: it would fail every time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, exc, text

import forksafe
from forksafe import errors
from tests.conftest import start_mariadb

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]

BLOB = b"x" * 2_000_000


@pytest.fixture(scope="module")
def small_packet() -> Iterator[Any]:
    server = start_mariadb("--max-allowed-packet=1M")
    try:
        server.execute("CREATE DATABASE IF NOT EXISTS forksafe", database="")
        server.execute("CREATE TABLE IF NOT EXISTS forksafe.blobs (b LONGBLOB)")
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fresh_knowledge() -> Iterator[None]:
    saved = errors._MAX_PACKET[0]
    errors._MAX_PACKET[0] = None
    errors.reset_reported()
    yield
    errors._MAX_PACKET[0] = saved
    errors.reset_reported()


@pytest.mark.parametrize("driver", ["mysqldb", "pymysql"])
@pytest.mark.usefixtures("fresh_knowledge")
def test_packet_too_large_is_named_and_not_retried(
    small_packet: Any, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """2 MB against max_allowed_packet = 1M through a tracked engine: classify, explain and
    the log name packet size and its fix, not an idle timeout; retry_on_disconnect runs the
    work once; the engine keeps working for statements that fit."""
    caplog.set_level(logging.INFO, logger="forksafe")
    engine = forksafe.track(create_engine(small_packet.url(driver)))
    try:
        with engine.connect() as conn:  # a first connection: the server's limits are learned
            conn.execute(text("SELECT 1"))
        assert errors.learned_max_allowed_packet() == 1024 * 1024
        calls = []

        @forksafe.retry_on_disconnect(attempts=5, backoff=0.0)
        def store() -> None:
            calls.append(1)
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO blobs VALUES (:b)"), {"b": BLOB})

        with pytest.raises(exc.OperationalError) as caught:
            store()
        assert caught.value.orig.args[0] in (2006, 1153, 2013), caught.value.orig
        assert len(calls) == 1
        assert errors.classify(caught.value) is errors.PACKET_TOO_LARGE
        line = errors.explain(caught.value)
        assert line is not None
        cause = line.split("Fix:")[0]
        assert "max_allowed_packet" in cause
        assert "idle" not in cause
        assert "max_allowed_packet is 1,048,576 bytes" in line
        logged = [r.getMessage() for r in caplog.records if r.name == "forksafe"]
        assert any("max_allowed_packet" in m for m in logged), logged
        assert not any("sat idle" in m for m in logged), logged
        assert not any("retrying in" in m for m in logged), logged
        with engine.connect() as conn:  # the dead connection was dropped; small ones work
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
        forksafe.untrack(engine)


@pytest.mark.usefixtures("fresh_knowledge")
def test_control_without_the_learned_limit_it_is_an_idle_timeout(small_packet: Any) -> None:
    """The control: the same failure with no max_allowed_packet known reads as a disconnect
    worth retrying; that is what forksafe said before it learned the limit. The client sees
    2006 or, when the server closes while the packet is still being written, 2013: which one
    depends on timing, so both disconnect classes count."""
    engine = create_engine(small_packet.url("pymysql"))
    try:
        with pytest.raises(exc.OperationalError) as caught, engine.begin() as conn:
            conn.execute(text("INSERT INTO blobs VALUES (:b)"), {"b": BLOB})
        kind = errors.classify(caught.value)
        assert kind in (errors.GONE_AWAY, errors.LOST_DURING_QUERY), kind
        assert kind.retry_safe
    finally:
        engine.dispose()
