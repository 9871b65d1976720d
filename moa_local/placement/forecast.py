"""Forecast of a batch job before it runs: wall time, engine-seconds per engine and stage, swaps, GPU-hours, cost.

Models the scheduler the run would use (moa_local/pipeline/scheduler.py) on the engines the plan places, with each
engine's speed from throughput.py (a roofline on GPUs, this machine's calibration on CPUs):

* **flow** (one phase): every conversation is a small dataflow, at most ``window`` in flight; a conversation's
  layer-k requests go to their engines when its layer k-1 is in, its aggregator request when its last layer is in.
* **stage** (several phases, or asked for): the plan's schedule step by step over the whole job (a barrier after
  each step), at most ``window`` x proposers requests in flight within a step (as MoAPipeline.stage_window sends);
  a swap at every phase change (``plan.switch_s``).

Both are played by one small event simulation of continuously batching engines: an engine admits waiting requests
while its running batch is under vLLM's cap and its KV cache holds them (prompt + half the answer each), prefills
them, and advances every running sequence one token per decode step (a step's time from the engine's speed at the
batch and context it holds). The simulation runs at most ``SIMULATED_CONVERSATIONS`` conversations; a longer job is
extrapolated linearly from two simulated sizes (the steady rate), keeping the fill and drain of the pipeline. Token
counts come from the Workload (workload.py): requests of one role are alike except for their conversation's length.

Never imports torch or vllm, never starts an engine, never renders (report.py does).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from moa_local.config.recipe import Recipe, Role
from moa_local.config.registry import load_model_config
from moa_local.errors import InputError
from moa_local.placement.cards import card_perf, vllm_max_num_seqs
from moa_local.placement.hardware import Hardware
from moa_local.placement.plan import Plan, Step
from moa_local.placement.throughput import EngineSpeed, Mode, roofline_speed, sampling_mode
from moa_local.placement.workload import Workload, build_workload

Schedule = Literal["flow", "stage"]

SIMULATED_CONVERSATIONS = 768
"""Most conversations the simulation plays; longer jobs are extrapolated from the steady rate."""


# -- the result -------------------------------------------------------------------------------------------------


@dataclass
class EngineForecast:
    """One engine over the whole job."""

    id: str
    phase: int
    roles: list[str]
    requests: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    engine_seconds: float | None = None
    """Time it has a request prefilling or decoding (None without a speed)."""
    mean_batch: float | None = None
    """Running sequences, averaged over its busy time."""
    speed: str = ""
    bottleneck: bool = False


@dataclass
class StageForecast:
    """One stage (a layer, or the aggregation) on one engine. Under the stage schedule also one step of the plan."""

    stage: int
    """1..layers for proposer layers, layers + 1 for the aggregation."""
    engine: str
    phase: int
    requests: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    engine_seconds: float | None = None
    step_seconds: float | None = None
    """Stage schedule: the step's wall time (its slowest engine); None under flow (no barrier)."""
    swap_in_s: float = 0.0
    """Stage schedule: the swap that brings this step's phase in (0 when the previous step ran on it)."""


@dataclass
class Forecast:
    """What a batch job will take. Times in seconds; ``None`` where no speed is known (an uncalibrated CPU)."""

    recipe: str
    hardware: str
    device: str
    schedule: Schedule
    window: int
    """Conversations in flight, as `run --window` says it (the stage schedule sends window x proposers requests)."""
    conversations: int
    wall_s: float | None
    """Start to finish: the initial load, every step or the flow, and the swaps."""
    run_s: float | None
    """After the engines are up (what `run --input` reports as its wall time)."""
    load_s: float
    swap_s: float
    swaps: int
    fill_drain_s: float | None
    """Wall time beyond the steady rate: the pipeline filling at the start and draining at the end."""
    gpus: int
    gpu_hours: float | None
    price_per_gpu_hour: float | None
    cost: float | None
    bottleneck: str | None
    calibrated: bool
    engines: list[EngineForecast]
    stages: list[StageForecast]
    workload: Workload
    notes: list[str] = field(default_factory=list)

    @property
    def engine_seconds(self) -> dict[str, float | None]:
        return {e.id: e.engine_seconds for e in self.engines}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["workload"] = self.workload.to_dict()
        data["engine_seconds"] = {k: None if v is None else round(v, 2) for k, v in self.engine_seconds.items()}
        for key in ("wall_s", "run_s", "fill_drain_s", "gpu_hours", "cost"):
            if data[key] is not None:
                data[key] = round(data[key], 4 if key in ("gpu_hours", "cost") else 2)
        for row in (*data["engines"], *data["stages"]):
            for key in ("engine_seconds", "mean_batch", "step_seconds"):
                if row.get(key) is not None:
                    row[key] = round(row[key], 2)
        return data


