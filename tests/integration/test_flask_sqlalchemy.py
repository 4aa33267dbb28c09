"""Flask-SQLAlchemy: the engine it makes, protected by ``track(db.engine)`` or by
``instrument()``, across a real fork, against the private MariaDB (general log)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "flask_sqlalchemy_fork.py"


def run(server: Any, mode: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--url", server.url(), "--mode", mode],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report: dict = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("mode", ["track", "instrument"])
def test_flask_sqlalchemy_worker_gets_its_own_session(mariadb: Any, mode: str) -> None:
    """The worker queries on a session of its own and its dispose() sends nothing on the
    parent's; without forksafe the worker reuses the parent's session and its dispose()
    ends it (``Quit``, the parent's next query 2013)."""
    bare = run(mariadb, "none")
    assert bare["child"]["id"] == bare["before_id"], "control: the worker had its own session"
    assert mariadb.quit_logged(bare["before_id"]), "control: the worker's dispose did not quit"
    assert "2013" in bare.get("error", ""), bare

    safe = run(mariadb, mode)
    assert "error" not in safe, safe
    assert "error" not in safe["child"], safe["child"]
    assert safe["child"]["id"] != safe["before_id"], safe
    assert safe["after_id"] == safe["before_id"], safe
    assert not mariadb.quit_logged(safe["before_id"]), "a Quit reached the parent's session"
    assert safe["internal_errors"] == [], safe
    assert safe["child"]["internal_errors"] == [], safe
