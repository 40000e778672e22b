"""The aiohttp application: routes, error middleware, and the figures poller as a background
task (a cleanup context, as in aiohttp's background_tasks example).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /`` (status page), ``GET /status.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.generation import Step
from gateway.openai_api import ApiError, GenerationRequest, chunk, error_body, new_id, parse_request, response, usage
from gateway.state import Gateway
from gateway.status_page import STATIC_DIR, status_snapshot
from pipeline.client import broker_stats
from pipeline.security import client_keys
from pipeline.protocol import ErrorCode, SledError

log = structlog.get_logger("sled.gateway")

GATEWAY = web.AppKey("gateway", Gateway)
POLLER_TASK = web.AppKey("poller_task", asyncio.Task)

MAX_BODY_BYTES = 4 << 20
READY_TIMEOUT_S = 1.0
RETRY_AFTER_OVERLOADED_S = 1.0
RETRY_AFTER_UNAVAILABLE_S = 2.0


def create_app(config, tokenizer) -> web.Application:
    gateway = Gateway(config, tokenizer)
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(pipeline_figures)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/", status_page)
    app.router.add_static("/static", STATIC_DIR)
    return app


async def pipeline_figures(app: web.Application) -> AsyncIterator[None]:
    """Poll broker and drafters in the background while the app runs."""
    gateway = app[GATEWAY]
    poller = gateway.open()
    with contextlib.suppress(Exception):
        await poller.poll_once()  # so /v1/models and the first requests know which drafters answer
    app[POLLER_TASK] = asyncio.create_task(poller.run(), name="stats-poller")
    yield
    app[POLLER_TASK].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await app[POLLER_TASK]
    gateway.close()


# --- middleware ------------------------------------------------------------------------------


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route
    return route.resource.canonical if route.resource is not None else "unmatched"


def _error_response(exc: ApiError) -> web.Response:
    headers = {"Retry-After": str(int(exc.retry_after + 0.999))} if exc.retry_after else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure of a /v1 request as an OpenAI-style JSON body; every request counted."""
    m = request.app[GATEWAY].metrics
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except ApiError as exc:
        status = exc.status
        m.errors.labels(exc.code or exc.type).inc()
        log.info("request_rejected", path=request.path, status=exc.status, code=exc.code, param=exc.param,
                 reason=exc.message)
        return _error_response(exc)
    except web.HTTPException as exc:
        status = exc.status
        if not request.path.startswith("/v1/"):
            raise
        m.errors.labels("http_" + str(exc.status)).inc()
        return web.json_response(error_body(exc.reason, code=exc.reason.lower().replace(" ", "_")), status=exc.status)
    except asyncio.CancelledError:
        status = 499  # the client went away: aiohttp cancelled the handler, which closed the session
        m.errors.labels("client_disconnected").inc()
        log.info("client_disconnected", path=request.path)
        raise
    except Exception as exc:
        m.errors.labels("internal").inc()
        log.exception("request_crashed", path=request.path)
        return web.json_response(error_body(f"internal error: {type(exc).__name__}", code="internal",
                                            type_="server_error"), status=500)
    finally:
        m.requests.labels(_endpoint(request), str(status)).inc()


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    keys = request.app[GATEWAY].config.gateway.api_keys
    if keys and request.path.startswith("/v1/"):
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in keys:
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
    return await handler(request)


# --- generation ------------------------------------------------------------------------------


def http_error(exc: SledError | TimeoutError) -> ApiError:
    """The one mapping of a pipeline error to HTTP: overload is 429, other retriable codes 503
    (both with Retry-After), invalid input 400, no answer in time 504, anything else 502."""
    if isinstance(exc, TimeoutError):
        return ApiError(504, "no answer from the pipeline in time", code="timeout", type_="server_error")
    message = str(exc)
    if exc.code == ErrorCode.OVERLOADED:
        return ApiError(429, message, code=exc.code, type_="rate_limit_error", retry_after=RETRY_AFTER_OVERLOADED_S)
    if exc.retriable:
        return ApiError(503, message, code=exc.code, type_="server_error", retry_after=RETRY_AFTER_UNAVAILABLE_S)
    if exc.code == ErrorCode.INVALID:
        return ApiError(400, message, code=exc.code)
    return ApiError(502, message, code=exc.code, type_="server_error")


