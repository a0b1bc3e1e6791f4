"""
Benchmark: tokens/s of one training step of backends/mlx/train.py, compiled and uncompiled, side by side,
and of backends/mps/train.py's PyTorch step on the CPU at the same configuration (when torch is installed).

The step is the real one: forward, backward and the Muon + AdamW update, on random tokens.
Fixed configuration: eval profile "cpu" shapes (seq_len 256, vocab 4096), DEPTH 4, model_dim 256,
HEAD_DIM 64 (4 heads), WINDOW_PATTERN SSSL, one micro-batch of 16 rows = 4096 tokens per step.
The variants run interleaved, one step each per round, so a busy machine slows them alike; the first
steps (compilation) are excluded and the median over the rounds is reported.
PyTorch runs in child processes, with all cores and with one thread (its OpenMP threads and MLX's BLAS
threads never share a process).

Usage: python bench/mlx_step.py [--rounds N]     (re-executes itself with OpenBLAS preloaded on Linux)
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoresearch.hardware import blas_library  # noqa: E402
from autoresearch.runner import train_env  # noqa: E402

SEQ_LEN, VOCAB, DEPTH, DIM, HEAD_DIM, PATTERN, ROWS = 256, 4096, 4, 256, 64, "SSSL", 16
TOKENS = ROWS * SEQ_LEN
LRS = dict(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, adam_betas=(0.8, 0.95), scalar_lr=0.5)
WARMUP_STEPS = 2


def load(backend):
    path = ROOT / "backends" / backend / "train.py"
    spec = importlib.util.spec_from_file_location(f"bench_{backend}_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_kwargs():
    return dict(sequence_len=SEQ_LEN, vocab_size=VOCAB, n_layer=DEPTH, n_head=DIM // HEAD_DIM,
                n_kv_head=DIM // HEAD_DIM, n_embd=DIM, window_pattern=PATTERN)


def batch(seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (ROWS, SEQ_LEN + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def mlx_stepper(train, compiled):
    """A function running one full MLX training step to completion."""
    import mlx.core as mx

    model = train.GPT(train.GPTConfig(**config_kwargs()))
    model.init_weights()
    optimizer = train.setup_optimizer(model, **LRS)
    mx.eval(model.parameters(), optimizer.state)
    train.use_compile = compiled
    step = train.make_train_step(model, optimizer, grad_accum_steps=1)
    x, y = (mx.array(a[None]) for a in batch())

    def run():
        loss = step(x, y, mx.array(1.0), mx.array(0.9), mx.array(0.1))
        mx.eval(loss, model.parameters(), optimizer.state)

    return run


def torch_worker(threads):
    """Child process: build backends/mps/train.py's model and optimizer, then time one step per stdin line."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    train = load("mps")
    model = train.GPT(train.GPTConfig(**config_kwargs())).to(train.device)
    model.init_weights()
    optimizer = train.setup_optimizer(model, **LRS)
    x, y = (train.to_device(a) for a in batch())

    def run():
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss.item()

    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        run()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


class TorchChild:
    def __init__(self, threads=0):
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)  # PyTorch brings its own BLAS
        self.proc = subprocess.Popen([sys.executable, __file__, "--torch-worker", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self.proc.stdout.readline())

    def step(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def time_it(run):
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--torch-worker", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker is not None:
        return torch_worker(args.torch_worker)

    blas = blas_library()
    if blas and blas not in os.environ.get("LD_PRELOAD", "") and not os.environ.get("MLX_STEP_BENCH_REEXEC"):
        env, _ = train_env("mlx")
        env["MLX_STEP_BENCH_REEXEC"] = "1"
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)

    import mlx.core as mx

    train = load("mlx")
    print(f"config: seq_len {SEQ_LEN}, vocab {VOCAB}, DEPTH {DEPTH}, model_dim {DIM}, HEAD_DIM {HEAD_DIM}, "
          f"WINDOW_PATTERN {PATTERN}, {ROWS} rows x {SEQ_LEN} = {TOKENS} tokens per step, float32")
    print(f"mlx {mx.__version__} on {train.device_name()}; BLAS preload: {os.environ.get('LD_PRELOAD') or 'none'}; "
          f"{os.cpu_count()} CPU cores")
    # every variant runs one step and returns its seconds
    variants = {name: (lambda run=mlx_stepper(train, compiled): time_it(run))
                for name, compiled in (("mlx compiled", True), ("mlx uncompiled", False))}
    children = []
    if importlib.util.find_spec("torch") is None:
        print("torch: not installed, PyTorch CPU step skipped")
    elif not (ROOT / "backends" / "mps" / "train.py").exists():
        print("torch: backends/mps/train.py is missing, PyTorch CPU step skipped")
    else:
        # all cores (PyTorch's default), and one thread: OpenMP threads suffer most when other processes compete
        children = [TorchChild(), TorchChild(threads=1)]
        print(f"torch {children[0].info['torch']}: backends/mps/train.py on the CPU, eager")
        for child in children:
            variants[f"torch cpu, {child.info['threads']} thread(s)"] = child.step

    times = {name: [] for name in variants}
    t_warm = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        for run in variants.values():
            run()
    print(f"warm-up ({WARMUP_STEPS} steps each, compilation included): {time.perf_counter() - t_warm:.1f}s")
    for _ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(run())
    for child in children:
        child.close()

    print(f"\n{'step':28s} {'median ms':>10s} {'min ms':>8s} {'tokens/s':>9s}   ({args.rounds} rounds)")
    medians = {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        print(f"{name:28s} {1000 * medians[name]:10.0f} {1000 * min(ts):8.0f} {TOKENS / medians[name]:9.0f}")

    def paired(a, b):
        """Median over rounds of a's step time / b's: steps of one round ran back to back, under the same load."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    speedup = paired("mlx uncompiled", "mlx compiled")
    print(f"\ncompiled vs uncompiled: {speedup:.2f}x the speed (paired median per round)")
    torch_names = [name for name in times if name.startswith("torch")]
    if torch_names:
        fastest_torch = min(torch_names, key=medians.get)
        for name in ("mlx compiled", "mlx uncompiled"):
            ratio = paired(name, fastest_torch)
            verdict = "within" if ratio <= 1.5 else "NOT within"
            print(f"{name} step time / {fastest_torch} step time: {ratio:.2f} ({verdict} the 1.5x target)")


if __name__ == "__main__":
    main()
