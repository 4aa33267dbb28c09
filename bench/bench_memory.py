"""Memory of preload + forksafe against lazy loading: fresh, and after traffic.

For each server (gunicorn, uWSGI) and app (the Flask example; a heavier app that imports
more, bench/apps/heavy_app.py), starts the server with 8 workers (``--workers``) once per
mode:

* **lazy**: every worker loads the app itself after the fork (gunicorn without
  ``preload_app``; uWSGI ``--lazy-apps``), no forksafe: what users do to avoid sharing;
* **preload + forksafe, no freeze**: the app loads once in the master, then the workers
  fork (gunicorn ``preload_app = True`` with ``from forksafe.gunicorn import post_fork,
  pre_fork``; uWSGI without ``lazy-apps``, ``--import forksafe.uwsgi``), the engine tracked
  by forksafe, ``FORKSAFE_GC_FREEZE=0``;
* **preload + forksafe**: the same with forksafe's defaults: its hooks ``gc.freeze()``
  before the workers' first collection (see forksafe/_gc_freeze.py);
* ``--modes`` adds, not in the default run: **collect** (``gc.collect()`` once the app is
  loaded, just before the freeze, ``BENCH_GC_COLLECT=1``, see bench/apps/_gc_variant.py)
  and **warm-up** (the app also answers a few requests in the master before the fork: the
  Flask example as it ships, ``WARM_UP=1``; the heavier app with ``BENCH_WARMUP=1``). The
  other modes run the Flask example with ``WARM_UP=0``.

Each server is measured fresh (every worker has answered one request), then after ``wrk``
has sent about 800 and then 4,000 requests per worker (``--points``) to an endpoint that
queries the database through SQLAlchemy: the Flask example's ``/products/<id>.json``, the
heavier app's ``/items/<id>`` (ORM ``Session``). Every response names its worker's pid
(``X-Pid``); bench/wrk_memory.lua counts them, and the tables give the fewest and most
requests a worker served, so an uneven spread shows; "master MiB" is the RSS of the
master alone (what the app costs it, garbage not collected during the load included).
Memory is read from
``/proc/PID/smaps_rollup`` of the master and all its children: total PSS (private pages
plus a fair share of shared ones) and USS (private pages). The ratios are PSS of each
preloaded mode over lazy, at each point; requests/s is wrk's over the whole traffic of a
mode (the servers run one at a time, same machine, same run). ``--plot FILE`` draws PSS
against requests per worker (needs matplotlib: ``pip install 'forksafe[bench]'``)::

    python bench/bench_memory.py --plot docs/bench_memory.png     # ~25 min
    python bench/bench_memory.py --quick          # 2 workers, Flask, 0/50/200 requests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ServerSpec,
    database,
    environment_note,
    memory,
    print_table,
    serve,
    wait_for_workers,
)

SCRIPT = Path(__file__).resolve().parent / "wrk_memory.lua"
APPS = {"flask": "flask_bench:application", "heavy": "heavy_app:application"}
#: app -> (wrk path, %d replaced by a random id in 1..ids; ids)
TRAFFIC = {"flask": ("/products/%d.json", 5000), "heavy": ("/items/%d", 2000)}
LAZY = "lazy"
NO_FREEZE = "preload + forksafe, no freeze"
FREEZE = "preload + forksafe"
COLLECT = "preload + forksafe + gc.collect()"
WARM = "preload + forksafe + warm-up"
#: mode -> (preload and forksafe's hooks, extra environment)
MODES: dict[str, tuple[bool, dict[str, str]]] = {
    LAZY: (False, {"BENCH_FORKSAFE": "0", "WARM_UP": "0"}),
    NO_FREEZE: (True, {"FORKSAFE_GC_FREEZE": "0", "WARM_UP": "0"}),
    FREEZE: (True, {"WARM_UP": "0"}),
    COLLECT: (True, {"BENCH_GC_COLLECT": "1", "WARM_UP": "0"}),
    WARM: (True, {"BENCH_WARMUP": "1", "WARM_UP": "1"}),
}
SHORT = {
    LAZY: "lazy",
    NO_FREEZE: "no freeze",
    FREEZE: "forksafe",
    COLLECT: "collect",
    WARM: "warm-up",
}


def _wrk(base: str, app: str, seconds: float, limit: int, workers: int) -> dict[str, object]:
    """One wrk run: at most ``seconds``, at most ``limit`` responses per wrk thread."""
    path, ids = TRAFFIC[app]
    env = {
        **os.environ,
        "BENCH_WRK_PATH": path,
        "BENCH_WRK_IDS": str(ids),
        "BENCH_WRK_REQUESTS": str(limit),
    }
    done = subprocess.run(
        ["wrk", "-t", str(WRK_THREADS), "-c", str(2 * workers), "-d", f"{seconds:.0f}s",
         "--timeout", "10s", "-s", str(SCRIPT), base + "/"],
        capture_output=True, text=True, env=env, timeout=seconds + 120, check=False,
    )  # fmt: skip
    count = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", done.stdout)
    if done.returncode != 0 or not count:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-800:]}{done.stderr}")
    per_pid = {int(p): int(n) for p, n in re.findall(r"^pid (\d+) (\d+)$", done.stdout, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", done.stdout)
    elapsed = float(count.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[count.group(3)]
    return {
        "requests": int(count.group(1)),
        "seconds": elapsed,
        "per_pid": per_pid,
        "failed": int(non2xx.group(1)) if non2xx else 0,
    }


WRK_THREADS = 2


def traffic(base: str, app: str, total: int, workers: int) -> dict[str, object]:
    """Send about ``total`` requests with wrk; requests/s and the responses per worker pid.

    wrk always runs for its whole ``-d`` (the script stops its threads after a count, but
    not wrk itself), so the traffic goes out in runs sized from the rate measured so far.
    """
    per_pid: dict[int, int] = {}
    sent = failed = 0
    timed = busy = 0.0  # requests and seconds of the runs that lasted their whole -d
    while sent < total * 0.98:
        remaining = total - sent
        rate = timed / busy if busy else 0.0
        first = 1.0 if remaining <= 500 else 3.0  # wrk runs its whole -d, whole seconds
        seconds = max(1.0, min(120.0, remaining / rate * 0.95)) if rate else first
        limit = math.ceil(remaining / WRK_THREADS)
        run = _wrk(base, app, seconds, limit, workers)
        requests = int(run["requests"])  # type: ignore[call-overload]
        if not requests:
            raise RuntimeError(f"wrk got no answer from {base} in {seconds:.0f} s")
        if requests < (limit - 1) * WRK_THREADS:  # not stopped by the count: a rate
            timed += requests
            busy += float(run["seconds"])  # type: ignore[arg-type]
        sent += requests
        failed += int(run["failed"])  # type: ignore[call-overload]
        for pid, n in run["per_pid"].items():  # type: ignore[attr-defined]
            per_pid[pid] = per_pid.get(pid, 0) + n
    return {
        "rps": timed / busy if busy else float("nan"),
        "timed": timed,
        "busy": busy,
        "per_pid": per_pid,
        "failed": failed,
    }


def seed(app: str, url: str) -> None:
    """Import the app once, alone: it creates and fills its tables when they are missing.

    Otherwise the lazy workers, which all import it at once, would race to seed them.
    """
    from _common import APPS_DIR, EXAMPLE_DIR

    env = {
        **os.environ,
        "DATABASE_URL": url,
        "BENCH_FORKSAFE": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(APPS_DIR), os.environ.get("PYTHONPATH")])),
    }
    module = APPS[app].split(":")[0]
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=EXAMPLE_DIR, env=env,
                   check=True, timeout=600)  # fmt: skip


def measure(
    server: str, app: str, workers: int, mode: str, url: str, *, points: list[int]
) -> list[dict[str, object]]:
    """Start one server; its memory fresh and after each point's requests per worker."""
    preload, extra = MODES[mode]
    spec = ServerSpec(
        server=server,
        app=APPS[app],
        workers=workers,
        preload=preload,
        hook=preload,
        env={"DATABASE_URL": url, "BENCH_POOL": "queue", "BENCH_FORKSAFE": "1", **extra},
    )
    rows: list[dict[str, object]] = []
    served: dict[int, int] = {}
    sent = 0
    timed = busy = 0.0
    failed = 0
    with serve(spec) as running:
        startup = wait_for_workers(running, workers, timeout=900)  # 8 lazy heavy apps, 2 cores
        for point in points:
            if point > sent:
                result = traffic(running.base, app, (point - sent) * workers, workers)
                for pid, n in result["per_pid"].items():  # type: ignore[attr-defined]
                    served[pid] = served.get(pid, 0) + n
                timed += float(result["timed"])  # type: ignore[arg-type]
                busy += float(result["busy"])  # type: ignore[arg-type]
                failed += int(result["failed"])  # type: ignore[call-overload]
                sent = point
            uss, pss, procs = memory(running.pid)
            master_rss = _rss(running.pid)
            counts = sorted(served.values()) or [0]
            rows.append({
                "app": app, "server": server, "workers": workers, "mode": mode,
                "point": point, "startup": startup, "uss": uss, "pss": pss, "procs": procs,
                "pids": len(served), "min_req": counts[0] if len(served) >= workers else 0,
                "max_req": counts[-1], "failed": failed, "master": master_rss,
            })  # fmt: skip
    rps = timed / busy if busy else 0.0  # 0: too few requests to time (--quick)
    for row in rows:
        row["rps"] = rps  # one figure per server run: all its traffic
    return rows


