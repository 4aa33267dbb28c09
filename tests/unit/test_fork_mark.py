"""The pid without a system call: a byte the kernel zeroes in every child.

`forksafe._state.fork_mark` reads 1 only in the process that last wrote ``OWN.pid``
(`own_pid`), whichever way a child was made: ``os.fork`` (hooks run) or libc's ``fork``
(no hook runs, as under uWSGI). A child that finds it still 1 with someone else's pid stops
trusting it, and every check asks ``os.getpid()``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from forksafe import _state
from tests.forking import libc_fork, run_in_child

pytestmark = pytest.mark.skipif(
    not isinstance(_state.fork_mark(), memoryview),
    reason="no MADV_WIPEONFORK here: every check asks os.getpid()",
)


def test_the_mark_is_one_object_that_reads_one_here() -> None:
    mark = _state.fork_mark()
    assert _state.fork_mark() is mark
    _state.own_pid()
    assert mark[0] == 1
    assert _state.OWN.pid == os.getpid()


@pytest.mark.parametrize("hooks", [True, False], ids=["os.fork", "libc fork"])
def test_a_child_reads_zero_until_it_asks_its_pid(hooks: bool) -> None:
    mark = _state.fork_mark()
    _state.own_pid()
    parent = os.getpid()

    def child() -> dict[str, Any]:
        seen = mark[0]
        stale = _state.OWN.pid == parent
        pid = _state.own_pid()
        return {"seen": seen, "stale_pid": stale, "own": pid == os.getpid(), "after": mark[0],
                "trusted": _state.OWN.trusted}

    result = run_in_child(child, hooks=hooks)
    assert result == {"seen": 0, "stale_pid": True, "own": True, "after": 1, "trusted": True}
    assert mark[0] == 1, "the parent's mark is its own"


def test_a_grandchild_reads_zero_too() -> None:
    mark = _state.fork_mark()
    _state.own_pid()

    def child() -> int:
        _state.own_pid()  # the child writes its own mark ...
        read, write = os.pipe()
        pid = libc_fork()
        if pid == 0:  # ... and its child (no hook) still finds it cleared
            os.write(write, bytes([mark[0]]))
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        seen = os.read(read, 1)[0]
        os.close(read)
        return seen

    assert run_in_child(child, hooks=False) == 0


def test_a_mark_the_kernel_did_not_clear_is_never_trusted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As if the kernel had ignored the advice: the child's reset finds the parent's 1."""
    mark = _state.fork_mark()
    _state.own_pid()

    def child() -> dict[str, Any]:
        mark[0] = 1  # what a kernel that ignored MADV_WIPEONFORK would leave
        _state.check_fork_mark()
        _state.own_pid()
        return {"trusted": _state.OWN.trusted, "mark": mark[0]}

    assert run_in_child(child, hooks=False) == {"trusted": False, "mark": 0}
    assert _state.OWN.trusted, "the parent is not affected"
    assert mark[0] == 1


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_the_kernel_lists_the_page_as_wiped_on_fork() -> None:
    """What fork_mark checked before trusting the page: 'wf' among its VmFlags."""
    assert b"wf" in _state.vm_flags(_state.fork_mark().obj)