# -- the engines' speeds ----------------------------------------------------------------------------------------


def engine_speeds(recipe: Recipe, plan: Plan, *, hardware: Hardware | None = None,
                  calibration: Any = None) -> tuple[dict[str, EngineSpeed | None], list[str]]:
    """Each engine's speed: the roofline of its GPUs' card, or its CPU calibration (None when there is none)."""
    speeds: dict[str, EngineSpeed | None] = {}
    notes: list[str] = []
    if plan.backend == "transformers":
        notes.append("the forecast models vLLM engines; the transformers backend has no speed model")
        return dict.fromkeys((e.id for e in plan.models), None), notes
    if plan.device == "cuda":
        if hardware is None:
            raise InputError("a GPU forecast needs the hardware the plan was made for (its cards)")
        slots = hardware.slots()
        for e in plan.models:
            gpu = slots[e.gpus[0]].spec
            card = card_perf(gpu)
            if card is None:
                raise InputError(f"no throughput data for the card '{gpu.name}' of '{e.id}': forecasts know "
                                 "the catalog cards (see --gpus); give one, e.g. --gpus 8xH100-80GB")
            speeds[e.id] = roofline_speed(e, load_model_config(e.id), recipe.engine_options(e.id), card,
                                          max_batch=vllm_max_num_seqs(gpu))
        return speeds, notes
    if plan.device == "cpu":
        for e in plan.models:
            speeds[e.id] = calibration.speed(e) if calibration is not None else None
        missing = [m for m, s in speeds.items() if s is None]
        if missing:
            notes.append(f"uncalibrated on this machine: {', '.join(missing)}; run `moa-local plan --recipe "
                         f"{recipe.name} --calibrate` once (it measures each engine for a few minutes)")
        return speeds, notes
    raise InputError("the fake backend has no speed to forecast; plan a real backend (--backend vllm)")


# -- the simulation ---------------------------------------------------------------------------------------------


@dataclass
class _Request:
    conversation: int
    stage: int
    role: str
    prompt: int
    output: float
    mode: Mode
    finish: float = 0.0
    seq: int = 0


