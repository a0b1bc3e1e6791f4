"""
autoresearch pretraining script, PyTorch eager on Apple's MPS (Metal). Single GPU, single file.

The recipe of karpathy/autoresearch (itself distilled from nanochat): a small GPT with value
embeddings, rotary, QK-norm, sliding-window attention and a relu² MLP, trained by Muon + AdamW for
a fixed wall-clock budget. The harness scores the checkpoint it leaves (autoresearch/evaluate.py).
On a machine without MPS the same file runs on the CPU in float32, so it doubles as the CPU backend.
The model and optimizer are backends/cuda/train.py's; only what the device forces differs (diff them).

Usage: python backends/mps/train.py   (from the repository root, after `autoresearch prepare`)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds prepare.py
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # an op missing on MPS runs on the CPU instead of failing

import contextlib
import gc
import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import load_profile, time_budget, Tokenizer, make_dataloader, export_model

# ---------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------

device = torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
on_gpu = device.type == "mps"


def mps_bf16_works():
    """bf16 autocast on MPS needs a recent macOS (14+) and PyTorch: probe it once rather than guess versions."""
    try:
        with torch.amp.autocast(device_type="mps", dtype=torch.bfloat16):
            a = torch.ones(8, 8, device="mps")
            out = a @ a
        return out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())
    except Exception:
        return False


def chip_name():
    import subprocess

    return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()


def native_bf16(chip):
    """Whether this Apple GPU computes bf16 natively: M2 (GPU family applegpu_g14) and later do; M1 (g13) emulates
    it, slower than float32. Decided from the chip's name, so the trainer and the evaluator, each in its own
    process and sandbox, always pick the same dtype (a timing could differ between them)."""
    return not re.match(r"(Apple M1\b|applegpu_g13)", chip)


# MPS: fp32 master weights, matmuls under bf16 autocast where it is faster (half the memory traffic, fp32's
# exponent range, so no loss scaling), else plain float32. Not fp16: without a GradScaler its narrow range
# overflows in the relu² MLP and flushes small gradients to zero.
# CPU: plain float32, so the CPU run is also the float32 reference the conformance test compares.
compute_dtype = torch.bfloat16 if on_gpu and native_bf16(chip_name()) and mps_bf16_works() else torch.float32
embed_dtype = torch.float32  # fp32 tables: Adam's small updates survive, and no bf16 in-place ops on MPS
use_compile = False  # torch.compile on MPS is immature and slow to start; eager mode works everywhere
exclude_steps = 3 if on_gpu else 1  # the first steps (Metal shader compilation, allocator warm-up) don't count


def autocast_ctx():
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type="mps", dtype=compute_dtype)


def synchronize():
    if on_gpu:
        torch.mps.synchronize()


def device_name():
    return "mps" if on_gpu else "cpu"


_mps_peak_bytes = 0


def peak_memory_mb():
    """MPS keeps no peak counter: the largest driver allocation seen (sampled every step). CPU: peak RSS."""
    global _mps_peak_bytes
    if on_gpu:
        _mps_peak_bytes = max(_mps_peak_bytes, torch.mps.driver_allocated_memory(), torch.mps.current_allocated_memory())
        return _mps_peak_bytes / 2**20
    import resource  # Unix only; the CPU fallback reports the process's peak resident memory

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


STAGING_SLOTS = 4  # host buffers per batch shape: the inputs and targets of two micro-steps in flight
_staging = {}  # batch shape -> [[host int64 tensor, MPS event recorded after its last copy or None], ...]


def to_device(array, dev=device):
    """A numpy int32 batch on the device as int64 token ids. On MPS the copy does not block (a blocking one
    waits for all queued GPU work, once per micro-step): it is staged in one of a few host buffers kept alive,
    because MPS reads the source only when the GPU reaches the copy, and a buffer is refilled only after that."""
    if dev.type != "mps":
        return torch.from_numpy(np.array(array, dtype=np.int32)).to(dev).long()  # a copy: inputs may be read-only views
    slot = staging_slot(np.shape(array))
    if slot[1] is not None:
        slot[1].synchronize()  # this buffer's previous copy has run: usually long ago
    np.copyto(slot[0].numpy(), array)  # int32 -> int64 on the host: the device copy is a plain blit
    out = slot[0].to(dev, non_blocking=True)
    slot[1] = torch.mps.Event()
    slot[1].record()
    return out


def staging_slot(shape):
    """The least recently used host buffer of this shape, [tensor, event], allocated until there are enough."""
    ring = _staging.setdefault(tuple(shape), [])
    if len(ring) < STAGING_SLOTS:
        ring.append([torch.empty(shape, dtype=torch.long), None])
        return ring[-1]
    ring.append(ring.pop(0))  # the oldest: its copy is the furthest behind
    return ring[-1]


def device_peak_flops():
    """Apple publishes no per-chip peak rate to measure against, so no MFU is reported on MPS or CPU."""
    return None


# Attention kernel: the one place that picks it. PyTorch SDPA (MPS has no Flash Attention 3): full-context
# layers take its causal path, sliding-window layers an explicit boolean mask, built once per shape and cached.
attention_path = "sdpa"
_window_masks = {}


def window_mask(T, window, dev):
    """Boolean (T, T) mask: query i sees key j iff 0 <= i - j <= window."""
    if torch.compiler.is_exporting():  # built in the graph: a cached one would be the trace's placeholder
        i = torch.arange(T, device=dev)
        d = i[:, None] - i[None, :]
        return (d >= 0) & (d <= window)
    key = (T, window, str(dev))
    if key not in _window_masks:
        i = torch.arange(T, device=dev)
        d = i[:, None] - i[None, :]
        _window_masks[key] = (d >= 0) & (d <= window)
    return _window_masks[key]


def attention(q, k, v, window):
    """Causal attention with a left window over (B, T, H, D) tensors, scale 1/sqrt(D); returns (B, T, H, D)."""
    T = q.size(1)
    on_device = q.device.type == device.type  # a model kept on the CPU (the conformance test) stays float32
    dtype = compute_dtype if on_device else torch.float32
    q, k, v = (t.to(dtype) for t in (q, k, v))  # one dtype for all three, whatever autocast left them in
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.size(1) != q.size(1)  # grouped kv heads: SDPA and Flex share each across its query heads
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


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
    """RMS norm without a weight."""
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rotary_cos_sin(seq_len, head_dim, dtype, base=10000.0):
    """cos, sin of shape (1, T, 1, D/2), computed in float64 so every backend starts from the same float32
    values."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    theta = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), inv_freq)[None, :, None, :]
    return tuple(f(theta).float().to(dtype) for f in (torch.cos, torch.sin))


