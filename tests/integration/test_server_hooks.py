"""forksafe's gunicorn and uWSGI hooks inside the real servers.

Each server serves tests/integration/apps/hook_app.py, whose engine is used at import (so a
connection is open before the fork). The user's own post-fork hook is registered in every
way the integrations promise to respect; it writes one file per worker recording whether
forksafe's reset had already run there.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mirakuru import HTTPExecutor

from forksafe.testing.mariadb import free_port

pytestmark = [pytest.mark.mariadb, pytest.mark.servers]

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent


def hit(port: int, n: int = 40) -> list[dict]:
    """n concurrent requests; every response as JSON."""

    def one(_: int) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as resp:
            return json.loads(resp.read())

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def user_hook_files(hook_dir: Path) -> dict[int, int]:
    """pid -> forksafe resets seen by the user's hook in that worker."""
    return {int(p.name.split("-")[1]): int(p.read_text()) for p in hook_dir.glob("user-*")}


def wait_for_files(hook_dir: Path, count: int, timeout: float = 15.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        files = user_hook_files(hook_dir)
        if len(files) >= count or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


def wait_for_json(hook_dir: Path, prefix: str, count: int, timeout: float = 30.0) -> list[dict]:
    """The JSON files ``<prefix>-*`` once there are ``count`` of them (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(hook_dir.glob(f"{prefix}-*"))
        if len(found) >= count:
            return [json.loads(p.read_text()) for p in found]
        assert time.monotonic() < deadline, (
            f"only {len(found)} of {count} {prefix}-* files in {hook_dir} after {timeout:g} s"
        )
        time.sleep(0.05)


def wait_for_paths(paths: list[Path], timeout: float = 30.0) -> list[Path]:
    """The paths that exist once all do, or when ``timeout`` runs out (bounded wait)."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in paths if p.exists()]


def run_uwsgi(
    mariadb: Any,
    tmp_path: Path,
    setup: str,
    master: bool,
    *,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> tuple[Any, int]:
    port = free_port()
    command = [
        str(BIN / "uwsgi"),
        "--http-socket",
        f"127.0.0.1:{port}",
        "--wsgi-file",
        str(APPS / "hook_app.py"),
        "--callable",
        "application",
        "--processes",
        "4",
        "--need-app",
        "--disable-logging",
        "--die-on-term",
        *args,
    ]
    if master:
        command.append("--master")
    env = {
        **os.environ,
        "DB_URL": mariadb.url(),
        "HOOK_DIR": str(tmp_path),
        "HOOK_SETUP": setup,
        **(env or {}),
    }
    # Without a master, SIGINT to the process group ends every worker; uWSGI's original
    # process (worker 1) then exits with status 30.
    server = HTTPExecutor(
        command,
        url=f"http://127.0.0.1:{port}/",
        status="200",
        timeout=60,
        envvars=env,
        stop_signal=signal.SIGINT,
        expected_returncode=None if master else 30,
    )
    server.start()
    return server, port


UWSGI_SETUPS = [
    ("plain", True),
    ("plain", False),
    ("before", True),
    ("before", False),
    ("decorators_before", True),
    ("decorators_after", True),
]


@pytest.mark.parametrize(("setup", "master"), UWSGI_SETUPS)
def test_uwsgi_hook_runs_first_and_keeps_user_hooks(
    mariadb: Any, tmp_path: Path, setup: str, master: bool
) -> None:
    """In every uWSGI worker forksafe resets first, and the user's own hook still runs.

    Covers master and no master, and a user hook registered before forksafe.uwsgi (by hand or
    through uwsgidecorators) or after it (uwsgidecorators). Workers use their own sessions.
    """
    server, port = run_uwsgi(mariadb, tmp_path, setup, master)
    try:
        responses = hit(port)
        files = wait_for_files(tmp_path, 4) if setup != "plain" else {}
    finally:
        server.stop()
    parent_ids = {r["parent_cid"] for r in responses}
    assert len(parent_ids) == 1
    (parent_id,) = parent_ids
    for r in responses:
        assert r["internal_errors"] == []
        if r["resets"] == 0:
            # without master, worker 1 is the process that loaded the app: it owns the session
            assert not master
            assert r["cid"] == parent_id
        else:
            assert r["resets"] == 1
            assert r["cid"] != parent_id
    if setup != "plain":
        assert len(files) == 4, files
        forked = [resets for resets in files.values() if resets]
        assert len(forked) == (4 if master else 3), files  # worker 1 without master: no fork
        assert set(forked) == {1}


def test_uwsgi_hook_replaced_by_hand_is_backed_by_the_pid_check(
    mariadb: Any, tmp_path: Path
) -> None:
    """A hook assigned to uwsgi.post_fork_hook after forksafe.uwsgi replaces forksafe's.

    The pid check at checkout still resets each worker before its first query, so workers
    never share the parent's session.
    """
    server, port = run_uwsgi(mariadb, tmp_path, "manual_after", True)
    try:
        files = wait_for_files(tmp_path, 4)
        responses = hit(port)
    finally:
        server.stop()
    assert set(files.values()) == {0}, "forksafe's hook should have been replaced"
    for r in responses:
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]
        assert r["internal_errors"] == []


GUNICORN_CONF = """
import os
from forksafe.gunicorn import chain

preload_app = True
workers = 3
loglevel = "warning"

@chain
def post_fork(server, worker):
    from forksafe import _fork
    hook_dir = os.environ["HOOK_DIR"]
    partial = os.path.join(hook_dir, f".partial-user-{worker.pid}")
    with open(partial, "w") as fh:
        fh.write(str(_fork._STATE.resets))
    os.replace(partial, os.path.join(hook_dir, f"user-{worker.pid}"))
"""


def test_gunicorn_chained_post_fork(mariadb: Any, tmp_path: Path) -> None:
    """gunicorn accepts forksafe.gunicorn.chain(hook); every worker resets and runs the hook."""
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    env = {**os.environ, "DB_URL": mariadb.url(), "HOOK_DIR": str(hook_dir)}
    server = HTTPExecutor(
        [
            str(BIN / "gunicorn"),
            "-c",
            str(conf),
            "--bind",
            f"127.0.0.1:{port}",
            "--chdir",
            str(APPS),
            "hook_app:application",
        ],
        url=f"http://127.0.0.1:{port}/",
        status="200",
        timeout=60,
        envvars=env,
    )
    server.start()
    try:
        responses = hit(port)
        files = wait_for_files(hook_dir, 3)
    finally:
        server.stop()
    assert len(files) == 3
    assert set(files.values()) == {1}
    for r in responses:
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]


