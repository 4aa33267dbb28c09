"""Django's non-HTTP worker: a consumer loop idles longer than the server's wait_timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "django_consumer.py"


def test_consumer_loop_survives_wait_timeout(short_timeout: Any) -> None:
    """With wait_timeout=2 and 3 s between messages, a consumer using unit_of_work() answers
    every message (persistent connections, CONN_MAX_AGE=600); without any handling, and with
    Django's close_old_connections() alone, messages after a gap fail with 2006 (Django's
    helper drops the dead connection only after it has failed once)."""
    procs = {
        mode: subprocess.Popen(
            [sys.executable, str(SCRIPT), "--port", str(short_timeout.port), "--mode", mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for mode in ("plain", "django", "forksafe")
    }
    results = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        results[mode] = json.loads(out.strip().splitlines()[-1])
    assert results["forksafe"]["errors"] == []
    assert results["forksafe"]["answers"] == [True, True, True]
    assert len(results["plain"]["errors"]) == 2, results["plain"]
    for mode in ("plain", "django"):
        assert len(results[mode]["errors"]) >= 1, results[mode]
        assert all("2006" in e or "2013" in e for e in results[mode]["errors"]), results[mode]