def _rss(pid: int) -> float:
    """The resident set of one process in MiB."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _ratio(value: object, base: object) -> str:
    """``value / base`` to two places, or n/a when there is no base figure."""
    top, bottom = float(str(value)), float(str(base))
    return f"{top / bottom:.2f}" if bottom else "n/a"


def plot(results: list[dict[str, object]], path: str) -> None:
    """PSS against requests per worker: one panel per app and server, one line per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'forksafe[bench]'", file=sys.stderr)
        return
    panels = sorted({(str(r["app"]), str(r["server"])) for r in results})
    columns = 2 if len(panels) > 2 else len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 4.0 * rows), squeeze=False)
    styles = {LAZY: "-", NO_FREEZE: ":", FREEZE: "--", COLLECT: "--", WARM: "-."}
    colours = {
        LAZY: "tab:blue",
        NO_FREEZE: "tab:orange",
        FREEZE: "tab:green",
        COLLECT: "tab:purple",
        WARM: "tab:red",
    }
    for ax, (app, server) in zip(axes.flat, panels, strict=False):
        for mode in MODES:
            rows = [r for r in results if (r["app"], r["server"], r["mode"]) == (app, server, mode)]
            if not rows:
                continue
            ax.plot(
                [int(str(r["point"])) for r in rows],
                [r["pss"] for r in rows],
                marker="o",
                linestyle=styles[mode],
                color=colours[mode],
                label=mode,
            )
        workers = next(r["workers"] for r in results if (r["app"], r["server"]) == (app, server))
        name = "Flask example" if app == "flask" else "heavier app"
        ax.set_title(f"{name}, {server}, {workers} workers", fontsize=10)
        ax.set_xlabel("requests per worker")
        ax.set_ylabel("total PSS, MiB (master + workers)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def report(
    results: list[dict[str, object]],
    apps: list[str],
    servers: list[str],
    modes: list[str],
    points: list[int],
) -> None:
    """Print the memory table of each app and the ratios to lazy."""
    order = list(MODES)
    results = sorted(
        results,
        key=lambda r: (str(r["server"]), order.index(str(r["mode"])), int(str(r["point"]))),
    )
    for app in apps:
        print_table(
            f"memory and start-up, {app}",
            ["server", "mode", "req/worker", "min", "max", "PSS MiB", "USS MiB",
             "master MiB", "req/s", "failed", "start s"],
            [
                [r["server"], SHORT[str(r["mode"])], r["point"], r["min_req"], r["max_req"],
                 f"{r['pss']:.0f}", f"{r['uss']:.0f}", f"{float(str(r.get('master', 0))):.0f}",
                 f"{r['rps']:.0f}", r["failed"], f"{r['startup']:.2f}"]
                for r in results if r["app"] == app
            ],
        )  # fmt: skip
    ratios = []
    for app in apps:
        for server in servers:

            def row(mode: str, point: int, app: str = app, server: str = server) -> dict:
                return next(
                    r
                    for r in results
                    if (r["app"], r["server"], r["mode"], r["point"]) == (app, server, mode, point)
                )

            if not any((r["app"], r["server"], r["mode"]) == (app, server, LAZY) for r in results):
                continue  # no lazy run to compare with (see --from-json)
            for mode in modes:
                if mode == LAZY or not any(
                    (r["app"], r["server"], r["mode"]) == (app, server, mode) for r in results
                ):
                    continue
                ratios.append([
                    app, server, SHORT[mode],
                    *(f"{row(mode, p)['pss'] / row(LAZY, p)['pss']:.2f}" for p in points),
                    _ratio(row(mode, points[-1])["rps"], row(LAZY, points[-1])["rps"]),
                ])  # fmt: skip
    print_table(
        "ratios, PSS preloaded / lazy at each point (below 1: less memory); req/s / lazy",
        ["app", "server", "mode", *(f"PSS@{p}" for p in points), "req/s"],
        ratios,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: a private MariaDB)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 workers, Flask example, 0/50/200 requests per worker",
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--points",
        default="0,800,4000",
        help="requests per worker at which memory is read (0: fresh)",
    )
    parser.add_argument("--servers", default="gunicorn,uwsgi")
    parser.add_argument("--apps", default="flask,heavy")
    parser.add_argument(
        "--modes",
        default=",".join(SHORT[m] for m in (LAZY, NO_FREEZE, FREEZE)),
        help="comma-separated: " + ", ".join(SHORT.values()),
    )
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of PSS against requests")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the raw figures as JSON (after every server run)"
    )
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        action="append",
        help="print and plot the figures of earlier runs instead of measuring",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench_memory.py needs wrk (scripts/setup installs it)", file=sys.stderr)
        return 2
    by_short = {v: k for k, v in SHORT.items()}
    modes = [by_short[m.strip()] for m in args.modes.split(",")]
    workers = 2 if args.quick else args.workers
    points = [0, 50, 200] if args.quick else [int(p) for p in args.points.split(",")]
    apps = ["flask"] if args.quick else args.apps.split(",")
    servers = args.servers.split(",")

    results: list[dict[str, object]] = []
    if args.from_json:
        for name in args.from_json:
            results += json.loads(Path(name).read_text())
        apps = list(dict.fromkeys(str(r["app"]) for r in results))
        servers = list(dict.fromkeys(str(r["server"]) for r in results))
        modes = [m for m in MODES if any(r["mode"] == m for r in results)]
        points = sorted({int(str(r["point"])) for r in results})
        workers = int(str(results[0]["workers"]))
    else:
        print(environment_note() + f", {workers} workers")
        with database(args.url) as url:
            for app in apps:
                seed(app, url)
                for server in servers:
                    for mode in modes:
                        results += measure(server, app, workers, mode, url, points=points)
                        last = results[-1]
                        print(
                            f"# {app} {server} {mode}: PSS {last['pss']:.0f} MiB after "
                            f"{last['point']} requests/worker, {last['rps']:.0f} req/s",
                            file=sys.stderr,
                            flush=True,
                        )
                        if args.json:
                            Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, apps, servers, modes, points)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
