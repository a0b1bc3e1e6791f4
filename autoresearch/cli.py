"""The `autoresearch` command line."""

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import repo_root
from .hardware import available_backends, blas_library, device_name, hardware_tag, pick_backend

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Autonomous LLM research on any hardware. With no command: one training run.")
console = Console(stderr=True)

PHASES = {"download": "downloading shards", "import": "importing sources", "tokenizer": "training tokenizer",
          "tokenize": "tokenizing shards"}


def fail(message, code=1):
    """One line on stderr, non-zero exit: every user-facing error goes through here."""
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolve_backend(requested):
    try:
        backend, reason = pick_backend(requested)
    except ValueError as e:
        fail(str(e))
    if requested == "auto":
        console.print(f"backend: {backend} ({reason})", highlight=False)
    return backend


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    backend: str = typer.Option("auto", "--backend", "-b", help="auto, cuda, mps or mlx"),
    budget: Optional[float] = typer.Option(None, "--budget", help="training seconds (default: the profile's 300)"),
):
    """With no command: one manual training run of backends/<backend>/train.py (upstream's `uv run train.py`)."""
    ctx.obj = {"backend": backend, "budget": budget}
    if ctx.invoked_subcommand is not None:
        return
    from .runner import run_training

    name = resolve_backend(backend)
    root = repo_root()
    check_prepared(budget)
    result = run_training(name, budget=budget, root=root, on_line=print)
    if not result.ok:
        fail("training crashed" + (" (timeout)" if result.timed_out else f" (exit {result.returncode})"),
             code=result.returncode or 1)


def check_prepared(budget=None):
    """The cache is prepared and the budget (--budget, else AUTORESEARCH_BUDGET) is valid: else one line."""
    import os

    import prepare

    if budget is not None:
        os.environ["AUTORESEARCH_BUDGET"] = str(budget)
    try:
        return prepare.time_budget(prepare.load_profile())
    except prepare.PrepareError as e:
        fail(str(e))


@app.command("prepare")
def prepare_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="download: climbmix or tinystories"),
    source: Optional[List[Path]] = typer.Option(None, "--source", "-s",
                                                help="local files or folders (.parquet with `text`, .txt, .jsonl)"),
    profile: str = typer.Option("auto", "--profile", "-p", help="eval profile: gpu, laptop, cpu or auto"),
    num_shards: int = typer.Option(10, "--num-shards", help="training shards to download"),
    workers: int = typer.Option(8, "--download-workers", help="parallel downloads"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="mirror of the dataset's shard files"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of local documents held out"),
    force: bool = typer.Option(False, "--force", help="rebuild a cache prepared differently"),
):
    """Download or import data, train the tokenizer, tokenize, fix the eval profile."""
    import prepare

    if profile == "auto":
        profile = default_profile()
        console.print(f"profile: {profile} (auto for this machine; --profile to choose)", highlight=False)
    if not source and not dataset:
        dataset = "climbmix"
    console.print(f"cache: {prepare.cache_dir()}", highlight=False)
    with Progress(TextColumn("{task.description:<20}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as bar:
        tasks = {}

        def progress(phase, advance, total):
            if phase not in tasks:
                tasks[phase] = bar.add_task(PHASES[phase], total=total or 1)
            if total is not None:
                bar.update(tasks[phase], total=total, completed=advance)
            else:
                bar.advance(tasks[phase], advance)
            for other, task in tasks.items():  # a new phase means the earlier ones are done
                if other != phase and not bar.tasks[task].finished:
                    bar.update(task, completed=bar.tasks[task].total)

        try:
            meta = prepare.prepare(profile=profile, dataset=dataset, sources=source, num_shards=num_shards,
                                   workers=workers, base_url=base_url, val_fraction=val_fraction, force=force,
                                   progress=progress)
        except prepare.PrepareError as e:
            bar.stop()
            fail(str(e))
        for task in tasks.values():
            bar.update(task, completed=bar.tasks[task].total)
    p = meta["profile"]
    console.print(f"ready: profile {p['name']} (seq_len {p['seq_len']}, vocab {meta['vocab_size']}, "
                  f"eval {p['eval_tokens']:,} tokens), {meta['train_tokens']:,} training tokens, "
                  f"{meta['val_tokens']:,} validation tokens", highlight=False, soft_wrap=True)
    if meta.get("val_repeats"):
        console.print("note: the validation split is smaller than the profile's eval tokens; evaluation cycles "
                      "through it", highlight=False)


def default_profile():
    found = available_backends()
    if "cuda" in found:
        return "gpu"
    if found.get("mlx") == "gpu" or found.get("mps") == "gpu":
        return "laptop"
    return "cpu"


@app.command("hardware")
def hardware_cmd():
    """This machine's hardware tag per installed backend, and what `--backend auto` picks."""
    found = available_backends()
    if not found:
        fail("no backend installed: pip install -e '.[mlx]' or '.[mps]' or '.[cuda]'")
    for name in found:
        print(f"{name:5} {hardware_tag(name):40} {device_name(name)}")
    backend, reason = pick_backend("auto")
    print(f"auto: {backend} ({reason})")
    blas = blas_library()
    if "mlx" in found and found["mlx"] == "cpu":
        print(f"blas for mlx: {blas or 'reference (slow): apt-get install libopenblas0-pthread'}")


def main():
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
