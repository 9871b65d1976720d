"""The eval loop: every system answers every item of a suite on ONE runner (engines started once per run), each
answer is scored (by rule, or by the judge model on the same runner) and written as one results line at once.

Items go in chunks; within a chunk every system runs (proposers, the aggregator, MoA, then Self-MoA), so a run
stopped at any point leaves all systems on (nearly) the same items and a rerun skips the (system, item) pairs
already written. Systems that use disjoint engines run at the same time (the two proposers alone, say): each
engine has its own cores, so a system's wall time stays its own while the machine stays busy. Self-MoA uses the
proposer with the best score so far in this run (the first proposer when no score is known yet); once chosen it is
kept, also across resumes. With ``proposers_from_moa`` (single-turn suites) the proposers-alone answers are MoA's own
layer-1 answers, read from its trace: the same request, one sample, no extra generation, and a paired comparison. Multi-turn items answer turn by turn, each turn
seeing the system's own earlier answers. Never prints: progress goes through a callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from moa_local.config.recipe import Recipe, Sampling
from moa_local.engines.base import Request, Usage
from moa_local.errors import EngineDiedError, InputError
from moa_local.eval.alpacaeval import GPT4_BASELINE
from moa_local.eval.base import Item, Score, Suite
from moa_local.eval.results import check_compatible, load_records, open_writer, record_id, write_run_info
from moa_local.eval.systems import Answer, System, build_systems, generate, run_system, self_moa_system
from moa_local.pipeline import Conversation, LayerRunner

# (system name, items done, items total) after each chunk of each system.
EvalProgress = Callable[[str, int, int], None]


def run_eval(
    suite: Suite,
    recipe: Recipe,
    runner: LayerRunner,
    *,
    output: Path,
    baselines: Sequence[str],
    limit: int | None = None,
    judge: str | None = None,
    judge_max_tokens: int | None = None,
    reference: str | None = None,
    chunk_size: int = 32,
    proposers_from_moa: bool = False,
    run_info: dict[str, Any] | None = None,
    progress: EvalProgress | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) ``suite`` for the recipe and its baselines; returns every record in ``output``."""
    if suite.needs_judge and not judge:
        raise InputError(f"suite '{suite.name}' is scored by a judge model: pass --judge MODEL_ID "
                         f"(e.g. --judge {recipe.aggregator.model})")
    records = load_records(output)
    check_compatible(records, suite=suite.name, recipe=recipe.name, folder=output)
    done = {(r["system"], r["item"]) for r in records}
    items = suite.items(limit)
    if proposers_from_moa and any(len(it.turns) > 1 for it in items):
        raise InputError(f"--proposers-from-moa needs a single-turn suite: in '{suite.name}' MoA's layer 1 of turn 2 "
                         "sees MoA's own turn-1 answer, not the proposer's")
    systems = build_systems(recipe, baselines)
    derived = [s for s in systems if s.family == "proposer"] if proposers_from_moa else []
    if derived and reference in {s.name for s in derived}:
        raise InputError("--proposers-from-moa cannot take a proposer as the --reference (it is answered after MoA)")
    reference = reference or (GPT4_BASELINE if suite.needs_judge else None)
    if reference not in (None, GPT4_BASELINE):
        names = [s.name for s in systems]
        if reference not in names:
            raise InputError(f"--reference '{reference}' is not a system of this run; expected {GPT4_BASELINE} "
                             f"or one of {', '.join(names)}")
        systems.sort(key=lambda s: s.name != reference)  # the reference answers first in every chunk
    want_self_moa = "self-moa" in baselines
    write_run_info(output, {
        **(run_info or {}), "suite": suite.name, "metric": suite.metric, "recipe": recipe.name,
        "items": len(items), "limit": limit, "baselines": list(baselines), "judge": judge, "reference": reference,
        "chunk_size": chunk_size, "proposers_from_moa": bool(derived), "recipe_config": recipe.model_dump(mode="json"),
    })
    judge_sampling = Sampling(temperature=0.0, max_tokens=max(1, judge_max_tokens or suite.judge_max_tokens))
    if progress:  # Self-MoA's bar is "self-moa" until its proposer is chosen
        for s in systems:
            progress(s.name, sum(1 for it in items if (s.name, it.id) in done), len(items))
        if want_self_moa:
            progress("self-moa", sum(1 for (name, _) in done if name.startswith("self-moa:")), len(items))
    scheduled = [s for s in systems if s not in derived]
    with open_writer(output) as writer:

        def keep(system: System, rows: list[dict[str, Any]], **extra: Any) -> None:
            """Write a system's scored rows now, then move its progress bar."""
            for row in rows:
                row.update(suite=suite.name, recipe=recipe.name, **extra)
                writer.write(row)
                records.append(row)
                done.add((row["system"], row["item"]))
            if progress:
                label = "self-moa" if system.family == "self-moa" else system.name
                progress(label, sum(1 for it in items if (system.name, it.id) in done), len(items))

        for start in range(0, len(items), chunk_size):
            chunk = items[start : start + chunk_size]
            pending: list[System | None] = [*scheduled, None] if want_self_moa else list(scheduled)
            while pending:
                wave = _next_wave(pending, chunk, done, recipe=recipe, records=records, reference=reference,
                                  judge=judge if suite.needs_judge else None,
                                  feeders={"proposer", "moa"} if derived else {"proposer"})
                with ThreadPoolExecutor(max_workers=max(1, len(wave)), thread_name_prefix="moa-eval") as pool:
                    futures = [
                        pool.submit(_run_one, suite, system, todo, runner, retries=recipe.policy.retries, judge=judge,
                                    judge_sampling=judge_sampling, is_reference=system.name == reference,
                                    references={it.id: _reference_text(it, reference, records) for it in todo})
                        for system, todo in wave
                    ]
                    outputs = [f.result() for f in futures]
                _check_engines(runner, output)  # a dead engine stops the run; its failures are not results
                for (system, _), new in zip(wave, outputs, strict=True):
                    keep(system, new)
                for system in derived:  # after MoA's wave (or on resume): its layer-1 answers, scored
                    moa_rows = {r["item"]: r for r in records if r["system"] == "moa"}
                    todo = [it for it in chunk if (system.name, it.id) not in done and it.id in moa_rows]
                    if not todo:
                        continue
                    answered = _from_moa_layer1(system, todo, moa_rows)
                    keep(system, _score(suite, system, todo, answered, runner, judge=judge,
                                        judge_sampling=judge_sampling, is_reference=False,
                                        references={it.id: _reference_text(it, reference, records) for it in todo}),
                         derived_from="moa layer 1")
    return records


