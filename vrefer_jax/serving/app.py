"""The FastAPI app: `/v1/chat/completions`, `/v1/regions/ask`, `/health`, `/metrics`.

    app = create_app(predictor, ServeConfig(media_root="/data"))   # then uvicorn.run(app, ...)

Every request gets an id (`X-Request-Id` header if given, else a fresh one; returned in the reply's
`X-Request-Id` and body). Errors are OpenAI-shaped `{"error": {"message", "type", "code", "param"}}`:
400 for a bad or over-limit field (unknown fields included; `code` is a reason such as
`unknown_field`, `media_outside_root`, `limit_exceeded`, `prompt_too_long`), 404 for media not
found, 413 for media over `max_media_bytes`, 503 when the queue is full or the server is shutting
down, 504 past the request's timeout. With `"stream": true` the answer comes as server-sent events
(`data: {...}` lines, `data: [DONE]` last for chat), text in pieces as the batch decodes.

Shutdown (SIGTERM / SIGINT through uvicorn): the listener closes, requests in flight (streams
included) are answered, then the lifespan stops the engine after its queue is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vrefer_jax.serving import engine as engine_lib
from vrefer_jax.serving import requests as rq
from vrefer_jax.serving.config import ServeConfig
from vrefer_jax.serving.metrics import Metrics

log = logging.getLogger(__name__)


class Service:
    """What the routes (and the in-process demo) share: predictor, preparer, engine, metrics."""

    def __init__(self, predictor, cfg: ServeConfig, model_name: str = "vrefer"):
        self.predictor, self.cfg, self.model_name = predictor, cfg, model_name
        self.metrics = Metrics(cfg.max_batch_size)
        self.preparer = rq.Preparer(predictor, cfg)
        self.engine = engine_lib.Engine(predictor, cfg, self.metrics)
        self._prepare_slots = None  # an asyncio.Semaphore, made on the serving loop

    def start(self, warmup: dict | list[dict] | None = None) -> Service:
        """Start the engine; with `warmup` (`request_files` requests: one per bucket you expect, e.g.
        single- and multi-frame), first compile the programs a batch of each needs at every row
        count (`Engine.warmup`), with the default generation settings."""
        for k, req in enumerate([warmup] if isinstance(warmup, dict) else (warmup or [])):
            t = time.monotonic()
            prep = self.preparer.prepare(dict(req, id=req.get("id", f"warmup{k}")))
            gen = rq.generation(self.predictor.generation, rq.GenerationFields(), self.cfg)
            rows = self.engine.warmup(prep.prepared, gen)
            log.info("vrefer-serve: warm-up %d compiled rows %s in %.1f s", k, rows, time.monotonic() - t)
        self.engine.start()
        return self

    def stop(self) -> bool:
        return self.engine.stop(self.cfg.shutdown_timeout_s)

    async def prepare(self, req: dict) -> rq.PreparedRequest:
        if self._prepare_slots is None:
            self._prepare_slots = asyncio.Semaphore(self.cfg.prepare_workers)
        async with self._prepare_slots:  # decoding media is CPU work: a few at a time, off the loop
            return await run_in_threadpool(self.preparer.prepare, req)

    def submit(self, prep: rq.PreparedRequest, gen, timeout: float | None, emit) -> engine_lib.Job:
        """Queue a prepared request; raises `ApiError` (503) when the engine does not take it."""
        limit = min(timeout or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        job = engine_lib.Job(prep.rid, prep.prepared, gen, time.monotonic() + limit, emit, prep.prompt_tokens)
        try:
            self.engine.submit(job)
        except engine_lib.QueueFull as e:
            self.metrics.request_done("rejected")
            raise rq.ApiError(503, "queue_full", str(e)) from None
        except engine_lib.Closed as e:
            self.metrics.request_done("rejected")
            raise rq.ApiError(503, "shutting_down", str(e)) from None
        return job

    def ask_sync(self, req: dict, body: rq.GenerationFields | None = None, media_file: str | None = None):
        """For in-process callers (the demo, in a worker thread): prepare and queue `req` (a
        `request_files` request; `media_file`: its media, already on disk), then yield its `Event`s.
        Raises `ApiError`."""
        import queue as queue_lib

        body = body or rq.GenerationFields()
        prep = self.preparer.prepare(req, media_file=media_file)
        gen = rq.generation(self.predictor.generation, body, self.cfg)
        events: queue_lib.Queue = queue_lib.Queue()
        job = self.submit(prep, gen, body.timeout, events.put)
        try:
            while True:
                ev = events.get()
                yield ev
                if isinstance(ev, (engine_lib.Finished, engine_lib.Failed)):
                    return
        finally:
            job.cancelled.set()  # a consumer that stops early frees its row


def _error(e: rq.ApiError, rid: str | None = None) -> JSONResponse:
    headers = {"X-Request-Id": rid} if rid else {}
    if e.status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> rq.ApiError:
    """pydantic's errors -> one 400 naming the first field (`unknown_field` for extra ones)."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid body", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    code = "unknown_field" if first.get("type") == "extra_forbidden" else "bad_request"
    msg = f"field {field}: {'unknown field' if code == 'unknown_field' else first.get('msg')}"
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more problem(s))"
    return rq.ApiError(400, code, msg, field)


