"""Strict HTTP input for `unlearn serve`: what the red team sent, and what comes back.

Two levels, both in this process and without Ray running: the pure request parsing of
`cluster/http_api.py`, and the ingress of `cluster/serving.py` itself (the class under
Ray Serve's decorator) driven through Starlette with a fake coordinator, so that what
reaches the coordinator, and what goes back, is checked."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from core.errors import Unavailable, UnlearnError

DEEP = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
RID = "00000000000000000001-0123abcd"


# -- the ingress, driven in this process -------------------------------------------------
class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


class FakeCoordinator:
    """Records what reaches it; `fail` (an exception) is raised by every call."""

    def __init__(self):
        self.calls, self.fail = [], None
        self.predict = _Remote(lambda texts, aggregate, wait: self._do("predict", texts, wait))
        self.submit_bulk = _Remote(lambda bulks: [[self._do("submit", *req) for req in bulk] for bulk in bulks])
        self.get = _Remote(lambda request_id: self._do("get", request_id))

    def _do(self, what, *args):
        self.calls.append((what, *args))
        if self.fail is not None:
            raise self.fail
        if what == "predict":
            return {"predictions": [{"label": "pos", "text": t} for t in args[0]], "shards": [0], "quarantined": []}
        return "00000000000000000002-0123abcd" if what == "submit" else {"request_id": args[0], "status": "done"}


@pytest.fixture(scope="module")
def ingress_class():
    from cluster.serving import _ingress_class

    return _ingress_class().func_or_class  # the class under @serve.deployment


@pytest.fixture
def server(ingress_class):
    coordinator = FakeCoordinator()
    ingress = ingress_class(coordinator, "vote")

    async def predict(batch):  # @serve.batch needs a Serve replica: one request, one batch
        texts, wait = batch
        out = await coordinator.predict.remote(texts, "vote", wait)
        return {**out, "predictions": out["predictions"][:len(texts)]}

    async def delete(bulk):  # likewise: one POST /delete, one batch
        (out,) = await coordinator.submit_bulk.remote([bulk])
        return out

    ingress.predict = predict
    ingress.delete = delete
    return ingress, coordinator


class Sent:
    """A request body as the client sends it: chunks, and how many the server read."""

    def __init__(self, body: bytes, chunk: int = 1 << 16):
        self.chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
        self.read = 0

    async def receive(self):
        if self.read >= len(self.chunks):
            return {"type": "http.disconnect"}
        self.read += 1
        return {"type": "http.request", "body": self.chunks[self.read - 1], "more_body": self.read < len(self.chunks)}


def call(server, method: str, path: str, body=None, length: str | None = "auto", raw: bytes | None = None,
         sent=None):
    """(status, JSON answer, Sent) from the ingress; `path` as the ASGI server decoded it.
    The response is kept as `sent.response`; no Content-Length means a chunked body."""
    from starlette.requests import Request

    ingress, _coordinator = server
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    headers = [(b"transfer-encoding", b"chunked")] if length is None else \
        [(b"content-length", str(len(data) if length == "auto" else length).encode())]
    sent = sent or Sent(data)
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode("utf-8", "surrogateescape"),
             "query_string": b"", "headers": headers}
    response = sent.response = asyncio.run(ingress(Request(scope, sent.receive)))
    answer = json.loads(response.body)
    if response.status_code >= 400:
        assert set(answer) == {"error"} and "\n" not in answer["error"] and len(answer["error"]) < 1100, answer
    return response.status_code, answer, sent


def test_a_well_formed_request_still_reaches_the_coordinator(server):
    _ingress, coordinator = server
    status, out, _ = call(server, "POST", "/predict", {"texts": ["great fun", "\u00e9t\u00e9 \u2603"], "wait": True})
    assert status == 200 and [p["text"] for p in out["predictions"]] == ["great fun", "\u00e9t\u00e9 \u2603"]
    status, out, _ = call(server, "POST", "/delete/", {"ids": ["r0001"], "ignore_missing": True})
    assert status == 202 and out["request_id"].endswith("-0123abcd")
    status, out, _ = call(server, "POST", "/delete", {"owners": ["o 1"]})
    assert status == 202
    status, out, _ = call(server, "GET", f"/requests/{RID}")
    assert status == 200 and out["request_id"] == RID
    assert coordinator.calls == [("predict", ["great fun", "\u00e9t\u00e9 \u2603"], True),
                                 ("submit", ["r0001"], [], True), ("submit", [], ["o 1"], False), ("get", RID)]


def test_lone_surrogates_and_unsafe_ids_are_400_naming_field_and_index(server):
    """Seen: {"texts": ["\\ud800"]} was a bare 500 (the answer echoing it could not be
    encoded), {"ids": ["\\ud800"]} reached the store's hashing. Ids and owners now pass the
    checks of training data (core.records.id_problem / owner_problem)."""
    _ingress, coordinator = server
    cases = [
        ({"texts": ["fine", "a\ud800b"]}, "/predict", "'texts'[1] is not valid Unicode (a lone surrogate U+D800 at character 1)"),
        ({"ids": ["r0001", "\udfff"]}, "/delete", "'ids'[1] is not valid Unicode (a lone surrogate U+DFFF"),
        ({"owners": ["\ud800"]}, "/delete", "'owners'[0] is not valid Unicode"),
        ({"ids": ["../HEAD"]}, "/delete", "'ids'[0] contains '..': \"../HEAD\" is not a valid record id"),
        ({"ids": ["a", "x/y"]}, "/delete", "'ids'[1] contains the path separator '/'"),
        ({"ids": ["a\u0000b"]}, "/delete", "'ids'[0] contains the control character U+0000: \"a\\u0000b\""),
        ({"ids": [" r0001"]}, "/delete", "'ids'[0] has leading or trailing whitespace"),
        ({"ids": ["x" * 300]}, "/delete", "'ids'[0] is longer than 256 characters"),
        ({"owners": ["a,b"]}, "/delete", "'owners'[0] contains a comma"),
        ({"ids": [""]}, "/delete", "'ids'[0] must be a non-empty string (got an empty one)"),
        ({"ids": [7]}, "/delete", "'ids'[0] must be a non-empty string (got a number)"),
        ({"ids": "r0001"}, "/delete", "'ids' must be a list of non-empty strings (got a string)"),
        ({"ids": []}, "/delete", "a deletion request needs 'ids' or 'owners'"),
        ({"texts": []}, "/predict", "'texts' must be a non-empty list of non-empty strings (got an empty list)"),
        ({}, "/predict", "'texts' must be a non-empty list of non-empty strings (got missing)"),
    ]
    for body, path, message in cases:
        status, out, _ = call(server, "POST", path, body)
        assert status == 400 and out["error"].startswith(message), (body, status, out)
    assert coordinator.calls == []


def test_deep_nesting_is_400_at_once(server):
    """Seen: a body nested 100,000 deep was a 500 (RecursionError in the JSON parser)."""
    _ingress, coordinator = server
    t0 = time.perf_counter()
    for raw in (DEEP, b"[" * 100_000, b'{"texts": ["a", {"b": ' * 40 + b"1" + b"}]" * 40 + b"}"):
        status, out, _ = call(server, "POST", "/predict", raw=raw)
        assert status == 400 and out["error"] == "request body nests arrays or objects deeper than 32 levels", out
    assert time.perf_counter() - t0 < 2.0
    assert coordinator.calls == []


def test_malformed_request_ids_are_404_and_never_reach_the_store(server):
    """Seen: GET /requests/..%2F..%2FHEAD and /requests/x%00y were bare 500s. The id must
    have the form request ids are made with (cluster/requestlog.py) or it names nothing."""
    _ingress, coordinator = server
    for decoded in ("../../HEAD", "x\x00y", "x" * 5000, "", "00000000000000000001-0123ABCD", f"{RID}/../x"):
        status, out, _ = call(server, "GET", f"/requests/{decoded}")
        assert status == 404 and out["error"].startswith("no request "), (decoded, out)
    assert out["error"] == 'no request "00000000000000000001-0123abcd/../x"'
    status, out, _ = call(server, "GET", "/requests/" + "y" * 5000)
    assert out["error"] == 'no request "' + "y" * 64 + '..."'
    assert coordinator.calls == []
    from cluster.requestlog import UnknownRequest  # a well-formed id still goes to the log

    coordinator.fail = UnknownRequest(f'run "r": no request "{RID}"')
    status, out, _ = call(server, "GET", f"/requests/{RID}/")
    assert status == 404 and out["error"] == f'run "r": no request "{RID}"' and coordinator.calls == [("get", RID)]


def test_flags_are_json_booleans_and_unknown_fields_are_refused(server):
    """Seen: "wait": "yes" and "ignore_missing": "no" were both taken as true."""
    _ingress, coordinator = server
    cases = [
        ("/predict", {"texts": ["a"], "wait": "yes"}, "'wait' must be true or false, not a string"),
        ("/predict", {"texts": ["a"], "wait": 1}, "'wait' must be true or false, not a number"),
        ("/predict", {"texts": ["a"], "wait": None}, "'wait' must be true or false, not null"),
        ("/delete", {"ids": ["a"], "ignore_missing": "no"}, "'ignore_missing' must be true or false, not a string"),
        ("/predict", {"texts": ["a"], "text": "b"}, "unknown field \"text\" (this route takes 'texts', 'wait')"),
        ("/delete", {"ids": ["a"], "owner": ["b"]}, "unknown field \"owner\" (this route takes 'ids', 'owners', 'ignore_missing')"),
        ("/delete", {"ids": ["a"], "\ud800": 1}, "unknown field \"\\ud800\""),
    ]
    for path, body, message in cases:
        status, out, _ = call(server, "POST", path, body)
        assert status == 400 and out["error"].startswith(message), (body, out)
    status, out, _ = call(server, "POST", "/predict", raw=b'{"texts": ["a"], "wait": false, "wait": true}')
    assert status == 400 and out["error"] == 'field "wait" is given twice'
    for path, method in (("/predict", "GET"), ("/delete", "PUT"), (f"/requests/{RID}", "POST")):
        status, out, _ = call(server, method, path, {"texts": ["a"]})
        assert status == 405 and out["error"].startswith("use "), out
    status, out, _ = call(server, "POST", "/nowhere", {"texts": ["a"]})
    assert status == 404 and out["error"] == 'no route "POST" "/nowhere"'
    assert coordinator.calls == []
    status, _, _ = call(server, "POST", "/predict", {"texts": ["a"], "wait": False})
    assert status == 200 and coordinator.calls == [("predict", ["a"], False)]


def test_body_limits_413_whatever_content_length_says_and_400_past_the_counts(server):
    """Seen: a 10 MB text was accepted and echoed back. The limits are documented (README)."""
    MAX_BODY_BYTES, MAX_TEXT_CHARS, MAX_TEXTS = 1 << 20, 10_000, 1000
    _ingress, coordinator = server
    big = json.dumps({"texts": ["x" * (2 * MAX_BODY_BYTES)]}).encode()
    status, out, sent = call(server, "POST", "/predict", raw=big)  # declared: refused before reading
    assert status == 413 and out["error"] == f"request body of {len(big)} bytes is over the limit of 1048576 bytes"
    assert sent.read == 0
    for length in ("10", None):  # a lying or missing Content-Length: refused while reading
        status, out, sent = call(server, "POST", "/predict", raw=big, length=length)
        assert status == 413 and out["error"] == "request body is over the limit of 1048576 bytes", out
        assert sent.read == MAX_BODY_BYTES // (1 << 16) + 1 < len(sent.chunks)
    status, out, _ = call(server, "POST", "/predict", raw=b"{}", length="1e9")
    assert status == 400 and out["error"] == 'Content-Length "1e9" is not a number of bytes'
    status, out, _ = call(server, "POST", "/predict", {"texts": ["a"] * (MAX_TEXTS + 1)})
    assert status == 400 and out["error"] == "'texts': 1001 items, more than the 1000 a request may carry"
    status, out, _ = call(server, "POST", "/predict", {"texts": ["ok", "y" * (MAX_TEXT_CHARS + 1)]})
    assert status == 400 and out["error"] == \
        "'texts'[1] is longer than 10000 characters (10001): \"" + "y" * 64 + '..."'
    assert coordinator.calls == []
    body = {"texts": ["z" * MAX_TEXT_CHARS] * 100}  # 1,000,000 characters of text: under every limit
    status, out, _ = call(server, "POST", "/predict", body)
    assert status == 200 and len(out["predictions"]) == 100


def test_errors_from_behind_the_server_never_name_the_store_nor_echo_much(server, ingress_class):
    """Seen: a 400 said `store /abs/path/of/the/store: cannot write ...`. The server names
    its store to the ingress (exact, spaces and all); any other absolute path or URL in a
    message from behind it is hidden too, and long quoted values are cut."""
    _ingress, coordinator = server
    for exc in (UnlearnError("store /srv/secret/unlearn-store: cannot write r/queue/1.json: No space left on device"),
                UnlearnError("model folder /home/secret/.cache/minilm is missing config.json"),
                UnlearnError("s3://secret-bucket/runs: put failed: SlowDown")):
        coordinator.fail = exc
        status, out, _ = call(server, "POST", "/delete", {"owners": ["o"]})
        assert status == 400 and "secret" not in out["error"], out
    store = "/srv/secret place/unlearn-store"
    ingress = ingress_class(coordinator, "vote", store)
    ingress.predict, ingress.delete = server[0].predict, server[0].delete
    server = (ingress, coordinator)
    cases = [
        (UnlearnError(f"store {store}: cannot write r/queue/1.json: No space left on device"), 400,
         "the store: cannot write r/queue/1.json: No space left on device"),
        (UnlearnError(f'run "r" not found in store {store}'), 400, 'run "r" not found in the store'),
        (UnlearnError(f"{store}/r/manifests/ab.json: unreadable manifest"), 400, "r/manifests/ab.json: unreadable manifest"),
        (UnlearnError("s3://bucket/runs: put failed: SlowDown"), 400, "<url>: put failed: SlowDown"),
        (UnlearnError('s3://b/r: get failed: Could not connect to the endpoint URL: "http://10.0.0.7:8333/b/r/HEAD"'), 400,
         '<url>: get failed: Could not connect to the endpoint URL: "<url>"'),
        (UnlearnError("model folder /home/me/.cache/unlearn/minilm is missing config.json"), 400,
         "model folder <path> is missing config.json"),
        (UnlearnError(f'run "r": unknown owner "{"o" * 100_000}"; request not accepted, nothing was deleted'), 400,
         f'run "r": unknown owner "{"o" * 64}..."; request not accepted, nothing was deleted'),
        (Unavailable('run "r": every shard holding records is being retrained; ask again, or wait'), 503,
         'run "r": every shard holding records is being retrained; ask again, or wait'),
        (RuntimeError(f"boom in {store}"), 500, "internal error (RuntimeError); the server log has the details"),
    ]
    for exc, code, message in cases:
        coordinator.fail = exc
        status, out, _ = call(server, "POST", "/delete", {"owners": ["o"]})
        assert (status, out["error"]) == (code, message)
    status, out, _ = call(server, "POST", "/predict", {"texts": ["a"]})
    assert status == 500 and "secret" not in out["error"]


def test_a_receipt_over_http_does_not_name_the_store(server):
    """The log keeps the error lines of the process that applied a request (`last_error`,
    `reason`, `warnings`): a receipt read over HTTP says them without the store's path."""
    _ingress, coordinator = server
    line = "store /srv/secret/unlearn-store: object r/ckpt/0/1-ab.safetensors is corrupted"
    coordinator._do = lambda what, *args: {"request_id": RID, "status": "failed", "last_error": line,
                                           "reason": f"{line}; kept for retry", "warnings": [line], "ids": []}
    status, out, _ = call(server, "GET", f"/requests/{RID}")
    assert status == 200 and out["status"] == "failed" and "secret" not in json.dumps(out), out
    assert out["last_error"] == "store <path>: object r/ckpt/0/1-ab.safetensors is corrupted"
    assert out["warnings"] == [out["last_error"]] and out["reason"].endswith("; kept for retry")


