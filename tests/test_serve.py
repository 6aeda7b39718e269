"""`unlearn serve`: the HTTP contract, on loopback, through the coordinator."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import synthetic_records, write_jsonl

pytestmark = pytest.mark.integration
BIN = os.path.dirname(sys.executable)


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_http_contract(tmp_path):
    from seaweedfs import free_port

    store = str(tmp_path / "store")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(24, owners_every=1))
    env = {**os.environ, "UNLEARN_RUNTIME": "ray"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([os.path.join(BIN, "unlearn"), "train", "--data", data, "--run", "s", "--store", store,
                    "--model", "tiny", "--shards", "2", "--slices", "2", "--quiet", "--runtime", "local"],
                   check=True, env=env, capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen([os.path.join(BIN, "unlearn"), "serve", "--run", "s", "--store", store,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                status, out = call(f"{base}/predict", {"texts": ["great fun", "dull"]})
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "serve did not answer in time"
                time.sleep(1)
        assert status == 200 and out["shards"] == [0, 1] and len(out["predictions"]) == 2
        assert set(out["predictions"][0]) >= {"label", "probabilities"}

        status, out = call(f"{base}/delete", {"ids": ["r0004"]})
        assert status == 202
        request_id = out["request_id"]
        for _ in range(120):
            status, req = call(f"{base}/requests/{request_id}")
            if req["status"] == "done":
                break
            time.sleep(0.5)
        assert status == 200 and req["status"] == "done" and req["records_deleted"] == 1 and len(req["shards"]) == 1

        status, out = call(f"{base}/delete", {"ids": ["nope"]})
        assert status == 400 and out["error"] == 'run "s": unknown id "nope"; request not accepted, nothing was deleted'
        status, out = call(f"{base}/predict", {"texts": []})
        assert status == 400 and "'texts' must be a non-empty list" in out["error"]
        status, out = call(f"{base}/requests/none-such")
        assert status == 400 and "no request" in out["error"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