def create_app(predictor, cfg: ServeConfig | None = None, model_name: str = "vrefer",
               service: Service | None = None, warmup: dict | list[dict] | None = None) -> FastAPI:
    """`warmup`: requests compiled at every batch row count before the server answers (see
    `Service.start`); a bad one stops the start-up with its error."""
    cfg = cfg or ServeConfig()
    svc = service or Service(predictor, cfg, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(svc.start, warmup)
        log.info("vrefer-serve: engine started (family %s)", predictor.family.name)
        try:
            yield
        finally:  # uvicorn has answered every open request by now; finish what the engine holds
            ok = await run_in_threadpool(svc.stop)
            log.info("vrefer-serve: engine stopped (%s)", "drained" if ok else "timed out")

    app = FastAPI(title="vrefer-serve", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        svc.metrics.request_done("bad_request")
        return _error(_validation_error(exc), request.headers.get("x-request-id"))

    def new_id(request: Request, prefix: str) -> str:
        given = request.headers.get("x-request-id")
        return given[:128] if given else f"{prefix}-{uuid.uuid4().hex[:24]}"

    async def run(rid: str, req: dict, body: rq.GenerationFields, max_new_tokens: int | None = None):
        """Prepare + queue: (job, asyncio queue of events, prepared) or raises ApiError."""
        try:
            gen = rq.generation(predictor.generation, body, cfg, max_new_tokens)
            prep = await svc.prepare(req)
        except rq.ApiError:
            svc.metrics.request_done("bad_request")
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = svc.submit(prep, gen, body.timeout, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        return job, events, prep

    async def event_stream(job, events: asyncio.Queue) -> AsyncIterator[engine_lib.Event]:
        try:
            while True:
                ev = await events.get()
                yield ev
                if isinstance(ev, (engine_lib.Finished, engine_lib.Failed)):
                    return
        finally:  # normal end, or the client went away (the generator is closed): free the row
            job.cancelled.set()

    async def tracked(coro):
        svc.metrics.in_flight += 1
        try:
            return await coro
        finally:
            svc.metrics.in_flight -= 1

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        status = "ok" if svc.engine.accepting else "draining"
        body = {"status": status, "family": predictor.family.name, "model": model_name,
                "queue_depth": svc.metrics.queue_depth(), "in_flight": svc.metrics.in_flight}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        if format == "json":
            return JSONResponse(svc.metrics.snapshot())
        return PlainTextResponse(svc.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vrefer-jax"}]}

    @app.post("/v1/regions/ask")
    async def ask(body: rq.AskBody, request: Request):
        rid = body.id or new_id(request, "ask")
        try:
            job, events, prep = await run(rid, rq.ask_request(body, rid), body)
        except rq.ApiError as e:
            return _error(e, rid)
        head = {"X-Request-Id": rid}
        if body.stream:
            async def gen():
                svc.metrics.in_flight += 1
                try:
                    async for ev in event_stream(job, events):
                        if isinstance(ev, engine_lib.Delta):
                            yield sse({"id": rid, "delta": ev.text})
                        elif isinstance(ev, engine_lib.Finished):
                            yield sse({"id": rid, "answer": ev.text, "finish_reason": ev.finish_reason,
                                       "usage": _usage(ev), "warnings": prep.warnings})
                        else:
                            yield sse({"id": rid, **rq.ApiError(ev.status, ev.code, ev.message).body()})
                finally:
                    svc.metrics.in_flight -= 1
            return StreamingResponse(gen(), media_type="text/event-stream", headers=head)
        ev = await tracked(_await_final(event_stream(job, events)))
        if isinstance(ev, engine_lib.Failed):
            return _error(rq.ApiError(ev.status, ev.code, ev.message), rid)
        out = {"id": rid, "answer": ev.text, "finish_reason": ev.finish_reason, "usage": _usage(ev)}
        if prep.warnings:
            out["warnings"] = prep.warnings
        return JSONResponse(out, headers=head)

    @app.post("/v1/chat/completions")
    async def chat(body: rq.ChatBody, request: Request):
        rid = new_id(request, "chatcmpl")
        created = int(time.time())
        try:
            req = rq.chat_request(body, rid)
        except rq.ApiError as e:
            svc.metrics.request_done("bad_request")
            return _error(e, rid)
        try:
            job, events, prep = await run(rid, req, body, body.max_completion_tokens or body.max_tokens)
        except rq.ApiError as e:
            return _error(e, rid)
        head = {"X-Request-Id": rid}
        base = {"id": rid, "created": created, "model": model_name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)

            async def gen():
                svc.metrics.in_flight += 1
                try:
                    yield sse({**base, "object": "chat.completion.chunk",
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
                    async for ev in event_stream(job, events):
                        if isinstance(ev, engine_lib.Delta):
                            yield sse({**base, "object": "chat.completion.chunk",
                                       "choices": [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}]})
                        elif isinstance(ev, engine_lib.Finished):
                            yield sse({**base, "object": "chat.completion.chunk",
                                       "choices": [{"index": 0, "delta": {}, "finish_reason": ev.finish_reason}]})
                            if usage:
                                yield sse({**base, "object": "chat.completion.chunk", "choices": [],
                                           "usage": _usage(ev)})
                        else:
                            yield sse(rq.ApiError(ev.status, ev.code, ev.message).body())
                    yield b"data: [DONE]\n\n"
                finally:
                    svc.metrics.in_flight -= 1
            return StreamingResponse(gen(), media_type="text/event-stream", headers=head)
        ev = await tracked(_await_final(event_stream(job, events)))
        if isinstance(ev, engine_lib.Failed):
            return _error(rq.ApiError(ev.status, ev.code, ev.message), rid)
        out = {**base, "object": "chat.completion",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": ev.text},
                            "finish_reason": ev.finish_reason}],
               "usage": _usage(ev)}
        if prep.warnings:
            out["warnings"] = prep.warnings
        return JSONResponse(out, headers=head)

    return app


async def _await_final(stream: AsyncIterator) -> engine_lib.Event:
    last = None
    async for ev in stream:
        last = ev
    return last


def _usage(ev: engine_lib.Finished) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


__all__ = ["Service", "create_app"]
