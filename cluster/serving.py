"""HTTP serving of a run with Ray Serve: ensemble predictions and deletion requests.

    POST /predict        {"texts": [...], "wait": false}  -> {"predictions": [...], "shards": [...]}
                         (ERASE runs answer "examples": the prompt examples used, instead of "shards")
    POST /generate       {"prompts": [...], "max_new_tokens": 32, "shard": null, "wait": false}
                         -> {"generations": [{"prompt", "completion", "tokens"}], "shards": [...]}  (lm runs)
    POST /delete         {"ids": [...]} or {"owners": [...]} -> {"request_id": ...}  (once durable)
                         {"requests": [{"ids": [...]}, {"owners": [...]}, ...]} -> {"request_ids": [...]}
                         (a bulk: every request durable before the answer, or none accepted)
    GET  /requests/<id>  -> the request's status and receipt

Requests are read and validated by `http_api.py` (limits, strict types, status codes)
before anything reaches the coordinator. Everything goes through the run's coordinator
actor, so predictions honour the quarantine of shards retraining for an acknowledged
deletion. Concurrent /predict calls are batched into one ensemble pass, and concurrent
/delete calls into one group commit of the coordinator (`serve.batch`).

Two ways to run it: `unlearn serve` (`start_serving`: starts Serve and deploys the app), or a
Serve config file such as KubeRay's RayService (`import_path: cluster.serving:app`, see `app`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cluster.http_api import (CLOSE, DeleteMany, Generate, HttpError, Lookup, Predict, body_pending, parse_body, public_message,
                              public_receipt, read_body, route)
from cluster.requestlog import UnknownRequest
from cluster.runtime import HEAD_RESOURCE, RESOURCE_UNIT, coordinator_actor
from core.errors import Unavailable, UnlearnError, one_line
from core.store import Store, open_store


MAX_ONGOING = 1024  # requests one ingress replica holds at once


def split_predictions(out: dict, batches: list[tuple[list[str], bool]]) -> list[dict]:
    """One ensemble answer for the texts of several calls, cut back into one per call."""
    results, start = [], 0
    for ts, _wait in batches:
        answer = {"predictions": out["predictions"][start:start + len(ts)], "quarantined": out.get("quarantined", [])}
        for key in ("shards", "unavailable", "examples", "withheld_examples"):  # SISA: shards; ERASE: examples
            if key in out:
                answer[key] = out[key]
        results.append(answer)
        start += len(ts)
    return results


async def predict_together(coordinator, aggregate: str, batches: list[tuple[list[str], bool]]) -> list[dict]:
    """The /predict calls of a group (each `(texts, wait)`) in one ensemble pass."""
    texts = [t for ts, _wait in batches for t in ts]
    wait = any(w for _ts, w in batches)
    return split_predictions(await coordinator.predict.remote(texts, aggregate, wait), batches)


class CoordinatorCalls:
    """What both front doors pass straight to the run's coordinator actor (`self.coordinator`)."""

    async def get(self, request_id: str):
        return await self.coordinator.get.remote(request_id)

    async def generate(self, prompts: list[str], max_new_tokens: int, shard, wait: bool):
        return await self.coordinator.generate.remote(prompts, max_new_tokens, shard, wait)


