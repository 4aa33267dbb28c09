"""Results of ``forksafe repro`` runs: the side-by-side table, the JSON, the exit status.

Pure logic: builds on the outcome categories of `forksafe.testing.checks`.

Verdicts: a run *with* forksafe is ``clean`` when every request got exactly its own answer,
else ``FAILED``. A run *without* forksafe is ``REPRODUCED`` when any request did not, else
``not reproduced`` (it proves nothing either way: more requests or rounds may show it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forksafe.testing import checks

__all__ = [
    "CLEAN",
    "FAILED",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "RunResult",
    "exit_status",
    "render_json",
    "render_table",
]

CLEAN = "clean"
FAILED = "FAILED"
REPRODUCED = "REPRODUCED"
NOT_REPRODUCED = "not reproduced"

_MAX_SAMPLES = 3


@dataclass
class RunResult:
    """One scenario, one mode, with or without forksafe, over one or more rounds."""

    scenario: str
    title: str
    mode: str
    driver: str
    protected: bool
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(checks.CATEGORIES, 0))
    rounds: int = 0
    rounds_with_problems: int = 0
    seconds: float = 0.0
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add_round(
        self,
        outcomes: Iterable[Sequence[Any]],
        seconds: float,
    ) -> None:
        """Add one round's outcomes (``(n, category, message)`` each)."""
        problems = 0
        for _n, category, message in outcomes:
            key = category if category in self.counts else checks.OTHER
            self.counts[key] += 1
            if key != checks.OK:
                problems += 1
                kept = self.samples.setdefault(key, [])
                text = " ".join(str(message).split())[:200]
                if text and text not in kept and len(kept) < _MAX_SAMPLES:
                    kept.append(text)
        self.rounds += 1
        self.rounds_with_problems += 1 if problems else 0
        self.seconds += seconds

    @property
    def total(self) -> int:
        """Requests sent (or due) over all rounds."""
        return sum(self.counts.values())

    @property
    def problems(self) -> int:
        """Requests that did not get exactly their own answer."""
        return checks.problems(self.counts)

    @property
    def verdict(self) -> str:
        """``clean`` / ``FAILED`` with forksafe, ``REPRODUCED`` / ``not reproduced`` without."""
        if self.protected:
            return CLEAN if self.problems == 0 else FAILED
        return REPRODUCED if self.problems else NOT_REPRODUCED

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "scenario": self.scenario,
            "title": self.title,
            "mode": self.mode,
            "driver": self.driver,
            "forksafe": self.protected,
            "verdict": self.verdict,
            "requests": self.total,
            "problems": self.problems,
            "counts": dict(self.counts),
            "rounds": self.rounds,
            "rounds_with_problems": self.rounds_with_problems,
            "seconds": round(self.seconds, 2),
            "samples": self.samples,
        }


def exit_status(results: Sequence[RunResult]) -> tuple[int, str]:
    """0 when every run with forksafe is clean, else 1; with a one-line reason."""
    failed = [r for r in results if r.protected and r.problems]
    if failed:
        names = ", ".join(
            f"{r.scenario}/{r.mode} ({r.problems} of {r.total} requests)" for r in failed
        )
        return 1, f"with forksafe, requests failed or got wrong answers: {names}"
    protected = [r for r in results if r.protected]
    unprotected = [r for r in results if not r.protected]
    reproduced = [r for r in unprotected if r.problems]
    parts = []
    if protected:
        runs = "1 run" if len(protected) == 1 else f"{len(protected)} runs"
        parts.append(f"every run with forksafe is clean ({runs})")
    if unprotected:
        parts.append(
            f"without forksafe the corruption was reproduced in {len(reproduced)} of "
            f"{len(unprotected)} runs"
        )
    return 0, "; ".join(parts) or "nothing was run"


def render_table(results: Sequence[RunResult], header: Sequence[str] = ()) -> str:
    """The human report: one line per run, the runs with and without forksafe together."""
    titles = ["scenario", "mode", "forksafe"]
    titles += [checks.CATEGORY_TITLES[c] for c in checks.CATEGORIES]
    titles.append("verdict")
    rows: list[list[str]] = []
    previous = None
    for r in results:
        key = (r.scenario, r.mode)
        first = key != previous
        previous = key
        verdict = r.verdict
        if r.rounds > 1:
            verdict += f" ({r.rounds_with_problems}/{r.rounds} rounds)"
        rows.append(
            [
                r.scenario if first else "",
                r.mode if first else "",
                "with" if r.protected else "without",
                *(str(r.counts.get(c, 0)) for c in checks.CATEGORIES),
                verdict,
            ]
        )
    widths = [max(len(t), *(len(row[i]) for row in rows)) if rows else len(t)
              for i, t in enumerate(titles)]
    numeric = set(range(3, 3 + len(checks.CATEGORIES)))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1:
                out.append(cell)
            elif i in numeric:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = list(header)
    if header:
        lines.append("")
    lines.append(line(titles))
    previous = None
    for r, row in zip(results, rows, strict=True):
        if previous is not None and (r.scenario, r.mode) != previous:
            lines.append("")
        previous = (r.scenario, r.mode)
        lines.append(line(row))
    lines += [
        "",
        "ok: the request got exactly its own echo and rows.  WRONG: it got another "
        "request's data.",
        "2006 gone away, 2013 lost connection, 2014 commands out of sync, closed: "
        "ResourceClosedError,",
        "column: NoSuchColumnError, SQLAlchemy 2.x's NotImplementedError from "
        "_indexes_for_keys, or a missing column,",
        "other: any other error, hung: no answer in time or worker killed.",
    ]
    return "\n".join(lines)


def render_json(results: Sequence[RunResult], settings: dict[str, Any]) -> str:
    """The machine report: settings, every run, and the exit status with its reason."""
    status, reason = exit_status(results)
    return json.dumps(
        {
            "settings": settings,
            "runs": [r.as_dict() for r in results],
            "exit_status": status,
            "reason": reason,
        },
        indent=2,
    )
