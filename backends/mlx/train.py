"""
autoresearch pretraining script, MLX backend. Single device, single file.

The same GPT, optimizer recipe and schedules as backends/cuda and backends/mps (see
backends/README.md), written in idiomatic MLX: nn.Module, nn.value_and_grad and one mx.compile'd
training step (forward, backward with gradient accumulation, Muon + AdamW update).
Runs on Apple Silicon (Metal), on NVIDIA GPUs with mlx[cuda], and on CPUs with mlx[cpu].

Usage: python backends/mlx/train.py     (from the repository root, after `autoresearch prepare`)
"""

import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds prepare.py

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from prepare import load_profile, time_budget, Tokenizer, make_dataloader, evaluate_bpb

# ---------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------

DEVICE = mx.default_device()
ON_GPU = DEVICE.type == mx.DeviceType.gpu
# Parameters and optimizer state stay float32 (small updates survive); activations and matmuls run in
# bf16 where the device is fast at it (Metal, CUDA) and in float32 on CPUs, where bf16 matmuls crawl.
COMPUTE_DTYPE = mx.bfloat16 if ON_GPU else mx.float32


def device_name():
    if not ON_GPU:
        return "cpu"
    return str(mx.device_info().get("device_name", "gpu"))


def peak_memory_mb():
    return mx.get_peak_memory() / 2**20


def peak_flops(name):
    """Dense bf16 peak of the device in FLOP/s, or None where we have no sound figure (CPUs, Apple GPUs)."""
    known = {"h100": 989.5e12, "h200": 989.5e12, "a100": 312e12}
    if not ON_GPU:
        return None
    return next((v for k, v in known.items() if k in name.lower()), None)


# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    window_pattern: str = "SSSL"


def norm(x):
    # x / sqrt(mean(x^2) + 1e-6) without a weight; the fused kernel accumulates in float32
    return mx.fast.rms_norm(x, None, 1e-6)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


# Rotary tables and attention masks are built once per shape with numpy, so they are constants
# (never tracers) even when first requested inside mx.compile.
_rotary_cache = {}
_mask_cache = {}


def rotary_tables(seq_len, head_dim, dtype):
    """cos and sin of theta = t * 10000^(-arange(0, D, 2)/D), each (T, 1, D/2) to broadcast over heads."""
    key = (seq_len, head_dim, dtype)
    if key not in _rotary_cache:
        inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        theta = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos = mx.array(np.cos(theta)[:, None, :].astype(np.float32)).astype(dtype)
        sin = mx.array(np.sin(theta)[:, None, :].astype(np.float32)).astype(dtype)
        _rotary_cache[key] = (cos, sin)
    return _rotary_cache[key]


def apply_rotary(x, cos, sin):
    # x is (B, T, H, D); rotate the pairs (first half, second half) of every head.
    # Written out rather than nn.RoPE, whose rotation has the opposite sign convention.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return mx.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def attention_mask(seq_len, window, dtype):
    """Query i sees key j iff 0 <= i - j <= window: "causal" when the window spans the sequence,
    else an additive (T, T) mask of 0 and -inf, cached per (seq_len, window)."""
    if window >= seq_len - 1:
        return "causal"  # the fused kernels handle this without a mask array
    key = (seq_len, window, dtype)
    if key not in _mask_cache:
        dist = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
        allowed = (dist >= 0) & (dist <= window)
        _mask_cache[key] = mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32)).astype(dtype)
    return _mask_cache[key]