def _hook_two(server, worker): ...  # type: ignore[no-untyped-def]
def _hook_extra_default(server, worker, extra=None): ...  # type: ignore[no-untyped-def]
def _hook_one(worker): ...  # type: ignore[no-untyped-def]
def _hook_varargs(*args): ...  # type: ignore[no-untyped-def]
def _hook_server_varargs(server, *args): ...  # type: ignore[no-untyped-def]
def _hook_keyword_only(server, worker, *, extra=None): ...  # type: ignore[no-untyped-def]
def _hook_kwargs(server, worker, **kwargs): ...  # type: ignore[no-untyped-def]
def _hook_three(server, worker, extra): ...  # type: ignore[no-untyped-def]


class _Hooks:
    def method(self, server, worker): ...  # type: ignore[no-untyped-def]
    def method_extra(self, server, worker, extra=None): ...  # type: ignore[no-untyped-def]


HOOK_SHAPES = {
    "(server, worker)": _hook_two,
    "(server, worker, extra=None)": _hook_extra_default,
    "(worker)": _hook_one,
    "(*args)": _hook_varargs,
    "(server, *args)": _hook_server_varargs,
    "(server, worker, *, extra=None)": _hook_keyword_only,
    "(server, worker, **kwargs)": _hook_kwargs,
    "(server, worker, extra)": _hook_three,
    "bound method (server, worker)": _Hooks().method,
    "bound method (server, worker, extra=None)": _Hooks().method_extra,
    "partial": functools.partial(_hook_three, "fixed"),
    "lambda s, w": lambda s, w: None,
}


