"""Chunk-wise aggregation on the fake backend: the schedule (who starts when), continuation without loss or
duplication, early starts, time to first token, and the failure policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from moa_local.config.recipe import EngineOptions, FailurePolicy, FakeOptions, Recipe, Sampling
from moa_local.engines.base import Request
from moa_local.engines.fake import FakeEngine, count_references, fake_pool
from moa_local.engines.pool import EnginePool
from moa_local.errors import ConversationFailed, EngineError
from moa_local.pipeline import Conversation, MoAPipeline
from moa_local.pipeline.chunked import ChunkedAggregation
from moa_local.prompts import render_prompt

WORDS = 24
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


def long_answer(request: Request, model_id: str) -> str:
    """WORDS words that do not depend on the references, then how many references it saw: so a continued answer
    is exactly one whole answer, and its last word tells which references its last chunk read."""
    return " ".join(f"{model_id[:4]}{i}" for i in range(WORDS)) + f" refs={count_references(request)}"


class Recorder:
    """A LayerRunner around a pool that logs every stream: (time, event, request_id, payload)."""

    def __init__(self, pool: EnginePool, *, break_after: dict[str, int] | None = None) -> None:
        self.pool = pool
        self.events: list[tuple[float, str, str, object]] = []
        self.requests: list[Request] = []
        self.break_after = dict(break_after or {})  # request-id prefix -> raise after this many deltas (once)
        self._lock = threading.Lock()

    def run(self, batches):  # type: ignore[no-untyped-def]
        return self.pool.run(batches)

    def stream(self, model_id: str, request: Request) -> Iterator[str]:
        with self._lock:
            self.requests.append(request)
            self.events.append((time.perf_counter(), "start", request.request_id, None))
        limit = next((n for p, n in self.break_after.items() if request.request_id.startswith(p)), None)
        sent = 0
        for delta in self.pool.stream(model_id, request):
            if limit is not None and sent >= limit:
                self.break_after = {p: n for p, n in self.break_after.items() if not request.request_id.startswith(p)}
                raise EngineError(f"{model_id}: connection lost")
            with self._lock:
                self.events.append((time.perf_counter(), "delta", request.request_id, delta))
            sent += 1 if delta else 0
            yield delta
        with self._lock:
            self.events.append((time.perf_counter(), "end", request.request_id, None))

    def deltas_before(self, moment: float, prefix: str) -> int:
        return sum(1 for t, kind, rid, d in self.events if kind == "delta" and d and rid.startswith(prefix) and t <= moment)

    def first(self, kind: str, prefix: str) -> float:
        return min(t for t, k, rid, _ in self.events if k == kind and rid.startswith(prefix))

    def last(self, kind: str, prefix: str) -> float:
        return max(t for t, k, rid, _ in self.events if k == kind and rid.startswith(prefix))


def chunked(recipe: Recipe, *, chunk: int = 4, delay: float = 0.0, min_proposers: int = 1, retries: int = 1) -> Recipe:
    engines = {m: EngineOptions(fake=FakeOptions(token_delay_s=delay)) for m in recipe.model_ids()}
    return recipe.model_copy(update={
        "aggregation": "chunked", "chunk_tokens": chunk, "engines": engines,
        "policy": FailurePolicy(min_proposers=min_proposers, retries=retries),
    })


def run(recipe: Recipe, runner: object) -> tuple[str, ChunkedAggregation]:
    agg = ChunkedAggregation(recipe, runner, Conversation("c", QUESTION))  # type: ignore[arg-type]
    return "".join(agg.deltas()), agg


# -- prompts and the fake engine: continuing a partial answer -------------------------------------------------------


class _Tokenizer:
    def __init__(self) -> None:
        self.kwargs: dict[str, object] = {}

    def apply_chat_template(self, conversation, **kwargs):  # type: ignore[no-untyped-def]
        self.kwargs = kwargs
        return "|".join(m["content"] for m in conversation)


def test_a_trailing_assistant_turn_is_continued_not_answered() -> None:
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The sky is"}]
    tok = _Tokenizer()
    render_prompt(msgs, prompt_format="chat_template", tokenizer=tok)
    assert tok.kwargs.get("continue_final_message") is True and "add_generation_prompt" not in tok.kwargs
    render_prompt(msgs[:1], prompt_format="chat_template", tokenizer=tok)
    assert tok.kwargs.get("add_generation_prompt") is True and "continue_final_message" not in tok.kwargs
    vicuna = render_prompt(msgs, prompt_format="vicuna").text
    assert vicuna.endswith("ASSISTANT: The sky is") and "</s>" not in vicuna
    transcript = render_prompt(msgs, prompt_format="transcript").text
    assert transcript.endswith("Assistant: The sky is")
    assert render_prompt(msgs[:1], prompt_format="transcript").text.endswith("Assistant:")


def test_fake_engine_continues_a_partial_answer() -> None:
    engine = FakeEngine("m", responder=lambda r, m: "a b c d e")
    sampling = Sampling()
    whole = engine.generate([Request(QUESTION, sampling)])[0].text
    rest = engine.generate([Request([*QUESTION, {"role": "assistant", "content": "a b"}], sampling)])[0]
    assert whole == "a b c d e" and rest.text == " c d e" and rest.usage.completion_tokens == 3
    done = engine.generate([Request([*QUESTION, {"role": "assistant", "content": "a b c d e"}], sampling)])[0]
    assert done.text == "" and "".join(engine.stream(Request([*QUESTION, {"role": "assistant", "content": "a"}], sampling))) == " b c d e"


# -- the schedule -----------------------------------------------------------------------------------------------------


def test_layers_run_as_a_wavefront_of_chunks(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=4, delay=0.002)
    rec = Recorder(fake_pool(recipe, responder=long_answer))
    output, agg = run(recipe, rec)
    # Each layer's first chunk starts only once every node of the layer before has written a chunk...
    for later, earlier in (("c/L2/", "c/L1/"), ("c/agg/", "c/L2/")):
        start = rec.first("start", later)
        for role in ("smollm2", "gemma3"):
            assert rec.deltas_before(start, f"{earlier}{role}/") >= 4, f"{later} started before {earlier}{role} had a chunk"
    # ...and the aggregator starts writing before the last layer's proposers have finished.
    assert rec.first("delta", "c/agg/") < rec.last("end", "c/L2/")
    assert rec.first("delta", "c/agg/") < rec.last("end", "c/L1/")
    # It continued on growing references: several requests, each continuing its own text so far.
    agg_requests = [r for r in rec.requests if r.request_id.startswith("c/agg/")]
    assert len(agg_requests) >= 3
    assert agg_requests[0].messages[-1]["role"] == "user"
    for r in agg_requests[1:]:
        assert r.messages[-1]["role"] == "assistant" and output.startswith(r.messages[-1]["content"])
    refs_lengths = [len(r.messages[0]["content"]) for r in agg_requests]
    assert refs_lengths == sorted(refs_lengths) and refs_lengths[-1] > refs_lengths[0], "references grow"


def test_the_answer_is_whole_once_continued_and_its_last_chunk_saw_every_reference(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=3, delay=0.001)
    output, agg = run(recipe, Recorder(fake_pool(recipe, responder=long_answer)))
    expected = " ".join(f"smol{i}" for i in range(WORDS)) + " refs=2"
    assert output == expected, "no word lost or repeated across restarts"
    result = agg.result()
    assert result.ok and result.output == expected
    assert [len(layer.responses) for layer in result.layers] == [2, 2]
    assert all(r.ok and r.text and r.text.endswith("refs=2") for r in result.layers[1].responses)
    assert all(r.ok and r.text and r.text.endswith("refs=0") for r in result.layers[0].responses)
    assert result.aggregator is not None and result.aggregator.usage.completion_tokens == WORDS + 1


def test_time_to_first_token_is_well_under_half_of_full_aggregation(fake_recipe: Recipe) -> None:
    def ttft(recipe: Recipe) -> float:
        pipeline = MoAPipeline(recipe, fake_pool(recipe, responder=long_answer))
        start = time.perf_counter()
        deltas = iter(pipeline.stream(Conversation("t", QUESTION)))
        next(deltas)
        first = time.perf_counter() - start
        for _ in deltas:
            pass
        return first

    fast = chunked(fake_recipe, chunk=3, delay=0.004)
    full = fast.model_copy(update={"aggregation": "full"})
    assert ttft(fast) <= 0.5 * ttft(full)


def test_a_proposer_that_ends_early_does_not_hold_the_aggregator(fake_recipe: Recipe) -> None:
    def short_gemma(request: Request, model_id: str) -> str:
        return "short" if model_id.startswith("gemma") else long_answer(request, model_id)

    recipe = chunked(fake_recipe, chunk=6, delay=0.002)
    output, agg = run(recipe, Recorder(fake_pool(recipe, responder=short_gemma)))
    assert output.endswith("refs=2")
    assert [r.text for r in agg.result().layers[0].responses][1] == "short"


def test_the_chunked_hook_serves_moa_stream_and_keeps_full_mode(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=2)
    pool = fake_pool(recipe, responder=long_answer)
    run = MoAPipeline(recipe, pool).stream(Conversation("h", QUESTION))
    assert "".join(run).endswith("refs=2") and len(run.result().layers) == 2
    engines: dict[str, FakeEngine] = pool.engines  # type: ignore[assignment]
    assert len(engines["gemma3-270m"].streams) >= 2 and not engines["gemma3-270m"].requests, "chunked streams every layer"
    full = fake_pool(fake_recipe, responder=long_answer)
    run = MoAPipeline(fake_recipe, full).stream(Conversation("h", QUESTION))
    assert "".join(run).endswith("refs=2") and len(run.result().layers) == 2
    # full aggregation: the layers are plain requests, only the aggregator streams
    assert len(full.engines["gemma3-270m"].requests) == 2 and not full.engines["gemma3-270m"].streams  # type: ignore[attr-defined]
    assert len(full.engines["smollm2-135m-instruct"].streams) == 1  # type: ignore[attr-defined]


# -- failures ---------------------------------------------------------------------------------------------------------


def test_a_failing_proposer_is_recorded_and_the_answer_still_completes(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=4, retries=2)
    pool = fake_pool(recipe, responder=long_answer)
    pool.engines["gemma3-270m"].options = FakeOptions(fail_if_contains="sky")  # type: ignore[attr-defined]
    output, agg = run(recipe, Recorder(pool))
    assert output.endswith("refs=1")
    result = agg.result()
    assert result.ok
    for layer in result.layers:
        gemma = layer.responses[1]
        assert not gemma.ok and gemma.text is None and "fake failure" in (gemma.error or "") and gemma.attempts == 3


def test_too_few_proposers_fail_the_conversation_before_any_text(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=4, retries=0)
    pool = fake_pool(recipe, responder=long_answer)
    for engine in pool.engines.values():
        engine.options = FakeOptions(fail_if_contains="sky")  # type: ignore[attr-defined]
    agg = ChunkedAggregation(recipe, pool, Conversation("f", QUESTION))
    seen: list[str] = []
    with pytest.raises(ConversationFailed, match="only 0 of 2 proposers answered"):
        for delta in agg.deltas():
            seen.append(delta)
    assert seen == []
    assert agg.state.error and not agg.result().ok


def test_a_stream_that_breaks_is_retried_from_the_text_so_far(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=4, retries=1)
    rec = Recorder(fake_pool(recipe, responder=long_answer), break_after={"c/agg/": 2, "c/L2/gemma3/": 1})
    output, agg = run(recipe, rec)
    assert output == " ".join(f"smol{i}" for i in range(WORDS)) + " refs=2", "the retry continued, no duplicate"
    result = agg.result()
    assert result.aggregator is not None and result.aggregator.attempts == 2
    assert result.layers[1].responses[1].attempts == 2 and result.layers[1].responses[1].ok


def test_a_started_answer_ends_even_when_references_drop_below_min_proposers(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=4, min_proposers=2, retries=0, delay=0.002)
    rec = Recorder(fake_pool(recipe, responder=long_answer), break_after={"c/L2/gemma3/c3": 0})
    output, agg = run(recipe, rec)
    result = agg.result()
    assert rec.first("start", "c/agg/") < rec.first("start", "c/L2/gemma3/c3"), "the aggregator had started"
    assert not result.layers[1].responses[1].ok, "the failure is recorded"
    assert output == " ".join(f"smol{i}" for i in range(WORDS)) + " refs=2", "it ended, on the references it had"
    assert result.ok


def test_closing_the_stream_stops_every_node(fake_recipe: Recipe) -> None:
    recipe = chunked(fake_recipe, chunk=2, delay=0.003)
    rec = Recorder(fake_pool(recipe, responder=long_answer))
    agg = ChunkedAggregation(recipe, rec, Conversation("x", QUESTION))
    deltas = agg.deltas()
    next(deltas)
    deltas.close()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in agg._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in agg._threads)
    issued = len(rec.requests)
    time.sleep(0.05)
    assert len(rec.requests) == issued, "no chunk starts after the stream was closed"