def test_ids_and_owners_together_are_refused_as_by_the_cli(server):
    """Seen: {"ids": [...], "owners": [...]} was accepted over HTTP while the CLI refuses
    --ids with --owners (exit 2). Now a 400 naming both fields, even with one list empty."""
    _ingress, coordinator = server
    for body in ({"ids": ["r0001"], "owners": ["o 1"]}, {"owners": ["o 1"], "ids": []},
                 {"ids": ["r0001"], "owners": [], "ignore_missing": True}):
        status, out, _ = call(server, "POST", "/delete", body)
        assert (status, out["error"]) == \
            (400, "a deletion request takes 'ids' or 'owners', not both (send two requests)"), body
    assert coordinator.calls == []


def test_an_answer_before_the_body_is_read_closes_the_connection(server):
    """Seen: after a 413 the server (uvicorn under Ray Serve's proxy) kept the connection
    alive and read the rest of an endless chunked body (23 GB in 20 s). Every answer given
    before the body was read to its end now says `Connection: close` (uvicorn closes the
    connection then, reading no more); an answer after the whole body keeps it alive."""
    big = b'{"texts": ["' + b"x" * (2 << 20) + b'"]}'
    closed = [call(server, "POST", "/predict", raw=big),  # 413 from Content-Length
              call(server, "POST", "/predict", raw=big, length=None),  # 413 while reading, chunked
              call(server, "POST", "/nowhere", raw=big, length=None),  # 404 before reading
              call(server, "PUT", "/delete", raw=big),  # 405 before reading
              call(server, "GET", f"/requests/{RID}", raw=b"{}", length=None)]  # a lookup never reads
    assert [status for status, _, _ in closed] == [413, 413, 404, 405, 200]
    for _status, _out, sent in closed:
        assert sent.response.headers.get("connection") == "close"
    kept = [call(server, "POST", "/predict", {"texts": ["a"]}), call(server, "POST", "/predict", raw=b"{", length=None),
            call(server, "GET", f"/requests/{RID}", length="0")]
    assert [status for status, _, _ in kept] == [200, 400, 200]
    for _status, _out, sent in kept:
        assert "connection" not in sent.response.headers


