# gunicorn -c gunicorn.conf.py  (from this directory)
import os

wsgi_app = "app:app"
bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = 4
preload_app = True  # load the app (and open its database connection) once, then fork

# forksafe: reset tracked engines in every worker right after fork (post_fork), and
# gc.freeze() in the master before forking, so the workers keep sharing the app (pre_fork).
from forksafe.gunicorn import post_fork, pre_fork  # noqa: E402, F401
