"""A stub of `moa-local serve` that speaks exactly the streaming protocol the chat page reads, with scripted texts
and timing, so the page can be tested in seconds and without the real server.

    POST /v1/chat/completions {"model", "messages", "stream": true, "moa_events": true}
      data: {"object": "moa.event", "type": "plan", "layers", "proposers": [{"role", "model"}], "aggregator"}
      data: {"object": "moa.event", "type": "role.start", "layer", "role", "model", "attempt"}
      data: {"object": "moa.event", "type": "role.delta", "layer", "role", "model", "delta"}      (proposers)
      data: {"object": "moa.event", "type": "role.done", "layer", "role", "model", "usage", "seconds", "error",
             "attempts"}
      aggregator: role.start/role.done with "layer": layers + 1 and "aggregator": true; its text as
      chat.completion.chunk content; a finish chunk; data: [DONE]. A failure: data: {"error": {...}}, [DONE].
    Errors before any output: 401 / 404 / 400 / 429 with the OpenAI error body.

A recorded trace can be replayed instead (Stub.replay: its roles, texts, tokens and seconds; screenshots use it).
Otherwise prompt markers script the answer: "#retry" (gemma3's first layer-1 attempt is cut off and retried), "#fail-role"
(gemma3 fails in every layer), "#fail-all" (the conversation fails after layer 1), "#busy" (429).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request  # at module level: FastAPI reads the annotations by name

from moa_local.server.page import mount_page

RECIPE = "stub-recipe"
PROPOSERS = [{"role": "smollm2", "model": "smollm2-135m-instruct"}, {"role": "gemma3", "model": "gemma3-270m"}]
AGGREGATOR = {"role": "aggregator", "model": "smollm2-135m-instruct"}
LAYERS = 2
SINGLE = "smollm2-135m-instruct"


def proposer_text(layer: int, role: str, prompt: str) -> str:
    return f"{role} in layer {layer} answers '{prompt[:30]}' with a few words that stream one by one"


def answer_text(prompt: str, turn: int) -> str:
    return f"Final answer to '{prompt[:30]}' (turn {turn}): the proposers agree on the main point"


def single_text(prompt: str) -> str:
    return f"One model alone answers '{prompt[:30]}'"


@dataclass
class Stub:
    """The stub's settings and what it received."""

    api_key: str | None = None
    token_delay_s: float = 0.03
    recipe: str = RECIPE
    replay: dict[str, Any] | None = None  # a recorded trace (`--trace` JSON) to stream instead of the scripted texts
    requests: list[dict[str, Any]] = field(default_factory=list)


def _event(**body: Any) -> str:
    return f"data: {json.dumps({'object': 'moa.event', **body})}\n\n"


def _chunk(delta: dict[str, str], finish: str | None = None) -> str:
    body = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()), "model": RECIPE,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def create_stub_app(stub: Stub) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    mount_page(app)

    def error(status: int, message: str, code: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code,
                                       "param": None}}, status_code=status)

    def unauthorized(request: Request) -> JSONResponse | None:
        if stub.api_key is None or request.headers.get("authorization") == f"Bearer {stub.api_key}":
            return None
        return error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "stub"}
                                                        for m in (stub.recipe, SINGLE, "gemma3-270m")]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        stub.requests.append(body)
        if body.get("model") not in (stub.recipe, SINGLE, "gemma3-270m"):
            return error(404, f"the model '{body.get('model')}' does not exist here", "model_not_found")
        if not (body.get("stream") and body.get("moa_events")):
            return error(400, "the stub only streams with moa_events", "invalid_value")
        prompt = body["messages"][-1]["content"]
        if "#busy" in prompt:
            return JSONResponse({"error": {"message": "256 requests are already queued or running; try again later",
                                           "type": "rate_limit_error", "code": "queue_full", "param": None}},
                                status_code=429)
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        gen = _moa(stub, prompt, turn) if body["model"] == stub.recipe else _single(stub, prompt)
        return StreamingResponse(gen, media_type="text/event-stream")

    return app


