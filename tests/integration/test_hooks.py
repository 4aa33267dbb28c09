"""Every way forksafe learns of a fork, in real forked processes against the private MariaDB.

os.fork (at-fork hook), several hooks on one fork, a fork no hook saw (libc fork(), as under
uWSGI without forksafe.uwsgi: caught by the pid check at checkout), multiprocessing with the
fork start method, ProcessLocal, and fork-time failures that must not raise.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest
from sqlalchemy import create_engine

import forksafe
from forksafe import _fork
from forksafe._registry import REGISTRY
from forksafe.gunicorn import post_fork
from tests.forking import run_in_child
from tests.integration._liveness import session_id

pytestmark = [pytest.mark.mariadb]


@pytest.fixture
def engine(mariadb: Any) -> Any:
    """A tracked engine with one connection open (idle in its pool) before any fork."""
    eng = forksafe.track(create_engine(mariadb.url(), pool_size=2))
    session_id(eng)
    yield eng
    forksafe.untrack(eng)
    eng.dispose()


def test_several_hooks_on_one_fork_reset_once(engine: Any) -> None:
    """os.fork's hook resets the child; gunicorn's post_fork and after_fork() then do nothing."""
    pool_before = id(engine.pool)

    def child() -> dict:
        resets_after_hook = _fork._STATE.resets
        post_fork(None, None)
        again = forksafe.after_fork()
        session_id(engine)  # the fresh pool replaces the inherited one at first checkout
        pool_after_hook = id(engine.pool)
        post_fork(None, None)
        forksafe.after_fork()
        session_id(engine)
        return {
            "pool_changed": pool_after_hook != pool_before,
            "resets": resets_after_hook,
            "resets_end": _fork._STATE.resets,
            "again": again,
            "pool_same_after_more_hooks": id(engine.pool) == pool_after_hook,
        }

    result = run_in_child(child)
    assert result == {
        "pool_changed": True,
        "resets": _fork._STATE.resets + 1,
        "resets_end": _fork._STATE.resets + 1,
        "again": False,
        "pool_same_after_more_hooks": True,
    }


def test_fork_no_hook_saw_is_caught_at_checkout(mariadb: Any, engine: Any) -> None:
    """After a libc fork() (no Python hook runs), the first checkout resets and reconnects.

    The child gets a session of its own and the parent's session never receives a Quit.
    """
    parent_id = session_id(engine)

    def child() -> dict:
        before = _fork._STATE.resets
        cid = session_id(engine)
        return {"cid": cid, "reset_by_checkout": _fork._STATE.resets - before}

    result = run_in_child(child, hooks=False)
    assert result["reset_by_checkout"] == 1
    assert result["cid"] != parent_id
    assert session_id(engine) == parent_id
    assert not mariadb.quit_logged(parent_id)


def test_fork_no_hook_saw_damages_an_untracked_engine(mariadb: Any) -> None:
    """The same libc fork with an untracked engine: the child reuses the parent's session."""
    eng = create_engine(mariadb.url(), pool_size=2)
    parent_id = session_id(eng)
    result = run_in_child(lambda: session_id(eng), hooks=False)
    assert result == parent_id
    eng.dispose()


def test_after_fork_resets_a_child_that_no_hook_saw(mariadb: Any) -> None:
    """forksafe.after_fork() is the manual hook: it neutralises tracked raw connections."""
    conn = forksafe.track(mariadb.connect())
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (parent_id,) = cur.fetchone()

    def child() -> dict:
        did = forksafe.after_fork()
        try:
            conn.cursor().execute("SELECT 1")
            error = ""
        except Exception as exc:
            error = str(exc)
        conn.close()  # would send COM_QUIT on the parent's session without the reset
        return {"did": did, "error": error}

    result = run_in_child(child, hooks=False)
    assert result["did"] is True
    assert "2006" in result["error"]
    cur.execute("SELECT CONNECTION_ID()")
    assert cur.fetchone()[0] == parent_id
    assert not mariadb.quit_logged(parent_id)
    forksafe.untrack(conn)
    conn.close()


def _worker_connection_id(url: str) -> tuple[int, int]:
    return os.getpid(), session_id(_MP_ENGINE[url])


_MP_ENGINE: dict[str, Any] = {}


def test_multiprocessing_fork_pool_workers_get_their_own_sessions(mariadb: Any) -> None:
    """multiprocessing.Pool (fork) workers each use a session of their own; the parent's lives."""
    url = mariadb.url()
    eng = forksafe.track(create_engine(url, pool_size=2))
    _MP_ENGINE[url] = eng
    parent_id = session_id(eng)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.map(_worker_connection_id, [url] * 30)
    by_pid: dict[int, set[int]] = {}
    for pid, cid in results:
        by_pid.setdefault(pid, set()).add(cid)
    all_ids = set().union(*by_pid.values())
    assert parent_id not in all_ids
    for pid, ids in by_pid.items():
        assert not ids & set().union(*(v for p, v in by_pid.items() if p != pid))
    assert session_id(eng) == parent_id
    assert not mariadb.quit_logged(parent_id)
    forksafe.untrack(eng)
    eng.dispose()


def test_process_local_opens_one_connection_per_process(mariadb: Any) -> None:
    """ProcessLocal: same object within a process, a new one (new session) in a child."""
    db = forksafe.ProcessLocal(mariadb.connect)
    first = db.get()
    assert db.get() is first
    assert db() is first

    def ident(conn: Any) -> int:
        cur = conn.cursor()
        cur.execute("SELECT CONNECTION_ID()")
        return int(cur.fetchone()[0])

    parent_id = ident(first)
    for hooks in (True, False):
        child_id = run_in_child(lambda: ident(db.get()), hooks=hooks)
        assert child_id != parent_id
    assert ident(db.get()) == parent_id
    assert not mariadb.quit_logged(parent_id)
    db.close()
    assert db.get() is not first
    db.close()


def test_process_local_per_thread(mariadb: Any) -> None:
    """ProcessLocal(per_thread=True) gives each thread its own object."""
    import threading

    db = forksafe.ProcessLocal(mariadb.connect, per_thread=True)
    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(db.get())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 3
    for conn in seen:
        forksafe.untrack(conn)
        conn.close()


def test_process_local_needs_a_callable() -> None:
    """A ProcessLocal of something that is not a factory is refused with the fix."""
    with pytest.raises(TypeError, match="pass a function"):
        forksafe.ProcessLocal("mysql://db")  # type: ignore[arg-type]


class _ExplodingAdapter:
    def reset_in_child(self) -> None:
        raise RuntimeError("boom")

    def detach(self) -> None:
        pass


def test_fork_time_failures_are_logged_not_raised(engine: Any) -> None:
    """A failing reset step is reported through internal_errors(); the child carries on."""
    anchor = type("Anchor", (), {})()
    REGISTRY.add_engine(anchor, _ExplodingAdapter())
    try:

        def child() -> dict:
            return {
                "errors": [repr(e) for e in forksafe.internal_errors()],
                "cid": session_id(engine),  # the other engine was still reset
            }

        result = run_in_child(child, allow_internal_errors=True)
    finally:
        REGISTRY.pop_engine(anchor)
    assert any("boom" in e for e in result["errors"])
    assert isinstance(result["cid"], int)
