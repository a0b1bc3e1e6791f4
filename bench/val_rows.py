"""
Benchmark: what the validation rows do to val_bpb and the noise floor, the same checkpoints scored on two sets.

old: a cache whose val_rows.npy was packed by the cycling packer (before issue 23: mixed-en at the cpu profile,
     256 rows of which 24 distinct);
new: a cache prepared today from the same source and profile (the same tokenizer: token_bytes hashes must match),
     whose rows come from one pass over the split.
The baseline train.py (this machine's calibrated sizes, as the branch's setup committed them) trains SEEDS times on
the new cache's trainer view; each checkpoint is scored by the harness's evaluator on both caches' rows. Reported
per set: distinct rows, the first seed's val_bpb (what setup records as the baseline) and the spread over the
seeds (the noise floor, gate.spread). Training load touches both sets alike: they score the same weights.

Usage: python bench/val_rows.py --old /tmp/arcache --new /tmp/valcache --config DEPTH=3,TOTAL_BATCH_SIZE=4096,...
       [--budget 120] [--seeds 3]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from autoresearch.evaluate import evaluate  # noqa: E402
from autoresearch.gate import spread  # noqa: E402
from autoresearch.hparams import set_constants  # noqa: E402
from autoresearch.runner import run_training  # noqa: E402


def distinct(cache):
    rows = np.load(Path(cache) / "tokens" / "val_rows.npy")
    return len(rows), len(np.unique(rows, axis=0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--config", required=True, help="NAME=VALUE,... the calibrated constants")
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--budget", type=float, default=120)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    hashes = {json.loads((c / "profile.json").read_text())["token_bytes_sha256"] for c in (args.old, args.new)}
    if len(hashes) != 1:
        sys.exit("the two caches have different tokenizers: their scores would not compare")
    sizes = {k: int(v) for k, v in (item.split("=") for item in args.config.split(","))}
    root = Path(tempfile.mkdtemp(prefix="val-rows-"))
    shutil.copy2(ROOT / "prepare.py", root / "prepare.py")
    (root / "backends" / args.backend).mkdir(parents=True)
    source = (ROOT / "backends" / args.backend / "train.py").read_text()
    (root / "backends" / args.backend / "train.py").write_text(set_constants(source, sizes))
    scores = {"old": [], "new": []}
    load = os.getloadavg()[0]
    for seed in range(1, args.seeds + 1):
        os.environ["AUTORESEARCH_CACHE"] = str(args.new)
        env = dict(os.environ, AUTORESEARCH_CACHE=str(prepare.trainer_view()), AUTORESEARCH_CHECKPOINT=str(root / "ckpt"))
        result = run_training(args.backend, budget=args.budget, seed=seed, root=root, env=env)
        if result.returncode != 0 or result.summary is None:
            sys.exit(f"seed {seed}: training failed:\n{result.tail(20)}")
        for name, cache in (("old", args.old), ("new", args.new)):
            os.environ["AUTORESEARCH_CACHE"] = str(cache)
            ev = evaluate(args.backend, root, root / "ckpt", timeout=900)
            if ev.status != "ok":
                sys.exit(f"seed {seed} on {name}: {ev.status}: {ev.reason}")
            scores[name].append(ev.val_bpb)
        print(f"seed {seed}: {result.summary.get('num_steps')} steps; old {scores['old'][-1]:.6f}, "
              f"new {scores['new'][-1]:.6f}", file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{args.backend}, {args.config}, budget {args.budget:g} s, {args.seeds} seeds, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end.\n")
    print("| validation rows | rows (distinct) | baseline val_bpb (seed 1) | val_bpb per seed | noise floor (spread) |")
    print("|---|---|---|---|---|")
    for name, cache in (("old", args.old), ("new", args.new)):
        n, d = distinct(cache)
        print(f"| {name} ({cache}) | {n} ({d}) | {scores[name][0]:.6f} | "
              f"{', '.join(f'{s:.6f}' for s in scores[name])} | {spread(scores[name]):.6f} |")


if __name__ == "__main__":
    main()