class Stalls(Sent):
    """A body that sends `first`, then a byte every `every` seconds (or, None, nothing more);
    the client gives up after 3 s (so that a server without a timeout fails the test)."""

    def __init__(self, first: bytes, every: float | None = None):
        super().__init__(first)
        self.every, self.until = every, time.monotonic() + 3

    async def receive(self):
        if self.read == 0:
            return await super().receive() | {"more_body": True}
        self.read += 1
        await asyncio.sleep(min(self.every or 3, max(self.until - time.monotonic(), 0)))
        if time.monotonic() >= self.until:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b" ", "more_body": True}


def test_a_body_that_stalls_or_trickles_is_408_and_closes(server, monkeypatch):
    """Seen: `Content-Length: 900000`, 100 bytes, then silence held the request open for
    ever. The whole body must now arrive within BODY_TIMEOUT_S (30 s; lowered here): a
    stalled one and one trickling a byte at a time both get 408 and the connection closes."""
    import cluster.http_api as http_api

    monkeypatch.setattr(http_api, "BODY_TIMEOUT_S", 0.3, raising=False)
    _ingress, coordinator = server
    for sent in (Stalls(b'{"texts": ["' + b"a" * 88), Stalls(b'{"texts": ["' + b"a" * 88, every=0.02)):
        t0 = time.perf_counter()
        status, out, _ = call(server, "POST", "/predict", raw=b"", length="900000", sent=sent)
        assert time.perf_counter() - t0 < 2.0 and status == 408, out
        assert out["error"].startswith("request body not complete within 0.3 s ("), out
        assert sent.response.headers.get("connection") == "close"
    assert sent.read > 5  # the trickle was read while it lasted: the limit is for the whole body
    gone = Stalls(b'{"texts": ["')
    gone.until = 0  # the client goes away mid-body: no 500 and traceback in the log
    status, out, _ = call(server, "POST", "/predict", raw=b"", length="900000", sent=gone)
    assert (status, out["error"]) == (400, "the client went away before the body was complete")
    assert coordinator.calls == []


