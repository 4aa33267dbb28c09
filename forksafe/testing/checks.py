"""What a reproduction request asks, what it must get back, and how a failure is named.

Pure logic shared by the app the scenarios serve (`forksafe.testing.app`), the load client
(`forksafe.testing.load`), the ``multiprocessing`` scenario and the report. No I/O here.

Every request carries a request-unique number ``n`` and the first id ``a`` of a range of
the seeded table. The app runs two queries on one connection, ``SELECT n AS echo`` and
``SELECT id, label FROM forksafe_repro_items WHERE id BETWEEN a AND a+2``, and answers
``{"echo": n, "rows": [[id, label], ...]}``. Anything else is a wrong answer: with a socket
shared between processes a worker can receive another worker's echo or rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from forksafe import errors

__all__ = [
    "CATEGORIES",
    "CATEGORY_TITLES",
    "CLOSED",
    "COLUMN",
    "ENV_DB_TIMEOUT",
    "ENV_MODE",
    "ENV_POOL",
    "ENV_PROTECT",
    "ENV_URL",
    "ERROR_CATEGORIES",
    "GONE",
    "HUNG",
    "LOST",
    "MODES",
    "OK",
    "OTHER",
    "POOLS",
    "ROWS_PER_REQUEST",
    "SEED_ROWS",
    "SYNC",
    "TABLE",
    "WRONG",
    "classify_exception",
    "driver_timeout_args",
    "expected_answer",
    "first_id_for",
    "label_for",
    "problems",
    "tally",
    "validate_answer",
]

TABLE = "forksafe_repro_items"

#: environment of the app the scenarios serve (`forksafe.testing.app`)
ENV_URL = "FORKSAFE_REPRO_URL"  # SQLAlchemy URL, driver included
ENV_MODE = "FORKSAFE_REPRO_MODE"  # "engine" or "raw"
ENV_PROTECT = "FORKSAFE_REPRO_PROTECT"  # "1": forksafe on, "0": the unprotected app
ENV_DB_TIMEOUT = "FORKSAFE_REPRO_DB_TIMEOUT"  # driver read/write timeout, seconds
ENV_POOL = "FORKSAFE_REPRO_POOL"  # engine mode: "queue" (default), "null" or "pre_ping"
POOLS = ("queue", "null", "pre_ping")
MODES = ("engine", "raw")
SEED_ROWS = 1000
ROWS_PER_REQUEST = 3

OK = "ok"
WRONG = "wrong_answer"
GONE = "2006"
LOST = "2013"
SYNC = "2014"
CLOSED = "resource_closed"
COLUMN = "missing_column"
OTHER = "other_error"
HUNG = "hung_or_killed"

#: every outcome of a request, in report order
CATEGORIES = (OK, WRONG, GONE, LOST, SYNC, CLOSED, COLUMN, OTHER, HUNG)
ERROR_CATEGORIES = (GONE, LOST, SYNC, CLOSED, COLUMN, OTHER)

#: short column titles for the table
CATEGORY_TITLES: dict[str, str] = {
    OK: "ok",
    WRONG: "WRONG",
    GONE: "2006",
    LOST: "2013",
    SYNC: "2014",
    CLOSED: "closed",
    COLUMN: "column",
    OTHER: "other",
    HUNG: "hung",
}


def label_for(row_id: int) -> str:
    """The seeded label of row ``row_id``: unique, and not guessable from a neighbour's."""
    digest = hashlib.sha1(str(row_id).encode(), usedforsecurity=False).hexdigest()[:10]
    return f"item-{row_id:05d}-{digest}"


def first_id_for(n: int) -> int:
    """The first id of the range request ``n`` asks for (the range stays inside the table)."""
    return n % (SEED_ROWS - ROWS_PER_REQUEST + 1) + 1


def expected_answer(n: int) -> dict[str, Any]:
    """Exactly what request ``n`` must get back."""
    a = first_id_for(n)
    return {
        "echo": n,
        "rows": [[i, label_for(i)] for i in range(a, a + ROWS_PER_REQUEST)],
    }


def validate_answer(n: int, body: object) -> str:
    """``OK`` when ``body`` is exactly request ``n``'s answer, else ``WRONG``.

    ``body`` is the decoded JSON of a 200 response (or a pool task's result); the echo and
    every row must match, in order. Extra keys (the worker's pid) are ignored.
    """
    if not isinstance(body, Mapping):
        return WRONG
    want = expected_answer(n)
    echo = body.get("echo")
    rows = body.get("rows")
    if not isinstance(echo, int) or isinstance(echo, bool) or echo != want["echo"]:
        return WRONG
    if not isinstance(rows, list):
        return WRONG
    got = [list(r) if isinstance(r, (list, tuple)) else r for r in rows]
    return OK if got == want["rows"] else WRONG


# -- naming an exception -------------------------------------------------------------------

# The report's columns for what `forksafe.errors.classify` recognises. Codes not listed
# (a refused connection, a killed session, ...) are OTHER: they are not fork symptoms.
_CATEGORY_OF_CODE: dict[str, str] = {
    "mysql-2006": GONE,
    "pg-already-closed": GONE,  # psycopg2: "connection already closed"
    "mysql-2013": LOST,
    "mysql-2055": LOST,
    "pg-closed": LOST,  # psycopg2: "server closed the connection unexpectedly"
    "mysql-2014": SYNC,
    "mysql-protocol": SYNC,  # PyMySQL: "Packet sequence number wrong"
    "sa-result-closed": CLOSED,
    "sa-no-such-column": COLUMN,
    # SQLAlchemy 2.x's form of the same symptom: a bare NotImplementedError raised in
    # ResultMetaData._indexes_for_keys when the ORM reads a reply without columns
    "sa-no-result-metadata": COLUMN,
}


def classify_exception(exc: BaseException) -> str:
    """Name the failure ``exc`` stands for: one of `ERROR_CATEGORIES`.

    A missing key in a result row (the app reads ``row["label"]`` and got another query's
    columns) is a missing column; everything else is named by `forksafe.errors.classify`
    (which looks through SQLAlchemy's wrapper and the cause chain, MySQL code first, then
    the message) and mapped onto the report's columns. Anything else is ``OTHER``.
    """
    if isinstance(exc, KeyError) or isinstance(exc.__cause__, KeyError):
        return COLUMN
    kind = errors.classify(exc)
    if kind is None:
        return OTHER
    return _CATEGORY_OF_CODE.get(kind.code, OTHER)


def driver_timeout_args(drivername: str, timeout: int) -> dict[str, Any]:
    """DBAPI ``connect()`` arguments bounding how long one call may wait on the server.

    MySQL drivers get read/write timeouts (a worker stuck reading a shared socket then
    fails with 2013 instead of hanging); psycopg2 only has a connect timeout.
    """
    if drivername.startswith(("mysql", "mariadb")):
        return {"read_timeout": timeout, "write_timeout": timeout, "connect_timeout": timeout}
    return {"connect_timeout": timeout}


def problems(counts: Mapping[str, int]) -> int:
    """How many requests did not get exactly their own answer."""
    return sum(v for k, v in counts.items() if k != OK)


def tally(outcomes: Iterable[str]) -> dict[str, int]:
    """Count outcomes into a dict with every category present (zeros included)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for outcome in outcomes:
        counts[outcome if outcome in counts else OTHER] += 1
    return counts

