"""
Search study: does TPE beat random search here, and by more than the noise? (and, with --agent CMD, any agent
against both)

One run branch is set up once on one core (sized by calibration for the budget there, then a 3-seed baseline: the
noise floor). Each arm (random, tpe, CMD) and
each repeat (another agent seed) gets a copy of that checkout, so every arm starts from the same baseline row
and noise floor, and runs `autoresearch loop -n N` pinned to one core. Arms run side by side, one per core, so
whatever else loads the machine loads them alike. Afterwards every keep is run once more with a fresh seed
(`verify`'s rule: it holds where the re-run is within k x the spread of what it recorded), one checkout per core.

    AUTORESEARCH_CACHE=/tmp/search autoresearch prepare --source ../shared/data/mixed-en --profile cpu --val-fraction 0.2
    AUTORESEARCH_CACHE=/tmp/search python bench/search.py --budget 20 -n 24 > bench/search.md
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import git

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.gate import load_noise  # noqa: E402
from autoresearch.ledger import read_ledger  # noqa: E402


def log(text):
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def harness(root, core, *args, timeout=None):
    """The real CLI in checkout root, pinned to one core with one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-m", "autoresearch", "--backend", "mlx",
                             *map(str, args)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc, what):
    out, _ = proc.communicate()
    if proc.returncode not in (0, 3, 4, 5, 6):
        log(f"{what}: exit {proc.returncode}\n{out[-3000:]}")
        raise SystemExit(1)
    return out


def scratch_repo():
    root = Path(tempfile.mkdtemp(prefix="search-study-")) / "base"
    root.mkdir()
    for name in ("prepare.py", "program.md", "pyproject.toml"):
        shutil.copy2(ROOT / name, root / name)
    shutil.copytree(ROOT / "backends", root / "backends")
    repo = git.Repo.init(root, initial_branch="main")
    repo.git.add(A=True)
    repo.index.commit("project")
    return root


def in_parallel(jobs, cores):
    """jobs: [(label, root, args)], run cores at a time, one per core; their outputs by label."""
    outputs, pending = {}, list(jobs)
    while pending:
        wave, pending = pending[:cores], pending[cores:]
        procs = [(label, harness(root, core, *args)) for core, (label, root, args) in enumerate(wave)]
        for label, proc in procs:
            outputs[label] = finish(proc, label)
            log(f"{label}: done")
    return outputs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=20)
    parser.add_argument("-n", "--experiments", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--agent", action="append", default=[], help="another arm: an agent command or preset")
    parser.add_argument("--k", type=float, default=2.0, help="the noise gate's k, and verify's")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="the file's sizes, not the ones calibrated for the budget on one core")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    started = time.time()
    base = scratch_repo()
    proc = harness(base, 0, "setup", "--tag", "search", "--budget", args.budget, "--noise-runs", 3,
                   *(() if args.calibrate else ("--no-calibrate",)))
    log(finish(proc, "setup").strip().splitlines()[-1])
    repo = git.Repo(base)
    branch = repo.active_branch.name
    baseline = read_ledger(base / "results.tsv")[0]
    arms = ["random", "tpe", *args.agent]
    runs = {}
    for repeat in range(args.repeats):
        for arm in arms:
            root = base.parent / f"{arm.split()[0].replace('/', '_')}-{repeat}"
            shutil.copytree(base, root, symlinks=True)
            runs[(arm, repeat)] = root
    jobs = [(f"{arm} repeat {repeat}", root, ("loop", "--agent", arm, "--agent-seed", 100 + repeat,
                                             "-n", args.experiments, "--budget", args.budget, "--k", args.k))
            for (arm, repeat), root in runs.items()]
    in_parallel(jobs, cores)
    # every keep once more with a fresh seed, in its own copy so the copies run side by side
    spread = load_noise(base, baseline.hardware, baseline.eval_profile, args.budget)["spread"]
    checks = []
    for (arm, repeat), root in runs.items():
        rows = [r for r in read_ledger(root / "results.tsv") if r.branch == branch]
        for i, r in enumerate(rows):
            if r.status != "keep" or r.description == "baseline":
                continue
            # a copy at the keep, its ledger cut there: the keep is its branch's best, as verify needs
            copy = root.parent / f"check-{arm.split()[0]}-{repeat}-{r.commit}"
            shutil.copytree(root, copy, symlinks=True)
            git.Repo(copy).git.reset("-q", "--hard", r.commit)
            ledger = copy / "results.tsv"
            ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[: i + 2]))
            checks.append((arm, repeat, r, copy))
    in_parallel([(f"verify {arm} {repeat} {r.commit}", copy,
                  ("verify", "--runs", 1, "--budget", args.budget, "--seed", 9000 + i, "--k", args.k))
                 for i, (arm, repeat, r, copy) in enumerate(checks)], cores)
    print(report(args, baseline, spread, branch, runs, checks, time.time() - started))