def test_a_bulk_of_deletions_is_one_call_and_its_errors_name_the_request(server):
    _ingress, coordinator = server
    status, out, _ = call(server, "POST", "/delete", {"requests": [{"ids": ["r1", "r2"]}, {"owners": ["o 1"]},
                                                                   {"ids": ["r3"], "ignore_missing": True}]})
    assert status == 202 and len(out["request_ids"]) == 3 and set(out) == {"request_ids"}
    assert coordinator.calls == [("submit", ["r1", "r2"], [], False), ("submit", [], ["o 1"], False),
                                 ("submit", ["r3"], [], True)]
    for body, message in [
        ({"requests": []}, "'requests' must be a non-empty list of deletion requests (got an empty list)"),
        ({"requests": {"ids": ["a"]}}, "'requests' must be a non-empty list of deletion requests (got an object)"),
        ({"requests": [{"ids": ["a"]}, "b"]}, "'requests'[1] must be an object (a deletion request), not a string"),
        ({"requests": [{"ids": ["a"]}, {"ids": ["a\tb"]}]}, "'requests'[1]: 'ids'[0] "),
        ({"requests": [{"ids": ["a"], "owners": ["o"]}]}, "'requests'[0]: a deletion request takes 'ids' or 'owners'"),
        ({"requests": [{"ids": ["a"]}], "ids": ["b"]}, "unknown field \"ids\""),
        ({"requests": [{"ids": ["a"]}] * 1001}, "1001 deletion requests, more than the 1000 a bulk may carry"),
        ({"requests": [{"ids": [f"r{i}" for i in range(5000)]}] * 3}, "more than the 10000 ids and owners a bulk"),
    ]:
        status, out, _ = call(server, "POST", "/delete", body)
        assert status == 400 and message in out["error"], (body if len(json.dumps(body)) < 200 else message, out)
    assert len(coordinator.calls) == 3  # nothing of a refused bulk reached the coordinator


