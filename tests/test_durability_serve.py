"""`unlearn serve` beside other processes, and killed: no acknowledged deletion lost, no
answer from a shard whose deletion is acknowledged, whichever process accepted it.

The tests share one server (and its run); each checks, for every request, that the
answers `/predict` gave between the request's acknowledgement and its commit never came
from its shard. The HTTP contract itself is checked here too."""
import json
import os
import random
import threading
import time
from datetime import datetime

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from proc_helpers import (assert_all_applied, assert_no_trace, assert_sisa_exact, http, kill_session, queue, run_cli,
                          spawn, wait_serving, wait_until)
from sisa.config import SisaConfig

pytestmark = pytest.mark.integration

CFG = SisaConfig(shards=2, slices=2, model="tiny", epochs="4", batch_size=2, max_length=32, seed=5,
                 labels=("neg", "pos"))
OPTIONS = ["--model", "tiny", "--shards", "2", "--slices", "2", "--epochs", "4", "--batch-size", "2",
           "--max-length", "32", "--seed", "5", "--labels", "neg,pos", "--quiet", "--runtime", "local"]
RECORDS = synthetic_records(240, owners_every=1)


def start_server(store: str, log: str, port: int | None = None, intake_port: int | None = None):
    from seaweedfs import free_port

    port = port or free_port()
    extra = ["--intake-port", str(intake_port)] if intake_port else []
    proc = spawn("serve", "--run", "r", "--store", store, "--port", str(port), *extra, runtime="ray", log=log)
    base = f"http://127.0.0.1:{port}"
    wait_serving(base, proc, log)
    if intake_port:
        wait_serving(f"http://127.0.0.1:{intake_port}", proc, log)
    return proc, base


class Answers:
    """/predict in a loop: (asked at, answered at, shards that answered)."""

    def __init__(self, base: str):
        self.base, self.seen, self.unavailable, self._stop = base, [], [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            t0 = time.time()
            try:
                status, out = http(self.base, "/predict", {"texts": ["great fun", "dull and flat"]}, timeout=30)
            except OSError:
                time.sleep(0.1)
                continue

            if status == 200:
                self.seen.append((t0, time.time(), out["shards"]))
            else:
                self.unavailable.append((status, out))
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=60)
        # while every shard is quarantined: a 503, never an answer from one of them
        assert all(status == 503 and "ask again, or wait" in out["error"] for status, out in self.unavailable), \
            self.unavailable[:3]
        return self.seen


def assert_withheld(answers, receipts) -> int:
    """No answer asked after a request's acknowledgement and back before its commit came
    from the request's shard; returns how many answers fell in such windows."""
    overlapping = 0
    for req, acked in receipts:
        completed = datetime.fromisoformat(req["completed"]).timestamp()
        between = [a for a in answers if a[0] >= acked and a[1] <= completed]
        overlapping += len(between)
        for shard in req["shards"]:
            assert all(shard not in a[2] for a in between), (req["request_id"], shard, between[:3])
    return overlapping


def wait_done(base: str, request_id: str, timeout: float = 300) -> dict:
    def done():
        status, req = http(base, f"/requests/{request_id}")
        return req if status == 200 and req["status"] in ("done", "failed") else None

    return wait_until(done, timeout, f"request {request_id}", poll=0.2)


def victims(state, n: int, shard: int | None = None) -> list[str]:
    """Records of first slices not deleted yet: of `shard`, or alternating shards."""
    from sisa.run import SisaRun
    from core.store import LocalStore

    manifest = SisaRun.open(LocalStore(state["store"]), "r").manifest
    out = []
    for k in range(n):
        entry = manifest.shards[k % 2 if shard is None else shard]
        out.append(next(i for i in entry.slices[0].ids if i not in state["deleted"] and i not in out))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    store = str(base / "store")
    data = write_jsonl(base / "d.jsonl", RECORDS)
    assert main(["train", "--data", data, "--run", "r", "--store", store, *OPTIONS]) == 0
    from seaweedfs import free_port

    intake_port = free_port()
    proc, url = start_server(store, str(base / "serve"), intake_port=intake_port)
    yield {"store": store, "base": base, "url": url, "intake": f"http://127.0.0.1:{intake_port}", "proc": proc,
           "deleted": set(), "rng": random.Random(11)}
    kill_session(proc)  # a graceful Ray Serve shutdown takes ~40 s here; what it leaves is not under test


