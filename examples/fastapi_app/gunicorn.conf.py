# gunicorn -c gunicorn.conf.py  (from this directory)
import os

wsgi_app = "app:app"
bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = 4
worker_class = "uvicorn_worker.UvicornWorker"  # pip install uvicorn-worker
preload_app = True  # load the app (and use its AsyncEngine) once, then fork

# forksafe: reset tracked engines in every worker right after fork.
from forksafe.gunicorn import post_fork  # noqa: E402, F401
