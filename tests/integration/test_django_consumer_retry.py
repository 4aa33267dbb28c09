"""The README's consumer recipe that loses no message when the connection dies.

``unit_of_work()`` replaces a connection that sat idle past the server's limit, but a
connection that was used a moment ago is handed out unchecked (that is what keeps it
cheap); when the server kills it (KILL, restart, failover) right then, the next message
fails. ``retry_on_disconnect`` around ``transaction.atomic()`` inside the loop runs that
message again on a new connection: nothing is lost, at the cost of one rerun.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.mariadb]

SCRIPT = Path(__file__).parent / "scripts" / "django_consumer_kill.py"
WAIT = 60.0  # bound on any one reply; the run is not timed


def reply(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + WAIT
        while not sel.select(timeout=1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                stderr = proc.stderr.read() if proc.stderr else ""
                pytest.fail(f"the consumer gave no answer (exit {proc.poll()}): {stderr[-2000:]}")
    line = proc.stdout.readline()
    assert line, "the consumer closed its output"
    return dict(json.loads(line))


def consume_with_a_kill(mariadb: Any, mode: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Message 1, KILL the consumer's session, message 2, message 3."""
    table = f"consumed_{mode}_{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port", str(mariadb.port), "--mode", mode,
         "--table", table],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None
    try:
        assert reply(proc) == {"ready": True}
        replies = []
        for n in (1, 2, 3):
            proc.stdin.write(f"{n}\n")
            proc.stdin.flush()
            replies.append(reply(proc))
            if n == 1:
                mariadb.execute(f"KILL CONNECTION {replies[0]['connection_id']}")
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = [int(r[0]) for r in mariadb.execute(f"SELECT n FROM forksafe.{table} ORDER BY n")]
    return replies, rows


def test_unit_of_work_alone_loses_the_message_after_a_kill(mariadb: Any) -> None:
    """The control: the message after the kill fails and is not stored."""
    replies, rows = consume_with_a_kill(mariadb, "unit")
    assert "error" in replies[1], replies
    assert [r["attempts"] for r in replies] == [0, 0, 0]  # no retry in this mode
    assert "2013" in replies[1]["error"] or "2006" in replies[1]["error"], replies
    assert rows == [1, 3], (rows, replies)


def test_retry_around_atomic_loses_nothing(mariadb: Any) -> None:
    """retry_on_disconnect around atomic(): every message stored once; the one after the
    kill took two attempts, on a new connection."""
    replies, rows = consume_with_a_kill(mariadb, "retry")
    assert rows == [1, 2, 3], (rows, replies)
    assert [r.get("error") for r in replies] == [None, None, None], replies
    assert [r["attempts"] for r in replies] == [1, 2, 1], replies
    assert replies[1]["connection_id"] != replies[0]["connection_id"], replies
