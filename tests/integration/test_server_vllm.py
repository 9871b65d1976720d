"""End to end on the real tiny recipe: the OpenAI-compatible server over the vLLM backend, called with the official
`openai` client on loopback. One engine start-up per model for the whole module (full and chunked apps share it).

MOA_LOCAL_SERVER_TEST_BACKEND=transformers runs the same tests on the transformers backend."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from moa_local.api import MoA, load
from moa_local.config import load_model_config, load_recipe
from moa_local.models import is_prepared
from moa_local.server.background import BackgroundServer
from moa_local.server.openai import create_app
from moa_local.server.settings import ServerSettings

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

BACKEND = os.environ.get("MOA_LOCAL_SERVER_TEST_BACKEND", "vllm")
Q = [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}]


def _require() -> None:
    if BACKEND == "vllm":
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not importable")
        if importlib.util.find_spec("moa_local.engines.vllm") is None:
            pytest.skip("the vLLM backend (moa_local/engines/vllm.py) is not there")
    for model_id in load_recipe("tiny").model_ids():
        if not is_prepared(load_model_config(model_id)):
            pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, Any]]:
    _require()
    with load("tiny", backend=BACKEND, max_tokens=32) as moa:
        chunked = MoA(moa.recipe.model_copy(update={"aggregation": "chunked", "chunk_tokens": 8}), moa.runner,
                      backend=moa.backend)
        full_app = create_app(moa, settings=ServerSettings())
        chunked_app = create_app(chunked, settings=ServerSettings())
        with BackgroundServer(full_app) as url, BackgroundServer(chunked_app) as chunked_url:
            yield {
                "client": OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600),
                "chunked": OpenAI(base_url=f"{chunked_url}/v1", api_key="unused", max_retries=0, timeout=600),
                "app": full_app,
            }


def test_moa_answer_with_trace(served: dict[str, Any]) -> None:
    r = served["client"].chat.completions.create(model="tiny", messages=Q, extra_body={"moa_trace": True})
    assert (r.choices[0].message.content or "").strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    trace = (r.model_extra or {})["moa_trace"]
    assert [len(layer["responses"]) for layer in trace["layers"]] == [2, 2]
    assert all(resp["error"] is None and resp["text"] for layer in trace["layers"] for resp in layer["responses"])
    assert r.usage.prompt_tokens > 50 and r.usage.completion_tokens > r.usage.completion_tokens_details.reasoning_tokens > 0


def test_streamed_answer_arrives_in_pieces(served: dict[str, Any]) -> None:
    chunks = list(served["client"].chat.completions.create(model="tiny", messages=Q, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_one_model_alone_greedy(served: dict[str, Any]) -> None:
    r = served["client"].chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16,
    )
    assert "Paris" in (r.choices[0].message.content or "")


def test_concurrent_requests_all_come_back(served: dict[str, Any]) -> None:
    barrier = threading.Barrier(4)
    answers: list[str] = ["" for _ in range(4)]

    def ask(i: int) -> None:
        barrier.wait()
        r = served["client"].chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Name {i + 2} colours."}])
        answers[i] = r.choices[0].message.content or ""

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert all(a.strip() for a in answers)


def test_chunked_aggregation_streams_a_finished_answer(served: dict[str, Any]) -> None:
    chunks = list(served["chunked"].chat.completions.create(model="tiny", messages=Q, stream=True,
                                                           extra_body={"moa_trace": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    trace = (final[0].model_extra or {})["moa_trace"]
    assert trace["output"] == text and [len(layer["responses"]) for layer in trace["layers"]] == [2, 2]


def test_a_prompt_over_the_engines_context_is_400(served: dict[str, Any]) -> None:
    import openai

    long = " ".join(["supercalifragilisticexpialidocious"] * 1200)  # few words, many tokens: past the door check
    with pytest.raises(openai.BadRequestError) as err:
        served["client"].chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}])
    assert err.value.code == "context_length_exceeded"
