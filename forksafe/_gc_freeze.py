"""``gc.freeze()`` before workers fork, so that preloaded memory stays shared under traffic.

A preloaded server (gunicorn ``preload_app``, uWSGI without ``lazy-apps``) shares the app's
memory pages between its workers only until something writes to them. The cyclic garbage
collector does, on every object it examines (it keeps its bookkeeping in each object's
header): the first full collection in a worker copies nearly every page that holds a
preloaded object. ``gc.freeze()`` moves every object that exists at that moment into a
permanent generation that collections never examine, so they stop touching those pages.

Used by `forksafe.gunicorn` (in the master, in ``pre_fork``, once per fork generation; in
``post_fork`` when the master did not) and `forksafe.uwsgi` (first thing in every worker:
uWSGI gives Python no control in the master between loading the app and forking, and the
post-fork hook runs before any other Python code of the worker, so nothing was collected
in between).

The cost: objects that exist at the freeze and later become cyclic garbage are never
freed (in the master, and in a worker that drops them). For an app loaded at start-up that
is what it keeps anyway. ``FORKSAFE_GC_FREEZE=0`` turns it off.

Measured (docs/BENCHMARKS.md; 8 workers, ~4,000 requests per worker, total PSS of the
Flask example): 137 MiB with the freeze against 144 without under gunicorn, 140 against
148 under uWSGI. Two variants were measured and are not done: Python's documented recipe
also disables the collector in the master while the app loads, so that no collection
leaves freed holes in the pages the workers share; it made no difference (0 to 2 MiB
either way on both apps and servers; the allocator's pools are about 97% full after an
import, so there are few holes). A ``gc.collect()`` just before the freeze cost 3 to 6 MiB
(it makes the holes).
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

from forksafe import _fork

__all__ = ["ENV", "enabled", "freeze", "freezes"]

ENV = "FORKSAFE_GC_FREEZE"
_OFF = ("0", "false", "no", "off")


class _State:
    __slots__ = ("freezes", "generation")

    def __init__(self) -> None:
        self.freezes = 0  # freezes done by forksafe in this process
        self.generation: Any = None  # what the last freeze was for (a weak reference)


_STATE = _State()


def enabled() -> bool:
    """False when ``FORKSAFE_GC_FREEZE`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


def freezes() -> int:
    """How many times forksafe froze the collector in this process (inherited by forks)."""
    return _STATE.freezes


def _same_generation(generation: object) -> bool:
    previous = _STATE.generation
    if previous is None:
        return False
    if isinstance(previous, weakref.ref):
        return previous() is generation
    return bool(previous == id(generation))


def freeze(generation: object | None, where: str) -> bool:
    """``gc.freeze()`` unless turned off or already done for ``generation``. Never raises.

    Args:
        generation: what the workers about to be forked are forked from (gunicorn's config
            object, which a reload replaces); None freezes unconditionally.
        where: names the hook, for the error report.

    Returns:
        True if this call froze.
    """
    try:
        if not enabled():
            return False
        if generation is not None and _same_generation(generation):
            return False
        gc.freeze()
        _STATE.freezes += 1
        if generation is not None:
            try:
                _STATE.generation = weakref.ref(generation)
            except TypeError:  # not weak-referenceable: its id, valid while it lives
                _STATE.generation = id(generation)
        return True
    except Exception as exc:
        _fork.report_internal_error(exc, f"gc.freeze() in {where}")
        return False
