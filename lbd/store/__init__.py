"""Where shared state lives. One instance keeps it in its own memory and its state directory (the
registry, the session table, lbd/state.py); with `--cluster` it lives in Redis (or Valkey) too, so
several instances are one balancer (lbd/store/redis_store.py, lbd/store/cluster.py)."""
