"""The OpenAI-compatible server as a client meets it: the official `openai` client on loopback against the real
app (uvicorn in a thread), fake backend. Every request enters the scheduler at once: checked by timing and by the
requests each engine received."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from openai import OpenAI

from moa_local.api import MoA
from moa_local.config.recipe import FakeOptions, Recipe
from moa_local.engines.fake import FakeEngine, fake_pool
from moa_local.engines.pool import EnginePool
from moa_local.server.background import BackgroundServer
from moa_local.server.openai import create_app
from moa_local.server.settings import ServerSettings

Q = [{"role": "user", "content": "Why is the sky blue?"}]


@contextmanager
def served(recipe: Recipe, **fake: Any) -> Iterator[tuple[OpenAI, EnginePool, str]]:
    pool = fake_pool(recipe)
    if fake:
        for engine in pool.engines.values():
            engine.options = FakeOptions(**fake)  # type: ignore[attr-defined]
    app = create_app(MoA(recipe, pool, backend="fake"), settings=ServerSettings())
    with BackgroundServer(app) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), pool, url


def engine(pool: EnginePool, model: str) -> FakeEngine:
    return pool.engines[model]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[OpenAI, EnginePool, str]]:
    from moa_local.config import load_recipe

    with served(load_recipe("fake")) as s:
        yield s


def test_models_lists_the_recipe_and_each_loaded_model(server: tuple[OpenAI, EnginePool, str]) -> None:
    client, _, _ = server
    assert [m.id for m in client.models.list().data] == ["fake", "smollm2-135m-instruct", "gemma3-270m"]


def test_moa_answer_usage_and_trace(server: tuple[OpenAI, EnginePool, str]) -> None:
    client, _, _ = server
    r = client.chat.completions.create(model="fake", messages=Q, extra_body={"moa_trace": True})  # type: ignore[arg-type]
    answer = r.choices[0].message.content or ""
    assert answer.startswith("[smollm2-135m-instruct]") and "synthesized 2 references" in answer
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == "fake"
    trace = (r.model_extra or {})["moa_trace"]
    assert [len(layer["responses"]) for layer in trace["layers"]] == [2, 2] and trace["output"] == answer
    assert r.usage is not None and r.usage.completion_tokens == len(answer.split()) + r.usage.completion_tokens_details.reasoning_tokens  # type: ignore[union-attr]
    plain = client.chat.completions.create(model="fake", messages=Q)  # type: ignore[arg-type]
    assert "moa_trace" not in (plain.model_extra or {})


def test_streamed_answer_equals_the_plain_one(server: tuple[OpenAI, EnginePool, str]) -> None:
    client, _, _ = server
    plain = client.chat.completions.create(model="fake", messages=Q).choices[0].message.content  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="fake", messages=Q, stream=True,  # type: ignore[arg-type]
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"] and chunks[-1].usage is not None and not chunks[-1].choices


def test_one_model_alone_with_overrides(server: tuple[OpenAI, EnginePool, str]) -> None:
    client, pool, _ = server
    before = len(engine(pool, "gemma3-270m").requests)
    r = client.chat.completions.create(model="gemma3-270m", messages=Q, max_tokens=3, temperature=0, seed=7)  # type: ignore[arg-type]
    content = r.choices[0].message.content or ""
    assert content.startswith("[gemma3-270m] ") and len(content.split()) == 3 and r.choices[0].finish_reason == "length"
    calls = list(engine(pool, "gemma3-270m").requests)[before:]
    assert len(calls) == 1 and calls[0].sampling.max_tokens == 3 and calls[0].sampling.temperature == 0
    assert "references" not in (r.choices[0].message.content or "")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m-instruct", messages=Q, stream=True, max_completion_tokens=4))  # type: ignore[arg-type]
    assert text.startswith("[smollm2-135m-instruct]") and len(text.split()) == 4


def test_moa_overrides_reach_the_right_roles(server: tuple[OpenAI, EnginePool, str]) -> None:
    client, pool, _ = server
    smol = engine(pool, "smollm2-135m-instruct")
    before = len(smol.requests)
    r = client.chat.completions.create(model="fake", messages=Q, max_tokens=2, temperature=0.1, stop=["zzz"])  # type: ignore[arg-type]
    assert len((r.choices[0].message.content or "").split()) == 2 and r.choices[0].finish_reason == "length"
    layer1, _, final = list(smol.requests)[before:]
    assert layer1.sampling.max_tokens == 64 and layer1.sampling.temperature == 0.1 and layer1.sampling.stop == []
    assert final.sampling.max_tokens == 2 and final.sampling.temperature == 0.1 and final.sampling.stop == ["zzz"]


def test_health_reports_engines_and_queue(server: tuple[OpenAI, EnginePool, str]) -> None:
    _, _, url = server
    body = httpx.get(f"{url}/health").json()
    assert body["status"] == "ok" and body["engines"] == {"smollm2-135m-instruct": True, "gemma3-270m": True}
    assert body["queue_depth"] == 0 and body["recipe"] == "fake"


def _concurrently(n: int, call: Any) -> list[Any]:
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        out[i] = call(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_ten_users_each_get_their_own_answer(fake_recipe: Recipe) -> None:
    with served(fake_recipe, latency_s=0.05) as (client, pool, _):
        answers = _concurrently(10, lambda i: client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": f"question {i}"}]).choices[0].message.content)
        smol, gemma = engine(pool, "smollm2-135m-instruct"), engine(pool, "gemma3-270m")
        assert len(smol.requests) == 30 and len(gemma.requests) == 20, "2 layers + aggregator for each user"
    assert all(f"question {i}" in a for i, a in enumerate(answers)), "each user got their own answer"


def test_a_request_never_waits_for_another_requests_work(fake_recipe: Recipe) -> None:
    """B, sent while A runs, takes as long as B alone: it enters the scheduler at once."""
    import time

    with served(fake_recipe, latency_s=0.25) as (client, _, _):
        def timed(text: str) -> float:
            start = time.perf_counter()
            client.chat.completions.create(model="fake", messages=[{"role": "user", "content": text}])
            return time.perf_counter() - start

        alone = timed("b alone")
        got: dict[str, float] = {}
        a = threading.Thread(target=lambda: got.__setitem__("a", timed("a first")))
        a.start()
        time.sleep(0.3)  # A is in its second layer
        got["b"] = timed("b second")
        a.join()
    assert got["b"] < 1.2 * alone, (got, alone)


def test_streamed_users_stream_their_own_answer(fake_recipe: Recipe) -> None:
    with served(fake_recipe, latency_s=0.02) as (client, pool, _):
        def ask(i: int) -> str:
            stream = client.chat.completions.create(model="fake", stream=True,
                                                    messages=[{"role": "user", "content": f"question {i}"}])
            return "".join(c.choices[0].delta.content or "" for c in stream)

        answers = _concurrently(5, ask)
        smol = engine(pool, "smollm2-135m-instruct")
        assert len(smol.requests) == 10 and len(smol.streams) == 5, "only the aggregator streams"
    assert all(f"question {i}" in a and "synthesized 2" in a for i, a in enumerate(answers))


def test_each_request_keeps_its_own_sampling(fake_recipe: Recipe) -> None:
    with served(fake_recipe) as (client, pool, _):
        _concurrently(4, lambda i: client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": f"q{i}"}], temperature=0 if i % 2 else 0.5))
        temps = {r.messages[-1]["content"]: r.sampling.temperature for r in engine(pool, "gemma3-270m").requests}
        assert temps == {"q0": 0.5, "q1": 0.0, "q2": 0.5, "q3": 0.0}


def test_moa_events_stream_every_role_and_plain_clients_see_none(fake_recipe: Recipe) -> None:
    import json

    with served(fake_recipe, token_delay_s=0.001) as (client, _, url):
        body = {"model": "fake", "messages": Q, "stream": True, "moa_events": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        items = [json.loads(x) for x in lines[:-1]]
        events = [x for x in items if x.get("object") == "moa.event"]
        assert events[0]["type"] == "plan" and events[0]["layers"] == 2
        assert [p["role"] for p in events[0]["proposers"]] == ["smollm2", "gemma3"]
        for layer in (1, 2):
            for role in ("smollm2", "gemma3"):
                mine = [e for e in events if e.get("layer") == layer and e.get("role") == role]
                kinds = [e["type"] for e in mine]
                assert kinds[0] == "role.start" and kinds[-1] == "role.done" and "role.delta" in kinds
                text = "".join(e["delta"] for e in mine if e["type"] == "role.delta")
                assert text.startswith(f"[{'smollm2-135m-instruct' if role == 'smollm2' else 'gemma3-270m'}]")
                assert mine[-1]["error"] is None and mine[-1]["usage"]["completion_tokens"] > 0
        agg = [e for e in events if e.get("aggregator") is True]
        assert [e["type"] for e in agg] == ["role.start", "role.done"] and agg[0]["layer"] == 3
        content = "".join(x["choices"][0]["delta"].get("content") or "" for x in items
                          if x.get("object") == "chat.completion.chunk" and x["choices"])
        assert "synthesized 2 references" in content
        plain = list(client.chat.completions.create(model="fake", messages=Q, stream=True))  # type: ignore[arg-type]
        assert all(c.object == "chat.completion.chunk" for c in plain)


def test_chunked_recipe_streams_over_http(fake_recipe: Recipe) -> None:
    recipe = fake_recipe.model_copy(update={"aggregation": "chunked", "chunk_tokens": 2})
    with served(recipe, token_delay_s=0.001) as (client, pool, url):
        chunks = list(client.chat.completions.create(model="fake", messages=Q, stream=True,  # type: ignore[arg-type]
                                                     extra_body={"moa_trace": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "synthesized 2 references" in text
        trace = next((c.model_extra or {}).get("moa_trace") for c in chunks if (c.model_extra or {}).get("moa_trace"))
        assert trace["output"] == text and len(trace["layers"]) == 2
        assert not engine(pool, "gemma3-270m").requests and engine(pool, "gemma3-270m").streams, "every layer streamed"
        plain = client.chat.completions.create(model="fake", messages=Q)  # type: ignore[arg-type]
        assert "synthesized 2 references" in (plain.choices[0].message.content or "")
        assert len(engine(pool, "gemma3-270m").requests) == 2, "non-streamed requests run the full pipeline"
        assert httpx.get(f"{url}/health").json()["aggregation"] == "chunked"


def test_cli_serve_answers_then_stops_on_sigint() -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MOA_LOCAL_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moa_local.cli import main; main()", "serve", "-r", "fake", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert "synthesized 2 references" in (client.chat.completions.create(model="fake", messages=Q).choices[0].message.content or "")  # type: ignore[arg-type]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401, "the env var key is enforced"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out  # stopped by Ctrl-C: closed cleanly, exit 130 like every command
    assert f"127.0.0.1:{port}" in out and "Application shutdown complete" in out and "Traceback" not in out
