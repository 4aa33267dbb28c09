"""Run a function in a forked child from inside a test, and get its result back.

The child never returns into pytest: whatever happens, it leaves through ``os._exit``.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
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
    fn: Callable[[], Any],
    *,
    timeout: float = 30.0,
    hooks: bool = True,
    allow_internal_errors: bool = False,
) -> Any:
    """Fork, run ``fn()`` in the child, return its JSON-able result in the parent.

    Args:
        fn: what the child does; its return value must be JSON-serialisable.
        timeout: seconds before the child is killed and the test fails.
        hooks: fork with ``os.fork`` (Python's at-fork hooks run) or, if False, with libc's
            ``fork`` (no hook runs: a fork forksafe can only notice by its pid check).
        allow_internal_errors: by default the child fails if forksafe reported an internal
            error in it (`forksafe.internal_errors`, as the parent's tests assert); True for
            tests that provoke one and look at it themselves.

    Raises:
        AssertionError: the child raised (its traceback is in the message), reported an
            internal error, or did not finish within ``timeout`` seconds.
    """
    import forksafe

    errors_before = len(forksafe.internal_errors())
    read_fd, write_fd = os.pipe()
    pid = os.fork() if hooks else libc_fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(read_fd)
            try:
                payload = {"ok": fn()}
                errors = forksafe.internal_errors()[errors_before:]
                if errors and not allow_internal_errors:
                    raise AssertionError(f"forksafe reported internal errors in the child: "
                                         f"{errors!r}")
            except BaseException:
                payload = {"error": traceback.format_exc()}
                status = 1
            os.write(write_fd, json.dumps(payload).encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:  # read until the child's end closes (it exits), within the deadline
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(remaining, 0))
            if not ready:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError(f"child did not finish within {timeout}s")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    os.waitpid(pid, 0)
    data = b"".join(chunks)
    result = json.loads(data or b'{"error": "child wrote nothing"}')
    if "error" in result:
        raise AssertionError(f"child failed:\n{result['error']}")
    return result["ok"]
