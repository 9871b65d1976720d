"""The server against hostile clients: invalid text, deep JSON, endless bodies, huge headers, half-sent requests,
sloppy types, the no-op values common clients send, 429s with Retry-After. Raw sockets and httpx, fake backend.
No response is ever a 500, and the process stays small."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_local.api import MoA
from moa_local.config import load_recipe
from moa_local.engines.fake import fake_pool
from moa_local.server.background import BackgroundServer
from moa_local.server.limits import HEADER_TIMEOUT_S
from moa_local.server.openai import create_app
from moa_local.server.settings import ServerSettings

GOOD = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    recipe = load_recipe("fake")
    app = create_app(MoA(recipe, fake_pool(recipe), backend="fake"), settings=ServerSettings())
    with BackgroundServer(app) as u:
        yield u


def post_raw(url: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json", **headers}, timeout=60)


def status_and_code(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else None


def test_a_lone_surrogate_is_a_400_before_any_engine_works(url: str) -> None:
    for stream in (False, True):
        body = json.dumps({**GOOD, "stream": stream, "messages": [{"role": "user", "content": "a\ud800b"}]})
        r = post_raw(url, body.encode())
        assert status_and_code(r) == (400, "invalid_value") and "surrogate" in r.json()["error"]["message"]


def test_deep_json_is_a_400(url: str) -> None:
    for depth in (2_000, 100_000):
        r = post_raw(url, b'{"model": "fake", "messages": ' + b"[" * depth + b"]" * depth + b"}")
        assert status_and_code(r) == (400, "invalid_json")


def test_an_endless_chunked_body_is_cut_off_at_the_limit(url: str) -> None:
    """300 MiB sent chunked (no Content-Length): refused at 4 MiB, without the server reading it all."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sent = [0]

    def body() -> Iterator[bytes]:
        chunk = b" " * (1024 * 1024)
        for _ in range(300):
            sent[0] += len(chunk)
            yield chunk

    try:
        r = httpx.post(f"{url}/v1/chat/completions", content=body(), timeout=60)
        assert status_and_code(r) == (413, "body_too_large")
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending: also a refusal
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"the server held {grown_mb:.0f} MB of body"
    assert sent[0] < 300 * 1024 * 1024 or grown_mb < 100


def test_a_huge_header_is_refused(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\n")
        reply = s.recv(4096)
    assert not reply.startswith(b"HTTP/1.1 200"), reply[:100]


def test_a_half_sent_request_is_dropped(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        start = time.monotonic()
        data = s.recv(4096)  # returns b"" when the server closes
        waited = time.monotonic() - start
    assert data == b"" or b"408" in data or b"400" in data
    assert waited < HEADER_TIMEOUT_S + 5


def test_a_slow_body_gets_408(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import moa_local.server.openai as openai_module

    monkeypatch.setattr(openai_module, "BODY_TIMEOUT_S", 1.0)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":")
        data = s.recv(4096)
    assert b" 408 " in data.split(b"\r\n", 1)[0], data[:200]


@pytest.mark.parametrize("extra", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                  {"role": "user", "content": "again"}]},
    {"logprobs": False}, {"top_logprobs": 0}, {"presence_penalty": 0}, {"frequency_penalty": 0.0},
    {"logit_bias": {}}, {"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"},
    {"parallel_tool_calls": True}, {"store": False}, {"metadata": {"run": "x"}}, {"service_tier": "auto"},
])
def test_the_no_op_values_clients_send_are_accepted(url: str, extra: dict[str, Any]) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, **extra}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("extra", [
    {"stream": "yes"}, {"max_tokens": "64"}, {"temperature": "0.5"}, {"n": True}, {"n": 2},
    {"logprobs": True}, {"presence_penalty": 0.5}, {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function"}]}, {"tool_choice": "auto"}, {"logit_bias": {"5": 1}},
    {"messages": [{"role": "user", "content": None}]},
])
def test_sloppy_types_and_real_options_are_400(url: str, extra: dict[str, Any]) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_busy_answers_carry_retry_after() -> None:
    recipe = load_recipe("fake")
    pool = fake_pool(recipe)
    from moa_local.config.recipe import FakeOptions

    for engine in pool.engines.values():
        engine.options = FakeOptions(latency_s=0.5)  # type: ignore[attr-defined]
    app = create_app(MoA(recipe, pool, backend="fake"), settings=ServerSettings(window=1, max_queue=0))
    import threading

    with BackgroundServer(app) as u:
        t = threading.Thread(target=lambda: httpx.post(f"{u}/v1/chat/completions", json=GOOD, timeout=30))
        t.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and httpx.get(f"{u}/health").json()["running"] < 1:
            time.sleep(0.01)
        r = httpx.post(f"{u}/v1/chat/completions", json=GOOD, timeout=30)
        t.join()
    assert r.status_code == 429 and r.headers["retry-after"] == "2"


def test_streamed_usage_matches_the_plain_answer(url: str) -> None:
    plain = httpx.post(f"{url}/v1/chat/completions", json=GOOD, timeout=30).json()["usage"]
    body = {**GOOD, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"] == plain
    single = {**GOOD, "model": "gemma3-270m"}
    plain = httpx.post(f"{url}/v1/chat/completions", json=single, timeout=30).json()["usage"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**single, "stream": True,
                                                                   "stream_options": {"include_usage": True}},
                      timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"] == plain and plain["prompt_tokens"] > 0


TEXT = st.text(max_size=30)
VALUE = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**9) | st.floats(allow_nan=False) | TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
FIELD = st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n",
                         "stream_options", "moa_trace", "moa_events", "logprobs", "tools", "tool_choice",
                         "response_format", "presence_penalty", "user", "max_completion_tokens"])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]),
                                 "content": VALUE})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(FIELD, VALUE, max_size=5).map(lambda d: {**GOOD, **d})
       | st.builds(lambda ms: {**GOOD, "messages": ms}, st.lists(MESSAGE, max_size=4)) | VALUE)
def test_fuzzed_bodies_never_get_a_500(url: str, body: Any) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body).encode(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        assert r.json()["error"]["message"]