def _from_moa_layer1(system: System, items: Sequence[Item], moa_rows: dict[str, dict[str, Any]]) -> _Answered:
    """A proposer's answers taken from MoA's first layer (its trace): text or error, tokens; the seconds are the
    slowest of the role's layer-1 requests in the batch (they ran concurrently), so per item they amortize like a
    batch of its own."""
    assert system.role is not None
    out = _Answered(items)
    slowest = 0.0
    for i, it in enumerate(items):
        trace = (moa_rows[it.id].get("trace") or [None])[0]
        layers = (trace or {}).get("layers") or []
        resp = next((r for r in (layers[0]["responses"] if layers else []) if r["role"] == system.role.name), None)
        if resp is None:
            why = (trace or {}).get("error") or (moa_rows[it.id].get("errors") or [None])[0] or "no layer-1 answer"
            out.errors[i][0] = f"MoA did not reach layer 1's {system.role.name} answer: {why}"
            continue
        out.texts[i][0] = resp["text"] if resp["error"] is None else None
        out.errors[i][0] = resp["error"]
        out.usage[i] = Usage(**resp["usage"])
        slowest = max(slowest, float(resp.get("seconds") or 0.0))
    out.seconds = slowest
    return out


def _check_engines(runner: LayerRunner, output: Path) -> None:
    health = getattr(runner, "health", None)
    if health is None:
        return
    dead = [model for model, alive in health().items() if not alive]
    if dead:
        raise EngineDiedError(
            f"engine(s) {', '.join(dead)} died during the eval (see $MOA_LOCAL_HOME/logs); the answers of the "
            f"systems running then were not written. Fix the cause and rerun with --output {output} to resume."
        )


