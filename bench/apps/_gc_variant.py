"""A collector variant the memory benchmark compares; imported first by the bench apps.

``BENCH_GC_COLLECT=1``: `at_end` runs ``gc.collect()`` once the app is loaded, just before
the server forks (and forksafe freezes the collector).
"""

from __future__ import annotations

import gc
import os


def at_end() -> None:
    """Run the collection ``BENCH_GC_COLLECT=1`` asks for (the app is loaded)."""
    if os.environ.get("BENCH_GC_COLLECT") == "1":
        gc.collect()
