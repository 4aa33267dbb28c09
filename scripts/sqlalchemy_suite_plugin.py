"""pytest plugin for scripts/sqlalchemy-suite: SQLAlchemy's own tests with every engine tracked.

Loaded with ``-p sqlalchemy_suite_plugin`` (``scripts/`` on ``PYTHONPATH``) into a run of
SQLAlchemy's test suite. What it does depends on ``FORKSAFE_SUITE_MODE``:

* ``forksafe`` (the default): at ``pytest_configure``, before SQLAlchemy's own plugin makes
  its engines (in ``pytest_sessionstart``), ``forksafe.instrument()``: from then on every
  ``Engine`` constructed is passed to ``forksafe.track``. The plugin counts the engines
  tracked (a thin wrapper around ``forksafe.track``, which ``instrument()`` calls through
  the module attribute), and collects what forksafe logs at WARNING and above on the
  ``forksafe`` logger; ERROR records are forksafe's internal errors
  (``forksafe._state.report_internal_error`` logs them at ERROR and keeps them for
  ``forksafe.internal_errors()``, which is read too, in case a test silenced logging).
  The INFO line about a dialect forksafe does not support is recorded as such, not counted.
* ``plain``: does not import forksafe and changes nothing; it only counts, at the very end,
  the ``Engine`` objects still alive, so that the forksafe run's count can be compared
  with it (more alive with forksafe would be engines forksafe keeps alive: a leak).

At the very end (``pytest_unconfigure``, after SQLAlchemy's own cleanup) ``gc.collect()``,
and a JSON summary goes to the path in ``FORKSAFE_SUITE_REPORT``: engines tracked, engines
still alive and still in forksafe's registry (with where they were created), those that
only forksafe kept alive (each is untracked: one that ``gc.collect()`` then frees was held
by forksafe alone), internal errors and warnings with their messages.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import sys
import weakref
from typing import Any

import pytest

MODE = os.environ.get("FORKSAFE_SUITE_MODE", "forksafe")
if MODE not in ("forksafe", "plain"):
    raise pytest.UsageError(f"FORKSAFE_SUITE_MODE must be forksafe or plain, not {MODE!r}")

# How many messages of each kind the summary keeps (their counts are always complete).
KEEP = 50


class _Collector(logging.Handler):
    """Keeps the ``forksafe`` logger's records: WARNING and up, and the INFO lines that
    name a dialect forksafe does not protect."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.unsupported: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception as exc:  # a record whose arguments do not format: keep what it was
            message = f"{record.msg!r} % {record.args!r} ({exc!r})"
        if record.levelno >= logging.ERROR:
            self.errors.append(message)
        elif record.levelno >= logging.WARNING:
            self.warnings.append(message)
        elif "are not protected across fork" in message:
            self.unsupported.append(message)
        # other INFO lines (and DEBUG, which the handler's level drops) are forksafe's
        # ordinary chatter: not counted


class _State:
    def __init__(self) -> None:
        self.collector = _Collector()
        self.tracked = 0  # engines that forksafe.track() left tracked
        self.track_calls = 0  # engines passed to forksafe.track()
        self.track_raised: list[str] = []  # track() raised (instrument reports it too)
        self.engines: weakref.WeakSet[Any] = weakref.WeakSet()  # the tracked ones


