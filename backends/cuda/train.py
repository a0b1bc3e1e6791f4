"""
autoresearch pretraining script, PyTorch on NVIDIA GPUs. Single GPU, single file.

The recipe of karpathy/autoresearch (itself distilled from nanochat): a small GPT with value
embeddings, rotary, QK-norm, sliding-window attention and a relu² MLP, trained by Muon + AdamW for
a fixed wall-clock budget. The harness scores the checkpoint it leaves (autoresearch/evaluate.py).
On a machine without CUDA the same file runs on the CPU in float32 (slowly), so CI can exercise it.

Usage: python backends/cuda/train.py   (from the repository root, after `autoresearch prepare`)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds prepare.py
# less fragmentation, bigger batches; torch 2.8-2.10 read only the older name, later ones the newer
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True"))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

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

from prepare import load_profile, time_budget, Tokenizer, make_dataloader, export_model, gpu_peak_flops
from prepare import FA3_KERNELS

# ---------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------

device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
on_gpu = device.type == "cuda"
capability = torch.cuda.get_device_capability() if on_gpu else (0, 0)
# GPU from Ampere (sm80) on: fp32 master weights, matmuls under bf16 autocast (tensor cores; bf16 needs no loss
# scaling). Older GPUs (T4, V100) have no bf16, and fp16 without a GradScaler underflows: float32 there.
# CPU: plain float32, so the CPU run is also the float32 reference the conformance test compares.
compute_dtype = torch.bfloat16 if capability >= (8, 0) else torch.float32
embed_dtype = compute_dtype  # embedding tables live in bf16 on GPU: half the memory traffic of the biggest tensors
# compiling costs about a minute and pays back on GPU; on CPU it would only slow CI down. Triton needs sm70+.
use_compile = on_gpu and capability >= (7, 0)
exclude_steps = 10 if use_compile else 1  # the first steps (compilation, allocator warm-up) don't count as training time
if on_gpu and compute_dtype == torch.float32:
    print(f"precision: sm{capability[0]}{capability[1]} has no bf16; float32 throughout"
          + ("" if use_compile else ", compile off (Triton needs sm70+)"))


def compile_counts():
    """(recompiles, graph breaks) dynamo has counted in this process. A graph break (an op or kernel dynamo cannot
    trace, such as an FA3 build without a fake implementation) splits the step into pieces and silently costs
    throughput; a recompile re-traces a function whose guards failed (adamw_step compiles once per shape)."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    per_frame = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})  # compilations of each traced frame
    return sum(max(0, n - 1) for n in per_frame.values()), sum(counters["graph_break"].values())


def autocast_ctx():
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type="cuda", dtype=compute_dtype)


def synchronize():
    if on_gpu:
        torch.cuda.synchronize()


def device_name():
    return torch.cuda.get_device_name(0) if on_gpu else "cpu"


def peak_memory_mb():
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # Unix only; the CPU fallback reports the process's peak resident memory

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def to_device(array, dev=device):
    """A numpy int32 batch on the device as int64 token ids; pinned + async on GPU so the copy overlaps compute."""
    t = torch.from_numpy(np.array(array, dtype=np.int32))  # a copy: the loader's arrays may be read-only views
    if dev.type == "cuda":
        t = t.pin_memory().to(dev, non_blocking=True)
    return t.long()


def device_peak_flops():
    """Peak bf16 FLOP/s of this GPU, or None (CPU, unknown GPU): then no MFU is reported."""
    if not on_gpu:
        return None
    return gpu_peak_flops(device_name())


# Attention kernel: the one place that picks it. Flash Attention 3 from the `kernels` hub where a build fits
# the GPU (native sliding windows, the fastest path). Without it, PyTorch SDPA: full-context layers take its
# causal flash path; sliding-window layers a FlexAttention block mask in the compiled graph on Ampere and
# newer (only the blocks inside the window are computed), else an explicit boolean mask (full T x T work).
# The builds it tries, best first, are prepare.FA3_KERNELS; a sandboxed run has no network, so it loads the one the
# harness fetched into the local hub cache.


def cached_kernel(repo, version):
    """This kernel version's folder in the local hub cache (where the harness fetched it), or None."""
    from huggingface_hub import constants

    root = Path(os.environ.get("KERNELS_CACHE") or constants.HF_HUB_CACHE)  # the directory `kernels` reads
    for kind in ("kernels", "models"):
        folder = root / f"{kind}--{repo.replace('/', '--')}"
        ref = folder / "refs" / f"v{version}"
        commit = ref.read_text().strip() if ref.is_file() else ""
        if re.fullmatch(r"[0-9a-f]{40}", commit) and (folder / "snapshots" / commit).is_dir():
            return folder / "snapshots" / commit
    return None


def get_fa3_kernel(repo, version):
    """The kernel's module, pinned to an API version and trusting exactly this repository. A cached one loads
    from its folder, with no hub call: huggingface_hub's offline lookup refuses a kernel fetched for one build
    only (its listing names the other builds, which are not there)."""
    from kernels import get_kernel, get_local_kernel  # first: its absence is the likeliest reason, and the clearest

    folder = cached_kernel(repo, version)
    if folder:
        module, source = get_local_kernel(folder, trust_remote_code=[repo]), "local cache, offline"
    else:
        module, source = get_kernel(repo, version=version, trust_remote_code=[repo]), "hub"
    return getattr(module, "flash_attn_interface", module), source  # varunneal nests the functions a level down


