"""forksafe._fork's after-fork callbacks: run in the child, after the reset, never raising."""

from __future__ import annotations

import os

from forksafe import _fork
from tests.forking import run_in_child


def test_callbacks_run_in_child_and_a_failing_one_is_contained() -> None:
    """A raising callback is reported, not raised, and the callbacks after it still run;
    nothing runs in the parent."""
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("callback failure")

    def good() -> None:
        ran.append(f"good in {os.getpid()}")

    _fork.register_child_callback(boom)
    _fork.register_child_callback(good)
    _fork.register_child_callback(good)  # twice is a no-op
    try:
        result = run_in_child(allow_internal_errors=True, fn=lambda: {
            "ran": ran,
            "pid": os.getpid(),
            "errors": [repr(e) for e in _fork.internal_errors()],
        })
    finally:
        assert _fork.unregister_child_callback(boom)
        assert _fork.unregister_child_callback(good)
        assert not _fork.unregister_child_callback(good)
    assert result["ran"] == [f"good in {result['pid']}"]
    assert any("callback failure" in e for e in result["errors"])
    assert ran == []


def test_before_reset_callbacks_run_first_and_each_phase_unregisters_its_own() -> None:
    """BEFORE_RESET callbacks run before AFTER_RESET ones in the child; unregistering looks
    only in the phase named, so a callback is not removed from the other phase."""
    order: list[str] = []

    def before() -> None:
        order.append("before")

    def after() -> None:
        order.append("after")

    _fork.register_child_callback(after)
    _fork.register_child_callback(before, phase=_fork.BEFORE_RESET)
    try:
        result = run_in_child(lambda: order)
    finally:
        assert not _fork.unregister_child_callback(before)  # not an after-reset callback
        assert _fork.unregister_child_callback(before, phase=_fork.BEFORE_RESET)
        assert _fork.unregister_child_callback(after, phase=_fork.AFTER_RESET)
    assert result == ["before", "after"]
    assert order == []
