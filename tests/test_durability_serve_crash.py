"""`unlearn serve` killed mid-deletion and started again: the request is applied by the next
server, which never answers from the shard meanwhile. (A module of its own, so that the
other serve tests' server is stopped before this one's start.)"""
import os
import time

import pytest

from cluster.cli import main
from conftest import write_jsonl
from proc_helpers import (assert_all_applied, assert_no_trace, assert_sisa_exact, http, kill_session, queue, spawn,
                          wait_until)
from sisa.config import SisaConfig
from test_durability_serve import CFG, OPTIONS, RECORDS, assert_withheld, start_server, victims

pytestmark = pytest.mark.integration


def test_a_killed_server_loses_nothing_and_its_successor_withholds(tmp_path):
    """Seen before: after `kill -KILL` of the server's process group, the next server failed
    the request on the dead coordinator's lock and wiped its ids, and /predict answered from
    the shard that still held the record. The server is killed 2 s into the retraining of a
    POST /delete: its process group, as a user would, and then every other process
    of its session (Ray's workers outlive the group and might finish the work; killing them
    makes the apply die with it). The next server must take the dead coordinator's lock
    over, apply the request, and never answer from its shard meanwhile."""
    from seaweedfs import free_port

    store = str(tmp_path / "store")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    slow = [*OPTIONS, "--epochs", "8"]  # a deletion retrains for ~7 s: the kill lands inside it
    assert main(["train", "--data", data, "--run", "r", "--store", store, *slow]) == 0
    port = free_port()
    proc, url = start_server(store, str(tmp_path / "first"), port)
    try:
        victim = victims({"store": store, "deleted": set()}, 1)[0]
        status, out = http(url, "/delete", {"ids": [victim]})
        assert status == 202
        rid, acked = out["request_id"], time.time()
        wait_until(lambda: queue(store, "r").get(rid, {}).get("status") == "applying", 120, "the server to apply")
        time.sleep(2)  # inside its retraining
        os.killpg(proc.pid, 9)
        kill_session(proc)
        assert queue(store, "r")[rid]["ids"] == [victim]  # acknowledged, not applied, not lost
        proc = spawn("serve", "--run", "r", "--store", store, "--port", str(port), runtime="ray",
                     log=str(tmp_path / "second"))
        answers = []
        while True:  # every answer of the new server, until the request is done
            try:
                t0 = time.time()
                status, out = http(url, "/predict", {"texts": ["great fun"]}, timeout=30)
                if status == 200:
                    answers.append((t0, time.time(), out["shards"]))
                status, req = http(url, f"/requests/{rid}")
                if status == 200 and req["status"] == "done":
                    break
                assert status != 200 or req["status"] != "failed", req
                if status != 200:  # the new server is still deploying
                    time.sleep(0.5)
            except OSError:
                assert proc.poll() is None, open(tmp_path / "second.err").read()[-3000:]
                time.sleep(0.5)
        assert assert_withheld(answers, [(req, acked)]) > 0, "the new server never answered before the commit"
        assert req["records_deleted"] == 1
        # its applier died holding the lock: the new server took it over and applied it again
        assert req["attempts"] >= 2 and any("took over the run lock" in w for w in req["warnings"]), req
        assert_all_applied(store, "r", at_least=1)
        assert_no_trace(store, RECORDS, {victim})
        assert_sisa_exact(store, "r", RECORDS, {victim}, SisaConfig(**{**CFG.to_json(), "epochs": "8"}),
                          str(tmp_path / "fresh"))
    finally:
        kill_session(proc)
