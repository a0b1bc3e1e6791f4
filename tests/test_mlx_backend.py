"""The MLX backend (backends/mlx/train.py): real training runs on the CPU, and its model against float64 numpy."""

import importlib.util
import math
import os
import re
from dataclasses import asdict

import numpy as np
import pytest

import prepare
from autoresearch.runner import run_training
from autoresearch.scorer import MlxScorer
import reference
from conftest import PROFILE, ROOT, TINY, make_checkout
from reference import Scored, val_batch

mx = pytest.importorskip("mlx.core")

STEP_LOSS = re.compile(r"^step (\d+) .*\| loss: ([0-9.eE+-]+|nan|inf) \|")
# 2 layers with pattern "S": windows S, L (the last is forced to L); a value embedding on layer 1
SMALL = dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="S")


def step_losses(log):
    return [float(m.group(2)) for m in map(STEP_LOSS.match, log.splitlines()) if m]


@pytest.fixture(scope="module")
def train():
    """backends/mlx/train.py imported by path: importing defines the model and trains nothing."""
    spec = importlib.util.spec_from_file_location("mlx_train_under_test", ROOT / "backends" / "mlx" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_config(train):
    profile = prepare.load_profile()
    return train.GPTConfig(sequence_len=profile.seq_len, vocab_size=profile.vocab_size, **SMALL)


def random_weights(train, config, seed=0):
    return reference.random_weights(asdict(config), seed)


def reference_losses(w, config, x, y):
    return reference.reference_losses(w, asdict(config), x, y)


def harness_losses(model, batch, folder):
    """The loss_fn (x, y) -> nats of the model's checkpoint as the harness scores it: exported as train.py exports
    it, for batches of that many rows, and run by the harness's scorer from the files in folder."""
    return Scored(model, batch, folder)


def test_trains_saves_and_reports(use_cache, tmp_path):
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    env = dict(os.environ, AUTORESEARCH_CHECKPOINT=str(tmp_path / "checkpoint"))
    result = run_training("mlx", budget=4, root=root, timeout=240, env=env)
    assert result.returncode == 0, result.tail()
    s = result.summary
    assert s is not None, result.tail()
    assert "val_bpb" not in s  # the harness scores the checkpoint (tests/test_evaluate.py)
    # the checkpoint is the exported graph and its tensors, nothing else, and the harness's scorer runs it
    checkpoint = tmp_path / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["graph.mlxfn", "tensors.npz"]
    with np.load(checkpoint / "tensors.npz", allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files}
    assert abs(sum(w.size for w in weights.values()) / 1e6 - s["num_params_M"]) < 1e-3
    assert sum(name.endswith(".attn.c_q.weight") for name in weights) == TINY["DEPTH"]
    scorer = MlxScorer(checkpoint)
    assert (scorer.batch, scorer.seq_len) == (TINY["DEVICE_BATCH_SIZE"], 256)
    rows = np.array(prepare.get_val_rows()[: scorer.batch])
    nats = scorer.nats(scorer.logits(rows[:, :-1]), rows[:, 1:])
    assert nats.shape == (scorer.batch, 256) and np.all(np.isfinite(nats))
    # trained: the checkpoint predicts the text better than a uniform guess over the vocabulary (about 7.2 nats
    # after these 4 s on a CPU, against 8.3)
    assert 0 < nats.mean() < math.log(prepare.load_profile().vocab_size) - 0.2, nats.mean()
    assert s["num_steps"] > 1
    assert (s["backend"], s["device"], s["eval_profile"]) == ("mlx", "cpu", PROFILE)
    assert s["depth"] == TINY["DEPTH"] and s["seed"] == 42 and s["budget_seconds"] == 4
    assert s["training_seconds"] >= 4 and s["total_seconds"] >= s["training_seconds"]
    assert s["peak_vram_mb"] > 0 and s["tokens_per_sec"] > 0
    assert "mfu_percent" not in s  # no known peak rate on a CPU
    losses = step_losses(result.log)
    assert len(losses) == s["num_steps"] and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, f"loss did not go down: {losses}"


def test_nan_loss_fails_fast(use_cache, tmp_path):
    # absurd learning rates overflow the weights within a step or two
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY, MATRIX_LR=1e30, SCALAR_LR=1e30)
    result = run_training("mlx", budget=30, root=root, timeout=240)
    assert result.returncode != 0
    assert any(line.startswith("FAIL") for line in result.log.splitlines()), result.tail()
    assert result.summary is None


def test_calibration_steps_save_nothing(use_cache, tmp_path):
    """AUTORESEARCH_CALIBRATE_STEPS (autoresearch calibrate): a few timed steps, no checkpoint, a summary."""
    root = make_checkout(tmp_path / "project", backends=("mlx",), **TINY)
    env = dict(os.environ, AUTORESEARCH_CALIBRATE_STEPS="2", AUTORESEARCH_CHECKPOINT=str(tmp_path / "checkpoint"))
    result = run_training("mlx", budget=300, root=root, timeout=240, env=env)
    assert result.returncode == 0, result.tail()
    s = result.summary
    assert s is not None and "val_bpb" not in s, result.tail()
    assert not any((tmp_path / "checkpoint").glob("*"))  # the folder is made to be bound; nothing in it
    assert s["num_steps"] == 3 and s["tokens_per_sec"] > 0 and s["peak_vram_mb"] > 0


