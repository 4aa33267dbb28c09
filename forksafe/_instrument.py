"""``forksafe.instrument()``: track every engine and connection, and report the ones nobody did.

What `instrument` wraps (``forksafe._patching``: undoable, and invisible to code that
inspects the originals, since each wrapper has the original's exact parameters):

* ``sqlalchemy.engine.base:Engine.__init__``: every ``Engine`` constructed from then on (by
  ``create_engine``, ``create_async_engine``, ``engine_from_config``, however imported) is
  passed to `forksafe.track`. An engine of a driver forksafe does not support is only
  recorded, with one INFO line per dialect.
* every constructor the drivers list (`forksafe.drivers.Driver.constructors`): a connection
  class's ``__init__`` (mysqlclient, PyMySQL, psycopg 3) or a module function
  (``psycopg2:connect``: psycopg2's connection class is written in C; a ``from psycopg2
  import connect`` executed *before* ``instrument()`` keeps the unwrapped function).
* modules imported after ``instrument()`` are wrapped when they are imported (a
  ``sys.meta_path`` finder that only watches those module names; removed by uninstrument).

`uninstrument` restores each attribute that still holds forksafe's wrapper; one another
library wrapped after us is left in place (the log says so) and our wrapper inside it does
nothing from then on. A second `instrument` says in the log that it is already on.

Each engine and connection seen is recorded weakly with the place that created it (the first
stack frame outside forksafe, SQLAlchemy and the drivers): about 10 µs per new connection.

Detection: after a fork, in the child, forksafe looks for inherited connections nobody
tracked: those recorded while instrumented but untracked since (``instrument(track=False)``
records without tracking), and, only if ``configure(scan_at_fork=True)``, every driver
connection and engine the garbage collector knows of (a full ``gc.get_objects()`` walk, which
costs milliseconds per hundred thousand objects, so it is opt-in). Each one is neutralised like
a tracked one (an engine gets a fresh pool), and reported once: a ``ForkSafetyWarning`` and a
``forksafe`` log record naming the driver, where it was created and what was done.

Strict mode (``configure(strict=True)`` or ``FORKSAFE_STRICT=1``): the child's first use of
such a connection raises `UntrackedConnectionError` instead: the inherited object itself
(``cursor()``, ``query()``, ``execute()``; not possible for psycopg2's C class), a checkout
from an untracked engine, and any new connection while instrumented. Fork-time code itself
never raises.

Each concern has its own module; this one is the public API and wires them together:
``forksafe._patching`` (undoable, invisible wrappers), ``forksafe._records`` (creation
records and the detection options), ``forksafe._detect`` (detection after a fork) and
``forksafe._strict`` (strict mode).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from forksafe import _fork, _patching, _strict
from forksafe._detect import connection_state as _state
from forksafe._detect import scan_gc
from forksafe._patching import target_module
from forksafe._records import CONFIG as _CONFIG
from forksafe._records import LOCK as _LOCK
from forksafe._records import SEEN as _SEEN
from forksafe._records import record as _record
from forksafe._registry import REGISTRY, ConnectionEntry
from forksafe.drivers import (
    all_drivers,
    dialect_drivers,
    driver_for_dialect,
    find_driver,
    unwrap,
)
from forksafe.exceptions import UntrackedConnectionError

__all__ = [
    "ConnectionInfo",
    "configure",
    "connections",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

logger = logging.getLogger("forksafe")

_scan_gc = scan_gc  # the name forksafe.doctor and the tests use

@dataclass(frozen=True)
class ConnectionInfo:
    """One entry of `connections`: no password, no live object.

    Attributes:
        kind: ``"engine"`` or ``"connection"``.
        driver: the driver's name (``mysqlclient``, ``PyMySQL``, ``psycopg2``, ``psycopg``).
        pid: the process that opened it.
        origin: how it came to forksafe (``track()``, an engine URL with the password
            masked, or ``file:line`` of its creation when instrumented).
        state: ``open``, ``closed``, ``closed-by-server`` (the server ended the session:
            its socket shows the server's hang-up, learned without a round trip: a zero-time
            poll; a session still open on the server but unusable is not seen),
            ``inherited`` (opened by another process), or ``unknown`` (the driver could
            not tell).
        tracked: whether forksafe protects it.
    """

    kind: str
    driver: str
    pid: int
    origin: str
    state: str
    tracked: bool


# How to undo each patch, in the order they were made (undone in reverse).
_UNDO: list[Callable[[], str | None]] = []
#: The engine constructor instrument() wraps, besides the drivers' own constructors.
ENGINE_TARGET = "sqlalchemy.engine.base:Engine.__init__"


class _InstrumentState:
    __slots__ = ("active", "finder", "patched", "track", "unsupported")

    def __init__(self) -> None:
        self.active = False
        self.track = True
        self.finder: _PostImportFinder | None = None
        self.patched: set[str] = set()  # targets wrapped ("module:qualname")
        self.unsupported: set[str] = set()  # engine dialects already logged as unsupported


_STATE = _InstrumentState()


# -- public API ---------------------------------------------------------------------------------
def configure(*, strict: bool | None = None, scan_at_fork: bool | None = None) -> None:
    """Set forksafe's detection options (arguments left as None are unchanged).

    Args:
        strict: make the first use of an untracked inherited connection raise
            `UntrackedConnectionError` in the child (default: env ``FORKSAFE_STRICT``).
        scan_at_fork: in each child, also walk every object the garbage collector knows of
            to find driver connections and engines created before ``instrument()`` (costs
            milliseconds per hundred thousand objects in every child).
    """
    with _LOCK:
        if strict is not None:
            _CONFIG.strict = strict
        if scan_at_fork is not None:
            _CONFIG.scan_at_fork = scan_at_fork


def instrument(*, track: bool = True) -> None:
    """Track every engine and DBAPI connection created from now on (idempotent).

    Args:
        track: False records creation sites without tracking, so that forks report every
            connection nobody tracked (an audit: see the module docstring).
    """
    with _LOCK:
        if _STATE.active:
            changed = _STATE.track != track
            _STATE.track = track
            logger.warning(
                "instrument() is already on%s",
                f"; from now on it {'tracks' if track else 'only records'} new connections"
                if changed else "; nothing to do",
            )
            return
        _STATE.track = track
        _STATE.active = True
        for target in _targets():
            _patch(target)
        _STATE.finder = _PostImportFinder()
        sys.meta_path.insert(0, _STATE.finder)


def uninstrument() -> None:
    """Undo `instrument` (idempotent): every attribute it replaced gets its original back.

    An attribute that another library replaced after `instrument` (its own wrapper around
    ours) is left as it is, and the log says so; forksafe's wrapper inside it does nothing
    from then on. What was tracked stays tracked; records of creation sites are kept.
    """
    with _LOCK:
        if not _STATE.active:
            return
        _STATE.active = False
        if _STATE.finder is not None and _STATE.finder in sys.meta_path:
            sys.meta_path.remove(_STATE.finder)
        _STATE.finder = None
        while _UNDO:
            why_not = _UNDO.pop()()
            if why_not is not None:
                logger.warning("uninstrument(): %s", why_not)
        _STATE.patched.clear()


def is_instrumented() -> bool:
    """Whether `instrument` is in effect."""
    return _STATE.active


def connections() -> list[ConnectionInfo]:
    """What forksafe knows of in this process: tracked engines and connections, and
    connections recorded while instrumented that nobody tracked. No passwords."""
    pid = os.getpid()
    conns, engines = REGISTRY.snapshot()
    out: list[ConnectionInfo] = []
    seen_ids = set()
    for conn, entry in conns:
        seen_ids.add(id(conn))
        site = _SEEN.get(conn)
        origin = entry.origin if site is None else f"{entry.origin} at {site.site}"
        out.append(ConnectionInfo("connection", entry.driver.name, entry.pid, origin,
                                  _state(conn, entry.pid, pid), True))
    for engine, adapter in engines:
        site = _SEEN.get(engine)
        origin = getattr(adapter, "_origin", "engine")
        if site is not None:
            origin = f"{origin} at {site.site}"
        driver = driver_for_dialect(engine.dialect.driver)  # the name raw connections get
        name = driver.name if driver is not None else engine.dialect.driver
        out.append(ConnectionInfo("engine", name, site.pid if site else pid,
                                  origin, "open", True))
    with _LOCK:
        records = list(_SEEN.items())
    for obj, origin_rec in records:
        if id(obj) in seen_ids or origin_rec.kind == "engine":
            continue
        driver = find_driver(obj)
        if driver is None:
            continue
        out.append(ConnectionInfo("connection", driver.name, origin_rec.pid,
                                  f"created at {origin_rec.site}",
                                  _state(obj, origin_rec.pid, pid), False))
    return out


def _on_new_connection(conn: Any) -> None:
    if not _STATE.active:  # a wrapper of ours that another library's kept after uninstrument
        return
    try:
        _strict.check_pending()
        raw = unwrap(conn)
        driver = find_driver(raw)
        if driver is None:
            return
        if _STATE.track:
            # Tracked before it is recorded: a fork another thread makes in between finds
            # it tracked (the other way round, the child would report it as a connection
            # nobody tracked)
            REGISTRY.add_connection(
                raw,
                ConnectionEntry(driver=driver, pid=os.getpid(),
                                origin=f"{driver.name} connection"),
            )
        _record(raw, driver.name)
    except UntrackedConnectionError:
        raise
    except Exception as exc:  # instrumentation must never break the user's connect
        _fork.report_internal_error(exc, "recording a new connection")


def _on_new_engine(engine: Any) -> None:
    if not _STATE.active:
        return
    try:
        _record(engine, "engine")
        if not _STATE.track:
            return
        dialect = getattr(engine, "dialect", None)
        driver = getattr(dialect, "driver", None)
        if driver in dialect_drivers():
            import forksafe

            forksafe.track(engine)
            return
        name = f"{getattr(dialect, 'name', None) or type(dialect).__name__}" + (
            f"+{driver}" if isinstance(driver, str) and driver else "")
        with _LOCK:
            first = name not in _STATE.unsupported
            _STATE.unsupported.add(name)
        if first:
            logger.info(
                "engines of %s are not protected across fork: forksafe supports "
                "%s (logged once per dialect)",
                name, ", ".join(sorted(dialect_drivers())),
            )
    except Exception as exc:
        _fork.report_internal_error(exc, "tracking a new engine")


# -- patches ------------------------------------------------------------------------------------
def _targets() -> dict[str, Callable[[Any], None]]:
    """Every constructor instrument() wraps, with what runs after it: the engine's, and
    each driver's (`forksafe.drivers.Driver.constructors`)."""
    targets: dict[str, Callable[[Any], None]] = {ENGINE_TARGET: _on_new_engine}
    for driver in all_drivers():
        for target in driver.constructors:
            targets[target] = _on_new_connection
    return targets