class _Engine:
    """One continuously batching engine: waiting -> prefilling -> running -> done."""

    def __init__(self, name: str, speed: EngineSpeed, kv_tokens: int) -> None:
        self.name = name
        self.speed = speed
        self.kv_tokens = max(1, kv_tokens)
        self.waiting: deque[_Request] = deque()
        self.prefilling: deque[list[Any]] = deque()  # [request, prefill seconds left]
        self.running: list[tuple[float, int, _Request]] = []
        self.counter = 0.0  # decode steps taken
        self.context_base = 0.0  # sum over running of (prompt - counter at start)
        self.modes: dict[Mode, int] = {}
        self.stages: dict[int, int] = {}
        self.kv_used = 0.0
        self.busy = 0.0
        self.batch_time = 0.0
        self.stage_seconds: dict[int, float] = {}
        self._seq = 0

    def footprint(self, r: _Request) -> float:
        return r.prompt + r.output / 2

    def admit(self) -> None:
        while self.waiting:
            r = self.waiting[0]
            holding = len(self.running) + len(self.prefilling)
            if holding >= self.speed.max_batch or (holding and self.kv_used + self.footprint(r) > self.kv_tokens):
                return
            self.waiting.popleft()
            self.kv_used += self.footprint(r)
            self.prefilling.append([r, self.speed.prefill_s(r.prompt, float(r.prompt) ** 2)])

    def step(self) -> float:
        return self.speed.step_s(self.modes, self.context_base + len(self.running) * self.counter)

    def next_event(self) -> float:
        if self.prefilling:
            return float(self.prefilling[0][1])
        if self.running:
            return max(0.0, self.running[0][0] - self.counter) * self.step()
        return math.inf

    def advance(self, dt: float, *, exact: bool) -> None:
        if self.prefilling:
            self.busy += dt
            self.batch_time += dt * len(self.running)
            head = self.prefilling[0]
            stage = head[0].stage
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + dt
            head[1] -= dt
            if exact or head[1] <= 1e-12:
                self.prefilling.popleft()
                self._start(head[0])
            return
        if not self.running:
            return
        self.busy += dt
        self.batch_time += dt * len(self.running)
        n = len(self.running)
        for stage, count in self.stages.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + dt * count / n
        step = self.step()
        self.counter = self.running[0][0] if exact else self.counter + (dt / step if step > 0 else 0.0)

    def _start(self, r: _Request) -> None:
        self._seq += 1
        r.finish = self.counter + max(1.0, r.output)
        heapq.heappush(self.running, (r.finish, self._seq, r))
        self.context_base += r.prompt - self.counter
        self.modes[r.mode] = self.modes.get(r.mode, 0) + 1
        self.stages[r.stage] = self.stages.get(r.stage, 0) + 1

    def finished(self) -> list[_Request]:
        done = []
        while self.running and self.running[0][0] <= self.counter + 1e-9:
            _, _, r = heapq.heappop(self.running)
            self.context_base -= r.prompt - (r.finish - max(1.0, r.output))
            self.modes[r.mode] -= 1
            self.stages[r.stage] -= 1
            self.kv_used -= self.footprint(r)
            done.append(r)
        if not self.running:
            self.context_base, self.kv_used = 0.0, sum(self.footprint(x[0]) for x in self.prefilling)
        return done


@dataclass
class _Played:
    """One simulated run: its wall time, per-engine busy seconds and batch, per (stage, engine) seconds, steps."""

    wall: float
    busy: dict[str, float]
    batch_time: dict[str, float]
    stage_seconds: dict[tuple[int, str], float]
    step_seconds: list[float]


class _Play:
    """Plays ``n`` conversations of the workload through the engines under one schedule."""

    def __init__(self, recipe: Recipe, workload: Workload, speeds: Mapping[str, EngineSpeed],
                 kv_tokens: Mapping[str, int]) -> None:
        self.recipe = recipe
        self.workload = workload
        self.speeds = speeds
        self.kv_tokens = kv_tokens
        self.proposers = recipe.proposer_roles()
        self.aggregator = recipe.aggregator_role()
        self.roles = {str(r.name): r for r in [*self.proposers, self.aggregator]}

    def request(self, conversation: int, stage: int, role: Role) -> _Request:
        name = str(role.name)
        prompt = self.workload.base(name, conversation)
        if stage > 1:
            prompt += int(self.workload.reference_overhead[name] + self.references(conversation, stage))
        return _Request(conversation, stage, name, prompt, self.workload.output_of(stage, name, conversation),
                        sampling_mode(role.sampling))

    def references(self, conversation: int, stage: int) -> float:
        """Tokens of the references a request of ``stage`` reads: every proposer's answer of the stage before."""
        if stage <= 1:
            return 0.0
        return sum(self.workload.output_of(stage - 1, str(r.name), conversation) for r in self.proposers)

    def _loop(self, engines: dict[str, _Engine], on_done: Callable[[_Request], None], t: float = 0.0) -> float:
        while True:
            for e in engines.values():
                e.admit()
            events = {name: e.next_event() for name, e in engines.items()}
            first = min(events, key=lambda k: events[k])
            dt = events[first]
            if math.isinf(dt):
                return t
            for name, e in engines.items():
                e.advance(dt, exact=name == first)
            t += dt
            for e in engines.values():
                for r in e.finished():
                    on_done(r)

    def _engines(self) -> dict[str, _Engine]:
        return {m: _Engine(m, self.speeds[m], self.kv_tokens[m]) for m in self.recipe.model_ids()}

    def _collect(self, engines: dict[str, _Engine], wall: float, steps: list[float]) -> _Played:
        return _Played(wall=wall, busy={m: e.busy for m, e in engines.items()},
                       batch_time={m: e.batch_time for m, e in engines.items()},
                       stage_seconds={(s, m): v for m, e in engines.items() for s, v in e.stage_seconds.items()},
                       step_seconds=steps)

    def flow(self, n: int, window: int) -> _Played:
        engines = self._engines()
        pending: dict[int, int] = {}
        admitted = [0]
        last = self.recipe.layers + 1

        def start(conversation: int, stage: int) -> None:
            roles = self.proposers if stage < last else [self.aggregator]
            pending[conversation] = len(roles)
            for role in roles:
                engines[role.model].waiting.append(self.request(conversation, stage, role))

        def admit() -> None:
            while admitted[0] < n and len(pending) < window:
                start(admitted[0], 1)
                admitted[0] += 1

        def on_done(r: _Request) -> None:
            pending[r.conversation] -= 1
            if pending[r.conversation]:
                return
            if r.stage < last:
                start(r.conversation, r.stage + 1)
            else:
                del pending[r.conversation]
                admit()

        admit()
        return self._collect(engines, self._loop(engines, on_done), [])

    def stage(self, n: int, window: int, steps: list[Step]) -> _Played:
        engines = self._engines()
        t = 0.0
        lengths: list[float] = []
        for step in steps:
            feeder = _StepFeeder(self, engines, step, n, window)
            feeder.feed()
            began = t
            t = self._loop(engines, feeder.done, t)
            lengths.append(t - began)
        return self._collect(engines, t, lengths)


