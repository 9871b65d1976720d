"""CPU calibration: each engine of a recipe measured once on this machine, stored, and turned into engine speeds.

``moa-local plan --recipe R --calibrate`` starts the recipe's engines exactly as `run` would (the plan's cores, KV
cache and options), then times short fixed batches on every engine of a phase at once (as they run in a job): for each
shape (a batch of prompts of a length) the batch with ``max_tokens`` 1 (its prefill; PREFILL_SHAPES), and the batch
generating NEW_TOKENS tokens (``ignore_eos``; DECODE_SHAPES) in every sampling mode the recipe's roles on that engine use
(greedy, sampling, top-p: top-p sorts the vocabulary each step, which on a CPU costs as much as the model). A
decode point's step time is read from the streamed tokens while the whole batch decodes (else its time less its
shape's prefill time). The points are fitted to

    decode step = a + b_mode x batch + c x context tokens held      prefill = alpha x tokens + beta x tokens^2

and stored in ``$MOA_LOCAL_HOME/calibration/<machine>.json`` keyed by machine (CPU model and core count), model,
dtype and the engine's cores. The file keeps every measured point next to the fit. Reading it is pure; measuring
imports vllm through the engines (lazily) and takes a few minutes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moa_local.config.recipe import Recipe, Sampling
from moa_local.config.registry import moa_home
from moa_local.errors import InputError
from moa_local.placement.plan import EnginePlacement, Plan
from moa_local.placement.throughput import CalibratedSpeed, Mode, sampling_mode

FORMAT = 1
"""Version of the stored file."""

PREFILL_SHAPES = ((1, 48), (8, 48), (32, 48), (1, 320), (8, 320))
"""(batch, approximate prompt tokens) prefilled: layer-1 questions and later layers' longer prompts (references)."""

DECODE_SHAPES = ((1, 48), (8, 48), (32, 48), (1, 320), (8, 320), (32, 320))
"""(batch, approximate prompt tokens) decoded: both prompt lengths up to the batch a job's busiest engine runs."""

NEW_TOKENS = 32
"""Tokens generated per decode measurement (ignore_eos)."""

_FILLER = ["the", "model", "reads", "a", "long", "prompt", "about", "rivers", "mountains", "cities", "and", "old",
           "books", "then", "answers", "a", "question", "with", "care", "while", "the", "engine", "batches", "many",
           "such", "requests", "on", "a", "small", "machine"]


# -- the stored form --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One timed batch."""

    kind: str
    """prefill (max_tokens 1) or decode."""
    mode: str
    batch: int
    prompt_tokens: float
    """Mean prompt tokens per request, as the engine counted them."""
    new_tokens: float
    """Mean generated tokens per request."""
    longest: int
    """Most tokens one request generated (the decode steps the batch ran, plus its first)."""
    seconds: float
    step_seconds: float | None = None
    """Decode points: a decode step's seconds read from the streamed tokens (step_from_stamps), when measurable."""


@dataclass(frozen=True)
class EngineCalibration:
    """One engine's fitted speed on this machine, and the points it was fitted to."""

    model: str
    dtype: str
    cores: int
    binding: str
    step_base_s: float
    step_per_seq_s: dict[str, float]
    step_per_context_s: float
    prefill_per_token_s: float
    prefill_per_token_sq_s: float
    fit_error: float
    """Largest relative error of the fit over the decode points."""
    points: list[Point] = field(default_factory=list)

    def speed(self, source: str) -> CalibratedSpeed:
        return CalibratedSpeed(step_base_s=self.step_base_s, step_per_seq_s=dict(self.step_per_seq_s),
                               step_per_context_s=self.step_per_context_s,
                               prefill_per_token_s=self.prefill_per_token_s,
                               prefill_per_token_sq_s=self.prefill_per_token_sq_s, source=source)


