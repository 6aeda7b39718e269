"""The same CLI against a separately started Ray cluster (`ray start --head` on loopback)."""
import json
import os
import secrets
import subprocess
import sys
import tempfile

import pytest

from conftest import synthetic_records, write_jsonl
from proc_helpers import ray_processes, stop_cluster

# slow (`make test-all`): a `ray start` cluster of its own costs over a minute on 2 cores; in
# `make test`, tests/test_up.py runs the CLI against a separately started, token-protected cluster
pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)


TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # as the README says


@pytest.fixture
def ray_head():
    from seaweedfs import free_port

    temp = tempfile.mkdtemp(prefix="ur-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **TOKEN}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    subprocess.run([os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        stop_cluster(temp)
        assert ray_processes(temp) == []


def unlearn(*args, address, token: dict | None = None, code: int = 0):
    env = {**os.environ, "UNLEARN_RUNTIME": "ray", **(TOKEN if token is None else token)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    proc = subprocess.run([os.path.join(BIN, "unlearn"), *args, "--address", address, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == code, proc.stderr
    return proc.stdout if code == 0 else proc.stderr


def test_train_delete_predict_against_a_started_cluster(ray_head, tmp_path):
    address, temp = ray_head
    store = str(tmp_path / "store")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(24, owners_every=1))
    status = json.loads(unlearn("train", "--data", data, "--run", "c", "--store", store, "--model", "tiny",
                                "--shards", "2", "--slices", "2", "--json", address=address))
    receipt = json.loads(unlearn("delete", "--run", "c", "--store", store, "--ids", "r0003", "--json",
                                 address=address))
    assert receipt["status"] == "done" and receipt["ids"] == ["r0003"] and len(receipt["shards"]) == 1
    assert receipt["digests"][str(receipt["shards"][0])]["before"] in {s["digest"] for s in status["shards"]}
    # without the cluster's token: refused at once, with one line that says what to set
    err = unlearn("predict", "--run", "c", "--store", store, "--input", str(data), address=address,
                  token={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}, code=1)
    assert err.splitlines() == [f"unlearn: error: cannot join the Ray cluster at {address}: it requires token "
                                f"authentication and this process has no token: set RAY_AUTH_MODE=token and "
                                f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"]
    texts = tmp_path / "t.txt"
    texts.write_text("great fun\nflat\n")
    out = json.loads(unlearn("predict", "--run", "c", "--store", store, "--input", str(texts), "--json",
                             address=address))
    assert len(out["predictions"]) == 2 and out["shards"] == [0, 1]
    # the shard actors ran as workers of the started cluster, not in a private Ray of the CLI
    logs = os.path.join(temp, "session_latest", "logs")
    hits = [name for name in os.listdir(logs) if name.startswith("worker-")
            and "ShardActor" in open(os.path.join(logs, name), errors="replace").read()]
    assert hits, "no ShardActor worker in the started cluster's logs"
