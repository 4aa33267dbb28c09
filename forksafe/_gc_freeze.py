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
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

from forksafe import _fork

__all__ = ["ENV", "enabled", "freeze", "freezes", "held", "hold", "release"]

ENV = "FORKSAFE_GC_FREEZE"
_OFF = ("0", "false", "no", "off")


class _State:
    __slots__ = ("freezes", "generation", "held")

    def __init__(self) -> None:
        self.freezes = 0  # freezes done by forksafe in this process
        self.generation: Any = None  # what the last freeze was for (a weak reference)
        self.held = False  # forksafe disabled the collector (`hold`) and has not re-enabled it


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


def held() -> bool:
    """True while the collector is disabled by `hold` (not yet given back by `release`)."""
    return _STATE.held


_HOOKED: list[bool] = []  # non-empty once the at-fork hooks are registered (for good)


def hold(where: str) -> bool:
    """``gc.disable()`` until the workers fork, unless turned off or already disabled. Never raises.

    Called when the server's master imports forksafe's hooks, before it loads the app: no
    collection runs while the app loads, so nothing it builds is freed, and the pages the
    workers will share get no freed holes that the workers' allocations would then fill
    (Python's own recipe, in the documentation of ``gc.freeze``). A collector the user
    disabled already is left alone (and `release` will not enable it).

    `release` gives the collector back: each server hook calls it after freezing, and
    when the server forks with ``os.fork`` (gunicorn) an at-fork hook freezes right
    before the fork and releases in both processes after it, so that the collector of the
    master and of every process it forks is on again after its first fork.

    Returns:
        True if this call disabled the collector.
    """
    try:
        if _STATE.held or not enabled() or not gc.isenabled():
            return False
        if not _HOOKED:
            os.register_at_fork(
                before=_before_fork,
                after_in_parent=release,
                after_in_child=_after_fork_in_child,
            )
            _HOOKED.append(True)
        gc.disable()
        _STATE.held = True
        return True
    except Exception as exc:
        _fork.report_internal_error(exc, f"gc.disable() in {where}")
        return False


def release() -> bool:
    """``gc.enable()`` if `hold` disabled the collector (and only then). Never raises.

    Returns:
        True if this call enabled the collector.
    """
    try:
        if not _STATE.held:
            return False
        _STATE.held = False
        gc.enable()
        return True
    except Exception as exc:
        _fork.report_internal_error(exc, "gc.enable() after the fork")
        return False


def _before_fork() -> None:
    """At ``os.fork`` while held: freeze now, so that both sides can collect after it."""
    try:
        if not _STATE.held:
            return
        if enabled():
            gc.freeze()  # O(1): everything not frozen yet joins the permanent generation
        else:  # turned off since `hold`: give the collector back before anything forks
            release()
    except Exception as exc:
        _fork.report_internal_error(exc, "gc.freeze() before fork")


def _after_fork_in_child() -> None:
    """In a child of ``os.fork``: enable the collector if `hold` disabled it and it is frozen.

    Unfrozen (a fork whose before-fork hook did not run: uWSGI's ``py-call-osafterfork``),
    everything the app built sits in the youngest generation, and the first collection
    would write to all of it: the server's post-fork hook freezes first, then releases.
    """
    if _STATE.held and gc.get_freeze_count() > 0:
        release()
