"""Every failure in the OpenAI error shape with its status, over raw HTTP (httpx), fake backend. A malformed request
never gets a 500 (nor FastAPI's 422) and never harms the requests around it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_local.api import MoA
from moa_local.config import load_recipe
from moa_local.config.recipe import FakeOptions, Recipe
from moa_local.engines.fake import fake_pool
from moa_local.engines.pool import EnginePool
from moa_local.server.background import BackgroundServer
from moa_local.server.openai import create_app
from moa_local.server.settings import ServerSettings

GOOD = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
HTTP = httpx.Client(timeout=30)  # one connection pool for the whole module (thread-safe)


@contextmanager
def served(recipe: Recipe | None = None, **options: Any) -> Iterator[tuple[str, EnginePool]]:
    recipe = recipe or load_recipe("fake")
    fake = options.pop("fake", None)
    pool = fake_pool(recipe)
    if fake:
        for engine in pool.engines.values():
            engine.options = FakeOptions(**fake)  # type: ignore[attr-defined]
    app = create_app(MoA(recipe, pool, backend="fake"), settings=ServerSettings(**options))
    with BackgroundServer(app) as url:
        yield url, pool


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with served(api_key="sesame", max_body_bytes=64 * 1024) as (u, _):
        yield u


def post(url: str, body: Any, *, key: str | None = "sesame", raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if raw is not None:
        return HTTP.post(f"{url}/v1/chat/completions", content=raw, headers=headers)
    return HTTP.post(f"{url}/v1/chat/completions", json=body, headers=headers)


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fake"},
        {"model": "fake", "messages": []},
        {"model": "fake", "messages": "hello"},
        {"model": "fake", "messages": [{"role": "user"}]},
        {"model": "fake", "messages": [{"role": "robot", "content": "x"}]},
        {"model": "fake", "messages": [{"role": "user", "content": 5}]},
        {"model": "fake", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {**GOOD, "n": 2},
        {**GOOD, "temperature": 5},
        {**GOOD, "top_p": 0},
        {**GOOD, "max_tokens": 0},
        {**GOOD, "max_tokens": "ten"},
        {**GOOD, "stop": ["a", "b", "c", "d", "e"]},
        {**GOOD, "stream_options": {"include_usage": True}},
        {**GOOD, "logit_bias": {"1": 5}},
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        [GOOD],
        "hello",
    ],
)
def test_bad_bodies_are_400_in_the_openai_shape(url: str, body: Any) -> None:
    err = error_of(post(url, body), 400)
    assert err["type"] == "invalid_request_error"


def test_not_json_and_too_large(url: str) -> None:
    error_of(post(url, None, raw=b"{not json"), 400, "invalid_json")
    error_of(post(url, None, raw=b"\xff\xfe"), 400, "invalid_json")
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    error_of(post(url, None, raw=big), 413, "body_too_large")


def test_api_key_is_required_and_compared(url: str) -> None:
    for key in (None, "wrong", "sesame2", "sesam"):
        r = post(url, GOOD, key=key)
        error_of(r, 401, "invalid_api_key")
        assert r.headers.get("www-authenticate") == "Bearer"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200, "health needs no key"
    assert post(url, GOOD).status_code == 200


def test_unknown_model_and_route_are_404(url: str) -> None:
    err = error_of(post(url, {**GOOD, "model": "gpt-4"}), 404, "model_not_found")
    assert "fake" in err["message"] and "gemma3-270m" in err["message"]
    error_of(httpx.get(f"{url}/v1/nothing"), 404)
    error_of(httpx.get(f"{url}/v1/chat/completions"), 405)


def test_a_prompt_too_long_is_400_context_length_exceeded(url: str) -> None:
    words = " ".join(["word"] * 9000)  # more than smollm2's 8192-token context, whatever the tokenizer
    err = error_of(post(url, {**GOOD, "messages": [{"role": "user", "content": words}]}), 400, "context_length_exceeded")
    assert "8192" in err["message"]
    error_of(post(url, {**GOOD, "max_tokens": 131072}), 400, "context_length_exceeded")
    single = {**GOOD, "model": "gemma3-270m", "messages": [{"role": "user", "content": words}], "stream": True}
    assert post(url, single).status_code == 200, "gemma3 alone has a 32768-token context"
    err = error_of(post(url, {**single, "max_tokens": 30000}), 400, "context_length_exceeded")
    assert "32768" in err["message"]


def test_a_full_queue_is_429() -> None:
    with served(window=1, max_queue=1, fake={"latency_s": 0.15}) as (url, _):
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(post(url, GOOD, key=None).status_code)) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = HTTP.get(f"{url}/health").json()
            if health["queue_depth"] + health["running"] == 2:
                break
            time.sleep(0.01)
        err = error_of(post(url, GOOD, key=None), 429, "queue_full")
        assert err["type"] == "rate_limit_error"
        for t in threads:
            t.join(30)
        assert codes == [200, 200], "the queued requests were unharmed"
        assert post(url, GOOD, key=None).status_code == 200, "room again once they are done"


def test_an_engine_down_is_503_and_health_says_so() -> None:
    with served() as (url, pool):
        assert post(url, GOOD, key=None).status_code == 200
        pool.engines["gemma3-270m"].close()
        err = error_of(post(url, GOOD, key=None), 503, "engine_unavailable")
        assert "gemma3-270m" in err["message"]
        error_of(post(url, {**GOOD, "stream": True}, key=None), 503, "engine_unavailable")
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["engines"]["gemma3-270m"] is False
        ok = post(url, {**GOOD, "model": "smollm2-135m-instruct"}, key=None)
        assert ok.status_code == 200, "a request that needs only live engines still works"


def test_a_failed_generation_is_500_not_a_crash() -> None:
    with served(fake={"fail_if_contains": "boom"}) as (url, _):
        err = error_of(post(url, {**GOOD, "messages": [{"role": "user", "content": "boom"}]}, key=None), 500, "generation_failed")
        assert "proposers answered" in err["message"]
        assert post(url, GOOD, key=None).status_code == 200


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
FIELDS = st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n",
                          "stream_options", "moa_trace", "max_completion_tokens", "user"])
BODIES = st.dictionaries(FIELDS, JSONISH, max_size=6).map(lambda d: {**GOOD, **d}) | JSONISH


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_no_body_makes_a_500_or_a_422(url: str, body: Any) -> None:
    r = post(url, body)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        error_of(r, r.status_code)
    elif "text/event-stream" not in r.headers.get("content-type", ""):
        assert r.json()["choices"][0]["message"]["content"]


def test_malformed_requests_do_not_harm_the_others(url: str) -> None:
    results: dict[int, httpx.Response] = {}

    def one(i: int) -> None:
        body: Any = {**GOOD, "messages": [{"role": "user", "content": f"question {i}"}]} if i % 2 else {"model": 3}
        results[i] = post(url, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, r in results.items():
        if i % 2:
            assert r.status_code == 200 and f"question {i}" in r.json()["choices"][0]["message"]["content"]
        else:
            error_of(r, 400)
