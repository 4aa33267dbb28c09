"""Run a function in a forked child from inside a test, and get its result back.

The child never returns into pytest: whatever happens, it leaves through ``os._exit``.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

LIBC = ctypes.CDLL(None, use_errno=True)


def libc_fork() -> int:
    """fork(2) straight from libc: no Python at-fork hook runs, as under uWSGI."""
    pid = int(LIBC.fork())
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid


def run_in_child(
    fn: Callable[[], Any], *, timeout: float = 30.0, hooks: bool = True
) -> Any:
    """Fork, run ``fn()`` in the child, return its JSON-able result in the parent.

    Args:
        fn: what the child does; its return value must be JSON-serialisable.
        timeout: seconds before the child is killed and the test fails.
        hooks: fork with ``os.fork`` (Python's at-fork hooks run) or, if False, with libc's
            ``fork`` (no hook runs: a fork forksafe can only notice by its pid check).

    Raises:
        AssertionError: the child raised (its traceback is in the message) or timed out.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork() if hooks else libc_fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(read_fd)
            try:
                payload = {"ok": fn()}
            except BaseException:
                payload = {"error": traceback.format_exc()}
                status = 1
            os.write(write_fd, json.dumps(payload).encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"child did not finish within {timeout}s")
        time.sleep(0.01)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    result = json.loads(data or b'{"error": "child wrote nothing"}')
    if "error" in result:
        raise AssertionError(f"child failed:\n{result['error']}")
    return result["ok"]