def base_url(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def answer(request, front, hide: list[str]):
    """The HTTP answer to `request` (a Starlette Request), for both front doors (the Serve
    ingress and the intake server of `intake.py`): `front` has the async `predict((texts,
    wait))`, `delete(bulk)`, `get(request_id)` and `generate(...)` of one of them."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse

    body_unread = body_pending(request.headers)
    try:
        where = route(request.method, request.url.path)  # before reading: no body for a wrong route
        if isinstance(where, Lookup):
            response = JSONResponse(public_receipt(await front.get(where.request_id), hide))
        else:
            try:
                body = await read_body(request.headers.get("content-length"), request.stream())
            except ClientDisconnect:
                raise HttpError(400, "the client went away before the body was complete") from None
            body_unread = False
            call = parse_body(where, body)
            if isinstance(call, Predict):
                response = JSONResponse(await front.predict((list(call.texts), call.wait)))
            elif isinstance(call, Generate):
                response = JSONResponse(await front.generate(list(call.prompts), call.max_new_tokens, call.shard,
                                                             call.wait))
            else:
                bulk = call.requests if isinstance(call, DeleteMany) else (call,)
                out = await front.delete([(list(d.ids), list(d.owners), d.ignore_missing) for d in bulk])
                if isinstance(out, BaseException):  # this call refused, not the others of its batch
                    raise out
                response = JSONResponse({"request_ids": out} if isinstance(call, DeleteMany)
                                        else {"request_id": out[0]}, status_code=202)
    except HttpError as exc:
        response = JSONResponse({"error": exc.message}, status_code=exc.status)
    except UnlearnError as exc:  # also when raised in the coordinator and re-raised by Ray
        code = 503 if isinstance(exc, Unavailable) else 404 if isinstance(exc, UnknownRequest) else 400
        response = JSONResponse({"error": public_message(one_line(exc), hide)}, status_code=code)
    except Exception as exc:  # a bug or a lost actor: logged here, one line out, no traceback
        import traceback

        traceback.print_exc()
        response = JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the "
                                          f"details"}, status_code=500)
    if body_unread:  # else the server would read on, however long the body
        response.headers.update(CLOSE)
    return response


def _ingress_class():
    from ray import serve
    from starlette.requests import Request

    # Serve's default of 5 requests at a time per replica would make the front door a queue
    # of five: batches of /delete (and /predict) form only from requests the replica holds
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
    class UnlearnIngress(CoordinatorCalls):
        def __init__(self, coordinator, aggregate: str, store_uri: str = ""):
            if isinstance(coordinator, CoordinatorSpec):  # an app built by `app`: this replica owns it
                coordinator = coordinator.handle()
            self.coordinator = coordinator
            self.aggregate = aggregate
            self.hide = [store_uri]  # never said over HTTP: errors name the run and keys, not the store

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def predict(self, batches: list[tuple[list[str], bool]]) -> list[dict]:
            return await predict_together(self.coordinator, self.aggregate, batches)

        @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0)
        async def delete(self, bulks: list[list[tuple[list[str], list[str], bool]]]) -> list:
            """POST /delete calls that arrive while the last batch is being made durable go to
            the coordinator together: one call and one group commit for all of them (each
            call's requests accepted or refused whole)."""
            return await self.coordinator.submit_bulk.remote(bulks)

        async def __call__(self, request: Request):
            return await answer(request, self, self.hide)

    return UnlearnIngress


def start_serving(store: Store, run: str, host: str = "127.0.0.1", port: int = 8000, aggregate: str = "vote",
                  window_s: float = 0.0, actor_cpus: float | None = None, address: str | None = None) -> str:
    """Deploy the HTTP app for `run` on the Ray cluster (joined at `address`, or this
    process's, or a local one started for it); returns its base URL. Only the HTTP proxy
    listens on `host`; Serve's own messages stay in Ray's log files."""
    import logging

    from ray import serve

    coordinator = coordinator_actor(store, run, window_s, actor_cpus, address)
    coordinator.warm.remote()  # shard models load while Serve starts
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "Application ... is ready"
    where = proxy_location(host)
    serve.start(http_options={"host": host, "port": port}, proxy_location=where)
    ingress = _ingress_class()
    if where == "HeadOnly":  # beside its one proxy: a lost worker node never takes the front door with it
        ingress = ingress.options(ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: RESOURCE_UNIT}})
    serve.run(ingress.bind(coordinator, aggregate, store.uri), name=f"unlearn-{run}", route_prefix="/")
    return base_url(host, port)