@dataclass
class Calibration:
    """Everything calibrated on one machine."""

    machine: dict[str, Any]
    engines: list[EngineCalibration] = field(default_factory=list)

    def find(self, model: str, dtype: str, cores: int) -> EngineCalibration | None:
        for e in self.engines:
            if (e.model, e.dtype, e.cores) == (model, dtype, cores):
                return e
        return None

    def speed(self, engine: EnginePlacement) -> CalibratedSpeed | None:
        """The calibrated speed of a placed CPU engine (same model, dtype and number of cores), or None."""
        found = self.find(engine.id, engine.dtype, binding_cores(engine.cpu_threads))
        if found is None:
            return None
        when = str(self.machine.get("measured", ""))[:10]
        return found.speed(f"calibrated {when} on {found.cores} core{'s' if found.cores != 1 else ''}")

    def merge(self, other: Calibration) -> Calibration:
        """``other``'s engines replace ours with the same key."""
        keys = {(e.model, e.dtype, e.cores) for e in other.engines}
        kept = [e for e in self.engines if (e.model, e.dtype, e.cores) not in keys]
        return Calibration(machine=other.machine, engines=kept + list(other.engines))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "machine": self.machine, "engines": [asdict(e) for e in self.engines]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("format") != FORMAT:
            raise InputError(f"calibration format {data.get('format')} is not {FORMAT}; run `moa-local plan --calibrate` again")
        engines = [EngineCalibration(**{**e, "points": [Point(**p) for p in e.get("points", [])]})
                   for e in data.get("engines", [])]
        return cls(machine=dict(data.get("machine", {})), engines=engines)


def binding_cores(binding: str | None) -> int:
    """Cores a vLLM-CPU binding names ('0' -> 1, '0-3' -> 4, '0,2' -> 2); all usable cores for None/auto."""
    if not binding or binding in ("auto", "nobind"):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = 0
    for part in binding.split("|")[0].split(","):
        lo, _, hi = part.partition("-")
        count += int(hi) - int(lo) + 1 if hi else 1
    return count


def machine_key() -> tuple[str, dict[str, Any]]:
    """(file stem, description) of this machine: CPU model and logical cores."""
    model = "unknown-cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 1
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:60]
    return f"{slug}-{cores}cpu", {"cpu": model, "logical_cpus": cores}


def calibration_path() -> Path:
    key, _ = machine_key()
    return moa_home() / "calibration" / f"{key}.json"


def load_calibration(path: Path | None = None) -> Calibration | None:
    """This machine's calibration, or None when it was never measured."""
    path = path or calibration_path()
    if not path.is_file():
        return None
    try:
        return Calibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path} is not a calibration file ({exc}); delete it and run `moa-local plan --calibrate`") from None


def save_calibration(calibration: Calibration, path: Path | None = None) -> Path:
    path = path or calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# -- fitting (pure) ---------------------------------------------------------------------------------------------


