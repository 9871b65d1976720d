"""The OpenAI-compatible HTTP app: routes, API-key check, request validation, streaming, and the error shape.

    POST /v1/chat/completions   model = the recipe name (the MoA pipeline) or one loaded model; JSON or SSE
    GET  /v1/models             the recipe and every loaded model
    GET  /health                engines up, queue depth (no key needed; 503 when an engine is down)

Every failure is ``{"error": {"message", "type", "code"}}`` with its status: 400 a bad body or value (never 422),
401 a missing or wrong key, 404 an unknown model or route, 400 ``context_length_exceeded``, 413 a huge body,
429 a full queue, 503 an engine down, 500 a generation that failed. A request is checked completely before it is
queued, so a malformed one never reaches the engines or other requests.
With ``"moa_events": true`` (and ``stream``), the SSE stream also carries every role's events as data lines whose
JSON has ``"object": "moa.event"`` (docs/server.md): plain OpenAI clients never ask for them and see no difference.
Owns: HTTP and the wire format. Never touches engines or layers: jobs go to the Dispatcher, events come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from moa_local.api import MoA
from moa_local.config.registry import format_validation_error
from moa_local.errors import (
    ConversationFailed,
    EngineDiedError,
    EngineError,
    EngineStartError,
    InputError,
    MoaError,
    PromptTooLongError,
    ServerBusy,
)
from moa_local.messages import check_text, validate_messages
from moa_local.pipeline import RoleEvent
from moa_local.server.dispatch import Answer, Dispatcher, Event, Job, Overrides
from moa_local.server.limits import BODY_TIMEOUT_S
from moa_local.server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionUsage,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
)
from moa_local.server.settings import ServerSettings

RETRY_AFTER_S = 2
"""Seconds a client told 429 (busy) should wait before trying again."""


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(message=message, type=type, code=code, param=param))

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else \
            {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=headers)


def api_error(exc: MoaError) -> ApiError:
    """The HTTP status and error type of a moa-local error."""
    message = str(exc)
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, message, code="context_length_exceeded", param="messages")
    if isinstance(exc, InputError):
        return ApiError(400, message, code="invalid_value")
    if isinstance(exc, ServerBusy):
        return ApiError(429, message, type="rate_limit_error", code="queue_full")
    if isinstance(exc, (EngineDiedError, EngineStartError)):
        return ApiError(503, message, type="server_error", code="engine_unavailable")
    if isinstance(exc, (ConversationFailed, EngineError)):
        return ApiError(500, message, type="server_error", code="generation_failed")
    return ApiError(500, message, type="server_error", code="internal_error")


def create_app(moa: MoA, *, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app serving ``moa`` (already loaded). The app owns a Dispatcher; closing the app (lifespan end)
    stops it. The MoA's engines stay the caller's to close."""
    settings = settings or ServerSettings()
    gatherer = Dispatcher(moa, window=settings.window, max_queue=settings.max_queue)
    recipe = moa.recipe
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        gatherer.close()

    app = FastAPI(title="moa-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gatherer = gatherer

    # -- errors: always the OpenAI shape ------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {exc.errors()}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {exc!r}", type="server_error", code="internal_error").response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    # -- routes -------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        engines = gatherer.health()
        queued, running = gatherer.depth()
        ok = all(engines.values())
        body = {"status": "ok" if ok else "degraded", "recipe": recipe.name, "backend": moa.backend,
                "aggregation": recipe.aggregation, "engines": engines, "queue_depth": queued, "running": running,
                "window": gatherer.window}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        cards = [ModelCard(id=m, created=created) for m in [recipe.name, *gatherer.models]]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = _parse(await _read_body(request, settings.max_body_bytes))
        if req.model != recipe.name and req.model not in gatherer.models:
            raise ApiError(404, f"the model '{req.model}' does not exist here; serving: "
                           f"{', '.join([recipe.name, *gatherer.models])}", code="model_not_found", param="model")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", code="invalid_value", param="stream_options")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            messages = validate_messages(messages)
        except InputError as exc:
            raise ApiError(400, str(exc), code="invalid_value", param="messages") from None
        stop = req.stop_list()
        overrides = Overrides(max_tokens=req.answer_tokens(), temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=tuple(stop) if stop is not None else None)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(item: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, item)

        job = Job(target=req.model, messages=messages, sink=sink, overrides=overrides, stream=req.stream,
                  want_trace=req.moa_trace, events=req.stream and req.moa_events)
        try:
            gatherer.submit(job)
        except MoaError as exc:
            raise api_error(exc) from None
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not req.stream:
            try:
                item = await events.get()
                while isinstance(item, (str, RoleEvent)):
                    item = await events.get()
            except asyncio.CancelledError:
                job.cancel()
                raise
            if isinstance(item, MoaError):
                raise api_error(item)
            return JSONResponse(_completion(reply_id, req.model, item).model_dump(exclude_none=True))
        try:
            first = await events.get()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(first, MoaError):  # failed before any text: a proper status instead of a broken stream
            raise api_error(first)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        plan = _plan_event(recipe) if job.events and req.model == recipe.name else None
        body = _sse(reply_id, req.model, first, events, job, include_usage=include_usage, plan=plan)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _read_body(request: Request, limit: int) -> Any:
    """The body as JSON: refused with 413 as soon as it passes ``limit`` bytes (whatever Content-Length says),
    408 when it takes longer than BODY_TIMEOUT_S, 400 when it is not JSON, nests too deep, or holds text that is
    not valid Unicode (a lone surrogate)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                       code="request_timeout") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    try:
        check_text(body, "the request body")
    except InputError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    return body


def _parse(body: Any) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(body)
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ApiError(400, f"invalid request: {format_validation_error(exc)}", code="invalid_value",
                       param=".".join(str(p) for p in first) or None) from None


def _usage(answer: Answer) -> CompletionUsage:
    details = {"completion_tokens_details": {"reasoning_tokens": answer.hidden_tokens}} if answer.hidden_tokens else {}
    return CompletionUsage.model_validate({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        **details,
    })


def _completion(reply_id: str, model: str, answer: Answer) -> ChatCompletion:
    return ChatCompletion.model_validate({
        "id": reply_id,
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": answer.finish_reason}],
        "usage": _usage(answer),
        "moa_trace": answer.trace,
    })


def _chunk(reply_id: str, model: str, delta: dict[str, str], *, finish: str | None = None, **extra: Any) -> str:
    body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _plan_event(recipe: Any) -> dict[str, Any]:
    return {"object": "moa.event", "type": "plan", "layers": recipe.layers,
            "proposers": [{"role": r.name, "model": r.model} for r in recipe.proposer_roles()],
            "aggregator": {"role": recipe.aggregator_role().name, "model": recipe.aggregator.model}}


def role_event(event: RoleEvent) -> dict[str, Any]:
    """A RoleEvent as its ``moa.event`` JSON (docs/server.md)."""
    body: dict[str, Any] = {"object": "moa.event", "type": f"role.{event.kind}", "layer": event.layer,
                            "role": event.role, "model": event.model}
    if event.aggregator:
        body["aggregator"] = True
    if event.kind == "start":
        body["attempt"] = event.attempt
    elif event.kind == "delta":
        body["delta"] = event.delta
    elif event.response is not None:
        r = event.response
        body.update(usage=r.usage.to_dict(), seconds=round(r.seconds, 3), error=r.error, attempts=r.attempts)
        if r.trimmed is not None:
            body["trimmed"] = r.trimmed.to_dict()
    return body


async def _sse(reply_id: str, model: str, first: Event, events: asyncio.Queue[Event], job: Job, *,
               include_usage: bool, plan: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """The chat.completion.chunk stream: a role chunk, content chunks, a finish chunk, [usage], then [DONE];
    with moa_events, a plan event first and role events in between."""
    try:
        yield _chunk(reply_id, model, {"role": "assistant", "content": ""})
        if plan is not None:
            yield f"data: {json.dumps(plan, ensure_ascii=False)}\n\n"
        item = first
        while True:
            if isinstance(item, RoleEvent):
                yield f"data: {json.dumps(role_event(item), ensure_ascii=False)}\n\n"
            elif isinstance(item, str):
                yield _chunk(reply_id, model, {"content": item})
            elif isinstance(item, Answer):
                extra = {"moa_trace": item.trace} if item.trace is not None else {}
                yield _chunk(reply_id, model, {}, finish=item.finish_reason, **extra)
                if include_usage:
                    usage = _usage(item).model_dump(exclude_none=True)
                    body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:  # an error after text was sent: OpenAI clients raise on an "error" event
                yield f"data: {json.dumps(api_error(item).body.model_dump())}\n\n"
                break
            item = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client left, or the answer is complete: either way stop producing
