"""The HTTP interface of `unlearn serve`, without Ray: routing, reading and validating a
request, and the one-line error that goes back (functional core of `serving.py`).

    POST /predict        {"texts": [str, ...], "wait": bool}
    POST /delete         {"ids": [str, ...] or "owners": [str, ...], "ignore_missing": bool}
                         or a bulk: {"requests": [{"ids": ...} or {"owners": ...}, ...]}
    GET  /requests/<id>

Strict: the body is one JSON object of at most MAX_BODY_BYTES, UTF-8, nested at most
MAX_DEPTH deep, no field twice and no field but those above; booleans are JSON booleans;
every string is valid Unicode (no lone surrogate from a `\\ud800` escape); ids and
owners pass the same checks as in training data (`core.records`), and a deletion names
ids or owners, not both (as the CLI's `--ids`/`--owners`). The whole body must arrive
within BODY_TIMEOUT_S. Anything else is an HttpError: a status (400, 404, 405, 408, 413)
and one line naming the field and the index. Values quoted back are JSON-encoded with
non-ASCII escaped and cut to QUOTE_CHARS. An answer given before the body was read to its
end closes the connection (`CLOSE`): the server then reads no more of it.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import AsyncIterable, Sequence

import numpy as np

from core.records import id_problem, owner_problem
from cluster.requestlog import valid_request_id

MAX_BODY_BYTES = 1 << 20  # 1 MiB
BODY_TIMEOUT_S = 30.0  # for the whole body to arrive, from the first read
MAX_TEXTS = 1000  # texts per /predict
MAX_PROMPTS = 64  # prompts per /generate (each costs up to max_new_tokens ensemble passes)
MAX_NEW_TOKENS = 512
MAX_TEXT_CHARS = 10_000  # characters per text
MAX_NAMES = 10_000  # ids (or owners) per /delete, all the requests of a bulk together
MAX_BULK = 1000  # deletion requests per /delete {"requests": [...]}
MAX_DEPTH = 32  # nesting of arrays and objects in a body
QUOTE_CHARS = 64  # characters of a value quoted back in a message
MAX_MESSAGE_CHARS = 1000


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Predict:
    texts: tuple[str, ...]
    wait: bool = False


@dataclass(frozen=True)
class Generate:
    prompts: tuple[str, ...]
    max_new_tokens: int = 32
    shard: int | None = None
    wait: bool = False


@dataclass(frozen=True)
class Delete:
    ids: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    ignore_missing: bool = False


@dataclass(frozen=True)
class DeleteMany:
    """A bulk of deletion requests in one POST: each gets its own request id and receipt;
    they are acknowledged together (one durable write) or refused together."""
    requests: tuple[Delete, ...]


@dataclass(frozen=True)
class Lookup:
    request_id: str


def short(value: object, limit: int = QUOTE_CHARS) -> str:
    """`value` JSON-encoded, non-ASCII escaped, a string cut to `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        return json.dumps(value[:limit], ensure_ascii=True)[:-1] + '..."'
    return json.dumps(value, ensure_ascii=True)


# -- routing -----------------------------------------------------------------------------
ROUTES = {"/predict": "POST", "/delete": "POST", "/generate": "POST"}


def route(method: str, path: str) -> str | Lookup:
    """"predict", "delete" or a Lookup; 404 for an unknown path or a malformed request id
    (it cannot name a request), 405 for a known path with another method."""
    if path.startswith("/requests/"):
        request_id = path[len("/requests/"):]
        request_id = request_id[:-1] if request_id.endswith("/") else request_id
        if method != "GET":
            raise HttpError(405, f"use GET for /requests/<id>, not {short(method)}")
        if not valid_request_id(request_id):
            raise HttpError(404, f"no request {short(request_id)}")
        return Lookup(request_id)
    bare = path[:-1] if path.endswith("/") and len(path) > 1 else path
    if bare in ROUTES:
        if method != ROUTES[bare]:
            raise HttpError(405, f"use {ROUTES[bare]} for {bare}, not {short(method)}")
        return bare[1:]
    raise HttpError(404, f"no route {short(method)} {short(path)}")


# -- the body --------------------------------------------------------------------------------
def content_length(value: str | None) -> int | None:
    """The declared length; 413 over the limit (before reading anything), 400 if malformed."""
    if value is None:
        return None
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise HttpError(400, f"Content-Length {short(value)} is not a number of bytes")
    if len(digits) > 15 or int(digits) > MAX_BODY_BYTES:
        raise HttpError(413, f"request body of {digits[:20]} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    return int(digits)


def body_pending(headers) -> bool:
    """Whether a request announces a body (chunked, or a Content-Length other than 0):
    answered without reading it to its end, its connection must close, or the server
    (uvicorn, keeping the connection alive) would go on reading it, however long it is."""
    return "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0"


CLOSE = {"Connection": "close"}  # response headers: the server closes the connection after the answer


async def read_body(declared: str | None, chunks: AsyncIterable[bytes]) -> bytes:
    """The body, read up to the limit whatever Content-Length said (or if it said nothing),
    and within BODY_TIMEOUT_S (408 for a body that stalls or trickles)."""
    content_length(declared)
    limit = BODY_TIMEOUT_S
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    stream = chunks.__aiter__()
    parts, size = [], 0
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HttpError(408, f"request body not complete within {limit:g} s ({size} bytes received)") from None
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HttpError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
    return b"".join(parts)


_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))  # +1, -1 as int8


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects nest deeper than `limit`, brackets inside strings not
    counted; decided before parsing, which would recurse once per level. Linear and in C:
    escaped backslashes and quotes out, the pieces between quotes that are outside strings
    (a string never closed is left out to the end), their brackets as +1/-1, a running sum."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    steps = outside.translate(_STEP, _NOT_BRACKETS)
    return bool(steps) and int(np.frombuffer(steps, dtype=np.int8).cumsum(dtype=np.int64).max()) > limit


def _object(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise HttpError(400, f"field {short(key)} is given twice")
        out[key] = value
    return out


def parse_json(body: bytes) -> dict:
    if too_deep(body):
        raise HttpError(400, f"request body nests arrays or objects deeper than {MAX_DEPTH} levels")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise HttpError(400, f"request body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise HttpError(400, f"request body is not usable JSON ({str(exc).split(':')[0][:100]})") from None
    if not isinstance(value, dict):
        raise HttpError(400, "request body must be a JSON object")
    return value


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _fields(body: dict, allowed: Sequence[str]) -> None:
    for key in body:
        if key not in allowed:
            raise HttpError(400, f"unknown field {short(key)} (this route takes {', '.join(map(repr, allowed))})")


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise HttpError(400, f"'{name}' must be true or false, not {_kind(value)}")
    return value


def _unicode_problem(value: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start})"
    return None


def _strings(body: dict, name: str, required: bool, limit: int, check=None, what: str = "") -> list[str]:
    """The list of strings `name`: each non-empty, valid Unicode, passing `check`."""
    value = body.get(name, [])
    if not isinstance(value, list) or (required and not value):
        got = "missing" if name not in body else "an empty list" if value == [] else _kind(value)
        raise HttpError(400, f"'{name}' must be a {'non-empty ' if required else ''}list of non-empty strings "
                             f"(got {got})")
    if len(value) > limit:
        raise HttpError(400, f"'{name}': {len(value)} items, more than the {limit} a request may carry")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise HttpError(400, f"'{name}'[{i}] must be a non-empty string (got {_kind(item) if item != '' else 'an empty one'})")
        problem = _unicode_problem(item) or (check(item) if check else None)
        if problem:
            raise HttpError(400, f"'{name}'[{i}] {problem}: {short(item)}{what}")
    return value


def _text_problem(text: str) -> str | None:
    return f"is longer than {MAX_TEXT_CHARS} characters ({len(text)})" if len(text) > MAX_TEXT_CHARS else None


def _count(body: dict, name: str, low: int, high: int, default: int | None) -> int | None:
    if name not in body or (default is None and body[name] is None):  # an optional field may be null
        return default
    value = body[name]
    if type(value) is not int or not low <= value <= high:  # JSON integers only: no true, no 3.0
        raise HttpError(400, f"'{name}' must be an integer in {low}..{high}, got {short(value)}")
    return value


def parse_body(kind: str, body: bytes) -> Predict | Delete | DeleteMany | Generate:
    """The validated request of route `kind` ("predict", "generate" or "delete"), or HttpError 400."""
    obj = parse_json(body)
    if kind == "generate":
        _fields(obj, ("prompts", "max_new_tokens", "shard", "wait"))
        return Generate(tuple(_strings(obj, "prompts", True, MAX_PROMPTS, _text_problem)),
                        _count(obj, "max_new_tokens", 1, MAX_NEW_TOKENS, 32), _count(obj, "shard", 0, 9999, None),
                        _flag(obj, "wait"))
    if kind == "predict":
        _fields(obj, ("texts", "wait"))
        return Predict(tuple(_strings(obj, "texts", True, MAX_TEXTS, _text_problem)), _flag(obj, "wait"))
    if "requests" in obj:
        return _bulk(obj)
    return _delete(obj, MAX_NAMES)


def _delete(obj: dict, limit: int) -> Delete:
    _fields(obj, ("ids", "owners", "ignore_missing"))
    if "ids" in obj and "owners" in obj:  # as the CLI's --ids and --owners
        raise HttpError(400, "a deletion request takes 'ids' or 'owners', not both (send two requests)")
    ids = _strings(obj, "ids", False, limit, id_problem, " is not a valid record id")
    owners = _strings(obj, "owners", False, limit, owner_problem, " is not a valid owner")
    if not ids and not owners:
        raise HttpError(400, "a deletion request needs 'ids' or 'owners' (a non-empty list of strings)")
    return Delete(tuple(ids), tuple(owners), _flag(obj, "ignore_missing"))


def _bulk(obj: dict) -> DeleteMany:
    """{"requests": [...]}: each element a deletion request as above; errors name it by index."""
    _fields(obj, ("requests",))
    items = obj["requests"]
    if not isinstance(items, list) or not items:
        raise HttpError(400, f"'requests' must be a non-empty list of deletion requests (got "
                             f"{'an empty list' if items == [] else _kind(items)})")
    if len(items) > MAX_BULK:
        raise HttpError(400, f"'requests': {len(items)} deletion requests, more than the {MAX_BULK} a bulk may carry")
    out, names = [], 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HttpError(400, f"'requests'[{i}] must be an object (a deletion request), not {_kind(item)}")
        try:
            one = _delete(item, MAX_NAMES)
        except HttpError as exc:
            raise HttpError(exc.status, f"'requests'[{i}]: {exc.message}") from None
        names += len(one.ids) + len(one.owners)
        if names > MAX_NAMES:
            raise HttpError(400, f"'requests': more than the {MAX_NAMES} ids and owners a bulk may carry in all "
                                 f"(reached at 'requests'[{i}])")
        out.append(one)
    return DeleteMany(tuple(out))


def parse_request(method: str, path: str, body: bytes = b"") -> Predict | Delete | Lookup:
    """Route and validate a whole request (the body already read within the limit)."""
    where = route(method, path)
    return where if isinstance(where, Lookup) else parse_body(where, body)


# -- errors going out ------------------------------------------------------------------------------
# a URL (any scheme, also quoted: an S3 endpoint in a client's error); then a double-quoted
# (JSON) string, a value kept but cut (one never closed runs to the end: no rescanning),
# or an absolute path, hidden
_URL = re.compile(r"""(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^\s'"]*[^\s'":.,;]""", re.IGNORECASE)
_PIECE = re.compile(r"""(?P<quoted>"(?:[^"\\]|\\.)*+(?:"|$))|(?<![\w.~/-])/[^\s'"/:]+/[^\s'":]*""")
_PARTIAL_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?$")


def _piece(match: re.Match) -> str:
    quoted = match.group("quoted")
    if quoted is None:
        return "<path>"
    if len(quoted) <= QUOTE_CHARS + 2:
        return quoted
    return _PARTIAL_ESCAPE.sub("", quoted[:QUOTE_CHARS + 1]) + '..."'


def public_message(message: str, hide: Sequence[str] = ()) -> str:
    """An error raised behind the server, fit to go out: one line, no store location (each
    of `hide`, then any other absolute path or URL), long quoted values cut."""
    line = " ".join(message.split())
    for where in sorted((h.rstrip("/") for h in hide if h and h.rstrip("/")), key=len, reverse=True):
        line = line.replace(f"store {where}", "the store").replace(f"{where}/", "").replace(where, "the store")
    line = _PIECE.sub(_piece, _URL.sub("<url>", line))
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS] + "..."


def public_receipt(receipt: dict, hide: Sequence[str] = ()) -> dict:
    """A request's log entry for GET /requests/<id>: its error lines were written by the
    process that applied it (`last_error`, `reason`, `warnings`), so they go out as errors do."""
    out = dict(receipt)
    for key in ("last_error", "reason"):
        if isinstance(out.get(key), str):
            out[key] = public_message(out[key], hide)
    if isinstance(out.get("warnings"), list):
        out["warnings"] = [public_message(w, hide) if isinstance(w, str) else w for w in out["warnings"]]
    return out
