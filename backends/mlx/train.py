"""
autoresearch pretraining script, MLX. Single device, single file.

The recipe of karpathy/autoresearch (itself distilled from nanochat): a small GPT with value
embeddings, rotary, QK-norm, sliding-window attention and a relu² MLP, trained by Muon + AdamW for
a fixed wall-clock budget. The harness scores the checkpoint it leaves (autoresearch/evaluate.py).
Idiomatic MLX: nn.Module, nn.value_and_grad, and the whole training step (forward, backward with
gradient accumulation, optimizer update) as one mx.compile'd function. Runs on Apple Silicon (Metal),
on NVIDIA GPUs with mlx[cuda], and on CPUs with mlx[cpu] (preload an optimized BLAS on Linux).
The model and optimizer are backends/cuda/train.py's; only what the framework forces differs.

Usage: python backends/mlx/train.py   (from the repository root, after `autoresearch prepare`)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds prepare.py

import gc
import math
import re
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from prepare import load_profile, time_budget, Tokenizer, make_dataloader, export_model, gpu_peak_flops

# ---------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------

device = mx.default_device()  # Metal on Apple Silicon, CUDA with mlx[cuda], else the CPU
on_gpu = device.type == mx.DeviceType.gpu
# Parameters and optimizer state stay float32, so small updates are not rounded away; activations and
# matmuls run in bf16 where the device is fast at it (Metal, CUDA), in float32 on CPUs, where bf16
# matmuls crawl. The CPU run is also the float32 reference the conformance test compares.
use_compile = True  # the whole step as one mx.compile'd graph: fused kernels on GPUs; about even on CPUs (bench/)
exclude_steps = 1  # step 0 traces and compiles (on CPUs MLX builds C++ kernels, cached on disk): not training time


def device_info():
    """mx.device_info() from MLX 0.30.4 on; before it, Metal's (no "device_name": the GPU architecture names it)."""
    info = getattr(mx, "device_info", None) or mx.metal.device_info
    return info()


def device_name():
    if not on_gpu:
        return "cpu"
    info = device_info()
    return str(info.get("device_name") or info.get("architecture") or "gpu")


def native_bf16(chip):
    """Whether this Apple GPU computes bf16 natively: M2 (GPU family applegpu_g14) and later do; M1 (g13) emulates
    it, slower than float32. Decided from the chip's name, so the trainer and the evaluator, each in its own
    process and sandbox, always pick the same dtype (a timing could differ between them)."""
    return not re.match(r"(Apple M1\b|applegpu_g13)", chip)


compute_dtype = mx.bfloat16 if on_gpu and native_bf16(device_name()) else mx.float32


def peak_memory_mb():
    return mx.get_peak_memory() / 2**20


def device_peak_flops():
    """Peak bf16 FLOP/s of an NVIDIA GPU (mlx[cuda]) from prepare's table, for MFU; Apple publishes no peak rate
    to measure against, so Metal and CPUs report none."""
    if not on_gpu:
        return None
    return gpu_peak_flops(device_name())


# Attention kernel: the one place that picks it. mx.fast.scaled_dot_product_attention: full-context
# layers take its "causal" mask, sliding-window layers an additive mask built once per shape and cached.
attention_path = "sdpa"
_window_masks = {}


def window_mask(T, window, dtype):
    """Additive (T, T) mask, 0 where query i sees key j (0 <= i - j <= window), -inf elsewhere. Built with
    numpy, so it is a constant rather than a tracer even when first asked for inside mx.compile."""
    key = (T, window, dtype)
    if key not in _window_masks:
        d = np.arange(T)[:, None] - np.arange(T)[None, :]
        allowed = (d >= 0) & (d <= window)
        _window_masks[key] = mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32)).astype(dtype)
    return _window_masks[key]