def rerun_value(copy, commit):
    """The re-run's val_bpb: the verify row of the check copy's ledger, None where it crashed (no row)."""
    last = read_ledger(copy / "results.tsv")[-1]
    return last.val_bpb if last.status == "verify" and last.commit == commit else None


def report(args, baseline, spread, branch, runs, checks, seconds):
    k = args.k
    lines = [f"# Search study: random against TPE on {baseline.hardware}", "",
             f"`AUTORESEARCH_CACHE=... python bench/search.py --budget {args.budget:g} -n {args.experiments}"
             f"{''.join(f' --agent {a!r}' for a in args.agent)}` on the development machine, "
             f"{time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} minutes in all.", "",
             f"One baseline (commit {baseline.commit}, val_bpb {baseline.val_bpb:.6f}, holdout "
             f"{baseline.holdout_bpb:.6f}; noise floor: spread {spread:.6f} over 3 seeds), profile "
             f"{baseline.eval_profile}, budget {args.budget:g} s, one core per arm, the noise gate (k = {k:g}). "
             f"Each arm x repeat: {args.experiments} agent turns from that baseline; repeats differ in the agent's "
             f"seed. A keep holds when one re-run with a fresh seed lands within k x spread = {k * spread:.6f} of "
             "what it recorded (`verify`'s rule).", "",
             "| arm | repeat | experiments | keeps | keeps that hold | best val_bpb | its holdout | gain on val | "
             "gain on holdout |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_arm = {}
    for (arm, repeat), root in runs.items():
        rows = [r for r in read_ledger(root / "results.tsv") if r.branch == branch and r.description != "baseline"]
        kept = [r for r in rows if r.status == "keep"]
        holding = 0
        for a, rep, r, copy in checks:
            if (a, rep) == (arm, repeat):
                value = rerun_value(copy, r.commit)
                holding += value is not None and value - r.val_bpb <= k * spread
        best = min(kept + [baseline], key=lambda r: r.val_bpb)
        by_arm.setdefault(arm, []).append(best)
        lines.append(f"| {arm} | {repeat + 1} | {len(rows)} | {len(kept)} | {holding} | {best.val_bpb:.6f} | "
                     f"{best.holdout_bpb:.6f} | {baseline.val_bpb - best.val_bpb:+.6f} | "
                     f"{baseline.holdout_bpb - best.holdout_bpb:+.6f} |")
    lines += ["", "| arm | mean best val_bpb | mean its holdout |", "|---|---:|---:|"]
    for arm, bests in by_arm.items():
        lines.append(f"| {arm} | {statistics.fmean(b.val_bpb for b in bests):.6f} | "
                     f"{statistics.fmean(b.holdout_bpb for b in bests):.6f} |")
    if "random" in by_arm and "tpe" in by_arm:
        gap = statistics.fmean(b.val_bpb for b in by_arm["random"]) - statistics.fmean(b.val_bpb for b in by_arm["tpe"])
        held = (statistics.fmean(b.holdout_bpb for b in by_arm["random"])
                - statistics.fmean(b.holdout_bpb for b in by_arm["tpe"]))
        verdict = "beat" if gap > k * spread else "did not beat"
        lines += ["", f"**TPE {verdict} random by more than the noise floor here**: its mean best val_bpb is "
                  f"{gap:+.6f} lower (on the holdout: {held:+.6f}) against k x spread = {k * spread:.6f}."]
    lines += ["", "```", json.dumps({f"{a} {r}": str(p) for (a, r), p in runs.items()}, indent=1), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
