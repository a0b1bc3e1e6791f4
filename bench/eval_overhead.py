"""
Benchmark: what evaluation costs on top of training, per backend, the old way and the harness's way, side by side.

old: train.py as it was before the harness took evaluation over (`git show 18555fb:backends/<B>/train.py`, in a
     scratch checkout with today's prepare.py): it trains, then scores itself in-process (evaluate_bpb over its own
     per_token_loss) and prints val_bpb.
new: today's train.py trains and saves its checkpoint (with AUTORESEARCH_CACHE at the trainer's view);
     autoresearch.evaluate.evaluate() scores it in a fresh process: interpreter start, imports, model build, every
     validation row, the purity and causality probes.
Both train the same configuration (this CPU's calibrated depth) for the same budget from the same seed. The
overhead is the wall time of everything but training: old = the run's wall time - training_seconds; new = the same
for train.py, plus the evaluation's wall time. Each configuration is warmed up first (two steps), so compiled
kernels cached on disk favour neither side; the variants of a backend run back to back.

Usage: AUTORESEARCH_CACHE=/tmp/bench python bench/eval_overhead.py [--budget 30] [--backends mlx mps cuda]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from autoresearch.evaluate import evaluate  # noqa: E402
from autoresearch.hparams import set_constants  # noqa: E402
from autoresearch.runner import run_training  # noqa: E402

OLD_COMMIT = "18555fb"  # the last commit whose train.py files evaluate themselves
# the calibrated picks on the development machine's CPU (bench/calibration_study.md; the DEPTH 2 for MLX)
CONFIGS = {"mlx": {"DEPTH": 2}, "mps": {"DEPTH": 3}, "cuda": {"DEPTH": 3, "TOTAL_BATCH_SIZE": 8192, "DEVICE_BATCH_SIZE": 32}}
PHASES = re.compile(r"^startup: ([0-9.]+)s \| (evaluation|checkpoint): ([0-9.]+)s$", re.M)


def checkout(backend, source):
    root = Path(tempfile.mkdtemp(prefix=f"eval-overhead-{backend}-"))
    shutil.copy2(ROOT / "prepare.py", root / "prepare.py")
    (root / "backends" / backend).mkdir(parents=True)
    (root / "backends" / backend / "train.py").write_text(set_constants(source, CONFIGS[backend]))
    return root


def timed_run(backend, root, budget, env=None):
    start = time.time()
    result = run_training(backend, budget=budget, root=root, env=env)
    wall = time.time() - start
    if result.returncode != 0 or result.summary is None:
        sys.exit(f"{backend} in {root} failed:\n{result.tail(20)}")
    phases = PHASES.search(result.log)
    return result.summary, wall, float(phases.group(1)), float(phases.group(3))


def measure(backend, budget):
    old_source = subprocess.run(["git", "show", f"{OLD_COMMIT}:backends/{backend}/train.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    old_root, new_root = checkout(backend, old_source), checkout(backend, (ROOT / "backends" / backend / "train.py").read_text())
    view = prepare.trainer_view()
    env = dict(os.environ, AUTORESEARCH_CACHE=str(view), AUTORESEARCH_CHECKPOINT=str(new_root / "checkpoint"))
    for root, run_env in ((old_root, None), (new_root, env)):  # warm-up: compiled kernels land in the disk caches
        warm = dict(run_env or os.environ, AUTORESEARCH_CALIBRATE_STEPS="1")
        run_training(backend, budget=budget, root=root, env=warm)
    s, wall, startup, seconds = timed_run(backend, old_root, budget)
    old = dict(val_bpb=s["val_bpb"], steps=s["num_steps"], startup=startup, eval=seconds, wall=wall - s["training_seconds"],
               own=s["total_seconds"] - s["training_seconds"])
    s, wall, startup, seconds = timed_run(backend, new_root, budget, env)
    result = evaluate(backend, new_root, new_root / "checkpoint")
    if result.status != "ok":
        sys.exit(f"{backend}: evaluation {result.status}: {result.reason}\n{result.log[-3000:]}")
    built = float(re.search(r"model built in ([0-9.]+)s", result.log).group(1))
    scored = float(re.search(r"rows scored in ([0-9.]+)s", result.reason).group(1))
    new = dict(val_bpb=result.val_bpb, steps=s["num_steps"], startup=startup, eval=result.seconds, built=built,
               scored=scored, wall=wall - s["training_seconds"] + result.seconds,
               own=s["total_seconds"] - s["training_seconds"] + result.seconds)
    for root in (old_root, new_root):
        shutil.rmtree(root, ignore_errors=True)
    return old, new


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=30)
    parser.add_argument("--backends", nargs="+", default=["mlx", "mps", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    profile = prepare.load_profile()
    load = os.getloadavg()[0]
    rows = []
    for backend in args.backends:
        old, new = measure(backend, args.budget)
        config = ", ".join(f"{k} {v}" for k, v in CONFIGS[backend].items())
        rows.append(f"| {backend} ({config}) | {old['startup']:.1f} | {old['eval']:.1f} | **{old['wall']:.1f}** "
                    f"({old['own']:.1f}) | {new['startup']:.1f} | {new['eval']:.1f} = {new['built']:.1f} build + "
                    f"{new['scored']:.1f} scoring + {new['eval'] - new['built'] - new['scored']:.1f} other | "
                    f"**{new['wall']:.1f}** ({new['own']:.1f}) | {old['val_bpb']:.4f} / {new['val_bpb']:.4f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    table = "\n".join([
        f"Eval profile `{profile.name}` ({profile.eval_tokens:,} eval tokens), budget {args.budget:g} s, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, load average {load:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end. Seconds.",
        "",
        "| backend | old: startup | old: evaluation | old: overhead (train.py's own) | new: train.py startup | "
        "new: harness evaluation | new: overhead (train.py's own + evaluation) | val_bpb old / new |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