def attention(q, k, v, window):
    """Causal attention with a left window over (B, T, H, D) arrays, scale 1/sqrt(D); returns (B, T, H, D)."""
    T, D = q.shape[1], q.shape[-1]
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # grouped kv heads need no tiling here
    mask = "causal" if window >= T - 1 else window_mask(T, window, q.dtype)
    y = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(D), mask=mask)
    return y.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    """RMS norm without a weight; the fused kernel accumulates in float32 for bf16 inputs too."""
    return mx.fast.rms_norm(x, None, 1e-6)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


_rotary = {}


def rotary_cos_sin(seq_len, head_dim, dtype, base=10000.0):
    """cos, sin of shape (1, T, 1, D/2), computed in float64 so every backend starts from the same float32
    values; numpy-built and cached, so constants inside mx.compile."""
    key = (seq_len, head_dim, dtype)
    if key not in _rotary:
        inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        theta = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)[None, :, None, :]
        _rotary[key] = tuple(mx.array(f(theta).astype(np.float32)).astype(dtype) for f in (np.cos, np.sin))
    return _rotary[key]


def apply_rotary(x, cos, sin):
    # written out: nn.RoPE rotates the other way round, and the contract fixes this sign convention
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return mx.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def window_sizes(config):
    """Per-layer attention window from the S/L pattern; the last layer always sees the full context."""
    pattern = config.window_pattern.upper()
    assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must be S/L letters, got {pattern!r}"
    sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = config.sequence_len
    return windows


@mx.custom_function
def softcap_cross_entropy(logits, targets):
    """
    Per-token cross-entropy in nats of the soft-capped logits z = 15·tanh(logits/15), with a hand-written
    backward. Returns (loss, t, e, s) with t = tanh(logits/15), e = exp(z), s = sum(e): the backward reuses
    them and needs no transcendental function. Autodiff would add a cosh pass (tanh's vjp) and a second exp
    pass (softmax) over the (B, T, V) logits, which dominate a small model's step on CPUs, where MLX's
    elementwise ops are scalar and single-threaded.
    """
    t = 1 - 2 / (mx.exp(logits * (2 / 15)) + 1)  # tanh(logits/15) through one exp: faster than tanh there
    e = mx.exp(15 * t)  # |z| <= 15: no overflow, so no max subtraction
    s = mx.sum(e, axis=-1)
    z_target = 15 * mx.take_along_axis(t, targets[..., None], axis=-1)[..., 0]
    return mx.log(s) - z_target, t, e, s


@softcap_cross_entropy.vjp
def softcap_cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    _, t, e, s = outputs
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    dz = (e * (1 / s)[..., None] - onehot) * cotangents[0][..., None]  # softmax(z) - onehot
    return dz * (1 - t * t), mx.zeros_like(targets)  # tanh' = 1 - tanh²