def test_losses_match_float64_reference(train, use_cache, tmp_path):
    config = small_config(train)
    weights = random_weights(train, config)
    model = train.load_weights(train.GPT(config), weights)
    exported = train.export_weights(model)
    assert exported.keys() == weights.keys()
    assert all(np.array_equal(exported[k], weights[k]) and exported[k].dtype == np.float32 for k in weights)
    x, y = val_batch(3)
    expected = reference_losses(weights, config, x, y)
    assert 2 < expected.mean() < 20 and expected.std() > 0.5  # a model that actually predicts something
    got = harness_losses(model, 3, tmp_path)(x, y)
    assert got.shape == y.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_custom_backward_matches_autodiff(train, use_cache):
    """softcap_cross_entropy's hand-written vjp against autodiff through tanh and logsumexp."""
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(0, 8, (3, 5, 97)).astype(np.float32))
    targets = mx.array(rng.integers(0, 97, (3, 5)).astype(np.int32))
    weight = mx.array(rng.uniform(0.5, 1.5, (3, 5)).astype(np.float32))  # uneven cotangents

    def plain(z):
        z = 15 * mx.tanh(z / 15)
        return mx.sum(weight * (mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, targets[..., None], -1)[..., 0]))

    def custom(z):
        return mx.sum(weight * train.softcap_cross_entropy(z, targets)[0])

    np.testing.assert_allclose(custom(logits).item(), plain(logits).item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(mx.grad(custom)(logits)), np.array(mx.grad(plain)(logits)), rtol=1e-4, atol=1e-6)


def test_compiled_step_matches_eager(train, use_cache):
    """The compiled training step (state carried through mx.compile) updates exactly like the eager one."""
    config = small_config(train)
    weights = random_weights(train, config)
    x, y = val_batch(4)
    x, y = mx.array(x.reshape(2, 2, -1)), mx.array(y.reshape(2, 2, -1))  # two micro-batches of two rows
    results = []
    for compiled in (False, True):
        model = train.load_weights(train.GPT(config), weights)
        optimizer = train.setup_optimizer(model, 0.004, 0.6, 0.04, (0.8, 0.95), 0.5)
        train.use_compile = compiled
        try:
            step = train.make_train_step(model, optimizer, grad_accum_steps=2)
        finally:
            train.use_compile = True
        losses = [step(x, y, mx.array(lrm), mx.array(0.85), mx.array(0.2)).item() for lrm in (1.0, 0.5, 0.25)]
        results.append((losses, train.export_weights(model)))
    (eager_losses, eager_w), (compiled_losses, compiled_w) = results
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    assert eager_losses[-1] < eager_losses[0]
    for name in eager_w:
        assert not np.array_equal(eager_w[name], weights[name]), f"{name} was not updated"
        np.testing.assert_allclose(compiled_w[name], eager_w[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_gradient_accumulation_keeps_memory_bounded(train, use_cache):
    """Micro-batches run one after another inside the compiled step: 4 of them need about the memory of 1."""
    config = small_config(train)
    weights = random_weights(train, config)
    rows_x, rows_y = val_batch(8)
    extra = {}
    for n in (1, 4):
        model = train.load_weights(train.GPT(config), weights)
        optimizer = train.setup_optimizer(model, 0.004, 0.6, 0.04, (0.8, 0.95), 0.5)
        step = train.make_train_step(model, optimizer, grad_accum_steps=n)
        x, y = mx.array(rows_x[: 2 * n].reshape(n, 2, -1)), mx.array(rows_y[: 2 * n].reshape(n, 2, -1))
        args = (x, y, mx.array(1.0), mx.array(0.85), mx.array(0.2))
        mx.eval(step(*args), model.parameters(), optimizer.state)  # compiles
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(*args), model.parameters(), optimizer.state)
        extra[n] = mx.get_peak_memory() - before
    assert extra[4] < 1.5 * extra[1], extra


def test_bpb_does_not_depend_on_eval_batch_size(train, use_cache, tmp_path):
    rows = np.array(prepare.get_val_rows()[:48])  # a slice keeps this fast without an optimized BLAS in-process
    config = small_config(train)
    model = train.load_weights(train.GPT(config), random_weights(train, config, seed=2))
    # a graph per batch size (its shapes are static); 7 leaves a last batch of 6 rows, filled as the evaluator does
    a = prepare.evaluate_bpb(harness_losses(model, 16, tmp_path / "16"), 16, rows=rows)
    b = prepare.evaluate_bpb(harness_losses(model, 7, tmp_path / "7"), 7, rows=rows)
    assert math.isfinite(a) and a > 0
    assert abs(a - b) <= 1e-6 * a


def test_bf16_compute_path_runs_and_agrees(train, use_cache, tmp_path):
    """The GPU precision path (bf16 activations over float32 weights), exercised on the CPU."""
    config = small_config(train)
    model = train.load_weights(train.GPT(config), random_weights(train, config))
    x, y = val_batch(2)
    fp32 = harness_losses(model, 2, tmp_path / "fp32")(x, y)
    train.compute_dtype = mx.bfloat16
    try:
        bf16 = harness_losses(model, 2, tmp_path / "bf16")(x, y)  # traced under bf16: the graph computes in it
        optimizer = train.setup_optimizer(model, 0.004, 0.6, 0.04, (0.8, 0.95), 0.5)
        train.use_compile = False  # compiled CPU kernels for bf16 would first have to be built
        step = train.make_train_step(model, optimizer, grad_accum_steps=1)
        loss = step(mx.array(x[None]), mx.array(y[None]), mx.array(1.0), mx.array(0.85), mx.array(0.2))
        mx.eval(loss, model.parameters())
    finally:
        train.compute_dtype, train.use_compile = mx.float32, True
    assert bf16.dtype == np.float32 and math.isfinite(loss.item())
    assert not np.array_equal(bf16, fp32)  # the graph traced under bf16 computes in it
    assert abs(bf16.mean() - fp32.mean()) < 0.02 * fp32.mean()
    assert all(v.dtype == np.float32 for v in train.export_weights(model).values())  # master weights stay float32
