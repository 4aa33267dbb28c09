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


def test_gc_scan_finds_connections_and_engines_among_other_objects() -> None:
    """The opt-in scan walks the garbage collector's objects and returns exactly the driver
    connections and engines among them (what it costs is measured, never asserted)."""
    out = run("""
        import pymysql.connections
        from sqlalchemy import create_engine
        from forksafe._instrument import _scan_gc
        ballast = [[i] for i in range(100_000)]
        conn = object.__new__(pymysql.connections.Connection)
        engine = create_engine("mysql+pymysql://u@127.0.0.1:1/db")
        found = _scan_gc()
        print(any(o is conn for o in found), any(o is engine for o in found),
              any(o is ballast for o in found), len(ballast))
    """)
    assert out.split() == ["True", "True", "False", "100000"]


SA_KEYWORDS = [
    'create_engine(URL, echo=True)',
    'create_engine(URL, logging_name="app")',
    'create_engine(URL, execution_options={"isolation_level": "READ COMMITTED"})',
    'create_engine(URL, hide_parameters=True)',
    'create_engine(URL, query_cache_size=10)',
    'create_engine(URL, echo=True, logging_name="a", hide_parameters=True, '
    'query_cache_size=5, execution_options={"x": 1}, pool_size=3)',
    'engine_from_config({"sqlalchemy.url": URL, "sqlalchemy.echo": "true", '
    '"sqlalchemy.logging_name": "cfg", "sqlalchemy.query_cache_size": "5"})',
    'create_async_engine(AURL, echo=True).sync_engine',
    'create_async_engine(AURL, logging_name="a", hide_parameters=True).sync_engine',
]

SA_PYTHONS = {"sqlalchemy2": sys.executable}
_SA14 = __import__("pathlib").Path(__file__).parents[2] / ".venv-sa14" / "bin" / "python"
if _SA14.exists():
    SA_PYTHONS["sqlalchemy1.4"] = str(_SA14)


def run_with(python: str, code: str) -> str:
    done = subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize("lane", sorted(SA_PYTHONS))
@pytest.mark.parametrize("expr", SA_KEYWORDS)
def test_instrument_is_invisible_to_create_engine(lane: str, expr: str) -> None:
    """Every create_engine keyword still works under instrument() (SQLAlchemy reads them
    from Engine.__init__'s code object), the engine is tracked, and Engine.__init__'s
    signature reads as before. Control: the same call works before instrument()."""
    out = run_with(SA_PYTHONS[lane], f"""
        import inspect
        from sqlalchemy import create_engine, engine_from_config
        from sqlalchemy.engine import Engine
        try:
            from sqlalchemy.ext.asyncio import create_async_engine
        except ImportError:
            create_async_engine = None
        import forksafe
        URL = "mysql+pymysql://u:pw@127.0.0.1:1/db"
        AURL = "postgresql+psycopg://u:pw@127.0.0.1:1/db"
        if "async" in {expr!r}:
            try:
                create_async_engine(AURL)
            except Exception:  # SQLAlchemy 1.4 has no psycopg 3 dialect
                print("skip")
                raise SystemExit
        control = {expr}
        before = (inspect.signature(Engine.__init__), Engine.__init__.__code__.co_varnames[
            :Engine.__init__.__code__.co_argcount])
        forksafe.instrument()
        engine = {expr}
        after = (inspect.signature(Engine.__init__), Engine.__init__.__code__.co_varnames[
            :Engine.__init__.__code__.co_argcount])
        assert Engine.__init__ is not getattr(Engine.__init__, "__wrapped__", None)
        assert hasattr(Engine.__init__, "__wrapped__"), "not instrumented"
        print(forksafe.is_tracked(engine), before == after, forksafe.internal_errors())
    """)
    if out == "skip":
        pytest.skip("this SQLAlchemy has no asyncio psycopg dialect")
    assert out == "True True []"


def test_unsupported_dialects_log_one_quiet_line_once() -> None:
    """An engine of a dialect without .driver (DefaultDialect) or of a driver forksafe does
    not know (a third-party dialect) logs one INFO line per dialect, never an ERROR, warning
    or internal error."""
    out = run("""
        import logging, sys
        records = []
        class Keep(logging.Handler):
            def emit(self, record): records.append(record)
        logging.getLogger("forksafe").addHandler(Keep())
        logging.getLogger("forksafe").setLevel(logging.DEBUG)
        from sqlalchemy import pool
        from sqlalchemy.engine import Engine, default
        import forksafe
        forksafe.instrument()
        class ThirdParty(default.DefaultDialect):
            name = "thirdparty"
            driver = "somedriver"
        for dialect in (default.DefaultDialect(), ThirdParty()) * 3:
            Engine(pool.NullPool(lambda: None), dialect, "x://")
        levels = sorted({r.levelname for r in records})
        lines = [r.getMessage() for r in records]
        print(levels, len(lines), forksafe.internal_errors())
        print(lines)
    """)
    summary, lines = out.splitlines()
    assert summary == "['INFO'] 2 []", out
    assert "thirdparty+somedriver" in lines
    assert "engines of default " in lines


def test_uninstrument_leaves_a_later_wrapper_in_place_and_says_so() -> None:
    """Another library wraps psycopg2.connect after instrument(): uninstrument() keeps that
    wrapper (and says why in the log), restores the attributes still ours, and forksafe's
    wrapper inside it no longer records anything. A second instrument() says it is on."""
    out = run("""
        import logging
        messages = []
        class Keep(logging.Handler):
            def emit(self, record): messages.append(record.getMessage())
        logging.getLogger("forksafe").addHandler(Keep())
        import psycopg2, pymysql.connections
        import forksafe
        original_init = vars(pymysql.connections.Connection)["__init__"]
        forksafe.instrument()
        forksafe.instrument()
        print(any("already on" in m for m in messages))
        ours = psycopg2.connect
        def theirs(*args, **kwargs):
            return ours(*args, **kwargs)
        psycopg2.connect = theirs
        forksafe.uninstrument()
        print(psycopg2.connect is theirs)
        print(vars(pymysql.connections.Connection)["__init__"] is original_init)
        print(any("psycopg2:connect was replaced" in m and "theirs" in m for m in messages))
    """)
    assert out.split() == ["True", "True", "True", "True"]


def test_wrappers_keep_every_parameter_kind() -> None:
    """The generated wrapper has the original's parameters, defaults and kinds."""
    import inspect

    from forksafe._patching import signature_preserving

    seen: list[object] = []

    def original(a, /, b, c=3, *args, d, e=5, **kw):  # type: ignore[no-untyped-def]
        return (a, b, c, args, d, e, kw)

    wrapped = signature_preserving(original, seen.append, pass_self=False)
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert wrapped.__code__.co_varnames[:wrapped.__code__.co_argcount] == ("a", "b", "c")
    assert wrapped(1, 2, 9, 8, d=4, z=0) == (1, 2, 9, (8,), 4, 5, {"z": 0})
    assert seen == [(1, 2, 9, (8,), 4, 5, {"z": 0})]
