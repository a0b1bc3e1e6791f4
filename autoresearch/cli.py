"""The `autoresearch` command line."""

import json
import platform
import re
import sys
from pathlib import Path
from typing import List, Optional

import git
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import prepare

from . import record, repo_root, sandbox
from .auto_pick import auto_plan, cpu_measurement, cpu_paths, pick_backend
from .branch import Lock, branch_backend, open_repo
from .calibrate import TIME_LIMIT, calibrate
from .dashboard import DashboardError, serve
from .experiment import EXIT, CacheBroken, Refused, SetupFailed, check_cache, manual_run, run_experiment, setup, verify
from .gate import Gate
from .hardware import BLAS_HINT, available_backends, blas_library, device_name, hardware_tag, is_apple_silicon
from .ledger import LEDGER_NAME, LedgerError, read_ledger, rebuild_ledger, series_of
from .loop import AgentBroken, TurnRules, make_agent, run_loop
from .plain import markup, plain, text as plain_text
from .presets import PRESETS, missing_binary
from .progress import LiveProgress
from .report import ReportError, bench_report, finite, plot_progress, print_results, results_summary
from .runner import Interrupted, handle_signals
from .settings import Run
from .swarm import Plan, SwarmError, run_swarm
from .transfer import target_budget, transfer

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Autonomous LLM research on any hardware. With no command: one training run.")
console = Console(stderr=True)

PHASES = {"download": "downloading shards", "import": "importing sources", "tokenizer": "training tokenizer",
          "tokenize": "tokenizing shards"}


