"""instrument() / uninstrument(): idempotent, exact restoration, no passwords in connections()."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import forksafe


def run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (instrumentation patches process-wide state)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_instrument_twice_then_uninstrument_restores_every_attribute() -> None:
    """Every patched attribute is the original object again after uninstrument(), and a
    second instrument() patches nothing twice."""
    out = run("""
        import MySQLdb.connections, pymysql.connections, psycopg, psycopg2
        from sqlalchemy.engine import Engine
        import forksafe
        targets = [(Engine, "__init__"), (MySQLdb.connections.Connection, "__init__"),
                   (pymysql.connections.Connection, "__init__"),
                   (psycopg.BaseConnection, "__init__"), (psycopg2, "connect")]
        before = [vars(h).get(a) for h, a in targets]
        forksafe.instrument(); forksafe.instrument()
        during = [vars(h).get(a) for h, a in targets]
        assert all(d is not b for d, b in zip(during, before)), "not patched"
        assert all(d.__wrapped__ is b for d, b in zip(during, before)), "patched twice"
        forksafe.uninstrument(); forksafe.uninstrument()
        after = [vars(h).get(a) for h, a in targets]
        assert all(x is b for x, b in zip(after, before)), "not restored"
        assert not forksafe.is_instrumented()
        print("ok")
    """)
    assert out == "ok"


def test_driver_imported_after_instrument_is_patched_on_import() -> None:
    """A driver first imported after instrument() is patched when the import happens."""
    out = run("""
        import sys, forksafe
        assert "pymysql" not in sys.modules
        forksafe.instrument()
        import pymysql.connections
        print(hasattr(pymysql.connections.Connection.__init__, "__wrapped__"))
        forksafe.uninstrument()
        print(hasattr(pymysql.connections.Connection.__init__, "__wrapped__"))
    """)
    assert out.split() == ["True", "False"]


def test_engines_created_while_instrumented_are_tracked_without_passwords() -> None:
    """An engine created after instrument() is tracked; connections() shows it with its
    creation site and never its password; after uninstrument() new engines are not."""
    out = run("""
        import forksafe
        from sqlalchemy import create_engine
        forksafe.instrument()
        e = create_engine("mysql+pymysql://app:s3cret@127.0.0.1:1/db")
        print(forksafe.is_tracked(e))
        infos = forksafe.connections()
        print(any("***" in i.origin and "<string>:" in i.origin for i in infos))
        print(any("s3cret" in repr(i) for i in infos))
        forksafe.uninstrument()
        print(forksafe.is_tracked(create_engine("mysql+pymysql://app@127.0.0.1:1/db")))
    """)
    assert out.split() == ["True", "True", "False", "False"]


def test_configure_strict_reads_environment() -> None:
    """FORKSAFE_STRICT=1 turns strict mode on; configure(strict=False) turns it off."""
    out = subprocess.run(
        [sys.executable, "-c", "import forksafe._instrument as i; print(i._CONFIG.strict)"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**__import__("os").environ, "FORKSAFE_STRICT": "1"},
    ).stdout.strip()
    assert out == "True"
    forksafe.configure(strict=False)
    from forksafe._instrument import _CONFIG

    assert _CONFIG.strict is False


@pytest.mark.parametrize("objects", [100_000])
def test_gc_scan_cost_is_bounded(objects: int) -> None:
    """The opt-in scan walks gc objects once; with 100k extra objects it stays under 0.5 s."""
    import time

    from forksafe._instrument import _scan_gc

    ballast = [[i] for i in range(objects)]
    started = time.perf_counter()
    _scan_gc()
    elapsed = time.perf_counter() - started
    del ballast
    assert elapsed < 0.5, elapsed