def apply_rotary(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_sizes(config):
    """Per-layer attention window from the S/L pattern; the last layer always sees the full context."""
    pattern = config.window_pattern.upper()
    assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must be S/L letters, got {pattern!r}"
    sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = config.sequence_len
    return windows


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a per-token value embedding mixed in by an input-dependent gate per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = attention(q, k, v, window)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scales the residual stream per layer
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # mixes the first-layer input back in per layer
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        cos, sin = rotary_cos_sin(config.sequence_len, config.n_embd // config.n_head, torch.float32)
        self.register_buffer("cos", cos.to(self.lm_head.weight.device), persistent=False)
        self.register_buffer("sin", sin.to(self.lm_head.weight.device), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(d)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # 2·sigmoid(0) = 1: a neutral gate
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        self.transformer.wte.to(dtype=embed_dtype)
        self.value_embeds.to(dtype=embed_dtype)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight (embedding lookups are free) plus attention."""
        lookups = self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        matmul_params = self.num_params() - lookups - self.resid_lambdas.numel() - self.x0_lambdas.numel()
        h, d, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn = sum(12 * h * d * min(w, t) for w in window_sizes(self.config))
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None, reduction="mean"):
        """Soft-capped logits (B, T, V) in float32; with targets, the cross-entropy in nats: its mean, or per token
        (B, T) with reduction="none"."""
        B, T = idx.size()
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, (block, window) in enumerate(zip(self.transformer.h, window_sizes(self.config))):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, window)
        logits = self.lm_head(norm(x)).float()
        logits = 15 * torch.tanh(logits / 15)  # soft cap
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.view(B, T)


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


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """One AdamW update in float32 (a no-op cast here: every table is fp32). Hyperparameters are Python
    floats: MPS kernels take them as scalars, where 0-D CPU tensors would mix devices."""
    p32, m, v, g = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr_t * wd_t)  # decoupled weight decay
    m.lerp_(g, 1 - beta1_t)
    v.lerp_(g.square(), 1 - beta2_t)
    denom = (v / (1 - beta2_t**step_t)).sqrt() + eps_t
    p32.add_(m / denom * (-lr_t / (1 - beta1_t**step_t)))
    p.copy_(p32)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def muon_step(params, grads, momentum_buffer, second_momentum_buffer, momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim):
    """Muon on a stack of same-shape matrices: Nesterov momentum, Polar Express orthogonalization,
    NorMuon per-neuron variance normalization, then an update with cautious weight decay."""
    momentum = momentum_t
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    X = g.to(compute_dtype)  # bf16 where autocast works: the iteration is stable there and faster
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):  # tall: iterate on the small Gram matrix X^T X
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    g = X.to(params.dtype)
    # NorMuon (arXiv:2510.05491): normalize each neuron's update by a running second moment, keep the total norm
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2_t)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay: decay only the coordinates the update moves toward zero anyway
    lr, wd = lr_t, wd_t
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the 2-D matrices inside the blocks (stacked by shape), AdamW for everything else."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})

    def _fill(self, **values):
        return [float(value) for value in values.values()]

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)  # moments in fp32 even for bf16 tables
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            hyper = self._fill(step=state["step"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                               eps=group["eps"], wd=group["weight_decay"])
            adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *hyper)

    def _step_muon(self, group):
        params = group["params"]
        state = self.state[params[0]]  # the group's stacked buffers live with its first parameter
        rows, cols = params[0].shape
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            factored = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(factored, dtype=params[0].dtype, device=params[0].device)
        red_dim = -1 if rows >= cols else -2
        grads, stacked = torch.stack([p.grad for p in params]), torch.stack(params)
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # tall matrices get a larger step
        hyper = self._fill(momentum=group["momentum"], lr=lr, wd=group["weight_decay"], beta2=group["beta2"])
        muon_step(stacked, grads, state["momentum_buffer"], state["second_momentum_buffer"], *hyper,
                  group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)


def setup_optimizer(model, unembedding_lr, embedding_lr, matrix_lr, adam_betas, scalar_lr):
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW rates were tuned at width 768
    matrices = list(model.transformer.h.parameters())
    adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adam, params=list(model.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale),
        dict(adam, params=list(model.transformer.wte.parameters()), lr=embedding_lr * dmodel_lr_scale),
        dict(adam, params=list(model.value_embeds.parameters()), lr=embedding_lr * dmodel_lr_scale),
        dict(adam, params=[model.resid_lambdas], lr=scalar_lr * 0.01),
        dict(adam, params=[model.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
    ]
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                           ns_steps=5, beta2=0.95))  # momentum, weight decay: set before every step
    groups = [g for g in groups if g["params"]]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = MuonAdamW(groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


# ---------------------------------------------------------------------------
# Weights exchange
# ---------------------------------------------------------------------------


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the real module here


def export_weights(model):
    """Every parameter as a float32 numpy array under its PyTorch name (backends/README.md lists them)."""
    return {name: p.detach().float().cpu().numpy() for name, p in _unwrap(model).named_parameters()}


@torch.no_grad()
def load_weights(model, weights):
    """Copy numpy arrays named as export_weights names them into the model; names and shapes must match exactly."""
    params = dict(_unwrap(model).named_parameters())
    missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        w = np.asarray(weights[name], dtype=np.float32)
        if tuple(w.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(w.shape)} does not match the model's {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.ascontiguousarray(w)).to(device=p.device, dtype=p.dtype))
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


def main():
    t_start = time.time()
    seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    torch.manual_seed(seed)
    profile = load_profile()
    budget = time_budget(profile)
    calibrate_steps = int(os.environ.get("AUTORESEARCH_CALIBRATE_STEPS", "0"))  # autoresearch calibrate: time steps, save nothing
    seq_len = profile.seq_len
    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"device: {device_name()} | dtype: {compute_dtype} | profile: {profile.name} (seq_len {seq_len}, vocab {vocab_size})")
    print(f"attention: {attention_path}")
    print("compile: off (eager mode on MPS and CPU)")

    model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head, n_kv_head=n_head,
                       n_embd=model_dim, window_pattern=WINDOW_PATTERN)
    print(f"model config: {asdict(config)}")
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    # the graph the harness scores, traced now (startup time); save() writes it with the trained weights at the end
    save = export_model(model, DEVICE_BATCH_SIZE, seq_len, autocast_ctx()) if not calibrate_steps else None
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:.3e}")

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * seq_len
    if TOTAL_BATCH_SIZE % tokens_per_fwdbwd:
        sys.exit(f"FAIL: TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * seq_len = {tokens_per_fwdbwd}")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    optimizer = setup_optimizer(model, unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                                adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR)
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, seq_len, "train")
    x, y, epoch = next(train_loader)
    x, y = to_device(x), to_device(y)
    print(f"time budget: {budget:g}s | gradient accumulation steps: {grad_accum_steps}")

    peak_flops = device_peak_flops()
    t_start_training = time.time()
    smooth_train_loss = 0.0
    total_training_time = 0.0
    step = 0
    while True:
        synchronize()
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast_ctx():
                loss = train_model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)  # the next batch loads while the GPU works
            x, y = to_device(x), to_device(y)
        peak_memory_mb()  # MPS: sample the driver allocation, whose pool still holds this step's peak

        # schedules follow progress through the time budget, not the step count
        progress = min(total_training_time / budget, 1.0)
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step)
                group["weight_decay"] = get_weight_decay(progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            print(f"FAIL: training loss is {train_loss_f} at step {step}")
            sys.exit(1)
        synchronize()
        dt = time.time() - t0
        if step >= exclude_steps:
            total_training_time += dt

        smooth_train_loss = 0.9 * smooth_train_loss + 0.1 * train_loss_f
        debiased = smooth_train_loss / (1 - 0.9 ** (step + 1))
        mfu = f" | mfu: {100 * flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops:.1f}%" if peak_flops else ""
        remaining = max(0.0, budget - total_training_time)
        print(f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
              f"tok/sec: {int(TOTAL_BATCH_SIZE / dt):,}{mfu} | epoch: {epoch} | remaining: {remaining:.0f}s", flush=True)

        if step == 0:  # Python's GC causes ~500ms stalls: freeze what exists, then collect rarely
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
    print("backend:          mps")
    print(f"device:           {device_name()}")
    print(f"attention:        {attention_path}")
    print(f"eval_profile:     {profile.name}")
    print(f"seed:             {seed}")
    print(f"budget_seconds:   {budget:g}")


if __name__ == "__main__":
    main()