def fail(message, code=1):
    """One line on stderr, non-zero exit: every user-facing error goes through here. The message names paths,
    tags and a server's words: shown as plain text, whatever brackets or escape sequences they hold."""
    console.print(f"[red]error:[/red] {markup(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolve_backend(requested):
    say = lambda line: console.print(plain(line), highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    on_branch = branch_backend(repo_root()) if requested == "auto" else None
    try:
        backend, reason = (on_branch, "the run branch's") if on_branch else pick_backend(requested, True, say)
    except ValueError as e:
        fail(str(e))
    if reason != "requested":
        console.print(plain(f"backend: {backend} ({reason})"), highlight=False, markup=False, soft_wrap=True)
    return backend


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    backend: str = typer.Option("auto", "--backend", "-b", help="auto, cuda, mps or mlx"),
    budget: Optional[float] = typer.Option(None, "--budget", help="training seconds (default: the profile's 300)"),
    sandbox_mode: str = typer.Option("auto", "--sandbox", envvar="AUTORESEARCH_SANDBOX",
                                     help="auto (what exists), require (refuse without one) or off: the OS sandbox "
                                          "of trainer, evaluator and agent"),
):
    """With no command: one manual training run of backends/<backend>/train.py (upstream's `uv run train.py`)."""
    ctx.obj = {"backend": backend, "budget": budget}
    use_sandbox(sandbox_mode, ctx.invoked_subcommand)
    if ctx.invoked_subcommand is not None:
        return
    run = resolve_run(ctx, None)
    try:
        check_cache()
        status, text = manual_run(run, on_line=print)
    except CacheBroken as e:
        fail(str(e))
    print(text)
    if status != "ok":
        fail(f"training {status}", code=EXIT[status])


UNTRUSTED_COMMANDS = (None, "setup", "run", "loop", "swarm", "calibrate", "verify", "transfer")  # they run train.py


def use_sandbox(mode, command):
    """--sandbox, resolved once for the command; said once where the command runs untrusted code."""
    try:
        box = sandbox.use(mode)
    except ValueError as e:
        fail(str(e), code=2)
    except sandbox.SandboxUnavailable as e:
        fail(str(e), code=2)
    if command in UNTRUSTED_COMMANDS:
        console.print(f"sandbox: {box.kind} ({box.reason})", markup=False, highlight=False, soft_wrap=True)


def check_prepared():
    """The cache is prepared: else one line."""
    try:
        prepare.load_profile()
    except prepare.PrepareError as e:
        fail(str(e))


def resolve_run(ctx, backend, budget=None, fallback=None, **how):
    """The command's Run, resolved once: the backend (--backend here, else before the command), the budget (--budget
    here, else before the command, else Run.resolve's), how each run goes (seed, timeout, gate). A bad option or an
    unprepared cache: one line."""

    name = resolve_backend(backend or ctx.obj["backend"])
    try:
        return Run.resolve(repo_root(), name, budget if budget is not None else ctx.obj["budget"], fallback, **how)
    except ValueError as e:
        fail(str(e), code=EXIT["refused"])
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
    if profile == "auto":
        profile = default_profile()
        console.print(f"profile: {profile} (auto for this machine; --profile to choose)", highlight=False)
    if not source and not dataset:
        dataset = "climbmix"
    console.print(plain(f"cache: {prepare.cache_dir()}"), highlight=False, markup=False)
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
        except KeyboardInterrupt:  # typer would exit 130 without a word: say why, as SIGTERM's line does
            bar.stop()
            console.print("interrupted (SIGINT)")
            raise typer.Exit(130) from None
        for task in tasks.values():
            bar.update(task, completed=bar.tasks[task].total)
    p = meta["profile"]
    console.print(f"ready: profile {p['name']} (seq_len {p['seq_len']}, vocab {meta['vocab_size']}, "
                  f"eval {p['eval_tokens']:,} tokens), {meta['train_tokens']:,} training tokens, "
                  f"{meta['val_tokens']:,} validation tokens; {meta['val_rows']:,} validation rows and "
                  f"{meta.get('holdout_rows', 0):,} holdout rows", highlight=False, soft_wrap=True)
    for note in (meta.get("val_note"), meta.get("holdout_note")):
        if note:
            console.print(note, highlight=False, soft_wrap=True)
    if "holdout_rows" not in meta:
        console.print(f"note: this cache has no holdout rows (prepared before there were any); "
                      f"{prepare.repair_command(meta)} adds them", highlight=False, soft_wrap=True)
    if meta.get("val_repeats"):  # rows are packed from one pass: only documents that repeat in the split repeat
        console.print(f"note: {meta['val_rows'] - meta['val_distinct_rows']:,} of the {meta['val_rows']:,} "
                      "validation rows repeat others (the split holds the same documents more than once)",
                      highlight=False, soft_wrap=True)


def default_profile():
    found = available_backends()
    if "cuda" in found:
        return "gpu"
    if found.get("mlx") == "gpu" or found.get("mps") == "gpu":
        return "laptop"
    return "cpu"


@app.command("hardware")
def hardware_cmd(
    measure: bool = typer.Option(False, "--measure", help="measure auto's CPU paths now (interleaved runs of each "
                                 "train.py), replacing any cached figures"),
):
    """This machine's hardware tag per installed backend, and what `--backend auto` picks or will do."""

    found = available_backends()
    if not found:
        fail("no backend installed: pip install -e '.[mlx]' or '.[mps]' or '.[cuda]'")
    for name in found:
        print(f"{name:5} {hardware_tag(name):40} {device_name(name)}")
    # auto measures only where it chooses between CPU paths; elsewhere its rule needs no figures
    cpu = cpu_paths(found) if "cuda" not in found and not ("mlx" in found and is_apple_silicon()) else []
    if len(cpu) < 2:
        backend, reason = pick_backend("auto")
        if measure:
            fail(f"auto has nothing to measure here: it takes {backend} ({reason})")
        print(f"auto: {backend} ({reason})")
    else:
        if measure:
            check_prepared()
        say = lambda line: console.print(plain(line), highlight=False, markup=False, soft_wrap=True)  # noqa: E731
        choice = cpu_measurement(cpu, root=repo_root(), force=measure, on_line=say)
        if choice is None:
            try:
                prepare.load_profile()
                print(f"auto: not measured yet; {auto_plan()} (autoresearch hardware --measure measures now)")
            except prepare.PrepareError:
                print(f"auto: not measured yet; once data is prepared (autoresearch prepare), {auto_plan()}")
        else:
            # every run failed (a broken train.py): the training command would take the default, and measure again
            print(f"auto: {choice.backend or choice.default} ({choice.reason})")
            print(f"auto measured {choice.measured_at} in {choice.seconds:g}s, tokens/s per run in turn: "
                  f"{choice.figures()} (autoresearch hardware --measure measures again)")
    if found.get("mlx") == "cpu" and platform.system() == "Linux":
        print(f"blas for mlx: {blas_library() or 'reference (slow): ' + BLAS_HINT}")


def run_with_progress(fn, live, **kwargs):
    with live:
        outcome = guarded(fn, on_line=live.line, **kwargs)
    print(plain(outcome.message))
    raise typer.Exit(EXIT[outcome.status])


def guarded(fn, **kwargs):
    """fn(**kwargs), its refusals and errors as one line and the exit code the contract gives them."""
    try:
        return fn(**kwargs)
    except ValueError as e:  # an option out of range, caught before anything was committed
        fail(str(e), code=EXIT["refused"])
    except SetupFailed as e:  # a Refused (nothing is left set up), but its exit code is the baseline's status
        fail(str(e), code=EXIT[e.status])
    except Refused as e:
        fail(str(e), code=EXIT["refused"])
    except (CacheBroken, LedgerError) as e:
        fail(str(e), code=EXIT["error"])


BackendOption = typer.Option(None, "--backend", "-b", help="auto, cuda, mps or mlx (default: the one before the command)")
BudgetOption = typer.Option(None, "--budget", help="training seconds (default: the profile's 300)")
SeedOption = typer.Option(42, "--seed", help="AUTORESEARCH_SEED for train.py")
TimeoutOption = typer.Option(None, "--timeout", help="hard limit per run in seconds (default: budget + max(budget, 120))")
VerboseOption = typer.Option(False, "--verbose", "-v", help="print train.py's output as it runs")
GateOption = typer.Option("noise", "--gate", help="keep rule: greedy (any gain), noise (gain > k x spread), "
                          "seeds (up to S seeds, keep at confidence)")
KOption = typer.Option(2.0, "--k", help="noise and seeds gates: multiple of the run-to-run spread")
SeedsOption = typer.Option(3, "--seeds", help="seeds gate: most runs of one candidate")
ConfidenceOption = typer.Option(0.9, "--confidence", help="seeds gate: P(better) needed to keep")


def make_gate(kind, k, seeds, confidence):
    try:
        return Gate(kind, k, seeds, confidence)
    except ValueError as e:
        fail(str(e), code=EXIT["refused"])


@app.command("setup")
def setup_cmd(
    ctx: typer.Context,
    backend_opt: Optional[str] = BackendOption,
    tag: str = typer.Option(..., "--tag", "-t", help="run name, e.g. nov24; the branch is autoresearch/<tag>-<hardware>"),
    noise_runs: int = typer.Option(3, "--noise-runs", help="baseline seeds, to measure the run-to-run spread"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="size the model for this hardware first"),
    force_calibration: bool = typer.Option(False, "--force-calibration", help="measure again, ignoring the cache"),
    budget: Optional[float] = BudgetOption, seed: int = SeedOption, timeout: Optional[float] = TimeoutOption,
    verbose: bool = VerboseOption,
):
    """Create the run branch for this hardware and record the baseline (with its noise floor). A baseline that
    crashed or is invalid sets up nothing: one line, the exit code of its status (4 crash, 6 invalid)."""
    run = resolve_run(ctx, backend_opt, budget, seed=seed, timeout=timeout)
    live = LiveProgress(console, run.budget, "baseline", noise_runs, verbose)
    run_with_progress(setup, live, run=run, tag=tag, noise_runs=noise_runs, calibrate=calibrate,
                      force_calibration=force_calibration)


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    backend_opt: Optional[str] = BackendOption,
    message: str = typer.Option(..., "--message", "-m", help="what changed, one line"),
    budget: Optional[float] = BudgetOption, seed: int = SeedOption, timeout: Optional[float] = TimeoutOption,
    verbose: bool = VerboseOption, gate: str = GateOption, k: float = KOption, seeds: int = SeedsOption,
    confidence: float = ConfidenceOption,
):
    """One experiment: commit the edited train.py, train, keep (exit 0) or reset (3 discard, 4 crash, 6 invalid:
    caught breaking the rules; 2 refused; 5 the same program was already run; 1 error: the cache or the disk)."""
    run = resolve_run(ctx, backend_opt, budget, seed=seed, timeout=timeout, gate=make_gate(gate, k, seeds, confidence))
    live = LiveProgress(console, run.budget, "experiment", run.gate.most_runs(), verbose)
    run_with_progress(run_experiment, live, run=run, description=message)


