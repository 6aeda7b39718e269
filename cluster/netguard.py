"""Keep what the Ray clusters unlearn starts closed to everyone but the user.

Two guards, both for a cluster this process starts (see `cluster.runtime.init_ray`):

- loopback: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set by `cluster/__init__.py`
  before Ray is imported) every Ray socket binds 127.0.0.1, except the internal gRPC
  server of each Ray Serve replica, which Ray 2.60 hard-codes to "[::]:0"
  (ray/serve/_private/replica.py) with no setting to change it. `loopback_grpc` runs in
  every worker process of the job (Ray's `worker_process_setup_hook`, given by its
  module path) and rewrites that wildcard host to 127.0.0.1.
- token: a fresh random token per started cluster, only in the environment of this
  process and of the Ray processes it starts (never written to a file, never logged);
  Ray then refuses every client that does not present it (RAY_AUTH_MODE=token).

The hook wraps a private Ray function: `check()` says, in one line, when this Ray no
longer has it (the socket test in tests/test_exposure.py fails too).
"""
from __future__ import annotations

import os
import secrets

HOOK = "cluster.netguard.loopback_grpc"
WILDCARD_HOSTS = ("[::]", "0.0.0.0", "")
TOKEN_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def loopback_address(address: str) -> str:
    """'[::]:0' -> '127.0.0.1:0'; any other address unchanged."""
    host, sep, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if sep and host in WILDCARD_HOSTS else address


def check() -> str | None:
    """None if the hook can do its job with this Ray, else why not (one line)."""
    try:
        import ray._common.tls_utils as tls
    except ImportError:
        return "this Ray has no ray._common.tls_utils"
    if not callable(getattr(tls, "add_port_to_grpc_server", None)):
        return "this Ray has no ray._common.tls_utils.add_port_to_grpc_server"
    return None


def loopback_grpc() -> None:
    """worker_process_setup_hook: make gRPC servers that Ray code binds to a wildcard host
    bind loopback. Runs in each worker before any task; TLS handling is the original's."""
    import sys

    if check() is not None:  # the driver warned already
        return
    import ray._common.tls_utils as tls

    original = getattr(tls.add_port_to_grpc_server, "__wrapped__", tls.add_port_to_grpc_server)

    def add_port_to_grpc_server(server, address):
        return original(server, loopback_address(address))

    add_port_to_grpc_server.__wrapped__ = original
    tls.add_port_to_grpc_server = add_port_to_grpc_server
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:  # imported before the hook ran: patch its own name too
        replica.add_port_to_grpc_server = add_port_to_grpc_server


def use_fresh_token() -> None:
    """Turn token authentication on for the cluster this process is about to start, with a
    new random token kept in this process's environment (inherited by the Ray processes
    it starts, readable by the user alone)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    _reload_token()


def _reload_token() -> None:
    """Ray caches the mode and the token per process (C++): make it read them again."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # an older Ray: read at init only
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
