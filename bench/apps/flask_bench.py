"""The Flask example (examples/flask_app) plus ``GET /_pid`` and an ``X-Pid`` header.

Importing this module imports the example, exactly as its own configs do: in the master
before the fork (gunicorn ``preload_app``, uWSGI without ``lazy-apps``) or in every worker
(lazy). ``/_pid?hold=SECONDS`` answers the worker's pid after holding it that long (at most
0.2 s), so that concurrent requests reach every worker; every response carries ``X-Pid``;
everything else goes to the example. The example reads ``DATABASE_URL`` and the
``BENCH_POOL`` / ``BENCH_FORKSAFE`` knobs, and warms itself up at import (in the master,
when preloaded) unless ``WARM_UP=0``; bench/apps/_gc_variant.py holds a collector variant.
"""

from __future__ import annotations

import _gc_variant  # first, before anything else is imported

# isort: split

from _pid import with_pid
from app import app as example  # examples/flask_app/app.py (the server's chdir)

__all__ = ["application"]

application = with_pid(example)

_gc_variant.at_end()