AgentOption = typer.Option(..., "--agent", "-a", help="random (random search), tpe (Optuna's TPE over the "
                           "hyperparameter block, fitted to the series' rows), a preset (claude, codex, gemini, opencode: "
                           "`autoresearch agents` shows what each runs), or a command: prompt on stdin, or in place "
                           "of {prompt}")


@app.command("loop")
def loop_cmd(
    ctx: typer.Context,
    backend_opt: Optional[str] = BackendOption,
    agent: str = AgentOption,
    max_experiments: Optional[int] = typer.Option(None, "--max-experiments", "-n", help="stop after N agent turns"),
    agent_timeout: float = typer.Option(900, "--agent-timeout", help="seconds an agent may take per edit"),
    agent_seed: int = typer.Option(0, "--agent-seed", help="seed of the random or tpe agent"),
    max_failed: int = typer.Option(5, "--max-failed-turns", help="stop (exit 7) after N agent turns in a row "
                                   "without an experiment"),
    backoff: float = typer.Option(10.0, "--agent-backoff", help="seconds to wait after a failed agent turn, "
                                  "doubling with each more in a row (at most 600)"),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="stop once the cost the agent CLI reports "
                                             "(US dollars, all turns together) passes this"),
    budget: Optional[float] = BudgetOption, seed: int = SeedOption, timeout: Optional[float] = TimeoutOption,
    verbose: bool = VerboseOption, gate: str = GateOption, k: float = KOption, seeds: int = SeedsOption,
    confidence: float = ConfidenceOption,
):
    """Never stop: the agent edits train.py, the harness runs the experiment, repeat (Ctrl-C to end). Exit 7:
    stopped after --max-failed-turns agent turns in a row without an experiment (the last one's error said)."""
    run = resolve_run(ctx, backend_opt, budget, seed=seed, timeout=timeout, gate=make_gate(gate, k, seeds, confidence))
    try:
        rules = TurnRules(max_failed, backoff, max_cost, max_experiments, agent_timeout)
    except ValueError as e:
        fail(str(e), code=EXIT["refused"])
    missing = missing_binary(agent)
    if missing:
        fail(missing, code=EXIT["refused"])
    live = LiveProgress(console, run.budget, "experiment", run.gate.most_runs(), verbose)

    def on_event(text):
        live.close()
        print(plain(text), flush=True)
        turn = re.match(r"turn (\d+): agent edited", text)
        if turn:
            live.experiment(f"experiment {turn[1]}")

    try:
        outcomes = guarded(run_loop, run=run, agent=make_agent(agent, agent_seed), rules=rules, on_event=on_event,
                           on_line=live.line)
    except AgentBroken as e:
        live.close()
        fail(str(e), code=EXIT["agent"])
    finally:
        live.close()
    counts = {s: sum(o.status == s for o in outcomes) for s in ("keep", "discard", "crash", "invalid", "repeat")}
    print(f"loop ended: {len(outcomes)} experiments, " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command("agents")
def agents_cmd():
    """The agent presets `--agent NAME` expands to: the exact command each runs, how the prompt reaches it, what
    the harness reads from it, and how to install it."""
    for p in PRESETS.values():
        print(f"{p.name}: {p.command}")
        print(f"  prompt on {p.prompt_via}; {p.why}")
        print(f"  reads: {p.reports}; install: {p.install()}")


@app.command("swarm")
def swarm_cmd(
    ctx: typer.Context,
    backend_opt: Optional[str] = BackendOption,
    workers: int = typer.Option(2, "--workers", "-w", help="Ray actors, each with one GPU or a share of the CPU cores"),
    agent: str = AgentOption,
    address: Optional[str] = typer.Option(None, "--address", help="local (default: a Ray instance of this machine's), "
                                          "auto (the cluster this node joined with `ray start`), or ray://HOST:10001"),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="first set up the run branch "
                                      "autoresearch/<tag>-<the workers' hardware> on worker 0"),
    noise_runs: int = typer.Option(3, "--noise-runs", help="with --tag: baseline seeds, for the noise floor"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="with --tag: size the model for the "
                                   "workers' hardware first"),
    max_experiments: Optional[int] = typer.Option(None, "--max-experiments", "-n",
                                                  help="stop after N turns, all workers together"),
    agent_timeout: float = typer.Option(900, "--agent-timeout", help="seconds an agent may take per edit"),
    agent_seed: int = typer.Option(0, "--agent-seed", help="seed of worker 0's random or tpe agent (worker i: + i)"),
    restart_timeout: float = typer.Option(180, "--restart-timeout", help="seconds a worker that died has to be "
                                          "back (Ray restarts it) before it is given up"),
    budget: Optional[float] = BudgetOption, seed: int = SeedOption, timeout: Optional[float] = TimeoutOption,
    gate: str = GateOption, k: float = KOption, seeds: int = SeedsOption, confidence: float = ConfidenceOption,
):
    """Several workers run the loop on one run branch at once, on Ray; this checkout holds the merged branch and
    the one ledger, every row tagged with its worker (Ctrl-C to end)."""
    run = resolve_run(ctx, backend_opt, budget, seed=seed, timeout=timeout, gate=make_gate(gate, k, seeds, confidence))
    missing = missing_binary(agent) if address is None else None  # a cluster's nodes have their own PATH
    if missing:
        fail(missing, code=EXIT["refused"])
    try:
        plan = Plan(workers, agent, agent_seed, agent_timeout, max_experiments, address, tag, noise_runs, calibrate,
                    restart_timeout)
    except ValueError as e:
        fail(str(e), code=EXIT["refused"])
    try:
        rows = guarded(run_swarm, run=run, plan=plan, on_event=lambda line: print(plain(line), flush=True))
    except SwarmError as e:
        fail(str(e), code=EXIT["error"])
    counts = {s: sum(r.status == s for r in rows) for s in ("keep", "discard", "crash", "invalid", "lost")}
    print(f"swarm ended: {len(rows)} rows, " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command("calibrate")
def calibrate_cmd(
    ctx: typer.Context,
    backend_opt: Optional[str] = BackendOption,
    force: bool = typer.Option(False, "--force", help="measure again even if this hardware has a cached choice"),
    budget: Optional[float] = BudgetOption,
    time_limit: float = typer.Option(TIME_LIMIT, "--time-limit", help="seconds of training steps for the whole ladder (startup and compiling not counted)"),
):
    """Measure a ladder of model sizes here and pick the one for the budget (cached per hardware tag)."""
    run = resolve_run(ctx, backend_opt, budget)
    try:
        result, cached = calibrate(run.backend, root=run.root, force=force, budget=run.budget, time_limit=time_limit,
                                   on_line=lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True))
    except RuntimeError as e:
        fail(str(e))
    source = f"cached {result.measured_at}; --force to measure again" if cached else f"measured in {result.seconds:g}s"
    print(f"{result.hardware} ({result.eval_profile} profile, budget {result.budget:g}s): {result.config()} [{source}]")
    print(result.reason)


