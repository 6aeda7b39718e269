"""The imperative shell: the CLI, the Ray runtime (shard actors) and, next, the deletion coordinator.

Ray reads these at import and init time: keep every Ray socket on loopback and keep
token auth from writing ~/.ray/auth_token on a local single-machine cluster
(PLATFORM.md). A user's explicit setting wins.
"""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
