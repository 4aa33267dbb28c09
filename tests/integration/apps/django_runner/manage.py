"""``manage.py`` of the Django project the parallel-test-runner tests run (see settings)."""

import multiprocessing
import os
import sys

if __name__ == "__main__":
    if sys.platform == "linux":
        multiprocessing.set_start_method("fork")  # Django's runner forks its workers
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
