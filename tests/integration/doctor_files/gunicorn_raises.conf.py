# broken on purpose: executing this config fails
workers = 2
raise RuntimeError("config error")