def test_serve_and_a_cli_delete_share_the_log(served, tmp_path):
    """Seen before: the CLI's coordinator took the server's pending request, failed it and
    wiped its ids; the server then marked the empty entry done. Now: serve applies A, B is
    queued behind it, a CLI delete of C waits or applies; all three are done."""
    state, url = served, served["url"]
    a, b, c = victims(state, 3, shard=0)  # one shard: the other answers meanwhile
    answers = Answers(url)
    acks = {}
    status, out = http(url, "/delete", {"ids": [a]})
    assert status == 202
    acks[out["request_id"]] = time.time()
    state["deleted"].add(a)
    wait_until(lambda: queue(state["store"], "r").get(out["request_id"], {}).get("status") == "applying",
               60, "serve to apply A")
    status, out = http(url, "/delete", {"ids": [b]})
    assert status == 202
    acks[out["request_id"]] = time.time()
    state["deleted"].add(b)
    cli = run_cli("delete", "--run", "r", "--store", state["store"], "--ids", c, "--json", "--quiet")
    assert cli.returncode == 0, cli.stderr
    receipt_c = json.loads(cli.stdout)
    state["deleted"].add(c)
    receipts = [(wait_done(url, rid), t) for rid, t in acks.items()]
    receipts.append((receipt_c, datetime.fromisoformat(receipt_c["accepted"]).timestamp()))
    time.sleep(0.5)
    seen = answers.stop()
    assert all(r["status"] == "done" and r["records_deleted"] == 1 for r, _ in receipts), receipts
    assert assert_withheld(seen, receipts) > 0, "no answer overlapped a deletion; the test proves nothing"
    assert_all_applied(state["store"], "r", at_least=3)
    assert_no_trace(state["store"], RECORDS, state["deleted"])
    assert_sisa_exact(state["store"], "r", RECORDS, state["deleted"], CFG, str(tmp_path / "fresh"))


def test_http_contract(served):
    state, url = served, served["url"]
    status, out = http(url, "/predict", {"texts": ["great fun", "dull"]})
    assert status == 200 and out["shards"] == [0, 1] and len(out["predictions"]) == 2
    assert set(out["predictions"][0]) >= {"label", "probabilities", "votes"} and out["quarantined"] == []
    victim = victims(state, 1)[0]
    status, out = http(url, "/delete", {"ids": [victim]})
    assert status == 202
    req = wait_done(url, out["request_id"])
    state["deleted"].add(victim)
    assert req["status"] == "done" and req["records_deleted"] == 1 and len(req["shards"]) == 1
    assert req["ids"] == [] and req["owners"] == []  # the receipt keeps no trace of what was deleted
    status, out = http(url, "/delete", {"ids": ["nope"]})
    assert status == 400 and out["error"] == 'run "r": unknown id "nope"; request not accepted, nothing was deleted'
    status, out = http(url, "/predict", {"texts": []})
    assert status == 400 and "'texts' must be a non-empty list" in out["error"]
    status, out = http(url, "/generate", {"prompts": ["Q: who?\nA:"]})  # routed to the coordinator: a classifier run
    assert status == 400 and "objective classify" in out["error"], out
    for bad in ("none-such", "..%2F..%2FHEAD", "x%00y", "00000000000000000001-00000000"):
        status, out = http(url, f"/requests/{bad}")
        assert status == 404 and "no request" in out["error"], (bad, status, out)


def test_the_intake_port_accepts_and_withholds_as_the_serve_port(served, tmp_path):
    """`--intake-port`: the same routes from the serve process without Ray Serve. Deletions
    sent there at once form groups, every 202 is in the durable log, and predictions asked
    on either port never come from a shard whose deletion is acknowledged."""
    from concurrent.futures import ThreadPoolExecutor

    state, intake, url = served, served["intake"], served["url"]
    status, out = http(intake, "/predict", {"texts": ["great fun", "dull"]})
    assert status == 200 and out["shards"] == [0, 1] and len(out["predictions"]) == 2
    answers, answers_serve = Answers(intake), Answers(url)
    victims_ = victims(state, 6, shard=0)  # one shard: the other answers meanwhile
    acks = {}

    def post(victim):
        status, out = http(intake, "/delete", {"ids": [victim]})
        assert status == 202, out
        assert out["request_id"] in queue(state["store"], "r")  # durable before the 202
        return out["request_id"], time.time()

    with ThreadPoolExecutor(6) as ex:
        for rid, t in ex.map(post, victims_):
            acks[rid] = t
    state["deleted"].update(victims_)
    receipts = [(wait_done(intake, rid), t) for rid, t in acks.items()]
    time.sleep(0.5)
    seen, seen_serve = answers.stop(), answers_serve.stop()
    assert all(r["status"] == "done" and r["records_deleted"] == 1 for r, _ in receipts), receipts
    assert assert_withheld(seen, receipts) + assert_withheld(seen_serve, receipts) > 0, \
        "no answer overlapped a deletion; the test proves nothing"
    status, out = http(intake, "/delete", {"ids": ["nope"]})
    assert status == 400 and out["error"] == 'run "r": unknown id "nope"; request not accepted, nothing was deleted'
    status, out = http(intake, "/requests/00000000000000000001-00000000")
    assert status == 404 and "no request" in out["error"]
    port = int(intake.rsplit(":", 1)[1])
    assert_endless_body_is_cut_off(port, b"Transfer-Encoding: chunked", b"request body is over the limit of 1048576 bytes")
    assert_all_applied(state["store"], "r", at_least=6)
    assert_no_trace(state["store"], RECORDS, state["deleted"])
    assert_sisa_exact(state["store"], "r", RECORDS, state["deleted"], CFG, str(tmp_path / "fresh"))


