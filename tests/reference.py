"""The model of backends/README.md written once more in float64 numpy, and random non-zero weights for it:
the yardstick the backends are measured against (tests/test_conformance.py, tests/test_mlx_backend.py)."""

import math

import numpy as np

import prepare

VE_GATE_CHANNELS = 32


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


def val_batch(n_rows):
    """(inputs, targets) of the first fixed validation rows."""
    rows = np.ascontiguousarray(prepare.get_val_rows()[:n_rows])
    return rows[:, :-1], rows[:, 1:]


class Scored:
    """A model's checkpoint as the harness scores it: traced with prepare.export_model for batches of `batch` rows,
    written by its save() into folder, loaded from those files alone by autoresearch/scorer.py and run there.
    Called as a loss_fn (x, y) -> per-token nats (b, T): a batch of fewer rows is filled with its rows again, as
    the evaluator fills its last batch, and only the given rows' losses come back. The weights written are the
    model's when save() runs (Scored(...).save again after a change), as train.py's save() at the end of training."""

    def __init__(self, model, batch, folder, context=None):
        self.batch, self.folder = batch, folder
        self.export = prepare.export_model(model, batch, prepare.load_profile().seq_len, context)
        self.save()

    def save(self):
        from autoresearch.scorer import MlxScorer, TorchScorer

        self.export(self.folder)
        self.scorer = (MlxScorer if (self.folder / "graph.mlxfn").exists() else TorchScorer)(self.folder)
        return self

    def logits(self, x):
        """The graph's (batch, T, V) float32 logits for a whole batch of inputs, as numpy."""
        out = self.scorer.logits(np.ascontiguousarray(x))
        return out.cpu().numpy() if hasattr(self.scorer, "torch") else np.array(out)

    def __call__(self, x, y):
        n = len(x)
        fill = np.resize(np.arange(n), self.batch)  # the rows again, in order, up to a whole batch
        nats = self.scorer.nats(self.scorer.logits(np.ascontiguousarray(x[fill])), np.ascontiguousarray(y[fill]))
        return np.asarray(nats)[:n]
