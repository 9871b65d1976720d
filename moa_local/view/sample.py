"""Sample data for the viewer: a real batch output (the pipeline on the fake backend, with traces) of N
conversations, some with a failed proposer and some failed outright. Used by the browser tests, the report
benchmark and the README's screenshot, so all three look at what `moa-local run --input --trace` writes.

Answers are 40-80 words (like the tiny recipe's 64-96 tokens), so the report's size is realistic. Deterministic.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from moa_local.engines.base import Request
from moa_local.engines.fake import count_references

PARTIAL_EVERY = 50  # every 50th prompt: gemma3 fails (after its retry); the conversation still gets an answer
FAILED_EVERY = 200  # every 200th: both proposers fail, so the conversation fails (min_proposers)

_TOPICS = ("sky", "ocean", "volcano", "glacier", "desert", "forest", "comet", "battery", "bridge", "violin",
           "protein", "market", "language", "river", "planet", "engine", "garden", "vaccine", "cloud", "mountain")
_VOCAB = ("light", "scatter", "energy", "pressure", "because", "which", "layer", "surface", "heat", "wave",
          "small", "large", "the", "of", "and", "is", "when", "particles", "water", "air", "reason", "first",
          "second", "also", "more", "less", "changes", "example", "effect", "cause", "time", "over", "under")
_ASKS = ("Why is the {} the way it is?", "Explain how a {} works in two sentences.", "Name three facts about the {}.",
         "What would change without the {}?", "Describe the {} to a child.")


def sample_prompts(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Batch input lines {"id", "prompt"}; prompts carry the failure markers the sample recipe reacts to."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        prompt = f"{rng.choice(_ASKS).format(rng.choice(_TOPICS))} (question {i})"
        if i % FAILED_EVERY == FAILED_EVERY - 1:
            prompt += " #fail #down"
        elif i % PARTIAL_EVERY == PARTIAL_EVERY - 1:
            prompt += " #fail"
        lines.append({"id": f"q{i:05d}", "prompt": prompt})
    return lines


def _responder(request: Request, model_id: str) -> str:
    last_user = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
    refs = count_references(request)
    digest = hashlib.sha256(f"{model_id}|{request.messages}".encode()).digest()
    rng = random.Random(digest)
    body = " ".join(rng.choice(_VOCAB) for _ in range(40 + digest[0] % 40))
    seen = f" Drawing on {refs} references." if refs else ""
    return f"{model_id} on '{last_user[:50]}': {body}.{seen}"


def write_sample(folder: Path, n: int) -> tuple[Path, Path]:
    """Write ``folder``/input.jsonl and ``folder``/output.jsonl (n conversations with traces); return both paths.
    Output lines are the batch runner's records (``result_record``), written without its per-line fsync."""
    import json

    from moa_local.api import MoA
    from moa_local.batch import read_input
    from moa_local.batch.runner import result_record
    from moa_local.config import load_recipe
    from moa_local.config.recipe import Recipe
    from moa_local.engines.fake import fake_pool
    from moa_local.pipeline import Conversation

    base = load_recipe("fake")
    recipe = Recipe.model_validate({**base.model_dump(), "engines": {
        "gemma3-270m": {"fake": {"fail_if_contains": "#fail"}},
        "smollm2-135m-instruct": {"fake": {"fail_if_contains": "#down"}},
    }})
    folder.mkdir(parents=True, exist_ok=True)
    source, output = folder / "input.jsonl", folder / "output.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in sample_prompts(n)), encoding="utf-8")
    records = read_input(source)
    with MoA(recipe, fake_pool(recipe, responder=_responder), backend="fake") as moa, \
            output.open("w", encoding="utf-8") as fh:
        for start in range(0, len(records), 1000):
            chunk = [Conversation(id=r.id, messages=r.messages) for r in records[start : start + 1000]]
            for result in moa.pipeline.run(chunk):
                fh.write(json.dumps(result_record(result, recipe=recipe.name, trace=True), ensure_ascii=False) + "\n")
    return source, output