class Linear(nn.Linear):
    """Bias-free nn.Linear (weight (out, in), as PyTorch) whose float32 weight is cast to the
    activations' dtype, so bf16 compute keeps float32 master weights (autocast, in effect)."""

    def __init__(self, in_dims, out_dims):
        super().__init__(in_dims, out_dims, bias=False)

    def __call__(self, x):
        w = self.weight
        return x @ (w if w.dtype == x.dtype else w.astype(x.dtype)).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.window = window
        self.ve_gate_channels = 32
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.has_ve = has_ve(layer_idx, config.n_layer)
        if self.has_ve:
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head)

    def __call__(self, x, ve, cos, sin):
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        if self.has_ve:
            # value residual: mix in the token's value embedding, one input-dependent gate per kv head
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate[..., None] * ve.reshape(B, T, self.n_kv_head, self.head_dim)
        q = norm(apply_rotary(q, cos, sin))
        k = norm(apply_rotary(k, cos, sin))
        # (B, heads, T, D) for the fused attention; grouped kv heads need no tiling there
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        mask = attention_mask(T, self.window, x.dtype)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim), mask=mask)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def __call__(self, x, ve, cos, sin):
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        windows = self.window_sizes(config)
        # dicts and lists of modules give parameter paths equal to PyTorch's state_dict names
        self.transformer = {
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": [Block(config, i, windows[i]) for i in range(config.n_layer)],
        }
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.zeros((config.n_layer,))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = {str(i): nn.Embedding(config.vocab_size, kv_dim)
                             for i in range(config.n_layer) if has_ve(i, config.n_layer)}

    @staticmethod
    def window_sizes(config):
        """Per layer: L = sequence_len, S = sequence_len // 2, pattern repeated, last layer always L."""
        pattern = config.window_pattern.upper()
        assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must use S and L, got {pattern!r}"
        long, short = config.sequence_len, config.sequence_len // 2
        sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
        sizes[-1] = long
        return sizes

    def init_weights(self):
        d = self.config.n_embd
        s = 3**0.5 * d**-0.5  # uniform bound with the std of N(0, 1/d)

        def uniform(w):
            return mx.random.uniform(-s, s, w.shape)

        self.transformer["wte"].weight = mx.random.normal(self.transformer["wte"].weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for block in self.transformer["h"]:
            attn = block.attn
            attn.c_q.weight, attn.c_k.weight, attn.c_v.weight = (uniform(w) for w in
                                                                 (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight))
            block.mlp.c_fc.weight = uniform(block.mlp.c_fc.weight)
            # zero output projections: every block starts as the identity
            attn.c_proj.weight = mx.zeros_like(attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if attn.has_ve:
                attn.ve_gate.weight = mx.zeros_like(attn.ve_gate.weight)  # gate 2*sigmoid(0) = 1
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight)
        self.resid_lambdas = mx.ones((self.config.n_layer,))
        self.x0_lambdas = mx.full((self.config.n_layer,), 0.1)

    def num_params(self):
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def estimate_flops(self):
        """Matmul FLOPs per token, forward + backward (embedding lookups and scalars excluded)."""
        c = self.config
        kv_dim = c.n_kv_head * (c.n_embd // c.n_head)
        lookups = c.vocab_size * c.n_embd + len(self.value_embeds) * c.vocab_size * kv_dim
        matmul_params = self.num_params() - lookups - 2 * c.n_layer
        attn = sum(12 * c.n_head * (c.n_embd // c.n_head) * min(w, c.sequence_len) for w in self.window_sizes(c))
        return 6 * matmul_params + attn

    def __call__(self, idx, targets=None):
        """Logits (B, T, V) in float32, or per-token cross-entropy (B, T) in nats when targets are given."""
        B, T = idx.shape
        dt = COMPUTE_DTYPE
        cos, sin = rotary_tables(T, self.config.n_embd // self.config.n_head, dt)
        x = norm(self.transformer["wte"](idx).astype(dt))
        x0 = x
        for i, block in enumerate(self.transformer["h"]):
            x = self.resid_lambdas[i].astype(dt) * x + self.x0_lambdas[i].astype(dt) * x0
            ve = self.value_embeds[str(i)](idx).astype(dt) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin)
        logits = self.lm_head(norm(x)).astype(mx.float32)
        logits = 15.0 * mx.tanh(logits / 15.0)  # soft cap
        if targets is None:
            return logits
        return nn.losses.cross_entropy(logits, targets, reduction="none")


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

# Polar Express coefficients (5 iterations): an odd polynomial per iteration that drives every
# singular value of the normalized momentum towards 1, faster than plain Newton-Schulz.
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(g, steps):
    """Approximate orthogonal polar factor U V^T of g, computed in the compute dtype."""
    x = (g / (mx.sqrt(mx.sum(g * g)) * 1.02 + 1e-6)).astype(COMPUTE_DTYPE)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
    for a, b, c in polar_express_coeffs[:steps]:
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return (x.T if tall else x).astype(g.dtype)


class MuonAdamW:
    """
    Muon for the 2-D matrices of the transformer blocks, AdamW for embeddings, lm_head and scalars.
    Muon: Nesterov momentum -> Polar Express orthogonalization -> NorMuon variance reduction
    (per-row or per-column second moment, overall norm preserved) -> cautious weight decay (decay
    only where update and weight agree in sign). All state lives in self.state, a dict of mx.arrays,
    so mx.compile can carry it between steps; schedule values arrive as mx.array scalars.
    """

    def __init__(self, model, unembedding_lr, embedding_lr, matrix_lr, weight_decay, adam_betas, scalar_lr,
                 ns_steps=5, muon_beta2=0.95):
        dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
        self.ns_steps, self.muon_beta2, self.weight_decay = ns_steps, muon_beta2, weight_decay
        self.groups, self.state = {}, {"step": mx.array(0.0)}
        for path, p in tree_flatten(model.trainable_parameters()):
            adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
            if path.startswith("transformer.h.") and p.ndim == 2:
                rows, cols = p.shape
                group = dict(kind="muon", lr=matrix_lr * max(1.0, rows / cols) ** 0.5)
                reduce_axis = -1 if rows >= cols else -2  # second moment per row of tall, per column of wide
                self.state[path] = {"momentum": mx.zeros_like(p),
                                    "second": mx.zeros((rows, 1) if reduce_axis == -1 else (1, cols), dtype=p.dtype)}
                group["reduce_axis"] = reduce_axis
            elif path == "lm_head.weight":
                group = dict(adam, lr=unembedding_lr * dmodel_lr_scale)
            elif path == "transformer.wte.weight" or path.startswith("value_embeds."):
                group = dict(adam, lr=embedding_lr * dmodel_lr_scale)
            elif path == "resid_lambdas":
                group = dict(adam, lr=scalar_lr * 0.01)
            elif path == "x0_lambdas":
                group = dict(adam, lr=scalar_lr, betas=(0.96, 0.95))
            else:
                raise ValueError(f"no optimizer group for parameter {path}")
            if group["kind"] == "adamw":
                self.state[path] = {"m": mx.zeros_like(p), "v": mx.zeros_like(p)}
            self.groups[path] = group

    def _adamw(self, p, g, state, group, lr, step):
        beta1, beta2 = group["betas"]
        p = p * (1 - lr * group["weight_decay"])
        state["m"] = state["m"] + (1 - beta1) * (g - state["m"])
        state["v"] = state["v"] + (1 - beta2) * (g * g - state["v"])
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        return p - (lr / bias1) * state["m"] / (mx.sqrt(state["v"] / bias2) + group["eps"])

    def _muon(self, p, g, state, group, lr, momentum, weight_decay):
        # Nesterov: buf <- lerp(buf, g, 1 - mu); update direction lerp(g, buf, mu)
        state["momentum"] = state["momentum"] + (1 - momentum) * (g - state["momentum"])
        g = g + momentum * (state["momentum"] - g)
        g = polar_express(g, self.ns_steps)
        # NorMuon: normalize by a running second moment per row/column, then restore the overall norm
        axis = group["reduce_axis"]
        n = g.shape[axis]
        v_mean = mx.mean(g * g, axis=axis, keepdims=True)
        v_norm = mx.sqrt(mx.sum(v_mean) * n)
        state["second"] = state["second"] + (1 - self.muon_beta2) * (v_mean - state["second"])
        step_size = mx.rsqrt(mx.maximum(state["second"], 1e-10))
        v_norm_new = mx.sqrt(mx.sum(v_mean * n * step_size * step_size))
        g = g * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))
        # cautious weight decay: only where the update and the weight have the same sign
        mask = (g * p) >= 0
        return p - lr * g - lr * weight_decay * p * mask

    def update(self, model, grads, lr_mult, momentum, weight_decay):
        """One step. lr_mult, momentum and weight_decay are mx.array scalars (no recompilation)."""
        step = self.state["step"] + 1
        self.state["step"] = step
        flat_grads = dict(tree_flatten(grads))
        new = {}
        for path, p in tree_flatten(model.trainable_parameters()):
            group, g = self.groups[path], flat_grads[path]
            if group["kind"] == "muon":
                new[path] = self._muon(p, g, self.state[path], group, group["lr"] * lr_mult, momentum, weight_decay)
            else:
                new[path] = self._adamw(p, g, self.state[path], group, group["lr"] * lr_mult, step)
        model.update(tree_map_with_path(lambda path, _: new[path], model.trainable_parameters()))


# ---------------------------------------------------------------------------
# Weights exchange
# ---------------------------------------------------------------------------


def export_weights(model):
    """PyTorch state_dict names and layouts (Linear weights are (out, in)), float32 numpy."""
    return {name: np.array(w.astype(mx.float32)) for name, w in tree_flatten(model.parameters())}


def load_weights(model, weights):
    """Inverse of export_weights: every name must be present with its exact shape."""
    current = dict(tree_flatten(model.parameters()))
    missing, unexpected = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
    if missing or unexpected:
        raise KeyError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
    for name, w in current.items():
        if tuple(np.shape(weights[name])) != tuple(w.shape):
            raise ValueError(f"{name}: shape {np.shape(weights[name])}, model has {tuple(w.shape)}")
    model.update(tree_map_with_path(
        lambda name, w: mx.array(np.asarray(weights[name], dtype=np.float32)).astype(w.dtype), model.parameters()))
    mx.eval(model.parameters())


def per_token_loss(model, rows_per_chunk=None):
    """loss_fn for prepare.evaluate_bpb: (b, T) int32 numpy in, (b, T) nats out, computed in chunks of
    rows_per_chunk rows (default DEVICE_BATCH_SIZE) so memory stays bounded whatever b is."""
    chunk = rows_per_chunk or DEVICE_BATCH_SIZE
    forward = mx.compile(lambda x, y: model(x, y), inputs=model.state)

    def loss_fn(inputs, targets):
        out = []
        for start in range(0, len(inputs), chunk):
            x = mx.array(np.asarray(inputs[start:start + chunk], dtype=np.int32))
            y = mx.array(np.asarray(targets[start:start + chunk], dtype=np.int32))
            out.append(np.array(forward(x, y)))
        return np.concatenate(out)

    return loss_fn


# ---------------------------------------------------------------------------
# Hyperparameters (plain literals: edited by the agent and by `autoresearch calibrate`)
# ---------------------------------------------------------------------------

# Model architecture
DEPTH = 4  # number of transformer blocks
ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 64
WINDOW_PATTERN = "SSSL"  # S: half-context sliding window, L: full context; last layer always L

# Optimization
TOTAL_BATCH_SIZE = 8192  # tokens per optimizer step
DEVICE_BATCH_SIZE = 16  # rows per forward/backward; gradient accumulation makes up the rest
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings (scaled by (d/768)^-0.5)
UNEMBEDDING_LR = 0.004  # AdamW, lm_head (scaled by (d/768)^-0.5)
MATRIX_LR = 0.04  # Muon, block matrices
SCALAR_LR = 0.5  # AdamW, x0_lambdas (resid_lambdas get 1% of it)
WEIGHT_DECAY = 0.2  # Muon cautious weight decay, decayed linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0  # fraction of the budget spent warming the lr up
WARMDOWN_RATIO = 0.5  # fraction of the budget spent decaying the lr
FINAL_LR_FRAC = 0.0  # lr multiplier at the end of the warmdown

# Evaluation and timing
EVAL_BATCH_SIZE = 32  # validation rows per evaluate_bpb call
WARMUP_EXCLUDE_STEPS = 2  # first steps (compilation, first allocations) do not count as training time

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def main():
    t_start = time.time()
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    mx.random.seed(seed)
    profile = load_profile()
    budget = time_budget(profile)
    seq_len = profile.seq_len
    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * seq_len
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, (
        f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * seq_len "
        f"({DEVICE_BATCH_SIZE} * {seq_len} = {tokens_per_fwdbwd})")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

    model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=model_dim // HEAD_DIM,
                       n_kv_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN)
    model = GPT(config)
    model.init_weights()
    mx.eval(model.parameters())
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    optimizer = MuonAdamW(model, unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                          weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR)
    mx.eval(optimizer.state)
    print(f"Device: {device_name()} | compute dtype: {COMPUTE_DTYPE} | seed {seed}")
    print(f"Model config: {asdict(config)}")
    print(f"Parameters: {num_params:,} | FLOPs/token: {flops_per_token:.3e}")
    print(f"Time budget: {budget:g}s | grad accumulation steps: {grad_accum_steps}")

    def loss_fn(model, x, y):
        return mx.mean(model(x, y))

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def train_step(x, y, lr_mult, momentum, weight_decay):
        # x, y: (grad_accum_steps, B, T); the micro-steps are unrolled into one graph
        loss, grads = loss_and_grad(model, x[0], y[0])
        for i in range(1, grad_accum_steps):
            micro_loss, micro_grads = loss_and_grad(model, x[i], y[i])
            loss = loss + micro_loss
            grads = tree_map(mx.add, grads, micro_grads)
        if grad_accum_steps > 1:
            loss = loss / grad_accum_steps
            grads = tree_map(lambda g: g / grad_accum_steps, grads)
        optimizer.update(model, grads, lr_mult, momentum, weight_decay)
        return loss

    train_step = mx.compile(train_step, inputs=state, outputs=state)

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train")

    def next_batch():
        xs, ys = [], []
        for _ in range(grad_accum_steps):
            x, y, epoch = next(train_loader)
            xs.append(x)
            ys.append(y)
        return mx.array(np.stack(xs)), mx.array(np.stack(ys)), epoch

    x, y, epoch = next_batch()
    print(f"Startup: {time.time() - t_start:.1f}s")

    smooth_train_loss = 0.0
    total_training_time = 0.0
    timed_steps = 0
    step = 0
    last_print = 0.0
    while True:
        t0 = time.time()
        progress = min(total_training_time / budget, 1.0)
        lrm = get_lr_multiplier(progress)
        loss = train_step(x, y, mx.array(lrm), mx.array(get_muon_momentum(step)),
                          mx.array(get_weight_decay(progress)))
        mx.async_eval(loss, state)
        x, y, next_epoch = next_batch()  # load the next batch while the step runs
        mx.eval(loss, state)
        train_loss = loss.item()
        if not math.isfinite(train_loss) or train_loss > 100:
            print(f"FAIL: training loss {train_loss} at step {step}", flush=True)
            sys.exit(1)
        dt = time.time() - t0
        if step >= WARMUP_EXCLUDE_STEPS:
            total_training_time += dt
            timed_steps += 1

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
        debiased = smooth_train_loss / (1 - ema_beta ** (step + 1))
        done = step >= WARMUP_EXCLUDE_STEPS and total_training_time >= budget
        if step < 5 or done or time.time() - last_print >= 1.0:
            last_print = time.time()
            remaining = max(0.0, budget - total_training_time)
            print(f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
                  f"dt: {dt * 1000:.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):,} | epoch: {epoch} | "
                  f"remaining: {remaining:.0f}s", flush=True)
        epoch = next_epoch
        if step == 0:
            gc.collect()  # freeze startup garbage; nothing cyclic is created in the loop
            gc.freeze()
            gc.disable()
        step += 1
        if done:
            break

    total_tokens = step * TOTAL_BATCH_SIZE
    val_bpb = evaluate_bpb(per_token_loss(model), EVAL_BATCH_SIZE)
    t_end = time.time()
    tokens_per_sec = timed_steps * TOTAL_BATCH_SIZE / total_training_time if total_training_time > 0 else 0.0
    peak = peak_flops(device_name())

    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
    if peak:
        print(f"mfu_percent:      {100 * flops_per_token * tokens_per_sec / peak:.2f}")
    print(f"tokens_per_sec:   {tokens_per_sec:.0f}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print("backend:          mlx")
    print(f"device:           {device_name()}")
    print(f"eval_profile:     {profile.name}")
    print(f"seed:             {seed}")
    print(f"budget_seconds:   {budget:g}")


if __name__ == "__main__":
    main()