def test_http_input_is_strict_through_the_real_server(served):
    """What the red team sent, through Ray Serve's proxy: each a 4xx in one line, nothing
    queued (tests/test_http_input.py has the cases one by one)."""
    from http.client import HTTPConnection

    url, port = served["url"], int(served["url"].rsplit(":", 1)[1])
    before = set(queue(served["store"], "r"))

    def send(path, raw):
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", path, body=raw, headers={"Content-Length": str(len(raw))})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    status, out = http(url, "/delete", {"ids": ["\ud800"]})
    assert status == 400 and out["error"].startswith("'ids'[0] is not valid Unicode (a lone surrogate U+D800"), out
    status, out = http(url, "/predict", {"texts": ["great fun"], "wait": "yes"})
    assert (status, out["error"]) == (400, "'wait' must be true or false, not a string")
    status, out = send("/predict", b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert (status, out["error"]) == (400, "request body nests arrays or objects deeper than 32 levels")
    # an endless body, declared too long or chunked (no Content-Length: counted as read)
    assert_endless_body_is_cut_off(port, b"Content-Length: 1073741824",
                                   b"request body of 1073741824 bytes is over the limit of 1048576 bytes")
    assert_endless_body_is_cut_off(port, b"Transfer-Encoding: chunked", b"request body is over the limit of 1048576 bytes")
    status, out = http(url, "/delete", {"ids": ["r0001"], "owners": ["o"]})
    assert (status, out["error"]) == (400, "a deletion request takes 'ids' or 'owners', not both (send two requests)")
    assert set(queue(served["store"], "r")) == before


def assert_endless_body_is_cut_off(port: int, header: bytes, error: bytes) -> None:
    """Seen: after the 413 the server kept the connection and read an endless chunked body
    on (23 GB in 20 s). Now the 413 comes, then the server closes while the client still
    sends (reading the answer meanwhile: once the server closes, the client's next bytes
    draw a reset, which may discard an answer not yet read)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n" if b"chunked" in header else b"x" * 0x10000
    sent, stop = [0, None], time.monotonic() + 30

    def pour():  # until the server stops taking it, or 30 s
        try:
            while time.monotonic() < stop:
                sock.sendall(chunk)
                sent[0] += len(chunk)
        except OSError as exc:
            sent[1] = exc

    pourer = threading.Thread(target=pour, daemon=True)
    pourer.start()
    answer, end = b"", "closed"
    try:
        while piece := sock.recv(1 << 16):
            answer += piece
    except ConnectionResetError:  # closed with the client's bytes unread: a reset after the answer
        pass
    except TimeoutError:
        end = "still open after 10 s"
    pourer.join(15 if end == "closed" else 0)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413 ") and error in answer, answer[:300]
    assert b"connection: close" in answer.lower()
    assert end == "closed" and isinstance(sent[1], OSError), f"the server went on reading the body: {end}"
    assert time.monotonic() < stop and not pourer.is_alive()


def test_read_only_commands_never_lock_or_apply_and_serve_withholds(served, tmp_path, capsys):
    """Seen before: `unlearn predict` on Ray took over the server's pending request, said
    "every shard is empty", and left holding the lock. Now, with the lock held by a live
    process, a request accepted by serve stays queued; predict (Ray), eval, status and
    requests in other processes change nothing and answer without its shard."""
    from core.lock import RunLock
    from core.store import LocalStore

    state, url = served, served["url"]
    store = LocalStore(state["store"])
    victim = victims(state, 1)[0]
    texts = tmp_path / "t.txt"
    texts.write_text("great fun\n")
    write_jsonl(tmp_path / "e.jsonl", RECORDS[:4])
    with RunLock(store, "r", "delete") as held:
        status, out = http(url, "/delete", {"ids": [victim]})
        assert status == 202
        state["deleted"].add(victim)
        rid = out["request_id"]
        entry = store.get(f"r/queue/{rid}.json")  # a group of one: it came alone
        shard = json.loads(entry)["requests"][0]["units"][0]
        status, answer = http(url, "/predict", {"texts": ["great fun"]})
        assert status == 200 and answer["quarantined"] == [shard] and shard not in answer["shards"]
        out = run_cli("predict", "--run", "r", "--store", state["store"], "--input", str(texts), "--json",
                      runtime="ray")
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["quarantined"] == [shard] and answer["shards"] == [1 - shard]
        for args in (["status"], ["requests"], ["eval", "--data", str(tmp_path / "e.jsonl"), "--runtime", "local"]):
            capsys.readouterr()  # in this (test) process: neither the server's nor the lock holder's
            assert main([*args, "--run", "r", "--store", state["store"], "--json"]) == 0
            if args == ["status"]:  # says what is queued and withheld
                st = json.loads(capsys.readouterr().out)
                assert [q["request_id"] for q in st["queued_requests"]] == [rid] and st["quarantined"] == [shard]
        assert store.get(f"r/queue/{rid}.json") == entry  # nobody rewrote, failed or stripped it
        assert json.loads(store.get("r/LOCK"))["token"] == held.token
    assert wait_done(url, rid)["status"] == "done"
    assert_all_applied(state["store"], "r", at_least=1)
    assert_no_trace(state["store"], RECORDS, state["deleted"])


def test_a_corrupted_log_entry_is_one_line_and_the_rest_works(served, tmp_path):
    """Seen before: one truncated request-log entry made every Ray delete and predict print
    a 100-line ActorDiedError and serve answer 500. Now a damaged receipt is one warning
    line and skipped; a damaged queue entry too, but as it could name any record, nothing
    answers (503) until it is removed; the other requests are applied meanwhile."""
    state, url = served, served["url"]
    folder = os.path.join(state["store"], "r", "queue")
    bad = os.path.join(folder, "00000000000000000001-deadbeef.json")
    os.makedirs(folder, exist_ok=True)
    with open(bad, "w") as f:
        f.write('{"request_id": "00000000000000000001-deadbeef", "ids": ["r00')
    status, out = http(url, "/predict", {"texts": ["great fun"]})
    assert status == 503 and "00000000000000000001-deadbeef" in out["error"] and "--discard-damaged" in out["error"]
    victim = victims(state, 1)[0]
    status, out = http(url, "/delete", {"ids": [victim]})
    assert status == 202 and wait_done(url, out["request_id"])["status"] == "done"
    state["deleted"].add(victim)
    receipt = os.path.join(state["store"], "r", "requests", out["request_id"] + ".json")
    with open(receipt, "r+") as f:  # and a damaged receipt
        text = f.read()
        f.seek(0)
        f.write(text.replace('"done"', '"dome"'))
    listing = run_cli("requests", "--run", "r", "--store", state["store"])
    assert listing.returncode == 0
    warnings = sorted(line for line in listing.stderr.splitlines() if "damaged" in line)
    assert warnings == [
        'unlearn: warning: run "r": request log entry "00000000000000000001-deadbeef" is damaged (Unterminated '
        'string starting at: line 1 column 57 (char 56)); skipped',
        f'unlearn: warning: run "r": request log entry "{out["request_id"]}" is damaged (its content does not '
        f'match its checksum); skipped'], listing.stderr
    victim = victims(state, 1)[0]
    cli = run_cli("delete", "--run", "r", "--store", state["store"], "--ids", victim, "--quiet")
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    state["deleted"].add(victim)
    gone = run_cli("resume", "--run", "r", "--store", state["store"], "--discard-damaged")
    assert gone.returncode == 0 and "removed" in gone.stderr and not os.path.exists(bad), gone.stderr
    status, out = http(url, "/predict", {"texts": ["great fun"]})
    assert status == 200 and out["shards"] == [0, 1]
    with open(receipt, "w") as f:
        f.write(text)  # restored from a backup
    assert_all_applied(state["store"], "r", at_least=2)


def test_a_cli_delete_applying_is_withheld_by_serve_in_another_process(served, tmp_path):
    """Seen before: while a CLI delete retrained a shard (19 s), serve in another process
    answered 35 times from that shard."""
    state, url = served, served["url"]
    victim = victims(state, 1)[0]
    answers = Answers(url)
    time.sleep(0.5)
    cli = run_cli("delete", "--run", "r", "--store", state["store"], "--ids", victim, "--json", "--quiet")
    assert cli.returncode == 0, cli.stderr
    state["deleted"].add(victim)
    receipt = json.loads(cli.stdout)
    time.sleep(0.5)
    seen = answers.stop()
    acked = datetime.fromisoformat(receipt["accepted"]).timestamp()
    assert assert_withheld(seen, [(receipt, acked)]) > 0, "no answer overlapped the deletion"
    assert seen[-1][2] == [0, 1]
    assert_all_applied(state["store"], "r", at_least=1)
    assert_no_trace(state["store"], RECORDS, state["deleted"])
    assert_sisa_exact(state["store"], "r", RECORDS, state["deleted"], CFG, str(tmp_path / "fresh"))