@app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    backend_opt: Optional[str] = BackendOption,
    runs: int = typer.Option(3, "--runs", help="fresh-seed re-runs of the best"),
    budget: Optional[float] = BudgetOption, seed: int = typer.Option(1000, "--seed", help="first fresh seed"),
    timeout: Optional[float] = TimeoutOption, verbose: bool = VerboseOption, k: float = KOption,
):
    """Re-run the branch's best with fresh seeds: does its recorded val_bpb hold? (exit 0 holds, 3 regressed)"""
    run = resolve_run(ctx, backend_opt, budget, seed=seed, timeout=timeout, gate=make_gate("noise", k, 3, 0.9))
    live = LiveProgress(console, run.budget, "verify", runs, verbose)
    run_with_progress(verify, live, run=run, runs=runs)


@app.command("results")
def results_cmd(
    path: Path = typer.Option(Path("results.tsv"), "--ledger", help="ledger file"),
    as_json: bool = typer.Option(False, "--json", help="a machine-readable summary on stdout"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the progress chart (PNG) here"),
    plateau: int = typer.Option(10, "--plateau", help="plateau: no keep in the last K experiments"),
):
    """Per hardware, eval profile and budget: baseline, best, keep rate, kept changes, plateau, throughput."""

    try:
        rows = read_ledger(path)
    except LedgerError as e:
        fail(str(e))
    if not rows:
        fail(f"{path}: no experiments yet (set up a run branch: autoresearch setup --tag TAG)")
    summary = results_summary(rows, plateau, root=path.resolve().parent, ledger=path)
    if plot is not None:
        try:
            plot_progress(series_of(rows), plot)
        except (ReportError, OSError) as e:
            fail(str(e))
    if as_json:
        print(json.dumps(finite(summary), indent=2, allow_nan=False))  # a NaN val_bpb is null: JSON has no NaN
    else:
        print_results(summary, Console())
        if plot is not None:
            print(plain(f"chart: {plot}"))


ledger_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The ledger, results.tsv.")
app.add_typer(ledger_app, name="ledger")

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks and cross-hardware reports.")
app.add_typer(bench_app, name="bench")


@bench_app.command("report")
def bench_report_cmd(
    sources: List[str] = typer.Argument(..., help="ledger files (results.tsv) or run branches of this repository"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="folder for report.md and progress.png"),
):
    """Merge ledgers and run branches (their rows from refs/notes/autoresearch) into DIR/report.md and
    DIR/progress.png: per-hardware table and the findings matrix of kept changes x hardware."""

    try:
        repo = git.Repo(Path.cwd(), search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        repo = None
    try:
        result = bench_report(sources, out, repo)
    except (ReportError, LedgerError, OSError) as e:
        fail(str(e))
    print(plain(f"{result['report']} ({len(result['rows'])} rows, {len(result['series'])} series, "
                f"{len(result['matrix'])} kept changes), {result['png']}"))


@app.command("transfer")
def transfer_cmd(
    ctx: typer.Context,
    from_branch: str = typer.Option(..., "--from", help="the run branch whose kept changes to replay here"),
    backend_opt: Optional[str] = BackendOption,
    budget: Optional[float] = typer.Option(None, "--budget", help="training seconds (default: this run branch's baseline's)"),
    seed: int = SeedOption, timeout: Optional[float] = TimeoutOption, verbose: bool = VerboseOption,
    gate: str = GateOption, k: float = KOption, seeds: int = SeedsOption, confidence: float = ConfidenceOption,
):
    """Replay another run branch's kept changes (oldest first) as experiments on this run branch."""

    run = resolve_run(ctx, backend_opt, budget, guarded(target_budget, root=repo_root()), seed=seed, timeout=timeout,
                      gate=make_gate(gate, k, seeds, confidence))
    live = LiveProgress(console, run.budget, "transfer", run.gate.most_runs(), verbose)

    def on_result(item):
        live.close()
        print(plain(f"{item.origin}: {item.outcome}: {item.message}"), flush=True)
        live.experiment("transfer")

    try:
        results = guarded(transfer, run=run, from_branch=from_branch, on_line=live.line, on_result=on_result)
    finally:
        live.close()
    if not results:
        print(plain(f"nothing to transfer: {from_branch} has no kept changes after its baseline"))
        return
    table = Table(title=plain_text(f"transfer from {from_branch}"), title_justify="left")
    for col in ("origin", "change", "outcome", "val_bpb", "commit here"):
        table.add_column(col)
    for item in results:
        ran = item.row is not None and item.outcome in ("keep", "discard", "crash")
        table.add_row(plain_text(item.origin), plain_text(item.description), plain_text(item.outcome),
                      f"{item.row.val_bpb:.6f}" if ran and item.outcome != "crash" else "-",
                      plain_text(item.row.commit) if ran else "-")
    Console().print(table)


@ledger_app.command("rebuild")
def ledger_rebuild_cmd():
    """Recreate results.tsv from the rows every commit carries in refs/notes/autoresearch."""
    root = repo_root()
    with Lock(root, "ledger rebuild"):
        repo = guarded(open_repo, root=root)
        n = guarded(rebuild_ledger, repo=repo, path=root / LEDGER_NAME)
        record.save(root)  # the user asked for the notes' rows: the harness's copy follows
    print(f"{LEDGER_NAME}: {n} rows rebuilt from refs/notes/autoresearch")


@app.command("dashboard")
def dashboard_cmd(
    sources: Optional[List[str]] = typer.Argument(None, help="ledger files or run branches (default: this checkout's "
                                                  "results.tsv and run branches)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port to listen on (0: any free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; another than loopback lets others read it"),
):
    """A local, read-only live page: progress charts, ledgers, kept diffs, the run in flight, the findings matrix."""
    try:
        serve(sources or None, host, port)
    except DashboardError as e:
        fail(str(e))


def main():
    handle_signals()
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted (SIGINT)")
        sys.exit(130)
    except Interrupted as e:  # SIGTERM, SIGHUP: the same clean-up as Ctrl-C on the way out
        console.print(str(e), markup=False)
        sys.exit(128 + e.signum)