@pytest.mark.parametrize("shape", sorted(HOOK_SHAPES))
@pytest.mark.parametrize("setting", ["post_fork", "pre_fork"])
def test_gunicorn_chain_accepts_exactly_what_gunicorn_accepts(shape: str, setting: str) -> None:
    """chain() and chain_pre_fork() follow gunicorn's own arity check, case for case.

    gunicorn counts every positional parameter, those with defaults included, so it rejects
    ``(server, worker, extra=None)``: chain() must reject it at once, with the fix, instead
    of handing gunicorn a hook it refuses at start-up. Whatever chain() returns, gunicorn
    accepts.
    """
    from gunicorn.config import validate_callable

    import forksafe.gunicorn

    hook = HOOK_SHAPES[shape]
    wrap = forksafe.gunicorn.chain if setting == "post_fork" else forksafe.gunicorn.chain_pre_fork
    try:
        validate_callable(2)(hook)
    except TypeError:
        gunicorn_accepts = False
    else:
        gunicorn_accepts = True
    if gunicorn_accepts:
        chained = wrap(hook)
        assert validate_callable(2)(chained) is chained
    else:
        with pytest.raises(TypeError, match=rf"exactly \(server, worker\).*def {setting}"):
            wrap(hook)


def test_gunicorn_accepts_forksafe_hooks() -> None:
    """gunicorn's validator accepts forksafe's own hooks; chain() refuses a non-callable."""
    from gunicorn.config import validate_callable

    from forksafe.gunicorn import chain, post_fork, pre_fork

    assert validate_callable(2)(post_fork) is post_fork
    assert validate_callable(2)(pre_fork) is pre_fork
    with pytest.raises(TypeError, match="needs a function"):
        chain("not a function")  # type: ignore[arg-type]


def test_forksafe_uwsgi_outside_uwsgi_says_what_to_do() -> None:
    """Importing forksafe.uwsgi outside uWSGI is an ImportError that points to the fix."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", "import forksafe.uwsgi"], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "only works inside a uWSGI worker" in done.stderr
    assert "forksafe.gunicorn" in done.stderr


# --- the garbage collector freeze ------------------------------------------------------


@pytest.mark.parametrize("freeze", ["on", "off"])
def test_uwsgi_freezes_the_collector_first_in_every_worker(
    mariadb: Any, tmp_path: Path, freeze: str
) -> None:
    """uWSGI: every worker freezes once, before the app's own post-fork hooks run.

    The list the app created at import (in the master) is frozen in every worker that
    answers. ``FORKSAFE_GC_FREEZE=0`` turns it off: nothing is frozen.
    """
    env = {"FORKSAFE_GC_FREEZE": "0"} if freeze == "off" else {}
    server, port = run_uwsgi(mariadb, tmp_path, "decorators_after", True, env=env)
    try:
        responses = hit(port)
        states = wait_for_json(tmp_path, "ufreeze", 4)
        master = server.process.pid
    finally:
        server.stop()
    assert {s["ppid"] for s in states} == {master}, states  # forked workers, one master
    for r in responses:
        assert r["internal_errors"] == []
        assert r["import_objects_frozen"] is (freeze == "on"), r
    if freeze == "on":
        # the user's hook (after forksafe's) finds the worker frozen, by one forksafe freeze
        assert all(s["freezes"] == 1 and s["frozen"] > 0 for s in states), states
    else:
        assert all(s["freezes"] == 0 and s["frozen"] == 0 for s in states), states


def test_uwsgi_freeze_failure_never_reaches_the_server(mariadb: Any, tmp_path: Path) -> None:
    """A raising ``gc.freeze`` is reported as forksafe's internal error; uWSGI serves on.

    The reset and the user's own hook still run in every worker.
    """
    server, port = run_uwsgi(
        mariadb, tmp_path, "decorators_after", True, env={"HOOK_BREAK_FREEZE": "1"}
    )
    try:
        responses = hit(port)
        files = wait_for_files(tmp_path, 4)
    finally:
        server.stop()
    assert set(files.values()) == {1}, files  # reset done before the user's hook
    for r in responses:
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]
        assert any("broken on purpose" in e for e in r["internal_errors"]), r
        assert r["import_objects_frozen"] is False
        assert r["gc_enabled"] is True  # the freeze never turns collection off


def test_uwsgi_keeps_a_collector_the_app_disabled(mariadb: Any, tmp_path: Path) -> None:
    """An app that disabled the collector keeps it off in every worker (forksafe never
    enables it); the workers still freeze."""
    server, port = run_uwsgi(
        mariadb, tmp_path, "decorators_after", True, env={"HOOK_GC_DISABLE": "1"}
    )
    try:
        responses = hit(port)
        states = wait_for_json(tmp_path, "ufreeze", 4)
    finally:
        server.stop()
    for r in responses:
        assert r["internal_errors"] == []
        assert (r["gc_at_import"], r["gc_enabled"]) == (False, False), r
        assert r["import_objects_frozen"] is True, r
    assert all(s["enabled"] is False and s["frozen"] > 0 for s in states), states


GUNICORN_FREEZE_CONF = """
import gc, json, os
from forksafe.gunicorn import chain, chain_pre_fork

