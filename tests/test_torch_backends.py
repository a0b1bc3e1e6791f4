"""The PyTorch backends (cuda, mps) end to end: real runs of train.py on this machine (the CPU in CI), no mocks."""

import math
import os
import re

import numpy as np
import pytest

import prepare
from autoresearch.runner import run_training
from autoresearch.scorer import TorchScorer
from conftest import TINY, make_checkout, PROFILE

TORCH_BACKENDS = ("cuda", "mps")
STEP_LOSS = re.compile(r"^step (\d+) .*\| loss: ([0-9.eE+-]+|nan|inf) \|")

torch = pytest.importorskip("torch")


def cpu_env():
    # One BLAS/OpenMP thread: on a small shared CI runner, two spinning threads competing with another
    # process make steps 10x slower at random; the numbers under test do not depend on the thread count.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def expected_device(backend):
    """What the summary's device line must say on this machine."""
    if backend == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if backend == "mps" and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def step_losses(log):
    return [float(m.group(2)) for m in map(STEP_LOSS.match, log.splitlines()) if m]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_trains_saves_and_reports(backend, use_cache, tmp_path):
    root = make_checkout(tmp_path / "project", backends=(backend,), **TINY)
    seed = 7 if backend == "mps" else None  # AUTORESEARCH_SEED for one, the default 42 for the other
    env = dict(cpu_env(), AUTORESEARCH_CHECKPOINT=str(tmp_path / "checkpoint"))
    result = run_training(backend, budget=4, seed=seed, root=root, env=env)
    assert result.returncode == 0, result.tail()
    s = result.summary
    assert s is not None, result.tail()
    assert "val_bpb" not in s  # the harness scores the checkpoint (tests/test_evaluate.py)
    # the checkpoint is the exported graph and its tensors, nothing else, and the harness's scorer runs it
    checkpoint = tmp_path / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["graph.json", "tensors.npz"]
    with np.load(checkpoint / "tensors.npz", allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files}
    params = {k: w for k, w in weights.items() if k not in ("cos", "sin")}  # the rotary tables are buffers
    assert abs(sum(w.size for w in params.values()) / 1e6 - s["num_params_M"]) < 1e-3
    assert sum(name.endswith(".attn.c_q.weight") for name in params) == TINY["DEPTH"]
    assert weights["transformer.wte.weight"].shape[0] == 4096
    scorer = TorchScorer(checkpoint)
    assert (scorer.batch, scorer.seq_len) == (TINY["DEVICE_BATCH_SIZE"], 256)
    rows = np.array(prepare.get_val_rows()[: scorer.batch])
    nats = scorer.nats(scorer.logits(rows[:, :-1]), rows[:, 1:])
    assert nats.shape == (scorer.batch, 256) and np.all(np.isfinite(nats))
    # trained: the checkpoint predicts the text better than a uniform guess over the vocabulary
    assert 0 < nats.mean() < math.log(4096) - 0.2, nats.mean()
    assert s["num_steps"] > 1
    assert s["backend"] == backend
    assert s["device"] == expected_device(backend)
    assert s["eval_profile"] == PROFILE
    assert s["depth"] == TINY["DEPTH"]
    assert s["seed"] == (seed or 42) and s["budget_seconds"] == 4
    assert s["training_seconds"] >= 4 and s["total_seconds"] >= s["training_seconds"]
    assert s["peak_vram_mb"] > 0 and s["tokens_per_sec"] > 0 and s["total_tokens_M"] > 0
    attention = [line for line in result.log.splitlines() if line.startswith("attention: ")]
    assert attention and attention[0] in ("attention: fa3", "attention: flex", "attention: sdpa"), attention  # announced
    if s["device"] == "cpu":
        assert attention[0] == "attention: sdpa"  # the fallback needs no GPU and no network
        assert "mfu_percent" not in s  # no known peak rate on a CPU
    losses = step_losses(result.log)
    assert len(losses) == s["num_steps"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_nan_loss_fails_fast(backend, use_cache, tmp_path):
    # absurd learning rates overflow the weights within a step or two
    root = make_checkout(tmp_path / "project", backends=(backend,), **TINY, MATRIX_LR=1e30, SCALAR_LR=1e30)
    result = run_training(backend, budget=120, root=root, env=cpu_env())
    assert result.returncode == 1
    fail = [line for line in result.log.splitlines() if line.startswith("FAIL")]
    assert fail, result.tail()
    assert result.summary is None
    # at once: within the first steps, long before the budget runs out
    assert int(re.search(r"at step (\d+)", fail[0]).group(1)) <= 5, fail[0]
    assert result.elapsed < 120

