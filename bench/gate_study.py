"""
Gate study: how far does the recorded best regress when re-run, under the greedy gate (upstream's
keep-if-lower) and under the noise gate (keep only gains beyond k x the measured spread)?

In a scratch git repository (a copy of this project): two run branches from the same commit, each
set up with a 3-seed baseline (the noise floor), then the random agent with the same seed for N
experiments under each gate, then `verify` of each branch's best with 3 fresh seeds.

    AUTORESEARCH_CACHE=/tmp/bench autoresearch prepare --source ../shared/data/mixed-en --profile cpu
    AUTORESEARCH_CACHE=/tmp/bench python bench/gate_study.py --backend mlx --budget 20 -n 8 > bench/gate_study.md
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import git

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.agents import RandomAgent  # noqa: E402
from autoresearch.experiment import setup, verify  # noqa: E402
from autoresearch.gate import Gate, load_noise  # noqa: E402
from autoresearch.hardware import hardware_tag  # noqa: E402
from autoresearch.ledger import read_ledger  # noqa: E402
from autoresearch.loop import TurnRules, run_loop  # noqa: E402
from autoresearch.settings import Run  # noqa: E402


def scratch_repo(backend):
    root = Path(tempfile.mkdtemp(prefix="gate-study-"))
    for name in ("prepare.py", "program.md"):
        shutil.copy2(ROOT / name, root / name)
    (root / "backends" / backend).mkdir(parents=True)
    shutil.copy2(ROOT / "backends" / backend / "train.py", root / "backends" / backend / "train.py")
    repo = git.Repo.init(root, initial_branch="main")
    repo.git.add(A=True)
    repo.index.commit("project")
    return root, repo


def log(text):
    print(text, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--budget", type=float, default=20)
    parser.add_argument("-n", "--experiments", type=int, default=8)
    parser.add_argument("--agent-seed", type=int, default=7)
    args = parser.parse_args()
    root, repo = scratch_repo(args.backend)
    gates = {"greedy": Gate("greedy"), "noise": Gate("noise", k=2)}
    summary = {}
    for name, gate in gates.items():
        repo.git.checkout("main")
        start = time.time()
        run = Run.resolve(root, args.backend, args.budget, gate=gate)
        base = setup(run, f"{name}", noise_runs=3, calibrate=True)
        log(f"{name}: {base.message}")
        branch = repo.active_branch.name
        noise = load_noise(root, hardware_tag(args.backend), base.row.eval_profile, args.budget)
        outcomes = run_loop(run, RandomAgent(args.agent_seed), TurnRules(max_experiments=args.experiments),
                            on_event=lambda t: log(f"{name}: {t}"))
        check = verify(Run.resolve(root, args.backend, args.budget, seed=1000, gate=Gate("noise", k=2)), runs=3)
        log(f"{name}: {check.message}")
        rows = [r for r in read_ledger(root / "results.tsv") if r.branch == branch]
        kept = [r for r in rows if r.status == "keep"]
        best = min(kept, key=lambda r: r.val_bpb)
        rerun = rows[-1]
        summary[name] = dict(branch=branch, spread=noise["spread"], baseline=rows[0].val_bpb,
                             experiments=sum(o.status != "repeat" for o in outcomes),
                             repeats=sum(o.status == "repeat" for o in outcomes), keeps=len(kept) - 1,
                             best=best.val_bpb, rerun=rerun.val_bpb, rerun_samples=rerun.samples,
                             verdict=check.status, minutes=(time.time() - start) / 60, config=rows[0].config)
    print(f"# Gate study: {args.backend} on {hardware_tag(args.backend)}\n")
    print(f"Budget {args.budget:g} s per run, {args.experiments} random-agent turns per gate (agent seed "
          f"{args.agent_seed}), calibrated config `{summary['greedy']['config']}`, {time.strftime('%Y-%m-%d')}.\n")
    print("| gate | noise floor (spread) | baseline | experiments | keeps | recorded best | re-run mean (3 fresh seeds) "
          "| regression | verify | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {gates[name].label()} | {s['spread']:.4f} | {s['baseline']:.4f} | {s['experiments']} | {s['keeps']} | "
              f"{s['best']:.4f} | {s['rerun']:.4f} ({s['rerun_samples']}) | {s['rerun'] - s['best']:+.4f} | "
              f"{s['verdict']} | {s['minutes']:.1f} |")
    print("\nRegression = re-run mean minus the recorded best (positive: the recorded best was optimistic). "
          "Improvement over baseline that holds on re-run: " + ", ".join(
              f"{name} {s['baseline'] - s['rerun']:+.4f}" for name, s in summary.items()) + ".")
    print(f"\nReproduce: `AUTORESEARCH_CACHE=<cpu-profile cache of ../shared/data/mixed-en> python bench/gate_study.py "
          f"--backend {args.backend} --budget {args.budget:g} -n {args.experiments} --agent-seed {args.agent_seed}`")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