def proxy_location(host: str) -> str:
    """Where Serve runs HTTP proxies. Bound to loopback, only a proxy on this machine can be
    reached, and every node's proxy would bind the same address and port: one proxy, on
    the head (run `serve` on the head). Bound to a routable address: one on every node, so
    that any node answers and the loss of one does not stop the front door."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return "HeadOnly" if loopback else "EveryNode"


APP_ARGS = ("store", "run", "aggregate", "window", "actor_cpus")


@dataclass(frozen=True)
class CoordinatorSpec:
    """What a replica needs to get or create the run's coordinator actor itself. Serve calls
    an application builder in a short-lived task (one call per worker process): a
    coordinator created there would be owned by that process and die with it, so `app`
    passes this instead and the ingress replica calls `handle()` in its constructor. The
    replica then owns the coordinator, as the `unlearn serve` process owns it there."""
    store_uri: str
    run: str
    window_s: float = 0.0
    actor_cpus: float | None = None

    def handle(self):
        coordinator = coordinator_actor(open_store(self.store_uri), self.run, self.window_s, self.actor_cpus)
        coordinator.warm.remote()  # shard models load while the replica starts
        return coordinator


def _app_number(name: str, value, high: float, above: bool) -> float:
    """A number from a Serve config (YAML int or float, or its text), read as the CLI reads it."""
    import argparse

    from cluster import options as opt

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnlearnError(f"cluster.serving:app: args.{name} must be a number, got {value!r}")
    try:
        return opt.bounded(float, 0, high, above=above)(str(value))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"not a number: {value!r}"
        raise UnlearnError(f"cluster.serving:app: args.{name} {detail}") from None


def app(args: dict | None = None):
    """Ray Serve application builder: the same HTTP app as `unlearn serve`, for a Serve config
    file or KubeRay's RayService (`import_path: cluster.serving:app`). `args`: `run` (default
    $UNLEARN_RUN), `store` (default $UNLEARN_STORE), and optionally `aggregate` (vote, mean,
    weighted; default vote), `window` (seconds, as `--window`) and `actor_cpus` (as
    `--actor-cpus`). Checks them and returns the bound ingress; starts neither Ray nor
    Serve (Serve deploys it, on the cluster it runs in; host and port are the config's
    `http_options`). Every problem is one UnlearnError line."""
    import argparse

    from cluster import options as opt
    from sisa.aggregate import METHODS

    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UnlearnError(f"cluster.serving:app: args must be a mapping, got {type(args).__name__}")
    unknown = sorted(str(k) for k in args if k not in APP_ARGS)
    if unknown:
        raise UnlearnError(f"cluster.serving:app: unknown args {', '.join(unknown)}; known: {', '.join(APP_ARGS)}")
    run = args.get("run") or os.environ.get("UNLEARN_RUN")
    if not run:
        raise UnlearnError("cluster.serving:app: no run: set args.run (or $UNLEARN_RUN)")
    if not isinstance(run, str):
        raise UnlearnError(f"cluster.serving:app: args.run must be a string, got {run!r}")
    try:
        opt.run_name(run)
    except argparse.ArgumentTypeError as exc:
        raise UnlearnError(f"cluster.serving:app: run {exc}") from None
    store_uri = args.get("store") or os.environ.get("UNLEARN_STORE")
    if not store_uri:
        raise UnlearnError("cluster.serving:app: no store: set args.store (or $UNLEARN_STORE), "
                           "e.g. s3://bucket/prefix")
    if not isinstance(store_uri, str):
        raise UnlearnError(f"cluster.serving:app: args.store must be a string, got {store_uri!r}")
    store = open_store(store_uri)
    aggregate = args.get("aggregate", "vote")
    if aggregate not in METHODS:
        raise UnlearnError(f"cluster.serving:app: args.aggregate {aggregate!r}: choose one of {', '.join(METHODS)}")
    window_s = _app_number("window", args.get("window", 0), opt.MAX_WINDOW_S, above=False)
    cpus = args.get("actor_cpus")
    actor_cpus = None if cpus is None else _app_number("actor_cpus", cpus, opt.MAX_ACTOR_CPUS, above=True)
    spec = CoordinatorSpec(store.uri, run, window_s, actor_cpus)
    return _ingress_class().bind(spec, aggregate, store.uri)
