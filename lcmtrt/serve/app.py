"""`lcmtrt serve`: the OpenAI Images API over one or more bundles (FastAPI + uvicorn).

The event loop only parses, admits and answers; each model's Batcher thread owns its Pipeline and runs the engines.
A request is prepared (validated, tokenized, its noise drawn as `infer` draws it) in a thread, queued as rows, merged
with compatible rows of other requests, and answered with its images. Errors are OpenAI-shaped JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import json
import logging
import math
import random
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcmtrt.serve.batcher import Batcher, BatcherConfig, BatchStats, Job, QueueFull, Stopped, WorkerDied
from lcmtrt.bundle import Bundle, load_bundle
from lcmtrt.errors import SettingError, UserError
from lcmtrt.serve.api import ApiError, GenerationRequest, ModelCard, encode_images, prepare_arguments, validated
from lcmtrt.serve.edits import read_edit, read_form
from lcmtrt.serve.metrics import ServeMetrics
from lcmtrt.serve.state import ServeConfig, ServeState

log = logging.getLogger("lcmtrt.serve")
access_log = logging.getLogger("lcmtrt.access")
# answered without an API key: probes, scrapers, and the playground page (which asks for the key itself)
OPEN_PATHS = ("/", "/health", "/metrics", "/ready")
# the playground may load nothing from elsewhere: inline style and script, images from data: and blob: URLs, and
# requests to this server only
PLAYGROUND_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


class _ClientGone(Exception):
    """The client closed the connection before its images were done; nothing is sent."""


def load_models(config: ServeConfig) -> ServeState:
    """Read every bundle's manifest now (mistakes fail the command at once); pipelines load in their workers."""
    from lcmtrt.runtime.backends import open_backend, resolve_device
    from lcmtrt.runtime.conditioning import condition_images
    from lcmtrt.runtime.pipeline import Pipeline
    from lcmtrt.runtime.settings import GenerationSettings

    metrics = ServeMetrics()
    cards, batchers, warmed = {}, {}, {}
    one_at_a_time = threading.Lock()  # models warm in turn: timings taken while another warms would cut wrongly
    for name, path in config.models:
        if name in cards:
            raise UserError(f"two bundles are served as model {name!r}; name them with --engines NAME=DIR")
        bundle = load_bundle(path)
        missing = [size for size in bundle.batch_sizes if size not in (config.batch_ms or bundle.batch_sizes)]
        if missing:
            raise UserError(f"--batch-ms gives no time for batch sizes {missing} of model {name} (built for "
                            f"{list(bundle.batch_sizes)})")
        cards[name] = ModelCard(name, bundle)
        _warn_batch_invariance(name, bundle, resolve_device(bundle, config.device))  # refuses a device it lacks
        if bundle.backend == "openvino":
            from lcmtrt.runtime.backends.openvino import cache_limit_bytes

            cache_limit_bytes()  # a bad $LCMTRT_OPENVINO_CACHE_GB fails the command, not the model's worker later

        def load(bundle=bundle, name=name) -> Pipeline:
            started = time.perf_counter()
            pipeline = Pipeline(bundle, open_backend(bundle, config.device), config.max_step_programs)
            # the default plan at every built batch size (timed: how rows are cut), image-to-image too when the
            # bundle has an encoder; /ready lists what stayed warm
            given = None if config.batch_ms is None else {b: config.batch_ms[b] / 1000 for b in bundle.batch_sizes}
            with one_at_a_time:
                warmed[name] = pipeline.warm_up(GenerationSettings(**condition_images(bundle)), given)
            metrics.ready.labels(name).set(1)
            log.info("model %s ready: %s, batch sizes %s (a run takes %s ms), %d step programs warm, loaded and "
                     "warmed in %.1f s", name, bundle.root, list(bundle.batch_sizes), warmed[name]["batch_ms"],
                     len(warmed[name]["programs"]), time.perf_counter() - started)
            return pipeline

        def on_batch(stats: BatchStats, name=name) -> None:
            metrics.batch_images.labels(name).observe(stats.images)
            metrics.engine_launches.labels(name).inc(len(stats.engine_batches))
            metrics.engine_seconds.labels(name).observe(stats.engine_seconds)
            state.last_batch_s[name] = stats.engine_seconds

        batcher_config = BatcherConfig(max(bundle.batch_sizes), config.max_batch_wait_ms / 1000, config.max_queue)
        batchers[name] = Batcher(name, load, batcher_config, on_batch,
                                 lambda images, name=name: metrics.queue_images.labels(name).set(images),
                                 lambda name=name: state.company_coming(name))
        metrics.ready.labels(name).set(0)
        metrics.step_programs.labels(name).set_function(
            lambda b=batchers[name]: b.pipeline.program_count if b.pipeline is not None else 0)
    state = ServeState(config, cards, batchers, metrics, warmed=warmed)
    return state


