"""
Every backend computes the same model: one set of weights in, the same per-token losses and val_bpb out.

The weights are random and non-zero everywhere (a trained model's are; the init's zero projections and
gates would hide bugs), saved to disk as the README's names and layouts, loaded into each backend's
model on the CPU in float32, and checked against an independent float64 numpy implementation of the
model as backends/README.md writes it down. The MLX case runs wherever MLX is installed.
"""

import importlib.util
import json
import math

import numpy as np
import pytest

import prepare
from conftest import ROOT

BACKENDS = ("cuda", "mps", "mlx")
# 3 layers with pattern "SL": windows S, L, L (last forced), value embeddings on layers 0 and 2
N_LAYER, N_HEAD, N_EMBD, PATTERN = 3, 2, 64, "SL"
VE_GATE_CHANNELS = 32
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
    for attr in ("GPTConfig", "GPT", "export_weights", "load_weights", "per_token_loss"):
        assert hasattr(module, attr), f"{path} defines no {attr} (backends/README.md, Weights exchange)"
    _modules[name] = module
    return module


def config_dict(cache):
    profile = json.loads((cache / "profile.json").read_text())["profile"]
    return dict(sequence_len=profile["seq_len"], vocab_size=profile["vocab_size"], n_layer=N_LAYER, n_head=N_HEAD,
                n_kv_head=N_HEAD, n_embd=N_EMBD, window_pattern=PATTERN)


def has_ve(i, n):
    return i % 2 == (n - 1) % 2