async def _words(stub: Stub, text: str) -> Any:
    for i, word in enumerate(text.split(" ")):
        await asyncio.sleep(stub.token_delay_s)
        yield word if i == 0 else " " + word


async def _single(stub: Stub, prompt: str) -> Any:
    yield _chunk({"role": "assistant", "content": ""})
    async for piece in _words(stub, single_text(prompt)):
        yield _chunk({"content": piece})
    yield _chunk({}, finish="stop")
    yield "data: [DONE]\n\n"


def _script(stub: Stub, prompt: str, turn: int) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """What each role says: the recorded trace when replaying one, else the scripted texts and markers."""
    if stub.replay is not None:
        layers = [[{**r, "retry_at": None} for r in layer["responses"]] for layer in stub.replay["layers"]]
        return layers, {**stub.replay["aggregator"], "retry_at": None}
    layers = []
    for layer in range(1, LAYERS + 1):
        roles = []
        for p in PROPOSERS:
            fails = p["role"] == "gemma3" and "#fail-role" in prompt
            retried = p["role"] == "gemma3" and layer == 1 and "#retry" in prompt
            text = "" if fails else proposer_text(layer, p["role"], prompt)
            roles.append({**p, "text": text, "retry_at": 3 if retried else None, "seconds": 0.5 * layer,
                          "usage": {"prompt_tokens": 10 * layer, "completion_tokens": len(text.split())},
                          "error": "fake failure: request contains '#fail-role'" if fails else None,
                          "attempts": 2 if (retried or fails) else 1})
        layers.append(roles)
    text = answer_text(prompt, turn)
    return layers, {**AGGREGATOR, "text": text, "usage": {"prompt_tokens": 99, "completion_tokens": len(text.split())},
                    "seconds": 1.25, "error": None, "attempts": 1, "retry_at": None}


def _who(r: dict[str, Any]) -> dict[str, str]:
    return {"role": r["role"], "model": r["model"]}


async def _moa(stub: Stub, prompt: str, turn: int) -> Any:
    layers, agg = _script(stub, prompt, turn)
    yield _event(type="plan", layers=len(layers), proposers=[_who(r) for r in layers[0]], aggregator=_who(agg))
    yield _chunk({"role": "assistant", "content": ""})
    for layer, roles in enumerate(layers, start=1):
        # Every proposer of the layer streams at once: their deltas interleave, as on the real server.
        for r in roles:
            yield _event(type="role.start", layer=layer, attempt=1, **_who(r))
        words = [(r["text"] or "").split(" ") if r["text"] else [] for r in roles]
        for i in range(max(len(w) for w in words)):
            await asyncio.sleep(stub.token_delay_s)
            for r, w in zip(roles, words, strict=True):
                if i < len(w):
                    piece = w[i] if i == 0 else " " + w[i]
                    if r["retry_at"] == i:  # the first attempt dies here; the retry starts the text over
                        yield _event(type="role.start", layer=layer, attempt=2, **_who(r))
                        piece = " ".join(w[: i + 1])
                    yield _event(type="role.delta", layer=layer, delta=piece, **_who(r))
        for r in roles:
            yield _event(type="role.done", layer=layer, usage=r["usage"], seconds=r["seconds"], error=r["error"],
                         attempts=r["attempts"], **_who(r))
        if layer == 1 and "#fail-all" in prompt:
            yield ("data: " + json.dumps({"error": {"message": "layer 2: only 0 of 2 proposers answered (min_proposers=1)",
                                                     "type": "server_error", "code": "generation_failed"}}) + "\n\n")
            yield "data: [DONE]\n\n"
            return
    yield _event(type="role.start", layer=len(layers) + 1, aggregator=True, attempt=1, **_who(agg))
    async for piece in _words(stub, agg["text"] or ""):
        yield _chunk({"content": piece})
    yield _event(type="role.done", layer=len(layers) + 1, aggregator=True, usage=agg["usage"], seconds=agg["seconds"],
                 error=agg["error"], attempts=agg["attempts"], **_who(agg))
    yield _chunk({}, finish="stop")
    yield "data: [DONE]\n\n"