def _warn_batch_invariance(name: str, bundle: Bundle, device: str) -> None:
    """Say when an image merged into a batch may differ from `infer`'s image of the same request."""
    from lcmtrt.runtime.backends import batch_invariance

    status = batch_invariance(bundle.build, bundle.backend, device, bundle.precision)
    if status == "absent":
        log.warning("model %s: %s was exported before batch-invariant graphs, so an image merged into a batch may "
                    "differ from `infer` by one level in a few pixels; rebuild it to serve identical images",
                    name, bundle.root)
    elif status == "unverified":
        log.warning("model %s: batch invariance is unverified for %s %s on %s (tests check ONNX Runtime and OpenVINO "
                    "fp32 on the CPU), so an image merged into a batch may differ from `infer` in a few pixels; build "
                    "one batch size (--batch 1) where identical images matter", name, bundle.backend,
                    bundle.precision, device)


def create_app(state: ServeState, ready_before_serving: bool = False) -> FastAPI:
    """The app; with `ready_before_serving` its start-up waits until every model is loaded and warmed (a Ray
    replica: Ray routes to it only then, and a model that fails to load fails the replica)."""
    app = FastAPI(title="lcmtrt", lifespan=_lifespan(state, ready_before_serving), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serve = state
    app.add_middleware(_Gate, state=state)
    _add_error_handlers(app)
    _add_status_routes(app, state)
    _add_image_routes(app, state)
    return app


def _lifespan(state: ServeState, ready_before_serving: bool) -> Callable[[FastAPI], Any]:
    """Start every model's batcher (waiting for them to warm when asked), and stop and join them on shutdown."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for batcher in state.batchers.values():
            batcher.start()
        if ready_before_serving:
            await run_in_threadpool(lambda: [b.ready.wait() for b in state.batchers.values()])
            failed = [b.failed for b in state.batchers.values() if b.failed is not None]
            if failed:
                raise RuntimeError(f"a model failed to load: {failed[0]}") from failed[0]
        yield
        for batcher in state.batchers.values():
            batcher.stop()
        await run_in_threadpool(lambda: [b.join(60) for b in state.batchers.values()])

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's JSON shape: API errors as raised, routing errors named, bugs as a logged 500."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(error.status_code,
                                                                                       str(error.detail))
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(ApiError(500, "internal server error (a bug in lcmtrt; the log has the traceback)",
                                     code="internal_error").body(), status_code=500)


def _add_status_routes(app: FastAPI, state: ServeState) -> None:
    """The playground page, liveness, readiness, metrics and the model list."""
    playground = importlib.resources.files("lcmtrt.serve").joinpath("playground.html").read_text("utf-8")

    @app.get("/")
    async def page() -> HTMLResponse:
        """The playground: one self-contained page that talks to this server's API."""
        return HTMLResponse(playground, headers=PLAYGROUND_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        models = {name: "failed" if b.failed else "ready" if b.ready.is_set() else "loading"
                  for name, b in state.batchers.items()}
        ok = state.ready() and not state.draining
        # per model: what warm-up bound and a run's ms per batch size, and the step programs kept now (batch, steps, mode)
        warmed = {name: {**report, "kept_now": b.pipeline.resident_programs()}
                  if (b := state.batchers[name]).pipeline is not None and b.failed is None else report
                  for name, report in state.warmed.items()}
        return JSONResponse({"ready": ok, "draining": state.draining, "models": models, "warmed": warmed},
                            status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        for name, batcher in state.batchers.items():  # a worker that stopped is no longer ready
            if batcher.failed is not None:
                state.metrics.ready.labels(name).set(0)
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card.describe() for card in state.cards.values()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        return _card(state, model).describe()


def _add_image_routes(app: FastAPI, state: ServeState) -> None:
    """The OpenAI Images API: generations (JSON) and edits (multipart, one image)."""
    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            raise ApiError(400, "send the request as JSON with Content-Type: application/json",
                           code="invalid_content_type")
        try:
            data = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        return await _generate(state, request, validated(GenerationRequest, data, strict=True), None)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        fields, image, mask = await read_form(request, state.config.max_body_mb)
        state.heading_to(request.scope["state"], _card(state, fields.model).name)  # company for that model only
        edit = await read_edit(fields, image, mask)  # decoded in a worker thread, fitted there in _generate
        return await _generate(state, request, edit.request, edit.image, edit.mask)


def _card(state: ServeState, name: str | None) -> ModelCard:
    if name is None:
        if len(state.cards) == 1:
            return next(iter(state.cards.values()))
        raise ApiError(400, f"model is required: this server has {', '.join(state.cards)}", param="model",
                       code="missing_value")
    if name not in state.cards:
        raise ApiError(404, f"the model {name!r} does not exist here; loaded models: {', '.join(state.cards)}",
                       param="model", code="model_not_found")
    return state.cards[name]


def _unavailable(state: ServeState, name: str, message: str, code: str) -> ApiError:
    """503 with a Retry-After of about the time the queue ahead needs."""
    batcher = state.batchers[name]
    batches = batcher.queued_images / batcher.config.max_batch + 1
    retry = max(1, math.ceil(batches * state.last_batch_s.get(name, 1.0)))
    return ApiError(503, message, code=code, headers={"Retry-After": str(retry)})


def _worker_failed(name: str) -> ApiError:
    """500: the model's worker thread stopped (the log has the cause, /ready is 503); no retry here helps."""
    return ApiError(500, f"model {name} cannot serve: its worker stopped on an internal error (a bug in lcmtrt; "
                         "the server log has the cause); /ready is 503 until the server is restarted",
                    code="worker_failed")


def _queue_full(state: ServeState, name: str, n: int) -> ApiError:
    batcher = state.batchers[name]
    return _unavailable(state, name, f"model {name} has {batcher.queued_images} images queued and this request "
                                     f"adds {n} (limit {batcher.config.max_queue}, --max-queue); retry later",
                        "queue_full")


async def _generate(state: ServeState, request: Request, body: GenerationRequest, image: Any,
                    mask: Any = None) -> JSONResponse:
    card = _card(state, body.model)
    name, batcher, info = card.name, state.batchers[card.name], request.state.access
    info.update(model=name, n=body.n)
    state.heading_to(request.scope["state"], name)
    if state.draining:
        raise _unavailable(state, name, "the server is shutting down; retry on another replica", "shutting_down")
    if batcher.failed is not None:
        raise _worker_failed(name)
    if not batcher.ready.is_set():
        raise _unavailable(state, name, f"model {name} is still loading; retry shortly", "not_ready")
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    # decodes and fits control maps and fits edit images and masks: image work, in a worker thread
    arguments = await run_in_threadpool(prepare_arguments, card, body, seed, state.config.max_n, image, mask)
    if batcher.queued_images + body.n > batcher.config.max_queue:  # refuse before preparing anything
        raise _queue_full(state, name, body.n)
    state.in_flight += 1
    state.metrics.in_flight.inc()
    try:
        try:
            rows = await run_in_threadpool(batcher.pipeline.prepare, **arguments)
        except SettingError as e:  # named as the request's field, not as infer's flag
            raise ApiError(400, e.api_message(), param=e.api_param, code="invalid_value") from None
        except UserError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        try:
            job = batcher.submit(rows, asyncio.get_running_loop())
        except QueueFull:
            raise _queue_full(state, name, body.n) from None
        except Stopped:
            raise _unavailable(state, name, "the server is shutting down", "shutting_down") from None
        except WorkerDied:
            raise _worker_failed(name) from None
        finally:
            state.arrived(request.scope["state"])  # after submit: a batch never launches without a queued request
        images = await _wait(state, request, batcher, job)
    finally:
        state.in_flight -= 1
        state.metrics.in_flight.dec()
    info.update(queue_ms=job.queue_wait_s * 1000, engine_ms=job.engine_seconds * 1000, batch=job.batch_images)
    state.metrics.queue_wait_seconds.labels(name).observe(job.queue_wait_s)
    encoded = await run_in_threadpool(encode_images, images, body.output_format, body.output_compression)
    state.metrics.images.labels(name).inc(len(encoded))
    total_ms = (time.perf_counter() - request.scope["state"]["started"]) * 1000
    # how many images shared each engine batch this request's rows ran in; where the server's time went (W3C
    # Server-Timing, shown by browsers' developer tools and read by bench-serve)
    headers = {"X-Lcmtrt-Batch-Images": ",".join(map(str, job.batch_images)),
               "Server-Timing": f"queue;dur={job.queue_wait_s * 1000:.1f}, engine;dur={job.engine_seconds * 1000:.1f}, "
                                f"total;dur={total_ms:.1f}"}
    # `noise` names the generator the seed drove (torch: diffusers' numbers; numpy: this runtime's own), so a seed is
    # reproducible only with the same one
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b64, "seed": seed} for b64 in encoded],
                         "noise": batcher.pipeline.noise, "output_format": body.output_format, "size": card.size},
                        headers=headers)


