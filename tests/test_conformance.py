"""
Every backend computes the same model: one set of weights in, the same per-token losses and val_bpb out.

The weights are random and non-zero everywhere (a trained model's are; the init's zero projections and
gates would hide bugs), saved to disk as the README's names and layouts, loaded into each backend's
model on the CPU in float32, exported as train.py exports it (prepare.export_model), scored from the checkpoint's
files by the harness's scorer (autoresearch/scorer.py, in this process), and checked against an independent
float64 numpy implementation of the model as backends/README.md writes it down. The MLX case runs wherever MLX
is installed.
"""

import importlib.util
import json
import math

import numpy as np
import pytest

import prepare
from conftest import ROOT
from reference import Scored, expected_shapes, random_weights, reference_losses, val_batch

BACKENDS = ("cuda", "mps", "mlx")
# 3 layers with pattern "SL": windows S, L, L (last forced), value embeddings on layers 0 and 2
N_LAYER, N_HEAD, N_EMBD, PATTERN = 3, 2, 64, "SL"
LOSS_ATOL = 2e-4
BPB_ATOL = 1e-4
_modules = {}


def backend_module(name):
    """backends/<name>/train.py imported by path (importing must not train)."""
    if name in _modules:
        return _modules[name]
    pytest.importorskip("mlx.core" if name == "mlx" else "torch")
    path = ROOT / "backends" / name / "train.py"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    spec = importlib.util.spec_from_file_location(f"conformance_{name}_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("GPTConfig", "GPT", "export_weights", "load_weights"):
        assert hasattr(module, attr), f"{path} defines no {attr} (backends/README.md, Weights exchange)"
    _modules[name] = module
    return module


def config_dict(cache):
    profile = json.loads((cache / "profile.json").read_text())["profile"]
    return dict(sequence_len=profile["seq_len"], vocab_size=profile["vocab_size"], n_layer=N_LAYER, n_head=N_HEAD,
                n_kv_head=N_HEAD, n_embd=N_EMBD, window_pattern=PATTERN)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # two spinning OpenMP threads next to another busy process make a small CI runner 5x slower
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exchange(use_cache, tmp_path):
    """(config, weights as read back from an .npz file on disk)."""
    cfg = config_dict(use_cache)
    path = tmp_path / "baseline.npz"
    np.savez(path, **random_weights(cfg))
    with np.load(path) as f:
        return cfg, {k: f[k] for k in f.files}


@pytest.fixture
def harness_losses(tmp_path):
    """(model, batch, context=None) -> the loss_fn (x, y) -> nats of the model's checkpoint as the harness scores
    it: exported for batches of that many rows, each export in a folder of its own."""
    made = []

    def scored(model, batch, context=None):
        made.append(tmp_path / f"checkpoint-{len(made)}")
        return Scored(model, batch, made[-1], context)

    return scored


def own_losses(module, model, x, y):
    """(logits, per-token nats) from the model's own forward and loss path, as train.py computes its loss."""
    if hasattr(model, "trainable_parameters"):  # MLX
        import mlx.core as mx

        return np.array(model(mx.array(x))), np.array(model(mx.array(x), mx.array(y), reduction="none"))
    import torch

    with torch.no_grad():
        x, y = torch.tensor(x).long(), torch.tensor(y).long()
        return model(x).numpy(), model(x, y, reduction="none").numpy()


def build(name, cfg, weights=None):
    module = backend_module(name)
    model = module.GPT(module.GPTConfig(**cfg))
    if weights is not None:
        module.load_weights(model, weights)
    return module, model


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_names_and_layouts_are_the_contracts(backend, exchange):
    cfg, _ = exchange
    module, model = build(backend, cfg)
    exported = module.export_weights(model)
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected_shapes(cfg)
    assert all(v.dtype == np.float32 for v in exported.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_round_trip(backend, exchange):
    cfg, weights = exchange
    module, model = build(backend, cfg, weights)
    exported = module.export_weights(model)
    assert exported.keys() == weights.keys()
    for name, w in weights.items():
        np.testing.assert_array_equal(exported[name], w, err_msg=name)
    with pytest.raises((KeyError, ValueError)):  # a missing tensor is an error, not a silent partial load
        module.load_weights(model, {k: v for k, v in weights.items() if k != "lm_head.weight"})


def test_reference_is_not_trivial(exchange):
    """Guard the guard: every component of the reference changes the losses the backends must match."""
    cfg, weights = exchange
    x, y = val_batch(2)
    base = reference_losses(weights, cfg, x, y)
    assert np.all(np.isfinite(base)) and 2 < base.mean() < 20
    for name in ("transformer.h.0.attn.ve_gate.weight", "transformer.h.1.attn.c_proj.weight",
                 "transformer.h.2.mlp.c_proj.weight", "x0_lambdas"):
        changed = dict(weights, **{name: weights[name] * 0.5})
        assert np.abs(reference_losses(changed, cfg, x, y) - base).max() > 1e-3, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_losses_match_the_reference(backend, exchange, harness_losses):
    cfg, weights = exchange
    x, y = val_batch(4)
    expected = reference_losses(weights, cfg, x, y)
    _, model = build(backend, cfg, weights)
    got = np.asarray(harness_losses(model, 4)(x, y))
    assert got.shape == y.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOSS_ATOL)
    # rows are independent: one row at a time through a graph of batch 1, or the batch's rows in another order,
    # give the same numbers (the evaluator draws its batches, and the rows that fill its last one, at random)
    single = harness_losses(model, 1)
    one_by_one = np.concatenate([single(x[i : i + 1], y[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(one_by_one, got, rtol=0, atol=1e-5)
    order = [2, 0, 3, 1]
    np.testing.assert_allclose(harness_losses(model, 4)(x[order], y[order]), got[order], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_exported_checkpoint_is_the_model(backend, exchange, harness_losses):
    """The graph is traced before training (train.py calls export_model once the model is built) and save()
    writes the weights at the end: the checkpoint, scored from its files alone, is the trained model. Here the
    trace sees other weights than the ones loaded after it, as training would change them."""
    cfg, weights = exchange
    module, model = build(backend, cfg, random_weights(cfg, seed=1))
    scored = harness_losses(model, 2)
    module.load_weights(model, weights)  # what training did to the weights, after the trace
    scored.save()
    names = {"graph.mlxfn" if backend == "mlx" else "graph.json", "tensors.npz"}
    assert {p.name for p in scored.folder.iterdir()} == names
    with np.load(scored.folder / "tensors.npz", allow_pickle=False) as f:  # the trained weights, by their names
        assert all(np.array_equal(f[name], w) for name, w in weights.items())
    x, y = val_batch(2)
    logits, nats = own_losses(module, model, x, y)
    np.testing.assert_array_equal(scored.logits(x), logits)  # the same operators on the same CPU: the same bits
    np.testing.assert_allclose(scored(x, y), nats, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scored(x, y), reference_losses(weights, cfg, x, y), rtol=0, atol=LOSS_ATOL)


def test_val_bpb_agrees_across_backends(exchange, harness_losses):
    cfg, weights = exchange
    results = {}
    for name in BACKENDS:
        if name == "mlx" and importlib.util.find_spec("mlx") is None:
            continue
        _, model = build(name, cfg, weights)
        results[name] = prepare.evaluate_bpb(harness_losses(model, 32), 32)
    assert all(math.isfinite(v) and v > 0 for v in results.values()), results
    first = next(iter(results.values()))
    assert all(abs(v - first) < BPB_ATOL for v in results.values()), results


@pytest.mark.parametrize("backend", ("cuda", "mps"))
def test_device_precision_stays_close(backend, exchange, harness_losses):
    """Where the backend's GPU exists: the same weights under its autocast dtype stay near float32."""
    module = backend_module(backend)
    if not module.on_gpu:
        pytest.skip(f"no {backend} device here")
    import torch

    cfg, weights = exchange
    _, cpu_model = build(backend, cfg, weights)
    with torch.device(module.device):
        gpu_model = module.GPT(module.GPTConfig(**cfg))
    module.load_weights(gpu_model, weights)
    x, y = val_batch(16)
    expected = np.asarray(harness_losses(cpu_model, 16)(x, y), dtype=np.float64)
    # exported under the trainer's autocast, as train.py exports it, and scored on its device
    got = np.asarray(harness_losses(gpu_model, 16, module.autocast_ctx())(x, y), dtype=np.float64)
    assert np.all(np.isfinite(got))
    assert abs(got.mean() - expected.mean()) < 0.02 and np.abs(got - expected).mean() < 0.1


@pytest.mark.parametrize("backend", ("cuda", "mps"))
def test_optimizer_steps_agree_with_mlx(backend, exchange):
    """Training, not just the forward pass: from the same weights and batch, three steps of each file's
    Muon + AdamW (its own hyperparameters and schedules) give the same losses and the same updates."""
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    cfg, weights = exchange
    tm, tmodel = build(backend, cfg, weights)
    xm, xmodel = build("mlx", cfg, weights)
    rates = dict(unembedding_lr=tm.UNEMBEDDING_LR, embedding_lr=tm.EMBEDDING_LR, matrix_lr=tm.MATRIX_LR,
                 adam_betas=tm.ADAM_BETAS, scalar_lr=tm.SCALAR_LR)
    topt, xopt = tm.setup_optimizer(tmodel, **rates), xm.setup_optimizer(xmodel, **rates)
    mx.eval(xopt.state)
    xstep = xm.make_train_step(xmodel, xopt, 1)
    x, y = val_batch(4)
    for step in range(3):
        progress = step / 10  # full rate, then into the warm-down once WARMDOWN_RATIO allows
        lrm, wd = tm.get_lr_multiplier(progress), tm.get_weight_decay(progress)
        tloss = tmodel(torch.tensor(x).long(), torch.tensor(y).long())
        tloss.backward()
        for group in topt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = tm.get_muon_momentum(step), wd
        topt.step()
        tmodel.zero_grad(set_to_none=True)
        xloss = xstep(mx.array(x[None]), mx.array(y[None]), mx.array(lrm), mx.array(xm.get_muon_momentum(step)),
                      mx.array(wd))
        mx.eval(xloss, xmodel.parameters(), xopt.state)
        assert float(tloss) == pytest.approx(float(xloss), rel=1e-5), f"step {step}"
    after_t, after_x = tm.export_weights(tmodel), xm.export_weights(xmodel)
    for name, start in weights.items():
        update = np.linalg.norm(after_t[name] - start)
        assert update > 0, f"{name} was not trained"
        # Adam's sign-like steps on near-zero gradients amplify float noise in a few entries: compare norms
        assert np.linalg.norm(after_t[name] - after_x[name]) <= 2e-2 * update, name