def _next_wave(pending: list[System | None], chunk: Sequence[Item], done: set[tuple[str, str]], *, recipe: Recipe,
               records: list[dict[str, Any]], reference: str | None, judge: str | None,
               feeders: frozenset[str] | set[str] = frozenset({"proposer"})) -> list[tuple[System, list[Item]]]:
    """Take from ``pending`` (in order) the systems that can run together: no two share an engine (each engine has
    its own cores, so each system's wall time is still its own). Self-MoA (None) waits until the systems that give
    the proposers their scores (``feeders``: the proposers, or MoA when their answers come from its layer 1) are
    done; with a system as the reference, the others wait for it. Systems with nothing to do are dropped."""
    wave: list[tuple[System, list[Item]]] = []
    used: set[str] = set()
    for planned in list(pending):
        waiting_for_proposers = any(p is not None and p.family in feeders for p in pending if p is not planned) \
            or any(s.family in feeders for s, _ in wave)
        if planned is None and waiting_for_proposers:
            continue
        if reference is not None and planned is not None and planned.name != reference and (
                any(p is not None and p.name == reference for p in pending) or any(s.name == reference for s, _ in wave)):
            continue
        # Self-MoA is resolved when its turn comes: after this chunk's proposers are scored.
        system = planned if planned is not None else _self_moa(recipe, records)
        todo = [it for it in chunk if (system.name, it.id) not in done]
        if not todo:
            pending.remove(planned)
            continue
        models = set(system.recipe.model_ids()) if system.recipe is not None else {system.model}
        if judge:
            models.add(judge)
        if models & used:
            continue
        wave.append((system, todo))
        used |= models
        pending.remove(planned)
    if not wave and pending:
        raise RuntimeError(f"internal: no runnable system among {pending}")
    return wave


def _run_one(suite: Suite, system: System, todo: list[Item], runner: LayerRunner, *, retries: int, judge: str | None,
             judge_sampling: Sampling, references: dict[str, str | None], is_reference: bool) -> list[dict[str, Any]]:
    answered = _answer(system, runner, suite, todo, retries=retries)
    return _score(suite, system, todo, answered, runner, judge=judge, judge_sampling=judge_sampling,
                  references=references, is_reference=is_reference)


def _self_moa(recipe: Recipe, records: list[dict[str, Any]]) -> System:
    """Self-MoA of the proposer already chosen in this output folder, else of the best-scoring proposer so far."""
    roles = recipe.proposer_roles()
    chosen = next((r["system"].split(":", 1)[1] for r in records if r.get("family") == "self-moa"), None)
    if chosen is None:
        def mean(role_name: str) -> float:
            vals = [r["score"] for r in records if r["system"] == f"proposer:{role_name}" and r["score"] is not None]
            return sum(vals) / len(vals) if vals else float("-inf")

        best = max(roles, key=lambda r: mean(r.name or r.model))  # max keeps the first on ties
        chosen = best.name or best.model
    role = next((r for r in roles if r.name == chosen), None)
    if role is None:
        raise InputError(f"results hold Self-MoA of '{chosen}', which is not a proposer of recipe '{recipe.name}'")
    return self_moa_system(recipe, role)


def _reference_text(item: Item, reference: str | None, records: list[dict[str, Any]]) -> str | None:
    if reference is None:
        return None
    if reference == GPT4_BASELINE:
        text = item.data.get(GPT4_BASELINE)
        return str(text) if text is not None else None
    row = next((r for r in records if r["system"] == reference and r["item"] == item.id), None)
    return row["answers"][0] if row and row["answers"] else None