class _StepFeeder:
    """One step of the stage schedule: every conversation's requests of the step's roles, at most ``window`` in
    flight, in the order the scheduler sends them (conversation by conversation)."""

    def __init__(self, play: _Play, engines: dict[str, _Engine], step: Step, n: int, window: int) -> None:
        self.play, self.engines, self.layer, self.window = play, engines, step.layer, window
        roles = [play.roles[name] for name in step.roles]
        self.todo = iter([(c, role) for c in range(n) for role in roles])
        self.in_flight = 0

    def feed(self) -> None:
        while self.in_flight < self.window:
            item = next(self.todo, None)
            if item is None:
                return
            c, role = item
            self.engines[role.model].waiting.append(self.play.request(c, self.layer, role))
            self.in_flight += 1

    def done(self, _request: _Request) -> None:
        self.in_flight -= 1
        self.feed()


# -- the forecast -----------------------------------------------------------------------------------------------


def default_window(recipe: Recipe, plan: Plan) -> int:
    """The scheduler's own default window for this plan (pipeline/scheduler.py decides; asked, not copied)."""
    from types import SimpleNamespace

    from moa_local.pipeline.scheduler import default_window as scheduler_window  # light: no engine imports

    return int(scheduler_window(recipe, SimpleNamespace(plan=plan)))  # type: ignore[arg-type]


def choose_schedule(recipe: Recipe, plan: Plan) -> Schedule:
    """flow when every model of the recipe is in one phase, else stage (as the scheduler chooses)."""
    phases = {e.phase for e in plan.models if e.id in recipe.model_ids()}
    return "flow" if len(phases) <= 1 else "stage"


def _speed_name(speed: EngineSpeed | None) -> str:
    return speed.source if speed is not None else "uncalibrated"


def _gpu_count(plan: Plan) -> int:
    return len({g for e in plan.models for g in e.gpus})


