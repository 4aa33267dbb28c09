"""Collector variants the memory benchmark compares; imported first by the bench apps.

* ``BENCH_GC_ENABLE=1``: enable the collector again at once, undoing the ``gc.disable()``
  that forksafe's server hooks do in the master while the app loads (forksafe's behaviour
  before it did so: ``gc.freeze()`` only);
* ``BENCH_GC_COLLECT=1``: `at_end` runs ``gc.collect()`` once the app is loaded, just
  before the server forks (and forksafe freezes).
"""

from __future__ import annotations

import gc
import os

if os.environ.get("BENCH_GC_ENABLE") == "1":
    gc.enable()


def at_end() -> None:
    """Run the collection ``BENCH_GC_COLLECT=1`` asks for (the app is loaded)."""
    if os.environ.get("BENCH_GC_COLLECT") == "1":
        gc.collect()
