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


@pytest.fixture(autouse=True)
def _unfrozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts unfrozen with a fresh state, and leaves the collector unfrozen."""
    gc.unfreeze()
    monkeypatch.setattr(_gc_freeze, "_STATE", _gc_freeze._State())
    monkeypatch.delenv(_gc_freeze.ENV, raising=False)
    yield
    gc.unfreeze()


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