class Linear(nn.Linear):
    """Bias-free nn.Linear (weight (out, in), as PyTorch's) that casts its float32 weight to the input's
    dtype: bf16 compute over float32 master weights, as autocast does."""

    def __init__(self, in_dims, out_dims):
        super().__init__(in_dims, out_dims, bias=False)

    def __call__(self, x):
        w = self.weight
        return x @ (w if w.dtype == x.dtype else w.astype(x.dtype)).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate_channels = 32
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head) if has_ve(layer_idx, config.n_layer) else None

    def __call__(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a per-token value embedding mixed in by an input-dependent gate per head
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate[..., None] * ve.reshape(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = attention(q, k, v, window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # a dict and a list of modules: parameter paths come out as PyTorch's state_dict names
        self.transformer = {
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": [Block(config, i) for i in range(config.n_layer)],
        }
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.resid_lambdas = mx.ones((config.n_layer,))  # scales the residual stream per layer
        self.x0_lambdas = mx.zeros((config.n_layer,))  # mixes the first-layer input back in per layer
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = {
            str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)
        }

    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(d)

        def uniform(w):
            return mx.random.uniform(-s, s, w.shape)

        self.transformer["wte"].weight = mx.random.normal(self.transformer["wte"].weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for block in self.transformer["h"]:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                lin.weight = uniform(lin.weight)
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)  # every block starts as the identity
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)  # 2·sigmoid(0) = 1: a neutral gate
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight)
        self.resid_lambdas = mx.ones((self.config.n_layer,))
        self.x0_lambdas = mx.full((self.config.n_layer,), 0.1)

    def num_params(self):
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight (embedding lookups are free) plus attention."""
        lookups = self.transformer["wte"].weight.size + sum(ve.weight.size for ve in self.value_embeds.values())
        matmul_params = self.num_params() - lookups - self.resid_lambdas.size - self.x0_lambdas.size
        h, d, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn = sum(12 * h * d * min(w, t) for w in window_sizes(self.config))
        return 6 * matmul_params + attn

    def __call__(self, idx, targets=None, reduction="mean"):
        """Soft-capped logits (B, T, V) in float32; with targets, the cross-entropy in nats: its mean, or per token
        (B, T) with reduction="none"."""
        B, T = idx.shape
        dt = compute_dtype
        cos, sin = rotary_cos_sin(T, self.config.n_embd // self.config.n_head, dt)
        x = norm(self.transformer["wte"](idx).astype(dt))
        x0 = x
        for i, (block, window) in enumerate(zip(self.transformer["h"], window_sizes(self.config))):
            x = self.resid_lambdas[i].astype(dt) * x + self.x0_lambdas[i].astype(dt) * x0
            ve = self.value_embeds[str(i)](idx).astype(dt) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, window)
        logits = self.lm_head(norm(x)).astype(mx.float32)
        if targets is None:
            return 15 * mx.tanh(logits / 15)  # soft cap
        loss, *_ = softcap_cross_entropy(logits, targets)
        return mx.mean(loss) if reduction == "mean" else loss


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

# Polar Express orthogonalization coefficients (Amsel et al. 2025, arXiv:2505.16932), one triple per iteration
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, state, step, lr, betas, eps, wd):
    """One AdamW update; returns the new parameter and replaces the moments in state."""
    beta1, beta2 = betas
    p = p * (1 - lr * wd)  # decoupled weight decay
    state["exp_avg"] = state["exp_avg"] + (1 - beta1) * (grad - state["exp_avg"])  # lerp toward the gradient
    state["exp_avg_sq"] = state["exp_avg_sq"] + (1 - beta2) * (grad * grad - state["exp_avg_sq"])
    denom = mx.sqrt(state["exp_avg_sq"] / (1 - beta2**step)) + eps
    return p - (lr / (1 - beta1**step)) * state["exp_avg"] / denom


def muon_step(p, grad, state, momentum, lr, wd, beta2, ns_steps, red_dim):
    """One Muon update of one matrix: Nesterov momentum, Polar Express orthogonalization, NorMuon
    per-neuron variance normalization, then cautious weight decay. Returns the new parameter.
    (One matrix at a time: stacking same-shape matrices only adds copies on CPUs.)"""
    state["momentum_buffer"] = state["momentum_buffer"] + (1 - momentum) * (grad - state["momentum_buffer"])
    g = grad + momentum * (state["momentum_buffer"] - grad)  # Nesterov: lerp(grad, buffer, momentum)
    X = (g / (mx.sqrt(mx.sum(mx.square(g))) * 1.02 + 1e-6)).astype(compute_dtype)  # bf16 on GPUs: stable and faster
    tall = g.shape[0] > g.shape[1]
    if tall:  # iterate on the wide orientation, whose Gram matrix X X^T is the small one
        X = X.T
    for a, b, c in polar_express_coeffs[:ns_steps]:
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    g = (X.T if tall else X).astype(p.dtype)
    # NorMuon (arXiv:2510.05491): normalize each neuron's update by a running second moment, keep the total norm
    v_mean = mx.mean(mx.square(g), axis=red_dim, keepdims=True)
    red_size = g.shape[red_dim]
    v_norm = mx.sqrt(mx.sum(v_mean) * red_size)
    state["second_momentum_buffer"] = state["second_momentum_buffer"] + (1 - beta2) * (v_mean - state["second_momentum_buffer"])
    step_size = mx.rsqrt(mx.maximum(state["second_momentum_buffer"], 1e-10))
    v_norm_new = mx.sqrt(mx.sum(v_mean * red_size * mx.square(step_size)))
    g = g * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))
    # cautious weight decay: decay only the coordinates the update moves toward zero anyway
    mask = (g * p) >= 0
    return p - (lr * g + lr * wd * p * mask)


class MuonAdamW:
    """
    Muon for the 2-D matrices inside the blocks, AdamW for everything else. Every piece of state is an
    mx.array in self.state, a dict whose structure never changes, so mx.compile carries it between steps;
    the per-step schedule values arrive as mx.array scalars, so changing them never recompiles.
    """

    def __init__(self, model, groups):
        self.groups = groups  # parameter path -> its settings
        self.state = {"step": mx.array(0.0)}
        for path, p in tree_flatten(model.trainable_parameters()):
            if groups[path]["kind"] == "adamw":
                self.state[path] = {"exp_avg": mx.zeros_like(p), "exp_avg_sq": mx.zeros_like(p)}
            else:
                rows, cols = p.shape
                factored = (rows, 1) if rows >= cols else (1, cols)
                self.state[path] = {"momentum_buffer": mx.zeros_like(p), "second_momentum_buffer": mx.zeros(factored)}

    def update(self, model, grads, lr_multiplier, momentum, weight_decay):
        """One step for every parameter. lr_multiplier, and Muon's momentum and weight_decay, are mx scalars."""
        self.state["step"] = step = self.state["step"] + 1
        grads = dict(tree_flatten(grads))
        new = {}
        for path, p in tree_flatten(model.trainable_parameters()):
            group, state = self.groups[path], self.state[path]
            lr = group["lr"] * lr_multiplier
            if group["kind"] == "adamw":
                new[path] = adamw_step(p, grads[path], state, step, lr, group["betas"], group["eps"], group["weight_decay"])
            else:
                rows, cols = p.shape
                lr = lr * max(1.0, rows / cols) ** 0.5  # tall matrices get a larger step
                new[path] = muon_step(p, grads[path], state, momentum, lr, weight_decay, group["beta2"],
                                      group["ns_steps"], -1 if rows >= cols else -2)
        model.update(tree_map_with_path(lambda path, _: new[path], model.trainable_parameters()))


