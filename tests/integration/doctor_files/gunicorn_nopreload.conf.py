# fine: no preload_app, so every worker imports the app after fork (nothing is shared)
workers = 4
timeout = 30
