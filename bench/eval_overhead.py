"""
Benchmark: what evaluation costs on top of training, per backend: the scoring protocol before and after issue 23,
side by side on the same checkpoints.

before: the harness's evaluator at BEFORE_COMMIT (one child process computes the nats; purity and causality
        probes on the first chunk's rows, in the same process, after the scoring rows);
after:  today's (two child processes return logits through shared memory; the harness computes the nats, and
        compares full log-probability vectors of PROBE_ROWS rows between the scoring and a fresh reference process).
Each backend trains once (this CPU's calibrated depth, the budget below); each arm then scores that checkpoint
REPEATS times, the arms interleaved (before, after, before, after, ...), each in a fresh interpreter of its own
tree (a git worktree of BEFORE_COMMIT for the first), on the same cache and validation rows. Reported: train.py's
own overhead (the training run's wall time - its training_seconds: interpreter, imports, model build, compile,
saving the checkpoint), the median wall time of evaluate() per arm, their sum for today's (everything but
training, against the 5 % = 15 s target of the 300 s budget), and the val_bpb of each arm.

Usage: AUTORESEARCH_CACHE=/tmp/bench python bench/eval_overhead.py [--budget 20] [--backends mlx mps cuda]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from autoresearch.hparams import set_constants  # noqa: E402
from autoresearch.runner import run_training  # noqa: E402

BEFORE_COMMIT = "02fde75"  # the last commit whose evaluator computed the loss in the model's process
CONFIGS = {"mlx": {"DEPTH": 2}, "mps": {"DEPTH": 3}, "cuda": {"DEPTH": 3, "TOTAL_BATCH_SIZE": 8192, "DEVICE_BATCH_SIZE": 32}}
ARM = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from autoresearch.evaluate import evaluate
start = time.time()
result = evaluate(sys.argv[2], sys.argv[3], sys.argv[4], timeout=900)
print(json.dumps({"status": result.status, "val_bpb": result.val_bpb, "seconds": time.time() - start,
                  "reason": result.reason}))
"""


def trained(backend, budget):
    root = Path(tempfile.mkdtemp(prefix=f"eval-protocol-{backend}-"))
    shutil.copy2(ROOT / "prepare.py", root / "prepare.py")
    (root / "backends" / backend).mkdir(parents=True)
    source = (ROOT / "backends" / backend / "train.py").read_text()
    (root / "backends" / backend / "train.py").write_text(set_constants(source, CONFIGS[backend]))
    env = dict(os.environ, AUTORESEARCH_CACHE=str(prepare.trainer_view()), AUTORESEARCH_CHECKPOINT=str(root / "ckpt"))
    warm = dict(env, AUTORESEARCH_CALIBRATE_STEPS="1")  # compiled kernels land in the disk caches first
    run_training(backend, budget=budget, root=root, env=warm)
    start = time.time()
    result = run_training(backend, budget=budget, root=root, env=env)
    if result.returncode != 0 or result.summary is None:
        sys.exit(f"{backend}: training failed:\n{result.tail(20)}")
    return root, time.time() - start - result.summary["training_seconds"]


def score(tree, backend, root):
    done = subprocess.run([sys.executable, "-c", ARM, str(tree), backend, str(root), str(root / "ckpt")], cwd=tree,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{backend} in {tree}: {done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["status"] != "ok":
        sys.exit(f"{backend} in {tree}: {out['status']}: {out['reason']}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["mlx", "mps", "cuda"])
    args = parser.parse_args()
    before = Path(tempfile.mkdtemp(prefix="eval-before-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), BEFORE_COMMIT], cwd=ROOT, check=True,
                   capture_output=True)
    load = os.getloadavg()[0]
    lines = []
    try:
        for backend in args.backends:
            root, own = trained(backend, args.budget)
            runs = {"before": [], "after": []}
            for _ in range(args.repeats):
                for arm, tree in (("before", before), ("after", ROOT)):
                    runs[arm].append(score(tree, backend, root))
            b, a = ({k: [r[k] for r in runs[arm]] for k in ("seconds", "val_bpb")} for arm in ("before", "after"))
            after = statistics.median(a["seconds"])
            config = ", ".join(f"{k} {v}" for k, v in CONFIGS[backend].items())
            lines.append(f"| {backend} ({config}) | {own:.1f} | {statistics.median(b['seconds']):.1f} | {after:.1f} "
                         f"| {after / statistics.median(b['seconds']):.2f} | **{own + after:.1f}** | "
                         f"{b['val_bpb'][0]:.6f} | {a['val_bpb'][0]:.6f} | {max(a['val_bpb']) - min(a['val_bpb']):.1e} |")
            print(lines[-1], file=sys.stderr, flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    profile = prepare.load_profile()
    print(f"Eval profile `{profile.name}` ({profile.eval_tokens:,} eval tokens), {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end; "
          f"median of {args.repeats} interleaved evaluations per arm, seconds.\n")
    print("| backend | train.py's overhead | before: evaluate() | after: evaluate() | after / before | "
          "after: total - training | val_bpb before | val_bpb after | spread of after's val_bpb |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
