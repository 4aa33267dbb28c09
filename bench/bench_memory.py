"""Memory and start-up time: preload + forksafe against lazy loading, by worker count.

For each server (gunicorn, uWSGI), app (the Flask example; a heavier app that imports more,
bench/apps/heavy_app.py) and worker count, starts the server twice:

* **preload + forksafe**: the app loads once in the master, then the workers fork
  (gunicorn ``preload_app = True`` with ``from forksafe.gunicorn import post_fork``; uWSGI
  without ``lazy-apps``, ``--import forksafe.uwsgi``), the engine tracked by forksafe;
* **lazy**: every worker loads the app itself after the fork (gunicorn without
  ``preload_app``; uWSGI ``--lazy-apps``), no forksafe: what users do to avoid sharing.

Start-up is the time from spawning the server until every worker has answered a request
(distinct pids). Memory is then read from ``/proc/PID/smaps_rollup`` of the master and all
its children: total USS (private pages) and PSS (private plus a fair share of shared ones).
Prints a table per app and the ratios preload/lazy; ``--plot FILE`` draws PSS against
workers (needs matplotlib: ``pip install 'forksafe[bench]'``)::

    python bench/bench_memory.py --plot docs/bench_memory.png
    python bench/bench_memory.py --quick          # 2 workers, Flask example only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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

APPS = {"flask": "flask_bench:application", "heavy": "heavy_app:application"}
MODES = {"preload + forksafe": True, "lazy": False}


def measure(server: str, app: str, workers: int, preload: bool, url: str) -> dict[str, float]:
    """Start one server, wait for every worker, settle briefly, read its memory."""
    spec = ServerSpec(
        server=server,
        app=APPS[app],
        workers=workers,
        preload=preload,
        hook=preload,
        env={
            "DATABASE_URL": url,
            "BENCH_POOL": "queue",
            "BENCH_FORKSAFE": "1" if preload else "0",
        },
    )
    with serve(spec) as running:
        startup = wait_for_workers(running, workers)
        time.sleep(0.5)  # let the last workers finish their first request
        uss, pss, procs = memory(running.pid)
    return {"startup": startup, "uss": uss, "pss": pss, "procs": procs}


def plot(results: list[dict[str, object]], path: str) -> None:
    """PSS against workers: one panel per app, one line per server and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'forksafe[bench]'", file=sys.stderr)
        return
    apps = sorted({str(r["app"]) for r in results})
    fig, axes = plt.subplots(1, len(apps), figsize=(6 * len(apps), 4.2), squeeze=False)
    for ax, app in zip(axes[0], apps, strict=True):
        for server in ("gunicorn", "uwsgi"):
            for mode in MODES:
                rows = [
                    r for r in results
                    if r["app"] == app and r["server"] == server and r["mode"] == mode
                ]
                if not rows:
                    continue
                ax.plot(
                    [r["workers"] for r in rows],
                    [r["pss"] for r in rows],
                    marker="o",
                    linestyle="-" if mode == "lazy" else "--",
                    label=f"{server}, {mode}",
                )
        ax.set_title(f"{'Flask example' if app == 'flask' else 'heavier app'}: total PSS")
        ax.set_xlabel("workers")
        ax.set_ylabel("MiB (master + workers)")
        ax.set_xticks(sorted({int(str(r["workers"])) for r in results}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: a private MariaDB)")
    parser.add_argument("--quick", action="store_true", help="2 workers, Flask example only")
    parser.add_argument("--workers", default="2,4,8,16", help="comma-separated counts")
    parser.add_argument("--servers", default="gunicorn,uwsgi")
    parser.add_argument("--apps", default="flask,heavy")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of PSS against workers")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    args = parser.parse_args()
    counts = [2] if args.quick else [int(w) for w in args.workers.split(",")]
    apps = ["flask"] if args.quick else args.apps.split(",")
    servers = args.servers.split(",")

    print(environment_note())
    results: list[dict[str, object]] = []
    with database(args.url) as url:
        for app in apps:
            for server in servers:
                for workers in counts:
                    for mode, preload in MODES.items():
                        figures = measure(server, app, workers, preload, url)
                        results.append(
                            {"app": app, "server": server, "workers": workers, "mode": mode,
                             **figures}
                        )
    for app in apps:
        print_table(
            f"memory and start-up, {app}",
            ["server", "workers", "mode", "USS MiB", "PSS MiB", "start s"],
            [
                [r["server"], r["workers"], r["mode"], f"{r['uss']:.0f}", f"{r['pss']:.0f}",
                 f"{r['startup']:.2f}"]
                for r in results if r["app"] == app
            ],
        )
    ratios = []
    for app in apps:
        for server in servers:
            for workers in counts:
                pre, lazy = (
                    next(r for r in results if (r["app"], r["server"], r["workers"], r["mode"])
                         == (app, server, workers, mode))
                    for mode in MODES
                )
                ratios.append([
                    app, server, workers,
                    f"{pre['uss'] / lazy['uss']:.2f}",  # type: ignore[operator]
                    f"{pre['pss'] / lazy['pss']:.2f}",  # type: ignore[operator]
                    f"{pre['startup'] / lazy['startup']:.2f}",  # type: ignore[operator]
                ])
    print_table(
        "ratios, preload + forksafe / lazy (below 1: preload + forksafe uses less)",
        ["app", "server", "workers", "USS", "PSS", "start-up"],
        ratios,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
