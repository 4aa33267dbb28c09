"""``GET /_pid?hold=SECONDS``: the worker's pid, after holding the request that long.

Shared by the benchmark apps: holding each request (at most 0.2 s) makes concurrent requests
spread over every worker, so a benchmark can wait until all of them answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

__all__ = ["answer_pid"]


def answer_pid(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes] | None:
    """The ``/_pid`` response, or None when the request is for something else."""
    if environ.get("PATH_INFO") != "/_pid":
        return None
    hold = parse_qs(environ.get("QUERY_STRING", "")).get("hold", ["0"])[0]
    time.sleep(min(max(float(hold), 0.0), 0.2))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
