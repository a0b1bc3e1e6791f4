"""
Benchmark: experiments per hour of `autoresearch swarm` with 1 worker against 2 workers, side by side on this machine.

Each arm is a fresh scratch checkout (prepare.py, program.md and one backend's train.py at the sizes below), set up by
the swarm itself on worker 0 (`--tag`, one baseline seed: the workers' own hardware, since a worker of two has half
the cores), then driven with the random agent for --experiments turns. Experiments per hour = rows measured by the
workers / (last row's time - the baseline row's time) x 3600: setup is not counted, Ray's start is. The arms run one
after the other on an otherwise idle machine; the ledger of each is kept in --out for its excerpt.

Usage: AUTORESEARCH_CACHE=/tmp/bench python bench/swarm.py [--budget 30] [--experiments 8] [--backend mlx]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import git

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.hparams import set_constants  # noqa: E402
from autoresearch.ledger import read_ledger, row_time  # noqa: E402

# a small model, so that a 30 s budget trains it to a real loss on one core
SIZES = {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": 8, "TOTAL_BATCH_SIZE": 4096}


def scratch(dest, backend):
    """A checkout of the fixed half and one backend, committed on main."""
    (dest / "backends" / backend).mkdir(parents=True)
    for name in ("prepare.py", "program.md"):
        shutil.copy2(ROOT / name, dest / name)
    train = dest / "backends" / backend / "train.py"
    train.write_text(set_constants((ROOT / "backends" / backend / "train.py").read_text(), SIZES))
    repo = git.Repo.init(dest, initial_branch="main")
    repo.git.add(A=True)
    with repo.git.custom_environment(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                                     GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost"):
        repo.index.commit("bench")
    return dest


def arm(workers, args, out):
    with tempfile.TemporaryDirectory() as tmp:
        root = scratch(Path(tmp) / "project", args.backend)
        command = [sys.executable, "-m", "autoresearch", "--backend", args.backend, "swarm", "--workers", str(workers),
                   "--agent", "random", "--tag", f"w{workers}", "--noise-runs", "1", "--no-calibrate",
                   "--budget", str(args.budget), "-n", str(args.experiments), "--gate", args.gate]
        started = time.time()
        done = subprocess.run(command, cwd=root, capture_output=True, text=True)
        wall = time.time() - started
        if done.returncode != 0:
            raise SystemExit(f"{workers} worker(s): exit {done.returncode}\n{done.stdout}\n{done.stderr}")
        rows = read_ledger(root / "results.tsv")
        shutil.copy2(root / "results.tsv", out / f"swarm-{workers}w-results.tsv")
        (out / f"swarm-{workers}w.log").write_text(done.stdout)
    base = next(r for r in rows if r.description == "baseline")
    measured = [r for r in rows if r.worker != "-" and r.status != "lost"]
    span = row_time(rows[-1]) - row_time(base)
    return {"workers": workers, "experiments": len(measured), "span": span, "wall": wall,
            "per_hour": len(measured) / span * 3600, "hardware": base.hardware,
            "best": min(r.val_bpb for r in rows if r.status == "keep"), "baseline": base.val_bpb}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=30)
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--gate", default="greedy")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-swarm")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [arm(n, args, args.out) for n in (1, 2)]
    print(f"budget {args.budget:g}s, {args.experiments} experiments per arm, backend {args.backend}, "
          f"random agent, gate {args.gate}\n")
    print("| workers | hardware (per worker) | experiments | span (s) | experiments/hour | baseline | best |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']} | {r['hardware']} | {r['experiments']} | {r['span']:.0f} | {r['per_hour']:.1f} | "
              f"{r['baseline']:.4f} | {r['best']:.4f} |")
    print(f"\n2 workers / 1 worker: {results[1]['per_hour'] / results[0]['per_hour']:.2f}x experiments per hour "
          f"(ledgers and logs in {args.out})")


if __name__ == "__main__":
    main()
