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
        result = run_in_child(lambda: {
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