def _solve(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares with non-negative coefficients: normal equations, dropping negative terms until none is left."""
    n = len(rows[0])
    active = list(range(n))
    while True:
        k = len(active)
        a = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
        b = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in active]
        for i in range(k):  # Gaussian elimination with partial pivoting (k <= 5)
            pivot = max(range(i, k), key=lambda p: abs(a[p][i]))
            a[i], a[pivot], b[i], b[pivot] = a[pivot], a[i], b[pivot], b[i]
            if abs(a[i][i]) < 1e-30:
                a[i][i] = 1e-30
            for p in range(i + 1, k):
                f = a[p][i] / a[i][i]
                for q in range(i, k):
                    a[p][q] -= f * a[i][q]
                b[p] -= f * b[i]
        x = [0.0] * k
        for i in reversed(range(k)):
            x[i] = (b[i] - sum(a[i][q] * x[q] for q in range(i + 1, k))) / a[i][i]
        negative = [active[i] for i in range(k) if x[i] < 0]
        if not negative:
            out = [0.0] * n
            for i, col in enumerate(active):
                out[col] = x[i]
            return out
        active = [c for c in active if c not in negative]
        if not active:
            return [0.0] * n


def fit(points: Sequence[Point]) -> dict[str, Any]:
    """The speed coefficients of one engine from its points (see the module doc); and the fit's worst error."""
    pre = [p for p in points if p.kind == "prefill"]
    if not pre:
        raise ValueError("no prefill points")
    overhead, alpha, beta = _solve([[1.0, p.batch * p.prompt_tokens, p.batch * p.prompt_tokens ** 2] for p in pre],
                                   [p.seconds for p in pre])

    def prefill(p: Point) -> float:
        """The prefill of a decode point's own shape: measured when a prefill point has its batch and about its
        prompt length, else the fit (with its per-call overhead). Not the nearest measured shape: 32 prompts of
        ~300 tokens prefill in about four times the time of 32 of ~50."""
        same = [q for q in pre if q.batch == p.batch and abs(q.prompt_tokens - p.prompt_tokens) <= 0.25 * p.prompt_tokens]
        if same:
            return min(same, key=lambda q: abs(q.prompt_tokens - p.prompt_tokens)).seconds
        return overhead + alpha * p.batch * p.prompt_tokens + beta * p.batch * p.prompt_tokens ** 2

    decode = [p for p in points if p.kind == "decode" and p.longest > 1]
    modes = sorted({p.mode for p in decode})
    rows, ys = [], []
    for p in decode:
        steps = p.longest - 1
        if p.step_seconds is not None:  # read from the token stream while the whole batch decoded
            batch, y = float(p.batch), p.step_seconds
        else:  # the run's time less its shape's prefill; sequences that stop early shrink the batch
            batch, y = p.batch * (p.new_tokens - 1) / steps, max(0.0, p.seconds - prefill(p)) / steps
        context = batch * (p.prompt_tokens + steps / 2)
        rows.append([1.0, *[batch if m == p.mode else 0.0 for m in modes], context])
        ys.append(y)
    coef = _solve(rows, ys) if rows else [0.0] * (len(modes) + 2)
    worst = max((abs(sum(c * x for c, x in zip(coef, r, strict=True)) - y) / y
                 for r, y in zip(rows, ys, strict=True) if y > 0), default=0.0)
    return {"step_base_s": coef[0], "step_per_seq_s": dict(zip(modes, coef[1:-1], strict=True)),
            "step_per_context_s": coef[-1], "prefill_per_token_s": alpha, "prefill_per_token_sq_s": beta,
            "fit_error": round(worst, 4)}


# -- measuring (starts engines) ---------------------------------------------------------------------------------


def _prompt(index: int, words: int) -> str:
    picked = [_FILLER[(index * 7 + i * (index % 5 + 1)) % len(_FILLER)] for i in range(words)]
    return f"Request {index}. " + " ".join(picked) + ". Summarize it."


def _modes(recipe: Recipe, model: str) -> dict[Mode, Sampling]:
    out: dict[Mode, Sampling] = {}
    for role in [*recipe.proposer_roles(), recipe.aggregator_role()]:
        if role.model == model:
            out.setdefault(sampling_mode(role.sampling), role.sampling)
    return out


def step_from_stamps(stamps: Sequence[Sequence[float]]) -> float | None:
    """A decode step's seconds from the arrival times of every request's streamed tokens: the median gap between a
    request's consecutive tokens while every request of the batch is decoding (after the last one's first token,
    before the first one's last), so neither the prefill nor a shrinking batch is counted. None when no such span."""
    if not stamps or any(len(t) < 2 for t in stamps):
        return None
    begin = max(t[0] for t in stamps)
    end = min(t[-1] for t in stamps)
    gaps = sorted(b - a for t in stamps for a, b in zip(t, t[1:], strict=False) if a >= begin and b <= end)
    if len(gaps) < 3:
        return None
    return gaps[len(gaps) // 2]


def _run_batch(runner: Any, model: str, requests: Sequence[Any]) -> tuple[float, list[Any], list[list[float]]]:
    """Submit ``requests`` at once (streamed), wait for all: (seconds, generations, token arrival times each)."""
    import threading

    stamps: list[list[float]] = [[] for _ in requests]
    results: list[Any] = [None] * len(requests)
    left = [len(requests)]
    lock, finished = threading.Lock(), threading.Event()

    def submit(i: int) -> None:
        def on_delta(_text: str) -> None:
            stamps[i].append(time.perf_counter())

        def on_done(gen: Any) -> None:
            with lock:
                results[i] = gen
                left[0] -= 1
                if not left[0]:
                    finished.set()

        runner.submit(model, requests[i], on_done=on_done, on_delta=on_delta)

    began = time.perf_counter()
    for i in range(len(requests)):
        submit(i)
    finished.wait()
    return time.perf_counter() - began, results, stamps


def measure(recipe: Recipe, plan: Plan, *, log: Callable[[str], None] | None = None) -> Calibration:
    """Start the plan's engines (backend vLLM) and time every engine's points, a phase at a time, the engines of a
    phase concurrently. Raises PlacementError / EngineStartError as `run` would."""
    import threading

    from moa_local.engines.base import Request
    from moa_local.placement.phases import start_runner

    if plan.device != "cpu":
        raise InputError("--calibrate measures CPU engines; GPU forecasts use the card roofline (docs/forecast.md)")
    say = log or (lambda _m: None)
    _, machine = machine_key()
    machine["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        import vllm

        machine["vllm"] = getattr(vllm, "__version__", "?")
    except ImportError:
        pass
    results: dict[str, list[Point]] = {}
    errors: list[BaseException] = []
    counter = itertools.count()

    def timed(runner: Any, engine: str, kind: str, mode: str, sampling: Sampling, batch: int, words: int,
              new: int) -> Point:
        base = next(counter) * 1000
        s = sampling.model_copy(update={"max_tokens": new, "ignore_eos": True, "seed": None})
        requests = [Request(messages=[{"role": "user", "content": _prompt(base + i, words)}], sampling=s)
                    for i in range(batch)]
        seconds, gens, stamps = _run_batch(runner, engine, requests)
        bad = [g.error for g in gens if not g.ok]
        if bad:
            raise InputError(f"calibrating '{engine}' failed: {bad[0]}")
        step = step_from_stamps(stamps) if kind == "decode" else None
        point = Point(kind=kind, mode=mode, batch=batch, prompt_tokens=sum(g.usage.prompt_tokens for g in gens) / batch,
                      new_tokens=sum(g.usage.completion_tokens for g in gens) / batch,
                      longest=max(g.usage.completion_tokens for g in gens), seconds=round(seconds, 4),
                      step_seconds=round(step, 5) if step is not None else None)
        say(f"{engine} {kind} {mode} batch {batch} x {point.prompt_tokens:.0f} tokens: {seconds:.2f} s"
            + (f", {step * 1000:.0f} ms per step" if step is not None else ""))
        return point

    def run(runner: Any, engine: EnginePlacement) -> None:
        points: list[Point] = []
        for mode, sampling in _modes(recipe, engine.id).items():
            if not points:
                timed(runner, engine.id, "warmup", mode, sampling, 2, 8, 4)
                points += [timed(runner, engine.id, "prefill", mode, sampling, b, n * 4 // 5, 1)
                           for b, n in PREFILL_SHAPES]
            points += [timed(runner, engine.id, "decode", mode, sampling, b, n * 4 // 5, NEW_TOKENS)
                       for b, n in DECODE_SHAPES]
        results[engine.id] = points

    def guarded(runner: Any, engine: EnginePlacement) -> None:
        try:
            run(runner, engine)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(exc)

    runner = start_runner(recipe, plan, backend="vllm", log=say)
    try:
        for phase in range(len(plan.phases)):
            threads = [threading.Thread(target=guarded, args=(runner, e), name=f"calibrate-{e.id}")
                       for e in plan.models if e.phase == phase]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
    finally:
        runner.close()
    calibrated = []
    for engine in plan.models:
        coef = fit(results[engine.id])
        calibrated.append(EngineCalibration(model=engine.id, dtype=engine.dtype,
                                            cores=binding_cores(engine.cpu_threads), binding=engine.cpu_threads or "",
                                            points=results[engine.id], **coef))
    return Calibration(machine=machine, engines=calibrated)


def calibrate(recipe: Recipe, plan: Plan, *, log: Callable[[str], None] | None = None,
              path: Path | None = None) -> tuple[Calibration, Path]:
    """Measure ``recipe``'s engines on this machine and store them beside earlier calibrations."""
    measured = measure(recipe, plan, log=log)
    existing = load_calibration(path)
    merged = existing.merge(measured) if existing is not None else measured
    return merged, save_calibration(merged, path)