def setup_optimizer(model, unembedding_lr, embedding_lr, matrix_lr, adam_betas, scalar_lr):
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW rates were tuned at width 768
    adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
    groups = {}
    for path, p in tree_flatten(model.trainable_parameters()):
        if path.startswith("transformer.h."):
            assert p.ndim == 2, path
            groups[path] = dict(kind="muon", lr=matrix_lr, ns_steps=5, beta2=0.95)  # momentum, decay: per step
        elif path == "lm_head.weight":
            groups[path] = dict(adam, lr=unembedding_lr * dmodel_lr_scale)
        elif path == "transformer.wte.weight" or path.startswith("value_embeds."):
            groups[path] = dict(adam, lr=embedding_lr * dmodel_lr_scale)
        elif path == "resid_lambdas":
            groups[path] = dict(adam, lr=scalar_lr * 0.01)
        elif path == "x0_lambdas":
            groups[path] = dict(adam, lr=scalar_lr, betas=(0.96, 0.95))
        else:
            raise ValueError(f"no optimizer group for parameter {path}")
    return MuonAdamW(model, groups)


# ---------------------------------------------------------------------------
# Weights exchange
# ---------------------------------------------------------------------------


def export_weights(model):
    """Every parameter as a float32 numpy array under its PyTorch name (backends/README.md lists them)."""
    return {name: np.array(p.astype(mx.float32)) for name, p in tree_flatten(model.parameters())}


