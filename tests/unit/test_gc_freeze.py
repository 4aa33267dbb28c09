"""forksafe._gc_freeze: when the server hooks freeze the collector, and that it never raises.

The freeze inside real gunicorn and uWSGI processes is tested in
tests/integration/test_server_hooks.py; these are the rules of the function itself.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from forksafe import _fork, _gc_freeze
from forksafe._instrument import _scan_gc
from tests.forking import run_in_child


@pytest.fixture(autouse=True)
def _unfrozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts unfrozen and collecting with a fresh state, and leaves it so."""
    gc.unfreeze()
    gc.enable()
    monkeypatch.setattr(_gc_freeze, "_STATE", _gc_freeze._State())
    monkeypatch.delenv(_gc_freeze.ENV, raising=False)
    yield
    gc.unfreeze()
    gc.enable()


class Generation:
    """Stands for gunicorn's config object (weak-referenceable, replaced on reload)."""


@pytest.mark.parametrize(
    ("value", "on"),
    [(None, True), ("1", True), ("yes", True), ("0", False), ("false", False),
     ("No", False), (" off ", False)],
)  # fmt: skip
def test_env_turns_it_off(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    """``FORKSAFE_GC_FREEZE=0`` (or false/no/off) turns the freeze off; unset means on."""
    if value is not None:
        monkeypatch.setenv(_gc_freeze.ENV, value)
    assert _gc_freeze.enabled() is on
    assert _gc_freeze.freeze(None, "test") is on
    assert (gc.get_freeze_count() > 0) is on


def test_once_per_generation() -> None:
    """One freeze per generation object; a new generation (a reload) freezes again."""
    first = Generation()
    assert _gc_freeze.freeze(first, "test") is True
    assert _gc_freeze.freeze(first, "test") is False  # a respawn of the same generation
    assert _gc_freeze.freezes() == 1
    second = Generation()
    assert _gc_freeze.freeze(second, "test") is True
    assert _gc_freeze.freezes() == 2
    assert _gc_freeze.freeze(None, "test") is True  # no generation: unconditional


def test_generation_without_weak_references() -> None:
    """A generation that cannot be weakly referenced is compared by identity."""
    generation = ["not weak-referenceable"]
    assert _gc_freeze.freeze(generation, "test") is True
    assert _gc_freeze.freeze(generation, "test") is False


def test_freeze_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing gc.freeze is reported as an internal error (naming the hook), not raised."""

    def broken() -> None:
        raise RuntimeError("gc.freeze is broken on purpose")

    reported: list[tuple[BaseException, str]] = []
    monkeypatch.setattr(gc, "freeze", broken)
    monkeypatch.setattr(_fork, "report_internal_error", lambda e, w="": reported.append((e, w)))
    assert _gc_freeze.freeze(Generation(), "test hook") is False
    assert [(str(e), w) for e, w in reported] == [
        ("gc.freeze is broken on purpose", "gc.freeze() in test hook")
    ]


def test_scan_at_fork_still_sees_frozen_engines() -> None:
    """``configure(scan_at_fork=True)`` walks the collector: frozen objects must be in it.

    gc.get_objects() leaves out what gc.freeze() froze, so after forksafe's freeze the scan
    would miss every engine the master created. It must not; and it leaves the freeze on.
    """
    engine = create_engine("sqlite://")
    try:
        gc.freeze()
        assert not any(o is engine for o in gc.get_objects())  # what the scan must overcome
        assert any(o is engine for o in _scan_gc())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        engine.dispose()


# --- the collector disabled while the app loads (hold / release) ---------------------


def test_hold_disables_until_release() -> None:
    """`hold` disables the collector; `release` enables it again, once."""
    assert _gc_freeze.hold("test") is True
    assert not gc.isenabled()
    assert _gc_freeze.held()
    assert _gc_freeze.hold("test") is False  # already held
    assert _gc_freeze.release() is True
    assert gc.isenabled()
    assert _gc_freeze.release() is False  # nothing held any more


def test_hold_leaves_a_collector_the_user_disabled() -> None:
    """A collector disabled before `hold` stays disabled: `release` does not enable it."""
    gc.disable()
    assert _gc_freeze.hold("test") is False
    assert not _gc_freeze.held()
    assert _gc_freeze.release() is False
    assert not gc.isenabled()


@pytest.mark.parametrize("before", [True, False])
def test_hold_off_switch_leaves_the_state_as_it_was(
    monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    """``FORKSAFE_GC_FREEZE=0``: `hold` touches nothing, whatever the collector's state."""
    monkeypatch.setenv(_gc_freeze.ENV, "0")
    if not before:
        gc.disable()
    assert _gc_freeze.hold("test") is False
    assert gc.isenabled() is before
    assert _gc_freeze.release() is False
    assert gc.isenabled() is before


def test_hold_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing gc.disable is reported (naming where), not raised; nothing is held."""

    def broken() -> None:
        raise RuntimeError("gc.disable is broken on purpose")

    reported: list[tuple[BaseException, str]] = []
    monkeypatch.setattr(gc, "disable", broken)
    monkeypatch.setattr(_fork, "report_internal_error", lambda e, w="": reported.append((e, w)))
    assert _gc_freeze.hold("the test master") is False
    assert not _gc_freeze.held()
    assert gc.isenabled()
    assert [(str(e), w) for e, w in reported] == [
        ("gc.disable is broken on purpose", "gc.disable() in the test master")
    ]


def _child_state() -> dict[str, object]:
    return {
        "enabled": gc.isenabled(),
        "frozen": gc.get_freeze_count() > 0,
        "held": _gc_freeze.held(),
    }


def test_os_fork_freezes_before_and_enables_on_both_sides() -> None:
    """While held, ``os.fork`` freezes in the parent first; both sides collect after it."""
    assert _gc_freeze.hold("test") is True
    child = run_in_child(_child_state)
    assert child == {"enabled": True, "frozen": True, "held": False}
    assert gc.isenabled()
    assert not _gc_freeze.held()
    assert gc.get_freeze_count() > 0  # the parent froze before the fork


def test_fork_without_hooks_stays_held_until_the_server_hook() -> None:
    """A fork that ran no before-fork hook (uWSGI's, in C) leaves the child unfrozen and held.

    Its first collection would then write to everything the app built, so only the
    server's post-fork hook, which freezes first, gives the collector back.
    """
    assert _gc_freeze.hold("test") is True
    child = run_in_child(_child_state, hooks=False)
    assert child == {"enabled": False, "frozen": False, "held": True}
    _gc_freeze._after_fork_in_child()  # what py-call-osafterfork would run: unfrozen, held
    assert _gc_freeze.held()
    assert not gc.isenabled()
    assert _gc_freeze.freeze(None, "test") is True
    _gc_freeze._after_fork_in_child()
    assert gc.isenabled()
    assert not _gc_freeze.held()


def test_off_switch_set_after_hold_releases_before_the_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``FORKSAFE_GC_FREEZE=0`` set after `hold` (later in a config): no freeze, collector back."""
    assert _gc_freeze.hold("test") is True
    monkeypatch.setenv(_gc_freeze.ENV, "0")
    child = run_in_child(_child_state)
    assert child == {"enabled": True, "frozen": False, "held": False}
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_importing_the_gunicorn_hooks_elsewhere_holds_nothing() -> None:
    """forksafe.gunicorn imported outside gunicorn's config reader (here) leaves gc alone."""
    import forksafe.gunicorn

    assert forksafe.gunicorn.HELD_AT_IMPORT is False
    assert forksafe.gunicorn._read_by_gunicorn_config() is False
    assert gc.isenabled()