async def _body(request: web.Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    body = await _body(request)
    # tokenizing (a chat template, a long prompt) runs off the event loop, as model code does
    req = await asyncio.get_running_loop().run_in_executor(
        None, parse_request, endpoint, body, gateway.tokenizer, gateway.limits, gateway.model_names)
    generation = await gateway.generation(req)
    rid = new_id(endpoint)
    model = req.model or generation.drafter
    # bound for this request only: aiohttp serves a keep-alive connection's requests in one task
    with structlog.contextvars.bound_contextvars(request_id=rid, drafter=generation.drafter):
        log.info("request_started", endpoint=endpoint, prompt_tokens=len(req.prompt_ids), max_tokens=req.max_tokens,
                 stream=req.stream, temperature=req.temperature)
        async with contextlib.aclosing(generation.steps()) as steps:
            try:
                first = await anext(steps)  # the session is open and its first round is in
            except (SledError, TimeoutError) as exc:
                raise http_error(exc) from None
            if req.stream:
                return await _stream(request, gateway, req, rid, model, first, steps)
            return await _collect(req, rid, model, first, steps)


def _finish(req: GenerationRequest, step: Step) -> dict:
    use = usage(len(req.prompt_ids), step.completion_tokens)
    log.info("request_finished", finish_reason=step.finish_reason, completion_tokens=step.completion_tokens,
             rounds=step.sled.get("rounds"), accepted=step.sled.get("accepted"), session_id=step.sled.get("session_id"),
             seconds=round(step.elapsed_s, 3))
    return use


async def _collect(req: GenerationRequest, rid: str, model: str, step: Step, steps) -> web.Response:
    parts = [step.text]
    try:
        while not step.done:
            step = await anext(steps)
            parts.append(step.text)
    except (SledError, TimeoutError) as exc:
        raise http_error(exc) from None
    use = _finish(req, step)
    return web.json_response(response(req.endpoint, rid, model, "".join(parts), step.finish_reason, use, step.sled))


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _stream(request: web.Request, gateway: Gateway, req: GenerationRequest, rid: str, model: str, step: Step,
                  steps) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    endpoint = req.endpoint
    try:
        if endpoint == "chat":
            await resp.write(_sse(chunk(endpoint, rid, model, "", first=True)))
        while True:
            if step.text:
                await resp.write(_sse(chunk(endpoint, rid, model, step.text)))
            if step.done:
                use = _finish(req, step)
                await resp.write(_sse(chunk(endpoint, rid, model, None, step.finish_reason, use=use, sled=step.sled)))
                if req.include_usage:
                    await resp.write(_sse(chunk(endpoint, rid, model, None, use=use, no_choices=True)))
                break
            step = await anext(steps)
    except (SledError, TimeoutError) as exc:
        # headers are gone already: the error travels as an event (the openai client raises on it)
        err = http_error(exc)
        gateway.metrics.errors.labels(err.code or err.type).inc()
        log.warning("stream_failed", code=err.code, reason=err.message)
        await resp.write(_sse(err.body()))
    except ConnectionResetError:
        gateway.metrics.errors.labels("client_disconnected").inc()
        log.info("client_disconnected")
        return resp  # leaving `steps` closes the session (Cancel to the drafter)
    await resp.write(_sse("[DONE]"))
    await resp.write_eof()
    return resp


# --- figures and health ----------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": request.app[GATEWAY].models()})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when a request without ``model`` would be served now: the broker answers, at least one
    verifier is registered with it, and the default drafter answers."""
    gateway = request.app[GATEWAY]
    try:
        stats = await broker_stats(gateway.config.broker.frontend, timeout=READY_TIMEOUT_S, ctx=gateway.ctx,
                                   curve=client_keys(gateway.config, gateway.config.security.admin_key))
    except (TimeoutError, OSError):
        stats = None
    verifiers = sorted(stats["verifiers"]) if stats else []
    default = gateway.default_drafter
    # the same look a request takes (GatewayService.generation): the last poll, else a fresh probe
    drafter_up = gateway.state.drafters[default].up or await gateway.poller.probe_drafter(default)
    ok = bool(verifiers) and drafter_up
    body = {"ready": ok, "broker": stats is not None, "verifiers": verifiers, "default_drafter": default,
            "drafters": {n: f.up for n, f in gateway.state.drafters.items()}}
    headers = None if ok else {"Retry-After": str(int(RETRY_AFTER_UNAVAILABLE_S))}
    return web.json_response(body, status=200 if ok else 503, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[GATEWAY].metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status_json(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        since = 0.0
    return web.json_response(status_snapshot(request.app[GATEWAY], since))


async def status_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")
