"""The intake server of `unlearn serve --intake-port` (cluster/intake.py), without Ray:
how concurrent calls form groups, and the server on a real socket in front of a fake
coordinator (the same answers as the Serve port; tests/test_durability_serve.py runs it
for real, beside Ray Serve)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import pytest

from cluster.intake import GroupCall, IntakeFront, IntakeServer, bind
from core.errors import UnlearnError


def test_a_lone_call_goes_at_once_and_calls_meanwhile_form_the_next_group():
    seen: list[list[int]] = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.05)  # the durable write
        return [i * 10 for i in items]

    async def main():
        call = GroupCall(run, max_size=4)
        first = asyncio.ensure_future(call(0))
        await asyncio.sleep(0.01)  # 0 is in flight: the next nine wait for it
        rest = await asyncio.gather(*(call(i) for i in range(1, 10)))
        return await first, rest, call.groups

    first, rest, groups = asyncio.run(main())
    assert first == 0 and rest == [i * 10 for i in range(1, 10)]
    assert seen == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]] and groups == 4


def test_a_failed_group_fails_its_callers_only():
    async def run(items):
        await asyncio.sleep(0.01)
        if 1 in items:
            raise UnlearnError("the store is full")
        return items

    async def main():
        call = GroupCall(run, max_size=2)
        first = asyncio.ensure_future(call(0))
        await asyncio.sleep(0.001)
        results = await asyncio.gather(call(1), call(2), call(3), return_exceptions=True)
        return await first, results

    first, results = asyncio.run(main())
    assert first == 0
    assert isinstance(results[0], UnlearnError) and isinstance(results[1], UnlearnError) and results[2] == 3


def test_callers_waiting_when_the_server_stops_are_answered_not_left_hanging():
    async def run(items):
        await asyncio.sleep(10)
        return items

    async def main():
        call = GroupCall(run, max_size=1)
        calls = [asyncio.ensure_future(call(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        drains = [t for t in asyncio.all_tasks() if "_drain" in repr(t.get_coro())]
        assert len(drains) == 1
        drains[0].cancel()
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "stopped" in str(r) for r in results), results


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            await asyncio.sleep(0.02)
            return self.fn(*args)
        return call()


class Coordinator:
    def __init__(self):
        self.bulks: list[list] = []
        self.n = 0
        self.lock = threading.Lock()
        self.submit_bulk = _Remote(self._submit)
        self.predict = _Remote(lambda texts, aggregate, wait: {"predictions": [{"text": t} for t in texts],
                                                                "shards": [0, 1], "quarantined": []})
        self.get = _Remote(lambda rid: {"request_id": rid, "status": "done"})
        self.generate = _Remote(lambda *a: {"generations": []})

    def _submit(self, bulks):
        with self.lock:
            self.bulks.append(bulks)
            out = []
            for bulk in bulks:
                out.append([f"{self.n + i:020d}-0123abcd" for i in range(len(bulk))])
                self.n += len(bulk)
        return out


@pytest.fixture
def served():
    sock = bind("127.0.0.1", 0)
    coordinator = Coordinator()
    server = IntakeServer(sock, IntakeFront(coordinator, "vote"), ["/srv/secret-store"])
    server.start()
    yield sock.getsockname()[1], coordinator
    server.stop()


def post(port: int, path: str, body: bytes, conn: HTTPConnection | None = None) -> tuple[int, dict]:
    c = conn or HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    out = resp.status, json.loads(resp.read())
    if conn is None:
        c.close()
    return out


def test_posts_at_once_are_grouped_and_each_gets_its_own_request_id(served):
    port, coordinator = served

    def client(k):
        conn = HTTPConnection("127.0.0.1", port, timeout=30)  # keep-alive: 25 POSTs on one connection
        out = [post(port, "/delete", json.dumps({"ids": [f"r{k}-{i}"]}).encode(), conn) for i in range(25)]
        conn.close()
        return out

    with ThreadPoolExecutor(8) as ex:
        answers = [a for out in ex.map(client, range(8)) for a in out]
    assert all(status == 202 for status, _ in answers)
    ids = [out["request_id"] for _, out in answers]
    assert len(set(ids)) == 200
    sent = [req for bulks in coordinator.bulks for bulk in bulks for req in bulk]
    assert sorted(ids_ for ids_, _owners, _ignore in sent) == sorted([f"r{k}-{i}"] for k in range(8) for i in range(25))
    assert len(coordinator.bulks) < 200, "no group formed: one coordinator call per POST"


def test_the_intake_answers_every_route_as_the_serve_port(served):
    port, _ = served
    status, out = post(port, "/predict", b'{"texts": ["a", "b"]}')
    assert status == 200 and [p["text"] for p in out["predictions"]] == ["a", "b"] and out["shards"] == [0, 1]
    status, out = post(port, "/delete", b'{"requests": [{"ids": ["x"]}, {"owners": ["o"]}]}')
    assert status == 202 and len(out["request_ids"]) == 2
    c = HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", f"/requests/{out['request_ids'][0]}")
    resp = c.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "done"
    c.close()
    for path, body, want in [("/delete", b'{"ids": ["a"], "owners": ["o"]}', (400, "a deletion request takes 'ids'")),
                             ("/delete", b'{"ids": ["\\ud800"]}', (400, "'ids'[0] is not valid Unicode")),
                             ("/delete", b"[" * 100 + b"]" * 100, (400, "nests arrays or objects deeper")),
                             ("/delete", b"\xff", (400, "not valid UTF-8")),
                             ("/nowhere", b"{}", (404, "no route")),
                             ("/predict", b'{"texts": ["a"], "wait": "yes"}', (400, "'wait' must be true or false"))]:
        status, out = post(port, path, body)
        assert status == want[0] and want[1] in out["error"], (path, out)


def test_an_error_behind_the_intake_is_one_line_without_the_store(served):
    port, coordinator = served

    def full(bulks):
        raise UnlearnError("store /srv/secret-store: cannot write r/queue/1.json: No space left on device")

    coordinator.submit_bulk = _Remote(full)
    status, out = post(port, "/delete", b'{"ids": ["a"]}')
    assert status == 400 and out["error"] == "the store: cannot write r/queue/1.json: No space left on device"


def test_beyond_the_requests_in_flight_a_503_in_one_line():
    import time

    class Slow(Coordinator):
        def __init__(self):
            super().__init__()
            inner = self.submit_bulk.remote

            class _Slow:
                @staticmethod
                def remote(bulks):
                    async def call():
                        await asyncio.sleep(0.5)  # the durable write, holding the first request in flight
                        return await inner(bulks)
                    return call()

            self.submit_bulk = _Slow()

    sock = bind("127.0.0.1", 0)
    server = IntakeServer(sock, IntakeFront(Slow(), "vote"), [], max_in_flight=1)
    server.start()
    try:
        port = sock.getsockname()[1]
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(post, port, "/delete", b'{"ids": ["a"]}')
            time.sleep(0.2)
            second = post(port, "/delete", b'{"ids": ["b"]}')
            assert first.result()[0] == 202
        assert second[0] == 503 and second[1]["error"] == "busy: 1 requests in flight; send it again", second
        assert post(port, "/delete", b'{"ids": ["c"]}')[0] == 202  # free again
    finally:
        server.stop()


def test_a_request_head_over_64_kib_is_refused(served):
    port, _ = served
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /delete HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (200 * 1024) + b"\r\n\r\n")
    answer = b""
    try:
        while piece := sock.recv(65536):
            answer += piece
    except ConnectionResetError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]


def test_a_port_in_use_is_one_line():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(UnlearnError, match=r"^--intake-port \d+: cannot listen on 127.0.0.1 \(") as err:
            bind("127.0.0.1", taken.getsockname()[1])
        assert "\n" not in str(err.value)
    finally:
        taken.close()


def test_the_printed_address_brackets_an_ipv6_host():
    from cluster.serving import base_url

    assert base_url("127.0.0.1", 8001) == "http://127.0.0.1:8001"
    assert base_url("::1", 8001) == base_url("[::1]", 8001) == "http://[::1]:8001"
