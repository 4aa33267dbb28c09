"""A Celery app on files: the broker and the results in ``CELERY_DATA`` (no broker server).
Shared by the worker's app (celery_app.py) and the test's client."""

from __future__ import annotations

import os

from celery import Celery


def make_app(name: str, data: str | None = None) -> Celery:
    """A Celery app on the file broker and file results in ``data`` (default:
    ``CELERY_DATA``)."""
    data = data or os.environ["CELERY_DATA"]
    app = Celery(name, broker="filesystem://", backend=f"file://{data}/results")
    app.conf.broker_transport_options = {
        "data_folder_in": f"{data}/queue",
        "data_folder_out": f"{data}/queue",
        "processed_folder": f"{data}/processed",
        "store_processed": False,
    }
    app.conf.worker_hijack_root_logger = False
    return app
