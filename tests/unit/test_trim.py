"""Run-time reference trimming: a too_long failure carries its numbers, and the pipeline retries a request whose
references made it too long with the longest references cut first, recorded in the trace."""

from __future__ import annotations

from moa_local.config.recipe import FakeOptions, Sampling
from moa_local.engines.base import Generation, Overflow, Request
from moa_local.engines.fake import FakeEngine


def _ask(engine: FakeEngine, request: Request) -> Generation:
    (gen,) = engine.generate([request])
    return gen


def test_a_too_long_failure_carries_its_numbers_and_keeps_its_message() -> None:
    engine = FakeEngine("m", options=FakeOptions(max_model_len=10))
    request = Request(messages=[{"role": "user", "content": "one two three four five six"}],
                      sampling=Sampling(max_tokens=5))
    gen = _ask(engine, request)
    assert gen.kind == "too_long" and gen.overflow == Overflow(prompt_tokens=6, max_tokens=5, max_model_len=10)
    assert gen.overflow.excess == 1
    assert gen.error == "prompt of 6 tokens + max_tokens 5 exceeds max_model_len 10 of 'm'"
    assert gen.usage.prompt_tokens == 6
    fits = _ask(engine, Request(messages=[{"role": "user", "content": "one two three four five"}],
                                sampling=Sampling(max_tokens=5)))
    assert fits.ok and fits.overflow is None


def test_the_vllm_worker_reply_keeps_the_numbers() -> None:
    from moa_local.engines.vllm import _generation

    gen = _generation({"text": None, "error": "prompt of 9 tokens ...", "prompt_tokens": 9, "completion_tokens": 0,
                       "seconds": 0.0, "finish_reason": None, "kind": "too_long",
                       "overflow": {"prompt_tokens": 9, "max_tokens": 4, "max_model_len": 8}})
    assert gen.kind == "too_long" and gen.overflow == Overflow(9, 4, 8) and gen.overflow.excess == 5
    plain = _generation({"text": "hi", "error": None, "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.0,
                         "finish_reason": "stop", "kind": None})
    assert plain.ok and plain.overflow is None