def _patch(target: str) -> None:
    """Wrap ``target`` if its module is imported and it is not wrapped yet (under _LOCK)."""
    if target in _STATE.patched or target_module(target) not in sys.modules:
        return
    try:
        patch = _patching.apply(target, _targets()[target])
    except Exception as exc:
        _fork.report_internal_error(exc, f"instrumenting {target}")
        return
    _STATE.patched.add(target)
    _UNDO.append(patch.undo)
    # No pool-wide checkout listener: it would put every pool on SQLAlchemy's slow checkout
    # path. Tracked pools check the pid themselves (forksafe.sqlalchemy); an untracked
    # inherited engine is refused by the listener _poison puts on that engine alone.


def _patch_module(name: str) -> None:
    for target in _targets():
        if target_module(target) == name:
            _patch(target)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches a target module right after it is imported (looks at nothing else)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in {target_module(t) for t in _targets()}:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                exec_module = getattr(loader, "exec_module", None)
                if exec_module is None:
                    return spec

                def exec_and_patch(module: types.ModuleType, _exec: Any = exec_module) -> None:
                    _exec(module)
                    with _LOCK:
                        if _STATE.active:
                            _patch_module(fullname)

                # Wrap per spec: the loader object may be shared, so do not mutate it.
                spec.loader = _LoaderProxy(loader, exec_and_patch)
                return spec
        return None


class _LoaderProxy(importlib.abc.Loader):
    def __init__(self, loader: Any, exec_module: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._exec = exec_module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        self._exec(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)



