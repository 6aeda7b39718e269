"""The imperative shell: the CLI, the Ray runtime (shard actors) and, next, the deletion coordinator.

Ray reads these at import time: keep every Ray socket on loopback (the node IP is
127.0.0.1 unless a cluster is joined) and send no usage statistics. A user's explicit
setting wins. Token authentication is turned on where a cluster is started
(`cluster.runtime.init_ray`, `cluster.netguard`).
"""
import os

# whether the user chose Ray's node-IP mode: if not, `runtime.init_ray` turns it back on to
# join a cluster on other machines (on 127.0.0.1 a driver finds no raylet there)
RAY_CLUSTER_MODE_SET_BY_USER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in os.environ
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