STATE = _State()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if MODE != "forksafe":
        return
    import forksafe
    from forksafe.sqlalchemy import as_sync_engine, is_engine

    logger = logging.getLogger("forksafe")
    logger.addHandler(STATE.collector)
    # INFO must reach the handler: the logger's own level decides before any handler does
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)

    real_track = forksafe.track

    @functools.wraps(real_track)
    def counting_track(obj: Any, **kwargs: Any) -> Any:
        engine = is_engine(obj)
        if engine:
            STATE.track_calls += 1
        try:
            result = real_track(obj, **kwargs)
        except Exception as exc:
            STATE.track_raised.append(repr(exc))
            raise
        if engine and forksafe.is_tracked(obj):
            STATE.tracked += 1
            STATE.engines.add(as_sync_engine(obj))
        return result

    forksafe.track = counting_track
    forksafe.instrument()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    path = os.environ.get("FORKSAFE_SUITE_REPORT")
    if not path or hasattr(config, "workerinput"):  # (an xdist worker: the controller writes)
        return
    gc.collect()
    summary: dict[str, Any] = {"mode": MODE, "engines_alive": _engines_alive()}
    if MODE == "forksafe":
        summary.update(_forksafe_summary())
    with open(path, "w") as out:
        json.dump(summary, out, indent=1)


def _engines_alive() -> int | None:
    """How many ``Engine`` objects are alive now (None if SQLAlchemy was never imported)."""
    module = sys.modules.get("sqlalchemy.engine.base")
    if module is None:
        return None
    return sum(1 for obj in gc.get_objects() if isinstance(obj, module.Engine))


def _forksafe_summary() -> dict[str, Any]:
    import forksafe
    from forksafe._registry import REGISTRY

    testing_db = _testing_db()
    summary: dict[str, Any] = {
        "instrumented": forksafe.is_instrumented(),
        "engines_tracked": STATE.tracked,
        "engines_passed_to_track": STATE.track_calls,
        "track_raised": STATE.track_raised[:KEEP],
        "testing_db_tracked": None if testing_db is None else forksafe.is_tracked(testing_db),
        "tracked_still_alive": len(STATE.engines),
    }
    del testing_db
    origins = sorted(info.origin for info in forksafe.connections() if info.kind == "engine")
    summary["registry_engines_after_gc"] = len(origins)
    summary["registry_engine_origins"] = origins[:KEEP]
    leaked = _kept_alive_by_forksafe(REGISTRY)  # (untracks everything: last)
    summary["kept_alive_by_forksafe"] = len(leaked)
    summary["kept_alive_origins"] = leaked[:KEEP]
    collector = STATE.collector
    # an error a test kept from the log (logging.disable, a replaced handler) is still in
    # forksafe.internal_errors(), which keeps the last 100
    kept = [repr(exc) for exc in forksafe.internal_errors()]
    messages = collector.errors if len(collector.errors) >= len(kept) else kept
    summary["internal_errors"] = len(messages)
    summary["internal_error_messages"] = messages[:KEEP]
    summary["warnings"] = len(collector.warnings)
    summary["warning_messages"] = collector.warnings[:KEEP]
    summary["unsupported_dialects"] = collector.unsupported[:KEEP]
    return summary


def _kept_alive_by_forksafe(registry: Any) -> list[str]:
    """The engines still tracked that only forksafe keeps alive: each is untracked, and one
    that ``gc.collect()`` then frees was held by nothing else (forksafe promises to hold
    engines weakly). Returns where each was created. Untracks every engine: call it last."""
    import forksafe

    refs = [(weakref.ref(engine), _origin(engine, adapter))
            for engine, adapter in registry.snapshot()[1]]
    for ref, _ in refs:
        engine = ref()
        if engine is not None:
            forksafe.untrack(engine)
        del engine  # no strong reference of ours may remain
    gc.collect()
    return sorted(origin for ref, origin in refs if ref() is None)


def _origin(engine: Any, adapter: Any) -> str:
    """The engine's URL (no password) and where it was created, as forksafe recorded them."""
    from forksafe._records import SEEN

    site = SEEN.get(engine)
    url = getattr(adapter, "_origin", "engine")
    return f"{url} at {site.site}" if site is not None else url


def _testing_db() -> Any:
    """SQLAlchemy's main test engine (``sqlalchemy.testing.config.db``), if it was made."""
    config = sys.modules.get("sqlalchemy.testing.config")
    return getattr(config, "db", None) if config is not None else None
