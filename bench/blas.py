"""
Benchmark: the CPU paths of a Linux box without a GPU, side by side in one run. MLX on CPU under each BLAS the
harness can preload (none: the mlx[cpu] wheel's reference BLAS; the `mkl` wheel, pip only; Debian's OpenBLAS,
apt) and PyTorch's CPU build (the mps backend, its own bundled BLAS).

Three figures per path: a 1024 x 1024 float32 matmul in GFLOP/s, and tokens/s of real training steps of the
backend's train.py at DEPTH 2 and 3 (autoresearch.calibrate.measure: the file's DEVICE_BATCH_SIZE, warm-up
steps excluded, as calibration times them; the reference BLAS takes ~30 s a step at DEPTH 3). Paths run interleaved, one measurement each per round, so a busy
machine slows them alike; the median over the rounds is reported, with the ratio to OpenBLAS.

Usage: AUTORESEARCH_CACHE=<a prepared cache> python bench/blas.py [--rounds N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from autoresearch import train_file  # noqa: E402
from autoresearch.calibrate import measure  # noqa: E402
from autoresearch.hardware import mkl_wheel, system_openblas  # noqa: E402

MATMUL = {
    "mlx": "import mlx.core as mx\na = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024))\n"
           "run = lambda: mx.eval(a @ b)\n",
    "mps": "import torch\na = torch.randn(1024, 1024); b = torch.randn(1024, 1024)\nrun = lambda: a @ b\n",
}
TIMING = "import time\nrun(); n, t = 0, time.perf_counter()\nwhile time.perf_counter() - t < 2: run(); n += 1\n" \
         "print(2 * 1024**3 * n / (time.perf_counter() - t) / 1e9)\n"
DEPTHS = (2, 3)


def paths():
    """(label, backend, AUTORESEARCH_BLAS) for every CPU path present here."""
    found = [("mlx, reference BLAS", "mlx", "none")]
    if mkl_wheel():
        found.append(("mlx, mkl wheel (pip)", "mlx", mkl_wheel()))
    if system_openblas():
        found.append(("mlx, OpenBLAS (apt)", "mlx", system_openblas()))
    try:
        import torch  # noqa: F401

        found.append(("PyTorch CPU (mps backend)", "mps", "none"))
    except ImportError:
        pass
    return found


def matmul_gflops(backend, blas):
    env = dict(os.environ, AUTORESEARCH_BLAS=blas)
    if backend == "mlx" and blas != "none":
        env["LD_PRELOAD"] = blas
    done = subprocess.run([sys.executable, "-c", MATMUL[backend] + TIMING], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def train_tokens_per_sec(backend, blas, depth, scratch):
    os.environ["AUTORESEARCH_BLAS"] = blas  # read by the harness's train_env, as in a real run
    source = train_file(backend, ROOT).read_text()
    from autoresearch.hparams import read_constants

    batch = read_constants(source)["DEVICE_BATCH_SIZE"]
    rung, error = measure(backend, source, depth, batch, 300, scratch, timeout=900)
    if rung is None:
        raise RuntimeError(f"{backend} ({blas}) at depth {depth} failed:\n{error}")
    return rung.tokens_per_sec


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    prepare.load_meta()  # fails with the reason where nothing is prepared
    found = paths()
    scratch = Path(tempfile.mkdtemp(prefix="bench-blas-"))
    (scratch / "prepare.py").write_text((ROOT / "prepare.py").read_text())
    for _, backend, _ in found:
        train_file(backend, scratch).parent.mkdir(parents=True, exist_ok=True)
    figures = {label: {"gflops": [], **{d: [] for d in DEPTHS}} for label, _, _ in found}
    for r in range(args.rounds):
        for label, backend, blas in found:
            figures[label]["gflops"].append(matmul_gflops(backend, blas))
            for depth in DEPTHS:
                figures[label][depth].append(train_tokens_per_sec(backend, blas, depth, scratch))
            print(f"round {r + 1}: {label}: " + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in figures[label].items()),
                  file=sys.stderr)
    med = {label: {k: statistics.median(v) for k, v in f.items()} for label, f in figures.items()}
    ref = next((m for label, m in med.items() if "OpenBLAS" in label), None)
    print(f"cpu: {os.cpu_count()} cores, {prepare.load_profile().name} profile, {args.rounds} rounds (medians)")
    print(f"| path | matmul GFLOP/s | " + " | ".join(f"tokens/s DEPTH {d}" for d in DEPTHS)
          + (" | vs OpenBLAS (DEPTH 2 / 3)" if ref else "") + " |")
    print("|---|---:|" + "---:|" * len(DEPTHS) + ("---:|" if ref else ""))
    for label, m in med.items():
        ratio = " | " + " / ".join(f"{m[d] / ref[d]:.2f}" for d in DEPTHS) if ref else ""
        print(f"| {label} | {m['gflops']:.1f} | " + " | ".join(f"{m[d]:,.0f}" for d in DEPTHS) + ratio + " |")


if __name__ == "__main__":
    main()