async def _wait(state: ServeState, request: Request, batcher: Batcher, job: Job) -> Any:
    """The job's images; on a client disconnect or the request timeout its queued rows are dropped."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, timeout=state.config.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.future.done():
        error = job.future.exception()
        if isinstance(error, WorkerDied):
            raise _worker_failed(batcher.name)
        if error is not None:  # a bug in its batch: the worker logged the traceback and serves the next batch
            raise ApiError(500, f"generating the images failed: {type(error).__name__} (a bug in lcmtrt; the "
                                "server log has the traceback)", code="internal_error")
        return job.future.result()
    batcher.cancel(job)
    reason = "disconnect" if gone in done else "timeout"
    state.metrics.cancelled.labels(batcher.name, reason).inc()
    if reason == "disconnect":
        raise _ClientGone()
    raise _unavailable(state, batcher.name, f"not served within --request-timeout-s "
                                            f"{state.config.request_timeout_s:g}; retry later", "timeout")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Gate:
    """Plain ASGI middleware around every HTTP request: bearer keys, the body limit, metrics and one access-log
    line. (Not BaseHTTPMiddleware, which would hide client disconnects from the handlers.)"""

    def __init__(self, app: Any, state: ServeState):
        self.app, self.state = app, state
        self.keys = [key.encode() for key in state.config.api_keys]
        self.replica = [(b"x-lcmtrt-replica", state.config.replica.encode())] if state.config.replica else []
        self.limit = int(state.config.max_body_mb * 2**20)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, path = time.perf_counter(), [0], scope["path"]
        info: dict[str, Any] = {}
        scope.setdefault("state", {}).update(access=info, started=started)

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.replica:  # every answer says which replica gave it
                    message = {**message, "headers": [*message.get("headers", []), *self.replica]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), refusal.status, refusal.headers)(scope, receive, sending)
            else:
                if scope["method"] == "POST" and path.startswith("/v1/images/"):
                    self.state.expect(scope["state"])  # only past the key and size checks is it company
                await self.app(scope, self._limited(receive), sending)
        except _ClientGone:
            status[0] = 499  # nginx's "client closed request": nothing could be sent
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            self.state.arrived(scope["state"])  # refused, invalid or failed before it was queued
            self._record(scope, path, status[0], info, time.perf_counter() - started)

    def _refusal(self, scope: dict) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.keys and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            # every key is compared, in constant time, so the timing tells nothing about which part matched
            if not token or not any([hmac.compare_digest(token, key) for key in self.keys]):
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.state.config.max_body_mb:g} MB (--max-body-mb); "
                             "send smaller images", code="request_too_large")

    def _limited(self, receive: Any) -> Any:
        """A receive that stops a body without Content-Length (chunked) at the limit."""
        seen = [0]

        async def limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise self._too_large()
            return message

        return limited

    def _record(self, scope: dict, path: str, status: int, info: dict[str, Any], seconds: float) -> None:
        if not path.startswith("/v1/images/"):
            return
        model = info.get("model", "-")
        self.state.metrics.requests.labels(model, path.rsplit("/", 1)[-1], str(status)).inc()
        if status == 200:
            self.state.metrics.request_seconds.labels(model).observe(seconds)
            if self.state.config.replica:
                self.state.metrics.replica_requests.labels(self.state.config.replica, model).inc()
        batches = ",".join(str(b) for b in info.get("batch", [])) or "-"
        access_log.info("%s %s %d model=%s n=%s queue_ms=%.1f engine_ms=%.1f batch=%s total_ms=%.1f",
                        scope["method"], path, status, model, info.get("n", "-"), info.get("queue_ms", 0.0),
                        info.get("engine_ms", 0.0), batches, seconds * 1000)
