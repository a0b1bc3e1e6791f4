"""
Benchmark: what the sandbox and the referee's checks cost per experiment, measured both ways side by side.

- process start: `python -c pass` bare and under the trainer's bubblewrap policy (median of interleaved runs);
- the agent's turn: making and removing its scratch clone of this checkout;
- the checks around a run: the Watch's snapshot and comparison (git's control files, every file of the checkout,
  the fixed half on disk), the record's check;
- a whole experiment's time outside training (wall time - the harness-timed training): the trainer and the
  evaluator under bwrap against --sandbox off, interleaved A B A B at the same budget, seed and config, after one
  warm-up run each (MLX's compiled kernels cached on disk: /tmp/mlx unsandboxed, the compile cache in bwrap).

Usage: AUTORESEARCH_CACHE=/tmp/bench python bench/sandbox.py [--budget 5] [--repeats 3] [--out bench/sandbox.md]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import git  # noqa: E402

from autoresearch import record, sandbox  # noqa: E402
from autoresearch.agents import scratch_clone  # noqa: E402
from autoresearch.branch import disk_changes, git_control_files  # noqa: E402
from autoresearch.experiment import checkout_files, train_and_evaluate  # noqa: E402
from autoresearch.hparams import set_constants  # noqa: E402
from autoresearch.runner import trainer_policy  # noqa: E402
from autoresearch.settings import Run  # noqa: E402

TINY = {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": 8, "TOTAL_BATCH_SIZE": 2048}


def timed(fn, n):
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def process_start(n):
    box = sandbox.resolve("require")
    bare = [sys.executable, "-c", "pass"]
    wrapped, _ = box.wrap(bare, ROOT, trainer_policy(ROOT, {}))
    a, b = [], []
    for _ in range(n):  # interleaved, so load falls on both alike
        a.append(timed(lambda: subprocess.run(bare, check=True), 1))
        b.append(timed(lambda: subprocess.run(wrapped, check=True), 1))
    return statistics.median(a), statistics.median(b)


def clone_and_remove(root):
    with scratch_clone(root):
        pass


def checks(root):
    repo = git.Repo(root)
    return {"Watch snapshot (git control files, checkout files)": timed(lambda: (git_control_files(repo),
                                                                                checkout_files(root)), 5),
            "fixed half on disk (every tracked file hashed)": timed(lambda: disk_changes(repo), 5),
            "record check (ledger, noise floor)": timed(lambda: record.check(root), 5),
            "agent scratch clone (made and removed)": timed(lambda: clone_and_remove(root), 3)}


def outside_training(root, budget, mode):
    sandbox.use(mode)
    start = time.perf_counter()
    result, ev, stop = train_and_evaluate(Run.resolve(root, "mlx", budget), seed=42)
    wall = time.perf_counter() - start
    assert stop is None and ev.status == "ok", (stop, ev and ev.reason)
    training, _ = result.measured_training()
    return wall - training


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "sandbox.md"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(scratch / "project")], check=True)
    root = scratch / "project"
    train = root / "backends" / "mlx" / "train.py"
    train.write_text(set_constants(train.read_text(), TINY))
    bare, wrapped = process_start(20)
    costs = checks(root)
    rows = {"off": [], "bwrap": []}
    for mode in ("off", "auto"):  # warm-up: each arm's compile cache filled once, so neither pays a cold compile
        outside_training(root, args.budget, mode)
    for _ in range(args.repeats):
        for mode in ("off", "auto"):
            rows["off" if mode == "off" else "bwrap"].append(outside_training(root, args.budget, mode))
    off, on = statistics.median(rows["off"]), statistics.median(rows["bwrap"])
    lines = ["# The sandbox's cost", "", f"`{' '.join(sys.argv)}`, on {sandbox.resolve('auto').reason}.", "",
             "| what | seconds |", "|---|---:|",
             f"| `python -c pass` bare (median of 20, interleaved) | {bare:.3f} |",
             f"| the same under the trainer's bwrap policy | {wrapped:.3f} |",
             f"| bwrap's start | {wrapped - bare:+.3f} |"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in costs.items()]
    lines += ["", f"A whole experiment's time outside training (MLX, tiny config, {args.budget:g} s budget, "
              f"{args.repeats} interleaved pairs, median): trainer start, evaluator start, model build, scoring, "
              "probes, exits.", "", "| sandbox | seconds outside training | each run |", "|---|---:|---|",
              f"| off | {off:.2f} | {', '.join(f'{x:.2f}' for x in rows['off'])} |",
              f"| bwrap | {on:.2f} | {', '.join(f'{x:.2f}' for x in rows['bwrap'])} |",
              f"| difference | {on - off:+.2f} | |"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
