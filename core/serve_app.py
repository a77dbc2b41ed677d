"""The HTTP side of `archkit serve`: a Starlette application (served by uvicorn) over one EngineWorker.

Routes: GET /v1/models (and /v1/models/{id}), POST /v1/completions, POST /v1/chat/completions (JSON, or
server-sent events with "stream": true), GET /health, GET /metrics (Prometheus text). Request bodies become
engine requests in core/serve_protocol.py; the engine runs on its own thread (core/serve_worker.py), and each
request's tokens come back to its handler through an asyncio queue.

A request ends early when its client goes away: a stream when Starlette cancels the response on the client's
disconnect (the response's `finally` aborts it), a plain request when the handler sees the disconnect while
waiting. Either way the abort runs on the engine thread, which frees the request's KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import serve_protocol as proto
from .serve_metrics import CONTENT_TYPE
from .serve_worker import EngineWorker

MAX_BODY_BYTES = 16 << 20  # a prompt of a whole context is well under this; anything larger is refused unread


class _SSE(StreamingResponse):
    """A text/event-stream response that calls `on_close` however it ends: done, failed, or its client gone."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Auth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>` (a plain ASGI wrapper, since
    Starlette's BaseHTTPMiddleware would sit between a stream and its client's disconnect)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = proto.APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                     param=None, code="invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Service:
    """The served model, its engine thread and metrics: what every handler needs."""

    def __init__(self, served: proto.ServedModel, worker: EngineWorker):
        self.served, self.worker, self.metrics = served, worker, worker.metrics
        self.created = int(time.time())

    # -- routes --------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """GET /health: 200 while the engine thread runs (no API key needed), else 503."""
        if not self.worker.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_page(self, request: Request) -> Response:
        """GET /metrics: the engine's counters and the latency histograms, Prometheus text."""
        if not self.worker.alive:
            raise proto.APIError(503, "the engine has stopped", "server_error")
        stats = await asyncio.wrap_future(self.worker.call(lambda engine: engine.stats()))
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the one served model."""
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{name}: the served model, or 404 for any other name."""
        name = request.path_params["name"]
        if name != self.served.name:
            raise proto.APIError(404, f"The model '{name}' does not exist; this server serves '{self.served.name}'",
                                 param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        return await self._generate(request, proto.parse_completion, "cmpl-")

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        return await self._generate(request, proto.parse_chat, "chatcmpl-")

    def _model_card(self) -> dict:
        m = self.served.model
        return {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "archkit",
                "max_model_len": self.served.capacity, "architecture": m.spec.name}

    # -- generation ----------------------------------------------------------------------------------
    async def _generate(self, request: Request, parse, prefix: str) -> Response:
        arrival = time.monotonic()
        body = await _json_body(request)
        # Tokenizing and rendering a template take a while for long prompts: off the event loop.
        job = await run_in_threadpool(parse, body, self.served)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_output(index, out):  # engine thread → this request's event loop
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server has stopped
                loop.call_soon_threadsafe(events.put_nowait, (index, out))

        reqs = await self._add(job, on_output, arrival)
        states = [proto.ChoiceState(i, job, self.served) for i in range(len(job.requests))]
        rid, created = prefix + uuid.uuid4().hex, int(time.time())
        if job.stream:
            return _SSE(self._events(job, states, events, rid, created), on_close=lambda: self.worker.abort(reqs))
        try:
            if not await _first(self._collect(states, events), _disconnected(request)):
                return Response(status_code=499)  # nobody is listening; the finally below frees the blocks
        finally:
            self.worker.abort(reqs)
        _raise_failure(states)
        return JSONResponse(proto.response(job, self.served, rid, created, states))

    async def _add(self, job: proto.Job, on_output, arrival: float) -> list:
        fut = self.worker.add(job.requests, on_output, arrival)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            # Cancelled while the engine thread was adding: abort them once they exist.
            fut.add_done_callback(
                lambda f: not f.cancelled() and f.exception() is None and self.worker.abort(f.result()))
            raise
        except Exception as e:
            raise proto.from_error(e, job.input_param) from None

    @staticmethod
    async def _collect(states: list, events: asyncio.Queue) -> bool:
        while not all(s.finished for s in states):
            index, out = await events.get()
            states[index].update(out)
        return True

    async def _events(self, job, states, events: asyncio.Queue, rid: str, created: int):
        """The SSE body: `data: {chunk}` per event batch, then usage (if asked) and `data: [DONE]`."""
        while not all(s.finished for s in states):
            batch = [await events.get()]
            while not events.empty():  # a burst (n choices, a slow reader) goes out as one write
                batch.append(events.get_nowait())
            out = []
            for index, ev in batch:
                choice = states[index].update(ev)
                if states[index].finish_reason in ("abort", "error"):
                    yield "".join(out) + _sse(_failure(states[index]).body())
                    return
                if choice is not None:
                    out.append(_sse(proto.chunk(job, self.served, rid, created, [choice])))
            if out:
                yield "".join(out)
        if job.include_usage:
            yield _sse(proto.chunk(job, self.served, rid, created, [], proto.usage(job, states)))
        yield "data: [DONE]\n\n"


# -- helpers ------------------------------------------------------------------------------------------------
async def _json_body(request: Request):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise proto.APIError(413, f"the request body is {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}",
                             code="request_too_large")
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise proto.APIError(400, "the client went away while sending the body") from None
    if len(raw) > MAX_BODY_BYTES:
        raise proto.APIError(413, f"the request body is over {MAX_BODY_BYTES:,} bytes", code="request_too_large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise proto.APIError(400, f"We could not parse the JSON body of your request ({e}); "
                                  "it must be a JSON object", code="invalid_json") from None


async def _disconnected(request: Request) -> bool:
    """Wait until the client closes the connection (the body has been read, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    return False


async def _first(*coros) -> bool:
    """Run coroutines concurrently; the first result wins and the others are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for t in tasks:
            t.cancel()


def _failure(state: proto.ChoiceState) -> proto.APIError:
    """Why a choice ended without finishing: the engine failed it, or it was aborted (the server stopping)."""
    if state.error is not None:
        return proto.APIError(500, f"generation failed: {state.error}", "server_error", code="generation_failed")
    return proto.APIError(503, "the request was cancelled: the server is shutting down", "server_error",
                          code="cancelled")


def _raise_failure(states: list) -> None:
    for s in states:
        if s.finish_reason in ("abort", "error"):
            raise _failure(s)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_response(e: proto.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, e: proto.APIError) -> Response:
    return _error_response(e)


async def _http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own errors (unknown route 404, wrong method 405) in OpenAI's shape."""
    what = {404: f"unknown route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return _error_response(proto.APIError(e.status_code, what, code={404: "not_found"}.get(e.status_code)))


async def _internal_error(request: Request, e: Exception) -> Response:
    return _error_response(proto.from_error(e, "prompt"))


def build_app(served: proto.ServedModel, worker: EngineWorker, api_key: str | None = None) -> Starlette:
    """The Starlette application serving `served` through `worker`; the worker thread starts and stops with it."""
    svc = Service(served, worker)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive():
            worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    routes = [Route("/health", svc.health), Route("/metrics", svc.metrics_page),
              Route("/v1/models", svc.models), Route("/v1/models/{name:path}", svc.model),
              Route("/v1/completions", svc.completions, methods=["POST"]),
              Route("/v1/chat/completions", svc.chat_completions, methods=["POST"])]
    middleware = [Middleware(_Auth, key=api_key)] if api_key else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={proto.APIError: _api_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    app.state.service = svc
    return app