class _Answered:
    """Per item: the answer text (or None) and error of each turn, tokens, traces; wall seconds of the batch."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.texts: list[list[str | None]] = [[None] * len(it.turns) for it in items]
        self.errors: list[list[str | None]] = [[None] * len(it.turns) for it in items]
        self.usage: list[Usage] = [Usage() for _ in items]
        self.traces: list[list[dict[str, Any] | None]] = [[None] * len(it.turns) for it in items]
        self.seconds = 0.0


def _answer(system: System, runner: LayerRunner, suite: Suite, items: Sequence[Item], *, retries: int) -> _Answered:
    out = _Answered(items)
    for turn in range(max(len(it.turns) for it in items)):
        idx = [i for i, it in enumerate(items) if turn < len(it.turns)]
        runnable = [i for i in idx if turn == 0 or out.texts[i][turn - 1] is not None]
        for i in set(idx) - set(runnable):
            out.errors[i][turn] = f"turn {turn} failed, so turn {turn + 1} was not asked"
        if not runnable:
            continue
        convs = [Conversation(id=f"{items[i].id}#t{turn + 1}",
                              messages=suite.messages(items[i], turn, [t or "" for t in out.texts[i][:turn]]))
                 for i in runnable]
        answers, seconds = run_system(system, runner, convs, retries=retries)
        out.seconds += seconds
        for i, ans in zip(runnable, answers, strict=True):
            _store(out, i, turn, ans)
    return out


def _store(out: _Answered, i: int, turn: int, ans: Answer) -> None:
    out.texts[i][turn] = ans.text if ans.error is None else None
    out.errors[i][turn] = ans.error
    out.usage[i] = out.usage[i] + ans.usage
    out.traces[i][turn] = ans.trace


def _score(suite: Suite, system: System, items: Sequence[Item], answered: _Answered, runner: LayerRunner, *,
           judge: str | None, judge_sampling: Sampling, references: dict[str, str | None],
           is_reference: bool) -> list[dict[str, Any]]:
    n = len(items)
    judgments: list[list[str | None]] = [[] for _ in items]
    judge_errors: list[list[str | None]] = [[] for _ in items]
    judge_seconds = 0.0
    if suite.needs_judge and judge and not is_reference:
        prompts = [suite.judge_prompts(it, answered.texts[i], reference=references.get(it.id))
                   for i, it in enumerate(items)]
        flat = [(i, msgs) for i, group in enumerate(prompts) for msgs in group]
        start = time.perf_counter()
        gens = generate(runner, judge, [Request(messages=m, sampling=judge_sampling, request_id=f"judge/{items[i].id}")
                                        for i, m in flat])
        judge_seconds = time.perf_counter() - start
        for (i, _), gen in zip(flat, gens, strict=True):
            judgments[i].append(gen.text if gen.ok else None)
            judge_errors[i].append(gen.error)
    scores: list[Score]
    if is_reference:
        scores = [Score(None, {"is_reference": True}) for _ in items]
    elif not suite.needs_judge and hasattr(suite, "score_many"):
        scores = suite.score_many([(it, answered.texts[i]) for i, it in enumerate(items)])
    else:
        scores = [suite.score(it, answered.texts[i], judgments[i]) for i, it in enumerate(items)]
    rows = []
    for i, item in enumerate(items):
        rows.append({
            "id": record_id(system.name, item.id), "system": system.name, "family": system.family,
            "model": system.model, "item": item.id, "score": scores[i].value, "details": scores[i].details,
            "answers": answered.texts[i], "errors": answered.errors[i],
            "judgments": judgments[i], "judge_errors": judge_errors[i],
            "usage": answered.usage[i].to_dict(), "seconds": round(answered.seconds / n, 4),
            "judge_seconds": round(judge_seconds / n, 4), "trace": answered.traces[i],
        })
    return rows
