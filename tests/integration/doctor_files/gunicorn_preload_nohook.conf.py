# broken on purpose: preload without forksafe's post_fork, and no worker timeout
workers = 8
preload_app = True
timeout = 0