preload_app = True
workers = 3
loglevel = "warning"
graceful_timeout = 5


def _record(tag, worker):
    from forksafe import _gc_freeze

    hook_dir = os.environ["HOOK_DIR"]
    state = {"pid": os.getpid(), "ppid": os.getppid(), "age": worker.age,
             "freezes": _gc_freeze.freezes(), "frozen": gc.get_freeze_count(),
             "enabled": gc.isenabled()}
    partial = os.path.join(hook_dir, f".partial-{tag}-{worker.age}")
    with open(partial, "w") as fh:
        json.dump(state, fh)
    os.replace(partial, os.path.join(hook_dir, f"{tag}-{worker.age:03d}"))


@chain_pre_fork
def pre_fork(server, worker):
    _record("pre", worker)


@chain
def post_fork(server, worker):
    _record("post", worker)
"""


def start_gunicorn(
    mariadb: Any, tmp_path: Path, conf_text: str, env: dict[str, str] | None = None
) -> tuple[Any, int, Path]:
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(conf_text)
    port = free_port()
    server = HTTPExecutor(
        [str(BIN / "gunicorn"), "-c", str(conf), "--bind", f"127.0.0.1:{port}",
         "--chdir", str(APPS), "hook_app:application"],
        url=f"http://127.0.0.1:{port}/", status="200", timeout=60,
        envvars={**os.environ, "DB_URL": mariadb.url(), "HOOK_DIR": str(hook_dir),
                 **(env or {})},
    )  # fmt: skip
    server.start()
    return server, port, hook_dir


def test_gunicorn_freezes_in_the_master_once_per_generation(mariadb: Any, tmp_path: Path) -> None:
    """gunicorn: ``pre_fork`` freezes in the master before the first fork of a generation.

    The three workers of the first generation fork from one freeze; a respawned worker
    (one killed) forks from the same one; a reload (HUP) starts a new generation, frozen
    once more. Every worker finds itself frozen at ``post_fork``, and the app's import-time
    objects are frozen where requests run.
    """
    server, port, hook_dir = start_gunicorn(mariadb, tmp_path, GUNICORN_FREEZE_CONF)
    master = server.process.pid
    try:
        first = wait_for_json(hook_dir, "post", 3)
        responses = hit(port)
        os.kill(first[0]["pid"], signal.SIGKILL)  # gunicorn respawns it: same generation
        respawned = wait_for_json(hook_dir, "post", 4)
        os.kill(master, signal.SIGHUP)  # reload: three new workers, a new generation
        reloaded = wait_for_json(hook_dir, "post", 7)
        pre = wait_for_json(hook_dir, "pre", 7)
        answers_after_reload = hit(port, 8)
    finally:
        server.stop()
    # the freeze ran in the master (pid), before each fork; the count is the generation
    assert [(s["pid"], s["age"], s["freezes"]) for s in pre] == [
        (master, 1, 1), (master, 2, 1), (master, 3, 1),  # first generation: one freeze
        (master, 4, 1),  # respawn after a worker died: no new freeze
        (master, 5, 2), (master, 6, 2), (master, 7, 2),  # after HUP: one more
    ], pre  # fmt: skip
    assert all(s["frozen"] > 0 for s in pre)
    assert all(s["enabled"] is True for s in pre), pre  # freezing never turns collection off
    post = {s["age"]: s for s in reloaded}
    assert all(s["ppid"] == master and s["frozen"] > 0 for s in post.values()), post
    assert all(s["enabled"] is True for s in post.values()), post  # on in every worker
    assert [post[a]["freezes"] for a in sorted(post)] == [1, 1, 1, 1, 2, 2, 2], post
    assert len(respawned) == 4
    for r in responses + answers_after_reload:
        assert r["internal_errors"] == []
        assert r["import_objects_frozen"] is True, r
        assert r["cid"] != r["parent_cid"]
        assert (r["gc_at_import"], r["gc_enabled"]) == (True, True), r


def test_gunicorn_freeze_off(mariadb: Any, tmp_path: Path) -> None:
    """``FORKSAFE_GC_FREEZE=0``: neither hook freezes; connections are still reset."""
    server, port, hook_dir = start_gunicorn(
        mariadb, tmp_path, GUNICORN_FREEZE_CONF, env={"FORKSAFE_GC_FREEZE": "0"}
    )
    try:
        post = wait_for_json(hook_dir, "post", 3)
        responses = hit(port)
    finally:
        server.stop()
    assert all(s["freezes"] == 0 and s["frozen"] == 0 for s in post), post
    assert all(s["enabled"] is True for s in post), post
    pre = wait_for_json(hook_dir, "pre", 3)
    assert all(s["enabled"] is True for s in pre), pre
    for r in responses:
        assert r["import_objects_frozen"] is False
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]
        assert r["internal_errors"] == []
        assert (r["gc_at_import"], r["gc_enabled"]) == (True, True), r


def test_gunicorn_keeps_a_collector_the_user_disabled(mariadb: Any, tmp_path: Path) -> None:
    """A config that disables the collector keeps it off in the master and in every worker
    (forksafe never enables it); the freeze still happens."""
    conf = "import gc\ngc.disable()\n" + GUNICORN_FREEZE_CONF
    server, port, hook_dir = start_gunicorn(mariadb, tmp_path, conf)
    try:
        post = wait_for_json(hook_dir, "post", 3)
        responses = hit(port)
        pre = wait_for_json(hook_dir, "pre", 3)
    finally:
        server.stop()
    assert all(s["enabled"] is False for s in pre + post), (pre, post)
    assert all(s["frozen"] > 0 for s in post), post
    for r in responses:
        assert r["internal_errors"] == []
        assert (r["gc_at_import"], r["gc_enabled"]) == (False, False), r
        assert r["import_objects_frozen"] is True, r


def test_gunicorn_post_fork_alone_freezes_in_the_worker(mariadb: Any, tmp_path: Path) -> None:
    """A config with only ``post_fork`` (no ``pre_fork``) still freezes, in each worker."""
    conf = "preload_app = True\nworkers = 2\nfrom forksafe.gunicorn import post_fork\n"
    server, port, _ = start_gunicorn(mariadb, tmp_path, conf)
    try:
        responses = hit(port)
    finally:
        server.stop()
    for r in responses:
        assert r["import_objects_frozen"] is True, r
        assert r["frozen"] > 0, r
        assert r["internal_errors"] == []


def test_gunicorn_freeze_failure_never_reaches_the_server(mariadb: Any, tmp_path: Path) -> None:
    """A raising ``gc.freeze`` is reported as forksafe's internal error; gunicorn serves on."""
    conf = (
        "import gc\n"
        "def _broken():\n"
        "    raise RuntimeError('gc.freeze is broken on purpose')\n"
        "gc.freeze = _broken\n" + GUNICORN_FREEZE_CONF
    )
    server, port, hook_dir = start_gunicorn(mariadb, tmp_path, conf)
    try:
        post = wait_for_json(hook_dir, "post", 3)
        responses = hit(port)
    finally:
        server.stop()
    assert all(s["frozen"] == 0 for s in post)
    assert all(s["enabled"] is True for s in post), post
    for r in responses:
        assert r["resets"] == 1
        assert r["cid"] != r["parent_cid"]
        assert any("broken on purpose" in e for e in r["internal_errors"]), r
        assert (r["gc_at_import"], r["gc_enabled"]) == (True, True), r


# --- the app's own uWSGI handlers ------------------------------------------------------


@pytest.mark.parametrize("setup", ["handlers_before", "handlers_after"])
def test_uwsgi_keeps_the_apps_spooler_and_mule_handlers(
    mariadb: Any, tmp_path: Path, setup: str
) -> None:
    """``uwsgi.spooler`` and ``uwsgi.mule_msg_hook`` set by the app survive forksafe.uwsgi.

    forksafe.uwsgi imports uwsgidecorators, which sets both; handlers the app set before
    (or after) must still receive the spooled job and the mule message.
    """
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    server, port = run_uwsgi(
        mariadb, tmp_path, setup, True, args=("--spooler", str(spool_dir), "--mule")
    )
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/spool?job1", timeout=20) as resp:
            assert resp.read() == b"spooled"
        wanted = [tmp_path / "spooled-job1", tmp_path / "mule-job1"]
        arrived = wait_for_paths(wanted)
    finally:
        server.stop()
    assert arrived == wanted, f"the app's handlers got only {arrived}"
