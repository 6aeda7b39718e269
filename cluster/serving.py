"""HTTP serving of a run with Ray Serve: ensemble predictions and deletion requests.

    POST /predict        {"texts": [...], "wait": false}  -> {"predictions": [...], "shards": [...]}
                         (ERASE runs answer "examples": the prompt examples used, instead of "shards")
    POST /delete         {"ids": [...]} or {"owners": [...]} -> {"request_id": ...}  (once durable)
    GET  /requests/<id>  -> the request's status and receipt

Everything goes through the run's coordinator actor, so predictions honour the
quarantine of shards retraining for an acknowledged deletion. Concurrent /predict
calls are batched into one ensemble pass (`serve.batch`).
"""
from __future__ import annotations

import json

from cluster.runtime import coordinator_actor
from core.errors import Unavailable, UnlearnError, one_line
from core.store import Store


def _ingress_class():
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class UnlearnIngress:
        def __init__(self, coordinator, aggregate: str):
            self.coordinator = coordinator
            self.aggregate = aggregate

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def _predict(self, batches: list[tuple[list[str], bool]]) -> list[dict]:
            texts = [t for ts, _wait in batches for t in ts]
            wait = any(w for _ts, w in batches)
            out = await self.coordinator.predict.remote(texts, self.aggregate, wait)
            results, start = [], 0
            for ts, _wait in batches:
                answer = {"predictions": out["predictions"][start:start + len(ts)],
                          "quarantined": out.get("quarantined", [])}
                for key in ("shards", "examples", "withheld_examples"):  # SISA: shards; ERASE: examples
                    if key in out:
                        answer[key] = out[key]
                results.append(answer)
                start += len(ts)
            return results

        async def __call__(self, request: Request):
            path = request.url.path.rstrip("/")
            try:
                if request.method == "POST" and path == "/predict":
                    body = await self._json(request)
                    texts = body.get("texts")
                    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                        raise UnlearnError("'texts' must be a non-empty list of non-empty strings")
                    return JSONResponse(await self._predict((texts, bool(body.get("wait", False)))))
                if request.method == "POST" and path == "/delete":
                    body = await self._json(request)
                    ids, owners = body.get("ids", []), body.get("owners", [])
                    for name, value in (("ids", ids), ("owners", owners)):
                        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                            raise UnlearnError(f"'{name}' must be a list of non-empty strings")
                    request_id = await self.coordinator.submit.remote(ids, owners, bool(body.get("ignore_missing")))
                    return JSONResponse({"request_id": request_id}, status_code=202)
                if request.method == "GET" and path.startswith("/requests/"):
                    return JSONResponse(await self.coordinator.get.remote(path[len("/requests/"):]))
                return JSONResponse({"error": f"no route {request.method} {path}"}, status_code=404)
            except UnlearnError as exc:  # also when raised in the coordinator and re-raised by Ray
                from cluster.requestlog import UnknownRequest

                code = 503 if isinstance(exc, Unavailable) else 404 if isinstance(exc, UnknownRequest) else 400
                return JSONResponse({"error": one_line(exc)}, status_code=code)

        @staticmethod
        async def _json(request: Request) -> dict:
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                raise UnlearnError(f"request body is not JSON ({exc})") from None
            if not isinstance(body, dict):
                raise UnlearnError("request body must be a JSON object")
            return body

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
    serve.start(http_options={"host": host, "port": port})
    serve.run(_ingress_class().bind(coordinator, aggregate), name=f"unlearn-{run}", route_prefix="/")
    return f"http://{host}:{port}"
