"""Where jobs compute: the executors (local, Ray) and what a process that runs tasks keeps
between them (networks by key, an activation cache)."""