def load_weights(model, weights):
    """Copy numpy arrays named as export_weights names them into the model; names and shapes must match exactly."""
    params = dict(tree_flatten(model.parameters()))
    missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        if tuple(np.shape(weights[name])) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(np.shape(weights[name]))} does not match the model's {tuple(p.shape)}")
    model.update(tree_map_with_path(
        lambda name, p: mx.array(np.asarray(weights[name], dtype=np.float32)).astype(p.dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------

# Sized for the "cpu" eval profile on a small machine; `autoresearch calibrate` rewrites them for yours.
# Model architecture (the sequence length is the eval profile's, see prepare.py)
DEPTH = 4  # number of transformer layers
ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 64  # attention head dimension
WINDOW_PATTERN = "SSSL"  # per-layer attention window: L = full context, S = half; the last layer is always L

# Optimization
TOTAL_BATCH_SIZE = 8192  # 2**13 tokens per optimizer step (gradient accumulation makes up the difference)
DEVICE_BATCH_SIZE = 16  # rows per forward/backward pass; lower it if memory runs out
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW, lm_head
MATRIX_LR = 0.04  # Muon, block matrices
SCALAR_LR = 0.5  # AdamW, per-layer lambdas
WEIGHT_DECAY = 0.2  # cautious weight decay for Muon, decays linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0  # fraction of the time budget spent warming the learning rate up
WARMDOWN_RATIO = 0.5  # fraction of the time budget spent decaying it
FINAL_LR_FRAC = 0.0  # final learning rate as a fraction of the initial one


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def make_train_step(model, optimizer, grad_accum_steps):
    """train_step(x, y, lr_multiplier, momentum, weight_decay) -> mean loss, updating model and optimizer.
    x, y are (grad_accum_steps, B, T); the micro-steps unroll into one graph, compiled if use_compile."""
    loss_and_grad = nn.value_and_grad(model, lambda model, x, y: model(x, y))

    def train_step(x, y, lr_multiplier, momentum, weight_decay):
        loss, grads = loss_and_grad(model, x[0], y[0])
        for i in range(1, grad_accum_steps):
            # the next micro-batch waits for the gradients so far: one micro-batch's activations live at a time
            xi, yi = mx.depends([x[i], y[i]], [loss, *(g for _, g in tree_flatten(grads))])
            micro_loss, micro_grads = loss_and_grad(model, xi, yi)
            loss, grads = loss + micro_loss, tree_map(mx.add, grads, micro_grads)
        if grad_accum_steps > 1:
            loss, grads = loss / grad_accum_steps, tree_map(lambda g: g / grad_accum_steps, grads)
        optimizer.update(model, grads, lr_multiplier, momentum, weight_decay)
        return loss

    if not use_compile:
        return train_step
    state = [model.state, optimizer.state]  # read before and written after every call: nothing else is captured
    return mx.compile(train_step, inputs=state, outputs=state)


def main():
    t_start = time.time()
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    mx.random.seed(seed)
    profile = load_profile()
    budget = time_budget(profile)
    calibrate_steps = int(os.environ.get("AUTORESEARCH_CALIBRATE_STEPS", "0"))  # autoresearch calibrate: time steps, save nothing
    seq_len = profile.seq_len
    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"device: {device_name()} | dtype: {compute_dtype} | profile: {profile.name} (seq_len {seq_len}, vocab {vocab_size})")
    print(f"attention: {attention_path}")
    print("compile: on (the whole step)" if use_compile else "compile: off")

    model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head, n_kv_head=n_head,
                       n_embd=model_dim, window_pattern=WINDOW_PATTERN)
    print(f"model config: {asdict(config)}")
    model = GPT(config)
    model.init_weights()
    mx.eval(model.parameters())
    # the graph the harness scores, traced now (startup time); save() writes it with the trained weights at the end
    save = export_model(model, DEVICE_BATCH_SIZE, seq_len) if not calibrate_steps else None
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:.3e}")

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * seq_len
    if TOTAL_BATCH_SIZE % tokens_per_fwdbwd:
        sys.exit(f"FAIL: TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * seq_len = {tokens_per_fwdbwd}")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    optimizer = setup_optimizer(model, unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                                adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR)
    mx.eval(optimizer.state)
    train_step = make_train_step(model, optimizer, grad_accum_steps)

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train")

    def next_batch():
        """grad_accum_steps loader batches stacked: (inputs, targets, epoch), each (steps, B, T) on the device."""
        rows = [next(train_loader) for _ in range(grad_accum_steps)]
        return mx.array(np.stack([r[0] for r in rows])), mx.array(np.stack([r[1] for r in rows])), rows[-1][2]

    x, y, epoch = next_batch()
    print(f"time budget: {budget:g}s | gradient accumulation steps: {grad_accum_steps}")

    peak_flops = device_peak_flops()
    t_start_training = time.time()
    smooth_train_loss = 0.0
    total_training_time = 0.0
    step = 0
    while True:
        t0 = time.time()
        # schedules follow progress through the time budget, not the step count
        progress = min(total_training_time / budget, 1.0)
        lrm = get_lr_multiplier(progress)
        loss = train_step(x, y, mx.array(lrm), mx.array(get_muon_momentum(step)), mx.array(get_weight_decay(progress)))
        mx.async_eval(loss, model.parameters(), optimizer.state)
        x, y, next_epoch = next_batch()  # the next batch loads while the step runs
        mx.eval(loss, model.parameters(), optimizer.state)

        train_loss_f = loss.item()
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            print(f"FAIL: training loss is {train_loss_f} at step {step}")
            sys.exit(1)
        dt = time.time() - t0
        if step >= exclude_steps:
            total_training_time += dt

        smooth_train_loss = 0.9 * smooth_train_loss + 0.1 * train_loss_f
        debiased = smooth_train_loss / (1 - 0.9 ** (step + 1))
        mfu = f" | mfu: {100 * flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops:.1f}%" if peak_flops else ""
        remaining = max(0.0, budget - total_training_time)
        print(f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
              f"tok/sec: {int(TOTAL_BATCH_SIZE / dt):,}{mfu} | epoch: {epoch} | remaining: {remaining:.0f}s", flush=True)
        epoch = next_epoch

        if step == 0:  # Python's GC causes stalls: freeze what exists, then collect rarely
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()
        step += 1
        if step > exclude_steps and (total_training_time >= budget or step - exclude_steps == calibrate_steps):
            break

    counted_steps = step - exclude_steps
    tokens_per_sec = counted_steps * TOTAL_BATCH_SIZE / total_training_time if total_training_time > 0 else 0.0
    total_tokens = step * TOTAL_BATCH_SIZE

    t_save = time.time()
    if save:  # the harness scores this checkpoint in its own process (autoresearch/evaluate.py)
        save()
    t_end = time.time()
    print(f"startup: {t_start_training - t_start:.1f}s | checkpoint: {t_end - t_save:.1f}s")

    print("---")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
    if peak_flops and total_training_time > 0:
        print(f"mfu_percent:      {100 * flops_per_token * tokens_per_sec / peak_flops:.2f}")
    print(f"tokens_per_sec:   {tokens_per_sec:.0f}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.3f}")  # 3 decimals: small CPU runs see thousands of tokens
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.3f}")
    print(f"depth:            {DEPTH}")
    print("backend:          mlx")
    print(f"device:           {device_name()}")
    print(f"attention:        {attention_path}")
    print(f"eval_profile:     {profile.name}")
    print(f"seed:             {seed}")
    print(f"budget_seconds:   {budget:g}")


if __name__ == "__main__":
    main()