# -- the pure parts ----------------------------------------------------------------------------
def test_parse_request_returns_validated_requests():
    from cluster.http_api import Delete, Lookup, Predict, parse_request

    assert parse_request("POST", "/predict", b'{"texts": ["a", "b"]}') == Predict(("a", "b"), False)
    assert parse_request("POST", "/delete", b'{"owners": ["o"], "ignore_missing": true}') == Delete((), ("o",), True)
    assert parse_request("GET", f"/requests/{RID}") == Lookup(RID)


def test_nesting_is_counted_outside_strings_only():
    from cluster.http_api import too_deep

    assert not too_deep(json.dumps({"texts": ["[" * 1000, "{[" * 500, '\\"[[[' * 100]}).encode())
    assert not too_deep(b'{"texts": ["\\"' + b"[" * 100)  # an unclosed string: the parser's error
    assert too_deep(b'{"a": "]]]]", "b": ' + b"[" * 33)
    assert too_deep(b'{"a": "\\\\", "b": ' + b"[" * 33)  # an escaped backslash ends no string
    assert too_deep(b'{"a": "\\\\\\"]]]", "b": ' + b"[" * 33)  # an escaped quote ends none
    assert not too_deep(b"[" * 32 + b"]" * 32) and too_deep(b"[" * 33 + b"]" * 33)
    t0 = time.perf_counter()
    assert not too_deep(b'"\\"' * 300_000)  # no quadratic rescanning of an unclosed string
    assert not too_deep(b"[]" * 500_000)
    assert time.perf_counter() - t0 < 2.0


def test_public_message_hides_every_store_location():
    from cluster.http_api import public_message

    assert public_message("s3://b/p: put failed: X", ["s3://b/p"]) == "the store: put failed: X"
    assert public_message("store /a/s: cannot read r/HEAD: Permission denied", ["/a/s/"]) == \
        "the store: cannot read r/HEAD: Permission denied"
    assert public_message('unknown id "a/b/c" in r/queue/x.json', []) == 'unknown id "a/b/c" in r/queue/x.json'
    assert public_message("contains the path separator '/'") == "contains the path separator '/'"
    assert public_message('run "r": store at /tmp/x/y went away\nTraceback') == 'run "r": store at <path> went away Traceback'
    t0 = time.perf_counter()  # linear: no pattern rescans a long run of letters, slashes or quotes
    for long in ("o" * 100_000, "/o" * 50_000, '"\\"' * 30_000, "s3:/" * 25_000):
        assert len(public_message(f"unknown owner {long} and more")) <= 1003
    assert time.perf_counter() - t0 < 2.0
    cut = public_message('unknown owner "' + "\\u00e9" * 40 + '"')
    assert cut.endswith('..."') and "\\u00e9\\u00e9" in cut and len(cut) < 100 and not cut[:-4].endswith("\\u00")