def forecast(recipe: Recipe, plan: Plan, workload: Workload, *, hardware: Hardware | None = None,
             calibration: Any = None, speeds: Mapping[str, EngineSpeed | None] | None = None,
             schedule: Schedule | None = None, window: int | None = None,
             price_per_gpu_hour: float | None = None) -> Forecast:
    """Forecast ``workload`` run with ``recipe`` on ``plan``. ``hardware``: what the plan was made for (needed on
    GPUs, for the cards); ``calibration`` (calibration.Calibration): CPU engine speeds; ``speeds`` overrides both
    (tests, benchmarks); ``schedule``/``window`` as `run` would use them (default: the scheduler's own choice)."""
    notes: list[str] = []
    if speeds is None:
        speeds, notes = engine_speeds(recipe, plan, hardware=hardware, calibration=calibration)
    chosen: Schedule = schedule or choose_schedule(recipe, plan)
    if chosen == "flow" and choose_schedule(recipe, plan) == "stage":
        raise InputError("the flow schedule needs every model resident at once; this plan has phases (use stage)")
    size = window or default_window(recipe, plan)
    n = workload.conversations
    engines = [EngineForecast(id=e.id, phase=e.phase, roles=list(e.roles), speed=_speed_name(speeds.get(e.id)))
               for e in plan.models]
    stages = _token_counts(recipe, plan, workload, engines)
    known = all(speeds.get(e.id) is not None for e in plan.models)
    gpus = _gpu_count(plan)
    result = Forecast(recipe=recipe.name, hardware=plan.hardware, device=plan.device, schedule=chosen, window=size,
                      conversations=n, wall_s=None, run_s=None, load_s=plan.initial_load_s,
                      swap_s=plan.switch_s if chosen == "stage" else 0.0,
                      swaps=plan.switches if chosen == "stage" else 0, fill_drain_s=None, gpus=gpus, gpu_hours=None,
                      price_per_gpu_hour=price_per_gpu_hour, cost=None, bottleneck=None, calibrated=known,
                      engines=engines, stages=stages, workload=workload, notes=notes)
    if not known:
        return result

    # 1. play the job (or a part of it, twice, to extrapolate the steady rate)
    play = _Play(recipe, workload, {k: v for k, v in speeds.items() if v is not None},
                 {e.id: e.kv_tokens for e in plan.models})
    requests = size * max(1, len(recipe.proposer_roles()))  # the stage schedule's window, as the pipeline sets it
    run: Callable[[int], _Played] = ((lambda k: play.flow(k, size)) if chosen == "flow"
                                     else (lambda k: play.stage(k, requests, plan.schedule)))
    big = min(n, max(SIMULATED_CONVERSATIONS, 2 * size))
    played = run(big)
    if big < n:
        small = run(big // 2)
        scale = (n - big) / (big - big // 2)

        def grow(a: float, b: float) -> float:
            return a + (a - b) * scale

        played = _Played(wall=grow(played.wall, small.wall),
                         busy={m: grow(v, small.busy[m]) for m, v in played.busy.items()},
                         batch_time={m: grow(v, small.batch_time[m]) for m, v in played.batch_time.items()},
                         stage_seconds={k: grow(v, small.stage_seconds.get(k, 0.0))
                                        for k, v in played.stage_seconds.items()},
                         step_seconds=[grow(a, b) for a, b in zip(played.step_seconds, small.step_seconds, strict=True)])
        result.fill_drain_s = max(0.0, small.wall - (played.wall - small.wall) / (n - big // 2) * (big // 2))
        notes.append(f"simulated {big:,} and {big // 2:,} conversations; the rest extrapolated at the steady rate")

    # 2. per engine, per stage, totals
    for e in engines:
        e.engine_seconds = played.busy[e.id]
        e.mean_batch = played.batch_time[e.id] / played.busy[e.id] if played.busy[e.id] > 0 else 0.0
    for s in stages:
        s.engine_seconds = played.stage_seconds.get((s.stage, s.engine), 0.0)
    if chosen == "stage":
        for step, seconds in zip(plan.schedule, played.step_seconds, strict=True):
            for s in stages:
                if s.stage == step.layer and s.phase == step.phase:
                    s.step_seconds, s.swap_in_s = seconds, step.switch_in_s
    slowest = max(engines, key=lambda e: e.engine_seconds or 0.0)
    slowest.bottleneck = True
    result.bottleneck = slowest.id
    note = _window_note(recipe, plan, stages, slowest, speeds[slowest.id], size, chosen)
    if note:
        notes.append(note)
    result.run_s = played.wall + result.swap_s
    result.wall_s = result.run_s + result.load_s
    if result.fill_drain_s is None and played.wall > 0:
        result.fill_drain_s = max(0.0, played.wall - (slowest.engine_seconds or 0.0))
    if gpus:
        result.gpu_hours = result.wall_s * gpus / 3600
        if price_per_gpu_hour is not None:
            result.cost = result.gpu_hours * price_per_gpu_hour
    return result


def _window_note(recipe: Recipe, plan: Plan, stages: list[StageForecast], engine: EngineForecast,
                 speed: EngineSpeed | None, window: int, schedule: Schedule) -> str | None:
    """Advice when the scheduler's window, not the engine, caps the bottleneck's batch in its busiest stage."""
    mine = [s for s in stages if s.engine == engine.id and s.requests]
    if speed is None or not mine:
        return None
    busiest = max(mine, key=lambda s: s.engine_seconds or 0.0)
    sequence = (busiest.prefill_tokens + busiest.generated_tokens / 2) / busiest.requests
    capacity = min(speed.max_batch, int(plan.engine(engine.id).kv_tokens // max(1.0, sequence)))
    roles = [r for r in [*recipe.proposer_roles(), recipe.aggregator_role()] if r.model == engine.id]
    per_conversation = max(1, sum(1 for r in roles if r.name != recipe.aggregator_role().name)) \
        if busiest.stage <= recipe.layers else 1
    capacity = min(capacity, busiest.requests)
    if schedule == "stage":
        step = next((x for x in plan.schedule if x.layer == busiest.stage and x.phase == busiest.phase), None)
        requests = window * max(1, len(recipe.proposer_roles()))
        share = requests * per_conversation / max(1, len(step.roles) if step else 1)
    else:
        share = float(window * per_conversation)
    if share >= 0.8 * capacity:
        return None
    return (f"the window ({window}) lets {engine.id} run about {share:.0f} sequences in its busiest stage though its "
            f"KV cache holds about {capacity}; a larger --window (about {math.ceil(window * capacity / share)}) "
            "would raise its batch")


def _token_counts(recipe: Recipe, plan: Plan, workload: Workload, engines: list[EngineForecast]) -> list[StageForecast]:
    """Requests, prefill and generated tokens per (stage, engine) and per engine, exactly (no simulation)."""
    by_id = {e.id: e for e in engines}
    phase = {e.id: e.phase for e in plan.models}
    rows: dict[tuple[int, str], StageForecast] = {}
    n = workload.conversations
    proposers = recipe.proposer_roles()
    last = recipe.layers + 1
    for stage in range(1, last + 1):
        roles = proposers if stage < last else [recipe.aggregator_role()]
        refs = sum(workload.output(stage - 1, str(r.name)) for r in proposers) if stage > 1 else 0.0
        for role in roles:
            name = str(role.name)
            lengths = workload.base_tokens[name]
            mean_base = sum(lengths) / len(lengths)
            prompt = mean_base + (workload.reference_overhead[name] + refs if stage > 1 else 0.0)
            row = rows.setdefault((stage, role.model), StageForecast(stage=stage, engine=role.model,
                                                                       phase=phase[role.model]))
            row.requests += n
            row.prefill_tokens += round(prompt * n)
            row.generated_tokens += round(workload.output(stage, name) * n)
    for row in rows.values():
        e = by_id[row.engine]
        e.requests += row.requests
        e.prefill_tokens += row.prefill_tokens
        e.generated_tokens += row.generated_tokens
    return sorted(rows.values(), key=lambda r: (r.stage, r.phase, r.engine))


def forecast_job(recipe: Recipe, plan: Plan, *, hardware: Hardware | None = None, prompts: int | None = None,
                 input: Path | None = None, prompt_tokens: int | None = None, outputs_from: Path | None = None,
                 schedule: Schedule | None = None, window: int | None = None,
                 price_per_gpu_hour: float | None = None) -> Forecast:
    """The forecast of a job described as on the command line: the workload (``input`` and/or ``prompts``,
    ``prompt_tokens``, ``outputs_from``), this machine's calibration for CPU plans, the cards of ``hardware`` for
    GPU plans (detected when None). Pure and quick (no torch, no vllm): what `plan --prompts` and `run --input` call."""
    workload = build_workload(recipe, prompts=prompts, input=input, prompt_tokens=prompt_tokens,
                              outputs_from=outputs_from)
    calibration = None
    if plan.device == "cpu":
        from moa_local.placement.calibration import load_calibration

        calibration = load_calibration()
    elif plan.device == "cuda" and hardware is None:
        from moa_local.placement.hardware import detect_hardware

        hardware = detect_hardware()
    return forecast(recipe, plan, workload, hardware=hardware, calibration=calibration, schedule=schedule,
                    window=window, price_per_gpu_hour=price_per_gpu_hour)