def expected_shapes(cfg):
    """The weight names and shapes of backends/README.md."""
    V, d, L = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"]
    kv = cfg["n_kv_head"] * (d // cfg["n_head"])
    shapes = {"transformer.wte.weight": (V, d), "lm_head.weight": (V, d), "resid_lambdas": (L,), "x0_lambdas": (L,)}
    for i in range(L):
        h = f"transformer.h.{i}"
        shapes |= {f"{h}.attn.c_q.weight": (d, d), f"{h}.attn.c_k.weight": (kv, d), f"{h}.attn.c_v.weight": (kv, d),
                   f"{h}.attn.c_proj.weight": (d, d), f"{h}.mlp.c_fc.weight": (4 * d, d),
                   f"{h}.mlp.c_proj.weight": (d, 4 * d)}
        if has_ve(i, L):
            shapes |= {f"{h}.attn.ve_gate.weight": (cfg["n_kv_head"], VE_GATE_CHANNELS), f"value_embeds.{i}.weight": (V, kv)}
    return shapes


def random_weights(cfg, seed=0):
    """Non-zero random float32 weights, scaled so activations and losses stay in a trained model's range."""
    rng = np.random.default_rng(seed)
    d = cfg["n_embd"]
    out = {}
    for name, shape in expected_shapes(cfg).items():
        fan_in = shape[-1]
        if name == "transformer.wte.weight":
            w = rng.normal(0, 1, shape)
        elif name == "lm_head.weight":
            w = rng.normal(0, 0.2, shape)  # logits of a few units: the soft cap matters but does not saturate
        elif name == "resid_lambdas":
            w = rng.uniform(0.7, 1.3, shape)
        elif name == "x0_lambdas":
            w = rng.uniform(0.05, 0.4, shape)
        elif "ve_gate" in name:
            w = rng.uniform(-0.3, 0.3, shape)
        elif "value_embeds" in name:
            w = rng.uniform(-1, 1, shape) * 3**0.5 * d**-0.5
        else:
            scale = 0.5 if "c_proj" in name else 1.0
            w = rng.uniform(-1, 1, shape) * scale * 3**0.5 * fan_in**-0.5
        w = w.astype(np.float32)
        w[w == 0] = 1e-3
        out[name] = w
    return out


def reference_losses(w, cfg, x, y):
    """The model of backends/README.md in float64 numpy: per-token cross-entropy (b, T) in nats."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    B, T = x.shape
    L, H, d = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
    Hkv, D = cfg["n_kv_head"], d // H

    def norm(a):
        return a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + 1e-6)

    def rotary(a):
        inv_freq = 10000.0 ** (-np.arange(0, D, 2) / D)
        theta = np.arange(T)[:, None] * inv_freq[None, :]
        cos, sin = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]
        a1, a2 = a[..., : D // 2], a[..., D // 2 :]
        return np.concatenate([a1 * cos + a2 * sin, -a1 * sin + a2 * cos], axis=-1)

    pattern, n = cfg["window_pattern"], cfg["sequence_len"]
    windows = [n if pattern[i % len(pattern)] == "L" else n // 2 for i in range(L)]
    windows[-1] = n
    dist = np.arange(T)[:, None] - np.arange(T)[None, :]

    h = norm(w["transformer.wte.weight"][x])
    h0 = h
    for i in range(L):
        p = f"transformer.h.{i}"
        h = w["resid_lambdas"][i] * h + w["x0_lambdas"][i] * h0
        a = norm(h)
        q = (a @ w[f"{p}.attn.c_q.weight"].T).reshape(B, T, H, D)
        k = (a @ w[f"{p}.attn.c_k.weight"].T).reshape(B, T, Hkv, D)
        v = (a @ w[f"{p}.attn.c_v.weight"].T).reshape(B, T, Hkv, D)
        if has_ve(i, L):
            gate = 2 / (1 + np.exp(-(a[..., :VE_GATE_CHANNELS] @ w[f"{p}.attn.ve_gate.weight"].T)))
            v = v + gate[..., None] * w[f"value_embeds.{i}.weight"][x].reshape(B, T, Hkv, D)
        q, k = norm(rotary(q)), norm(rotary(k))
        k, v = np.repeat(k, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)
        scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        scores = np.where((dist >= 0) & (dist <= windows[i]), scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        att = scores / scores.sum(axis=-1, keepdims=True)
        out = np.einsum("bhts,bshd->bthd", att, v).reshape(B, T, d)
        h = h + out @ w[f"{p}.attn.c_proj.weight"].T
        m = np.maximum(norm(h) @ w[f"{p}.mlp.c_fc.weight"].T, 0) ** 2
        h = h + m @ w[f"{p}.mlp.c_proj.weight"].T
    logits = norm(h) @ w["lm_head.weight"].T
    logits = 15 * np.tanh(logits / 15)
    top = logits.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]


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


def build(name, cfg, weights=None):
    module = backend_module(name)
    model = module.GPT(module.GPTConfig(**cfg))
    if weights is not None:
        module.load_weights(model, weights)
    return module, model


def val_batch(n_rows=4):
    rows = np.ascontiguousarray(prepare.get_val_rows()[:n_rows])
    return rows[:, :-1], rows[:, 1:]


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
def test_per_token_losses_match_the_reference(backend, exchange):
    cfg, weights = exchange
    x, y = val_batch(4)
    expected = reference_losses(weights, cfg, x, y)
    module, model = build(backend, cfg, weights)
    got = np.asarray(module.per_token_loss(model)(x, y))
    assert got.shape == y.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOSS_ATOL)
    # chunking is invisible: one row at a time gives the same numbers
    one_by_one = np.asarray(module.per_token_loss(model, 1)(x, y))
    np.testing.assert_allclose(one_by_one, got, rtol=0, atol=1e-5)


def test_val_bpb_agrees_across_backends(exchange):
    cfg, weights = exchange
    results = {}
    for name in BACKENDS:
        if name == "mlx" and importlib.util.find_spec("mlx") is None:
            continue
        module, model = build(name, cfg, weights)
        results[name] = prepare.evaluate_bpb(module.per_token_loss(model), 32)
    assert all(math.isfinite(v) and v > 0 for v in results.values()), results
    first = next(iter(results.values()))
    assert all(abs(v - first) < BPB_ATOL for v in results.values()), results


@pytest.mark.parametrize("backend", ("cuda", "mps"))
def test_device_precision_stays_close(backend, exchange):
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
    expected = np.asarray(module.per_token_loss(cpu_model)(x, y), dtype=np.float64)
    got = np.asarray(module.per_token_loss(gpu_model)(x, y), dtype=np.float64)
    assert np.all(np.isfinite(got))
    assert abs(got.mean() - expected.mean()) < 0.02 and np.abs(got - expected).mean() < 0.1
