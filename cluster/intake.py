"""The front door without Ray Serve: `unlearn serve --intake-port P`.

Ray Serve carries every HTTP request from its proxy to a replica actor and back. That is
what lets it run replicas on many nodes, and that hop has its cost per call: on a
2-core machine Serve alone answers 80 to 110 calls a second (bench/pipeline_bench.py), so
a pipeline that sends one deletion per POST waits on the proxy, not on the log. Accepting
a deletion needs no model and no replica, only the coordinator's durable group commit.

This server runs in the `unlearn serve` process itself (uvicorn, one event loop), answers
the same routes with the same validation, limits and errors (`serving.answer`, over
`http_api`), and hands the coordinator every POST /delete that arrived while the previous
group was being made durable, in one call, as the Serve ingress does. A 202 therefore
means what it means on the Serve port: the request is in the durable log. Predictions go
to the same coordinator, under the same quarantine.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from typing import Awaitable, Callable

from core.errors import UnlearnError

from .serving import MAX_ONGOING, CoordinatorCalls, answer, predict_together

MAX_DELETE_GROUP = 256  # POST /delete calls handed to the coordinator in one call
MAX_PREDICT_GROUP = 32  # POST /predict calls answered by one ensemble pass
MAX_HEAD_BYTES = 64 * 1024  # request line and headers


class GroupCall:
    """Calls that arrive while one group is in flight go together in the next: no waiting
    window, so a lone call goes at once, and under load a group is everything that came in
    during the last one (as `serve.batch` with batch_wait_timeout_s=0). `run` maps a list
    of items to a list of results, one each; an exception it raises fails its group only."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int):
        self.run, self.max_size = run, max_size
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.busy = False
        self.groups = 0  # formed so far (for tests and the bench)

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((item, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        group: list = []
        try:
            while self.waiting:
                group, self.waiting = self.waiting[:self.max_size], self.waiting[self.max_size:]
                self.groups += 1
                try:
                    results = await self.run([item for item, _ in group])
                    if len(results) != len(group):
                        raise RuntimeError(f"{len(results)} results for a group of {len(group)}")
                except Exception as exc:  # handed to each caller of the group; the next group goes on
                    _fail(group, exc)
                    continue
                for (_, future), result in zip(group, results):
                    if not future.done():  # a caller gone (its connection closed) is skipped
                        future.set_result(result)
        except BaseException:  # cancelled (the server stopping): no caller may wait forever
            _fail(group + self.waiting, RuntimeError("the server stopped before the call was answered"))
            self.waiting = []
            raise
        finally:
            self.busy = False


def _fail(group: list, exc: Exception) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(exc)


class IntakeFront(CoordinatorCalls):
    """What `serving.answer` calls: the run's coordinator actor, reached from this process."""

    def __init__(self, coordinator, aggregate: str):
        self.coordinator, self.aggregate = coordinator, aggregate
        self.delete = GroupCall(self._submit, MAX_DELETE_GROUP)
        self.predict = GroupCall(self._predict, MAX_PREDICT_GROUP)

    async def _submit(self, bulks: list) -> list:
        return await self.coordinator.submit_bulk.remote(bulks)

    async def _predict(self, batches: list[tuple[list[str], bool]]) -> list[dict]:
        return await predict_together(self.coordinator, self.aggregate, batches)


def asgi_app(front, hide: list[str], max_in_flight: int = MAX_ONGOING):
    """The ASGI application: every HTTP request answered by `serving.answer`; beyond
    `max_in_flight` requests at once, a 503 in one line (the client sends it again)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from .http_api import CLOSE

    in_flight = [0]

    async def app(scope, receive, send):
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        if in_flight[0] >= max_in_flight:
            response = JSONResponse({"error": f"busy: {in_flight[0]} requests in flight; send it again"},
                                    status_code=503, headers=CLOSE)
        else:
            in_flight[0] += 1
            try:
                response = await answer(Request(scope, receive), front, hide)
            finally:
                in_flight[0] -= 1
        await response(scope, receive, send)

    return app


def bind(host: str, port: int) -> socket.socket:
    """The socket, bound now (uvicorn listens on it): a port in use, or a host that is not
    this machine's, is one line before anything starts."""
    try:
        family, _type, _proto, _name, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UnlearnError(f"--host {host}: {exc.strerror or exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UnlearnError(f"--intake-port {port}: cannot listen on {host} ({exc.strerror or exc})") from None
    sock.setblocking(False)
    return sock


class IntakeServer:
    """uvicorn in a thread of this process, on a socket bound beforehand."""

    def __init__(self, sock: socket.socket, front, hide: list[str], max_in_flight: int = MAX_ONGOING):
        import uvicorn

        self.sock = sock
        # h11, not httptools: h11 refuses a request head over 64 KiB, httptools buffers any size,
        # and this process holds the run's coordinator actor (its shard actors die with it)
        config = uvicorn.Config(asgi_app(front, hide, max_in_flight), log_level="warning", access_log=False, lifespan="off",
                                http="h11", h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=30,
                                server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="unlearn-intake", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001  (reported by start/alive)
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> None:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UnlearnError(f"the intake server did not start ({self.error or 'timed out'})")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
