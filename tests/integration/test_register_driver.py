"""`forksafe.register_driver`: a driver forksafe does not ship, protected without a release.

``scripts/tiny_driver.py`` is a driver of our own (PostgreSQL's wire protocol over a plain
socket, ``Terminate`` on ``close()``) against the suite's private PostgreSQL. A forked child
closes the inherited connection; the server says whether the parent's session survived:

* not registered: ``track()`` refuses the connection and the child's ``close()`` ends the
  parent's session (the control);
* registered (how to find its socket, how to tell it is closed): the session survives, and
  `forksafe.connections` names it by the registered name;
* registered with a socket accessor that raises (an attribute renamed in a new release):
  forksafe cannot neutralise the socket, so the child's ``close()`` still reaches the
  server, but never silently: the child's ``forksafe.internal_errors()`` holds the error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).parent / "scripts" / "tiny_driver.py"


def run(postgres: Any, mode: str) -> dict[str, Any]:
    from forksafe.testing.postgres import DATABASE

    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(postgres.port), "--database", DATABASE,
         "--mode", mode],
        capture_output=True, text=True, timeout=90, check=False,
    )
    lines = done.stdout.strip().splitlines()
    why = f"scenario failed:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, why
    assert lines, why
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def test_unregistered_driver_is_refused_and_a_child_kills_the_session(postgres: Any) -> None:
    report = run(postgres, "none")
    assert report["tracked"] is False
    assert "TinyPG" in report["track_error"]
    assert report["names"] == []
    assert report["alive_on_server"] is False, report
    assert report["parent_error"] is not None, report


def test_registered_driver_is_protected(postgres: Any) -> None:
    report = run(postgres, "register")
    assert report["tracked"] is True
    assert report["names"] == ["tinypg"]
    assert report["alive_on_server"] is True, report
    assert report["parent_error"] is None, report
    assert report["after_id"] == report["parent_id"]
    assert report["child"]["internal_errors"] == [], report
    assert report["internal_errors"] == [], report
    # the neutralised socket refuses the child's goodbye
    assert "close_error" in report["child"], report


def test_an_accessor_that_raises_is_reported_not_taken_for_closed(postgres: Any) -> None:
    report = run(postgres, "raising")
    errors = report["child"]["internal_errors"]
    assert errors, report
    assert "_socket" in errors[0], report
    # forksafe could not find the socket: the harm happens, but it is reported
    assert report["alive_on_server"] is False, report