def load_flash_attention_3(capability):
    """The FA3 interface for a GPU of this compute capability, or None; says which loaded, or why none did."""
    candidates = [(repo, version) for repo, version, caps in FA3_KERNELS if capability in caps]
    if not candidates:
        print(f"fa3: no hub build for sm{capability[0]}{capability[1]}")
        return None
    for repo, version in candidates:
        try:
            interface, source = get_fa3_kernel(repo, version)
            print(f"fa3: {repo} v{version} ({source})")
            return interface
        except Exception as e:  # not installed, offline and not cached, no build for this torch: fall back, never fail
            print(f"fa3: {repo} v{version} unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return None


fa3 = load_flash_attention_3(capability) if on_gpu else None
use_flex = on_gpu and use_compile and fa3 is None and capability >= (8, 0)  # Flex's Triton kernels: Ampere on
attention_path = "fa3" if fa3 is not None else "flex" if use_flex else "sdpa"
_window_masks = {}


def window_block_mask(T, window, dev):
    """FlexAttention block mask of the same window: blocks wholly outside it are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=dev)


def flex_window_attention(q, k, v, window, gqa=False):
    """Causal attention with a left window over (B, H, T, D) tensors through FlexAttention."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=window_block_mask(q.size(2), window, q.device), enable_gqa=gqa)


def window_mask(T, window, dev):
    """Boolean (T, T) mask: query i sees key j iff 0 <= i - j <= window."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # built (and fused) in the graph
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
    # The exported graph takes SDPA: the harness runs PyTorch's own operators only (backends/README.md, "Scoring").
    exporting = torch.compiler.is_exporting()
    if fa3 is not None and on_device and not exporting:  # FA3 (bf16 only) loads only on GPU, where compute_dtype is bf16
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.size(1) != q.size(1)  # grouped kv heads: SDPA and Flex share each across its query heads
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif use_flex and on_device and torch.compiler.is_compiling() and not exporting:  # eager Flex would materialise T x T scores
        y = flex_window_attention(q, k, v, window, gqa)
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
    """One AdamW update in float32 (bf16 embeddings are cast up and back). Hyperparameters are 0-D CPU
    tensors, so changing their values never triggers a recompilation."""
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
    momentum = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    X = g.to(compute_dtype)  # bf16 on GPU: the iteration is stable there and twice as fast
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
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2_t.to(second_momentum_buffer.dtype))
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay: decay only the coordinates the update moves toward zero anyway
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


if use_compile:  # one fused kernel per update instead of dozens of small ones
    adamw_step = torch.compile(adamw_step, dynamic=False, fullgraph=True)
    muon_step = torch.compile(muon_step, dynamic=False, fullgraph=True)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the 2-D matrices inside the blocks (stacked by shape), AdamW for everything else."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        self._t = {name: torch.tensor(0.0, dtype=torch.float32) for name in
                   ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _fill(self, **values):
        for name, value in values.items():
            self._t[name].fill_(value)
        return [self._t[name] for name in values]

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

# Model architecture (the sequence length is the eval profile's, see prepare.py)
DEPTH = 8  # number of transformer layers
ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # attention head dimension
WINDOW_PATTERN = "SSSL"  # per-layer attention window: L = full context, S = half; the last layer is always L

# Optimization
TOTAL_BATCH_SIZE = 524288  # 2**19 tokens per optimizer step (gradient accumulation makes up the difference)
DEVICE_BATCH_SIZE = 128  # rows per forward/backward pass; lower it if memory runs out
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
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 for any matmul left in float32
    profile = load_profile()
    budget = time_budget(profile)
    calibrate_steps = int(os.environ.get("AUTORESEARCH_CALIBRATE_STEPS", "0"))  # autoresearch calibrate: time steps, save nothing
    seq_len = profile.seq_len
    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"device: {device_name()} | dtype: {compute_dtype} | profile: {profile.name} (seq_len {seq_len}, vocab {vocab_size})")
    print(f"attention: {attention_path}")
    print("compile: on" if use_compile else "compile: off (no CUDA: eager float32 on CPU keeps CI fast)")

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
    warmup_time = 0.0  # the excluded steps: compiling, mostly
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
        else:
            warmup_time += dt

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
    print("backend:          cuda")
    print(f"device:           {device_name()}")
    print(f"attention:        {attention_path}")
    if use_compile:
        recompiles, graph_breaks = compile_counts()
        print(f"compile_seconds:  {warmup_time:.1f}")  # the excluded warm-up steps, compiling included
        print(f"recompiles:       {recompiles}")
        print(f"graph_breaks:     {graph_breaks}")
    print(f"eval_profile:     {profile.name}")
    print(f"seed:             {seed}")
    print(f"budget_seconds:   {budget:g}")


if __name__ == "__main__":
    main()
